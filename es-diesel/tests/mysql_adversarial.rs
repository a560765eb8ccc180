//! Adversarial tests of the MySQL / MariaDB backend: concurrent writers on
//! every public append path against a follower, killed connections,
//! implicit commits, hostile input, read-model keys, concurrent and
//! half-done migrations, rebuilds during appends.
//!
//! Each test runs only when `ES_TEST_MYSQL_URL` is set.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use es_diesel::follow::{read_after, Checkpoint, Followed};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, projector, write_transaction, Aggregate, DbConnection, Error, Event, EventStore,
    ExpectedVersion, ImportOptions, ImportRow, Metadata, NewEvent, ReadModel, Recorded,
    RecordedEvent, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- events

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    writer: u32,
    n: u64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Bumped {
    n: u64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Touched {
    key: String,
    n: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Blob {
    data: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Named {
    text: String,
}

/// Inline read model keyed by a string.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "adv_touches", primary_key = key)]
struct AdvTouches {
    key: String,
    touches: i32,
    last: i64,
}

#[projector(on = Touched, key = key)]
fn adv_touches(e: &Recorded<Touched>, row: &mut Option<AdvTouches>) {
    let mut r = row.take().unwrap_or(AdvTouches {
        key: e.key.clone(),
        touches: 0,
        last: 0,
    });
    r.touches += 1;
    r.last = e.n;
    *row = Some(r);
}

/// The same, kept by runners.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "adv_touches_async", primary_key = key, mode = async)]
struct AdvTouchesAsync {
    key: String,
    touches: i32,
    last: i64,
}

#[projector(on = Touched, key = key)]
fn adv_touches_async(e: &Recorded<Touched>, row: &mut Option<AdvTouchesAsync>) {
    let mut r = row.take().unwrap_or(AdvTouchesAsync {
        key: e.key.clone(),
        touches: 0,
        last: 0,
    });
    r.touches += 1;
    r.last = e.n;
    *row = Some(r);
}

/// A counter aggregate: every command bumps it once.
#[derive(Default, Debug, Clone)]
struct Counter {
    count: u64,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "adv_counter";
    type Event = Bumped;
    type Command = ();
    type Error = std::convert::Infallible;

    fn apply(&mut self, event: &Bumped) {
        self.count = event.n;
    }

    fn handle(&self, _: ()) -> Result<Vec<Bumped>, Self::Error> {
        Ok(vec![Bumped { n: self.count + 1 }])
    }
}

// ---------------------------------------------------------------- helpers

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName, Debug, PartialEq)]
struct KeyRow {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    touches: i64,
}

fn number(conn: &mut DbConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<N>(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

fn admin(db: &TestDatabase) -> MysqlConnection {
    MysqlConnection::establish(db.url()).expect("admin connection")
}

fn admin_number(conn: &mut MysqlConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<N>(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

/// Waits for `cond`, for up to 30 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The whole log, in position order.
fn whole_log(store: &EventStore) -> Vec<RecordedEvent> {
    store
        .iter_all(0, 500)
        .collect::<Result<Vec<_>, _>>()
        .expect("read the whole log")
}

fn tick(writer: u32, n: u64) -> Tick {
    Tick { writer, n }
}

fn write(stream: &str, expected: ExpectedVersion, events: &[Tick]) -> StreamWrite {
    let mut w = StreamWrite::new(stream, expected);
    for e in events {
        w.push(e).unwrap();
    }
    w
}

fn rolled_back() -> Error {
    Error::Malformed {
        position: 0,
        reason: "rolled back on purpose".into(),
    }
}

/// Tiny deterministic generator.
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

/// The rows of `adv_touches`, by key.
fn touches_rows(store: &EventStore) -> Vec<KeyRow> {
    table_rows(store, "adv_touches")
}

fn table_rows(store: &EventStore, table: &str) -> Vec<KeyRow> {
    let mut conn = store.connection().unwrap();
    diesel::sql_query(format!(
        "SELECT \"key\" AS \"key\", CAST(touches AS SIGNED) AS touches FROM {table} ORDER BY \"key\""
    ))
    .load::<KeyRow>(&mut *conn)
    .unwrap()
}

/// What `adv_touches` must hold: a fold of the log's `Touched` events, by
/// exact (byte-wise) key.
fn touches_expected(store: &EventStore) -> Vec<KeyRow> {
    let mut by_key: BTreeMap<String, i64> = BTreeMap::new();
    for ev in whole_log(store) {
        if ev.event_type == "Touched" {
            let t: Touched = ev.decode::<Touched>().unwrap().event;
            *by_key.entry(t.key).or_default() += 1;
        }
    }
    let mut rows: Vec<KeyRow> = by_key
        .into_iter()
        .map(|(key, touches)| KeyRow { key, touches })
        .collect();
    rows.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    rows
}

fn sorted_bytewise(mut rows: Vec<KeyRow>) -> Vec<KeyRow> {
    rows.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    rows
}

// ---------------------------------------------------------------- tests

/// Gap safety, end to end: six writers use every public append path at
/// once (autocommitted `append` with `Any` and `NoStream`, multi-stream
/// `append_streams`, `append_in` inside `write_transaction` with refused
/// appends, savepoints and rollbacks, `execute` on an aggregate, `import`,
/// and appends that run an inline projector) while a follower reads with
/// `read_after` in pages of varying size. The follower must see exactly
/// the final log, in order: every event once, no skip, each stream's
/// versions 1, 2, 3, …; positions are gap-free (rolled-back appends give
/// theirs back); the inline read model equals a fold of the log.
#[test]
fn a_follower_sees_every_event_once_whatever_path_appended_it() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store_with(StoreOptions {
        pool_size: 12,
        ..StoreOptions::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            let mut seen: Vec<Followed> = Vec::new();
            let mut cp = Checkpoint::default();
            let mut page = 1;
            loop {
                let stopped = stop.load(Ordering::SeqCst);
                let got = read_after(&mut conn, cp, None, page).unwrap();
                page = page % 7 + 1;
                if got.is_empty() {
                    if stopped {
                        return seen;
                    }
                    std::thread::yield_now();
                    continue;
                }
                for f in got {
                    assert!(f.checkpoint > cp, "checkpoints only move forward");
                    cp = f.checkpoint;
                    seen.push(f);
                }
            }
        })
    };
    const ROUNDS: u64 = 300;
    let mut writers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    // 0: autocommitted single appends, Any on shared streams and NoStream
    // on fresh ones.
    writers.push({
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                store
                    .append(
                        &format!("plain-{}", i % 5),
                        ExpectedVersion::Any,
                        [tick(0, i)],
                    )
                    .unwrap();
                store
                    .append(
                        &format!("fresh-{i}"),
                        ExpectedVersion::NoStream,
                        [tick(0, i)],
                    )
                    .unwrap();
            }
        })
    });
    // 1: multi-stream appends (given in reverse id order).
    writers.push({
        let store = store.clone();
        std::thread::spawn(move || {
            let mut rng = Lcg(11);
            for i in 0..ROUNDS {
                let mut streams: Vec<String> =
                    (0..3).map(|_| format!("multi-{}", rng.next(6))).collect();
                streams.sort();
                streams.dedup();
                streams.reverse();
                let writes: Vec<StreamWrite> = streams
                    .iter()
                    .map(|s| write(s, ExpectedVersion::Any, &[tick(1, i), tick(1, i)]))
                    .collect();
                store.append_streams(&writes).unwrap();
            }
        })
    });
    // 2: append_in inside the caller's transactions: a refused append, a
    // savepoint rolled back, and every fourth transaction rolled back.
    writers.push({
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            for i in 0..ROUNDS {
                let res = write_transaction(&mut conn, |c| -> Result<(), Error> {
                    let own = format!("tx-{i}");
                    append_in(c, &[write(&own, ExpectedVersion::NoStream, &[tick(2, i)])])?;
                    let refused =
                        append_in(c, &[write(&own, ExpectedVersion::NoStream, &[tick(2, i)])]);
                    assert!(
                        matches!(refused, Err(Error::Conflict { .. })),
                        "{refused:?}"
                    );
                    let inner = write_transaction(c, |c| -> Result<(), Error> {
                        append_in(
                            c,
                            &[write("tx-shared", ExpectedVersion::Any, &[tick(2, i)])],
                        )?;
                        Err(rolled_back())
                    });
                    assert!(inner.is_err());
                    append_in(
                        c,
                        &[
                            write("tx-shared", ExpectedVersion::Any, &[tick(2, i)]),
                            write(&own, ExpectedVersion::Exact(1), &[tick(2, i)]),
                        ],
                    )?;
                    if i % 4 == 3 {
                        return Err(rolled_back());
                    }
                    Ok(())
                });
                if i % 4 == 3 {
                    assert!(res.is_err());
                } else {
                    res.unwrap();
                }
            }
        })
    });
    // 3: commands on three aggregates (conflicts retried by execute).
    for t in 0..2u64 {
        writers.push({
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..ROUNDS / 2 {
                    store
                        .execute::<Counter>(&format!("c{}", (i + t) % 3), ())
                        .unwrap();
                }
            })
        });
    }
    // 4: an import in small batches over a few streams.
    writers.push({
        let store = store.clone();
        std::thread::spawn(move || {
            let rows = (0..ROUNDS * 2).map(|i| ImportRow {
                stream_id: format!("imp-{}", i % 4),
                key: i.to_string(),
                event: tick(4, i),
            });
            let options = ImportOptions {
                batch_size: 7,
                ..ImportOptions::new("adversarial")
            };
            let report = store.import(rows, &options, |_| {}).unwrap();
            assert_eq!(report.imported, ROUNDS * 2);
        })
    });
    // 5: appends that run an inline projector.
    writers.push({
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                store
                    .append(
                        &format!("touch-{}", i % 3),
                        ExpectedVersion::Any,
                        [Touched {
                            key: format!("k{}", i % 4),
                            n: i as i64,
                        }],
                    )
                    .unwrap();
            }
        })
    });
    for w in writers {
        w.join().expect("a writer failed");
    }
    stop.store(true, Ordering::SeqCst);
    let seen = follower.join().expect("the follower failed");
    let log = whole_log(&store);

    let seen_ids: Vec<_> = seen.iter().map(|f| f.event.event_id).collect();
    let log_ids: Vec<_> = log.iter().map(|e| e.event_id).collect();
    if seen_ids != log_ids {
        let seen_pos: std::collections::HashSet<i64> =
            seen.iter().map(|f| f.event.global_position).collect();
        let missed: Vec<i64> = log
            .iter()
            .map(|e| e.global_position)
            .filter(|p| !seen_pos.contains(p))
            .collect();
        panic!(
            "the follower saw {} events, the log holds {}; positions it skipped: {:?}",
            seen_ids.len(),
            log_ids.len(),
            &missed[..missed.len().min(50)]
        );
    }
    let mut versions: HashMap<&str, i64> = HashMap::new();
    for f in &seen {
        let v = versions.entry(f.event.stream_id.as_str()).or_default();
        assert_eq!(
            f.event.stream_version,
            *v + 1,
            "stream {} out of order for the follower",
            f.event.stream_id
        );
        *v += 1;
    }
    let positions: Vec<i64> = log.iter().map(|e| e.global_position).collect();
    let expected: Vec<i64> = (1..=log.len() as i64).collect();
    assert!(
        positions == expected,
        "positions are not gap-free although every rolled-back append gives its positions back"
    );
    assert_eq!(store.head().unwrap(), log.len() as i64);
    assert_eq!(
        sorted_bytewise(touches_rows(&store)),
        touches_expected(&store),
        "the inline read model differs from the log"
    );
}

