//! The event log through the public API, on every configured backend.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{Error, Event, EventStore, ExpectedVersion, Metadata, NewEvent, StreamWrite};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct BookRegistered {
    book_id: i64,
    title: String,
    author: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct BookBorrowed {
    book_id: i64,
    user_id: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "Counted", view = false)]
struct Counted {
    writer: u32,
    n: u32,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum LibraryEvent {
    BookRegistered(BookRegistered),
    BookBorrowed(BookBorrowed),
}

fn registered(id: i64) -> BookRegistered {
    BookRegistered {
        book_id: id,
        title: format!("Book {id}"),
        author: format!("Author {}", id % 50),
    }
}

#[test]
fn every_envelope_field_round_trips() {
    for db in TestDatabase::all() {
        let store = db.store();
        let correlation = uuid::Uuid::new_v4();
        let causation = uuid::Uuid::new_v4();
        let metadata = Metadata::new()
            .correlation_id(correlation)
            .causation_id(causation)
            .actor("librarian")
            .with("ip", "10.0.0.7")
            .with("attempt", 2);
        let before = chrono::Utc::now() - chrono::Duration::seconds(5);
        let appended = store
            .append_with(
                "book-1",
                ExpectedVersion::NoStream,
                [registered(1), registered(1)],
                &metadata,
            )
            .unwrap();
        let after = chrono::Utc::now() + chrono::Duration::seconds(5);
        assert_eq!(appended.len(), 2);
        assert_eq!(appended[0].event, registered(1));
        assert_eq!(
            (appended[0].stream_version, appended[1].stream_version),
            (1, 2)
        );
        assert!(appended[0].global_position < appended[1].global_position);

        let read = store.read_stream("book-1", 1, 10).unwrap();
        assert_eq!(read.len(), 2, "{}", db.backend());
        for (r, a) in read.iter().zip(&appended) {
            assert_eq!(r.global_position, a.global_position);
            assert_eq!(r.event_id, a.event_id);
            assert_eq!(r.stream_id, "book-1");
            assert_eq!(r.stream_version, a.stream_version);
            assert_eq!(r.event_type, "BookRegistered");
            assert_eq!(r.event_version, 1);
            assert_eq!(r.metadata, metadata);
            assert_eq!(r.metadata.correlation_id, Some(correlation));
            assert_eq!(r.metadata.fields["attempt"], 2);
            // The store's clock may round differently than the append's reply.
            assert!((r.created_at - a.created_at).num_milliseconds().abs() <= 1);
            assert!(r.created_at > before && r.created_at < after);
            assert_eq!(r.decode::<BookRegistered>().unwrap().event, registered(1));
        }
        assert_ne!(read[0].event_id, read[1].event_id);
    }
}

#[test]
fn expected_versions_are_enforced_and_conflicts_write_nothing() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append("s", ExpectedVersion::NoStream, [registered(1)])
            .unwrap();
        store
            .append("s", ExpectedVersion::Exact(1), [registered(2)])
            .unwrap();
        store
            .append("s", ExpectedVersion::StreamExists, [registered(3)])
            .unwrap();
        store
            .append("s", ExpectedVersion::Any, [registered(4)])
            .unwrap();
        store
            .append("t", ExpectedVersion::Any, [registered(5)])
            .unwrap();
        for bad in [
            ExpectedVersion::NoStream,
            ExpectedVersion::Exact(3),
            ExpectedVersion::Exact(9),
        ] {
            match store.append("s", bad, [registered(9), registered(10)]) {
                Err(Error::Conflict {
                    stream,
                    expected,
                    actual,
                }) => {
                    assert_eq!((stream.as_str(), expected, actual), ("s", bad, 4));
                }
                other => panic!(
                    "{}: expected a conflict for {bad}, got {other:?}",
                    db.backend()
                ),
            }
        }
        let err = store
            .append("nope", ExpectedVersion::StreamExists, [registered(1)])
            .unwrap_err();
        assert!(err.is_conflict());
        assert!(err.to_string().contains("nothing was written"), "{err}");
        assert_eq!(store.stream_version("s").unwrap(), 4);
        assert_eq!(store.stream_version("nope").unwrap(), 0);
        assert_eq!(
            store.head().unwrap(),
            store
                .read_all(0, 100)
                .unwrap()
                .last()
                .unwrap()
                .global_position
        );
        assert_eq!(store.read_all(0, 100).unwrap().len(), 5);
    }
}

