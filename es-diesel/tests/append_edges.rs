//! Appends at their edges: empty writes, races lost inside the caller's
//! transaction, and the statement cache under every chunk size.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, write_transaction, Error, Event, ExpectedVersion, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::mpsc;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Noted {
    n: u64,
}

fn write(stream: &str, expected: ExpectedVersion, n: u64) -> StreamWrite {
    let mut w = StreamWrite::new(stream, expected);
    w.push(&Noted { n }).unwrap();
    w
}

#[test]
fn an_empty_write_still_checks_its_expectation() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        match store.append::<Noted>("s", ExpectedVersion::Exact(99), []) {
            Err(Error::Conflict { actual: 0, .. }) => {}
            other => panic!("{b}: {other:?}"),
        }
        assert!(store
            .append::<Noted>("s", ExpectedVersion::NoStream, [])
            .is_ok());
        store
            .append("s", ExpectedVersion::NoStream, [Noted { n: 1 }])
            .unwrap();
        assert!(store
            .append::<Noted>("s", ExpectedVersion::Exact(1), [])
            .is_ok());
        assert!(store.append::<Noted>("s", ExpectedVersion::Any, []).is_ok());
        // An empty write whose expectation fails refuses the whole batch.
        let err = store
            .append_streams(&[
                write("t", ExpectedVersion::NoStream, 2),
                StreamWrite::new("s", ExpectedVersion::NoStream),
            ])
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { stream, actual: 1, .. } if stream == "s"),
            "{b}: {err:?}"
        );
        assert_eq!(
            store.stream_version("t").unwrap(),
            0,
            "{b}: nothing written"
        );
        match store.append_streams(&[StreamWrite::new("u", ExpectedVersion::StreamExists)]) {
            Err(Error::Conflict { actual: 0, .. }) => {}
            other => panic!("{b}: {other:?}"),
        }
    }
}