/// An idle pooled connection that the server kills (`KILL`, a server
/// restart, `wait_timeout`) may fail the one call that finds it dead, but
/// must then leave the pool: the store recovers by itself instead of
/// failing every call that draws that connection (`store.rs`: "a
/// connection the server closed fails its next query with an error, and
/// is then dropped").
#[test]
fn a_killed_idle_pooled_connection_is_dropped_after_one_failure() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store_with(StoreOptions {
        pool_size: 1,
        ..StoreOptions::default()
    });
    store
        .append("k", ExpectedVersion::Any, [tick(0, 0)])
        .unwrap();
    let id = number(
        &mut store.connection().unwrap(),
        "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n",
    );
    let mut admin = admin(&db);
    admin
        .batch_execute(&format!("KILL CONNECTION {id}"))
        .unwrap();
    wait_for("the killed connection to go", || {
        admin_number(
            &mut admin,
            &format!("SELECT COUNT(*) AS n FROM information_schema.processlist WHERE id = {id}"),
        ) == 0
    });
    let first = store.append("k", ExpectedVersion::Any, [tick(0, 1)]);
    let mut errors = Vec::new();
    for i in 2..7 {
        if let Err(e) = store.append("k", ExpectedVersion::Any, [tick(0, i)]) {
            errors.push(e.to_string());
        }
    }
    assert!(
        errors.is_empty(),
        "after the first call ({}), {} of 5 appends still failed on the dead connection: {:?}",
        match &first {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("failed: {e}"),
        },
        errors.len(),
        errors.first()
    );
    // Plain reads recover as well.
    assert!(store.read_all(0, 10).is_ok());
}

