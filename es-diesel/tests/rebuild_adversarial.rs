//! Attacks on rebuilds and runner leases: appends and runner batches racing
//! the final swap, a rebuild whose process stalls past its claim, a panic in
//! the final transaction, two read models rebuilt at once, and shadow
//! schemas of long schema names.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use es_diesel::runner::{AsyncProjection, Step};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    projector, Backend, DbConnection, Error, Event, EventStore, ExpectedVersion, ReadModel,
    RebuildOptions, Recorded, RecordedEvent, SqliteSync, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct ItemTouched {
    item: i64,
    n: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "tally", primary_key = item)]
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
    // Before the projector touches its table.
    pass(e.n);
    diesel::insert_into(ticks::table)
        .values(Ticks { n: e.n })
        .execute(conn)?;
    Ok(())
}

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

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

static SEQ: AtomicI64 = AtomicI64::new(1_000_000);

fn next_n() -> i64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn load(store: &EventStore, items: i64, events: usize) {
    let mut left = events;
    while left > 0 {
        let mut writes = Vec::new();
        for item in 1..=items {
            if left == 0 {
                break;
            }
            let mut w = StreamWrite::new(format!("item-{item}"), ExpectedVersion::Any);
            w.push(&ItemTouched { item, n: next_n() }).unwrap();
            left -= 1;
            writes.push(w);
        }
        store.append_streams(&writes).unwrap();
    }
}

fn touch_item(store: &EventStore, item: i64, n: i64) {
    store
        .append(
            &format!("item-{item}"),
            ExpectedVersion::Any,
            [ItemTouched { item, n }],
        )
        .unwrap();
}

fn expected(store: &EventStore) -> Vec<Tally> {
    let mut rows: BTreeMap<i64, Tally> = BTreeMap::new();
    for ev in store.iter_types(&["ItemTouched"], 0, 5_000) {
        let e = ev.unwrap().decode::<ItemTouched>().unwrap();
        let before = rows.remove(&e.item);
        rows.insert(e.item, touch(before, &e));
    }
    rows.into_values().collect()
}

fn expected_ticks(store: &EventStore) -> Vec<i64> {
    let mut v: Vec<i64> = store
        .iter_types(&["Tick"], 0, 5_000)
        .map(|ev| ev.unwrap().decode::<Tick>().unwrap().n)
        .collect();
    v.sort();
    v
}

fn ticks_table(store: &EventStore) -> Vec<i64> {
    ticks::table
        .select(ticks::n)
        .order(ticks::n)
        .load(&mut *store.connection().unwrap())
        .unwrap()
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

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn count(store: &EventStore, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(&mut *store.connection().unwrap())
        .unwrap()
        .n
}

fn shadow_schemas(store: &EventStore) -> i64 {
    if store.backend() != Backend::Postgres {
        return 0;
    }
    count(
        store,
        "SELECT COUNT(*) AS n FROM pg_namespace \
         WHERE left(nspname, length(current_schema() || '_es_shadow_')) = current_schema() || '_es_shadow_'",
    )
}

fn claim_released(store: &EventStore, name: &str) -> bool {
    count(
        store,
        &format!("SELECT COUNT(*) AS n FROM es_read_models WHERE name = '{name}' AND rebuild_holder IS NULL"),
    ) == 1
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
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

/// An inline writer has inserted its event but its SQL projector has not
/// touched the table yet when the rebuild's final transaction runs. On
/// PostgreSQL the rebuild does not see the event and does not wait; the
/// writer's projector must then write to the new table, exactly once.
#[test]
fn inline_writer_between_insert_and_projector_during_the_swap() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        for n in 1..=50 {
            store
                .append("ticks", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        let gate = arm(77, false);
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                store
                    .append("ticks", ExpectedVersion::Any, [Tick { n: 77 }])
                    .map(drop)
            })
        };
        assert!(wait_until(Duration::from_secs(20), || gate
            .reached
            .load(Ordering::SeqCst)
            > 0));
        let (done_tx, done_rx) = mpsc::channel();
        let rebuild = {
            let store = store.clone();
            std::thread::spawn(move || {
                let r = store.rebuild("ticks");
                let _ = done_tx.send(());
                r
            })
        };
        let wait = match db.backend() {
            Backend::Postgres | Backend::Mysql => Duration::from_secs(20),
            Backend::Sqlite => Duration::from_millis(300),
        };
        let finished_first = done_rx.recv_timeout(wait).is_ok();
        gate.release.store(true, Ordering::SeqCst);
        let report = rebuild.join().unwrap();
        writer.join().unwrap().unwrap();
        disarm(77);
        report.unwrap();
        if db.backend() == Backend::Postgres {
            assert!(
                finished_first,
                "the rebuild waited for a writer that had not touched ticks"
            );
        }
        assert_eq!(
            ticks_table(&store),
            expected_ticks(&store),
            "{}",
            db.backend()
        );
        assert_eq!(shadow_schemas(&store), 0);
    }
}