#[test]
fn eight_threads_win_each_version_exactly_once() {
    const VERSIONS: i64 = 40;
    for db in TestDatabase::all() {
        let store = db.store();
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8u32)
            .map(|writer| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut wins = Vec::new();
                    let mut conflicts = 0;
                    for n in 0..VERSIONS as u32 {
                        let expected = ExpectedVersion::Exact(n as i64);
                        match store.append("contested", expected, [Counted { writer, n }]) {
                            Ok(rec) => {
                                assert_eq!(rec[0].stream_version, n as i64 + 1);
                                wins.push(n as i64 + 1);
                            }
                            Err(Error::Conflict { actual, .. }) => {
                                assert!(actual > n as i64, "a loser sees a newer version");
                                conflicts += 1;
                            }
                            Err(other) => panic!("unexpected error: {other}"),
                        }
                    }
                    (writer, wins, conflicts)
                })
            })
            .collect();
        let mut winners = BTreeMap::new();
        let mut conflicts = 0;
        for h in handles {
            let (writer, wins, c) = h.join().unwrap();
            conflicts += c;
            for v in wins {
                assert!(winners.insert(v, writer).is_none(), "version {v} won twice");
            }
        }
        assert_eq!(
            winners.len() as i64,
            VERSIONS,
            "{}: every version won once",
            db.backend()
        );
        assert_eq!(conflicts, 8 * VERSIONS - VERSIONS);
        let stream = store.load_stream::<Counted>("contested").unwrap();
        let versions: Vec<i64> = stream.iter().map(|e| e.stream_version).collect();
        assert_eq!(
            versions,
            (1..=VERSIONS).collect::<Vec<_>>(),
            "no gaps, no duplicates"
        );
        for e in &stream {
            assert_eq!(
                winners[&e.stream_version], e.writer,
                "the stored event is the winner's"
            );
            assert_eq!(e.n as i64 + 1, e.stream_version);
        }
    }
}

#[test]
fn concurrent_appends_with_any_all_succeed() {
    for db in TestDatabase::all() {
        let store = db.store();
        let handles: Vec<_> = (0..4u32)
            .map(|writer| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for n in 0..25 {
                        store
                            .append("busy", ExpectedVersion::Any, [Counted { writer, n }])
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let versions: Vec<i64> = store
            .read_stream("busy", 1, 1000)
            .unwrap()
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(versions, (1..=100).collect::<Vec<_>>());
    }
}

#[test]
fn multi_stream_appends_are_atomic() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append("b", ExpectedVersion::NoStream, [registered(2)])
            .unwrap();

        let mut a = StreamWrite::new("a", ExpectedVersion::NoStream);
        a.push(&registered(1))
            .unwrap()
            .push(&registered(1))
            .unwrap();
        let mut b = StreamWrite::new("b", ExpectedVersion::NoStream);
        b.push(&registered(2)).unwrap();
        let err = store.append_streams(&[a.clone(), b]).unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { stream, actual: 1, .. } if stream == "b"),
            "{err}"
        );
        assert_eq!(
            store.stream_version("a").unwrap(),
            0,
            "{}: nothing of the batch",
            db.backend()
        );
        assert_eq!(store.read_all(0, 10).unwrap().len(), 1);

        let mut b = StreamWrite::new("b", ExpectedVersion::Exact(1));
        b.push_with(
            &BookBorrowed {
                book_id: 2,
                user_id: 7,
            },
            Metadata::new().actor("u7"),
        )
        .unwrap();
        let recorded = store.append_streams(&[a, b]).unwrap();
        let streams: Vec<(&str, i64)> = recorded
            .iter()
            .map(|r| (r.stream_id.as_str(), r.stream_version))
            .collect();
        assert_eq!(streams, [("a", 1), ("a", 2), ("b", 2)]);
        assert!(recorded
            .windows(2)
            .all(|w| w[0].global_position < w[1].global_position));
        assert_eq!(recorded[2].metadata.actor.as_deref(), Some("u7"));
    }
}

