//! The in-memory cache of aggregates' states (`Aggregate::CACHE`): a command
//! on a cached aggregate decides without reading its stream, and yet never
//! decides on a state that fell behind the log: another node's appends,
//! a transaction held open across the decision, failed appends, panics,
//! eviction, and many writers at once.

use es_diesel::testing::TestDatabase;
use es_diesel::{
    Aggregate, Backend, Cache, Error, Event, EventStore, ExecuteError, ExecuteOptions,
    ExpectedVersion, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct SeatTaken {
    by: String,
    /// Not stored: a state folded from the log never sees it.
    #[serde(skip)]
    note: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct SeatFreed {
    by: String,
}

#[derive(Event, Debug, Clone, PartialEq)]
enum SeatEvent {
    Taken(SeatTaken),
    Freed(SeatFreed),
}

#[derive(Debug, Clone)]
enum SeatCommand {
    /// Refused while someone holds the seat.
    Take(String),
    /// Refused unless this user holds the seat.
    Free(String),
    /// Takes the seat for this user unless they already hold it (then
    /// decides nothing); refused while someone else holds it.
    Ensure(String),
    /// The command handler panics.
    Panic,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum Refused {
    #[error("the seat is held by {0}")]
    Held(String),
    #[error("{0} does not hold the seat")]
    NotHolder(String),
}

thread_local! {
    /// `apply` calls on this thread: a load folds every event of the
    /// stream, a cached state only the new ones.
    static APPLIED: Cell<u64> = const { Cell::new(0) };
}

fn applied() -> u64 {
    APPLIED.with(Cell::get)
}

#[derive(Default, Debug, Clone, PartialEq)]
struct Seat {
    holder: Option<String>,
    notes: Vec<String>,
}

impl Aggregate for Seat {
    const TYPE: &'static str = "seat";
    type Event = SeatEvent;
    type Command = SeatCommand;
    type Error = Refused;
    const CACHE: Option<Cache<Self>> = Some(Cache::entries(2));

    fn apply(&mut self, event: &SeatEvent) {
        APPLIED.with(|a| a.set(a.get() + 1));
        match event {
            SeatEvent::Taken(e) => {
                self.holder = Some(e.by.clone());
                self.notes.push(e.note.clone());
            }
            SeatEvent::Freed(_) => self.holder = None,
        }
    }

    fn handle(&self, command: SeatCommand) -> Result<Vec<SeatEvent>, Refused> {
        let take = |by: String| {
            vec![SeatTaken {
                by,
                note: "made by the command".into(),
            }
            .into()]
        };
        match (command, &self.holder) {
            (SeatCommand::Take(_), Some(holder)) => Err(Refused::Held(holder.clone())),
            (SeatCommand::Take(by), None) => Ok(take(by)),
            (SeatCommand::Free(by), Some(holder)) if *holder == by => {
                Ok(vec![SeatFreed { by }.into()])
            }
            (SeatCommand::Free(by), _) => Err(Refused::NotHolder(by)),
            (SeatCommand::Ensure(by), Some(holder)) if *holder == by => Ok(vec![]),
            (SeatCommand::Ensure(_), Some(holder)) => Err(Refused::Held(holder.clone())),
            (SeatCommand::Ensure(by), None) => Ok(take(by)),
            (SeatCommand::Panic, _) => panic!("the handler panics"),
        }
    }
}

fn take(by: &str) -> SeatCommand {
    SeatCommand::Take(by.into())
}

fn free(by: &str) -> SeatCommand {
    SeatCommand::Free(by.into())
}

fn ensure(by: &str) -> SeatCommand {
    SeatCommand::Ensure(by.into())
}

type Outcome = Result<Vec<(String, String)>, ExecuteError<Refused>>;

/// Runs `command`, returning the events it appended (as `(type, by)`) and
/// how many `apply` calls it made on this thread.
fn run(store: &EventStore, seat: &str, command: SeatCommand) -> (Outcome, u64) {
    let before = applied();
    let result = store.execute::<Seat>(seat, command).map(|done| {
        done.events
            .iter()
            .map(|e| match &e.event {
                SeatEvent::Taken(t) => ("taken".to_owned(), t.by.clone()),
                SeatEvent::Freed(f) => ("freed".to_owned(), f.by.clone()),
            })
            .collect()
    });
    (result, applied() - before)
}

/// The stream as `(type, by)` pairs, in order.
fn log(store: &EventStore, seat: &str) -> Vec<(String, String)> {
    store
        .load_stream::<SeatEvent>(&Seat::stream_id(seat))
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r.stream_version, i as i64 + 1);
            match &r.event {
                SeatEvent::Taken(t) => ("taken".to_owned(), t.by.clone()),
                SeatEvent::Freed(f) => ("freed".to_owned(), f.by.clone()),
            }
        })
        .collect()
}

