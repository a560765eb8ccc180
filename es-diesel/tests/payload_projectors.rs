//! Projectors that take the event alone (`e: &Shelved`), not
//! `&Recorded<Shelved>`: inline, after a rebuild (which then reads no
//! envelope columns) and in a blue/green rebuild they give the same rows as
//! projectors that take the envelope; a read model with one projector that
//! reads the envelope is rebuilt with it; a failure in a rebuild still names
//! the event's position and stream.

use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{projector, DbConnection, Error, Event, ExpectedVersion, ReadModel, Recorded};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(view = false)]
struct Shelved {
    shelf: i64,
    title: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(view = false)]
struct Unshelved {
    shelf: i64,
}

/// Fed by projectors that take the event alone, row- and SQL-level.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "payload_shelves", primary_key = shelf)]
struct Shelf {
    shelf: i64,
    titles: String,
    removed: i64,
}

/// The same, asynchronous.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "payload_shelves_async", primary_key = shelf, mode = async)]
struct ShelfAsync {
    shelf: i64,
    titles: String,
    removed: i64,
}

/// One projector takes the event alone, the other reads the envelope.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "payload_stamped", primary_key = shelf)]
struct Stamped {
    shelf: i64,
    last_stream: String,
    last_version: i64,
    shelved: i64,
}

/// When set, `shelve` fails on the title "poison".
static POISON: AtomicBool = AtomicBool::new(false);

fn add(row: &mut Option<Shelf>, shelf: i64, title: &str) -> Result<(), String> {
    if POISON.load(Ordering::SeqCst) && title == "poison" {
        return Err(format!("refusing {title:?}"));
    }
    let r = row.get_or_insert_with(|| Shelf {
        shelf,
        titles: String::new(),
        removed: 0,
    });
    if !r.titles.is_empty() {
        r.titles.push(',');
    }
    r.titles.push_str(title);
    Ok(())
}

#[projector(on = Shelved, key = shelf)]
fn shelve(e: &Shelved, row: &mut Option<Shelf>) -> Result<(), String> {
    add(row, e.shelf, &e.title)
}

#[projector(on = Unshelved, read_model = Shelf)]
fn unshelve(e: &Unshelved, conn: &mut DbConnection) -> QueryResult<()> {
    diesel::update(payload_shelves::table.find(e.shelf))
        .set(payload_shelves::removed.eq(payload_shelves::removed + 1))
        .execute(conn)
        .map(drop)
}

#[projector(on = Shelved, key = shelf)]
fn shelve_async(e: &Shelved, row: &mut Option<ShelfAsync>) {
    let mut r = row.take().map(|r| Shelf {
        shelf: r.shelf,
        titles: r.titles,
        removed: r.removed,
    });
    add(&mut r, e.shelf, &e.title).unwrap();
    *row = r.map(|r| ShelfAsync {
        shelf: r.shelf,
        titles: r.titles,
        removed: r.removed,
    });
}

#[projector(on = Unshelved, key = shelf)]
fn unshelve_async(_e: &Unshelved, row: &mut Option<ShelfAsync>) {
    if let Some(r) = row {
        r.removed += 1;
    }
}

#[projector(on = Shelved, key = shelf)]
fn stamp(e: &Recorded<Shelved>, row: &mut Option<Stamped>) {
    let shelved = row.as_ref().map_or(0, |r| r.shelved) + 1;
    *row = Some(Stamped {
        shelf: e.shelf,
        last_stream: e.stream_id.clone(),
        last_version: e.stream_version,
        shelved,
    });
}

#[projector(on = Unshelved, key = shelf)]
fn stamp_unshelved(_e: &Unshelved, row: &mut Option<Stamped>) {
    if let Some(r) = row {
        r.shelved -= 1;
    }
}

fn shelves(conn: &mut DbConnection) -> Vec<Shelf> {
    payload_shelves::table
        .order(payload_shelves::shelf)
        .load(conn)
        .unwrap()
}

fn seed(store: &es_diesel::EventStore) {
    for (shelf, title) in [(1, "Dune"), (2, "Emma"), (1, "Ulysses"), (2, "Beloved")] {
        store
            .append(
                &format!("shelf-{shelf}"),
                ExpectedVersion::Any,
                [Shelved {
                    shelf,
                    title: title.to_owned(),
                }],
            )
            .unwrap();
    }
    store
        .append("shelf-2", ExpectedVersion::Any, [Unshelved { shelf: 2 }])
        .unwrap();
}