/// An inline writer holds the live table (its row projector loaded the row
/// and is folding) when the rebuild's final transaction starts: the rebuild
/// must wait for it and include its event.
#[test]
fn inline_writer_holding_the_table_during_the_swap() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 10, 200);
        let n = next_n();
        let gate = arm(n, false);
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || touch_item(&store, 3, n))
        };
        assert!(wait_until(Duration::from_secs(20), || gate
            .reached
            .load(Ordering::SeqCst)
            > 0));
        let (done_tx, done_rx) = mpsc::channel();
        let rebuild = {
            let store = store.clone();
            std::thread::spawn(move || {
                let r = store.rebuild("tally");
                let _ = done_tx.send(());
                r
            })
        };
        let early = done_rx.recv_timeout(Duration::from_millis(500)).is_ok();
        gate.release.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        let report = rebuild.join().unwrap();
        disarm(n);
        let report = report.unwrap();
        assert!(
            !early || report.events == 201,
            "{}: {report:?}",
            db.backend()
        );
        assert_eq!(report.events, 201, "{}", db.backend());
        assert_eq!(table(&store, "tally"), expected(&store), "{}", db.backend());
    }
}

/// A runner projection for `tally_async` that stops at an armed event,
/// before or after it writes the row.
struct GatedTally {
    before: bool,
}

static RUNNER_GATES: Mutex<BTreeMap<i64, Arc<Gate>>> = Mutex::new(BTreeMap::new());

fn runner_pass(n: i64) {
    let gate = RUNNER_GATES.lock().unwrap().get(&n).cloned();
    // Only the first runner to get there is held.
    if let Some(gate) = gate.filter(|g| g.reached.fetch_add(1, Ordering::SeqCst) == 0) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !gate.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl AsyncProjection for GatedTally {
    fn name(&self) -> &str {
        "tally_async"
    }
    fn event_types(&self) -> Option<Vec<&'static str>> {
        Some(vec!["ItemTouched"])
    }
    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> es_diesel::Result<()> {
        let e = event.decode::<ItemTouched>().unwrap();
        if self.before {
            runner_pass(e.n);
        }
        let on_conflict = match conn.backend() {
            Backend::Mysql => "ON DUPLICATE KEY UPDATE touches = touches + 1, last = VALUES(last)",
            _ => "ON CONFLICT (item) DO UPDATE SET touches = tally_async.touches + 1, last = excluded.last",
        };
        conn.batch_execute(&format!(
            "INSERT INTO tally_async (item, touches, last) VALUES ({}, 1, {}) {on_conflict}",
            e.item, e.n
        ))?;
        if !self.before {
            runner_pass(e.n);
        }
        Ok(())
    }
}

fn drain(runner: &mut es_diesel::runner::Runner) -> bool {
    wait_until(Duration::from_secs(30), || {
        matches!(runner.step(), Ok(Step::Applied(0)))
    })
}

