//! Attacks on gap-safe following on PostgreSQL (order keys, the follow
//! horizon): forced interleavings of writers held open in threads while a
//! follower reads.
//!
//! The first four tests are interleavings that once made a follower skip an
//! event; the others are attacks that held. All stay as regression tests.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use es_diesel::follow::{read_after, Checkpoint};
use es_diesel::runner::{AsyncProjection, Runner, RunnerOptions, Step};
use es_diesel::testing::{TestDatabase, POSTGRES_URL_VAR};
use es_diesel::{
    append_in, write_transaction, DbConnection, Error, Event, EventStore, ExpectedVersion,
    RecordedEvent, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "support/capture.rs"]
mod capture;
use capture::Capture;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: u32,
}

fn write(stream: &str, expected: ExpectedVersion, n: u32) -> StreamWrite {
    let mut w = StreamWrite::new(stream, expected);
    w.push(&Tick { n }).unwrap();
    w
}

/// Everything a follower can read from `from` now, in pages of 3.
fn follow_all(store: &EventStore, from: Checkpoint) -> (Vec<u32>, Checkpoint) {
    follow_pages(store, from, 3)
}

fn follow_pages(store: &EventStore, from: Checkpoint, page: usize) -> (Vec<u32>, Checkpoint) {
    let mut conn = store.connection().unwrap();
    let mut seen = Vec::new();
    let mut cp = from;
    loop {
        let page = read_after(&mut conn, cp, None, page).unwrap();
        if page.is_empty() {
            return (seen, cp);
        }
        for f in page {
            assert!(f.checkpoint > cp, "checkpoints only move forward");
            cp = f.checkpoint;
            seen.push(f.event.decode::<Tick>().unwrap().n);
        }
    }
}

/// Follows until `want` events were seen or 20 s passed.
fn follow_until(store: &EventStore, from: Checkpoint, want: usize) -> (Vec<u32>, Checkpoint) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut seen, mut cp) = follow_all(store, from);
    while seen.len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let (more, next) = follow_all(store, cp);
        seen.extend(more);
        cp = next;
    }
    (seen, cp)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Number {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    b: bool,
}

fn schema_of(store: &EventStore) -> String {
    let mut conn = store.connection().unwrap();
    diesel::sql_query("SELECT current_schema()::text AS name")
        .get_result::<Name>(&mut *conn)
        .unwrap()
        .name
}

fn number(conn: &mut DbConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Number>(conn).unwrap().n
}

/// The key the next append will draw.
fn next_key(conn: &mut DbConnection) -> i64 {
    number(
        conn,
        "SELECT last_value + CASE WHEN is_called THEN 1 ELSE 0 END AS n FROM es_order_keys",
    )
}