#[test]
fn projectors_of_the_event_alone_rebuild_to_the_inline_rows() {
    for db in TestDatabase::all() {
        let store = db.store();
        seed(&store);
        let inline = shelves(&mut store.connection().unwrap());
        assert_eq!(
            inline,
            vec![
                Shelf {
                    shelf: 1,
                    titles: "Dune,Ulysses".into(),
                    removed: 0
                },
                Shelf {
                    shelf: 2,
                    titles: "Emma,Beloved".into(),
                    removed: 1
                },
            ],
            "{}: inline",
            db.backend()
        );
        for batch_size in [1, 2, 100] {
            let options = es_diesel::RebuildOptions {
                batch_size,
                ..Default::default()
            };
            let report = store
                .rebuild_with("payload_shelves", &options, |_| {})
                .unwrap_or_else(|e| panic!("{}: rebuild: {e}", db.backend()));
            assert_eq!(report.events, 5, "{}", db.backend());
            assert_eq!(
                shelves(&mut store.connection().unwrap()),
                inline,
                "{}: rebuilt by {batch_size}",
                db.backend()
            );
            store
                .rebuild_with("payload_shelves_async", &options, |_| {})
                .unwrap_or_else(|e| panic!("{}: blue/green rebuild: {e}", db.backend()));
            let rows: Vec<ShelfAsync> = payload_shelves_async::table
                .order(payload_shelves_async::shelf)
                .load(&mut *store.connection().unwrap())
                .unwrap();
            let rows: Vec<(i64, String, i64)> = rows
                .into_iter()
                .map(|r| (r.shelf, r.titles, r.removed))
                .collect();
            let want: Vec<(i64, String, i64)> = inline
                .iter()
                .map(|r| (r.shelf, r.titles.clone(), r.removed))
                .collect();
            assert_eq!(rows, want, "{}: blue/green by {batch_size}", db.backend());
        }
    }
}

#[test]
fn a_read_model_with_one_projector_of_the_envelope_is_rebuilt_with_it() {
    for db in TestDatabase::all() {
        let store = db.store();
        seed(&store);
        let read = |store: &es_diesel::EventStore| -> Vec<Stamped> {
            payload_stamped::table
                .order(payload_stamped::shelf)
                .load(&mut *store.connection().unwrap())
                .unwrap()
        };
        let inline = read(&store);
        assert_eq!(inline[1].last_stream, "shelf-2", "{}", db.backend());
        assert_eq!(inline[1].last_version, 2, "{}", db.backend());
        assert_eq!(inline[1].shelved, 1, "{}", db.backend());
        for batch_size in [1, 100] {
            store
                .rebuild_with(
                    "payload_stamped",
                    &es_diesel::RebuildOptions {
                        batch_size,
                        ..Default::default()
                    },
                    |_| {},
                )
                .unwrap_or_else(|e| panic!("{}: rebuild: {e}", db.backend()));
            assert_eq!(read(&store), inline, "{}: by {batch_size}", db.backend());
        }
    }
}

#[test]
fn a_failure_in_a_rebuild_of_the_event_alone_names_its_stream_and_changes_nothing() {
    for db in TestDatabase::all() {
        let store = db.store();
        seed(&store);
        store
            .append(
                "shelf-7",
                ExpectedVersion::NoStream,
                [Shelved {
                    shelf: 7,
                    title: "poison".into(),
                }],
            )
            .unwrap();
        let position = store.head().unwrap();
        let before = shelves(&mut store.connection().unwrap());
        POISON.store(true, Ordering::SeqCst);
        let result = store.rebuild_with(
            "payload_shelves",
            &es_diesel::RebuildOptions {
                batch_size: 2,
                ..Default::default()
            },
            |_| {},
        );
        POISON.store(false, Ordering::SeqCst);
        match result {
            Err(Error::Projector {
                projector,
                position: at,
                stream,
                event_type,
                source,
            }) => {
                assert!(projector.ends_with("shelve"), "{projector}");
                assert_eq!(at, position, "{}", db.backend());
                assert_eq!(stream, "shelf-7", "{}", db.backend());
                assert_eq!(event_type, "Shelved");
                assert!(source.to_string().contains("poison"), "{source}");
            }
            other => panic!(
                "{}: expected the projector's failure, got {other:?}",
                db.backend()
            ),
        }
        assert_eq!(
            shelves(&mut store.connection().unwrap()),
            before,
            "{}: the live table is untouched",
            db.backend()
        );
        store
            .rebuild("payload_shelves")
            .unwrap_or_else(|e| panic!("{}: rebuild after the fix: {e}", db.backend()));
        assert_eq!(
            shelves(&mut store.connection().unwrap()),
            before,
            "{}",
            db.backend()
        );
    }
}

