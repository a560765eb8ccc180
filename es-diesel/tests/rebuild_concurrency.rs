//! Rebuilds while the application goes on: two rebuilds of one read model
//! at once, a rebuild behind a transaction still writing to the log, appends
//! during a rebuild and during the build `migrate` runs.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use es_diesel::follow::Checkpoint;
use es_diesel::runner::{async_read_models, ProjectionMode, Step};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, projector, write_transaction, Backend, DbConnection, Error, Event, EventStore,
    ExpectedVersion, ReadModel, RebuildOptions, RebuildReport, Recorded, SqliteSync, StoreOptions,
    StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One more touch of an item; `n` is unique and grows along each stream.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct ItemTouched {
    item: i64,
    n: i64,
}

/// No read model handles it.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Unrelated {
    note: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "tally", primary_key = item, index(last))]
struct Tally {
    item: i64,
    touches: i32,
    last: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "tally_async", primary_key = item, mode = async)]
struct TallyAsync {
    item: i64,
    touches: i32,
    last: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "ticks", primary_key = n)]
struct Ticks {
    n: i64,
}

fn touch(row: Option<Tally>, e: &ItemTouched) -> Tally {
    let mut r = row.unwrap_or(Tally {
        item: e.item,
        touches: 0,
        last: 0,
    });
    r.touches += 1;
    r.last = e.n;
    r
}

#[projector(on = ItemTouched, key = item)]
fn tally(e: &Recorded<ItemTouched>, row: &mut Option<Tally>) {
    pass(e.n);
    *row = Some(touch(row.take(), e));
}

#[projector(on = ItemTouched, key = item)]
fn tally_async(e: &Recorded<ItemTouched>, row: &mut Option<TallyAsync>) {
    pass(e.n);
    let before = row.take().map(|r| Tally {
        item: r.item,
        touches: r.touches,
        last: r.last,
    });
    let r = touch(before, e);
    *row = Some(TallyAsync {
        item: r.item,
        touches: r.touches,
        last: r.last,
    });
}

#[projector(on = Tick, read_model = Ticks)]
fn tick(e: &Recorded<Tick>, conn: &mut DbConnection) -> QueryResult<()> {
    pass(e.n);
    diesel::insert_into(ticks::table)
        .values(Ticks { n: e.n })
        .execute(conn)?;
    Ok(())
}

/// Holds the projectors at the event numbered `n` until released, or
/// makes them panic there: a way to stop a rebuild in the middle.
#[derive(Default)]
struct Gate {
    reached: AtomicUsize,
    release: AtomicBool,
    panic: bool,
}

static GATES: Mutex<BTreeMap<i64, Arc<Gate>>> = Mutex::new(BTreeMap::new());

fn arm(n: i64, panic: bool) -> Arc<Gate> {
    let gate = Arc::new(Gate {
        panic,
        ..Gate::default()
    });
    GATES.lock().unwrap().insert(n, gate.clone());
    gate
}

fn disarm(n: i64) {
    GATES.lock().unwrap().remove(&n);
}