/// A transaction on its own connection, held open after `body` until
/// released. `held` receives `body`'s result once it ran.
struct Held<T> {
    held: mpsc::Receiver<T>,
    release: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl<T: Send + 'static> Held<T> {
    fn start(
        store: &EventStore,
        body: impl FnOnce(&mut DbConnection) -> Result<T, Error> + Send + 'static,
    ) -> Self {
        let store = store.clone();
        let (held_tx, held) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                let value = body(c)?;
                held_tx.send(value).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        });
        Held {
            held,
            release,
            thread,
        }
    }

    fn wait_held(&self) -> T {
        self.held
            .recv_timeout(Duration::from_secs(30))
            .expect("the held transaction ran its body")
    }

    fn commit(self) {
        self.release.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Interleavings that once made a follower skip an event.
// ---------------------------------------------------------------------------

/// One transaction appends to the logs of two schemas: first schema A, then
/// (after `SET LOCAL search_path`) schema B. Its append to B must announce
/// itself and publish a key in B too (the per-transaction marker of an
/// announced append is per log), or B's followers do not see it in flight.
///
/// Interleaving: T appends a@A (announces in A, key published), switches to
/// B, appends y@B (no lock in B), stays open. U appends z@B and commits. B's
/// follower: horizon = B's sequence bound (T is no writer of B), reads z,
/// checkpoint past y's key. T commits; y is behind the checkpoint for ever.
#[test]
fn a_transaction_appending_to_two_schemas_holds_both_followers() {
    let (Some(db_a), Some(db_b)) = (TestDatabase::postgres(), TestDatabase::postgres()) else {
        return;
    };
    let store_a = db_a.store();
    let store_b = db_b.store();
    let schema_b = schema_of(&store_b);

    let t = Held::start(&store_a, move |c| {
        append_in(c, &[write("a", ExpectedVersion::NoStream, 1)])?;
        c.batch_execute(&format!("SET LOCAL search_path TO \"{schema_b}\""))?;
        append_in(c, &[write("y", ExpectedVersion::NoStream, 2)])?;
        Ok(())
    });
    t.wait_held();
    store_b
        .append("z", ExpectedVersion::NoStream, [Tick { n: 3 }])
        .unwrap();

    let (before, cp) = follow_all(&store_b, Checkpoint::default());
    t.commit();
    let (after, _) = follow_until(&store_b, cp, if before.is_empty() { 2 } else { 1 });
    let all: Vec<u32> = before.iter().chain(&after).copied().collect();
    assert_eq!(
        all,
        [2, 3],
        "B's follower read {before:?} while T (appending to A, then B) was open, then {after:?}: \
         T's event 2 in B was skipped"
    );
}

/// Gap-safety needs READ COMMITTED (a snapshot per statement), so the
/// store's runners and rebuilds open their transactions at that level
/// whatever the connection's default, and following inside a caller's
/// transaction at another level is refused. With `default_transaction_isolation`
/// set to REPEATABLE READ or SERIALIZABLE (per database, role or URL),
/// the horizon and the read share the snapshot of the transaction's first
/// statement, which can predate a commit that the horizon already counts as
/// done.
///
/// Interleaving (what `Runner::batch` does: load the checkpoint, then
/// `read_after`): W appends a (key k) and stays open; U appends b (key > k)
/// and commits. The follower's transaction runs its first statement
/// (snapshot S: a not committed). W commits. `read_after`: no writer in
/// flight, horizon = sequence bound > k; S shows b but not a: it returns b,
/// the checkpoint passes a for ever.
#[test]
fn a_follower_under_a_serializable_default_still_reads_in_read_committed() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let rr_url = format!(
        "{}%20-cdefault_transaction_isolation%3Dserializable",
        db.url()
    );
    let follower = EventStore::open_with(&rr_url, StoreOptions::default()).unwrap();

    // The runner's batch transaction gets the connection's default.
    struct Probe(Arc<Mutex<Vec<String>>>);
    impl AsyncProjection for Probe {
        fn name(&self) -> &str {
            "isolation_probe"
        }
        fn event_types(&self) -> Option<Vec<&'static str>> {
            None
        }
        fn apply(&self, conn: &mut DbConnection, _: &RecordedEvent) -> es_diesel::Result<()> {
            let level =
                diesel::sql_query("SELECT current_setting('transaction_isolation') AS name")
                    .get_result::<Name>(conn)?
                    .name;
            self.0.lock().unwrap().push(level);
            Ok(())
        }
    }
    store
        .append("first", ExpectedVersion::NoStream, [Tick { n: 0 }])
        .unwrap();
    let levels = Arc::new(Mutex::new(Vec::new()));
    let mut runner = Runner::new(
        follower.clone(),
        Arc::new(Probe(levels.clone())),
        RunnerOptions::default(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while levels.lock().unwrap().is_empty() && Instant::now() < deadline {
        assert!(!matches!(runner.step().unwrap(), Step::Failed { .. }));
        std::thread::sleep(Duration::from_millis(10));
    }
    runner.release();
    let (_, start) = follow_until(&store, Checkpoint::default(), 1);

    let w = Held::start(&store, |c| {
        append_in(c, &[write("a", ExpectedVersion::NoStream, 1)])?;
        Ok(())
    });
    w.wait_held();
    store
        .append("b", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();

    let mut conn = follower.connection().unwrap();
    let mut w = Some(w);
    let read = write_transaction(&mut conn, |c| -> Result<Vec<u32>, Error> {
        number(c, "SELECT COUNT(*) AS n FROM es_checkpoints");
        w.take().unwrap().commit();
        Ok(read_after(c, start, None, 10)?
            .into_iter()
            .map(|f| f.event.decode::<Tick>().unwrap().n)
            .collect())
    })
    .unwrap();
    assert_eq!(
        levels.lock().unwrap()[0],
        "read committed",
        "the runner's batch runs in READ COMMITTED whatever the connection's default"
    );
    assert_eq!(
        read,
        [1, 2],
        "event 1, committed after the transaction's first statement, is read"
    );
    // Inside a transaction of the caller's at another level, following is
    // refused rather than done on a stale snapshot.
    let refused = conn.transaction(|c| {
        c.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")?;
        read_after(c, start, None, 10)
    });
    assert!(
        matches!(&refused, Err(Error::Follow { reason }) if reason.contains("READ COMMITTED")),
        "{refused:?}"
    );
}

/// A store migrated under a search_path whose first schema did not exist
/// yet (PostgreSQL's default `"$user", public` is one). Functions that
/// resolved names through that search_path at every call would, once a
/// schema earlier in it appears with a store of its own, draw keys from that
/// store's sequence (here set far behind): new events would get keys below
/// those a follower has passed. The functions are pinned to their schema.
#[test]
fn order_key_functions_stay_with_their_schema_when_another_appears() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let admin_url = std::env::var(POSTGRES_URL_VAR).unwrap();
    let x = {
        let store = db.store();
        schema_of(&store)
    };
    let y = format!("{x}_later");
    struct DropSchema(String, String);
    impl Drop for DropSchema {
        fn drop(&mut self) {
            if let Ok(mut c) = PgConnection::establish(&self.0) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.1));
            }
        }
    }
    let _cleanup = DropSchema(admin_url.clone(), y.clone());
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    let mut admin = PgConnection::establish(&admin_url).unwrap();
    admin
        .batch_execute(&format!(
            "DROP SCHEMA \"{x}\" CASCADE; CREATE SCHEMA \"{x}\""
        ))
        .unwrap();
    // Migrated while `y` does not exist: everything is created in `x`.
    let migrating = EventStore::open(&format!(
        "{admin_url}{sep}options=-csearch_path%3D{y}%2C{x}"
    ))
    .unwrap();
    migrating.migrate().unwrap();
    drop(migrating);

    let store = db.store();
    let many: Vec<StreamWrite> = (0..3000)
        .map(|i| write(&format!("s-{i}"), ExpectedVersion::NoStream, 0))
        .collect();
    store.append_streams(&many).unwrap();
    let (seen, cp) = follow_pages(&store, Checkpoint::default(), 1000);
    assert_eq!(seen.len(), 3000);

    admin
        .batch_execute(&format!("CREATE SCHEMA \"{y}\""))
        .unwrap();
    let other = EventStore::open(&format!("{admin_url}{sep}options=-csearch_path%3D{y}")).unwrap();
    other.migrate().unwrap();
    let behind = {
        let mut c = other.connection().unwrap();
        c.batch_execute("SELECT setval('es_order_keys', 1)")
            .unwrap();
        next_key(&mut c)
    };
    assert!(
        behind < cp.order_key,
        "precondition: the new schema's keys ({behind}) are behind the follower ({})",
        cp.order_key
    );

    store
        .append("late", ExpectedVersion::NoStream, [Tick { n: 7 }])
        .unwrap();
    let (after, _) = follow_until(&store, cp, 1);
    assert_eq!(
        after,
        [7],
        "an event appended to {x} after schema {y} appeared was skipped by the follower"
    );
}