/// A writer killed while it holds the head (its transaction appended and
/// is still open) frees the head at once: a later append goes on, nobody
/// ever sees the killed writer's event, its caller gets an error, and the
/// store works afterwards.
#[test]
fn a_writer_killed_while_holding_the_head_frees_it() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store_with(StoreOptions {
        pool_size: 3,
        ..StoreOptions::default()
    });
    store
        .append("before", ExpectedVersion::NoStream, [tick(0, 0)])
        .unwrap();
    let (id_tx, id_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let victim = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                append_in(
                    c,
                    &[write("victim", ExpectedVersion::NoStream, &[tick(1, 1)])],
                )?;
                let id = number(c, "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n");
                id_tx.send(id).unwrap();
                go_rx.recv().unwrap();
                Ok(())
            })
        })
    };
    let id = id_rx.recv().unwrap();
    let later = {
        let store = store.clone();
        std::thread::spawn(move || store.append("later", ExpectedVersion::NoStream, [tick(2, 2)]))
    };
    // The later append queues behind the head.
    let mut admin = admin(&db);
    wait_for("the later append to wait for the head", || {
        admin_number(
            &mut admin,
            "SELECT COUNT(*) AS n FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'",
        ) > 0
    });
    admin
        .batch_execute(&format!("KILL CONNECTION {id}"))
        .unwrap();
    wait_for("the later append to go on", || later.is_finished());
    let later = later.join().unwrap().expect("the later append");
    go_tx.send(()).unwrap();
    let victim = victim.join().unwrap();
    assert!(victim.is_err(), "the killed writer's commit must fail");
    assert_eq!(store.stream_version("victim").unwrap(), 0);
    let streams: Vec<String> = whole_log(&store).into_iter().map(|e| e.stream_id).collect();
    assert_eq!(streams, ["before", "later"]);
    assert_eq!(
        later[0].global_position, 2,
        "the killed append gave its position back"
    );
    for i in 0..5 {
        store
            .append("after", ExpectedVersion::Any, [tick(3, i)])
            .expect("the store works after the kill");
    }
}

/// Big payloads: an 8 MB payload reads back byte for byte (through
/// `read_stream`, `read_all` and a follower); one above the server's
/// `max_allowed_packet` (16 MB by default) is refused with nothing written, and
/// the store keeps working afterwards (the server drops a connection that
/// sent too big a packet: the pool must not keep handing it out).
#[test]
fn huge_payloads_round_trip_or_are_refused_without_harm() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store_with(StoreOptions {
        pool_size: 1,
        ..StoreOptions::default()
    });
    let big: String = "é🦀x".repeat(8 * 1024 * 1024 / 7);
    let rec = store
        .append(
            "big",
            ExpectedVersion::NoStream,
            [Blob { data: big.clone() }],
        )
        .unwrap();
    assert_eq!(rec[0].stream_version, 1);
    let back = store.load_stream::<Blob>("big").unwrap();
    assert!(back[0].event.data == big, "8 MB payload changed on the way");
    let all = store.read_all(0, 10).unwrap();
    assert_eq!(all.len(), 1);
    let mut conn = store.connection().unwrap();
    let f = read_after(&mut conn, Checkpoint::default(), None, 10).unwrap();
    assert!(f[0].event.decode::<Blob>().unwrap().event.data == big);
    drop(conn);

    #[derive(QueryableByName)]
    struct Packet {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let max_packet = diesel::sql_query("SELECT CAST(@@max_allowed_packet AS SIGNED) AS n")
        .get_result::<Packet>(&mut *store.connection().unwrap())
        .unwrap()
        .n as usize;
    if max_packet > 256 * 1024 * 1024 {
        eprintln!("max_allowed_packet is {max_packet}: the oversize part is skipped");
        return;
    }
    let huge: String = "y".repeat(max_packet + 1024 * 1024);
    let refused = store.append("huge", ExpectedVersion::NoStream, [Blob { data: huge }]);
    assert!(
        refused.is_err(),
        "a payload over max_allowed_packet was accepted?"
    );
    // The store must recover: at most this one failure.
    let mut errors = Vec::new();
    for i in 0..3 {
        if let Err(e) = store.append("after-huge", ExpectedVersion::Any, [tick(0, i)]) {
            errors.push(e.to_string());
        }
    }
    assert!(
        errors.is_empty(),
        "after a refused oversize append ({}), appends keep failing: {errors:?}",
        refused.err().map(|e| e.to_string()).unwrap_or_default()
    );
    assert_eq!(store.stream_version("huge").unwrap(), 0);
    assert_eq!(store.stream_version("after-huge").unwrap(), 3);
}