#[test]
fn paging_over_ten_thousand_events() {
    for db in TestDatabase::all() {
        let store = db.store();
        for batch in 0..10 {
            let mut writes = Vec::new();
            for s in 0..10 {
                let mut w = StreamWrite::new(format!("stream-{s}"), ExpectedVersion::Any);
                for n in 0..100 {
                    w.push(&Counted { writer: batch, n }).unwrap();
                }
                writes.push(w);
            }
            store.append_streams(&writes).unwrap();
        }
        let mut last = 0;
        let mut count = 0;
        for ev in store.iter_all(0, 333) {
            let ev = ev.unwrap();
            assert!(ev.global_position > last, "strictly increasing");
            last = ev.global_position;
            count += 1;
        }
        assert_eq!(count, 10_000, "{}", db.backend());
        assert_eq!(store.head().unwrap(), last);

        let page = store.read_all(0, 1000).unwrap();
        assert_eq!(page.len(), 1000);
        let next = store.read_all(page[999].global_position, 1000).unwrap();
        assert_eq!(next[0].global_position, page[999].global_position + 1);

        let stream = store.read_stream("stream-3", 950, 100).unwrap();
        assert_eq!(stream.len(), 51);
        assert_eq!(stream[0].stream_version, 950);
        assert_eq!(
            store.load_stream::<Counted>("stream-3").unwrap().len(),
            1000
        );
        assert_eq!(store.iter_types(&["Counted"], 0, 999).count(), 10_000);
        assert_eq!(store.iter_types(&["BookBorrowed"], 0, 999).count(), 0);
    }
}

#[test]
fn reads_by_type_and_event_enums() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append(
                "book-1",
                ExpectedVersion::NoStream,
                [
                    LibraryEvent::from(registered(1)),
                    LibraryEvent::from(BookBorrowed {
                        book_id: 1,
                        user_id: 3,
                    }),
                ],
            )
            .unwrap();
        store
            .append("c", ExpectedVersion::Any, [Counted { writer: 0, n: 0 }])
            .unwrap();
        let borrowed = store.read_events::<BookBorrowed>(0, 10).unwrap();
        assert_eq!(borrowed.len(), 1);
        assert_eq!(borrowed[0].user_id, 3);
        let all = store.read_events::<LibraryEvent>(0, 10).unwrap();
        assert_eq!(all.len(), 2);
        assert!(matches!(all[0].event, LibraryEvent::BookRegistered(_)));
        let stream = store.load_stream::<LibraryEvent>("book-1").unwrap();
        assert_eq!(stream[1].event_type, "BookBorrowed");
    }
}

#[test]
fn unusual_stream_ids_are_stored_verbatim() {
    for db in TestDatabase::all() {
        let store = db.store();
        let long: String = (0..10_240)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let ids = [
            "it's \"quoted\"; DROP TABLE es_events; --".to_owned(),
            "книга-📚-書籍 \u{200d} ü".to_owned(),
            format!("{long}-x"),
            format!("{long}-y"),
            " leading and trailing ".to_owned(),
        ];
        for id in &ids {
            store
                .append(id, ExpectedVersion::NoStream, [registered(1)])
                .unwrap();
            store
                .append(id, ExpectedVersion::Exact(1), [registered(2)])
                .unwrap();
        }
        for id in &ids {
            let events = store.read_stream(id, 1, 10).unwrap();
            assert_eq!(events.len(), 2, "{}: {:.40}", db.backend(), id);
            assert!(events.iter().all(|e| &e.stream_id == id));
            assert_eq!(store.stream_version(id).unwrap(), 2);
        }
        let all = store.read_all(0, 100).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[4].stream_id.len(), 10_242);
    }
}

