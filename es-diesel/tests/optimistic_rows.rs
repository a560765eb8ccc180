//! Appends whose inline projectors all take a row: on PostgreSQL they read
//! the rows without locking them and write events and rows in one
//! statement, each row only if no other writer changed it since. These
//! tests change, delete or insert the row in another transaction between
//! that read and that statement, and check that no update is lost and
//! that nothing is written twice; the rest run on every backend (where
//! appends lock their rows in a transaction) and must end the same.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{
    projector, Error, Event, EventStore, ExpectedVersion, ReadModel, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Counted {
    counter: i64,
    by: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct CounterReset {
    counter: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct CountRefused {
    counter: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "opt_counters", primary_key = counter)]
struct Counter {
    counter: i64,
    total: i64,
    events: i64,
}

#[projector(on = Counted, key = counter)]
fn counted(e: &Counted, row: &mut Option<Counter>) {
    let row = row.get_or_insert(Counter {
        counter: e.counter,
        total: 0,
        events: 0,
    });
    row.total += e.by;
    row.events += 1;
}

#[projector(on = CounterReset, key = counter)]
fn reset(_e: &CounterReset, row: &mut Option<Counter>) {
    *row = None;
}

#[projector(on = CountRefused, key = counter)]
fn refused(_e: &CountRefused, _row: &mut Option<Counter>) -> Result<(), String> {
    Err("refused by the test".into())
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct MemberJoined {
    member: i64,
}

/// A read model of key columns only.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "opt_members", primary_key = member)]
struct Member {
    member: i64,
}

#[projector(on = MemberJoined, key = member)]
fn joined(e: &MemberJoined, row: &mut Option<Member>) {
    *row = Some(Member { member: e.member });
}

fn row_of(store: &EventStore, id: i64) -> Option<(i64, i64)> {
    let mut conn = store.connection().unwrap();
    opt_counters::table
        .filter(opt_counters::counter.eq(id))
        .select((opt_counters::total, opt_counters::events))
        .first::<(i64, i64)>(&mut *conn)
        .optional()
        .unwrap()
}

fn count(store: &EventStore, stream: &str, id: i64, by: i64, expected: ExpectedVersion) {
    store
        .append(stream, expected, [Counted { counter: id, by }])
        .unwrap();
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Runs `f` with the store's traces of this thread kept here.
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let kept = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(move || kept.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Appends written with their rows in one statement.
    fn one_statement(&self) -> usize {
        self.text()
            .matches("appended with its rows in one statement")
            .count()
    }

    /// Appends that wrote nothing in one statement and ran in a transaction.
    fn deferred(&self) -> usize {
        self.text().matches("outcome=\"deferred\"").count()
    }
}

/// Another session, holding a transaction open on PostgreSQL.
struct Holder {
    conn: PgConnection,
    pid: i32,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

impl Holder {
    fn begin(db: &TestDatabase, sql: &str) -> Holder {
        let mut conn = PgConnection::establish(db.url()).unwrap();
        let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(&mut conn)
            .unwrap()
            .pid;
        conn.batch_execute("BEGIN").unwrap();
        conn.batch_execute(sql).unwrap();
        Holder { conn, pid }
    }

    /// Waits until another session waits for a lock this one holds.
    fn wait_for_waiter(&self, db: &TestDatabase) {
        let mut observer = PgConnection::establish(db.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind::<diesel::sql_types::Integer, _>(self.pid)
            .get_result::<Count>(&mut observer)
            .unwrap()
            .n;
            if n > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no append waited for the held row"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn commit(mut self) {
        self.conn.batch_execute("COMMIT").unwrap();
    }
}

/// An append's result and what it traced.
type Traced = (Result<Vec<es_diesel::Recorded<Counted>>, Error>, Capture);

/// Appends `Counted { counter: id, by }` to a new stream on a thread of its
/// own, while the test holds the row; returns what it traced.
fn append_while_held(
    store: &EventStore,
    stream: &'static str,
    id: i64,
    by: i64,
) -> std::thread::JoinHandle<Traced> {
    let store = store.clone();
    std::thread::spawn(move || {
        let capture = Capture::default();
        let result = capture.run(|| {
            store.append(
                stream,
                ExpectedVersion::NoStream,
                [Counted { counter: id, by }],
            )
        });
        (result, capture)
    })
}

#[test]
fn an_append_writes_its_rows_with_its_events() {
    for db in TestDatabase::all() {
        let store = db.store();
        let capture = Capture::default();
        capture.run(|| {
            count(&store, "c-1", 1, 5, ExpectedVersion::NoStream);
            count(&store, "c-1", 1, 7, ExpectedVersion::Exact(1));
            count(&store, "c-2", 1, 1, ExpectedVersion::NoStream);
            store
                .append(
                    "c-3",
                    ExpectedVersion::NoStream,
                    [CounterReset { counter: 1 }],
                )
                .unwrap();
        });
        assert_eq!(row_of(&store, 1), None, "{}", db.backend());
        capture.run(|| {
            store
                .append(
                    "c-4",
                    ExpectedVersion::NoStream,
                    [
                        Counted { counter: 2, by: 1 },
                        Counted { counter: 3, by: 1 },
                        Counted { counter: 2, by: 2 },
                    ],
                )
                .unwrap();
        });
        assert_eq!(row_of(&store, 2), Some((3, 2)), "{}", db.backend());
        assert_eq!(row_of(&store, 3), Some((1, 1)), "{}", db.backend());
        let recorded = store.read_stream("c-4", 1, 10).unwrap();
        assert_eq!(recorded.len(), 3);
        assert!(recorded.iter().all(|e| e.global_position > 0));
        if db.backend() == es_diesel::Backend::Postgres {
            assert_eq!(capture.one_statement(), 5, "{}", capture.text());
            assert_eq!(capture.deferred(), 0, "{}", capture.text());
            // Each projector's run has its span, inside the append's.
            let closed = capture
                .text()
                .lines()
                .filter(|l| {
                    l.contains("es.append") && l.contains("es.projector") && l.contains("close")
                })
                .count();
            assert_eq!(closed, 7, "{}", capture.text());
        } else {
            assert_eq!(capture.one_statement(), 0, "{}", capture.text());
        }
    }
}

#[test]
fn the_recorded_events_are_the_logs() {
    for db in TestDatabase::all() {
        let store = db.store();
        let appended = store
            .append(
                "r-1",
                ExpectedVersion::NoStream,
                [Counted { counter: 4, by: 1 }, Counted { counter: 4, by: 2 }],
            )
            .unwrap();
        let read = store.read_stream("r-1", 1, 10).unwrap();
        assert_eq!(appended.len(), 2);
        for (a, r) in appended.iter().zip(&read) {
            assert_eq!(a.global_position, r.global_position, "{}", db.backend());
            assert_eq!(a.stream_version, r.stream_version);
            assert_eq!(a.event_id, r.event_id);
            assert_eq!(a.created_at, r.created_at, "{}", db.backend());
        }
    }
}

#[test]
fn a_stale_expectation_writes_neither_events_nor_rows() {
    for db in TestDatabase::all() {
        let store = db.store();
        count(&store, "s-1", 1, 1, ExpectedVersion::NoStream);
        let err = store
            .append(
                "s-1",
                ExpectedVersion::NoStream,
                [Counted { counter: 1, by: 10 }],
            )
            .unwrap_err();
        assert!(
            matches!(err, Error::Conflict { actual: 1, .. }),
            "{}: {err:?}",
            db.backend()
        );
        // A new row: its insert waits for the events, and writes nothing.
        let capture = Capture::default();
        let err = capture
            .run(|| {
                store.append(
                    "s-1",
                    ExpectedVersion::Exact(0),
                    [Counted { counter: 9, by: 10 }],
                )
            })
            .unwrap_err();
        assert_eq!(capture.deferred(), 0, "{}", capture.text());
        assert!(matches!(err, Error::Conflict { actual: 1, .. }), "{err:?}");
        assert_eq!(row_of(&store, 1), Some((1, 1)), "{}", db.backend());
        assert_eq!(row_of(&store, 9), None, "{}", db.backend());
        assert_eq!(store.stream_version("s-1").unwrap(), 1);
    }
}

#[test]
fn a_failing_projector_writes_nothing_and_names_the_events_position() {
    for db in TestDatabase::all() {
        let store = db.store();
        count(&store, "f-1", 1, 1, ExpectedVersion::NoStream);
        let err = store
            .append_streams(&[{
                let mut w = StreamWrite::new("f-1", ExpectedVersion::Exact(1));
                w.push(&Counted { counter: 1, by: 5 }).unwrap();
                w.push(&CountRefused { counter: 1 }).unwrap();
                w
            }])
            .unwrap_err();
        match err {
            Error::Projector {
                projector,
                position,
                ..
            } => {
                assert!(projector.ends_with("refused"), "{projector}");
                assert!(position > 0, "{}: position {position}", db.backend());
            }
            other => panic!(
                "{}: expected a projector error, got {other:?}",
                db.backend()
            ),
        }
        assert_eq!(row_of(&store, 1), Some((1, 1)), "{}", db.backend());
        assert_eq!(store.stream_version("f-1").unwrap(), 1);
    }
}

#[test]
fn the_option_off_locks_rows_in_a_transaction() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store_with(StoreOptions {
        optimistic_rows: false,
        ..StoreOptions::default()
    });
    let capture = Capture::default();
    capture.run(|| count(&store, "o-1", 1, 1, ExpectedVersion::NoStream));
    assert_eq!(capture.one_statement(), 0, "{}", capture.text());
    assert_eq!(row_of(&store, 1), Some((1, 1)));
}

/// Another transaction updates the row after the append read it and
/// commits while the append's statement waits for it: the append must not
/// write the values it computed from the old row.
#[test]
fn a_row_changed_after_its_read_keeps_that_change() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    count(&store, "h-1", 1, 1, ExpectedVersion::NoStream);
    // The holder's update waits for nothing; the append reads the committed
    // row (total 1) and then waits for the holder's row lock.
    let holder = Holder::begin(
        &db,
        "UPDATE opt_counters SET total = total + 100, events = events + 1 WHERE counter = 1",
    );
    let append = append_while_held(&store, "h-2", 1, 10);
    holder.wait_for_waiter(&db);
    holder.commit();
    let (result, capture) = append.join().unwrap();
    result.unwrap();
    assert_eq!(row_of(&store, 1), Some((111, 3)), "{}", capture.text());
    assert_eq!(capture.deferred(), 1, "{}", capture.text());
    assert_eq!(store.stream_version("h-2").unwrap(), 1);
}

/// Another transaction deletes the row the append read.
#[test]
fn a_row_deleted_after_its_read_stays_deleted_before_the_append() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    count(&store, "d-1", 1, 1, ExpectedVersion::NoStream);
    let holder = Holder::begin(&db, "DELETE FROM opt_counters WHERE counter = 1");
    let append = append_while_held(&store, "d-2", 1, 10);
    holder.wait_for_waiter(&db);
    holder.commit();
    let (result, capture) = append.join().unwrap();
    result.unwrap();
    // The append came after the delete: a new row of its event alone.
    assert_eq!(row_of(&store, 1), Some((10, 1)), "{}", capture.text());
    assert_eq!(capture.deferred(), 1, "{}", capture.text());
}

/// Another transaction inserts the row the append found missing.
#[test]
fn a_row_inserted_after_its_read_found_none_is_not_replaced() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let holder = Holder::begin(
        &db,
        "INSERT INTO opt_counters (counter, total, events) VALUES (5, 100, 1)",
    );
    let append = append_while_held(&store, "i-1", 5, 10);
    holder.wait_for_waiter(&db);
    holder.commit();
    let (result, capture) = append.join().unwrap();
    result.unwrap();
    assert_eq!(row_of(&store, 5), Some((110, 2)), "{}", capture.text());
    assert_eq!(capture.deferred(), 1, "{}", capture.text());
}

/// Another transaction appends to the same stream and writes the same row
/// inline, and holds both; the append, expecting the version that
/// transaction takes, waits for it on the stream and then is a conflict,
/// having written no row.
#[test]
fn an_append_racing_a_transaction_on_its_stream_writes_nothing() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    count(&store, "t-1", 1, 1, ExpectedVersion::NoStream);
    let (go, ready) = std::sync::mpsc::channel::<()>();
    let (held, wait_held) = std::sync::mpsc::channel::<i32>();
    let holder = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result::<Pid>(&mut *conn)
                .unwrap()
                .pid;
            es_diesel::write_transaction(&mut conn, |c| {
                let mut w = StreamWrite::new("t-1", ExpectedVersion::Exact(1));
                w.push(&Counted {
                    counter: 1,
                    by: 100,
                })?;
                es_diesel::append_in(c, &[w])?;
                held.send(pid).unwrap();
                ready.recv().unwrap();
                Ok::<_, Error>(())
            })
            .unwrap();
        })
    };
    let pid = wait_held.recv().unwrap();
    let racing = {
        let store = store.clone();
        std::thread::spawn(move || {
            let capture = Capture::default();
            let result = capture.run(|| {
                store.append(
                    "t-1",
                    ExpectedVersion::Exact(1),
                    [Counted { counter: 1, by: 10 }],
                )
            });
            (result, capture)
        })
    };
    Holder {
        conn: PgConnection::establish(db.url()).unwrap(),
        pid,
    }
    .wait_for_waiter(&db);
    go.send(()).unwrap();
    holder.join().unwrap();
    let (result, capture) = racing.join().unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(err, Error::Conflict { actual: 2, .. }),
        "{err:?}\n{}",
        capture.text()
    );
    assert_eq!(row_of(&store, 1), Some((101, 2)));
    assert_eq!(store.stream_version("t-1").unwrap(), 2);
}