/// A writer inside its own transaction loses a race on the unique index
/// (PostgreSQL): the conflict names the version the stream is really at,
/// and the caller's transaction can go on.
#[test]
fn a_race_lost_inside_the_callers_transaction_reports_the_real_version() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let (inserted_tx, inserted_rx) = mpsc::channel::<()>();
    let (commit_tx, commit_rx) = mpsc::channel::<()>();
    let first = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                append_in(c, &[write("s", ExpectedVersion::NoStream, 1)])?;
                append_in(c, &[write("s", ExpectedVersion::Exact(1), 2)])?;
                inserted_tx.send(()).unwrap();
                commit_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        })
    };
    inserted_rx.recv().unwrap();
    let second = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<_, Error> {
                let lost = append_in(c, &[write("s", ExpectedVersion::NoStream, 3)]);
                // Still usable after the lost race.
                let other = append_in(c, &[write("other", ExpectedVersion::NoStream, 4)])?;
                Ok((lost.map(|r| r.len()), other.len()))
            })
            .unwrap()
        })
    };
    // The second waits on the first's uncommitted row; let it wait a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    commit_tx.send(()).unwrap();
    first.join().unwrap();
    let (lost, other) = second.join().unwrap();
    match lost {
        Err(Error::Conflict {
            actual, expected, ..
        }) => {
            assert_eq!(actual, 2);
            assert_eq!(expected, ExpectedVersion::NoStream);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(other, 1);
    assert_eq!(store.stream_version("other").unwrap(), 1);
}

/// Two writers that only expect the stream to exist both get their events
/// in: losing the race for a version is not a conflict for them.
#[test]
fn a_race_lost_with_stream_exists_is_retried() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    store
        .append("s", ExpectedVersion::NoStream, [Noted { n: 0 }])
        .unwrap();
    for via_append_in in [false, true] {
        let (inserted_tx, inserted_rx) = mpsc::channel::<()>();
        let (commit_tx, commit_rx) = mpsc::channel::<()>();
        let first = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                write_transaction(&mut conn, |c| -> Result<(), Error> {
                    append_in(c, &[write("s", ExpectedVersion::StreamExists, 1)])?;
                    inserted_tx.send(()).unwrap();
                    commit_rx.recv().unwrap();
                    Ok(())
                })
                .unwrap();
            })
        };
        inserted_rx.recv().unwrap();
        let second = {
            let store = store.clone();
            std::thread::spawn(move || {
                if via_append_in {
                    let mut conn = store.connection().unwrap();
                    write_transaction(&mut conn, |c| {
                        append_in(c, &[write("s", ExpectedVersion::StreamExists, 2)])
                    })
                } else {
                    store.append_streams(&[write("s", ExpectedVersion::StreamExists, 2)])
                }
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before = store.stream_version("s").unwrap();
        commit_tx.send(()).unwrap();
        first.join().unwrap();
        let rec = second.join().unwrap().expect("StreamExists is retried");
        assert_eq!(
            rec[0].stream_version,
            before + 2,
            "append_in: {via_append_in}"
        );
    }
}

/// Appends of every size and expectation keep a bounded number of prepared
/// statements per connection.
#[test]
fn the_statement_cache_stays_bounded() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store_with(StoreOptions {
        pool_size: 1,
        ..StoreOptions::default()
    });
    let mut n = 0u64;
    for size in (1..=40).chain((41..=1200).step_by(37)) {
        for (k, expected) in [
            ExpectedVersion::Any,
            ExpectedVersion::NoStream,
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(0),
        ]
        .into_iter()
        .enumerate()
        {
            let stream = format!("s-{size}-{k}");
            let expected = match expected {
                ExpectedVersion::StreamExists | ExpectedVersion::Exact(_) => {
                    store
                        .append(&stream, ExpectedVersion::NoStream, [Noted { n }])
                        .unwrap();
                    if expected == ExpectedVersion::StreamExists {
                        expected
                    } else {
                        ExpectedVersion::Exact(1)
                    }
                }
                other => other,
            };
            let events: Vec<Noted> = (0..size).map(|i| Noted { n: n + i }).collect();
            n += size;
            store.append(&stream, expected, events).unwrap();
        }
    }
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = store.connection().unwrap();
    let prepared = diesel::sql_query("SELECT COUNT(*) AS n FROM pg_prepared_statements")
        .get_result::<Count>(&mut *conn)
        .unwrap()
        .n;
    assert!(prepared <= 100, "{prepared} prepared statements");
    conn.batch_execute("SELECT 1").unwrap();
}

/// The same import started twice at once imports every row once.
#[test]
fn the_same_import_twice_at_once_imports_each_row_once() {
    for db in TestDatabase::all() {
        let store = db.store();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let rows = (0..3_000u64).map(|i| es_diesel::ImportRow {
                        stream_id: format!("legacy-{}", i % 40),
                        key: i.to_string(),
                        event: Noted { n: i },
                    });
                    let mut options = es_diesel::ImportOptions::new("books");
                    options.batch_size = 250;
                    barrier.wait();
                    store.import(rows, &options, |_| {}).unwrap()
                })
            })
            .collect();
        let reports: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let b = db.backend();
        assert_eq!(
            reports.iter().map(|r| r.imported).sum::<u64>(),
            3_000,
            "{b}: {reports:?}"
        );
        assert_eq!(reports.iter().map(|r| r.skipped).sum::<u64>(), 3_000, "{b}");
        assert!(store.head().unwrap() >= 3_000);
        for s in 0..40 {
            let events = store.read_stream(&format!("legacy-{s}"), 1, 1_000).unwrap();
            assert_eq!(events.len(), 75, "{b}");
            assert!(events
                .iter()
                .enumerate()
                .all(|(i, e)| e.stream_version == i as i64 + 1));
        }
    }
}