/// The horizon's bound is the sequence's `last_value + 1`, which only bounds
/// future keys when every backend draws one value at a time: with `CACHE n`
/// a backend hands out values it reserved earlier, below the bound another
/// backend moved. An operator's `ALTER SEQUENCE … CACHE n` makes followers
/// refuse, with a message saying how to undo it, instead of skip.
#[test]
fn a_cached_order_key_sequence_is_refused_by_followers() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut a = store.connection().unwrap();
    let mut b = store.connection().unwrap();
    a.batch_execute("ALTER SEQUENCE es_order_keys CACHE 10")
        .unwrap();
    let append = |c: &mut DbConnection, stream: &str, n: u32| {
        write_transaction(c, |c| {
            append_in(c, &[write(stream, ExpectedVersion::Any, n)])
        })
        .unwrap();
    };
    append(&mut a, "a", 1);
    append(&mut b, "b", 2);
    let refused = read_after(&mut a, Checkpoint::default(), None, 10);
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("must not be cached")),
        "{refused:?}"
    );
    a.batch_execute("ALTER SEQUENCE es_order_keys CACHE 1")
        .unwrap();
    let (seen, _) = follow_until(&store, Checkpoint::default(), 2);
    assert_eq!(seen, [1, 2]);
}

// ---------------------------------------------------------------------------
// Attacks that held (regression tests).
// ---------------------------------------------------------------------------

