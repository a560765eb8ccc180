//! Gap safety on MySQL and MariaDB, tried with the interleavings that break
//! auto-increment logs: every append holds the log's head row until it
//! commits (see `backend/mysql.rs`), so a later append waits for an open one
//! and positions commit, and become visible, in order.

use diesel::connection::SimpleConnection;
use diesel::Connection;
use es_diesel::follow::{read_after, Checkpoint};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, write_transaction, Error, Event, EventStore, ExpectedVersion, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: u32,
}

/// Every event a follower can read after `from` now, with its checkpoint.
fn follow_all(store: &EventStore, from: Checkpoint) -> (Vec<(u32, i64)>, Checkpoint) {
    let mut conn = store.connection().unwrap();
    let mut seen = Vec::new();
    let mut cp = from;
    loop {
        let page = read_after(&mut conn, cp, None, 3).unwrap();
        if page.is_empty() {
            return (seen, cp);
        }
        for f in page {
            assert!(f.checkpoint > cp, "checkpoints only move forward");
            cp = f.checkpoint;
            seen.push((f.event.decode::<Tick>().unwrap().n, f.event.global_position));
        }
    }
}

/// Follows until `want` events were seen, for up to 30 s.
fn follow_until(
    store: &EventStore,
    from: Checkpoint,
    want: usize,
) -> (Vec<(u32, i64)>, Checkpoint) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut seen, mut cp) = follow_all(store, from);
    while seen.len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let (more, next) = follow_all(store, cp);
        seen.extend(more);
        cp = next;
    }
    (seen, cp)
}

fn ticks(seen: &[(u32, i64)]) -> Vec<u32> {
    seen.iter().map(|(n, _)| *n).collect()
}

/// Asserts that the thread is still running `for_at_least` from now.
fn still_waiting<T>(thread: &std::thread::JoinHandle<T>, for_at_least: Duration, what: &str) {
    std::thread::sleep(for_at_least);
    assert!(!thread.is_finished(), "{what} did not wait");
}

/// A holds its append open; B's append, on another connection, waits for
/// A instead of committing a later position first; followers see neither
/// until A commits, then A's event before B's.
#[test]
fn a_later_append_waits_for_an_open_one_and_is_followed_after_it() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    store
        .append("s-0", ExpectedVersion::Any, [Tick { n: 0 }])
        .unwrap();
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let a = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut conn = store.connection().unwrap();
            write_transaction(&mut conn, |c| -> Result<(), Error> {
                let mut w = StreamWrite::new("s-a", ExpectedVersion::NoStream);
                w.push(&Tick { n: 1 })?;
                let rec = append_in(c, &[w])?;
                held_tx.send(rec[0].global_position).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        })
    };
    let held_position = held_rx.recv().unwrap();
    let b = {
        let store = store.clone();
        std::thread::spawn(move || {
            store
                .append("s-b", ExpectedVersion::NoStream, [Tick { n: 2 }])
                .unwrap()[0]
                .global_position
        })
    };
    still_waiting(&b, Duration::from_millis(300), "B's append");
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(ticks(&seen), [0], "nothing past A's open transaction");
    assert_eq!(store.read_all(0, 10).unwrap().len(), 1);

    release_tx.send(()).unwrap();
    a.join().unwrap();
    let b_position = b.join().unwrap();
    assert!(b_position > held_position, "B took the later position");
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(
        seen,
        [(1, held_position), (2, b_position)],
        "A's event, then B's"
    );
}

/// T2 appends to C and stays open; T1's append to B waits for it, so T2 can
/// create B itself; T1 then finds B taken. No follower sees a stream's
/// versions out of order, because no append overtakes another.
#[test]
fn an_append_cannot_overtake_a_transaction_that_began_earlier() {
    let Some(db) = TestDatabase::mysql() else {
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
                let mut w = StreamWrite::new("c", ExpectedVersion::NoStream);
                w.push(&Tick { n: 1 })?;
                append_in(c, &[w])?;
                step_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                let mut w = StreamWrite::new("b", ExpectedVersion::NoStream);
                w.push(&Tick { n: 2 })?;
                append_in(c, &[w])?;
                Ok(())
            })
            .unwrap();
        })
    };
    step_rx.recv().unwrap();
    let t1 = {
        let store = store.clone();
        std::thread::spawn(move || store.append("b", ExpectedVersion::NoStream, [Tick { n: 3 }]))
    };
    still_waiting(&t1, Duration::from_millis(300), "T1's append");
    go_tx.send(()).unwrap();
    t2.join().unwrap();
    match t1.join().unwrap() {
        Err(Error::Conflict { actual: 1, .. }) => {}
        other => panic!("T1 should find b at version 1: {other:?}"),
    }
    let (seen, _) = follow_until(&store, Checkpoint::default(), 2);
    assert_eq!(ticks(&seen), [1, 2]);
}