/// Hostile stream ids: 100 KB long (two differing only at the end),
/// differing only by trailing spaces, case, Unicode normalisation, emoji,
/// quotes, backslashes, LIKE wildcards, control characters. Each is its
/// own stream (as on every backend), reads back identically everywhere,
/// and its expectations are judged on its own events.
#[test]
fn hostile_stream_ids_are_distinct_and_read_back_identically() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let long = "x".repeat(100_000);
    let ids: Vec<String> = vec![
        "a".into(),
        "a ".into(),
        "a  ".into(),
        " a".into(),
        "A".into(),
        "é".into(),
        "e\u{301}".into(),
        "🦀 stream".into(),
        "it's \"quoted\" \\ back".into(),
        "%_".into(),
        "%".into(),
        "tab\there\nnewline\r".into(),
        "\u{feff}bom".into(),
        "\u{10FFFF}".into(),
        format!("{long}1"),
        format!("{long}2"),
    ];
    let meta = Metadata::new()
        .actor("ünïcødé 🦀")
        .with("клю\u{10FFFF}ч", "значение \u{1F600}")
        .with("nested", serde_json::json!({"a": [1, 2, {"b": "🦀"}]}));
    for (i, id) in ids.iter().enumerate() {
        store
            .append_with(
                id,
                ExpectedVersion::NoStream,
                [Named { text: id.clone() }],
                &meta,
            )
            .unwrap_or_else(|e| panic!("stream #{i}: {e}"));
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(store.stream_version(id).unwrap(), 1, "stream #{i}");
        let evs = store.read_stream(id, 1, 10).unwrap();
        assert_eq!(evs.len(), 1, "stream #{i} holds another stream's events");
        assert!(evs[0].stream_id == *id, "stream #{i}: id changed");
        assert_eq!(evs[0].metadata, meta, "stream #{i}: metadata changed");
        let named = evs[0].decode::<Named>().unwrap();
        assert!(named.event.text == *id, "stream #{i}: payload changed");
        let again = store.append(
            id,
            ExpectedVersion::NoStream,
            [Named {
                text: String::new(),
            }],
        );
        assert!(
            matches!(again, Err(Error::Conflict { actual: 1, .. })),
            "stream #{i}: {again:?}"
        );
        store
            .append(id, ExpectedVersion::Exact(1), [Named { text: id.clone() }])
            .unwrap_or_else(|e| panic!("stream #{i} at version 1: {e}"));
    }
    let log = whole_log(&store);
    assert_eq!(log.len(), ids.len() * 2);
    for (i, id) in ids.iter().enumerate() {
        assert!(log[i].stream_id == *id, "read_all changed stream #{i}");
    }
}

/// Event type names: 2,000 bytes (500 4-byte characters) are stored and read
/// back exactly, names differing by trailing spaces stay apart, and 2,001
/// bytes are refused with an error that names the event type column,
/// nothing is written, and the store goes on.
#[test]
fn event_type_names_at_and_over_the_limit() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let event = |ty: &str| -> NewEvent {
        let mut e = NewEvent::new(&Named { text: "t".into() }).unwrap();
        e.event_type = Box::leak(ty.to_owned().into_boxed_str());
        e
    };
    for ty in ["T".repeat(500), "🦀".repeat(500), "a ".repeat(250)] {
        let mut w = StreamWrite::new("types", ExpectedVersion::Any);
        w.push_new(event(&ty));
        store.append_streams(&[w]).unwrap();
        let last = store.read_all(store.head().unwrap() - 1, 1).unwrap();
        assert!(last[0].event_type == ty, "event type changed on the way");
        let by_type = store.read_types(&[ty.as_str()], 0, 10).unwrap();
        assert_eq!(by_type.len(), 1, "read_types by a 500-char name");
    }
    // Names that differ only by trailing spaces are different types.
    for ty in ["P", "P ", "P  "] {
        let mut w = StreamWrite::new("padded", ExpectedVersion::Any);
        w.push_new(event(ty));
        store.append_streams(&[w]).unwrap();
    }
    for ty in ["P", "P ", "P  "] {
        let by_type = store.read_types(&[ty], 0, 10).unwrap();
        assert_eq!(by_type.len(), 1, "read_types by {ty:?}");
        assert_eq!(by_type[0].event_type, ty);
    }
    let head = store.head().unwrap();
    let mut w = StreamWrite::new("types-over", ExpectedVersion::NoStream);
    w.push_new(event(&"T".repeat(2001)));
    match store.append_streams(&[w]) {
        Ok(rec) => {
            let back = store.read_all(head, 1).unwrap();
            assert!(
                back[0].event_type.len() == 2001,
                "type cut to {}",
                back[0].event_type.len()
            );
            assert_eq!(rec.len(), 1);
        }
        Err(e) => {
            assert!(e.to_string().contains("event_type"), "unclear error: {e}");
            assert_eq!(store.head().unwrap(), head, "something was written");
            assert_eq!(store.stream_version("types-over").unwrap(), 0);
        }
    }
    store
        .append("types-after", ExpectedVersion::NoStream, [tick(0, 0)])
        .unwrap();
}

/// A read model keyed by a string keeps keys that differ only in trailing
/// spaces apart, as the log does (their streams are distinct) and as the
/// other backends do: every append of a valid event succeeds, the inline
/// rows and a rebuild's rows both equal a fold of the log. MySQL's
/// `utf8mb4_bin`, which the read-model tables use, is a PAD SPACE
/// collation (`'k' = 'k '`): the projector of `k ` is handed the row of `k`
/// and the append is refused as a projector error.
#[test]
fn read_model_keys_differing_by_trailing_spaces_stay_apart() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let mut refused = Vec::new();
    for (stream, key) in [("t-1", "k"), ("t-2", "k "), ("t-3", "k\t"), ("t-4", "k  ")] {
        if let Err(e) = store.append(
            stream,
            ExpectedVersion::NoStream,
            [Touched {
                key: key.into(),
                n: 1,
            }],
        ) {
            refused.push(format!("{key:?}: {e}"));
        }
    }
    let expected = touches_expected(&store);
    let inline = sorted_bytewise(touches_rows(&store));
    // Rebuilt from a log that holds the refused keys too.
    if !refused.is_empty() {
        let mut raw = admin(&db);
        raw.batch_execute(&format!(
            "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata) \
             VALUES ('{}', 't-2', 1, 'Touched', 1, '{{\"key\": \"k \", \"n\": 1}}', '{{}}')",
            uuid::Uuid::new_v4()
        ))
        .unwrap();
    }
    let expected_all = touches_expected(&store);
    let rebuilt = store.rebuild("adv_touches");
    let after_rebuild = sorted_bytewise(touches_rows(&store));
    assert!(
        refused.is_empty() && inline == expected && rebuilt.is_ok() && after_rebuild == expected_all,
        "keys differing by trailing spaces collide: appends refused: {refused:?}; \
         inline rows {inline:?} (want {expected:?}); rebuild: {:?}; rows after it: {after_rebuild:?} (want {expected_all:?})",
        rebuilt.map(|r| r.rows)
    );
}

