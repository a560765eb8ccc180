//! Asynchronous projection runners: no event skipped, none applied twice,
//! one active runner per projection, failures stop at their event.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use es_diesel::runner::{AsyncProjection, ProjectionStatus, Runner, RunnerOptions, Step};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, write_transaction, Backend, DbConnection, Error, Event, EventStore, ExpectedVersion,
    RecordedEvent, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: u32,
}

/// Counts events per stream and records every application once: a second
/// application of the same event violates `applied`'s primary key.
struct Counter {
    name: String,
    /// Fails on the tick with this number until `fixed`.
    poison: Option<u32>,
    /// Whether the poison panics rather than returning an error.
    panics: bool,
    /// How long each event takes to apply.
    delay: Duration,
    fixed: AtomicBool,
}

impl Counter {
    fn with(name: &str, poison: Option<u32>, panics: bool, delay: Duration) -> Arc<Self> {
        Arc::new(Counter {
            name: name.into(),
            poison,
            panics,
            delay,
            fixed: AtomicBool::new(false),
        })
    }

    fn new(name: &str) -> Arc<Self> {
        Self::with(name, None, false, Duration::ZERO)
    }

    fn poisoned(name: &str, n: u32) -> Arc<Self> {
        Self::with(name, Some(n), false, Duration::ZERO)
    }

    fn panicking(name: &str, n: u32) -> Arc<Self> {
        Self::with(name, Some(n), true, Duration::ZERO)
    }

    fn slow(name: &str, delay: Duration) -> Arc<Self> {
        Self::with(name, None, false, delay)
    }

    fn create_tables(&self, store: &EventStore) {
        let n = &self.name;
        store
            .connection()
            .unwrap()
            .batch_execute(&format!(
                "CREATE TABLE {n}_counts (stream_id VARCHAR(255) PRIMARY KEY, n BIGINT NOT NULL, last_version BIGINT NOT NULL);
                 CREATE TABLE {n}_applied (global_position BIGINT PRIMARY KEY, node TEXT)"
            ))
            .unwrap();
    }
}

impl AsyncProjection for Counter {
    fn name(&self) -> &str {
        &self.name
    }

    fn event_types(&self) -> Option<Vec<&'static str>> {
        Some(vec!["Tick"])
    }

    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> es_diesel::Result<()> {
        let tick = event.decode::<Tick>().map_err(|e| Error::Malformed {
            position: event.global_position,
            reason: e.to_string(),
        })?;
        std::thread::sleep(self.delay);
        let (p1, p2, p3) = match conn.backend() {
            Backend::Postgres => ("$1", "$2", "$3"),
            Backend::Sqlite | Backend::Mysql => ("?", "?", "?"),
        };
        let n = &self.name;
        if Some(tick.n) == self.poison && !self.fixed.load(Ordering::SeqCst) {
            if self.panics {
                // Written in a transaction of its own that the panic leaves
                // open: none of it may survive.
                conn.transaction(|c| -> QueryResult<()> {
                    diesel::sql_query(format!(
                        "INSERT INTO {n}_applied (global_position) VALUES ({p1})"
                    ))
                    .bind::<BigInt, _>(event.global_position)
                    .execute(c)?;
                    panic!("tick {} blew up", tick.n)
                })?;
            }
            return Err(Error::Malformed {
                position: event.global_position,
                reason: format!("poison tick {}", tick.n),
            });
        }
        diesel::sql_query(format!(
            "INSERT INTO {n}_applied (global_position) VALUES ({p1})"
        ))
        .bind::<BigInt, _>(event.global_position)
        .execute(conn)?;
        let on_conflict = match conn.backend() {
            Backend::Mysql => "ON DUPLICATE KEY UPDATE".to_owned(),
            _ => "ON CONFLICT (stream_id) DO UPDATE SET".to_owned(),
        };
        diesel::sql_query(format!(
            "INSERT INTO {n}_counts (stream_id, n, last_version) VALUES ({p1}, 1, {p2}) \
             {on_conflict} n = {n}_counts.n + 1, last_version = {p3}"
        ))
        .bind::<Text, _>(&event.stream_id)
        .bind::<BigInt, _>(event.stream_version)
        .bind::<BigInt, _>(event.stream_version)
        .execute(conn)?;
        Ok(())
    }
}