fn ev(kind: &str, by: &str) -> (String, String) {
    (kind.to_owned(), by.to_owned())
}

fn refused(result: Outcome) -> Refused {
    match result {
        Err(ExecuteError::Domain(refused)) => refused,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_cached_state_decides_without_reading_the_stream() {
    for db in TestDatabase::all() {
        let store = db.store();
        let (first, folded) = run(&store, "s1", take("ann"));
        assert_eq!(first.unwrap(), [ev("taken", "ann")]);
        // The stream was empty; the new event was folded once.
        assert_eq!(folded, 1, "{}", db.backend());
        for _ in 0..5 {
            run(&store, "s1", free("ann")).0.unwrap();
            let (done, folded) = run(&store, "s1", take("ann"));
            done.unwrap();
            assert_eq!(folded, 1, "a cache hit folds only the new event");
        }
        assert_eq!(log(&store, "s1").len(), 11);

        // Without the cache every command folds the whole stream.
        let uncached = EventStore::open_with(
            db.url(),
            StoreOptions {
                cache_aggregates: false,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let (done, folded) = run(&uncached, "s1", free("ann"));
        done.unwrap();
        assert_eq!(folded, 11 + 1);
        let (done, folded) = run(&uncached, "s1", take("bob"));
        done.unwrap();
        assert_eq!(folded, 12 + 1);
    }
}

#[test]
fn another_node_s_appends_are_never_decided_past() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let (node_a, node_b) = (db.store(), db.store());
        run(&node_a, "s", take("ann")).0.unwrap(); // v1; A caches it
        run(&node_b, "s", free("ann")).0.unwrap(); // v2; B caches it

        // A's cached state says ann holds the seat; the stream says it is
        // free. The refusal is checked against the stream, and the command
        // decided again on it.
        let (done, _) = run(&node_a, "s", take("bob"));
        assert_eq!(done.unwrap(), [ev("taken", "bob")], "{backend}");

        // B's cached state says the seat is free: its append expects
        // version 2, loses to A's, and the command is decided again on
        // the stream, even with no retries allowed (a state that fell
        // behind is not a lost race of this command).
        let refusal = node_b.execute_with::<Seat>(
            "s",
            take("carl"),
            &ExecuteOptions::default().max_retries(0),
        );
        match refusal {
            Err(ExecuteError::Domain(Refused::Held(holder))) => assert_eq!(holder, "bob"),
            other => panic!("{backend}: expected the seat held by bob, got {other:?}"),
        }

        // B now holds the stream's state; A still holds its own append's.
        run(&node_a, "s", free("bob")).0.unwrap(); // v4
                                                   // B's cached state says bob holds it, so `Ensure(bob)` would decide
                                                   // nothing: that too is checked, and bob takes the seat again.
        let (done, _) = run(&node_b, "s", ensure("bob"));
        assert_eq!(done.unwrap(), [ev("taken", "bob")], "{backend}");
        // And now it does decide nothing, on either node.
        assert_eq!(run(&node_b, "s", ensure("bob")).0.unwrap(), []);
        assert_eq!(run(&node_a, "s", ensure("bob")).0.unwrap(), []);

        assert_eq!(
            log(&node_a, "s"),
            [
                ev("taken", "ann"),
                ev("freed", "ann"),
                ev("taken", "bob"),
                ev("freed", "bob"),
                ev("taken", "bob"),
            ],
            "{backend}"
        );
    }
}

/// What an append in another connection's transaction does to a node's
/// cached state, while the transaction is open and after it commits.
#[test]
fn a_transaction_held_open_is_seen_once_it_commits() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let node = db.store();
        run(&node, "s", take("ann")).0.unwrap(); // v1, cached

        // Another writer frees the seat in a transaction it holds open.
        let writer = HeldAppend::start(&node, "s", 1, SeatFreed { by: "ann".into() });
        // Not committed: the refusal, checked against the stream, stands.
        assert_eq!(
            refused(run(&node, "s", take("bob")).0),
            Refused::Held("ann".into()),
            "{backend}"
        );
        writer.commit();
        // Committed: the cached refusal is checked and overturned.
        assert_eq!(
            run(&node, "s", take("bob")).0.unwrap(),
            [ev("taken", "bob")],
            "{backend}"
        );

        // The cache says bob holds the seat (v3). Another writer appends
        // bob's release and then carl's take (v5), and holds the
        // transaction open while the node frees the seat for bob: the
        // node's append expects v3 and waits for (or loses to) the
        // writer, and the command is decided again once it committed.
        let writer = HeldAppend::start_many(
            &node,
            "s",
            3,
            vec![
                SeatFreed { by: "bob".into() }.into(),
                SeatTaken {
                    by: "carl".into(),
                    note: String::new(),
                }
                .into(),
            ],
        );
        let racer = {
            let node = node.clone();
            std::thread::spawn(move || run(&node, "s", free("bob")).0)
        };
        wait_for_a_blocked_writer(&db, &racer);
        writer.commit();
        let outcome = racer.join().unwrap();
        assert_eq!(
            refused(outcome),
            Refused::NotHolder("bob".into()),
            "{backend}"
        );
        assert_eq!(
            log(&node, "s"),
            [
                ev("taken", "ann"),
                ev("freed", "ann"),
                ev("taken", "bob"),
                ev("freed", "bob"),
                ev("taken", "carl"),
            ],
            "{backend}"
        );
    }
}