/// Two processes run `migrate` on a fresh database at the same moment:
/// both succeed (one waits for the other), the schema is whole (one head
/// row, the three triggers, the guard), and appends and followers work.
#[test]
fn two_migrates_at_once_on_a_fresh_database() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let a = EventStore::open(db.url()).unwrap();
    let b = EventStore::open(db.url()).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let runs: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                s.migrate()
            })
        })
        .collect();
    for r in runs {
        r.join().unwrap().expect("concurrent migrate");
    }
    a.check_migrated().unwrap();
    b.check_migrated().unwrap();
    let mut admin = admin(&db);
    assert_eq!(
        admin_number(&mut admin, "SELECT COUNT(*) AS n FROM es_log_head"),
        1
    );
    assert_eq!(
        admin_number(
            &mut admin,
            "SELECT COUNT(*) AS n FROM information_schema.triggers WHERE trigger_schema = DATABASE() AND event_object_table = 'es_events'"
        ),
        3
    );
    assert_eq!(
        admin_number(&mut admin, "SELECT COUNT(*) AS n FROM es_schema_migrations"),
        i64::from(a.schema_versions().unwrap().0),
        "every migration applied once"
    );
    a.append("m", ExpectedVersion::NoStream, [tick(0, 1)])
        .unwrap();
    b.append("m", ExpectedVersion::Exact(1), [tick(0, 2)])
        .unwrap();
    let positions: Vec<i64> = whole_log(&a).iter().map(|e| e.global_position).collect();
    assert_eq!(positions, [1, 2]);
}

/// A `migrate` that crashed half-way through migration 1 (the event table
/// and the head table exist, the head row, the triggers and the other
/// tables do not, no version recorded) is completed by the next one, and
/// the log then works: positions from the trigger, append-only guards.
#[test]
fn migrate_completes_a_migration_that_crashed_half_way() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let mut admin = admin(&db);
    admin
        .batch_execute(
            r#"
SET SESSION sql_mode = 'ANSI_QUOTES,STRICT_ALL_TABLES';
CREATE TABLE es_schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS es_events (
    global_position BIGINT      NOT NULL DEFAULT 0 PRIMARY KEY,
    event_id        CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    stream_id       MEDIUMTEXT  NOT NULL,
    stream_hash     BINARY(16)  AS (UNHEX(MD5(stream_id))) STORED,
    stream_version  BIGINT      NOT NULL CHECK (stream_version > 0),
    event_type      VARCHAR(500) NOT NULL,
    event_version   SMALLINT    NOT NULL CHECK (event_version > 0),
    payload         LONGTEXT    NOT NULL,
    metadata        LONGTEXT    NOT NULL,
    created_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY es_events_event_id (event_id),
    UNIQUE KEY es_events_stream (stream_hash, stream_version),
    KEY es_events_by_type (event_type, global_position)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE TABLE IF NOT EXISTS es_log_head (
    id       TINYINT NOT NULL PRIMARY KEY,
    position BIGINT  NOT NULL
) ENGINE = InnoDB;
"#,
        )
        .unwrap();
    let store = db.store();
    store.check_migrated().unwrap();
    for i in 0..3 {
        store
            .append("after-crash", ExpectedVersion::Any, [tick(0, i)])
            .unwrap();
    }
    let positions: Vec<i64> = whole_log(&store)
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(positions, [1, 2, 3]);
    assert!(admin.batch_execute("DELETE FROM es_events").is_err());
    assert!(admin.batch_execute("TRUNCATE TABLE es_events").is_err());
    // And a third migrate changes nothing.
    store.migrate().unwrap();
    assert_eq!(
        admin_number(&mut admin, "SELECT COUNT(*) AS n FROM es_log_head"),
        1
    );
}

/// Rebuilds while appends (with their inline projector) go on, two at a
/// time: each rebuild succeeds or is refused as in progress, and the read
/// model ends equal to a fold of the whole log.
#[test]
fn rebuilds_twice_at_once_during_appends_keep_the_read_model_exact() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let done = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let store = store.clone();
            let done = done.clone();
            let appended = appended.clone();
            std::thread::spawn(move || {
                let mut i = 0i64;
                while !done.load(Ordering::SeqCst) || i < 40 {
                    store
                        .append(
                            &format!("rb-{t}-{}", i % 3),
                            ExpectedVersion::Any,
                            [Touched {
                                key: format!("key-{}", (i + t as i64) % 7),
                                n: i,
                            }],
                        )
                        .unwrap();
                    appended.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    wait_for("appends before the first rebuild", || {
        appended.load(Ordering::SeqCst) >= 30
    });
    let rebuilders: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                for _ in 0..3 {
                    match store.rebuild("adv_touches") {
                        Ok(_) => ok += 1,
                        Err(Error::RebuildInProgress { .. }) => {}
                        Err(e) => panic!("rebuild failed: {e}"),
                    }
                }
                ok
            })
        })
        .collect();
    let rebuilt: i32 = rebuilders.into_iter().map(|r| r.join().unwrap()).sum();
    done.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(rebuilt >= 1, "no rebuild went through");
    assert_eq!(
        sorted_bytewise(touches_rows(&store)),
        touches_expected(&store),
        "the read model lost or doubled events during the rebuilds"
    );
}

/// Inside one transaction: an append, a savepoint that appends and rolls
/// back, an append refused for a duplicate event id (a three-event chunk
/// whose third event repeats a logged id: the first two took positions in
/// the trigger before the statement failed), and a last append. The
/// transaction commits the first and last appends only, with consecutive
/// positions, and followers see exactly those.
#[test]
fn failed_statements_and_savepoints_give_their_positions_back() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let logged = store
        .append("logged", ExpectedVersion::NoStream, [tick(0, 0)])
        .unwrap();
    let logged_id = logged[0].event_id;
    let mut conn = store.connection().unwrap();
    write_transaction(&mut conn, |c| -> Result<(), Error> {
        append_in(
            c,
            &[write("first", ExpectedVersion::NoStream, &[tick(1, 1)])],
        )?;
        let sp = write_transaction(c, |c| -> Result<(), Error> {
            append_in(
                c,
                &[write(
                    "savepoint",
                    ExpectedVersion::NoStream,
                    &[tick(1, 2), tick(1, 3)],
                )],
            )?;
            Err(rolled_back())
        });
        assert!(sp.is_err());
        let mut dup = write("dup", ExpectedVersion::NoStream, &[tick(1, 4), tick(1, 5)]);
        dup.push_new(NewEvent::new(&tick(1, 6)).unwrap().with_id(logged_id));
        let refused = append_in(c, &[dup]);
        assert!(
            matches!(refused, Err(Error::DuplicateEventId { event_id }) if event_id == logged_id),
            "{refused:?}"
        );
        append_in(
            c,
            &[write("last", ExpectedVersion::NoStream, &[tick(1, 7)])],
        )?;
        Ok(())
    })
    .unwrap();
    drop(conn);
    let log = whole_log(&store);
    let got: Vec<(String, i64)> = log
        .iter()
        .map(|e| (e.stream_id.clone(), e.global_position))
        .collect();
    assert_eq!(
        got,
        [
            ("logged".to_owned(), 1),
            ("first".to_owned(), 2),
            ("last".to_owned(), 3)
        ]
    );
    let mut conn = store.connection().unwrap();
    let followed = read_after(&mut conn, Checkpoint::default(), None, 10).unwrap();
    assert_eq!(followed.len(), 3);
    assert_eq!(
        number(&mut conn, "SELECT position AS n FROM es_log_head"),
        3
    );
}