fn pass(n: i64) {
    let gate = GATES.lock().unwrap().get(&n).cloned();
    if let Some(gate) = gate {
        gate.reached.fetch_add(1, Ordering::SeqCst);
        if gate.panic {
            panic!("projector broke at event {n}");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !gate.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The tests of this file one at a time: one holding a transaction open
/// holds every PostgreSQL follower back, those of the other tests too.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The number of the `i`-th touch in the log.
fn nth_touch(store: &EventStore, i: usize) -> i64 {
    store
        .iter_types(&["ItemTouched"], 0, 1_000)
        .nth(i)
        .unwrap()
        .unwrap()
        .decode::<ItemTouched>()
        .unwrap()
        .n
}

static SEQ: AtomicI64 = AtomicI64::new(1);

fn next_n() -> i64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// `events` touches spread over `items` items, 500 per transaction.
fn load(store: &EventStore, items: i64, events: usize) {
    let mut left = events;
    while left > 0 {
        let per_item = (500 / items as usize).max(1);
        let mut writes = Vec::new();
        for item in 1..=items {
            if left == 0 {
                break;
            }
            let mut w = StreamWrite::new(format!("item-{item}"), ExpectedVersion::Any);
            for _ in 0..per_item.min(left) {
                w.push(&ItemTouched { item, n: next_n() }).unwrap();
                left -= 1;
            }
            writes.push(w);
        }
        store.append_streams(&writes).unwrap();
    }
}

fn touch_item(store: &EventStore, item: i64) -> es_diesel::Result<()> {
    store
        .append(
            &format!("item-{item}"),
            ExpectedVersion::Any,
            [ItemTouched { item, n: next_n() }],
        )
        .map(drop)
}

/// The read model as folded from the log.
fn expected(store: &EventStore) -> Vec<Tally> {
    let mut rows: BTreeMap<i64, Tally> = BTreeMap::new();
    for ev in store.iter_types(&["ItemTouched"], 0, 5_000) {
        let e = ev.unwrap().decode::<ItemTouched>().unwrap();
        let before = rows.remove(&e.item);
        rows.insert(e.item, touch(before, &e));
    }
    rows.into_values().collect()
}

fn table(store: &EventStore, name: &str) -> Vec<Tally> {
    let mut conn = store.connection().unwrap();
    match name {
        "tally" => tally::table
            .order(tally::item)
            .load::<Tally>(&mut *conn)
            .unwrap(),
        "tally_async" => tally_async::table
            .order(tally_async::item)
            .load::<TallyAsync>(&mut *conn)
            .unwrap()
            .into_iter()
            .map(|r| Tally {
                item: r.item,
                touches: r.touches,
                last: r.last,
            })
            .collect(),
        other => panic!("no table {other}"),
    }
}

/// Waits until PostgreSQL followers can see the whole log: transactions of
/// other work on the server may hold the horizon back for a while.
fn wait_for_horizon(store: &EventStore) {
    if store.backend() != Backend::Postgres {
        return;
    }
    let head = store.head().unwrap();
    assert!(wait_until(
        "the follower horizon to pass the head of the log",
        Duration::from_secs(60),
        || {
            let mut conn = store.connection().unwrap();
            let seen = es_diesel::follow::read_after(
                &mut conn,
                Checkpoint::default(),
                None,
                head as usize + 1,
            )
            .unwrap();
            seen.len() as i64 == head
        }
    ));
}

/// Runs the runner of `tally_async` until it has applied the whole log.
fn catch_up(store: &EventStore) {
    let projection = async_read_models()
        .unwrap()
        .into_iter()
        .find(|p| p.name() == "tally_async")
        .unwrap();
    let mut runner = store.runner(projection);
    assert!(wait_until("the runner", Duration::from_secs(60), || {
        matches!(runner.step(), Ok(Step::Applied(0)))
            && table(store, "tally_async") == expected(store)
    }));
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Shadow schemas of this store's schema still in the database (PostgreSQL).
fn shadow_schemas(store: &EventStore) -> i64 {
    if store.backend() != Backend::Postgres {
        return 0;
    }
    diesel::sql_query(
        "SELECT COUNT(*) AS n FROM pg_namespace \
         WHERE left(nspname, length(current_schema() || '_es_shadow_')) = current_schema() || '_es_shadow_'",
    )
    .get_result::<Count>(&mut *store.connection().unwrap())
    .unwrap()
    .n
}

fn claim_released(store: &EventStore, name: &str) -> bool {
    diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM es_read_models WHERE name = '{name}' AND rebuild_holder IS NULL"
    ))
    .get_result::<Count>(&mut *store.connection().unwrap())
    .unwrap()
    .n == 1
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            eprintln!("timed out waiting for {what}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn fast(db: &TestDatabase) -> EventStore {
    db.store_with(StoreOptions {
        sqlite_sync: SqliteSync::Off,
        ..StoreOptions::default()
    })
}

/// Two rebuilds of one read model start together. The first to claim it
/// is held at one event until the other has returned: the other must be
/// refused with `RebuildInProgress` at once. (Without exclusivity both build
/// at once, and the second drops the first's shadow table, whose name then
/// means the live table to the first.)
#[test]
fn two_rebuilds_of_one_read_model_at_once() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 40, 3_000);
        wait_for_horizon(&store);
        let at = nth_touch(&store, 10);
        for name in ["tally", "tally_async"] {
            let gate = arm(at, false);
            let barrier = Arc::new(Barrier::new(2));
            let returned = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (store, barrier, returned) =
                        (store.clone(), barrier.clone(), returned.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let result = store.rebuild_with(
                            name,
                            &RebuildOptions {
                                batch_size: 200,
                                ..Default::default()
                            },
                            |_| {},
                        );
                        returned.fetch_add(1, Ordering::SeqCst);
                        result
                    })
                })
                .collect();
            let reached = wait_until(
                "a rebuild at the held event",
                Duration::from_secs(30),
                || gate.reached.load(Ordering::SeqCst) > 0,
            );
            let one_returned = wait_until(
                "the other rebuild to return",
                Duration::from_secs(20),
                || returned.load(Ordering::SeqCst) > 0,
            );
            gate.release.store(true, Ordering::SeqCst);
            let results: Vec<es_diesel::Result<RebuildReport>> =
                threads.into_iter().map(|t| t.join().unwrap()).collect();
            disarm(at);
            assert!(
                reached,
                "{}: {name}: no rebuild got to the held event",
                db.backend()
            );
            assert!(
                one_returned,
                "{}: {name}: a second rebuild neither failed nor returned while the first was in progress",
                db.backend()
            );
            assert_eq!(
                gate.reached.load(Ordering::SeqCst),
                1,
                "{}: {name}: two rebuilds ran at once",
                db.backend()
            );
            let ok: Vec<&RebuildReport> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(ok.len(), 1, "{}: {name}: {results:?}", db.backend());
            assert_eq!((ok[0].events, ok[0].pending), (3_000, 0));
            let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
            match refused {
                Error::RebuildInProgress { read_model, holder } => {
                    assert_eq!(read_model, name);
                    assert!(holder.starts_with("rebuild "), "{holder}");
                    let text = refused.to_string();
                    assert!(
                        text.contains(name) && text.contains("already being rebuilt"),
                        "{text}"
                    );
                }
                other => panic!(
                    "{}: expected RebuildInProgress, got {other:?}",
                    db.backend()
                ),
            }
            assert_eq!(
                table(&store, name),
                expected(&store),
                "{}: {name}",
                db.backend()
            );
            assert_eq!(shadow_schemas(&store), 0, "no shadow schema left behind");
            assert!(claim_released(&store, name));
            // Released: the next rebuild goes ahead and gives the same table.
            assert_eq!(store.rebuild(name).unwrap().pending, 0);
            assert_eq!(table(&store, name), expected(&store));
        }
    }
}