/// What an append returns (positions, versions, times, ids) is what the log
/// holds, for one event and for several, in one stream and in several,
/// with other writers' events before and between them.
#[test]
fn what_an_append_returns_is_what_the_log_holds() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        let mut returned = Vec::new();
        returned.extend(
            store
                .append_streams(&[write("a", ExpectedVersion::NoStream, 1)])
                .unwrap(),
        );
        let mut several = StreamWrite::new("b", ExpectedVersion::NoStream);
        for n in 2..=4 {
            several.push(&Noted { n }).unwrap();
        }
        returned.extend(store.append_streams(&[several]).unwrap());
        // Another connection's append in between.
        store
            .append("c", ExpectedVersion::Any, [Noted { n: 5 }])
            .unwrap();
        let mut two = StreamWrite::new("a", ExpectedVersion::Exact(1));
        two.push(&Noted { n: 6 }).unwrap();
        two.push(&Noted { n: 7 }).unwrap();
        returned.extend(
            store
                .append_streams(&[two, write("b", ExpectedVersion::Exact(3), 8)])
                .unwrap(),
        );
        returned.extend(
            store
                .append_streams(&[write("c", ExpectedVersion::Any, 9)])
                .unwrap(),
        );
        returned.extend(
            store
                .append_streams(&[write("d", ExpectedVersion::StreamExists, 10)])
                .unwrap_or_default(),
        );
        let stored: Vec<_> = store
            .iter_all(0, 100)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let stored: Vec<_> = stored
            .into_iter()
            .filter(|e| e.stream_id != "c" || e.stream_version != 1)
            .collect();
        assert_eq!(returned.len(), 8, "{b}");
        let key = |e: &es_diesel::RecordedEvent| {
            (
                e.global_position,
                e.event_id,
                e.stream_id.clone(),
                e.stream_version,
                e.created_at,
                es_diesel::serde_json::from_str::<es_diesel::serde_json::Value>(e.event.as_str())
                    .unwrap(),
            )
        };
        assert_eq!(
            returned.iter().map(key).collect::<Vec<_>>(),
            stored.iter().map(key).collect::<Vec<_>>(),
            "{b}"
        );
        let versions: Vec<(String, i64)> = returned
            .iter()
            .map(|e| (e.stream_id.clone(), e.stream_version))
            .collect();
        let expected = [
            ("a", 1),
            ("b", 1),
            ("b", 2),
            ("b", 3),
            ("a", 2),
            ("a", 3),
            ("b", 4),
            ("c", 2),
        ];
        assert_eq!(versions, expected.map(|(s, v)| (s.to_owned(), v)), "{b}");
    }
}

/// Writers on their own connections append one event or several at once,
/// concurrently: every event each append returned is the one the log holds
/// at that position, with that version and time (on SQLite the positions
/// come from the connection's last rowid, not from the rows themselves).
#[test]
fn concurrent_appends_return_what_the_log_holds() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        let returned: Vec<es_diesel::RecordedEvent> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..4u64)
                .map(|w| {
                    let store = store.clone();
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        for round in 0..15u64 {
                            let stream = format!("w{w}");
                            let mut write = StreamWrite::new(&stream, ExpectedVersion::Any);
                            // One event, then three, then two, in turn.
                            for k in 0..[1, 3, 2][round as usize % 3] {
                                write
                                    .push(&Noted {
                                        n: w * 1000 + round * 10 + k,
                                    })
                                    .unwrap();
                            }
                            mine.extend(store.append_streams(&[write]).unwrap());
                        }
                        mine
                    })
                })
                .collect();
            writers
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let stored: Vec<_> = store
            .iter_all(0, 1000)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(returned.len(), 4 * 30, "{b}");
        assert_eq!(stored.len(), returned.len(), "{b}");
        let by_position: std::collections::HashMap<i64, &es_diesel::RecordedEvent> =
            stored.iter().map(|e| (e.global_position, e)).collect();
        for r in &returned {
            let s = by_position
                .get(&r.global_position)
                .unwrap_or_else(|| panic!("{b}: no event at position {}", r.global_position));
            assert_eq!(
                (r.event_id, &r.stream_id, r.stream_version, r.created_at),
                (s.event_id, &s.stream_id, s.stream_version, s.created_at),
                "{b}: position {}",
                r.global_position
            );
        }
    }
}