static TRANSIENT: AtomicU64 = AtomicU64::new(0);

/// Two runners of one async read model step at once (one holds the lease,
/// the other stands by or takes over) while writers append and a rebuild of
/// the read model runs: every event is applied exactly once. (Steps that
/// fail as deadlock victims are retried here; see
/// `two_runners_of_one_projection_never_fail_a_step`.)
#[test]
fn two_runners_and_a_rebuild_apply_every_event_once() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let projection = es_diesel::runner::async_read_models()
        .unwrap()
        .into_iter()
        .find(|p| p.name() == "adv_touches_async")
        .expect("the async read model is registered");
    let done = Arc::new(AtomicBool::new(false));
    let runners: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let projection = projection.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut runner = store.runner(projection);
                let mut applied = 0usize;
                while !done.load(Ordering::SeqCst) {
                    match runner.step() {
                        Ok(es_diesel::runner::Step::Applied(n)) => applied += n,
                        Ok(es_diesel::runner::Step::Standby) => std::thread::yield_now(),
                        Ok(es_diesel::runner::Step::Failed { position }) => {
                            panic!("runner failed at {position}")
                        }
                        // A deadlock victim: nothing was written, step again.
                        Err(e) if e.is_transient() => {
                            TRANSIENT.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("runner error: {e}"),
                    }
                }
                applied
            })
        })
        .collect();
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..150i64 {
                    store
                        .append(
                            &format!("run-{t}-{}", i % 4),
                            ExpectedVersion::Any,
                            [Touched {
                                key: format!("key-{}", (i + t as i64) % 9),
                                n: i,
                            }],
                        )
                        .unwrap();
                    if t == 0 && i == 75 {
                        match store.rebuild("adv_touches_async") {
                            Ok(_) | Err(Error::RebuildInProgress { .. }) => {}
                            Err(e) => panic!("rebuild failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let expected = touches_expected(&store);
    wait_for("the runners to catch up", || {
        sorted_bytewise(table_rows(&store, "adv_touches_async")) == expected
    });
    done.store(true, Ordering::SeqCst);
    for r in runners {
        r.join().expect("a runner panicked");
    }
    // Nothing more arrives later (no double application).
    let mut runner = store.runner(projection);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match runner.step().unwrap() {
            es_diesel::runner::Step::Applied(0) => break,
            es_diesel::runner::Step::Standby if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            es_diesel::runner::Step::Applied(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        sorted_bytewise(table_rows(&store, "adv_touches_async")),
        expected
    );
    eprintln!(
        "runner steps aborted as deadlock victims: {}",
        TRANSIENT.load(Ordering::SeqCst)
    );
}

/// Two runners of one projection (two worker processes for availability)
/// while events arrive: the standby one finds the lease taken and stands
/// by; no step of either fails. On MySQL the standby's lease transaction
/// (`INSERT IGNORE` of the checkpoint row, which takes a shared lock on the
/// existing row, then `UPDATE` of it) deadlocks with the holder's batch
/// (its checkpoint `UPDATE`) and with the other's lease check: steps fail
/// with a deadlock, which `Runner::run` logs as an error, records as the
/// projection's `last_error` and answers with a back-off.
#[test]
fn two_runners_of_one_projection_never_fail_a_step() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let projection = es_diesel::runner::async_read_models()
        .unwrap()
        .into_iter()
        .find(|p| p.name() == "adv_touches_async")
        .expect("the async read model is registered");
    let done = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(3));
    let runners: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let projection = projection.clone();
            let done = done.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut runner = store.runner(projection);
                let mut errors = Vec::new();
                barrier.wait();
                while !done.load(Ordering::SeqCst) {
                    match runner.step() {
                        Ok(es_diesel::runner::Step::Failed { position }) => {
                            panic!("runner failed at {position}")
                        }
                        Ok(_) => {}
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors
            })
        })
        .collect();
    barrier.wait();
    for i in 0..200i64 {
        store
            .append(
                &format!("ha-{}", i % 5),
                ExpectedVersion::Any,
                [Touched {
                    key: format!("key-{}", i % 9),
                    n: i,
                }],
            )
            .unwrap();
    }
    let expected = touches_expected(&store);
    wait_for("the runners to catch up", || {
        sorted_bytewise(table_rows(&store, "adv_touches_async")) == expected
    });
    done.store(true, Ordering::SeqCst);
    let errors: Vec<String> = runners
        .into_iter()
        .flat_map(|r| r.join().expect("a runner panicked"))
        .collect();
    assert!(
        errors.is_empty(),
        "{} runner steps failed, e.g. {:?}",
        errors.len(),
        errors.first()
    );
}

/// Statements this session has sent the server, and the session's
/// transaction flag, read in one statement.
fn session_counts(conn: &mut DbConnection) -> (i64, i64, i64) {
    #[derive(QueryableByName)]
    struct Counts {
        #[diesel(sql_type = BigInt)]
        questions: i64,
        #[diesel(sql_type = BigInt)]
        set_options: i64,
        #[diesel(sql_type = BigInt)]
        in_transaction: i64,
    }
    let c: Counts = diesel::sql_query(
        "SELECT \
           (SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.SESSION_STATUS \
             WHERE VARIABLE_NAME = 'QUESTIONS') AS questions, \
           (SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.SESSION_STATUS \
             WHERE VARIABLE_NAME = 'COM_SET_OPTION') AS set_options, \
           CAST(@@in_transaction AS SIGNED) AS in_transaction",
    )
    .get_result(conn)
    .unwrap();
    (c.questions, c.set_options, c.in_transaction)
}

