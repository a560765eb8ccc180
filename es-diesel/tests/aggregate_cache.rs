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
    /// Takes the seat if it is free, frees it for its holder otherwise:
    /// every decision appends, so a decision on a stale state shows in the
    /// log as a seat taken twice or freed for someone who did not hold it.
    Toggle(String),
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
    /// `handle` calls on this thread.
    static HANDLED: Cell<u64> = const { Cell::new(0) };
}

fn handled() -> u64 {
    HANDLED.with(Cell::get)
}

fn applied() -> u64 {
    APPLIED.with(Cell::get)
}

#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        HANDLED.with(|h| h.set(h.get() + 1));
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
            (SeatCommand::Toggle(by), None) => Ok(take(by)),
            (SeatCommand::Toggle(_), Some(holder)) => {
                Ok(vec![SeatFreed { by: holder.clone() }.into()])
            }
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
    let result = store
        .execute::<Seat>(seat, command)
        .map(|done| done.events.iter().map(|e| pair(&e.event)).collect());
    (result, applied() - before)
}

/// An event as `(type, by)`.
fn pair(event: &SeatEvent) -> (String, String) {
    match event {
        SeatEvent::Taken(t) => ev("taken", &t.by),
        SeatEvent::Freed(f) => ev("freed", &f.by),
    }
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
            pair(&r.event)
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
        let (node, tag) = tagged_store(&db);
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
        wait_for_a_blocked_writer(&db, &tag, &racer);
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

/// A store whose sessions can be told apart on the server: on PostgreSQL
/// they carry an application name of their own (other tests share the
/// database), on MySQL the test's database is its own.
fn tagged_store(db: &TestDatabase) -> (EventStore, String) {
    let tag = format!("es_cache_test_{}", uuid::Uuid::new_v4().simple());
    let url = match db.backend() {
        Backend::Postgres => {
            let sep = if db.url().contains('?') { '&' } else { '?' };
            format!("{}{sep}application_name={tag}", db.url())
        }
        _ => db.url().to_owned(),
    };
    let store = EventStore::open(&url).unwrap();
    store.migrate().unwrap();
    (store, tag)
}

/// Waits (up to 30 s) until a session of the tagged store waits for a lock
/// on the server, or the racing thread is done. SQLite has no such view:
/// its writers wait in the process's writer queue, and the outcome does not
/// depend on whether the racer got there before the commit.
fn wait_for_a_blocked_writer<T>(db: &TestDatabase, tag: &str, racer: &std::thread::JoinHandle<T>) {
    use diesel::prelude::*;
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let (sql, every) = match db.backend() {
        Backend::Sqlite => return,
        Backend::Postgres => (
            format!(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND application_name = '{tag}'"
            ),
            Duration::from_millis(5),
        ),
        // MariaDB refreshes its `innodb_trx` view at most every 100 ms.
        Backend::Mysql => (
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.innodb_trx t \
             JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
             WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()"
                .to_owned(),
            Duration::from_millis(200),
        ),
    };
    let store = EventStore::open(db.url()).unwrap();
    let mut conn = store.connection().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = diesel::sql_query(&sql)
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
        std::thread::sleep(every);
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

/// Two nodes, four threads each, toggling two seats at random: every
/// decision appends, and one decided on a state that fell behind would show
/// in the log as a seat taken twice or freed for someone who did not hold
/// it.
#[test]
fn many_writers_on_two_nodes_keep_every_rule() {
    const THREADS: u64 = 8;
    const COMMANDS: usize = 40;
    for db in TestDatabase::all() {
        let backend = db.backend();
        let nodes = [db.store(), db.store()];
        let mut threads = Vec::new();
        for t in 0..THREADS {
            let node = nodes[t as usize % 2].clone();
            threads.push(std::thread::spawn(move || {
                let user = format!("u{t}");
                let mut seed = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut appended = 0;
                for _ in 0..COMMANDS {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let seat = if seed % 2 == 0 { "x" } else { "y" };
                    // Every command appends, so four writers of a seat
                    // race all the time: let none give up.
                    let done = node
                        .execute_with::<Seat>(
                            seat,
                            SeatCommand::Toggle(user.clone()),
                            &ExecuteOptions::default().max_retries(10_000),
                        )
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(done.events.len(), 1);
                    appended += 1;
                }
                appended
            }));
        }
        let appended: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(appended, THREADS as usize * COMMANDS, "{backend}");
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
    }
}

/// Appends of this store other than commands (`append`, `append_if`,
/// `decide`, `import`) forget the streams' cached states: the next command
/// reads the stream at once instead of deciding on the state first.
#[test]
fn the_store_s_own_appends_forget_the_cached_state() {
    type Append = fn(&EventStore, i64, &str);
    let ways: [(&str, Append); 3] = [
        ("append", |store, version, by| {
            store
                .append(
                    &Seat::stream_id("s"),
                    ExpectedVersion::Exact(version),
                    [SeatEvent::from(SeatFreed { by: by.into() })],
                )
                .unwrap();
        }),
        ("append_if", |store, version, by| {
            let mut write = StreamWrite::new(Seat::stream_id("s"), ExpectedVersion::Exact(version));
            write
                .push(&SeatEvent::from(SeatFreed { by: by.into() }))
                .unwrap();
            // No DoorNoted is ever appended in this test's database.
            let condition =
                es_diesel::AppendCondition::none_match(es_diesel::Query::of::<DoorNoted>());
            store.append_if(&[write], &condition).unwrap();
        }),
        ("import", |store, _, by| {
            let row = es_diesel::ImportRow {
                stream_id: Seat::stream_id("s"),
                key: format!("freed-by-{by}"),
                event: SeatEvent::from(SeatFreed { by: by.into() }),
            };
            store
                .import([row], &es_diesel::ImportOptions::new("seats"), |_| {})
                .unwrap();
        }),
    ];
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        for (way, append) in ways {
            let user = format!("{way}-user");
            let (taken, _) = run(&store, "s", take(&user));
            taken.unwrap();
            let version = store.stream_version(&Seat::stream_id("s")).unwrap();
            append(&store, version, &user);
            let before = handled();
            let (done, _) = run(&store, "s", take("bob"));
            assert_eq!(done.unwrap(), [ev("taken", "bob")], "{backend} {way}");
            assert_eq!(
                handled() - before,
                1,
                "{backend} {way}: decided once, on the stream"
            );
            run(&store, "s", free("bob")).0.unwrap();
        }

        // Another store's append is not seen: the cached state (bob holds
        // the seat) refuses carl, the refusal is checked against the
        // stream, and the command is decided again on it.
        run(&store, "s", take("bob")).0.unwrap();
        let version = store.stream_version(&Seat::stream_id("s")).unwrap();
        db.store()
            .append(
                &Seat::stream_id("s"),
                ExpectedVersion::Exact(version),
                [SeatEvent::from(SeatFreed { by: "bob".into() })],
            )
            .unwrap();
        let before = handled();
        let (done, _) = run(&store, "s", take("carl"));
        assert_eq!(done.unwrap(), [ev("taken", "carl")], "{backend}");
        assert_eq!(handled() - before, 2, "{backend}");
    }
}

/// The same seat with snapshots every 3 events as well.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SnapSeat(Seat);

impl Aggregate for SnapSeat {
    const TYPE: &'static str = "snapseat";
    type Event = SeatEvent;
    type Command = SeatCommand;
    type Error = Refused;
    const CACHE: Option<Cache<Self>> = Some(Cache::entries(4));
    const SNAPSHOTS: Option<es_diesel::Snapshots<Self>> = Some(es_diesel::Snapshots::every(3));

    fn apply(&mut self, event: &SeatEvent) {
        self.0.apply(event);
    }

    fn handle(&self, command: SeatCommand) -> Result<Vec<SeatEvent>, Refused> {
        self.0.handle(command)
    }
}

/// A cached aggregate with snapshots saves them at the same versions as
/// one without the cache, and each load from a snapshot equals the cached
/// state.
#[test]
fn snapshots_are_saved_as_often_with_the_cache() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        for v in 1..=10i64 {
            let done = store
                .execute::<SnapSeat>("s", SeatCommand::Toggle("ann".into()))
                .unwrap();
            assert_eq!(done.version, v);
            let loaded = store.load_aggregate::<SnapSeat>("s").unwrap();
            assert_eq!(
                loaded.snapshot_version,
                (v >= 3).then_some(v - v % 3),
                "{backend} at version {v}"
            );
            assert_eq!(loaded.state, done.state, "{backend} at version {v}");
        }
    }
}

