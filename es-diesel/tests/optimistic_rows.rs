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
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/capture.rs"]
mod capture;
use capture::Capture;

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

impl Capture {
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

/// Runs `sql` in another transaction and holds it open; appends
/// `Counted { counter: id, by }` as the first event of `stream` on a thread
/// of its own; commits the other transaction once the append waits for it.
/// Returns what the append traced (it must succeed).
fn append_while_holding(
    db: &TestDatabase,
    store: &EventStore,
    sql: &str,
    stream: &'static str,
    id: i64,
    by: i64,
) -> Capture {
    let holder = Holder::begin(db, sql);
    let append = {
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
    };
    holder.wait_for_waiter(db);
    holder.commit();
    let (result, capture) = append.join().unwrap();
    result.unwrap_or_else(|e| panic!("{e}\n{}", capture.text()));
    capture
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
    let capture = append_while_holding(
        &db,
        &store,
        "UPDATE opt_counters SET total = total + 100, events = events + 1 WHERE counter = 1",
        "h-2",
        1,
        10,
    );
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
    let capture = append_while_holding(
        &db,
        &store,
        "DELETE FROM opt_counters WHERE counter = 1",
        "d-2",
        1,
        10,
    );
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
    let capture = append_while_holding(
        &db,
        &store,
        "INSERT INTO opt_counters (counter, total, events) VALUES (5, 100, 1)",
        "i-1",
        5,
        10,
    );
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

/// An append reads its row as missing and leaves it missing; another
/// writer creates the row before the append's events go in: as in a
/// transaction, which reads the row after its insert, the append must see
/// that row (here: and remove it), as a rebuild of the log would.
#[test]
fn a_row_created_after_the_read_of_a_missing_row_is_seen() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    // Every append announces itself on this lock before it draws its order
    // key: held exclusively, it stops the append after its read.
    let holder = Holder::begin(
        &db,
        "SELECT pg_advisory_xact_lock(1163067394, 'es_order_keys'::regclass::oid::integer)",
    );
    let append = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.append(
                "g-1",
                ExpectedVersion::NoStream,
                [CounterReset { counter: 90 }],
            )
        })
    };
    holder.wait_for_waiter(&db);
    let mut other = PgConnection::establish(db.url()).unwrap();
    other
        .batch_execute("INSERT INTO opt_counters (counter, total, events) VALUES (90, 100, 1)")
        .unwrap();
    holder.commit();
    append.join().unwrap().unwrap();
    assert_eq!(row_of(&store, 90), None);
}

/// A statement the server cancels (here its `statement_timeout`, while it
/// waits for a row another transaction holds) is the caller's error: the
/// append is not run again in a transaction, which would wait again.
#[test]
fn a_cancelled_statement_is_returned_not_run_again() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    count(&store, "x-1", 1, 1, ExpectedVersion::NoStream);
    let timed = EventStore::open(&format!("{}%20-cstatement_timeout%3D300", db.url())).unwrap();
    let holder = Holder::begin(
        &db,
        "UPDATE opt_counters SET total = total + 100 WHERE counter = 1",
    );
    let capture = Capture::default();
    let err = capture
        .run(|| {
            timed.append(
                "x-2",
                ExpectedVersion::NoStream,
                [Counted { counter: 1, by: 10 }],
            )
        })
        .unwrap_err();
    holder.commit();
    assert!(err.to_string().contains("canceling statement"), "{err}");
    assert_eq!(capture.deferred(), 0, "{}", capture.text());
    assert_eq!(store.stream_version("x-2").unwrap(), 0);
    assert_eq!(row_of(&store, 1), Some((101, 1)));
}