/// PostgreSQL: a rebuild of a log without statistics samples the columns
/// its pages are planned by, with a small statistics target set for that
/// sample only: every pooled connection keeps the default afterwards.
#[test]
fn a_rebuild_samples_a_fresh_log_without_changing_the_session() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store_with(es_diesel::StoreOptions {
        pool_size: 1,
        ..Default::default()
    });
    seed(&store);
    let before: i64 = {
        let mut conn = store.connection().unwrap();
        diesel::sql_query("SELECT COUNT(*)::bigint AS n FROM pg_stats WHERE schemaname = current_schema() AND tablename = 'es_events' AND attname IN ('event_type', 'order_key')")
            .get_result::<Count>(&mut *conn)
            .unwrap()
            .n
    };
    assert_eq!(before, 0, "a fresh log has no statistics");
    store.rebuild("payload_shelves").unwrap();
    let mut conn = store.connection().unwrap();
    let after = diesel::sql_query("SELECT COUNT(*)::bigint AS n FROM pg_stats WHERE schemaname = current_schema() AND tablename = 'es_events' AND attname IN ('event_type', 'order_key')")
        .get_result::<Count>(&mut *conn)
        .unwrap()
        .n;
    assert_eq!(after, 2, "the rebuild sampled event_type and order_key");
    let target = diesel::sql_query("SELECT current_setting('default_statistics_target') AS s")
        .get_result::<Setting>(&mut *conn)
        .unwrap()
        .s;
    let default = diesel::sql_query(
        "SELECT boot_val AS s FROM pg_settings WHERE name = 'default_statistics_target'",
    )
    .get_result::<Setting>(&mut *conn)
    .unwrap()
    .s;
    assert_eq!(target, default, "the sample's target ended with it");
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    s: String,
}

/// Events appended while a rebuild of the event alone runs (between its
/// batches, from its progress callback) are in the swapped-in table, and
/// the table agrees with a rebuild that nothing interrupted.
#[test]
fn events_appended_during_a_rebuild_of_the_event_alone_are_in_the_new_table() {
    for db in TestDatabase::all() {
        let store = db.store();
        seed(&store);
        let mut appended = false;
        let report = store
            .rebuild_with(
                "payload_shelves",
                &es_diesel::RebuildOptions {
                    batch_size: 1,
                    ..Default::default()
                },
                |_| {
                    if !appended {
                        appended = true;
                        store
                            .append(
                                "shelf-3",
                                ExpectedVersion::NoStream,
                                [Shelved {
                                    shelf: 3,
                                    title: "Lolita".into(),
                                }],
                            )
                            .unwrap();
                        store
                            .append("shelf-1", ExpectedVersion::Any, [Unshelved { shelf: 1 }])
                            .unwrap();
                    }
                },
            )
            .unwrap_or_else(|e| panic!("{}: rebuild: {e}", db.backend()));
        assert!(appended, "{}", db.backend());
        assert_eq!(report.events, 7, "{}", db.backend());
        let during = shelves(&mut store.connection().unwrap());
        assert_eq!(
            during,
            vec![
                Shelf {
                    shelf: 1,
                    titles: "Dune,Ulysses".into(),
                    removed: 1
                },
                Shelf {
                    shelf: 2,
                    titles: "Emma,Beloved".into(),
                    removed: 1
                },
                Shelf {
                    shelf: 3,
                    titles: "Lolita".into(),
                    removed: 0
                },
            ],
            "{}",
            db.backend()
        );
        store.rebuild("payload_shelves").unwrap();
        assert_eq!(
            shelves(&mut store.connection().unwrap()),
            during,
            "{}: a quiet rebuild agrees",
            db.backend()
        );
    }
}