#[derive(QueryableByName, Debug, PartialEq)]
struct CountRow {
    #[diesel(sql_type = Text)]
    stream_id: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = BigInt)]
    last_version: i64,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn applied(store: &EventStore, name: &str) -> i64 {
    diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {name}_applied"))
        .get_result::<N>(&mut *store.connection().unwrap())
        .unwrap()
        .n
}

/// The read model must equal a fold of the log: per stream, as many events as
/// its version, and the last version seen is the stream's version.
fn assert_equals_fold(store: &EventStore, name: &str) {
    let mut conn = store.connection().unwrap();
    let counts = diesel::sql_query(format!(
        "SELECT stream_id, n, last_version FROM {name}_counts ORDER BY stream_id"
    ))
    .load::<CountRow>(&mut *conn)
    .unwrap();
    let mut expected = std::collections::BTreeMap::<String, i64>::new();
    for e in store.iter_types(&["Tick"], 0, 1000) {
        let e = e.unwrap();
        *expected.entry(e.stream_id).or_default() += 1;
    }
    let got: std::collections::BTreeMap<String, i64> =
        counts.iter().map(|c| (c.stream_id.clone(), c.n)).collect();
    assert_eq!(got, expected);
    for c in counts {
        assert_eq!(
            c.n, c.last_version,
            "stream {} applied in order, none skipped",
            c.stream_id
        );
    }
    let total: i64 = expected.values().sum();
    assert_eq!(
        applied(store, name),
        total,
        "every event applied exactly once"
    );
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn options(node: &str) -> RunnerOptions {
    RunnerOptions {
        batch_size: 100,
        idle_poll: Duration::from_millis(20),
        lease: Duration::from_millis(800),
        max_backoff: Duration::from_millis(200),
        node: node.into(),
    }
}

#[test]
fn a_runner_follows_the_log_from_its_checkpoint() {
    for db in TestDatabase::all() {
        let store = db.store();
        let counter = Counter::new("follow");
        counter.create_tables(&store);
        for n in 0..120 {
            store
                .append(&format!("s-{}", n % 5), ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        let handle = Runner::new(store.clone(), counter.clone(), options("one")).spawn();
        wait_until("catch-up", Duration::from_secs(30), || {
            applied(&store, "follow") == 120
        });
        for n in 120..150 {
            store
                .append(&format!("s-{}", n % 5), ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        wait_until("new events", Duration::from_secs(30), || {
            applied(&store, "follow") == 150
        });
        let status = store.projection_status().unwrap();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].name, "follow");
        assert_eq!(
            status[0].checkpoint.position,
            store.head().unwrap(),
            "{}",
            db.backend()
        );
        assert_eq!((status[0].lag, status[0].state.as_str()), (0, "running"));
        assert_eq!(status[0].holder.as_deref(), Some("one"));
        handle.stop();
        let status = store.projection_status().unwrap();
        assert_eq!(
            (status[0].state.as_str(), status[0].holder.clone()),
            ("stopped", None)
        );
        assert_equals_fold(&store, "follow");

        // A new runner continues from the checkpoint, not from the start.
        store
            .append("s-0", ExpectedVersion::Any, [Tick { n: 999 }])
            .unwrap();
        let mut again = Runner::new(store.clone(), counter.clone(), options("two"));
        wait_until("the new event", Duration::from_secs(30), || {
            again.step().unwrap();
            applied(&store, "follow") == 151
        });
        assert_equals_fold(&store, "follow");
    }
}

/// 8 writers with random delays inside their transactions and random
/// rollbacks, while the runner runs.
#[test]
fn concurrent_writers_with_rollbacks_never_make_the_runner_skip() {
    for db in TestDatabase::all() {
        let per_writer: u32 = if db.backend() == Backend::Postgres {
            2_500
        } else {
            400
        };
        let store = db.store();
        let counter = Counter::new("busy");
        counter.create_tables(&store);
        let handle = Runner::new(store.clone(), counter.clone(), options("busy")).spawn();
        let writers: Vec<_> = (0..8u32)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
                    let mut next = move || {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed
                    };
                    let mut committed = 0;
                    for i in 0..per_writer {
                        let r = next();
                        let mut conn = store.connection().unwrap();
                        let res = write_transaction(&mut conn, |c| -> Result<(), Error> {
                            let mut write =
                                StreamWrite::new(format!("w{w}-{}", r % 13), ExpectedVersion::Any);
                            write.push(&Tick { n: w * 100_000 + i })?;
                            append_in(c, &[write])?;
                            if r % 4 == 0 {
                                std::thread::sleep(Duration::from_micros(r % 1500));
                            }
                            if r % 10 == 3 {
                                return Err(Error::Malformed {
                                    position: 0,
                                    reason: "rolled back on purpose".into(),
                                });
                            }
                            Ok(())
                        });
                        if res.is_ok() {
                            committed += 1;
                        }
                    }
                    committed
                })
            })
            .collect();
        let committed: i64 = writers.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(store.iter_all(0, 5000).count() as i64, committed);
        wait_until("the runner to catch up", Duration::from_secs(120), || {
            applied(&store, "busy") == committed
        });
        handle.stop();
        assert_equals_fold(&store, "busy");
    }
}

