//! Every stream's events reach followers (runners, blue/green rebuilds) in
//! increasing version order, exactly once, whatever the interleaving of
//! writers; multi-stream appends never deadlock; and only transactions that
//! append to the log hold followers back.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use es_diesel::follow::{read_after, Checkpoint};
use es_diesel::runner::{AsyncProjection, Step};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, write_transaction, AppendCondition, DbConnection, Error, Event, EventStore,
    ExpectedVersion, ImportOptions, ImportRow, Query, RecordedEvent, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

#[path = "support/capture.rs"]
mod capture;
use capture::Capture;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Moved {
    n: u64,
}

fn write(stream: &str, expected: ExpectedVersion, n: u64) -> StreamWrite {
    let mut w = StreamWrite::new(stream, expected);
    w.push(&Moved { n }).unwrap();
    w
}

/// Follows the whole log from the start until `want` events were read (or
/// 30 s passed) and returns each stream's versions in the order read.
fn follow(store: &EventStore, want: usize) -> HashMap<String, Vec<i64>> {
    let mut conn = store.connection().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut cp = Checkpoint::default();
    let mut seen = 0;
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    while seen < want && Instant::now() < deadline {
        let page = read_after(&mut conn, cp, None, 7).unwrap();
        if page.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
        for f in page {
            assert!(f.checkpoint > cp);
            cp = f.checkpoint;
            seen += 1;
            versions
                .entry(f.event.stream_id.clone())
                .or_default()
                .push(f.event.stream_version);
        }
    }
    assert_eq!(seen, want, "every committed event is followed");
    versions
}

fn assert_contiguous(versions: &HashMap<String, Vec<i64>>) {
    for (stream, v) in versions {
        let expected: Vec<i64> = (1..=v.len() as i64).collect();
        assert_eq!(v, &expected, "versions of {stream} in the order followed");
    }
}

/// T2 appends to C and stays open; T1 creates B and commits; T2 appends B's
/// second version and commits. Followers must read B v1 before B v2.
#[test]
fn a_transaction_that_began_earlier_still_follows_the_stream_order() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let (step_tx, step_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let t2 = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                append_in(c, &[write("c", ExpectedVersion::NoStream, 1)])?;
                step_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                let rec = append_in(c, &[write("b", ExpectedVersion::StreamExists, 3)])?;
                assert_eq!(rec[0].stream_version, 2);
                Ok(())
            })
            .unwrap();
        })
    };
    step_rx.recv().unwrap();
    store
        .append("b", ExpectedVersion::NoStream, [Moved { n: 2 }])
        .unwrap();
    go_tx.send(()).unwrap();
    t2.join().unwrap();
    let versions = follow(&store, 3);
    assert_eq!(versions["b"], [1, 2]);
    assert_contiguous(&versions);
}

/// The same interleaving with `append_streams` writing several streams and
/// with an import, held open between their first and their second stream
/// by a trigger that waits for a lock the test holds: appends to their
/// second streams meanwhile wait for them.
#[test]
fn imports_and_multi_stream_appends_keep_stream_order() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut hold = store.connection().unwrap();
    hold.batch_execute(
        "CREATE FUNCTION pause_after_a() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.stream_id LIKE 'a-%' THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER pause_after_a AFTER INSERT ON es_events FOR EACH ROW EXECUTE FUNCTION pause_after_a(); \
         SELECT pg_advisory_lock(4242);",
    )
    .unwrap();
    // The appender's second stream is created by someone else meanwhile.
    let importer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let rows = vec![
                ImportRow {
                    stream_id: "b-1".to_owned(),
                    key: "b".to_owned(),
                    event: Moved { n: 2 },
                },
                ImportRow {
                    stream_id: "a-1".to_owned(),
                    key: "a".to_owned(),
                    event: Moved { n: 1 },
                },
            ];
            store
                .import(rows, &ImportOptions::new("legacy"), |_| {})
                .unwrap()
        })
    };
    let multi = {
        let store = store.clone();
        std::thread::spawn(move || {
            store
                .append_streams(&[
                    write("b-2", ExpectedVersion::Any, 4),
                    write("a-2", ExpectedVersion::Any, 3),
                ])
                .unwrap()
        })
    };
    // Both are parked after writing their `a-` stream, holding the append
    // locks of their `b-` streams: appends to those wait for them, and are
    // written after them.
    wait_for_lock_waiters(&store, 2);
    let mut observer = store.connection().unwrap();
    let mut later: Vec<Session> = ["b-1", "b-2"]
        .iter()
        .zip([10, 11])
        .map(|(stream, n)| {
            let session = Session::begin(&store);
            session.send(vec![write(stream, ExpectedVersion::Any, n)]);
            session.blocked(&mut observer);
            session
        })
        .collect();
    hold.batch_execute("SELECT pg_advisory_unlock(4242)")
        .unwrap();
    assert_eq!(importer.join().unwrap().imported, 2);
    let rec = multi.join().unwrap();
    assert_eq!(
        rec.iter()
            .map(|r| (r.stream_id.as_str(), r.stream_version))
            .collect::<Vec<_>>(),
        [("b-2", 1), ("a-2", 1)],
        "returned in the caller's order"
    );
    for session in &mut later {
        session.result().unwrap();
        session.commit();
    }
    let versions = follow(&store, 6);
    assert_eq!(versions["b-1"], [1, 2]);
    assert_eq!(versions["b-2"], [1, 2]);
    assert_contiguous(&versions);
}