#[test]
fn bad_stream_ids_are_refused_with_a_clear_error() {
    for db in TestDatabase::all() {
        let store = db.store();
        let err = store
            .append("", ExpectedVersion::Any, [registered(1)])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidStreamId { .. }), "{err:?}");
        assert!(err.to_string().contains("stream id is empty"), "{err}");
        let err = store
            .append("a\0b", ExpectedVersion::Any, [registered(1)])
            .unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
        let mut ok = StreamWrite::new("fine", ExpectedVersion::Any);
        ok.push(&registered(1)).unwrap();
        let mut bad = StreamWrite::new("", ExpectedVersion::Any);
        bad.push(&registered(1)).unwrap();
        assert!(store.append_streams(&[ok, bad]).is_err());
        assert_eq!(store.head().unwrap(), 0, "nothing written");
    }
}

mod reshaped {
    use super::*;

    /// `BookBorrowed` as a later, incompatible build of the code sees it.
    #[derive(Event, Serialize, Deserialize, Debug)]
    #[event(name = "BookBorrowed", view = false, copy)]
    pub struct BookBorrowed {
        pub isbn: String,
    }
}

#[test]
fn a_payload_that_no_longer_decodes_is_an_error_with_its_position() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append("book-1", ExpectedVersion::NoStream, [registered(1)])
            .unwrap();
        let rec = store
            .append(
                "book-1",
                ExpectedVersion::Exact(1),
                [BookBorrowed {
                    book_id: 1,
                    user_id: 2,
                }],
            )
            .unwrap();
        let position = rec[0].global_position;
        match store.load_stream::<LibraryEvent>("book-1") {
            Ok(events) => assert_eq!(events.len(), 2),
            Err(e) => panic!("{e}"),
        }
        let err = store
            .read_events::<reshaped::BookBorrowed>(0, 10)
            .unwrap_err();
        match &err {
            Error::Decode {
                position: p,
                event_type,
                stream,
                ..
            } => {
                assert_eq!(
                    (*p, event_type.as_str(), stream.as_str()),
                    (position, "BookBorrowed", "book-1")
                );
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("global position {position}")) && text.contains("isbn"),
            "{text}"
        );
        // An event of a type the Rust type does not know.
        let err = store.load_stream::<BookBorrowed>("book-1").unwrap_err();
        assert!(
            err.to_string().contains("`BookRegistered` is not one of"),
            "{err}"
        );
    }
}

#[test]
fn the_database_refuses_updates_and_deletes() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append("book-1", ExpectedVersion::NoStream, [registered(1)])
            .unwrap();
        let mut conn = store.connection().unwrap();
        for sql in [
            "UPDATE es_events SET stream_id = 'x'",
            "DELETE FROM es_events",
            "UPDATE es_events SET payload = '{}' WHERE global_position > 0",
        ] {
            let err = diesel::sql_query(sql).execute(&mut *conn).unwrap_err();
            assert!(
                err.to_string().contains("append-only"),
                "{}: {sql}: {err}",
                db.backend()
            );
        }
        drop(conn);
        let events = store.read_stream("book-1", 1, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].decode::<BookRegistered>().unwrap().event,
            registered(1)
        );
    }
}