/// `write_transaction` opens and ends a MySQL transaction with one
/// statement each (Diesel's own `BEGIN` and `COMMIT` go through
/// `batch_execute`, which switches multi-statement mode on and off around
/// them: three round trips each), whether it commits or rolls back, and
/// keeps Diesel's transaction depth right: savepoints nest inside it, the
/// server's transaction ends with it, and Diesel's own `transaction` works
/// on the connection afterwards.
#[test]
fn a_transaction_is_opened_and_ended_with_one_statement_each() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let mut conn = store.connection().unwrap();
    let (q0, opts0, in0) = session_counts(&mut conn);
    assert_eq!(in0, 0);
    let (q1, _, _) = session_counts(&mut conn);
    let per_read = q1 - q0;

    // Commits: BEGIN, the read inside, COMMIT, then the read after it.
    let inside =
        write_transaction(&mut conn, |c| -> Result<_, Error> { Ok(session_counts(c)) }).unwrap();
    assert_eq!(inside.2, 1, "the server has a transaction open inside");
    let (q2, opts2, in2) = session_counts(&mut conn);
    assert_eq!(in2, 0, "the transaction ended");
    assert_eq!(
        q2 - q1,
        2 * per_read + 2,
        "BEGIN and COMMIT, one statement each"
    );
    assert_eq!(opts2, opts0, "no multi-statement switching");

    // Rolls back: the append inside is gone, and so is the transaction.
    let refused = write_transaction(&mut conn, |c| -> Result<(), Error> {
        append_in(
            c,
            &[write("rolled", ExpectedVersion::NoStream, &[tick(1, 1)])],
        )?;
        Err(rolled_back())
    });
    assert!(refused.is_err());
    let (_, _, in3) = session_counts(&mut conn);
    assert_eq!(in3, 0, "the transaction was rolled back");
    assert_eq!(number(&mut conn, "SELECT COUNT(*) AS n FROM es_events"), 0);

    // Nested: a savepoint rolled back inside a committed transaction.
    write_transaction(&mut conn, |c| -> Result<(), Error> {
        append_in(
            c,
            &[write("outer", ExpectedVersion::NoStream, &[tick(1, 2)])],
        )?;
        let inner = write_transaction(c, |c| -> Result<(), Error> {
            append_in(
                c,
                &[write("inner", ExpectedVersion::NoStream, &[tick(1, 3)])],
            )?;
            Err(rolled_back())
        });
        assert!(inner.is_err());
        Ok(())
    })
    .unwrap();
    let streams: Vec<String> = whole_log(&store).into_iter().map(|e| e.stream_id).collect();
    assert_eq!(streams, ["outer"]);

    // Diesel's own transaction finds the depth at zero.
    conn.transaction(|c| {
        assert_eq!(session_counts(c).2, 1);
        diesel::result::QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(session_counts(&mut conn).2, 0);
}

/// The session's count of internal temporary tables.
fn temporary_tables(conn: &mut DbConnection) -> i64 {
    number(
        conn,
        "SELECT CAST(VARIABLE_VALUE AS SIGNED) AS n FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME = 'CREATED_TMP_TABLES'",
    )
}

/// A one-event append that expects a version or no stream (every
/// command's) is an `INSERT … VALUES` and materializes no internal
/// temporary table; one that expects any version or an existing stream is an
/// `INSERT … SELECT` reading the table it writes, which MariaDB buffers in
/// one, and not also one for a derived table of the event's values, as the
/// general form of several events does. Expectations that do not hold
/// (stale, ahead of the stream, a new stream that exists) write nothing and
/// create no table. The events of both forms get their versions and
/// positions in order.
#[test]
fn a_one_event_append_materializes_at_most_one_temporary_table() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let mut conn = store.connection().unwrap();
    let t0 = temporary_tables(&mut conn);
    let t1 = temporary_tables(&mut conn);
    let per_read = t1 - t0;

    let writes = [
        (write("one", ExpectedVersion::NoStream, &[tick(1, 1)]), 0),
        (write("one", ExpectedVersion::Exact(1), &[tick(1, 2)]), 0),
        (
            write("one", ExpectedVersion::StreamExists, &[tick(1, 3)]),
            1,
        ),
        (write("one", ExpectedVersion::Any, &[tick(1, 4)]), 1),
    ];
    let mut before = temporary_tables(&mut conn);
    for (w, tables) in writes {
        let expected = w.expected;
        append_in(&mut conn, &[w]).unwrap();
        let after = temporary_tables(&mut conn);
        assert_eq!(
            after - before - per_read,
            tables,
            "temporary tables of a one-event append expecting {expected}"
        );
        before = after;
    }
    // Refused: nothing written. Stale, ahead of the stream (which would
    // leave a gap), a new stream that exists, in both spellings.
    for expected in [
        ExpectedVersion::Exact(1),
        ExpectedVersion::Exact(3),
        ExpectedVersion::Exact(5),
        ExpectedVersion::Exact(9),
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
    ] {
        let refused = append_in(&mut conn, &[write("one", expected, &[tick(1, 5)])]);
        match refused {
            Err(Error::Conflict {
                expected: e,
                actual,
                ..
            }) => {
                assert_eq!(e, expected);
                assert_eq!(actual, 4, "the stream's version");
            }
            other => panic!("{expected}: {other:?}"),
        }
    }
    append_in(
        &mut conn,
        &[write(
            "one",
            ExpectedVersion::Exact(4),
            &[tick(2, 1), tick(2, 2), tick(2, 3)],
        )],
    )
    .unwrap();
    let log = whole_log(&store);
    let versions: Vec<(i64, i64)> = log
        .iter()
        .map(|e| (e.global_position, e.stream_version))
        .collect();
    assert_eq!(
        versions,
        [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7)]
    );
    let ticks: Vec<Tick> = log
        .iter()
        .map(|e| e.decode::<Tick>().unwrap().event)
        .collect();
    assert_eq!(
        ticks,
        [
            tick(1, 1),
            tick(1, 2),
            tick(1, 3),
            tick(1, 4),
            tick(2, 1),
            tick(2, 2),
            tick(2, 3)
        ]
    );
}