/// A runner batch of an async read model is in flight (it has read its
/// events; before, or after, writing the table) while the rebuild swaps.
/// Afterwards the runner continues from the shadow's checkpoint: every event
/// counts once.
#[test]
fn runner_batch_in_flight_during_an_async_swap() {
    let _serial = serial();
    for before in [true, false] {
        for db in TestDatabase::all() {
            let store = fast(&db);
            load(&store, 10, 200);
            let mut runner = store.runner(Arc::new(GatedTally { before }));
            assert!(drain(&mut runner));
            assert_eq!(table(&store, "tally_async"), expected(&store));
            let n = next_n();
            let gate = Arc::new(Gate::default());
            RUNNER_GATES.lock().unwrap().insert(n, gate.clone());
            touch_item(&store, 4, n);
            let stepping = std::thread::spawn(move || {
                let r = runner.step();
                (runner, r)
            });
            assert!(wait_until(Duration::from_secs(20), || gate
                .reached
                .load(Ordering::SeqCst)
                > 0));
            let (done_tx, done_rx) = mpsc::channel();
            let rebuild = {
                let store = store.clone();
                std::thread::spawn(move || {
                    let r = store.rebuild("tally_async");
                    let _ = done_tx.send(());
                    r
                })
            };
            let wait = if before && db.backend() == Backend::Postgres {
                Duration::from_secs(20)
            } else {
                Duration::from_millis(300)
            };
            let _ = done_rx.recv_timeout(wait);
            gate.release.store(true, Ordering::SeqCst);
            let (mut runner, step) = stepping.join().unwrap();
            let report = rebuild.join().unwrap().unwrap();
            RUNNER_GATES.lock().unwrap().remove(&n);
            eprintln!(
                "{} before={before}: step {step:?}, report {report:?}",
                db.backend()
            );
            assert!(drain(&mut runner), "{}: runner drains", db.backend());
            assert_eq!(
                table(&store, "tally_async"),
                expected(&store),
                "{} before={before}: every event once",
                db.backend()
            );
        }
    }
}

/// A rebuild stalls (its process as good as dead) past its claim's lease;
/// another takes over. When the first comes back, in the middle of the
/// second, it must stop without touching the live table or the second's
/// shadow, and the second must finish with the right table.
#[test]
fn a_stalled_rebuild_is_taken_over_and_cannot_interfere() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 10, 600);
        let opts = RebuildOptions {
            batch_size: 100,
            ..Default::default()
        };
        let spawn_paused = |store: &EventStore| {
            let (at_tx, at_rx) = mpsc::channel::<()>();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let store = store.clone();
            let opts = opts.clone();
            let t = std::thread::spawn(move || {
                let mut first = true;
                store.rebuild_with("tally", &opts, |_| {
                    if first {
                        first = false;
                        at_tx.send(()).unwrap();
                        go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
                    }
                })
            });
            at_rx.recv_timeout(Duration::from_secs(30)).unwrap();
            (t, go_tx)
        };
        let (first, go_first) = spawn_paused(&store);
        // Events while the first is stalled.
        load(&store, 10, 30);
        diesel::sql_query("UPDATE es_read_models SET rebuild_expires_ms = 0 WHERE name = 'tally'")
            .execute(&mut *store.connection().unwrap())
            .unwrap();
        let (second, go_second) = spawn_paused(&store);
        go_first.send(()).unwrap();
        let first = first.join().unwrap();
        load(&store, 10, 20);
        go_second.send(()).unwrap();
        let second = second.join().unwrap();
        eprintln!("{}: first {first:?}", db.backend());
        assert!(
            matches!(first, Err(Error::RebuildInProgress { .. })),
            "{}: the stalled rebuild stops: {first:?}",
            db.backend()
        );
        let second = second.unwrap();
        assert_eq!(second.events, 650, "{}", db.backend());
        assert_eq!(table(&store, "tally"), expected(&store), "{}", db.backend());
        assert!(claim_released(&store, "tally"));
        assert_eq!(shadow_schemas(&store), 0);
    }
}

/// A projector panics on an event the rebuild only meets in its final
/// transaction (appended after the last batch): the transaction rolls back,
/// the shadow is dropped, the claim released, the live table and, for an
/// async model, its checkpoint row are untouched.
#[test]
fn a_panic_in_the_final_transaction_leaves_nothing_behind() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        let raw = db.store_with(StoreOptions {
            sqlite_sync: SqliteSync::Off,
            inline_projectors: false,
            ..StoreOptions::default()
        });
        load(&store, 10, 250);
        let n = next_n();
        let before = table(&store, "tally");
        let gate = arm(n, true);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.rebuild_with(
                "tally",
                &RebuildOptions {
                    batch_size: 100,
                    ..Default::default()
                },
                |p| {
                    if p.events == 250 {
                        touch_item(&raw, 2, n);
                    }
                },
            )
        }));
        disarm(n);
        assert!(panicked.is_err(), "{}: {panicked:?}", db.backend());
        assert_eq!(gate.reached.load(Ordering::SeqCst), 1, "{}", db.backend());
        assert_eq!(
            table(&store, "tally"),
            before,
            "{}: live table untouched",
            db.backend()
        );
        assert!(claim_released(&store, "tally"), "{}", db.backend());
        assert_eq!(shadow_schemas(&store), 0, "{}", db.backend());
        // The connection the rebuild used is usable afterwards.
        for _ in 0..4 {
            touch_item(&store, 5, next_n());
        }
        store.rebuild("tally").unwrap();
        assert_eq!(table(&store, "tally"), expected(&store), "{}", db.backend());
    }
}