/// Writers of many streams count on one row at once: every event is
/// counted once, whichever way each append went.
#[test]
fn concurrent_writers_of_one_row_lose_no_update() {
    for db in TestDatabase::all() {
        let store = db.store();
        const THREADS: i64 = 6;
        const EACH: i64 = 25;
        let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let stream = format!("w-{t}");
                    for k in 0..EACH {
                        let expected = if k == 0 {
                            ExpectedVersion::NoStream
                        } else {
                            ExpectedVersion::Exact(k)
                        };
                        store
                            .append(
                                &stream,
                                expected,
                                [Counted {
                                    counter: 7,
                                    by: t + 1,
                                }],
                            )
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let total: i64 = (1..=THREADS).map(|t| t * EACH).sum();
        assert_eq!(
            row_of(&store, 7),
            Some((total, THREADS * EACH)),
            "{}",
            db.backend()
        );
    }
}

/// A database not migrated to the statement's check (migration 12) still
/// appends, in a transaction.
#[test]
fn without_the_check_function_appends_run_in_a_transaction() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut conn = PgConnection::establish(db.url()).unwrap();
    conn.batch_execute("DROP FUNCTION es_rows_unchanged(boolean)")
        .unwrap();
    let capture = Capture::default();
    capture.run(|| count(&store, "m-1", 1, 3, ExpectedVersion::NoStream));
    assert_eq!(row_of(&store, 1), Some((3, 1)));
    assert_eq!(capture.one_statement(), 0, "{}", capture.text());
    assert_eq!(capture.deferred(), 1, "{}", capture.text());
}