fn wait_for_lock_waiters(store: &EventStore, n: i64) {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = store.connection().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = 4242 \
             AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .get_result::<Count>(&mut *conn)
        .unwrap()
        .n;
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "writers never reached the pause");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Records each stream's last version in a table and fails on any event
/// that is not the next version of its stream.
struct VersionCheck;

#[derive(QueryableByName)]
struct Last {
    #[diesel(sql_type = BigInt)]
    version: i64,
}

impl AsyncProjection for VersionCheck {
    fn name(&self) -> &str {
        "version_check"
    }

    fn event_types(&self) -> Option<Vec<&'static str>> {
        None
    }

    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> es_diesel::Result<()> {
        let b = conn.backend();
        let last = diesel::sql_query(sql_for(
            b,
            "SELECT version FROM seen_versions WHERE stream_id = ?",
        ))
        .bind::<Text, _>(&event.stream_id)
        .get_result::<Last>(conn)
        .optional()?
        .map_or(0, |l| l.version);
        if event.stream_version != last + 1 {
            return Err(Error::Malformed {
                position: event.global_position,
                reason: format!(
                    "{} v{} reached the runner after v{last}",
                    event.stream_id, event.stream_version
                ),
            });
        }
        diesel::sql_query(sql_for(b, "DELETE FROM seen_versions WHERE stream_id = ?"))
            .bind::<Text, _>(&event.stream_id)
            .execute(conn)?;
        diesel::sql_query(sql_for(
            b,
            "INSERT INTO seen_versions (stream_id, version) VALUES (?, ?)",
        ))
        .bind::<Text, _>(&event.stream_id)
        .bind::<BigInt, _>(event.stream_version)
        .execute(conn)?;
        Ok(())
    }
}