/// `INSERT OR REPLACE` deletes the row it conflicts with, and an upsert
/// updates it: neither may rewrite a logged event, on a store connection or
/// on a plain one that lacks the store's pragmas.
#[test]
fn inserts_that_would_overwrite_an_event_are_refused() {
    for db in TestDatabase::all() {
        let store = db.store();
        for book in 1..=2 {
            store
                .append(
                    &format!("book-{book}"),
                    ExpectedVersion::NoStream,
                    [registered(book)],
                )
                .unwrap();
        }
        let before = store.read_all(0, 10).unwrap();
        let (pos, id) = (before[0].global_position, before[0].event_id);
        let statements: Vec<String> = match db.backend() {
            es_diesel::Backend::Sqlite => {
                let fresh = || uuid::Uuid::new_v4().to_string();
                let rows = [
                    // Same event id, elsewhere.
                    ("NULL".to_owned(), id.to_string(), "other", 1),
                    // Same stream and version.
                    ("NULL".to_owned(), fresh(), "book-1", 1),
                    // Same position.
                    (pos.to_string(), fresh(), "other", 1),
                    // A version that skips one: appends check their
                    // expected version with this rule alone.
                    ("NULL".to_owned(), fresh(), "book-1", 3),
                    // A new stream that does not start at 1.
                    ("NULL".to_owned(), fresh(), "other", 2),
                ];
                let mut out = Vec::new();
                for (position, event_id, stream, version) in rows {
                    let insert = |verb: &str| {
                        format!(
                            "{verb} es_events (global_position, event_id, stream_id, stream_version, event_type, \
                             event_version, payload, metadata, created_at) VALUES ({position}, '{event_id}', \
                             '{stream}', {version}, 'BookRegistered', 1, '{{\"rewritten\":1}}', '{{}}', '2000-01-01 00:00:00')"
                        )
                    };
                    out.push(insert("INSERT OR REPLACE INTO"));
                    out.push(insert("REPLACE INTO"));
                    for target in [
                        "(event_id)",
                        "(stream_id, stream_version)",
                        "(global_position)",
                    ] {
                        out.push(format!(
                            "{} ON CONFLICT {target} DO UPDATE SET payload = excluded.payload",
                            insert("INSERT INTO")
                        ));
                    }
                    out.push(format!(
                        "{} ON CONFLICT DO UPDATE SET payload = excluded.payload",
                        insert("INSERT INTO")
                    ));
                }
                out
            }
            es_diesel::Backend::Mysql => {
                let fresh = || uuid::Uuid::new_v4().to_string();
                let rows = [
                    // Same event id, elsewhere.
                    ((pos + 1000).to_string(), id.to_string(), "other", 1),
                    // Same stream and version.
                    ((pos + 1001).to_string(), fresh(), "book-1", 1),
                    // Same position.
                    (pos.to_string(), fresh(), "other", 1),
                ];
                let mut out = Vec::new();
                for (position, event_id, stream, version) in rows {
                    let values = format!(
                        "es_events (global_position, event_id, stream_id, stream_version, event_type, \
                         event_version, payload, metadata, created_at) VALUES ({position}, '{event_id}', \
                         '{stream}', {version}, 'BookRegistered', 1, '{{\"rewritten\":1}}', '{{}}', '2000-01-01 00:00:00')"
                    );
                    out.push(format!("REPLACE INTO {values}"));
                    out.push(format!(
                        "INSERT INTO {values} ON DUPLICATE KEY UPDATE payload = VALUES(payload)"
                    ));
                }
                out.push("TRUNCATE TABLE es_events".to_owned());
                out.push("DROP TABLE es_events".to_owned());
                out
            }
            es_diesel::Backend::Postgres => {
                let copy = |event_id: &str, target: &str| {
                    format!(
                        "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, \
                         payload, metadata, created_at, order_key) \
                         SELECT {event_id}, stream_id, stream_version, event_type, event_version, \
                         '{{\"rewritten\":1}}', metadata, created_at, order_key FROM es_events \
                         WHERE global_position = {pos} ON CONFLICT {target} DO UPDATE SET payload = EXCLUDED.payload"
                    )
                };
                vec![
                    copy("event_id", "(event_id)"),
                    copy("gen_random_uuid()", "(md5(stream_id), stream_version)"),
                ]
            }
        };
        type Execute = Box<dyn FnMut(&str) -> diesel::QueryResult<usize>>;
        let mut conns: Vec<(&str, Execute)> = Vec::new();
        let mut pooled = store.connection().unwrap();
        conns.push((
            "store connection",
            Box::new(move |sql| diesel::sql_query(sql).execute(&mut *pooled)),
        ));
        if db.backend() == es_diesel::Backend::Sqlite {
            let mut plain = diesel::SqliteConnection::establish(db.url()).unwrap();
            #[derive(QueryableByName)]
            struct Pragma {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                recursive_triggers: i32,
            }
            let pragma = diesel::sql_query("PRAGMA recursive_triggers")
                .get_result::<Pragma>(&mut plain)
                .unwrap();
            assert_eq!(pragma.recursive_triggers, 0);
            conns.push((
                "plain connection",
                Box::new(move |sql| diesel::sql_query(sql).execute(&mut plain)),
            ));
        }
        for (which, execute) in &mut conns {
            for sql in &statements {
                let err = execute(sql).expect_err(&format!(
                    "{}, {which}: a logged event was rewritten by: {sql}",
                    db.backend()
                ));
                // MySQL names no constraint when it refuses a DROP.
                let refused_drop = sql.starts_with("DROP")
                    && err.to_string().contains("a foreign key constraint fails");
                assert!(
                    err.to_string().contains("append-only") || refused_drop,
                    "{}, {which}: {sql}: {err}",
                    db.backend()
                );
            }
        }
        drop(conns);
        let after = store.read_all(0, 10).unwrap();
        let key = |e: &es_diesel::RecordedEvent| {
            (
                e.global_position,
                e.event_id,
                e.stream_id.clone(),
                e.stream_version,
                e.payload().to_string(),
            )
        };
        assert_eq!(
            after.iter().map(key).collect::<Vec<_>>(),
            before.iter().map(key).collect::<Vec<_>>(),
            "{}",
            db.backend()
        );
    }
}