/// Every column kind, tables named like the parts of the statement, and
/// composite keys, through the one statement.
mod kinds {
    use super::{Capture, PgConnection, SimpleConnection};
    use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
    use diesel::prelude::*;
    use es_diesel::testing::TestDatabase;
    use es_diesel::{projector, Error, Event, ExpectedVersion, StoreOptions, StreamWrite};
    use serde::{Deserialize, Serialize};

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    struct PutKinds {
        id: uuid::Uuid,
        sid: String,
        step: i64,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    struct PutOdd {
        num: i64,
        step: i64,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    struct PutPair {
        a: String,
        b: uuid::Uuid,
        step: i64,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    struct DropKinds {
        id: uuid::Uuid,
        sid: String,
    }

    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "rv_all", primary_key = id)]
    struct AllKinds {
        id: uuid::Uuid,
        s16: i16,
        s32: i32,
        s64: i64,
        f4: f32,
        f8: f64,
        b: bool,
        t: String,
        bytes: Vec<u8>,
        ts: NaiveDateTime,
        d: NaiveDate,
        tm: NaiveTime,
        utc: DateTime<Utc>,
        j: serde_json::Value,
    }

    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "rv_opts", primary_key = sid)]
    struct AllOpts {
        sid: String,
        s16: Option<i16>,
        s32: Option<i32>,
        s64: Option<i64>,
        f4: Option<f32>,
        f8: Option<f64>,
        b: Option<bool>,
        t: Option<String>,
        bytes: Option<Vec<u8>>,
        ts: Option<NaiveDateTime>,
        d: Option<NaiveDate>,
        tm: Option<NaiveTime>,
        utc: Option<DateTime<Utc>>,
        u: Option<uuid::Uuid>,
        j: Option<serde_json::Value>,
    }

    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "rv_pair", primary_key(a, b))]
    struct Pair {
        a: String,
        b: uuid::Uuid,
        v: i64,
    }

    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "n", primary_key = id)]
    struct TN {
        id: i64,
        v: i64,
    }
    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "ins", primary_key = id)]
    struct TIns {
        id: i64,
        n: i64,
    }
    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "k", primary_key = id)]
    struct TK {
        id: i64,
        v: i64,
    }
    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "last", primary_key = id)]
    struct TLast {
        id: i64,
        v: i64,
    }
    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "cur", primary_key = id)]
    struct TCur {
        id: i64,
        v: i64,
    }
    #[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "w0", primary_key = id)]
    struct TW0 {
        id: i64,
        v: i64,
    }

    fn kinds(id: uuid::Uuid, step: i64) -> AllKinds {
        let base = NaiveDate::from_ymd_opt(2020, 1, 1).unwrap();
        AllKinds {
            id,
            s16: step as i16 - 3,
            s32: step as i32 * 1000 - 7,
            s64: step * 1_000_000_000_000,
            f4: step as f32 * 0.5 + 0.25,
            f8: step as f64 * 1.5e100,
            b: step % 2 == 0,
            t: format!("text 'with' \"quotes\" \u{e9} {step}"),
            bytes: vec![0, 1, 2, 255, step as u8],
            ts: base
                .and_hms_micro_opt(1, 2, 3, 123_456 + step as u32)
                .unwrap(),
            d: base + chrono::Duration::days(step),
            tm: NaiveTime::from_hms_micro_opt(23, 59, 59, 999_999 - step as u32).unwrap(),
            utc: Utc
                .timestamp_opt(1_700_000_000 + step, 654_321_000)
                .unwrap(),
            j: serde_json::json!({"step": step, "s": "x\"y", "arr": [1, null, true]}),
        }
    }

    fn opts(sid: &str, step: i64) -> AllOpts {
        let k = kinds(uuid::Uuid::nil(), step);
        let some = step % 2 == 0;
        AllOpts {
            sid: sid.to_owned(),
            s16: some.then_some(k.s16),
            s32: some.then_some(k.s32),
            s64: some.then_some(k.s64),
            f4: some.then_some(k.f4),
            f8: some.then_some(k.f8),
            b: some.then_some(k.b),
            t: some.then_some(k.t.clone()),
            bytes: some.then_some(k.bytes.clone()),
            ts: some.then_some(k.ts),
            d: some.then_some(k.d),
            tm: some.then_some(k.tm),
            utc: some.then_some(k.utc),
            u: some.then_some(uuid::Uuid::from_u128(step as u128)),
            j: some.then_some(k.j.clone()),
        }
    }

    #[projector(on = PutKinds, key = id)]
    fn put_kinds(e: &PutKinds, row: &mut Option<AllKinds>) {
        *row = Some(kinds(e.id, e.step));
    }

    #[projector(on = PutKinds, key = sid)]
    fn put_opts(e: &PutKinds, row: &mut Option<AllOpts>) {
        *row = Some(opts(&e.sid, e.step));
    }

    #[projector(on = DropKinds, key = id)]
    fn drop_kinds(_e: &DropKinds, row: &mut Option<AllKinds>) {
        *row = None;
    }

    #[projector(on = DropKinds, key = sid)]
    fn drop_opts(_e: &DropKinds, row: &mut Option<AllOpts>) {
        *row = None;
    }

    #[projector(on = PutPair, key = (a, b))]
    fn put_pair(e: &PutPair, row: &mut Option<Pair>) {
        *row = Some(Pair {
            a: e.a.clone(),
            b: e.b,
            v: e.step,
        });
    }

    macro_rules! odd {
        ($f:ident, $m:ident, $c:ident) => {
            #[projector(on = PutOdd, key = num)]
            fn $f(e: &PutOdd, row: &mut Option<$m>) {
                let r = row.get_or_insert($m { id: e.num, $c: 0 });
                r.$c += e.step;
            }
        };
    }
    odd!(odd_n, TN, v);
    odd!(odd_ins, TIns, n);
    odd!(odd_k, TK, v);
    odd!(odd_last, TLast, v);
    odd!(odd_cur, TCur, v);
    odd!(odd_w0, TW0, v);

    fn expected(v: i64) -> ExpectedVersion {
        if v == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(v)
        }
    }

    #[test]
    fn every_column_kind_goes_in_one_statement() {
        let Some(db) = TestDatabase::postgres() else {
            return;
        };
        let store = db.store();
        let id = uuid::Uuid::new_v4();
        let capture = Capture::default();
        for step in 0..6 {
            capture.run(|| {
                store
                    .append(
                        "kinds-1",
                        expected(step),
                        [PutKinds {
                            id,
                            sid: "s-1".into(),
                            step,
                        }],
                    )
                    .unwrap()
            });
            let mut conn = store.connection().unwrap();
            let got: AllKinds = rv_all::table
                .select((
                    rv_all::id,
                    rv_all::s16,
                    rv_all::s32,
                    rv_all::s64,
                    rv_all::f4,
                    rv_all::f8,
                    rv_all::b,
                    rv_all::t,
                    rv_all::bytes,
                    rv_all::ts,
                    rv_all::d,
                    rv_all::tm,
                    rv_all::utc,
                    rv_all::j,
                ))
                .get_result(&mut *conn)
                .unwrap();
            assert_eq!(got, kinds(id, step), "step {step}");
            let got: AllOpts = rv_opts::table
                .select((
                    rv_opts::sid,
                    rv_opts::s16,
                    rv_opts::s32,
                    rv_opts::s64,
                    rv_opts::f4,
                    rv_opts::f8,
                    rv_opts::b,
                    rv_opts::t,
                    rv_opts::bytes,
                    rv_opts::ts,
                    rv_opts::d,
                    rv_opts::tm,
                    rv_opts::utc,
                    rv_opts::u,
                    rv_opts::j,
                ))
                .get_result(&mut *conn)
                .unwrap();
            assert_eq!(got, opts("s-1", step), "step {step}");
        }
        // A new stream whose rows start as NULLs (odd step): an insert of NULLs.
        capture.run(|| {
            store
                .append(
                    "kinds-2",
                    ExpectedVersion::NoStream,
                    [PutKinds {
                        id: uuid::Uuid::new_v4(),
                        sid: "s-2".into(),
                        step: 1,
                    }],
                )
                .unwrap()
        });
        capture.run(|| {
            store
                .append(
                    "kinds-1",
                    ExpectedVersion::Exact(6),
                    [DropKinds {
                        id,
                        sid: "s-1".into(),
                    }],
                )
                .unwrap()
        });
        {
            let mut conn = store.connection().unwrap();
            let n: i64 = rv_all::table.count().get_result(&mut *conn).unwrap();
            assert_eq!(n, 1);
            let n: i64 = rv_opts::table.count().get_result(&mut *conn).unwrap();
            assert_eq!(n, 1);
        }
        let text = capture.text();
        assert_eq!(capture.one_statement(), 8, "{text}");
        assert_eq!(capture.deferred(), 0, "{text}");
    }

    #[test]
    fn tables_named_like_the_statements_parts_and_composite_keys() {
        let Some(db) = TestDatabase::postgres() else {
            return;
        };
        let store = db.store();
        let capture = Capture::default();
        for step in 0..3 {
            capture.run(|| {
                store
                    .append(
                        "odd-1",
                        expected(step),
                        [PutOdd {
                            num: 7,
                            step: step + 1,
                        }],
                    )
                    .unwrap()
            });
        }
        let b = uuid::Uuid::new_v4();
        for step in 0..3 {
            capture.run(|| {
                store
                    .append(
                        "pair-1",
                        expected(step),
                        [PutPair {
                            a: "x".into(),
                            b,
                            step,
                        }],
                    )
                    .unwrap()
            });
        }
        let mut conn = store.connection().unwrap();
        let v: i64 = n::table.select(n::v).get_result(&mut *conn).unwrap();
        assert_eq!(v, 6);
        let v: i64 = ins::table.select(ins::n).get_result(&mut *conn).unwrap();
        assert_eq!(v, 6);
        let v: i64 = w0::table.select(w0::v).get_result(&mut *conn).unwrap();
        assert_eq!(v, 6);
        let v: i64 = rv_pair::table
            .select(rv_pair::v)
            .get_result(&mut *conn)
            .unwrap();
        assert_eq!(v, 2);
        let text = capture.text();
        assert_eq!(capture.one_statement(), 6, "{text}");
        assert_eq!(capture.deferred(), 0, "{text}");
    }

    #[derive(QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    /// Appends of 1 to 40 rows of a read model with a composite key, on one
    /// connection: reads of more than two of its keys go in a transaction, so
    /// the connection keeps at most two prepared versioned reads, and no
    /// statement of more than two rows.
    #[test]
    fn a_connection_keeps_few_prepared_statements_for_rows() {
        let Some(db) = TestDatabase::postgres() else {
            return;
        };
        let store = db.store_with(StoreOptions {
            pool_size: 1,
            ..StoreOptions::default()
        });
        for k in 1..=40usize {
            let mut w = StreamWrite::new(format!("bulk-{k}"), ExpectedVersion::NoStream);
            for i in 0..k {
                w.push(&PutPair {
                    a: format!("a{i}"),
                    b: uuid::Uuid::from_u128(i as u128),
                    step: 1,
                })
                .unwrap();
            }
            store.append_streams(&[w]).unwrap();
        }
        let mut conn = store.connection().unwrap();
        let mut count = |sql: &str| {
            diesel::sql_query(sql)
                .get_result::<Prepared>(&mut *conn)
                .unwrap()
                .n
        };
        let reads = count(
        "SELECT COUNT(*) AS n FROM pg_prepared_statements WHERE statement LIKE '%xmin::text::bigint, %'",
    );
        let statements =
        count("SELECT COUNT(*) AS n FROM pg_prepared_statements WHERE statement LIKE '%es_rows_unchanged%'");
        assert!(reads <= 2, "{reads} versioned reads kept prepared");
        assert!(
            statements <= 2,
            "{statements} statements with rows kept prepared"
        );
    }

    /// A one-key read model's rows are read with `=` when an append reads
    /// one key and with `= ANY` when it reads several: a connection keeps
    /// those two versioned reads prepared, whatever the number of keys.
    #[test]
    fn a_one_key_model_keeps_two_versioned_reads_prepared() {
        let Some(db) = TestDatabase::postgres() else {
            return;
        };
        let store = db.store_with(StoreOptions {
            pool_size: 1,
            ..StoreOptions::default()
        });
        for k in 1..=6i64 {
            let events: Vec<super::Counted> = (0..k)
                .map(|i| super::Counted {
                    counter: 100 * k + i,
                    by: 1,
                })
                .collect();
            store
                .append(&format!("keys-{k}"), ExpectedVersion::NoStream, events)
                .unwrap();
        }
        assert_eq!(super::row_of(&store, 601), Some((1, 1)));
        #[derive(QueryableByName)]
        struct Text {
            #[diesel(sql_type = diesel::sql_types::Text)]
            statement: String,
        }
        let mut conn = store.connection().unwrap();
        let reads: Vec<String> = diesel::sql_query(
            "SELECT statement FROM pg_prepared_statements \
             WHERE statement LIKE '%xmin::text::bigint, %' AND statement LIKE '%opt_counters%'",
        )
        .load::<Text>(&mut *conn)
        .unwrap()
        .into_iter()
        .map(|t| t.statement)
        .collect();
        assert_eq!(reads.len(), 2, "{reads:#?}");
        assert!(
            reads.iter().any(|r| r.contains("\"counter\" = $1")),
            "{reads:#?}"
        );
        assert!(reads.iter().any(|r| r.contains("= ANY($1)")), "{reads:#?}");
    }

    /// A row whose JSON no longer reads back is the projector's error at its
    /// event, as in a transaction.
    #[test]
    fn a_row_that_does_not_read_back_is_the_projectors_error() {
        let Some(db) = TestDatabase::postgres() else {
            return;
        };
        for optimistic in [false, true] {
            let store = db.store_with(StoreOptions {
                optimistic_rows: optimistic,
                ..StoreOptions::default()
            });
            let id = uuid::Uuid::new_v4();
            let stream = format!("bad-{optimistic}");
            let put = |step| PutKinds {
                id,
                sid: stream.clone(),
                step,
            };
            store
                .append(&stream, ExpectedVersion::NoStream, [put(0)])
                .unwrap();
            let mut admin = PgConnection::establish(db.url()).unwrap();
            admin
                .batch_execute(&format!(
                    "UPDATE rv_all SET j = 'not json' WHERE id = '{id}'"
                ))
                .unwrap();
            let err = store
                .append(&stream, ExpectedVersion::Exact(1), [put(1)])
                .unwrap_err();
            assert!(
                matches!(&err, Error::Projector { projector, position, .. }
                if projector.ends_with("put_kinds") && *position > 0),
                "optimistic_rows {optimistic}: {err:?}"
            );
            assert_eq!(store.stream_version(&stream).unwrap(), 1);
        }
    }
}