/// `migrate` waits for a rebuild in progress rather than failing or
/// building a second time.
#[test]
fn migrate_waits_for_a_rebuild_in_progress() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 20, 1_000);
        wait_for_horizon(&store);
        // As if a migrate had re-created the table and not built it yet.
        diesel::sql_query("UPDATE es_read_models SET rebuilt_at = NULL WHERE name = 'tally'")
            .execute(&mut *store.connection().unwrap())
            .unwrap();
        let at = nth_touch(&store, 10);
        let gate = arm(at, false);
        let rebuild = {
            let store = store.clone();
            std::thread::spawn(move || store.rebuild("tally"))
        };
        assert!(wait_until(
            "the rebuild at the held event",
            Duration::from_secs(30),
            || { gate.reached.load(Ordering::SeqCst) > 0 }
        ));
        let migrated = Arc::new(AtomicBool::new(false));
        let migrate = {
            let (store, migrated) = (store.clone(), migrated.clone());
            std::thread::spawn(move || {
                let r = store.migrate();
                migrated.store(true, Ordering::SeqCst);
                r
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let early = migrated.load(Ordering::SeqCst);
        gate.release.store(true, Ordering::SeqCst);
        let report = rebuild.join().unwrap();
        let migrate = migrate.join().unwrap();
        disarm(at);
        assert!(
            !early,
            "{}: migrate returned while a rebuild of tally was in progress: {migrate:?}",
            db.backend()
        );
        assert_eq!(report.unwrap().events, 1_000);
        migrate.unwrap();
        assert_eq!(gate.reached.load(Ordering::SeqCst), 1, "built once");
        assert_eq!(table(&store, "tally"), expected(&store));
        assert!(claim_released(&store, "tally"));
    }
}

/// A rebuild that fails (here: a projector panics half-way) leaves no
/// shadow, releases its claim and does not touch the live table.
#[test]
fn a_failed_rebuild_leaves_nothing_behind() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 10, 600);
        wait_for_horizon(&store);
        let before = table(&store, "tally");
        let at = nth_touch(&store, 300);
        let gate = arm(at, true);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.rebuild_with(
                "tally",
                &RebuildOptions {
                    batch_size: 100,
                    ..Default::default()
                },
                |_| {},
            )
        }));
        disarm(at);
        assert!(panicked.is_err());
        assert_eq!(gate.reached.load(Ordering::SeqCst), 1);
        assert_eq!(shadow_schemas(&store), 0);
        assert!(claim_released(&store, "tally"));
        assert_eq!(
            table(&store, "tally"),
            before,
            "the live table is untouched"
        );
        touch_item(&store, 1).unwrap();
        store.rebuild("tally").unwrap();
        assert_eq!(table(&store, "tally"), expected(&store));
    }
}