/// A row inserted by hand without a position takes the next one from the
/// head (a trigger), holding it until it commits, like any append.
#[test]
fn a_hand_inserted_row_takes_the_head_and_holds_followers() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    store
        .append("template", ExpectedVersion::NoStream, [Tick { n: 0 }])
        .unwrap();
    let mut by_hand = diesel::MysqlConnection::establish(db.url()).unwrap();
    by_hand
        .batch_execute(&format!(
            "BEGIN; INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata) \
             VALUES ('{}', 'by-hand', 1, 'Tick', 1, '{{\"n\": 1}}', '{{}}')",
            uuid::Uuid::new_v4()
        ))
        .unwrap();
    let later = {
        let store = store.clone();
        std::thread::spawn(move || {
            store
                .append("u", ExpectedVersion::NoStream, [Tick { n: 2 }])
                .unwrap()
        })
    };
    still_waiting(
        &later,
        Duration::from_millis(300),
        "the append after the hand insert",
    );
    let (seen, cp) = follow_all(&store, Checkpoint::default());
    assert_eq!(ticks(&seen), [0], "nothing past the open hand insert");
    by_hand.batch_execute("COMMIT").unwrap();
    later.join().unwrap();
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(ticks(&seen), [1, 2]);
    assert!(seen[0].1 < seen[1].1, "{seen:?}");
}

/// A rolled-back append gives its positions back (the head's update rolls
/// back with it), and so does an append refused for its expected version
/// inside a transaction that goes on (it runs in a savepoint): nothing to
/// wait for, no hole.
#[test]
fn rolled_back_and_refused_appends_leave_nothing_to_wait_for() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let mut conn = store.connection().unwrap();
    let rolled_back = write_transaction(&mut conn, |c| -> Result<(), Error> {
        let mut w = StreamWrite::new("r", ExpectedVersion::NoStream);
        w.push(&Tick { n: 99 })?;
        append_in(c, &[w])?;
        Err(Error::Malformed {
            position: 0,
            reason: "rolled back on purpose".into(),
        })
    });
    assert!(rolled_back.is_err());
    write_transaction(&mut conn, |c| -> Result<(), Error> {
        let mut w = StreamWrite::new("a", ExpectedVersion::NoStream);
        w.push(&Tick { n: 1 })?;
        append_in(c, &[w])?;
        let mut refused = StreamWrite::new("a", ExpectedVersion::NoStream);
        refused.push(&Tick { n: 98 })?;
        assert!(matches!(
            append_in(c, &[refused]),
            Err(Error::Conflict { actual: 1, .. })
        ));
        let mut w = StreamWrite::new("b", ExpectedVersion::NoStream);
        w.push(&Tick { n: 2 })?;
        append_in(c, &[w])?;
        Ok(())
    })
    .unwrap();
    drop(conn);
    let started = Instant::now();
    let (seen, _) = follow_all(&store, Checkpoint::default());
    assert_eq!(ticks(&seen), [1, 2]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        seen.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        [1, 2],
        "the rollback and the refused append gave their positions back"
    );
}