/// One append makes a row and removes it again, while another transaction
/// inserts that row: as in a transaction, the append waits for it and
/// comes after it, so the row ends removed, as a rebuild would leave it.
#[test]
fn a_row_made_and_removed_by_one_append_waits_for_a_writer_of_its_key() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let holder = Holder::begin(
        &db,
        "INSERT INTO opt_counters (counter, total, events) VALUES (6, 100, 1)",
    );
    let append = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut w = StreamWrite::new("mr-1", ExpectedVersion::NoStream);
            w.push(&Counted { counter: 6, by: 1 }).unwrap();
            w.push(&CounterReset { counter: 6 }).unwrap();
            store.append_streams(&[w])
        })
    };
    holder.wait_for_waiter(&db);
    holder.commit();
    append.join().unwrap().unwrap();
    assert_eq!(row_of(&store, 6), None);
}

/// A read model's table that cannot be read is the projector's error, at
/// its event, as in a transaction; nothing is written.
#[test]
fn an_unreadable_read_model_is_the_projectors_error() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut conn = PgConnection::establish(db.url()).unwrap();
    conn.batch_execute("DROP TABLE opt_counters").unwrap();
    let err = store
        .append(
            "u-1",
            ExpectedVersion::NoStream,
            [Counted { counter: 1, by: 1 }],
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::Projector { position, .. } if *position > 0),
        "{err:?}"
    );
    assert_eq!(store.stream_version("u-1").unwrap(), 0);
}