#[test]
fn duplicate_event_ids_are_refused_and_write_nothing() {
    for db in TestDatabase::all() {
        let store = db.store();
        let first = NewEvent::new(&registered(1)).unwrap();
        let mut w = StreamWrite::new("a", ExpectedVersion::Any);
        w.push_new(first.clone());
        store.append_streams(&[w]).unwrap();
        let mut w = StreamWrite::new("b", ExpectedVersion::Any);
        w.push(&registered(2)).unwrap();
        w.push_new(first.clone());
        let err = store.append_streams(&[w]).unwrap_err();
        assert!(
            matches!(err, Error::DuplicateEventId { event_id } if event_id == first.event_id),
            "{err:?}"
        );
        assert_eq!(
            store.head().unwrap(),
            store.read_all(0, 9).unwrap()[0].global_position
        );
        assert_eq!(store.stream_version("b").unwrap(), 0);
    }
}

/// The expectation is checked before the event ids on every backend, for
/// one event (a command's append) and for several: an append resent after
/// it committed is a conflict naming the stream's version, an expectation
/// below 0 or ahead of the stream is a conflict that writes nothing, and
/// reused ids under an expectation that holds are a duplicate.
#[test]
fn a_resent_append_is_a_conflict_and_reused_ids_under_a_held_expectation_a_duplicate() {
    for db in TestDatabase::all() {
        let store = db.store();
        let backend = db.backend();
        for (stream, n) in [("one", 1_i64), ("two", 2)] {
            let events: Vec<NewEvent> = (0..n)
                .map(|i| NewEvent::new(&registered(i)).unwrap())
                .collect();
            let write = |expected| {
                let mut w = StreamWrite::new(stream, expected);
                for e in &events {
                    w.push_new(e.clone());
                }
                w
            };
            store
                .append_streams(&[write(ExpectedVersion::NoStream)])
                .unwrap();
            let head = store.head().unwrap();
            for expected in [
                ExpectedVersion::NoStream,
                ExpectedVersion::Exact(0),
                ExpectedVersion::Exact(n - 1),
                ExpectedVersion::Exact(n + 1),
                ExpectedVersion::Exact(-1),
                ExpectedVersion::Exact(i64::MIN),
                ExpectedVersion::Exact(i64::MAX),
            ] {
                match store.append_streams(&[write(expected)]) {
                    Err(Error::Conflict { actual, .. }) => {
                        assert_eq!(actual, n, "{backend}, {stream}, {expected}")
                    }
                    other => panic!("{backend}, {stream}, {expected}: {other:?}"),
                }
            }
            match store.append_streams(&[write(ExpectedVersion::Exact(n))]) {
                Err(Error::DuplicateEventId { event_id }) => assert!(
                    events.iter().any(|e| e.event_id == event_id),
                    "{backend}, {stream}: {event_id}"
                ),
                other => panic!("{backend}, {stream}, at its version: {other:?}"),
            }
            assert_eq!(store.head().unwrap(), head, "{backend}, {stream}");
            assert_eq!(store.stream_version(stream).unwrap(), n, "{backend}");
        }
        // Below 0 on a stream that does not exist: nothing is written.
        for expected in [ExpectedVersion::Exact(-1), ExpectedVersion::Exact(i64::MIN)] {
            match store.append("new", expected, [registered(9)]) {
                Err(Error::Conflict { actual: 0, .. }) => {}
                other => panic!("{backend}, {expected} on a new stream: {other:?}"),
            }
        }
        assert_eq!(store.stream_version("new").unwrap(), 0, "{backend}");
    }
}