/// Writer A holds position n open while B commits n + 1: the runner waits for
/// A, then applies both, in order.
#[test]
fn the_runner_waits_for_an_out_of_order_commit() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let counter = Counter::new("ooo");
    counter.create_tables(&store);
    let mut runner = Runner::new(store.clone(), counter.clone(), options("ooo"));
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let a = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                let mut w = StreamWrite::new("ooo", ExpectedVersion::NoStream);
                w.push(&Tick { n: 1 })?;
                append_in(c, &[w])?;
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        })
    };
    held_rx.recv().unwrap();
    store
        .append("other", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    assert_eq!(
        runner.step().unwrap(),
        Step::Applied(0),
        "B must wait for A"
    );
    assert_eq!(applied(&store, "ooo"), 0);
    release_tx.send(()).unwrap();
    a.join().unwrap();
    wait_until("both events", Duration::from_secs(30), || {
        runner.step().unwrap();
        applied(&store, "ooo") == 2
    });
    let order: Vec<i64> =
        diesel::sql_query("SELECT global_position AS n FROM ooo_applied ORDER BY global_position")
            .load::<N>(&mut *store.connection().unwrap())
            .unwrap()
            .into_iter()
            .map(|r| r.n)
            .collect();
    assert_eq!(order.len(), 2);
    assert_equals_fold(&store, "ooo");
}