/// Placeholders as the backend writes them.
fn sql_for(backend: es_diesel::Backend, sql: &str) -> String {
    if backend != es_diesel::Backend::Postgres {
        return sql.to_owned();
    }
    let mut n = 0;
    sql.chars()
        .map(|c| {
            if c == '?' {
                n += 1;
                format!("${n}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// 8 threads append to 1–3 of 20 streams per transaction, with random
/// expectations, several appends per transaction, and random rollbacks,
/// while a runner follows; it must see every stream's versions 1, 2, 3, …
#[test]
fn randomized_writers_never_reorder_a_stream_for_a_runner() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .connection()
            .unwrap()
            .batch_execute(
                "CREATE TABLE seen_versions (stream_id VARCHAR(255) PRIMARY KEY, version BIGINT NOT NULL)",
            )
            .unwrap();
        let mut runner = store.runner(Arc::new(VersionCheck));
        let backend = db.backend();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut rng = Lcg(t * 7919 + 1);
                    let mut conn = store.connection().unwrap();
                    let mut committed = 0u64;
                    for round in 0..40u64 {
                        let k = 1 + rng.next(3);
                        let mut streams: Vec<String> =
                            (0..k).map(|_| format!("s-{}", rng.next(20))).collect();
                        streams.sort();
                        streams.dedup();
                        let rollback = rng.next(5) == 0;
                        let split = rng.next(2) == 0;
                        let exists = rng.next(3) == 0;
                        let res = write_transaction(&mut conn, |c| -> Result<u64, Error> {
                            let writes: Vec<StreamWrite> = streams
                                .iter()
                                .map(|s| {
                                    let expected = if exists {
                                        ExpectedVersion::StreamExists
                                    } else {
                                        ExpectedVersion::Any
                                    };
                                    write(s, expected, t * 1000 + round)
                                })
                                .collect();
                            let n = if split {
                                let mut n = 0;
                                for w in &writes {
                                    n += append_in(c, std::slice::from_ref(w))?.len() as u64;
                                }
                                n
                            } else {
                                append_in(c, &writes)?.len() as u64
                            };
                            if rollback {
                                return Err(Error::Malformed {
                                    position: 0,
                                    reason: "rolled back on purpose".into(),
                                });
                            }
                            Ok(n)
                        });
                        match res {
                            Ok(n) => committed += n,
                            Err(Error::Malformed { .. }) => {}
                            // StreamExists on a stream nobody created yet.
                            Err(Error::Conflict { actual: 0, .. }) if exists => {}
                            Err(e) => panic!("unexpected append failure on {backend}: {e}"),
                        }
                    }
                    committed
                })
            })
            .collect();
        let mut applied = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while threads.iter().any(|t| !t.is_finished()) {
            applied += step(&mut runner);
            assert!(Instant::now() < deadline);
        }
        let committed: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        while applied < committed as usize {
            let n = step(&mut runner);
            if n == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            applied += n;
            assert!(Instant::now() < deadline, "runner caught up");
        }
        assert_eq!(applied, committed as usize, "{}", db.backend());
        // The runner's table agrees with the log.
        let mut conn = store.connection().unwrap();
        for s in 0..20 {
            let stream = format!("s-{s}");
            let last = diesel::sql_query(sql_for(
                db.backend(),
                "SELECT COALESCE(MAX(version), 0) AS version FROM seen_versions WHERE stream_id = ?",
            ))
            .bind::<Text, _>(&stream)
            .get_result::<Last>(&mut *conn)
            .unwrap()
            .version;
            assert_eq!(last, store.stream_version(&stream).unwrap(), "{stream}");
        }
    }
}

fn step(runner: &mut es_diesel::runner::Runner) -> usize {
    match runner.step() {
        Ok(Step::Applied(n)) => n,
        Ok(Step::Standby) => 0,
        Ok(other) => panic!("runner stopped: {other:?}"),
        Err(e) => panic!("runner failed: {e}"),
    }
}