/// An append held open on another connection until [`HeldAppend::commit`].
struct HeldAppend {
    commit: mpsc::Sender<()>,
    done: std::thread::JoinHandle<()>,
}

impl HeldAppend {
    fn start(store: &EventStore, seat: &str, after: i64, event: impl Into<SeatEvent>) -> Self {
        Self::start_many(store, seat, after, vec![event.into()])
    }

    fn start_many(store: &EventStore, seat: &str, after: i64, events: Vec<SeatEvent>) -> Self {
        let (appended_tx, appended) = mpsc::channel();
        let (commit, commit_rx) = mpsc::channel::<()>();
        let store = store.clone();
        let stream = Seat::stream_id(seat);
        let done = std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            es_diesel::write_transaction(&mut conn, |c| -> Result<(), Error> {
                let mut write = StreamWrite::new(stream.as_str(), ExpectedVersion::Exact(after));
                for event in &events {
                    write.push(event)?;
                }
                es_diesel::append_in(c, std::slice::from_ref(&write))?;
                appended_tx.send(()).unwrap();
                commit_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        });
        appended
            .recv_timeout(Duration::from_secs(30))
            .expect("the held append did not happen");
        HeldAppend { commit, done }
    }

    fn commit(self) {
        self.commit.send(()).unwrap();
        self.done.join().unwrap();
    }
}