/// A transaction that has appended to the log but not committed holds the
/// follower horizon back on PostgreSQL. An asynchronous rebuild cannot
/// include the events committed behind it: it must say how many, leave them
/// to the runner (whose lag shows them), and not claim completeness. An
/// inline rebuild must include them all.
#[test]
fn a_rebuild_behind_an_open_log_writer_says_what_it_left_out() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 30, 1_500);
        wait_for_horizon(&store);
        let held = (db.backend() == Backend::Postgres).then(|| {
            let (appended_tx, appended_rx) = mpsc::channel();
            let (commit_tx, commit_rx) = mpsc::channel::<()>();
            let store = store.clone();
            let t = std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                write_transaction(&mut conn, |c| -> es_diesel::Result<()> {
                    let mut w = StreamWrite::new("held", ExpectedVersion::Any);
                    w.push(&Unrelated {
                        note: "left open".into(),
                    })?;
                    append_in(c, &[w])?;
                    appended_tx.send(()).unwrap();
                    commit_rx.recv_timeout(Duration::from_secs(120)).unwrap();
                    Ok(())
                })
                .unwrap();
            });
            appended_rx.recv_timeout(Duration::from_secs(30)).unwrap();
            (t, commit_tx)
        });
        // Committed by other connections after the open transaction began.
        for i in 0..40 {
            touch_item(&store, 1 + i % 7).unwrap();
        }
        let behind = if held.is_some() { 40 } else { 0 };

        let report = store.rebuild("tally_async").unwrap();
        assert_eq!(
            (report.events, report.pending),
            (1_540 - behind, behind),
            "{}: the async rebuild counts what it could not include",
            db.backend()
        );
        let status = store.projection_status().unwrap();
        let s = status.iter().find(|s| s.name == "tally_async").unwrap();
        assert_eq!(
            (s.mode, s.lag),
            (ProjectionMode::Async, report.pending as i64)
        );
        assert_ne!(s.state, "rebuilding");

        let report = store.rebuild("tally").unwrap();
        assert_eq!(
            (report.events, report.pending),
            (1_540, 0),
            "{}: the inline rebuild includes every committed event",
            db.backend()
        );
        assert_eq!(table(&store, "tally"), expected(&store));
        assert_eq!(shadow_schemas(&store), 0, "no shadow schema left behind");

        if let Some((t, commit)) = held {
            commit.send(()).unwrap();
            t.join().unwrap();
        }
        catch_up(&store);
        let status = store.projection_status().unwrap();
        assert_eq!(
            status.iter().find(|s| s.name == "tally_async").unwrap().lag,
            0
        );
    }
}