#[test]
fn only_one_runner_is_active_and_another_takes_over_when_it_dies() {
    for db in TestDatabase::all() {
        let store = db.store();
        // A second store is a second node: its own pool and connections.
        let other_node = EventStore::open(db.url()).unwrap();
        let counter = Counter::new("single");
        counter.create_tables(&store);
        for n in 0..50 {
            store
                .append("s", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        // A lease long enough that a loaded machine does not let it lapse
        // between two steps of the first runner.
        let leased = |node: &str| RunnerOptions {
            lease: Duration::from_secs(2),
            ..options(node)
        };
        let mut first = Runner::new(store.clone(), counter.clone(), leased("first"));
        let mut second = Runner::new(other_node.clone(), counter.clone(), leased("second"));
        // On PostgreSQL, transactions of other tests may hold the horizon back
        // for a moment, so a step may see part of the log only.
        wait_until("the first runner", Duration::from_secs(30), || {
            assert_ne!(first.step().unwrap(), Step::Standby);
            applied(&store, "single") == 50
        });
        assert_eq!(
            second.step().unwrap(),
            Step::Standby,
            "{}: the first holds the lease",
            db.backend()
        );
        for n in 50..80 {
            store
                .append("s", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        assert_eq!(second.step().unwrap(), Step::Standby);
        // The first dies without releasing its lease (a killed process).
        std::mem::forget(first);
        let started = Instant::now();
        wait_until("takeover", Duration::from_secs(10), || {
            second.step().unwrap();
            applied(&store, "single") == 80
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "taken over within the lease"
        );
        let status = store.projection_status().unwrap();
        assert_eq!(status[0].holder.as_deref(), Some("second"));
        assert_equals_fold(&store, "single");

        // Two runners in threads at once: all applications still exactly once.
        let a = Runner::new(store.clone(), counter.clone(), options("a")).spawn();
        let b = Runner::new(other_node.clone(), counter.clone(), options("b")).spawn();
        drop(second);
        for n in 80..200 {
            store
                .append(&format!("s-{}", n % 3), ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        wait_until("both runners' work", Duration::from_secs(30), || {
            applied(&store, "single") == 200
        });
        a.stop();
        b.stop();
        assert_equals_fold(&store, "single");
    }
}

#[test]
fn a_poison_event_stops_its_projection_at_its_position_until_fixed() {
    for db in TestDatabase::all() {
        let store = db.store();
        let poisoned = Counter::poisoned("poisoned", 7);
        let healthy = Counter::new("healthy");
        poisoned.create_tables(&store);
        healthy.create_tables(&store);
        let mut poison_position = 0;
        for n in 0..20 {
            let rec = store
                .append("s", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
            if n == 7 {
                poison_position = rec[0].global_position;
            }
        }
        let mut sick = Runner::new(store.clone(), poisoned.clone(), options("sick"));
        let mut well = Runner::new(store.clone(), healthy.clone(), options("well"));
        let mut stopped_at = None;
        wait_until("the poison", Duration::from_secs(30), || {
            if let Step::Failed { position } = sick.step().unwrap() {
                stopped_at = Some(position);
            }
            stopped_at.is_some()
        });
        assert_eq!(stopped_at, Some(poison_position));
        wait_until(
            "other projections continue",
            Duration::from_secs(30),
            || {
                well.step().unwrap();
                applied(&store, "healthy") == 20
            },
        );
        assert_eq!(
            applied(&store, "poisoned"),
            7,
            "the events before the poison are kept"
        );
        let status = store.projection_status().unwrap();
        let s = status.iter().find(|s| s.name == "poisoned").unwrap();
        assert_eq!(
            (s.state.as_str(), s.failed_position),
            ("failed", Some(poison_position)),
            "{}",
            db.backend()
        );
        assert!(
            s.last_error.as_deref().unwrap().contains("poison tick 7"),
            "{:?}",
            s.last_error
        );
        assert_eq!(s.checkpoint.position, poison_position - 1);
        assert_eq!(
            sick.step().unwrap(),
            Step::Failed {
                position: poison_position
            },
            "still stopped"
        );

        poisoned.fixed.store(true, Ordering::SeqCst);
        wait_until("recovery", Duration::from_secs(30), || {
            assert!(matches!(sick.step().unwrap(), Step::Applied(_)));
            applied(&store, "poisoned") == 20
        });
        let status = store.projection_status().unwrap();
        let s = status.iter().find(|s| s.name == "poisoned").unwrap();
        assert_eq!(
            (s.state.as_str(), s.failed_position, s.last_error.clone()),
            ("running", None, None)
        );
        assert_equals_fold(&store, "poisoned");
        assert_equals_fold(&store, "healthy");
    }
}

fn status_of(store: &EventStore, name: &str) -> ProjectionStatus {
    try_status_of(store, name).unwrap_or_else(|| panic!("no status for {name}"))
}

/// `None` until a runner has started the projection.
fn try_status_of(store: &EventStore, name: &str) -> Option<ProjectionStatus> {
    store
        .projection_status()
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
}

/// Two nodes and a projector slower than the lease per batch: the active
/// runner keeps its lease while it works, so the other never steals it
/// mid-batch, and status never shows a working runner as stale.
#[test]
fn two_runners_with_a_slow_projector_keep_making_progress() {
    const EVENTS: u32 = 1_200;
    const PER_EVENT: Duration = Duration::from_millis(15);
    for db in TestDatabase::all() {
        let store = db.store();
        let other_node = EventStore::open(db.url()).unwrap();
        let counter = Counter::slow("slow", PER_EVENT);
        counter.create_tables(&store);
        for n in 0..EVENTS {
            store
                .append(&format!("s-{}", n % 7), ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        // A full batch (500 events, 7.5 s) takes several leases.
        let slow_options = |node: &str| RunnerOptions {
            batch_size: 500,
            lease: Duration::from_secs(2),
            ..options(node)
        };
        let started = Instant::now();
        let a = Runner::new(store.clone(), counter.clone(), slow_options("a")).spawn();
        let b = Runner::new(other_node.clone(), counter.clone(), slow_options("b")).spawn();
        // One runner alone needs EVENTS * PER_EVENT; allow three times that.
        let deadline = PER_EVENT * EVENTS * 3;
        let mut stale = Vec::new();
        wait_until("both runners' work", deadline, || {
            if let Some(s) = try_status_of(&store, "slow") {
                if s.state == "stale" || s.lease_expired {
                    stale.push((started.elapsed(), s.state, s.holder, s.checkpoint.position));
                }
            }
            applied(&store, "slow") == i64::from(EVENTS)
        });
        assert!(
            stale.is_empty(),
            "{}: a working runner's lease ran out: {stale:?}",
            db.backend()
        );
        drop((a, b));
        assert_equals_fold(&store, "slow");
    }
}

/// A projector that panics stops its projection at that event, like an
/// error, and the runner thread lives on, retrying until it is fixed.
#[test]
fn a_panicking_projector_fails_at_its_event_and_resumes_after_a_fix() {
    for db in TestDatabase::all() {
        let store = db.store();
        let counter = Counter::panicking("panicky", 7);
        counter.create_tables(&store);
        let mut poison_position = 0;
        for n in 0..20 {
            let rec = store
                .append("s", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
            if n == 7 {
                poison_position = rec[0].global_position;
            }
        }
        let handle = Runner::new(store.clone(), counter.clone(), options("p")).spawn();
        wait_until("the failure in status", Duration::from_secs(30), || {
            try_status_of(&store, "panicky").is_some_and(|s| s.state == "failed")
        });
        let s = status_of(&store, "panicky");
        assert_eq!(s.failed_position, Some(poison_position), "{}", db.backend());
        let error = s.last_error.unwrap();
        assert!(
            error.contains("projector `panicky`")
                && error.contains(&format!("global position {poison_position}"))
                && error.contains("panicked: tick 7 blew up"),
            "{error}"
        );
        assert_eq!(s.checkpoint.position, poison_position - 1);
        assert_eq!(
            applied(&store, "panicky"),
            7,
            "the events before the panic are kept, nothing of the panicking one"
        );
        assert!(handle.is_running(), "the runner thread survives the panic");

        counter.fixed.store(true, Ordering::SeqCst);
        wait_until("recovery", Duration::from_secs(30), || {
            applied(&store, "panicky") == 20
        });
        wait_until("the status to clear", Duration::from_secs(30), || {
            let s = status_of(&store, "panicky");
            (s.state.as_str(), s.failed_position, s.last_error) == ("running", None, None)
        });
        handle.stop();
        assert_equals_fold(&store, "panicky");
    }
}

/// A row the store cannot read is a store error: recorded in status with
/// its position instead of being retried in silence.
#[test]
fn a_store_error_in_the_runner_is_recorded_in_status() {
    for db in TestDatabase::all() {
        let store = db.store();
        let counter = Counter::new("unreadable");
        counter.create_tables(&store);
        for n in 0..5 {
            store
                .append("s", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        let created = match db.backend() {
            Backend::Sqlite | Backend::Mysql => "'2024-01-01 00:00:00'",
            Backend::Postgres => "now()",
        };
        let mut conn = store.connection().unwrap();
        conn.batch_execute(&format!(
            "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata, created_at) \
             VALUES ('{}', 'bad', 1, 'Tick', 1, '{{\"n\": 99}}', '[\"not an object\"]', {created})",
            uuid::Uuid::new_v4()
        ))
        .unwrap();
        drop(conn);
        let bad_position = store.head().unwrap();
        let mut runner = Runner::new(store.clone(), counter.clone(), options("r"));
        let mut error = None;
        wait_until("the unreadable row", Duration::from_secs(30), || {
            match runner.step() {
                Err(e) => error = Some(e),
                Ok(step) => assert!(matches!(step, Step::Applied(_)), "{step:?}"),
            }
            error.is_some()
        });
        let error = error.unwrap().to_string();
        assert!(
            error.contains(&format!("global position {bad_position}")),
            "{error}"
        );
        let s = status_of(&store, "unreadable");
        assert_eq!(
            (s.state.as_str(), s.failed_position),
            ("failed", Some(bad_position)),
            "{}",
            db.backend()
        );
        assert_eq!(
            (applied(&store, "unreadable"), s.checkpoint.position),
            (5, bad_position - 1),
            "the events before the unreadable row are applied"
        );
        assert!(
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("metadata")),
            "{:?}",
            s.last_error
        );
    }
}

/// A batch size of 0 still moves: taken as 1.
#[test]
fn a_batch_size_of_zero_applies_one_event_at_a_time() {
    for db in TestDatabase::all() {
        let store = db.store();
        let counter = Counter::new("zero");
        counter.create_tables(&store);
        for n in 0..3 {
            store
                .append("s", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        let mut runner = Runner::new(
            store.clone(),
            counter.clone(),
            RunnerOptions {
                batch_size: 0,
                ..options("zero")
            },
        );
        wait_until("the events", Duration::from_secs(30), || {
            let step = runner.step().unwrap();
            assert!(
                matches!(step, Step::Applied(0 | 1)),
                "{}: {step:?}",
                db.backend()
            );
            applied(&store, "zero") == 3
        });
        assert_equals_fold(&store, "zero");
    }
}

/// A runner that dies without releasing its lease shows as stale once the
/// lease runs out, until another runner takes over.
#[test]
fn a_dead_runner_shows_as_stale_until_another_takes_over() {
    for db in TestDatabase::all() {
        let store = db.store();
        let counter = Counter::new("dead");
        counter.create_tables(&store);
        store
            .append("s", ExpectedVersion::Any, [Tick { n: 1 }])
            .unwrap();
        let mut first = Runner::new(store.clone(), counter.clone(), options("first"));
        wait_until("the first runner", Duration::from_secs(30), || {
            first.step().unwrap();
            applied(&store, "dead") == 1
        });
        let s = status_of(&store, "dead");
        assert_eq!(
            (s.state.as_str(), s.holder.as_deref(), s.lease_expired),
            ("running", Some("first"), false),
            "{}",
            db.backend()
        );
        assert!(s.lease_expires.is_some());
        std::mem::forget(first);
        wait_until("the stale status", Duration::from_secs(10), || {
            status_of(&store, "dead").state == "stale"
        });
        let s = status_of(&store, "dead");
        assert!(s.lease_expired);
        assert_eq!(s.holder.as_deref(), Some("first"));
        assert!(s.lease_expires.unwrap() <= chrono::Utc::now() + chrono::Duration::seconds(5));
        let mut out = Vec::new();
        es_diesel::cli::run(
            &store,
            es_diesel::cli::AdminCommand::Status { json: false },
            &mut out,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.lines().any(|l| l.starts_with("dead")
                && l.contains(" stale ")
                && l.contains("first (lease expired at ")),
            "{out}"
        );

        let mut second = Runner::new(store.clone(), counter.clone(), options("second"));
        assert_eq!(second.step().unwrap(), Step::Applied(0));
        let s = status_of(&store, "dead");
        assert_eq!(
            (s.state.as_str(), s.holder.as_deref(), s.lease_expired),
            ("running", Some("second"), false)
        );
    }
}

/// Dropping a runner or its handle, or shutting the handle down, releases
/// the lease: another runner takes over at once, not after the lease.
#[test]
fn runners_release_their_lease_on_drop_and_shutdown() {
    for db in TestDatabase::all() {
        let store = db.store();
        let other_node = EventStore::open(db.url()).unwrap();
        let counter = Counter::new("released");
        counter.create_tables(&store);
        let long_lease = |node: &str| RunnerOptions {
            lease: Duration::from_secs(600),
            ..options(node)
        };
        let assert_released = |how: &str| {
            let s = status_of(&store, "released");
            assert_eq!(
                (s.state.as_str(), s.holder.as_deref(), s.lease_expires),
                ("stopped", None, None),
                "{}: {how}",
                db.backend()
            );
            let mut next = Runner::new(other_node.clone(), counter.clone(), long_lease("next"));
            assert_eq!(next.step().unwrap(), Step::Applied(0), "{how}");
            drop(next);
        };

        let mut runner = Runner::new(store.clone(), counter.clone(), long_lease("r"));
        assert_eq!(runner.step().unwrap(), Step::Applied(0));
        drop(runner);
        assert_released("a dropped runner");

        let wait_for_holder = |holder: &str| {
            wait_until("the runner thread", Duration::from_secs(30), || {
                try_status_of(&store, "released")
                    .and_then(|s| s.holder)
                    .as_deref()
                    == Some(holder)
            })
        };
        let handle = Runner::new(store.clone(), counter.clone(), long_lease("h1")).spawn();
        wait_for_holder("h1");
        drop(handle);
        assert_released("a dropped handle");

        let mut handle = Runner::new(store.clone(), counter.clone(), long_lease("h2")).spawn();
        wait_for_holder("h2");
        handle.shutdown();
        assert!(!handle.is_running());
        assert_released("a handle shut down");
        handle.shutdown();
    }
}