#[test]
fn typed_views_query_events_like_tables() {
    for db in TestDatabase::all() {
        let store = db.store();
        for book in 1..=5 {
            store
                .append(
                    &format!("book-{book}"),
                    ExpectedVersion::NoStream,
                    [registered(book)],
                )
                .unwrap();
            let user = if book % 2 == 0 { 7 } else { 8 };
            store
                .append(
                    &format!("book-{book}"),
                    ExpectedVersion::Exact(1),
                    [BookBorrowed {
                        book_id: book,
                        user_id: user,
                    }],
                )
                .unwrap();
        }
        let mut conn = store.connection().unwrap();
        let by_seven: Vec<(i64, String, i64)> = book_borrowed::table
            .filter(book_borrowed::user_id.eq(7))
            .order(book_borrowed::global_position)
            .select((
                book_borrowed::book_id,
                book_borrowed::stream_id,
                book_borrowed::stream_version,
            ))
            .load(&mut *conn)
            .unwrap();
        assert_eq!(
            by_seven,
            [(2, "book-2".to_owned(), 2), (4, "book-4".to_owned(), 2)],
            "{}",
            db.backend()
        );
        let titles: Vec<String> = book_registered::table
            .filter(book_registered::author.eq("Author 3"))
            .select(book_registered::title)
            .load(&mut *conn)
            .unwrap();
        assert_eq!(titles, ["Book 3"]);
        let when: Vec<chrono::NaiveDateTime> = book_borrowed::table
            .select(book_borrowed::created_at)
            .load(&mut *conn)
            .unwrap();
        assert_eq!(when.len(), 5);
        // migrate is idempotent and keeps the views.
        drop(conn);
        store.migrate().unwrap();
        store.migrate().unwrap();
        let n: i64 = book_borrowed::table
            .count()
            .get_result(&mut *store.connection().unwrap())
            .unwrap();
        assert_eq!(n, 5);
    }
}

#[test]
fn in_memory_sqlite_keeps_its_data_for_the_store_lifetime() {
    let store = EventStore::open(":memory:").unwrap();
    store.migrate().unwrap();
    store
        .append("m", ExpectedVersion::NoStream, [registered(1)])
        .unwrap();
    let clone = store.clone();
    assert_eq!(clone.load_stream::<BookRegistered>("m").unwrap().len(), 1);
}