/// `TestDatabase` drops the shadow schemas of rebuilds that did not finish,
/// and a rebuild drops those of its read model's earlier rebuilds.
#[test]
fn shadow_schemas_of_interrupted_rebuilds_are_dropped() {
    let _serial = serial();
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = fast(&db);
    load(&store, 5, 100);
    let schema: String = diesel::sql_query("SELECT current_schema() AS name")
        .get_result::<Name>(&mut *store.connection().unwrap())
        .unwrap()
        .name;
    let create = |token: &str, table: &str| {
        store
            .connection()
            .unwrap()
            .batch_execute(&format!(
                "CREATE SCHEMA \"{schema}_es_shadow_{token}\"; \
                 COMMENT ON SCHEMA \"{schema}_es_shadow_{token}\" IS 'es-diesel rebuild shadow of schema {schema}'; \
                 CREATE TABLE \"{schema}_es_shadow_{token}\".\"{table}\" (x int)"
            ))
            .unwrap();
    };
    create("0000dead", "tally");
    create("0000beef", "ticks");
    assert_eq!(shadow_schemas(&store), 2);
    store.rebuild("tally").unwrap();
    assert_eq!(
        shadow_schemas(&store),
        1,
        "the stale shadow of tally is gone"
    );
    let url = std::env::var(es_diesel::testing::POSTGRES_URL_VAR).unwrap();
    drop(store);
    drop(db);
    let mut admin = diesel::PgConnection::establish(&url).unwrap();
    let left = diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM pg_namespace WHERE left(nspname, {}) = '{schema}'",
        schema.len()
    ))
    .get_result::<Count>(&mut admin)
    .unwrap()
    .n;
    assert_eq!(
        left, 0,
        "TestDatabase dropped {schema} and its shadow schemas"
    );
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// Appends that the rebuilt read model handles go on during a rebuild over
/// tens of thousands of events, with a short busy timeout on SQLite: no
/// append waits for the whole rebuild, none fails, and the table ends up
/// as a fresh rebuild gives it.
#[test]
fn appends_go_on_during_a_rebuild() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let events = match db.backend() {
            Backend::Sqlite => 30_000,
            Backend::Postgres | Backend::Mysql => 12_000,
        };
        {
            let loader = db.store_with(StoreOptions {
                sqlite_sync: SqliteSync::Off,
                inline_projectors: false,
                ..StoreOptions::default()
            });
            load(&loader, 200, events);
        }
        let store = db.store_with(StoreOptions {
            busy_timeout: Duration::from_millis(250),
            sqlite_sync: SqliteSync::Normal,
            ..StoreOptions::default()
        });
        store.rebuild("tally").unwrap();
        wait_for_horizon(&store);

        let stop = Arc::new(AtomicBool::new(false));
        let appended = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let appender = {
            let (store, stop, appended, failures) = (
                store.clone(),
                stop.clone(),
                appended.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                let mut item = 0;
                while !stop.load(Ordering::SeqCst) {
                    item = item % 200 + 1;
                    match touch_item(&store, item) {
                        Ok(()) => {
                            appended.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        };
        let mut batches = 0;
        let mut stalled = 0;
        let report = store
            .rebuild_with(
                "tally",
                &RebuildOptions {
                    batch_size: 500,
                    ..Default::default()
                },
                |_| {
                    batches += 1;
                    if batches <= 3 {
                        let before = appended.load(Ordering::SeqCst);
                        if !wait_until(
                            "appends during the rebuild",
                            Duration::from_secs(10),
                            || appended.load(Ordering::SeqCst) >= before + 3,
                        ) {
                            stalled += 1;
                        }
                    }
                },
            )
            .unwrap();
        let during = appended.load(Ordering::SeqCst);
        assert!(wait_until(
            "appends after the rebuild",
            Duration::from_secs(10),
            || { appended.load(Ordering::SeqCst) >= during + 20 }
        ));
        stop.store(true, Ordering::SeqCst);
        appender.join().unwrap();
        assert_eq!(
            stalled,
            0,
            "{}: appends stalled during the rebuild",
            db.backend()
        );
        assert!(
            failures.lock().unwrap().is_empty(),
            "{}: appends failed during the rebuild: {:?}",
            db.backend(),
            failures.lock().unwrap().first()
        );
        // On PostgreSQL another transaction on the server may hold the
        // follower horizon back and leave more to the final transaction.
        assert!(
            batches > 10 || db.backend() == Backend::Postgres,
            "built in batches"
        );
        assert!(report.events >= events as u64);
        let live = table(&store, "tally");
        assert_eq!(
            live,
            expected(&store),
            "{}: the rebuilt table took every append",
            db.backend()
        );
        store.rebuild("tally").unwrap();
        assert_eq!(
            table(&store, "tally"),
            live,
            "a fresh rebuild gives the same table"
        );
    }
}

/// `migrate` commits its schema changes before it builds a re-created read
/// model, so appends go on while it builds. The build is held at one event
/// while the test appends and looks.
#[test]
fn migrate_builds_after_committing_its_schema_changes() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = db.store_with(StoreOptions {
            busy_timeout: Duration::from_millis(250),
            ..StoreOptions::default()
        });
        for n in 1..=20 {
            store
                .append("ticks", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        wait_for_horizon(&store);
        // As if the struct had changed shape.
        diesel::sql_query("UPDATE es_read_models SET fingerprint = 'v0-old' WHERE name = 'ticks'")
            .execute(&mut *store.connection().unwrap())
            .unwrap();
        let gate = arm(10, false);
        let migrate = {
            let store = store.clone();
            std::thread::spawn(move || store.migrate())
        };
        let reached = wait_until(
            "the build to reach tick 10",
            Duration::from_secs(30),
            || gate.reached.load(Ordering::SeqCst) > 0,
        );
        let committed = reached
            && diesel::sql_query(
                "SELECT COUNT(*) AS n FROM es_read_models WHERE name = 'ticks' AND fingerprint <> 'v0-old'",
            )
            .get_result::<Count>(&mut *store.connection().unwrap())
            .map(|c| c.n == 1)
            .unwrap_or(false);
        let appended = reached && {
            let (done_tx, done_rx) = mpsc::channel();
            let store = store.clone();
            std::thread::spawn(move || {
                let r = store.append("ticks", ExpectedVersion::Any, [Tick { n: 1000 }]);
                let _ = done_tx.send(r.map(drop));
            });
            matches!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(Ok(())))
        };
        gate.release.store(true, Ordering::SeqCst);
        migrate.join().unwrap().unwrap();
        disarm(10);
        assert!(reached, "{}: migrate rebuilt ticks", db.backend());
        assert!(
            committed,
            "{}: the new fingerprint was committed before the build",
            db.backend()
        );
        assert!(
            appended,
            "{}: an append went through while migrate was building",
            db.backend()
        );
        let mut conn = store.connection().unwrap();
        let ns: Vec<i64> = ticks::table
            .select(ticks::n)
            .order(ticks::n)
            .load(&mut *conn)
            .unwrap();
        let mut want: Vec<i64> = (1..=20).collect();
        want.push(1000);
        assert_eq!(ns, want, "{}", db.backend());
        assert!(claim_released(&store, "ticks"));
        assert_eq!(shadow_schemas(&store), 0);
    }
}

/// A read model registered after the last `migrate` has no table to
/// rebuild: the rebuild says so.
#[test]
fn a_rebuild_before_migrate_is_refused() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        diesel::sql_query("DELETE FROM es_read_models WHERE name = 'tally'")
            .execute(&mut *store.connection().unwrap())
            .unwrap();
        match store.rebuild("tally") {
            Err(Error::ReadModelNotMigrated { read_model }) => assert_eq!(read_model, "tally"),
            other => panic!("{}: expected NotMigrated, got {other:?}", db.backend()),
        }
        store.migrate().unwrap();
        store.rebuild("tally").unwrap();
    }
}