/// Two different read models rebuilt at once, both held half-way: neither
/// disturbs the other's shadow or claim.
#[test]
fn two_read_models_rebuilt_at_once() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 10, 400);
        for n in 1..=300 {
            store
                .append("ticks", ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        let opts = RebuildOptions {
            batch_size: 50,
            ..Default::default()
        };
        let spawn_paused = |name: &'static str| {
            let (at_tx, at_rx) = mpsc::channel::<()>();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let store = store.clone();
            let opts = opts.clone();
            let t = std::thread::spawn(move || {
                let mut first = true;
                store.rebuild_with(name, &opts, |_| {
                    if first {
                        first = false;
                        at_tx.send(()).unwrap();
                        go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
                    }
                })
            });
            at_rx.recv_timeout(Duration::from_secs(30)).unwrap();
            (t, go_tx)
        };
        let (a, go_a) = spawn_paused("tally");
        let (b, go_b) = spawn_paused("ticks");
        go_a.send(()).unwrap();
        go_b.send(()).unwrap();
        let a = a.join().unwrap();
        let b = b.join().unwrap();
        assert!(a.is_ok() && b.is_ok(), "{}: {a:?} {b:?}", db.backend());
        assert_eq!(table(&store, "tally"), expected(&store));
        assert_eq!(ticks_table(&store), expected_ticks(&store));
        assert_eq!(shadow_schemas(&store), 0);
    }
}

/// Two PostgreSQL schemas whose names share their first 44 characters (one
/// store per tenant schema): a rebuild of `tally` in one must not drop the
/// shadow of a rebuild of `tally` in progress in the other.
#[test]
fn rebuilds_in_two_schemas_with_a_long_common_prefix() {
    let _serial = serial();
    let Ok(admin_url) = std::env::var(es_diesel::testing::POSTGRES_URL_VAR) else {
        return;
    };
    let tag = &uuid_tag();
    let common = format!("es_rv2_{tag}_tenant_schema_with_a_long_common_name");
    assert!(common.len() >= 44);
    let schemas = [format!("{common}_a"), format!("{common}_b")];
    let mut admin = diesel::PgConnection::establish(&admin_url).unwrap();
    for s in &schemas {
        admin
            .batch_execute(&format!("CREATE SCHEMA \"{s}\""))
            .unwrap();
    }
    let result = std::panic::catch_unwind(|| {
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        let stores: Vec<EventStore> = schemas
            .iter()
            .map(|s| {
                let store =
                    EventStore::open(&format!("{admin_url}{sep}options=-csearch_path%3D{s}"))
                        .unwrap();
                store.migrate().unwrap();
                load(&store, 5, 300);
                store
            })
            .collect();
        let (at_tx, at_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let b = {
            let store = stores[1].clone();
            std::thread::spawn(move || {
                let mut first = true;
                store.rebuild_with(
                    "tally",
                    &RebuildOptions {
                        batch_size: 50,
                        ..Default::default()
                    },
                    |_| {
                        if first {
                            first = false;
                            at_tx.send(()).unwrap();
                            go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
                        }
                    },
                )
            })
        };
        at_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let a = stores[0].rebuild("tally");
        go_tx.send(()).unwrap();
        let b = b.join().unwrap();
        assert!(a.is_ok(), "{a:?}");
        assert!(
            b.is_ok(),
            "a rebuild in schema {} broke the one in progress in schema {}: {b:?}",
            schemas[0],
            schemas[1]
        );
    });
    for s in &schemas {
        let prefix = format!("{}_es_shadow_", &s[..44]);
        let _ = admin.batch_execute(&format!(
            "DO $$ DECLARE s text; BEGIN \
             FOR s IN SELECT nspname FROM pg_namespace WHERE left(nspname, {len}) = '{prefix}' LOOP \
             EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; END $$; \
             DROP SCHEMA IF EXISTS \"{s}\" CASCADE",
            len = prefix.len(),
        ));
    }
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

fn uuid_tag() -> String {
    format!(
        "{:08x}",
        std::process::id() ^ (Instant::now().elapsed().as_nanos() as u32)
    )
}

/// A rebuild started by the previous version of the application is in
/// progress when the new version's `migrate` re-creates the table in a new
/// shape (emulated here by its statements). The old rebuild must not swap
/// its old-shape table in and mark the read model built: the new version's
/// `migrate`, waiting for the claim, would then skip its build and keep a
/// table of the wrong shape under the new fingerprint.
#[test]
fn an_old_rebuild_does_not_undo_a_migrate_of_a_new_shape() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        load(&store, 10, 300);
        let (at_tx, at_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let old = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut first = true;
                store.rebuild_with(
                    "tally",
                    &RebuildOptions {
                        batch_size: 50,
                        ..Default::default()
                    },
                    |_| {
                        if first {
                            first = false;
                            at_tx.send(()).unwrap();
                            go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
                        }
                    },
                )
            })
        };
        at_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        // The new version's migrate, schema phase.
        {
            let mut conn = store.connection().unwrap();
            es_diesel::write_transaction(&mut conn, |c| -> es_diesel::Result<()> {
                c.batch_execute(
                    "DROP TABLE tally; \
                     CREATE TABLE tally (item BIGINT PRIMARY KEY, touches INTEGER NOT NULL, last BIGINT NOT NULL, extra TEXT); \
                     UPDATE es_read_models SET fingerprint = 'v2-new-shape', rebuilt_at = NULL WHERE name = 'tally'",
                )?;
                Ok(())
            })
            .unwrap();
        }
        go_tx.send(()).unwrap();
        let old = old.join().unwrap();
        let has_extra = match db.backend() {
            Backend::Postgres => count(
                &store,
                "SELECT COUNT(*) AS n FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'tally' AND column_name = 'extra'",
            ),
            Backend::Mysql => count(
                &store,
                "SELECT COUNT(*) AS n FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = 'tally' AND column_name = 'extra'",
            ),
            Backend::Sqlite => count(
                &store,
                "SELECT COUNT(*) AS n FROM pragma_table_info('tally') WHERE name = 'extra'",
            ),
        } == 1;
        let still_to_build = count(
            &store,
            "SELECT COUNT(*) AS n FROM es_read_models WHERE name = 'tally' AND rebuilt_at IS NULL",
        ) == 1;
        eprintln!(
            "{}: old rebuild {old:?}, new column kept {has_extra}, still to build {still_to_build}",
            db.backend()
        );
        assert!(
            has_extra && still_to_build,
            "{}: the old rebuild swapped in its table of the old shape and marked tally built under the new fingerprint: {old:?}",
            db.backend()
        );
        assert!(
            matches!(&old, Err(es_diesel::Error::ReadModelChanged { read_model }) if read_model == "tally"),
            "{}: {old:?}",
            db.backend()
        );
    }
}