/// MySQL rolls a whole transaction back to break a deadlock. An append in
/// a caller's transaction that is chosen as the victim returns the
/// transient error, which the caller's whole transaction must be run again
/// for, and writes nothing: it is not retried in a savepoint of the
/// transaction the server already rolled back (the retried insert would
/// run on its own and commit, whatever the caller's transaction then did).
///
/// The caller's transaction locks a row of its own table, then appends,
/// which waits for the log's head; another session holds the head, has
/// written more (so that the caller is the one rolled back), and asks for
/// the caller's row.
#[test]
fn an_append_chosen_as_deadlock_victim_in_a_callers_transaction_writes_nothing() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let mut other = admin(&db);
    other
        .batch_execute(
            "CREATE TABLE dl_rows (id INT PRIMARY KEY, v INT NOT NULL) ENGINE = InnoDB; \
             INSERT INTO dl_rows VALUES (1, 0); \
             CREATE TABLE dl_weight (id INT PRIMARY KEY) ENGINE = InnoDB",
        )
        .unwrap();
    let (locked_tx, locked_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let caller = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                diesel::sql_query("UPDATE dl_rows SET v = v + 1 WHERE id = 1").execute(c)?;
                locked_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                append_in(c, &[write("dl", ExpectedVersion::NoStream, &[tick(9, 9)])])?;
                Ok(())
            })
        })
    };
    locked_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the caller's transaction locked its row");
    other
        .batch_execute(
            "BEGIN; \
             INSERT INTO dl_weight (id) WITH RECURSIVE n (i) AS \
               (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) SELECT i FROM n",
        )
        .unwrap();
    admin_number(
        &mut other,
        "SELECT position AS n FROM es_log_head WHERE id = 1 FOR UPDATE",
    );
    go_tx.send(()).unwrap();
    // Waits for the caller's row: a deadlock with the caller's append,
    // which waits for the head. The caller, lighter, is rolled back.
    other
        .batch_execute("UPDATE dl_rows SET v = v + 10 WHERE id = 1")
        .expect("the other session is not the victim");
    other.batch_execute("ROLLBACK").unwrap();
    let result = caller.join().expect("the caller panicked");
    match &result {
        Err(e) if e.is_transient() => {}
        other => panic!("expected the deadlock as a transient error, got {other:?}"),
    }
    assert!(
        whole_log(&store).iter().all(|e| e.stream_id != "dl"),
        "the rolled-back transaction's append was written"
    );
    assert_eq!(
        admin_number(&mut other, "SELECT v AS n FROM dl_rows WHERE id = 1"),
        0
    );
    // The pool's connections work on.
    store
        .append("dl", ExpectedVersion::NoStream, [tick(9, 10)])
        .unwrap();
    let mut conn = store.connection().unwrap();
    write_transaction(&mut conn, |c| -> Result<(), Error> {
        append_in(c, &[write("dl", ExpectedVersion::Exact(1), &[tick(9, 11)])])?;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        whole_log(&store)
            .iter()
            .filter(|e| e.stream_id == "dl")
            .count(),
        2
    );
}

/// Eight writers on three streams mix every kind of one-event append
/// (expecting the stream's version, a version ahead of it, no stream),
/// appends of two events, and appends inside transactions (alone, and after
/// an append to a stream of their own), while a follower reads the log.
/// At READ COMMITTED nothing fails but conflicts (no deadlock), every
/// stream's versions run 1, 2, 3 … without a gap, and the follower reads
/// every position once, in order.
#[test]
fn mixed_appends_of_eight_writers_keep_streams_and_log_gap_free() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let (store, stop) = (store.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            let mut cp = Checkpoint::default();
            let mut positions = Vec::new();
            loop {
                let done = stop.load(Ordering::SeqCst);
                let page = read_after(&mut conn, cp, None, 100).unwrap();
                for f in &page {
                    positions.push(f.event.global_position);
                    cp = f.checkpoint;
                }
                if page.is_empty() {
                    if done {
                        return positions;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    };
    let one = |stream: &str, expected, n: u64| {
        let mut w = StreamWrite::new(stream, expected);
        w.push(&tick(0, n)).unwrap();
        w
    };
    let writers: Vec<_> = (0..8u32)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                for i in 0..60u32 {
                    let stream = format!("s{}", (i + t) % 3);
                    let v = store.stream_version(&stream).unwrap();
                    let expected = match v {
                        0 => ExpectedVersion::NoStream,
                        v => ExpectedVersion::Exact(v),
                    };
                    let n = u64::from(i);
                    let done = match (i + t) % 5 {
                        0 => store.append(&stream, expected, [tick(t, n)]).map(drop),
                        1 => store
                            .append(&stream, expected, [tick(t, n), tick(t, n)])
                            .map(drop),
                        2 => {
                            let mut conn = store.connection().unwrap();
                            write_transaction(&mut conn, |c| {
                                append_in(c, &[one(&stream, expected, n)]).map(drop)
                            })
                        }
                        3 => {
                            let mut conn = store.connection().unwrap();
                            write_transaction(&mut conn, |c| {
                                let own = format!("own-{t}-{i}");
                                append_in(c, &[one(&own, ExpectedVersion::NoStream, n)])?;
                                append_in(c, &[one(&stream, expected, n)]).map(drop)
                            })
                        }
                        // Ahead of the stream: a conflict, unless another
                        // writer appended in between.
                        _ => store
                            .append(&stream, ExpectedVersion::Exact(v + 1), [tick(t, n)])
                            .map(drop),
                    };
                    match done {
                        Ok(()) | Err(Error::Conflict { .. }) => {}
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors
            })
        })
        .collect();
    for writer in writers {
        let errors = writer.join().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
    }
    stop.store(true, Ordering::SeqCst);
    let positions = follower.join().unwrap();
    let head = store.head().unwrap();
    assert_eq!(
        positions,
        (1..=head).collect::<Vec<_>>(),
        "every position once, in order"
    );
    for stream in ["s0", "s1", "s2"] {
        let versions: Vec<i64> = store
            .read_stream(stream, 1, 100_000)
            .unwrap()
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert!(!versions.is_empty(), "{stream}");
        assert_eq!(
            versions,
            (1..=versions.len() as i64).collect::<Vec<_>>(),
            "{stream}"
        );
    }
}
