//! The SQLite writer queue seen from outside: Diesel's instrumentation still
//! sees every query, a connection whose instrumentation the application
//! replaced still writes, and many writers at once lose nothing.

use diesel::connection::{set_default_instrumentation, Instrumentation, InstrumentationEvent};
use diesel::Connection;
use es_diesel::{
    append_in, write_transaction, DbConnection, Event, EventStore, ExpectedVersion, StoreOptions,
    StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Counted {
    writer: usize,
    n: usize,
}

/// Queries seen by the default instrumentation that carry the marker.
static MARKED: AtomicUsize = AtomicUsize::new(0);
const MARKER: &str = "es_writer_queue_marker_7f3a";

fn counting() -> Option<Box<dyn Instrumentation>> {
    Some(Box::new(|event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            if query.to_string().contains(MARKER) {
                MARKED.fetch_add(1, Ordering::SeqCst);
            }
        }
    }))
}

fn open(dir: &tempfile::TempDir, name: &str) -> EventStore {
    let path = dir.path().join(name);
    let store = EventStore::open_with(
        path.to_str().unwrap(),
        StoreOptions {
            pool_size: 10,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.migrate().unwrap();
    store
}

/// The instrumentation an application installs for every Diesel connection
/// (`set_default_instrumentation`, e.g. to log queries) keeps seeing the
/// queries of the store's connections: the queue's instrumentation passes
/// them on.
#[test]
fn diesels_default_instrumentation_still_sees_the_stores_queries() {
    set_default_instrumentation(counting).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "instrumented.db");
    let mut conn = store.connection().unwrap();
    let DbConnection::Sqlite(c) = &mut *conn else {
        panic!("a SQLite store")
    };
    diesel::RunQueryDsl::execute(diesel::sql_query(format!("SELECT '{MARKER}'")), c).unwrap();
    set_default_instrumentation(|| None).unwrap();
    assert_eq!(
        MARKED.load(Ordering::SeqCst),
        1,
        "the query did not reach the default instrumentation"
    );
}

/// A pooled connection on which the application set an instrumentation of
/// its own has no queue; it writes as before, waiting in SQLite's busy
/// handler.
#[test]
fn a_connection_with_the_applications_instrumentation_still_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "replaced.db");
    let mut conn = store.connection().unwrap();
    let DbConnection::Sqlite(c) = &mut *conn else {
        panic!("a SQLite store")
    };
    c.set_instrumentation(|_: InstrumentationEvent<'_>| {});
    let mut write = StreamWrite::new("mine", ExpectedVersion::NoStream);
    write.push(&Counted { writer: 0, n: 0 }).unwrap();
    write_transaction(&mut conn, |c| append_in(c, &[write])).unwrap();
    // Other connections still queue, and write after it.
    store
        .append(
            "other",
            ExpectedVersion::NoStream,
            [Counted { writer: 1, n: 0 }],
        )
        .unwrap();
    assert_eq!(store.read_stream("mine", 1, 10).unwrap().len(), 1);
}

/// Twelve threads append to four shared streams at once, each expecting the
/// version it read and reading again after a conflict: every event is
/// there once, each stream's versions run 1, 2, 3 … in the order of their
/// positions, and no write failed for want of the lock.
#[test]
fn twelve_writers_on_four_streams_lose_nothing() {
    const WRITERS: usize = 12;
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "contended.db");
    std::thread::scope(|s| {
        for writer in 0..WRITERS {
            let store = &store;
            s.spawn(move || {
                for n in 0..EACH {
                    let stream = format!("shared-{}", (writer + n) % 4);
                    loop {
                        let version = store
                            .read_stream(&stream, 1, 100_000)
                            .unwrap()
                            .last()
                            .map_or(0, |e| e.stream_version);
                        let expected = if version == 0 {
                            ExpectedVersion::NoStream
                        } else {
                            ExpectedVersion::Exact(version)
                        };
                        match store.append(&stream, expected, [Counted { writer, n }]) {
                            Ok(_) => break,
                            Err(es_diesel::Error::Conflict { .. }) => continue,
                            Err(e) => panic!("writer {writer}, command {n}: {e}"),
                        }
                    }
                }
            });
        }
    });
    let mut seen = HashSet::new();
    let mut streams: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for i in 0..4 {
        let stream = format!("shared-{i}");
        for e in store.load_stream::<Counted>(&stream).unwrap() {
            assert!(
                seen.insert((e.event.writer, e.event.n)),
                "{:?} twice",
                e.event
            );
            streams
                .entry(stream.clone())
                .or_default()
                .push((e.global_position, e.stream_version));
        }
    }
    assert_eq!(seen.len(), WRITERS * EACH);
    for (stream, mut events) in streams {
        events.sort_unstable();
        let versions: Vec<i64> = events.iter().map(|&(_, v)| v).collect();
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, expected, "{stream}");
    }
}