/// A runner stalls in a batch (events read, nothing written) past its
/// lease; another takes over and applies them. When the first resumes, its
/// batch must be rolled back: every event counts once. (PostgreSQL: on
/// SQLite the stalled batch holds the write lock, so nobody can take over.)
#[test]
fn a_stalled_runner_is_taken_over_and_its_batch_rolled_back() {
    let _serial = serial();
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = fast(&db);
    load(&store, 10, 100);
    let options = es_diesel::runner::RunnerOptions {
        lease: Duration::from_millis(400),
        ..Default::default()
    };
    let mut a = es_diesel::runner::Runner::new(
        store.clone(),
        Arc::new(GatedTally { before: true }),
        options.clone(),
    );
    let mut b = es_diesel::runner::Runner::new(
        store.clone(),
        Arc::new(GatedTally { before: true }),
        options,
    );
    assert!(drain(&mut a));
    let n = next_n();
    let gate = Arc::new(Gate::default());
    RUNNER_GATES.lock().unwrap().insert(n, gate.clone());
    touch_item(&store, 6, n);
    let stepping = std::thread::spawn(move || {
        let r = a.step();
        (a, r)
    });
    assert!(wait_until(Duration::from_secs(20), || gate
        .reached
        .load(Ordering::SeqCst)
        > 0));
    let took_over = wait_until(
        Duration::from_secs(10),
        || matches!(b.step(), Ok(Step::Applied(n)) if n > 0),
    );
    gate.release.store(true, Ordering::SeqCst);
    let (mut a, step_a) = stepping.join().unwrap();
    RUNNER_GATES.lock().unwrap().remove(&n);
    eprintln!("took over {took_over}, a: {step_a:?}");
    assert!(drain(&mut b) || drain(&mut a));
    assert_eq!(table(&store, "tally_async"), expected(&store));
}