/// Waits (up to 30 s) until a session of the server waits for a lock, or
/// the racing thread is done. SQLite has no such view: its writers wait in
/// the process's writer queue, and the outcome does not depend on whether
/// the racer got there before the commit.
fn wait_for_a_blocked_writer<T>(db: &TestDatabase, racer: &std::thread::JoinHandle<T>) {
    use diesel::prelude::*;
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let sql = match db.backend() {
        Backend::Sqlite => return,
        Backend::Postgres => {
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND datname = current_database()"
        }
        Backend::Mysql => {
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.innodb_trx \
             WHERE trx_state = 'LOCK WAIT'"
        }
    };
    let store = EventStore::open(db.url()).unwrap();
    let mut conn = store.connection().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = diesel::sql_query(sql)
            .get_result::<Count>(&mut *conn)
            .map(|c| c.n)
            .unwrap_or(0);
        if waiting > 0 || racer.is_finished() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no writer came to wait for the lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn what_is_cached_is_the_state_a_load_reads() {
    for db in TestDatabase::all() {
        let store = db.store();
        let done = store.execute::<Seat>("s", take("ann")).unwrap();
        // The note is not stored: the state folds the event as stored.
        assert_eq!(done.state.notes, [String::new()]);
        assert_eq!(done.events[0].event, {
            SeatEvent::from(SeatTaken {
                by: "ann".into(),
                note: "made by the command".into(),
            })
        });
        let loaded = store.load_aggregate::<Seat>("s").unwrap();
        assert_eq!(loaded.state, done.state);
        assert_eq!(loaded.version, done.version);
        // A refusal and a command that decides nothing hand back the
        // cached state, and a later command still decides on it.
        refused(run(&store, "s", take("bob")).0);
        let unchanged = store.execute::<Seat>("s", ensure("ann")).unwrap();
        assert_eq!((unchanged.version, &unchanged.state), (1, &loaded.state));
        let (done, folded) = run(&store, "s", free("ann"));
        assert_eq!(done.unwrap(), [ev("freed", "ann")]);
        assert_eq!(folded, 1);
    }
}

#[test]
fn a_failed_append_or_a_panic_leaves_no_state_behind() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        run(&store, "s", take("ann")).0.unwrap();
        run(&store, "s", free("ann")).0.unwrap();

        // The event cannot be encoded (a NUL character): nothing is
        // written, and the state that decided it is not kept as if it were.
        match run(&store, "s", take("a\0b")).0 {
            Err(ExecuteError::Store(Error::Encode(_))) => {}
            other => panic!("{backend}: expected an encoding error, got {other:?}"),
        }
        let (done, folded) = run(&store, "s", take("bob"));
        assert_eq!(done.unwrap(), [ev("taken", "bob")], "{backend}");
        assert_eq!(folded, 2 + 1, "{backend}: the stream was loaded again");

        // The handler panics on the cached state: the panic reaches the
        // caller, and the next command loads the stream.
        let store2 = store.clone();
        let panicked = std::thread::spawn(move || run(&store2, "s", SeatCommand::Panic)).join();
        assert!(panicked.is_err());
        let (done, folded) = run(&store, "s", free("bob"));
        assert_eq!(done.unwrap(), [ev("freed", "bob")], "{backend}");
        assert_eq!(folded, 3 + 1, "{backend}");
        assert_eq!(log(&store, "s").len(), 4);
    }
}

#[test]
fn the_least_recently_used_state_is_evicted_and_clearing_forgets_all() {
    let db = TestDatabase::sqlite();
    let store = db.store();
    for seat in ["a", "b", "c"] {
        run(&store, seat, take("ann")).0.unwrap();
        run(&store, seat, free("ann")).0.unwrap();
    }
    // Seat keeps 2 states: "a" went first.
    assert_eq!(run(&store, "b", take("ann")).1, 1);
    assert_eq!(run(&store, "a", take("ann")).1, 2 + 1);
    // "c" was used least recently now.
    assert_eq!(run(&store, "c", take("ann")).1, 2 + 1);
    assert_eq!(run(&store, "a", free("ann")).1, 1);

    // Clones share one cache, and clearing it forgets every state.
    let clone = store.clone();
    assert_eq!(run(&clone, "a", take("ann")).1, 1);
    clone.clear_aggregate_cache();
    assert_eq!(run(&store, "a", free("ann")).1, 5 + 1);
}

/// Two nodes, four threads each, taking and freeing two seats at random:
/// every decision on a state that fell behind would show in the log as a
/// seat taken twice or freed by someone who did not hold it.
#[test]
fn many_writers_on_two_nodes_keep_every_rule() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let nodes = [db.store(), db.store()];
        let mut threads = Vec::new();
        for t in 0..8u64 {
            let node = nodes[t as usize % 2].clone();
            threads.push(std::thread::spawn(move || {
                let user = format!("u{t}");
                let mut seed = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut appended = 0;
                for _ in 0..40 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let seat = if seed % 2 == 0 { "x" } else { "y" };
                    let command = if seed % 3 == 0 {
                        free(&user)
                    } else {
                        take(&user)
                    };
                    match node.execute::<Seat>(seat, command) {
                        Ok(done) => appended += done.events.len(),
                        Err(ExecuteError::Domain(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                appended
            }));
        }
        let appended: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let mut total = 0;
        for seat in ["x", "y"] {
            let mut holder: Option<String> = None;
            let events = log(&nodes[0], seat);
            total += events.len();
            for (kind, by) in events {
                match (kind.as_str(), &holder) {
                    ("taken", None) => holder = Some(by),
                    ("freed", Some(h)) if *h == by => holder = None,
                    _ => panic!("{backend}: {kind} by {by} while held by {holder:?}"),
                }
            }
        }
        assert_eq!(total, appended, "{backend}");
        assert!(appended > 10, "{backend}: only {appended} events");
    }
}