/// A cached state ahead of the log (the log lost its last event: a
/// database restored from a backup, a server crash that lost a visible
/// commit): a refusal decided on it is not returned, the stream is read.
/// Here the event is removed by hand, with the log's guard lifted.
#[test]
fn a_state_ahead_of_the_log_is_not_trusted() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::sqlite();
    let store = db.store();
    run(&store, "s", take("ann")).0.unwrap(); // v1
    run(&store, "s", free("ann")).0.unwrap(); // v2, cached: free
    store
        .connection()
        .unwrap()
        .batch_execute(
            "DROP TRIGGER es_events_no_delete; \
             DELETE FROM es_events WHERE stream_id = 'seat-s' AND stream_version = 2; \
             CREATE TRIGGER es_events_no_delete BEFORE DELETE ON es_events \
             BEGIN SELECT RAISE(ABORT, 'es_events is append-only: DELETE is refused'); END;",
        )
        .unwrap();
    // The cached state (free) refuses to free the seat for ann; the log
    // says ann holds it.
    let (done, _) = run(&store, "s", free("ann"));
    assert_eq!(done.unwrap(), [ev("freed", "ann")]);
    assert_eq!(log(&store, "s"), [ev("taken", "ann"), ev("freed", "ann")]);
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct DoorOpened {
    by: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct DoorNoted {
    n: i64,
}

#[derive(Event, Debug, Clone, PartialEq)]
enum DoorEvent {
    Opened(DoorOpened),
    Noted(DoorNoted),
}

#[derive(Default, Debug, Clone, PartialEq)]
struct Door {
    opened_by: Option<String>,
}

/// Another store that `Door::handle` appends through once, when armed, so
/// that the command's append loses its race.
static DOOR_RIVAL: std::sync::Mutex<Option<EventStore>> = std::sync::Mutex::new(None);
static DOOR_COMMIT_FAILS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Aggregate for Door {
    const TYPE: &'static str = "door";
    type Event = DoorEvent;
    type Command = String;
    type Error = Refused;
    const CACHE: Option<Cache<Self>> = Some(Cache::entries(4));

    fn apply(&mut self, event: &DoorEvent) {
        if let DoorEvent::Opened(e) = event {
            self.opened_by = Some(e.by.clone());
        }
    }

    fn handle(&self, by: String) -> Result<Vec<DoorEvent>, Refused> {
        if let Some(rival) = DOOR_RIVAL.lock().unwrap().take() {
            rival
                .append(
                    "door-d",
                    ExpectedVersion::Any,
                    [DoorEvent::from(DoorNoted { n: 1 })],
                )
                .unwrap();
        }
        match &self.opened_by {
            Some(holder) => Err(Refused::Held(holder.clone())),
            None => Ok(vec![DoorOpened { by }.into()]),
        }
    }
}

#[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "cache_test_doors", primary_key = by)]
struct DoorRow {
    by: String,
}

/// An inline projector whose write passes at the statement and fails the
/// deferred foreign key at COMMIT, when armed.
#[es_diesel::projector(on = DoorOpened, read_model = DoorRow)]
fn door_opened(_: &DoorOpened, conn: &mut es_diesel::DbConnection) -> diesel::QueryResult<()> {
    use diesel::RunQueryDsl;
    if DOOR_COMMIT_FAILS.load(std::sync::atomic::Ordering::SeqCst) {
        diesel::sql_query("INSERT INTO cache_test_child (parent) VALUES (999)").execute(conn)?;
    }
    Ok(())
}

/// On SQLite a command that lost a race runs again inside `BEGIN
/// IMMEDIATE`; its state is cached only once that transaction committed.
/// Here the COMMIT fails: the event is gone, and so must be the state.
#[test]
fn a_retry_s_state_is_kept_only_once_its_transaction_committed() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::sqlite();
    let store = db.store();
    store
        .connection()
        .unwrap()
        .batch_execute(
            "CREATE TABLE cache_test_parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE cache_test_child (parent INTEGER \
               REFERENCES cache_test_parent (id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
    let rival = EventStore::open_with(
        db.url(),
        StoreOptions {
            cache_aggregates: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    *DOOR_RIVAL.lock().unwrap() = Some(rival);
    DOOR_COMMIT_FAILS.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = store.execute::<Door>("d", "ann".into());
    DOOR_COMMIT_FAILS.store(false, std::sync::atomic::Ordering::SeqCst);
    match failed {
        Ok(done) => panic!("the commit was to fail: {done:?}"),
        Err(ExecuteError::Store(e)) => assert!(e.to_string().contains("FOREIGN KEY"), "{e}"),
        Err(other) => panic!("{other:?}"),
    }
    let log: Vec<DoorEvent> = store
        .load_stream::<DoorEvent>("door-d")
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(log, [DoorEvent::from(DoorNoted { n: 1 })]);
    // Another writer brings the stream to version 2, the version of the
    // state the failed command would have left: a state cached before the
    // COMMIT would now pass the check of its version, and refuse bob.
    EventStore::open(db.url())
        .unwrap()
        .append(
            "door-d",
            ExpectedVersion::Exact(1),
            [DoorEvent::from(DoorNoted { n: 2 })],
        )
        .unwrap();
    // Nobody opened the door.
    let done = store.execute::<Door>("d", "bob".into()).unwrap();
    assert_eq!(done.version, 3);
    assert_eq!(done.state.opened_by.as_deref(), Some("bob"));
}
