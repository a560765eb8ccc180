//! Gap-safe following of the log: a reader never moves past an event that a
//! slower writer may still commit.

use es_diesel::follow::{read_after, Checkpoint};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, write_transaction, Error, Event, EventStore, ExpectedVersion, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::mpsc;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: u32,
}

/// Follows until `want` events were seen. On PostgreSQL a transaction still
/// open anywhere on the server (other tests run in parallel) holds followers
/// back for a moment, so this waits for them.
fn follow_until(store: &EventStore, from: Checkpoint, want: usize) -> (Vec<u32>, Checkpoint) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (mut seen, mut cp) = follow_all(store, from);
    while seen.len() < want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (more, next) = follow_all(store, cp);
        seen.extend(more);
        cp = next;
    }
    (seen, cp)
}

fn follow_all(store: &EventStore, from: Checkpoint) -> (Vec<u32>, Checkpoint) {
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
            seen.push(f.event.decode::<Tick>().unwrap().n);
        }
    }
}

/// Writer A holds position n open while writer B commits n + 1: the follower
/// must not report n + 1 before A commits, and then reports both.
#[test]
fn an_out_of_order_commit_is_waited_for() {
    let Some(db) = TestDatabase::postgres() else {
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
    let b = store
        .append("s-b", ExpectedVersion::NoStream, [Tick { n: 2 }])
        .unwrap();
    assert!(
        b[0].global_position > held_position,
        "B got the later position"
    );
    assert_eq!(
        store.read_all(0, 10).unwrap().len(),
        2,
        "B's event is visible to plain reads"
    );

    let (seen, cp) = follow_until(&store, Checkpoint::default(), 1);
    assert_eq!(seen, [0], "nothing past A's open transaction");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (seen, cp) = follow_until(&store, cp, 0);
    assert_eq!(seen, Vec::<u32>::new(), "still nothing while A is open");

    release_tx.send(()).unwrap();
    a.join().unwrap();
    let (seen, _) = follow_until(&store, cp, 2);
    assert_eq!(seen, [1, 2], "A's event, then B's");
}

#[test]
fn a_rolled_back_writer_leaves_no_gap_to_wait_for() {
    for db in TestDatabase::all() {
        let store = db.store();
        let mut conn = store.connection().unwrap();
        let res = write_transaction(&mut conn, |c| -> Result<(), Error> {
            let mut w = StreamWrite::new("s-a", ExpectedVersion::NoStream);
            w.push(&Tick { n: 1 })?;
            append_in(c, &[w])?;
            Err(Error::Malformed {
                position: 0,
                reason: "abandoned on purpose".into(),
            })
        });
        assert!(res.is_err());
        drop(conn);
        store
            .append("s-b", ExpectedVersion::NoStream, [Tick { n: 2 }])
            .unwrap();
        let (seen, _) = follow_until(&store, Checkpoint::default(), 1);
        assert_eq!(seen, [2], "{}", db.backend());
    }
}

#[test]
fn following_by_type_and_in_pages_sees_every_event_once() {
    for db in TestDatabase::all() {
        let store = db.store();
        for n in 0..50 {
            store
                .append(&format!("s-{}", n % 7), ExpectedVersion::Any, [Tick { n }])
                .unwrap();
        }
        let (seen, cp) = follow_until(&store, Checkpoint::default(), 50);
        assert_eq!(seen, (0..50).collect::<Vec<_>>(), "{}", db.backend());
        let mut conn = store.connection().unwrap();
        assert!(read_after(&mut conn, cp, None, 10).unwrap().is_empty());
        assert_eq!(
            read_after(&mut conn, Checkpoint::default(), Some(&["Tick"]), 100)
                .unwrap()
                .len(),
            50
        );
        assert!(
            read_after(&mut conn, Checkpoint::default(), Some(&["Other"]), 100)
                .unwrap()
                .is_empty()
        );
        assert!(read_after(&mut conn, Checkpoint::default(), Some(&[]), 100)
            .unwrap()
            .is_empty());
    }
}