/// A row of key columns only is checked by setting its key to itself, so
/// a second event on it still goes in one statement, and a row deleted
/// in between is made again by the transaction.
#[test]
fn a_row_of_key_columns_only_is_checked_too() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let capture = Capture::default();
    capture.run(|| {
        for v in 0..3 {
            let expected = if v == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(v)
            };
            store
                .append("k-1", expected, [MemberJoined { member: 1 }])
                .unwrap();
        }
    });
    assert_eq!(capture.one_statement(), 3, "{}", capture.text());
    assert_eq!(capture.deferred(), 0, "{}", capture.text());
    let holder = Holder::begin(&db, "DELETE FROM opt_members WHERE member = 1");
    let append = {
        let store = store.clone();
        std::thread::spawn(move || {
            let capture = Capture::default();
            let result = capture.run(|| {
                store.append(
                    "k-1",
                    ExpectedVersion::Exact(3),
                    [MemberJoined { member: 1 }],
                )
            });
            (result, capture)
        })
    };
    holder.wait_for_waiter(&db);
    holder.commit();
    let (result, capture) = append.join().unwrap();
    result.unwrap();
    assert_eq!(capture.deferred(), 1, "{}", capture.text());
    let mut conn = store.connection().unwrap();
    let members: i64 = opt_members::table.count().get_result(&mut *conn).unwrap();
    assert_eq!(members, 1);
}