/// Transfers A→B and B→A at once from 4 threads: with streams written in
/// one order by everyone, none deadlocks; stale versions are conflicts that
/// a reload fixes.
#[test]
fn opposite_transfers_never_deadlock() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append_streams(&[
                write("acct-a", ExpectedVersion::NoStream, 0),
                write("acct-b", ExpectedVersion::NoStream, 0),
            ])
            .unwrap();
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut conflicts = 0;
                    for i in 0..40u64 {
                        let (from, to) = if (t + i) % 2 == 0 {
                            ("acct-a", "acct-b")
                        } else {
                            ("acct-b", "acct-a")
                        };
                        loop {
                            let vf = store.stream_version(from).unwrap();
                            let vt = store.stream_version(to).unwrap();
                            match store.append_streams(&[
                                write(from, ExpectedVersion::Exact(vf), i),
                                write(to, ExpectedVersion::Exact(vt), i),
                            ]) {
                                Ok(_) => break,
                                Err(e) if e.is_conflict() => conflicts += 1,
                                Err(e) => panic!("transfer failed: {e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.stream_version("acct-a").unwrap(), 161);
        assert_eq!(store.stream_version("acct-b").unwrap(), 161);
    }
}

/// A connection on a thread of its own, in a transaction held open between
/// the steps the test sends it; what the store traces there is kept in
/// `log` (an append retried after a deadlock says so).
struct Session {
    steps: mpsc::Sender<SessionStep>,
    done: mpsc::Receiver<Result<(), Error>>,
    pid: i32,
    log: Capture,
}

/// What a [`Session`] runs in its transaction.
type SessionStep = Box<dyn FnOnce(&mut DbConnection) -> Result<(), Error> + Send>;

impl Session {
    fn begin(store: &EventStore) -> Session {
        let (steps, rx) = mpsc::channel::<SessionStep>();
        let (tx, done) = mpsc::channel();
        let (pid_tx, pid_rx) = mpsc::channel();
        let store = store.clone();
        let log = Capture::default();
        let kept = log.clone();
        std::thread::spawn(move || {
            let _traced = tracing::subscriber::set_default(kept.subscriber());
            let mut conn = store.connection().unwrap();
            #[derive(QueryableByName)]
            struct Pid {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                pid: i32,
            }
            let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result::<Pid>(&mut conn)
                .unwrap()
                .pid;
            pid_tx.send(pid).unwrap();
            let _ = write_transaction(&mut conn, |c| -> Result<(), Error> {
                for step in rx {
                    let last = step(c);
                    let failed = last.is_err();
                    tx.send(last).unwrap();
                    if failed {
                        break;
                    }
                }
                Ok(())
            });
        });
        Session {
            steps,
            done,
            pid: pid_rx.recv().unwrap(),
            log,
        }
    }

    /// What the store traced on this session's connection.
    fn traced(&self) -> String {
        self.log.text()
    }

    fn send(&self, writes: Vec<StreamWrite>) {
        self.steps
            .send(Box::new(move |c| append_in(c, &writes).map(|_| ())))
            .unwrap();
    }

    fn sql(&self, sql: &'static str) {
        self.steps
            .send(Box::new(move |c| {
                c.batch_execute(sql)?;
                Ok(())
            }))
            .unwrap();
    }

    /// The result of the step sent last (within a minute).
    fn result(&self) -> Result<(), Error> {
        self.done
            .recv_timeout(Duration::from_secs(60))
            .expect("the step finished")
    }

    /// Waits until the step sent last waits for a lock of another session.
    fn blocked(&self, observer: &mut DbConnection) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sessions(
            observer,
            "pid = $1 AND cardinality(pg_blocking_pids(pid)) > 0",
            self.pid,
        ) == 0
        {
            if let Ok(r) = self.done.try_recv() {
                panic!("the step was expected to wait, but finished: {r:?}");
            }
            assert!(Instant::now() < deadline, "the step never waited");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the transaction: the session's thread commits it.
    fn commit(&mut self) {
        let (closed, _) = mpsc::channel();
        self.steps = closed;
    }
}

/// Writers of any mix of expectations never wait for each other in a cycle.
/// Here U holds s-a's next event (an expected version), V holds s-c's (any
/// version); T writes s-a and s-b at once and waits for U; U then writes
/// s-c and waits for V; V then writes s-b. Had T locked s-b before waiting
/// at s-a, V would wait for T, T for U and U for V: a deadlock the server
/// breaks by failing one of them.
#[test]
fn writers_of_mixed_expectations_never_wait_in_a_cycle() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    for s in ["s-a", "s-b", "s-c"] {
        store
            .append(s, ExpectedVersion::NoStream, [Moved { n: 0 }])
            .unwrap();
    }
    let mut observer = store.connection().unwrap();
    let mut u = Session::begin(&store);
    let mut v = Session::begin(&store);
    let mut t = Session::begin(&store);
    u.send(vec![write("s-a", ExpectedVersion::Exact(1), 1)]);
    u.result().unwrap();
    v.send(vec![write("s-c", ExpectedVersion::Any, 2)]);
    v.result().unwrap();
    t.send(vec![
        write("s-a", ExpectedVersion::Any, 3),
        write("s-b", ExpectedVersion::Any, 3),
    ]);
    t.blocked(&mut observer);
    u.send(vec![write("s-c", ExpectedVersion::Any, 1)]);
    u.blocked(&mut observer);
    v.send(vec![write("s-b", ExpectedVersion::Any, 2)]);
    v.result().expect("V waits for nobody");
    v.commit();
    u.result().expect("U goes on once V commits");
    u.commit();
    t.result().expect("T goes on once U commits");
    t.commit();
    wait_for_versions(&store, &["s-a", "s-b", "s-c"], 3);
    // The server broke no deadlock by failing a statement (the store would
    // have retried it in its savepoint).
    for (name, session) in [("T", &t), ("U", &u), ("V", &v)] {
        let traced = session.traced();
        assert!(
            !traced.contains("retrying"),
            "{name} waited in a cycle and was retried:\n{traced}"
        );
    }
}

/// An append inside a transaction takes its stream's lock and holds it to
/// the commit; one that commits by itself takes none, so it never waits
/// for a holder of the lock, and it holds none afterwards.
#[test]
fn appends_in_transactions_hold_their_streams_lock_and_others_none() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut observer = store.connection().unwrap();
    let mut holder = Session::begin(&store);
    holder.sql(
        "SELECT pg_advisory_xact_lock(1163067393, hashtext('es_events'::regclass::oid::text || '/' || 'held'))",
    );
    holder.result().unwrap();
    // By itself: not held up by the lock (were it, the wait would end in
    // an error after 20 s instead of hanging the test).
    let bounded = EventStore::open(&format!("{}%20-clock_timeout%3D20000", db.url())).unwrap();
    bounded
        .append("held", ExpectedVersion::NoStream, [Moved { n: 1 }])
        .unwrap();
    // In a transaction: waits for it.
    let mut waiter = Session::begin(&store);
    waiter.send(vec![write("held", ExpectedVersion::Exact(1), 2)]);
    waiter.blocked(&mut observer);
    holder.commit();
    waiter.result().unwrap();
    // Now the waiter holds it: so does no one else.
    let mut other = Session::begin(&store);
    other.send(vec![write("held", ExpectedVersion::Any, 3)]);
    other.blocked(&mut observer);
    waiter.commit();
    other.result().unwrap();
    other.commit();
    wait_for_versions(&store, &["held"], 3);
}

/// A transaction that appends in two calls holds its first call's locks
/// while its second takes its own, so it can deadlock with a conditional
/// append: the append in the caller's transaction then fails at once with a
/// transient error instead of retrying in the same cycle, and the other
/// writer goes through.
#[test]
fn a_deadlock_inside_a_callers_transaction_is_returned_not_retried() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    store
        .append("w", ExpectedVersion::NoStream, [Moved { n: 0 }])
        .unwrap();
    let mut observer = store.connection().unwrap();
    let mut h = Session::begin(&store);
    // This session breaks the deadlock: it detects it first.
    h.sql("SET LOCAL deadlock_timeout = '50ms'");
    h.result().unwrap();
    h.send(vec![write("h", ExpectedVersion::NoStream, 1)]);
    h.result().unwrap();
    // A conditional append on a query by type: it takes w's lock, then
    // waits for every append in flight (H's) to finish.
    let conditional = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.append_if(
                &[write("w", ExpectedVersion::Any, 2)],
                &AppendCondition::none_match(Query::types(["Nothing"])),
            )
        })
    };
    wait_until_blocked_by(&mut observer, h.pid);
    // H now waits for w's lock, held by the conditional append.
    h.send(vec![write("w", ExpectedVersion::Exact(1), 3)]);
    let err = h.result().expect_err("H is the deadlock's victim");
    assert!(err.is_transient() && err.is_retryable(), "{err:?}");
    let traced = h.traced();
    assert!(
        !traced.contains("retrying"),
        "retried in the cycle:\n{traced}"
    );
    h.commit();
    let appended = conditional.join().unwrap().unwrap();
    assert_eq!(appended[0].stream_version, 2);
}