/// A writer that announced itself and drew its key but waits for its key
/// lock (here: someone holds that key exclusively) must stop followers from
/// reading past it while a later writer commits. (Its request shows in
/// `pg_locks` while waiting, so it counts as published; the true "announced,
/// not yet published" window, between `nextval` and the lock request, cannot
/// be held open from outside.)
#[test]
fn a_writer_waiting_for_its_key_lock_holds_followers() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut blocker = store.connection().unwrap();
    let k = next_key(&mut blocker);
    let key_lock = (17747i64 << 48) | k;
    blocker.batch_execute("BEGIN").unwrap();
    blocker
        .batch_execute(&format!("SELECT pg_advisory_xact_lock({key_lock})"))
        .unwrap();

    let w = Held::start(&store, |c| {
        append_in(c, &[write("w", ExpectedVersion::NoStream, 1)])?;
        Ok(())
    });
    let mut probe = store.connection().unwrap();
    wait_for("the writer to wait for its key lock", || {
        diesel::sql_query(format!(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = {key_lock}) AS b"
        ))
        .get_result::<Flag>(&mut *probe)
        .unwrap()
        .b
    });
    store
        .append("u", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(
        seen,
        Vec::<u32>::new(),
        "nothing while a writer waits for its key lock"
    );

    blocker.batch_execute("COMMIT").unwrap();
    w.wait_held();
    let (seen, cp) = follow_all(&store, cp);
    assert_eq!(seen, Vec::<u32>::new(), "nothing past the open writer");
    w.commit();
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(seen, [1, 2], "the writer's key was drawn first");
}

/// The first append of a transaction rolled back to its savepoint (locks and
/// `es.append_key` go together); a later append in the same transaction
/// must announce itself again.
#[test]
fn an_append_after_a_rolled_back_first_append_announces_itself_again() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let t = Held::start(&store, |c| {
        let undone = write_transaction(c, |c| -> Result<(), Error> {
            append_in(c, &[write("gone", ExpectedVersion::NoStream, 0)])?;
            Err(Error::Malformed {
                position: 0,
                reason: "rolled back on purpose".into(),
            })
        });
        assert!(undone.is_err());
        // A failed append (a conflict) rolls back its own savepoint too.
        c.batch_execute("SELECT 1")?;
        append_in(c, &[write("t", ExpectedVersion::NoStream, 1)])?;
        Ok(())
    });
    t.wait_held();
    store
        .append("u", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(seen, Vec::<u32>::new(), "nothing past the open transaction");
    t.commit();
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(seen, [1, 2]);
}

/// A failed `append_in` inside a transaction that stays open leaves nothing
/// that holds followers back; neither do transactions that never append to
/// this log (other writes, other schemas' appends, stream locks only).
#[test]
fn only_open_appends_to_this_log_hold_followers() {
    let (Some(db), Some(other_db)) = (TestDatabase::postgres(), TestDatabase::postgres()) else {
        return;
    };
    let store = db.store();
    let other = other_db.store();
    store
        .append("exists", ExpectedVersion::NoStream, [Tick { n: 0 }])
        .unwrap();

    let failed = Held::start(&store, |c| {
        let e = append_in(c, &[write("exists", ExpectedVersion::NoStream, 99)]);
        assert!(matches!(e, Err(Error::Conflict { .. })), "{e:?}");
        c.batch_execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)")?;
        Ok(())
    });
    failed.wait_held();
    let unrelated = Held::start(&store, |c| {
        c.batch_execute(
            "SELECT pg_current_xact_id(); \
             SELECT pg_advisory_xact_lock(1163067393, 42); \
             SELECT pg_advisory_xact_lock_shared((17747::bigint << 48) | 1)",
        )?;
        Ok(())
    });
    unrelated.wait_held();
    let elsewhere = Held::start(&other, |c| {
        append_in(c, &[write("o", ExpectedVersion::NoStream, 50)])?;
        Ok(())
    });
    elsewhere.wait_held();

    store
        .append("later", ExpectedVersion::NoStream, [Tick { n: 1 }])
        .unwrap();
    let (seen, _) = follow_until(&store, Checkpoint::default(), 2);
    assert_eq!(seen, [0, 1]);
    failed.commit();
    unrelated.commit();
    elsewhere.commit();
}

/// A REPEATABLE READ user transaction that read first (old snapshot), then
/// appends: its key is drawn at the append, so followers wait for it, and
/// each stream still comes in version order.
#[test]
fn a_repeatable_read_writer_is_waited_for_and_streams_stay_in_order() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let (snap_tx, snap_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let t = Held::start(&store, move |c| {
        c.batch_execute(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT COUNT(*) FROM es_events",
        )?;
        snap_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // Stream `s` got version 1 after this snapshot.
        let stale = append_in(c, &[write("s", ExpectedVersion::Exact(1), 9)]);
        assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
        append_in(c, &[write("t", ExpectedVersion::NoStream, 2)])?;
        Ok(())
    });
    snap_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    store
        .append("s", ExpectedVersion::NoStream, [Tick { n: 1 }])
        .unwrap();
    go_tx.send(()).unwrap();
    t.wait_held();
    store
        .append("s", ExpectedVersion::Exact(1), [Tick { n: 3 }])
        .unwrap();
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(seen, [1], "nothing past the open repeatable read writer");
    t.commit();
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(seen, [2, 3]);
}