/// A client that dies holding the head (its connection closed mid-append,
/// never committed) stops nobody: the server rolls it back and the next
/// append goes on.
#[test]
fn a_writer_that_dies_holding_the_head_is_rolled_back() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    let mut dying = diesel::MysqlConnection::establish(db.url()).unwrap();
    dying
        .batch_execute(&format!(
            "BEGIN; INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata) \
             VALUES ('{}', 'ghost', 1, 'Tick', 1, '{{\"n\": 0}}', '{{}}')",
            uuid::Uuid::new_v4()
        ))
        .unwrap();
    let next = {
        let store = store.clone();
        std::thread::spawn(move || {
            store
                .append("alive", ExpectedVersion::NoStream, [Tick { n: 1 }])
                .unwrap()
        })
    };
    still_waiting(
        &next,
        Duration::from_millis(300),
        "the append behind the dying writer",
    );
    drop(dying);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !next.is_finished() {
        assert!(Instant::now() < deadline, "the append never went on");
        std::thread::sleep(Duration::from_millis(20));
    }
    next.join().unwrap();
    let (seen, _) = follow_all(&store, Checkpoint::default());
    assert_eq!(ticks(&seen), [1]);
    assert_eq!(store.stream_version("ghost").unwrap(), 0);
}

/// A caller's transaction at REPEATABLE READ reads the snapshot of its
/// first read; an append in it after another append to the same stream
/// committed still lands on the stream's real version.
#[test]
fn an_append_in_a_repeatable_read_transaction_sees_the_last_commit() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    store
        .append("s", ExpectedVersion::NoStream, [Tick { n: 1 }])
        .unwrap();
    let mut conn = store.connection().unwrap();
    conn.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .unwrap();
    write_transaction(&mut conn, |c| -> Result<(), Error> {
        // The snapshot is taken here, at version 1.
        assert_eq!(store.read_all(0, 10).unwrap().len(), 1);
        c.batch_execute("SELECT COUNT(*) FROM es_events")?;
        store.append("s", ExpectedVersion::Exact(1), [Tick { n: 2 }])?;
        let mut w = StreamWrite::new("s", ExpectedVersion::Exact(2));
        w.push(&Tick { n: 3 })?;
        let rec = append_in(c, &[w])?;
        assert_eq!(rec[0].stream_version, 3);
        let mut stale = StreamWrite::new("s", ExpectedVersion::Exact(1));
        stale.push(&Tick { n: 4 })?;
        assert!(matches!(
            append_in(c, &[stale]),
            Err(Error::Conflict { .. })
        ));
        Ok(())
    })
    .unwrap();
    drop(conn);
    let (seen, _) = follow_all(&store, Checkpoint::default());
    assert_eq!(ticks(&seen), [1, 2, 3]);
}

/// An append expecting a version that another transaction is appending
/// and holds open (so the expected version's row is not committed yet)
/// waits for it instead of being refused on what it could not see: it lands
/// on the next version once that transaction commits, and is refused,
/// naming the stream's real version, once it rolls back.
#[test]
fn an_append_expecting_a_version_still_open_waits_for_its_commit() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    let store = db.store();
    store
        .append("s", ExpectedVersion::NoStream, [Tick { n: 1 }])
        .unwrap();
    for commit in [true, false] {
        let before = store.stream_version("s").unwrap();
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                let _ = write_transaction(&mut conn, |c| -> Result<(), Error> {
                    let mut w = StreamWrite::new("s", ExpectedVersion::Exact(before));
                    w.push(&Tick { n: 10 })?;
                    let rec = append_in(c, &[w])?;
                    held_tx.send(rec[0].stream_version).unwrap();
                    release_rx.recv().unwrap();
                    if commit {
                        Ok(())
                    } else {
                        Err(Error::Malformed {
                            position: 0,
                            reason: "rolled back on purpose".into(),
                        })
                    }
                });
            })
        };
        let held = held_rx.recv().unwrap();
        assert_eq!(held, before + 1);
        let follower = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.append("s", ExpectedVersion::Exact(held), [Tick { n: 20 }])
            })
        };
        still_waiting(
            &follower,
            Duration::from_millis(300),
            "the append after the open one",
        );
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        match (commit, follower.join().unwrap()) {
            (true, Ok(rec)) => assert_eq!(rec[0].stream_version, held + 1),
            (false, Err(Error::Conflict { actual, .. })) => assert_eq!(actual, before),
            (commit, other) => panic!("commit {commit}: {other:?}"),
        }
    }
    let (seen, _) = follow_all(&store, Checkpoint::default());
    assert_eq!(ticks(&seen), [1, 10, 20]);
    let versions: Vec<i64> = store
        .read_stream("s", 1, 10)
        .unwrap()
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, [1, 2, 3]);
}
