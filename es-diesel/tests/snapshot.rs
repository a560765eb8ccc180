//! Snapshots: loading from a snapshot plus the events after it gives the
//! same state as folding the whole stream; snapshots of another shape, or
//! that no longer deserialize, are ignored.

mod common;

use common::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{fold, Aggregate, EventStore, ExecuteOptions, Snapshots};
use serde::{Deserialize, Serialize};

fn full_fold<A: Aggregate>(store: &EventStore, id: &str) -> A {
    let events = store.load_stream::<A::Event>(&A::stream_id(id)).unwrap();
    fold::<A>(events.iter().map(|r| &r.event))
}

/// Registers the book, then borrows and returns it until the stream holds
/// `events` events, checking every load against a full fold.
fn cycle(store: &EventStore, book: &str, events: i64) {
    register_book(store, book, "Dune");
    register_user(store, "ann");
    for v in 2..=events {
        let done = if v % 2 == 0 {
            borrow(store, book, "ann", &ExecuteOptions::default()).unwrap()
        } else {
            give_back(store, book, "ann").unwrap()
        };
        assert_eq!(done.version, v);
        let loaded = store.load_aggregate::<Book>(book).unwrap();
        assert_eq!(loaded.version, v);
        // Book saves a snapshot every 3 events.
        assert_eq!(
            loaded.snapshot_version,
            (v >= 3).then_some(v - v % 3),
            "at version {v}"
        );
        assert_eq!(
            loaded.state,
            full_fold::<Book>(store, book),
            "at version {v}"
        );
        assert_eq!(loaded.state, done.state);
    }
}

#[test]
fn snapshot_plus_tail_equals_a_full_fold() {
    for db in TestDatabase::all() {
        let store = db.store();
        cycle(&store, "b1", 11);
        let loaded = store.load_aggregate::<Book>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (11, Some(9)));
        assert_eq!(loaded.state.times_borrowed, 5);
        assert_eq!(loaded.state.holder, None);
    }
}

#[test]
fn long_stream_ids_have_snapshots() {
    for db in TestDatabase::all() {
        let store = db.store();
        let id = "x".repeat(5_000);
        cycle(&store, &id, 4);
        let loaded = store.load_aggregate::<Book>(&id).unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (4, Some(3)));
    }
}

/// The same book, with the snapshot shape raised to 2.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct BookShape2(Book);

impl Aggregate for BookShape2 {
    const TYPE: &'static str = "book";
    type Event = BookEvent;
    type Command = BookCommand;
    type Error = LibraryError;
    const SNAPSHOTS: Option<Snapshots<Self>> = Some(Snapshots::every(3).shape(2));

    fn apply(&mut self, event: &BookEvent) {
        self.0.apply(event)
    }

    fn handle(&self, command: BookCommand) -> Result<Vec<BookEvent>, LibraryError> {
        self.0.handle(command)
    }
}

#[test]
fn a_snapshot_of_another_shape_is_ignored_and_replaced() {
    for db in TestDatabase::all() {
        let store = db.store();
        cycle(&store, "b1", 7);
        let loaded = store.load_aggregate::<BookShape2>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (7, None));
        assert_eq!(
            loaded.state.0,
            store.load_aggregate::<Book>("b1").unwrap().state
        );

        // Nothing of shape 2 yet, so the next command saves one.
        let done = store
            .execute::<BookShape2>(
                "b1",
                BookCommand::Borrow {
                    user_id: "ann".into(),
                    user_registered: true,
                },
            )
            .unwrap();
        assert_eq!(done.version, 8);
        let loaded = store.load_aggregate::<BookShape2>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (8, Some(8)));
        assert_eq!(loaded.state.0, full_fold::<Book>(&store, "b1"));
        // It replaced the shape-1 snapshot, which the old shape now lacks.
        let old = store.load_aggregate::<Book>("b1").unwrap();
        assert_eq!((old.version, old.snapshot_version), (8, None));
        assert_eq!(old.state, loaded.state.0);
    }
}

/// A state whose fields changed without raising the shape: the stored
/// snapshot does not deserialize, so the stream is folded from the start.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Loans {
    loans: u64,
}

impl Aggregate for Loans {
    const TYPE: &'static str = "book";
    type Event = BookEvent;
    type Command = ();
    type Error = LibraryError;
    const SNAPSHOTS: Option<Snapshots<Self>> = Some(Snapshots::every(100));

    fn apply(&mut self, event: &BookEvent) {
        if let BookEvent::BookBorrowed(_) = event {
            self.loans += 1;
        }
    }

    fn handle(&self, (): ()) -> Result<Vec<BookEvent>, LibraryError> {
        Ok(Vec::new())
    }
}

#[test]
fn a_snapshot_that_no_longer_deserializes_is_ignored() {
    for db in TestDatabase::all() {
        let store = db.store();
        cycle(&store, "b1", 6);
        let loaded = store.load_aggregate::<Loans>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (6, None));
        assert_eq!(loaded.state.loans, 3);
        // A command deciding nothing writes nothing, not even a snapshot.
        let head = store.head().unwrap();
        let done = store.execute::<Loans>("b1", ()).unwrap();
        assert!(done.events.is_empty());
        assert_eq!((done.version, done.state.loans), (6, 3));
        assert_eq!(store.head().unwrap(), head);
    }
}

#[test]
fn snapshots_can_be_saved_now_and_deleted() {
    for db in TestDatabase::all() {
        let store = db.store();
        cycle(&store, "b1", 2);
        assert_eq!(
            store.load_aggregate::<Book>("b1").unwrap().snapshot_version,
            None
        );
        assert_eq!(store.save_snapshot::<Book>("b1").unwrap(), Some(2));
        let loaded = store.load_aggregate::<Book>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (2, Some(2)));
        assert_eq!(loaded.state, full_fold::<Book>(&store, "b1"));

        assert_eq!(store.save_snapshot::<Book>("missing").unwrap(), None);
        // User has no snapshot policy.
        assert_eq!(store.save_snapshot::<User>("ann").unwrap(), None);
        assert_eq!(
            store
                .load_aggregate::<User>("ann")
                .unwrap()
                .snapshot_version,
            None
        );

        assert_eq!(store.delete_snapshots::<Book>().unwrap(), 1);
        let loaded = store.load_aggregate::<Book>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (2, None));
    }
}