#[test]
fn opening_a_bad_url_says_what_to_write() {
    let err = EventStore::open("mongodb://localhost/x").unwrap_err();
    assert!(err.to_string().contains("postgres://"), "{err}");
    let err = EventStore::open("postgres://nobody@127.0.0.1:1/nothing").unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct BookReviewed {
    book_id: i64,
    #[serde(rename = "stars")]
    rating: f64,
    recommended: bool,
    reviewer: Option<String>,
    #[event(json)]
    tags: Vec<String>,
    pages_read: Option<i32>,
}

#[test]
fn typed_views_cover_every_column_kind() {
    for db in TestDatabase::all() {
        let store = db.store();
        let reviews = [
            BookReviewed {
                book_id: 1,
                rating: 4.5,
                recommended: true,
                reviewer: Some("O'Brien".into()),
                tags: vec!["sf".into(), "classic".into()],
                pages_read: None,
            },
            BookReviewed {
                book_id: 2,
                rating: 2.0,
                recommended: false,
                reviewer: None,
                tags: vec![],
                pages_read: Some(120),
            },
        ];
        store
            .append("reviews", ExpectedVersion::NoStream, reviews)
            .unwrap();
        let mut conn = store.connection().unwrap();
        type Row = (i64, f64, bool, Option<String>, String, Option<i32>);
        let rows: Vec<Row> = book_reviewed::table
            .order(book_reviewed::global_position)
            .select((
                book_reviewed::book_id,
                book_reviewed::rating,
                book_reviewed::recommended,
                book_reviewed::reviewer,
                book_reviewed::tags,
                book_reviewed::pages_read,
            ))
            .load(&mut *conn)
            .unwrap();
        assert_eq!(rows.len(), 2, "{}", db.backend());
        assert_eq!((rows[0].0, rows[0].1, rows[0].2), (1, 4.5, true));
        assert_eq!(rows[0].3.as_deref(), Some("O'Brien"));
        let tags: Vec<String> = serde_json::from_str(&rows[0].4).unwrap();
        assert_eq!(tags, ["sf", "classic"]);
        assert_eq!(rows[0].5, None);
        assert_eq!(
            (rows[1].1, rows[1].2, rows[1].3.clone(), rows[1].5),
            (2.0, false, None, Some(120))
        );
        let good: i64 = book_reviewed::table
            .filter(book_reviewed::rating.gt(3.0))
            .count()
            .get_result(&mut *conn)
            .unwrap();
        assert_eq!(good, 1);
    }
}

#[test]
fn multi_stream_any_appends_in_opposite_orders_do_not_deadlock() {
    for db in TestDatabase::all() {
        let store = db.store();
        let handles: Vec<_> = (0..4u32)
            .map(|writer| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for n in 0..30 {
                        let mut names = ["x", "y", "z"];
                        if writer % 2 == 1 {
                            names.reverse();
                        }
                        let writes: Vec<StreamWrite> = names
                            .iter()
                            .map(|s| {
                                let mut w = StreamWrite::new(*s, ExpectedVersion::Any);
                                w.push(&Counted { writer, n }).unwrap();
                                w
                            })
                            .collect();
                        store.append_streams(&writes).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for s in ["x", "y", "z"] {
            assert_eq!(store.stream_version(s).unwrap(), 120, "{}", db.backend());
        }
    }
}

/// On SQLite an append with an expected version is one INSERT that relies
/// on migration 11's rule (a stream's versions follow each other). A
/// process that opens a log migrated by an older version, and appends
/// before migrating, must still not write a version above its stream's.
#[test]
fn an_unmigrated_sqlite_log_still_refuses_versions_that_skip() {
    let db = TestDatabase::sqlite();
    db.store().migrate().unwrap();
    // Back to schema 10: migration 7's triggers instead of migration 11's.
    let mut plain = diesel::SqliteConnection::establish(db.url()).unwrap();
    plain
        .batch_execute(
            "DROP TRIGGER es_events_append_only;
             DELETE FROM es_schema_migrations WHERE version = 11;
             CREATE TRIGGER es_events_no_overwrite_version BEFORE INSERT ON es_events
             WHEN EXISTS (SELECT 1 FROM es_events WHERE stream_id = NEW.stream_id AND stream_version = NEW.stream_version)
             BEGIN SELECT RAISE(ABORT, 'es_events is append-only: this stream_id and stream_version already exist'); END;",
        )
        .unwrap();
    let store = EventStore::open(db.url()).unwrap();
    assert!(matches!(
        store.check_migrated(),
        Err(Error::NotMigrated { .. })
    ));
    store
        .append("one", ExpectedVersion::NoStream, [registered(1)])
        .unwrap();
    for (stream, expected, actual) in [
        ("empty", ExpectedVersion::Exact(5), 0),
        ("one", ExpectedVersion::Exact(3), 1),
    ] {
        match store.append(stream, expected, [registered(2)]) {
            Err(Error::Conflict { actual: a, .. }) if a == actual => {}
            other => panic!("{stream} {expected}: {other:?}"),
        }
    }
    assert_eq!(store.stream_version("empty").unwrap(), 0);
    assert_eq!(store.stream_version("one").unwrap(), 1);
    store.migrate().unwrap();
    store.check_migrated().unwrap();
    let err = store
        .append("one", ExpectedVersion::Exact(4), [registered(3)])
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual: 1, .. }), "{err:?}");
    assert_eq!(store.read_all(0, 10).unwrap().len(), 1);
}
