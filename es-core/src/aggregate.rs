//! Aggregates: state folded from one stream's events, and the decisions that
//! validate a command against that state before any event is written.

use crate::Event;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;

/// A consistency boundary: the state of one stream, and the rules that decide
/// which events a command produces.
///
/// `apply` folds an event into the state and must not fail: the event already
/// happened. `handle` checks a command against the current state and returns
/// the new events, or a domain error when the command breaks a rule. It is a
/// pure function of the state and the command, so it can be tested without a
/// database (see [`harness`](crate::harness)) and retried after a
/// concurrency conflict.
///
/// A fact owned by another aggregate (is this user registered?) is looked up
/// by the caller and passed in the command; see the crate's tests for an
/// example.
///
/// ```
/// use es_core::{Aggregate, Event};
/// # #[derive(Debug, PartialEq)] struct BookEvent;
/// # impl Event for BookEvent {
/// #     const EVENT_TYPES: &'static [&'static str] = &["BookBorrowed"];
/// #     fn event_type(&self) -> &'static str { "BookBorrowed" }
/// #     fn event_version(&self) -> u16 { 1 }
/// #     fn encode(&self) -> Result<String, es_core::EncodeError> { Ok("{}".into()) }
/// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, es_core::DecodeError> { Ok(BookEvent) }
/// # }
/// #[derive(Default)]
/// struct Book { borrowed: bool }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the book is already borrowed")]
/// struct AlreadyBorrowed;
///
/// impl Aggregate for Book {
///     const TYPE: &'static str = "book";
///     type Event = BookEvent;
///     type Command = ();
///     type Error = AlreadyBorrowed;
///
///     fn apply(&mut self, _: &BookEvent) {
///         self.borrowed = true;
///     }
///
///     fn handle(&self, (): ()) -> Result<Vec<BookEvent>, AlreadyBorrowed> {
///         if self.borrowed { Err(AlreadyBorrowed) } else { Ok(vec![BookEvent]) }
///     }
/// }
///
/// assert_eq!(Book::stream_id("42"), "book-42");
/// ```
pub trait Aggregate: Default + Send + 'static {
    /// The aggregate's name: the prefix of its stream ids and the key of its
    /// snapshots. Keep it stable once events are stored, and unique: two
    /// aggregate types with one name would read each other's snapshots.
    const TYPE: &'static str;

    /// The events of the stream, usually an enum of event structs with
    /// `#[derive(Event)]`.
    type Event: Event;

    /// What a caller asks the aggregate to do.
    type Command;

    /// Why a command is refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Snapshot policy: `None` (the default) folds the whole stream on every
    /// load. See [`Snapshots`].
    const SNAPSHOTS: Option<Snapshots<Self>> = None;

    /// In-memory cache policy: `None` (the default) loads the stream at
    /// every command. See [`Cache`].
    const CACHE: Option<Cache<Self>> = None;

    /// The stream holding the aggregate with this id: `"{TYPE}-{id}"`.
    fn stream_id(id: &str) -> String {
        format!("{}-{id}", Self::TYPE)
    }

    /// Folds one event into the state.
    fn apply(&mut self, event: &Self::Event);

    /// Decides the events a command produces, or refuses it.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// The state after folding `events` into the initial (default) state.
pub fn fold<'a, A: Aggregate>(events: impl IntoIterator<Item = &'a A::Event>) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(event);
    }
    state
}

/// When and how an aggregate's state is saved, so that a load reads the
/// snapshot and only the events after it.
///
/// ```
/// # use es_core::{Aggregate, Snapshots};
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct Book;
/// # impl Aggregate for Book {
/// #   const TYPE: &'static str = "book"; type Event = Ev; type Command = (); type Error = std::fmt::Error;
/// #   fn apply(&mut self, _: &Ev) {} fn handle(&self, _: ()) -> Result<Vec<Ev>, std::fmt::Error> { Ok(vec![]) }
/// // In `impl Aggregate for Book`:
/// const SNAPSHOTS: Option<Snapshots<Self>> = Some(Snapshots::every(100).shape(2));
/// # }
/// # struct Ev; impl es_core::Event for Ev { const EVENT_TYPES: &'static [&'static str] = &[];
/// #   fn event_type(&self) -> &'static str { "" } fn event_version(&self) -> u16 { 1 }
/// #   fn encode(&self) -> Result<String, es_core::EncodeError> { Ok(String::new()) }
/// #   fn decode(_: &str, _: u16, _: &str) -> Result<Self, es_core::DecodeError> { Ok(Ev) } }
/// ```
///
/// A snapshot is a cache: it is only used when its shape number equals the
/// code's, and a stored state that no longer deserializes is ignored (the
/// stream is folded from the start). Serde cannot see every change, though:
/// when `apply` starts computing something different from the same fields,
/// or a field's meaning changes, raise the shape number with
/// [`shape`](Self::shape) so that old snapshots are ignored and replaced.
pub struct Snapshots<A> {
    /// Save a snapshot once this many events follow the last one.
    pub every: u64,
    /// The state's shape number, stored with each snapshot.
    pub shape: u32,
    encode: fn(&A) -> Result<String, serde_json::Error>,
    decode: fn(&str) -> Result<A, serde_json::Error>,
}