#[derive(QueryableByName, Debug, PartialEq)]
struct CheckpointRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    position: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    state: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    holder: Option<String>,
}

fn checkpoint_row(store: &EventStore) -> CheckpointRow {
    diesel::sql_query(
        "SELECT position, state, holder FROM es_checkpoints WHERE projection = 'tally_async'",
    )
    .get_result::<CheckpointRow>(&mut *store.connection().unwrap())
    .unwrap()
}

/// The async variant of the panic in the final transaction: the runner's
/// row (taken for the rebuild in that transaction) is left as it was.
#[test]
fn a_panic_in_the_final_async_transaction_leaves_the_runner_alone() {
    let _serial = serial();
    for db in TestDatabase::all() {
        let store = fast(&db);
        let raw = db.store_with(StoreOptions {
            sqlite_sync: SqliteSync::Off,
            inline_projectors: false,
            ..StoreOptions::default()
        });
        load(&store, 10, 250);
        let mut runner = store.runner(Arc::new(GatedTally { before: false }));
        assert!(drain(&mut runner));
        let before_table = table(&store, "tally_async");
        let before_row = checkpoint_row(&store);
        let n = next_n();
        let gate = arm(n, true);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.rebuild_with(
                "tally_async",
                &RebuildOptions {
                    batch_size: 100,
                    ..Default::default()
                },
                |p| {
                    if p.events == 250 {
                        touch_item(&raw, 2, n);
                        // PostgreSQL: until followers can see it.
                        let head = raw.head().unwrap();
                        wait_until(Duration::from_secs(30), || {
                            let mut c = raw.connection().unwrap();
                            es_diesel::follow::read_after(
                                &mut c,
                                Default::default(),
                                None,
                                head as usize + 1,
                            )
                            .unwrap()
                            .len() as i64
                                == head
                        });
                    }
                },
            )
        }));
        disarm(n);
        assert!(panicked.is_err(), "{}: {panicked:?}", db.backend());
        assert_eq!(gate.reached.load(Ordering::SeqCst), 1, "{}", db.backend());
        assert_eq!(
            table(&store, "tally_async"),
            before_table,
            "{}",
            db.backend()
        );
        assert_eq!(checkpoint_row(&store), before_row, "{}", db.backend());
        assert!(claim_released(&store, "tally_async"), "{}", db.backend());
        assert_eq!(shadow_schemas(&store), 0, "{}", db.backend());
        assert!(drain(&mut runner));
        assert_eq!(
            table(&store, "tally_async"),
            expected(&store),
            "{}",
            db.backend()
        );
    }
}

struct SlowTally;

impl AsyncProjection for SlowTally {
    fn name(&self) -> &str {
        "tally_async"
    }
    fn event_types(&self) -> Option<Vec<&'static str>> {
        Some(vec!["ItemTouched"])
    }
    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> es_diesel::Result<()> {
        std::thread::sleep(Duration::from_millis(120));
        GatedTally { before: true }.apply(conn, event)
    }
}

/// A batch of slow events (each under half the lease, all together several
/// leases) keeps its lease: another runner polling all along never takes
/// the projection over, and every event counts once. (PostgreSQL: on SQLite
/// the batch holds the write lock.)
#[test]
fn a_long_batch_keeps_its_lease() {
    let _serial = serial();
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = fast(&db);
    load(&store, 5, 20);
    let options = es_diesel::runner::RunnerOptions {
        lease: Duration::from_millis(400),
        batch_size: 100,
        ..Default::default()
    };
    let mut a = es_diesel::runner::Runner::new(store.clone(), Arc::new(SlowTally), options.clone());
    let mut b = es_diesel::runner::Runner::new(store.clone(), Arc::new(SlowTally), options);
    // a holds the projection before b starts polling.
    let Step::Applied(mut applied) = a.step().unwrap() else {
        panic!("runner a did not take the projection");
    };
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut took = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match b.step() {
                    Ok(Step::Standby) => {}
                    other => took.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            took
        })
    };
    while applied < 20 {
        match a.step().unwrap() {
            Step::Applied(n) => applied += n,
            other => panic!("runner a lost the projection: {other:?}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let took = poller.join().unwrap();
    assert!(
        took.is_empty(),
        "runner b took over a live runner: {took:?}"
    );
    assert_eq!(table(&store, "tally_async"), expected(&store));
}