/// A write with a condition takes its streams' locks before its tag locks,
/// the order every writer takes them in: while it waits for a stream, it
/// holds no tag lock another writer could be waiting for.
#[test]
fn a_conditional_append_waits_for_its_stream_before_taking_tag_locks() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut observer = store.connection().unwrap();
    let mut holder = Session::begin(&store);
    holder.sql(
        "SELECT pg_advisory_xact_lock(1163067393, hashtext('es_events'::regclass::oid::text || '/' || 'tagged'))",
    );
    holder.result().unwrap();
    let conditional = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.append_if(
                &[write("tagged", ExpectedVersion::Any, 1)],
                &AppendCondition::none_match(Query::tag("course:1")),
            )
        })
    };
    wait_until_blocked_by(&mut observer, holder.pid);
    let holding_tags = sessions(
        &mut observer,
        "$1 = ANY(pg_blocking_pids(pid)) AND EXISTS (SELECT 1 FROM pg_locks AS l \
         WHERE l.pid = pg_stat_activity.pid AND l.locktype = 'advisory' \
         AND l.classid = 1163067395 AND l.granted)",
        holder.pid,
    );
    assert_eq!(holding_tags, 0, "waits for the stream holding a tag lock");
    holder.commit();
    let appended = conditional.join().unwrap().unwrap();
    assert_eq!(appended[0].stream_version, 1);
}