impl<A: Serialize + DeserializeOwned> Snapshots<A> {
    /// A snapshot after every `every` events (at least 1), state shape 1.
    pub const fn every(every: u64) -> Self {
        Snapshots {
            every: if every == 0 { 1 } else { every },
            shape: 1,
            encode: encode_json::<A>,
            decode: decode_json::<A>,
        }
    }
}

impl<A> Snapshots<A> {
    /// Sets the state's shape number; raise it when old snapshots must no
    /// longer be used.
    pub const fn shape(mut self, shape: u32) -> Self {
        self.shape = shape;
        self
    }

    /// The state as JSON text.
    pub fn encode(&self, state: &A) -> Result<String, serde_json::Error> {
        (self.encode)(state)
    }

    /// A state from JSON text.
    pub fn decode(&self, json: &str) -> Result<A, serde_json::Error> {
        (self.decode)(json)
    }
}

impl<A> Clone for Snapshots<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Snapshots<A> {}

impl<A> fmt::Debug for Snapshots<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshots")
            .field("every", &self.every)
            .field("shape", &self.shape)
            .finish()
    }
}

/// Keeps the states of recently used aggregates in memory, so that a command
/// on one decides without reading its stream first.
///
/// ```
/// # use es_core::{Aggregate, Cache};
/// # #[derive(Default, Clone)] struct Book;
/// # impl Aggregate for Book {
/// #   const TYPE: &'static str = "book"; type Event = Ev; type Command = (); type Error = std::fmt::Error;
/// #   fn apply(&mut self, _: &Ev) {} fn handle(&self, _: ()) -> Result<Vec<Ev>, std::fmt::Error> { Ok(vec![]) }
/// // In `impl Aggregate for Book`: the 10,000 books used last.
/// const CACHE: Option<Cache<Self>> = Some(Cache::entries(10_000));
/// # }
/// # struct Ev; impl es_core::Event for Ev { const EVENT_TYPES: &'static [&'static str] = &[];
/// #   fn event_type(&self) -> &'static str { "" } fn event_version(&self) -> u16 { 1 }
/// #   fn encode(&self) -> Result<String, es_core::EncodeError> { Ok(String::new()) }
/// #   fn decode(_: &str, _: u16, _: &str) -> Result<Self, es_core::DecodeError> { Ok(Ev) } }
/// ```
///
/// A cached state is never trusted blindly, as another process (or another
/// store) may have appended to the stream since it was cached. The append
/// expects the cached version, so a state that fell behind loses the race
/// and the command is loaded and decided again; a command that the cached
/// state refuses, or that decides nothing, stands only once a read finds
/// the stream at the cached version. A state is kept
/// only once the command's transaction committed, folded from the events
/// decoded from the JSON they were written as, one per stream, keeping the
/// most recently used ones.
///
/// A load decodes the JSON the database gives back. On SQLite and MySQL
/// that is the JSON written; PostgreSQL stores it as `jsonb`, which orders
/// an object's keys and keeps the last of duplicate keys: a state that
/// depends on the order of a map's keys (an `IndexMap`, a
/// `serde_json::Value` with `preserve_order`) can differ between a cached
/// and a loaded state there.
///
/// The cache trusts what the log guarantees: a stream's events never
/// change. A database that loses commits it had made visible breaks that:
/// one restored from a backup under a running process, a failover to a
/// standby that had not received every commit, a server crash with
/// commits that were not yet durable. After such an event, clear the
/// cache (`EventStore::clear_aggregate_cache`) or restart the process: a
/// state ahead of the stream is found while the stream is shorter, but not
/// once other writers have appended up to its version.
pub struct Cache<A> {
    /// The most states kept (at least 1); the least recently used goes first.
    pub entries: usize,
    clone: fn(&A) -> A,
}

impl<A: Clone> Cache<A> {
    /// Keep up to `entries` states (at least 1).
    pub const fn entries(entries: usize) -> Self {
        Cache {
            entries: if entries == 0 { 1 } else { entries },
            clone: <A as Clone>::clone,
        }
    }
}

impl<A> Cache<A> {
    /// A copy of `state`.
    pub fn copy(&self, state: &A) -> A {
        (self.clone)(state)
    }
}

impl<A> Clone for Cache<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Cache<A> {}

impl<A> fmt::Debug for Cache<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.entries)
            .finish()
    }
}

fn encode_json<A: Serialize>(state: &A) -> Result<String, serde_json::Error> {
    serde_json::to_string(state)
}

fn decode_json<A: DeserializeOwned>(json: &str) -> Result<A, serde_json::Error> {
    serde_json::from_str(json)
}