/// A writer that announced itself with a small key, then writes to a stream
/// another transaction wrote meanwhile: each stream comes in version order.
#[test]
fn each_stream_is_followed_in_version_order_across_interleaved_writers() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let (first_tx, first_rx) = mpsc::channel::<()>();
    let (step_tx, step_rx) = mpsc::channel::<()>();
    let t = Held::start(&store, move |c| {
        append_in(c, &[write("x", ExpectedVersion::NoStream, 1)])?;
        first_tx.send(()).unwrap();
        step_rx.recv().unwrap();
        append_in(c, &[write("s", ExpectedVersion::Exact(1), 3)])?;
        Ok(())
    });
    first_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    store
        .append("s", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    step_tx.send(()).unwrap();
    t.wait_held();
    t.commit();
    let mut conn = store.connection().unwrap();
    let all = read_after(&mut conn, Checkpoint::default(), None, 10).unwrap();
    let s: Vec<i64> = all
        .iter()
        .filter(|f| f.event.stream_id == "s")
        .map(|f| f.event.stream_version)
        .collect();
    assert_eq!(s, [1, 2]);
    let ns: Vec<u32> = all
        .iter()
        .map(|f| f.event.decode::<Tick>().unwrap().n)
        .collect();
    assert_eq!(
        ns,
        [1, 2, 3],
        "T's first key comes first; its second after s v1"
    );
}

/// A row inserted by hand (the column default draws its key) holds
/// followers like any append.
#[test]
fn a_hand_inserted_row_holds_followers() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    store
        .append("template", ExpectedVersion::NoStream, [Tick { n: 0 }])
        .unwrap();
    let t = Held::start(&store, |c| {
        c.batch_execute(
            "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata) \
             SELECT gen_random_uuid(), 'by-hand', 1, event_type, event_version, '{\"n\": 1}', '{}' \
             FROM es_events WHERE stream_id = 'template'",
        )?;
        Ok(())
    });
    t.wait_held();
    store
        .append("u", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(seen, [0], "nothing past the open hand insert");
    t.commit();
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(seen, [1, 2]);
}

/// Several appends (streams, chunks, statements) in one transaction, the
/// first of which went through a savepoint that was released: followers
/// wait for all of them and see every event once.
#[test]
fn a_long_multi_statement_writer_is_waited_for_whole() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let t = Held::start(&store, |c| {
        write_transaction(c, |c| {
            append_in(c, &[write("p", ExpectedVersion::NoStream, 1)])
        })?;
        let mut big = StreamWrite::new("q", ExpectedVersion::NoStream);
        for n in 0..600 {
            big.push(&Tick { n: 1000 + n })?;
        }
        append_in(c, &[big, write("r", ExpectedVersion::Any, 2)])?;
        Ok(())
    });
    t.wait_held();
    store
        .append("u", ExpectedVersion::NoStream, [Tick { n: 5000 }])
        .unwrap();
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(seen, Vec::<u32>::new());
    t.commit();
    let (seen, _) = follow_until(&store, cp, 603);
    assert_eq!(seen.len(), 603);
    assert_eq!(seen[0], 1);
    assert_eq!(*seen.last().unwrap(), 5000);
}

impl Capture {
    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

/// `tail --follow` started while a writer holds an earlier key open and a
/// later writer has committed: it prints the committed event at the start,
/// the held one once it commits, and neither twice.
#[test]
fn tail_follow_prints_an_event_committed_behind_its_start_once() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let w = Held::start(&store, |c| {
        append_in(c, &[write("held-stream", ExpectedVersion::NoStream, 1)])?;
        Ok(())
    });
    w.wait_held();
    store
        .append("later-stream", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    let out = Capture::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tail = {
        let (store, out, stop) = (store.clone(), out.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut out = out;
            es_diesel::cli::tail(&store, 10, false, Some(&stop), &mut out).unwrap();
        })
    };
    wait_for("tail to print the committed event", || {
        out.count("later-stream") == 1
    });
    w.commit();
    wait_for("tail to print the held event", || {
        out.count("held-stream") == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tail.join().unwrap();
    assert_eq!(out.count("later-stream"), 1);
    assert_eq!(out.count("held-stream"), 1);
}