/// Waits until a session waits for a lock that `pid` holds.
fn wait_until_blocked_by(observer: &mut DbConnection, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sessions(observer, "$1 = ANY(pg_blocking_pids(pid))", pid) == 0 {
        assert!(Instant::now() < deadline, "no one waited for {pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server's sessions that meet `condition` (SQL on `pg_stat_activity`,
/// `$1` being `pid`).
fn sessions(observer: &mut DbConnection, condition: &str, pid: i32) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE {condition}"
    ))
    .bind::<diesel::sql_types::Integer, _>(pid)
    .get_result::<Count>(observer)
    .unwrap()
    .n
}

/// Waits until each of `streams` is at `version` (their writers committed).
fn wait_for_versions(store: &EventStore, streams: &[&str], version: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while streams
        .iter()
        .any(|s| store.stream_version(s).unwrap() != version)
    {
        assert!(Instant::now() < deadline, "every transaction committed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A deadlock the database breaks is reported as transient and retryable.
#[test]
fn a_deadlock_is_a_retryable_error() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    store
        .connection()
        .unwrap()
        .batch_execute("CREATE TABLE accounts (id INT PRIMARY KEY, n INT); INSERT INTO accounts VALUES (1, 0), (2, 0)")
        .unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = [(1, 2), (2, 1)]
        .into_iter()
        .map(|(first, second)| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                write_transaction(&mut conn, |c| -> Result<(), Error> {
                    c.batch_execute(&format!("UPDATE accounts SET n = n + 1 WHERE id = {first}"))?;
                    barrier.wait();
                    c.batch_execute(&format!(
                        "UPDATE accounts SET n = n + 1 WHERE id = {second}"
                    ))?;
                    Ok(())
                })
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed: Vec<&Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(
        failed.len(),
        1,
        "the database breaks the deadlock: {results:?}"
    );
    assert!(
        matches!(
            failed[0],
            Error::Transient {
                reason: "deadlock",
                ..
            }
        ),
        "{:?}",
        failed[0]
    );
    assert!(failed[0].is_retryable() && !failed[0].is_conflict());
}

/// A transaction that writes elsewhere (another table, another database on
/// the server) and stays open does not hold followers back.
#[test]
fn unrelated_open_transactions_do_not_hold_runners_back() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut other = store.connection().unwrap();
    other
        .batch_execute("CREATE TABLE unrelated (n INT); BEGIN; INSERT INTO unrelated VALUES (1)")
        .unwrap();
    let admin_url = std::env::var(es_diesel::testing::POSTGRES_URL_VAR).unwrap();
    let other_db_url = match admin_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/postgres"),
        None => admin_url.clone(),
    };
    let mut elsewhere = diesel::PgConnection::establish(&other_db_url).unwrap();
    elsewhere
        .batch_execute("BEGIN; CREATE TEMP TABLE es_unrelated_probe (n INT); INSERT INTO es_unrelated_probe VALUES (1)")
        .unwrap();
    let held_since = Instant::now();
    let mut runner = store.runner(Arc::new(VersionCheck));
    store
        .connection()
        .unwrap()
        .batch_execute(
            "CREATE TABLE seen_versions (stream_id VARCHAR(255) PRIMARY KEY, version BIGINT NOT NULL)",
        )
        .unwrap();
    for n in 0..5u64 {
        store
            .append(&format!("s-{n}"), ExpectedVersion::NoStream, [Moved { n }])
            .unwrap();
        let appended = Instant::now();
        let mut applied = 0;
        while applied == 0 {
            applied = step(&mut runner);
            assert!(
                appended.elapsed() < Duration::from_secs(1),
                "the runner applies a new event within 1 s while others write elsewhere"
            );
        }
        assert_eq!(applied, 1);
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(held_since.elapsed() >= Duration::from_secs(10));
    other.batch_execute("ROLLBACK").unwrap();
    elsewhere.batch_execute("ROLLBACK").unwrap();
}
