//! Commands against aggregates: load the stream (from a snapshot when there
//! is one), decide, append with the expected version, retry on conflict.

use super::cache::Cached;
use super::snapshot;
use crate::append::{micros, StreamWrite, ACTUAL_UNKNOWN};
use crate::backend::{write_transaction, DbConnection};
use crate::error::{check_stream_id, Error, Result};
use crate::projection::append_events;
use crate::read;
use crate::store::EventStore;
use es_core::{Aggregate, ExpectedVersion, Metadata, NewEvent, Recorded};
use std::time::Instant;
use tracing::field::Empty;

/// Events read per query while folding a stream.
const PAGE: usize = 1_000;

/// An aggregate's state as loaded from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    pub stream_id: String,
    pub state: A,
    /// The version of the stream's last event folded into `state` (0 for a
    /// stream without events).
    pub version: i64,
    /// The version of the snapshot the load started from, if it used one.
    pub snapshot_version: Option<i64>,
}

/// What [`EventStore::execute`] did.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    pub stream_id: String,
    /// The state after the new events.
    pub state: A,
    /// The stream's version after the append (unchanged when the command
    /// decided no events).
    pub version: i64,
    /// The appended events; empty when the command decided none, in which
    /// case nothing was written.
    pub events: Vec<Recorded<A::Event>>,
    /// Load-and-decide rounds: 1, plus one per lost concurrency race (a
    /// race lost by a cached state that fell behind the stream is not
    /// counted: see [`Cache`](crate::Cache)).
    pub attempts: u32,
}

/// Why [`EventStore::execute`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E> {
    /// The aggregate refused the command.
    #[error(transparent)]
    Domain(E),
    /// The store failed; a [`Error::Conflict`] here means every attempt
    /// lost a race with another writer of the stream.
    #[error(transparent)]
    Store(#[from] Error),
}

impl<E> ExecuteError<E> {
    /// The domain error, if the aggregate refused the command.
    pub fn domain(self) -> Option<E> {
        match self {
            ExecuteError::Domain(e) => Some(e),
            ExecuteError::Store(_) => None,
        }
    }
}

impl<E> From<diesel::result::Error> for ExecuteError<E> {
    fn from(err: diesel::result::Error) -> Self {
        ExecuteError::Store(Error::from(err))
    }
}

/// Settings of [`EventStore::execute_with`].
#[derive(Debug, Clone)]
pub struct ExecuteOptions {
    /// How many times a command is loaded and decided again after losing a
    /// race for the stream's next version (default 16).
    pub max_retries: u32,
    /// Metadata written with every event the command produces.
    pub metadata: Metadata,
}

impl Default for ExecuteOptions {
    fn default() -> Self {
        ExecuteOptions {
            max_retries: 16,
            metadata: Metadata::default(),
        }
    }
}

impl ExecuteOptions {
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// Folds `stream` on `conn`: from the aggregate's snapshot when it has a
/// usable one, then every later event.
pub(crate) fn load_in<A: Aggregate>(conn: &mut DbConnection, stream: &str) -> Result<Loaded<A>> {
    let mut state = A::default();
    let mut version = 0;
    let mut snapshot_version = None;
    if let Some(policy) = A::SNAPSHOTS {
        if let Some(stored) = snapshot::load(conn, A::TYPE, stream, policy.shape)? {
            match policy.decode(&stored.state) {
                Ok(s) => {
                    state = s;
                    version = stored.stream_version;
                    snapshot_version = Some(stored.stream_version);
                }
                Err(err) => tracing::warn!(
                    aggregate = A::TYPE,
                    stream,
                    shape = policy.shape,
                    error = %err,
                    "snapshot no longer deserializes; folding the stream from the start (raise the snapshot shape when the state changes)"
                ),
            }
        }
    }
    loop {
        // Only the event is needed: the envelope is not read.
        let page = read::read_stream_for_fold(conn, stream, version + 1, PAGE)?;
        let full = page.len() == PAGE;
        for ev in page {
            let event =
                <A::Event as es_core::Event>::decode(&ev.event_type, ev.event_version, &ev.payload)
                    .map_err(|e| ev.decode_error(stream, e))?;
            state.apply(&event);
            version = ev.stream_version;
        }
        if !full {
            return Ok(Loaded {
                stream_id: stream.to_owned(),
                state,
                version,
                snapshot_version,
            });
        }
    }
}

/// Saves a snapshot in a transaction of its own (a savepoint when the
/// command runs in one): it is a cache, so failing to write it must not
/// undo the command.
/// Returns whether it saved one.
fn save_snapshot_in<A: Aggregate>(
    conn: &mut DbConnection,
    stream: &str,
    state: &A,
    version: i64,
) -> bool {
    let Some(policy) = A::SNAPSHOTS else {
        return false;
    };
    let json = match policy.encode(state) {
        Ok(json) => json,
        Err(err) => {
            tracing::warn!(aggregate = A::TYPE, stream, error = %err, "cannot serialize the aggregate's state; no snapshot saved");
            return false;
        }
    };
    let saved = write_transaction(conn, |c| {
        snapshot::save(c, A::TYPE, stream, policy.shape, version, &json)
    });
    if let Err(err) = &saved {
        tracing::warn!(aggregate = A::TYPE, stream, version, error = %err, "cannot save snapshot");
    }
    saved.is_ok()
}

impl EventStore {
    /// The current state of the aggregate with this id (see
    /// [`Aggregate::stream_id`]): its snapshot, if it has one, plus the
    /// events after it.
    pub fn load_aggregate<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>> {
        let stream = A::stream_id(id);
        check_stream_id(&stream)?;
        load_in(&mut *self.connection()?, &stream)
    }

    /// Validates `command` against the current state of the aggregate with
    /// this id and appends the events it decides, with the default
    /// [`ExecuteOptions`].
    ///
    /// Loads the stream (from a snapshot when there is one), calls
    /// [`Aggregate::handle`], appends the events expecting the version it
    /// loaded (inline projectors run in the append's transaction), and
    /// saves a snapshot when one is due. When another writer appended to
    /// the stream in between, nothing is written and the command is loaded
    /// and decided again, up to [`ExecuteOptions::max_retries`] times. On
    /// SQLite such a retry takes the write lock before loading, so it
    /// cannot lose again.
    ///
    /// An aggregate with a [`Cache`](crate::Cache) decides on the state
    /// its last command left in memory, without reading the stream. If
    /// that state fell behind the stream (another process, or another
    /// store, appended; this store's `append`, `append_if`, `decide` and
    /// `import` forget the states of the streams they write, as a best
    /// effort, and [`append_in`](crate::append_in) does not), the append
    /// loses the race and the command is loaded and decided again, without
    /// counting as a retry; a refusal, or a decision of no events, from a
    /// cached state stands only once a read finds the stream at the cached
    /// version.
    /// [`Executed::state`] of such an aggregate is folded from the new
    /// events decoded from the JSON they were stored as, as a load would
    /// fold them (but see [`Cache`](crate::Cache) on PostgreSQL's key
    /// order).
    ///
    /// A refused command returns [`ExecuteError::Domain`] with the
    /// aggregate's own error, and writes nothing.
    ///
    /// ```
    /// use es_diesel::harness::given;
    /// use es_diesel::{Aggregate, Event, EventStore, ExecuteError};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Event, Serialize, Deserialize, Debug, PartialEq)]
    /// #[event(view = false)]
    /// struct BookBorrowed { user_id: String }
    ///
    /// #[derive(Event, Serialize, Deserialize, Debug, PartialEq)]
    /// #[event(view = false)]
    /// struct BookReturned { user_id: String }
    ///
    /// #[derive(Event, Debug, PartialEq)]
    /// enum BookEvent { Borrowed(BookBorrowed), Returned(BookReturned) }
    ///
    /// #[derive(Debug, Clone)]
    /// enum Command { Borrow(String), Return(String) }
    ///
    /// #[derive(Debug, PartialEq, thiserror::Error)]
    /// enum Refused {
    ///     #[error("the book is held by {0}")]
    ///     Taken(String),
    ///     #[error("{0} does not hold the book")]
    ///     NotHolder(String),
    /// }
    ///
    /// #[derive(Default, Debug)]
    /// struct Book { holder: Option<String> }
    ///
    /// impl Aggregate for Book {
    ///     const TYPE: &'static str = "book";
    ///     type Event = BookEvent;
    ///     type Command = Command;
    ///     type Error = Refused;
    ///
    ///     fn apply(&mut self, event: &BookEvent) {
    ///         self.holder = match event {
    ///             BookEvent::Borrowed(e) => Some(e.user_id.clone()),
    ///             BookEvent::Returned(_) => None,
    ///         };
    ///     }
    ///
    ///     fn handle(&self, command: Command) -> Result<Vec<BookEvent>, Refused> {
    ///         match (command, &self.holder) {
    ///             (Command::Borrow(_), Some(holder)) => Err(Refused::Taken(holder.clone())),
    ///             (Command::Borrow(user_id), None) => Ok(vec![BookBorrowed { user_id }.into()]),
    ///             (Command::Return(user_id), Some(holder)) if *holder == user_id => {
    ///                 Ok(vec![BookReturned { user_id }.into()])
    ///             }
    ///             (Command::Return(user_id), _) => Err(Refused::NotHolder(user_id)),
    ///         }
    ///     }
    /// }
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The rules, without a database.
    /// given::<Book>([BookBorrowed { user_id: "ann".into() }.into()])
    ///     .when(Command::Borrow("bob".into()))
    ///     .then_error(Refused::Taken("ann".into()));
    ///
    /// // The same rules in front of the store.
    /// let store = EventStore::open(":memory:")?;
    /// store.migrate()?;
    /// let done = store.execute::<Book>("42", Command::Borrow("ann".into()))?;
    /// assert_eq!((done.stream_id.as_str(), done.version), ("book-42", 1));
    /// match store.execute::<Book>("42", Command::Borrow("bob".into())) {
    ///     Err(ExecuteError::Domain(Refused::Taken(holder))) => assert_eq!(holder, "ann"),
    ///     other => panic!("{other:?}"),
    /// }
    /// assert_eq!(store.stream_version("book-42")?, 1);
    /// # Ok(()) }
    /// ```
    pub fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        self.execute_with::<A>(id, command, &ExecuteOptions::default())
    }

    /// [`execute`](Self::execute) with options: retries, metadata.
    pub fn execute_with<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
        options: &ExecuteOptions,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        let stream = A::stream_id(id);
        let span = tracing::debug_span!(
            "es.execute",
            aggregate = A::TYPE,
            stream = stream.as_str(),
            attempts = Empty,
            outcome = Empty,
            events = Empty,
            version = Empty,
            duration_us = Empty,
        );
        let _entered = span.enter();
        if span.is_disabled() {
            return self.execute_traced::<A>(stream, command, options);
        }
        let started = Instant::now();
        let result = self.execute_traced::<A>(stream, command, options);
        let outcome = match &result {
            Ok(executed) => {
                span.record("attempts", executed.attempts);
                span.record("events", executed.events.len());
                span.record("version", executed.version);
                if executed.events.is_empty() {
                    "unchanged"
                } else {
                    "appended"
                }
            }
            Err(ExecuteError::Domain(_)) => "refused",
            Err(ExecuteError::Store(Error::Conflict { .. })) => "conflict",
            Err(ExecuteError::Store(_)) => "error",
        };
        span.record("outcome", outcome);
        span.record("duration_us", micros(started));
        result
    }

    fn execute_traced<A: Aggregate>(
        &self,
        stream: String,
        command: A::Command,
        options: &ExecuteOptions,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        check_stream_id(&stream)?;
        let mut conn = self.connection()?;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // The expected version guards the append: the load needs no
            // transaction, and the append needs one only when projectors
            // write with it (on SQLite a statement holds the write lock
            // only while it writes, so concurrent commands load at once).
            // After a lost race SQLite takes the write lock first, so that
            // the retry cannot lose again: a writer that slept in SQLite's
            // busy handler would otherwise keep waking to a moved stream.
            // A state to cache is kept only once the transaction around
            // the command, if any, has ended: what it decided is committed
            // (or, for a refusal, nothing was written).
            let cache = self.state_cache::<A>().map(|c| (c, c.generation()));
            let mut keep = None;
            let mut run = |c: &mut DbConnection| {
                decide_and_append::<A>(
                    self,
                    c,
                    &stream,
                    command.clone(),
                    options,
                    attempts,
                    &mut keep,
                )
            };
            let result = if attempts > 1 && conn.dialect().serial_writers() {
                write_transaction(&mut conn, run)
            } else {
                run(&mut conn)
            };
            if let (Some((cache, generation)), Some(kept)) = (cache, keep) {
                if matches!(result, Ok(_) | Err(ExecuteError::Domain(_))) {
                    cache.put(&stream, kept, generation);
                }
            }
            match result {
                Ok(executed) => return Ok(executed),
                Err(ExecuteError::Store(e))
                    if e.is_retryable() && attempts <= options.max_retries =>
                {
                    tracing::Span::current().record("attempts", attempts);
                    tracing::debug!(aggregate = A::TYPE, %stream, attempts, error = %e, "lost a race for the stream; reloading");
                }
                Err(ExecuteError::Store(Error::Conflict {
                    stream,
                    expected,
                    actual,
                })) => {
                    let actual = if actual == ACTUAL_UNKNOWN {
                        read::stream_version(&mut conn, &stream)?
                    } else {
                        actual
                    };
                    return Err(ExecuteError::Store(Error::Conflict {
                        stream,
                        expected,
                        actual,
                    }));
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Saves a snapshot of the aggregate's current state now, whatever its
    /// policy's interval. Returns the snapshot's stream version, or `None`
    /// when the aggregate has no snapshot policy or no events.
    pub fn save_snapshot<A: Aggregate>(&self, id: &str) -> Result<Option<i64>> {
        let Some(policy) = A::SNAPSHOTS else {
            return Ok(None);
        };
        let stream = A::stream_id(id);
        check_stream_id(&stream)?;
        let mut conn = self.connection()?;
        let loaded = load_in::<A>(&mut conn, &stream)?;
        if loaded.version == 0 {
            return Ok(None);
        }
        let json = policy
            .encode(&loaded.state)
            .map_err(|source| Error::Snapshot {
                aggregate: A::TYPE,
                stream: stream.clone(),
                source,
            })?;
        write_transaction(&mut conn, |c| {
            snapshot::save(c, A::TYPE, &stream, policy.shape, loaded.version, &json)
        })?;
        Ok(Some(loaded.version))
    }

    /// Deletes every snapshot of aggregate `A` (they are rebuilt as commands
    /// run). Returns how many were deleted.
    pub fn delete_snapshots<A: Aggregate>(&self) -> Result<usize> {
        let deleted = snapshot::delete_all(&mut *self.connection()?, A::TYPE)?;
        if let Some(cache) = self.state_cache::<A>() {
            cache.forget_type::<A>();
        }
        Ok(deleted)
    }
}

/// Loads (or takes from the cache), decides and appends; the append opens a
/// transaction only if it must. The state the command ends with is left in
/// `keep` for the caller to cache once the command's transaction ended.
fn decide_and_append<A: Aggregate>(
    store: &EventStore,
    conn: &mut DbConnection,
    stream: &str,
    command: A::Command,
    options: &ExecuteOptions,
    attempts: u32,
    keep: &mut Option<Cached<A>>,
) -> Result<Executed<A>, ExecuteError<A::Error>>
where
    A::Command: Clone,
{
    let cache = store.state_cache::<A>();
    // A retry after a lost race always reads the stream.
    if let (Some(cache), 1) = (cache, attempts) {
        if let Some(cached) = cache.take::<A>(stream) {
            let cached = cached.into_loaded(stream);
            if let Some(done) = decide_on_cached(store, conn, cached, &command, options, keep)? {
                return Ok(done);
            }
        }
    }
    let loaded = load_in::<A>(conn, stream)?;
    match loaded.state.handle(command) {
        Ok(events) => {
            let keep = cache.is_some().then_some(keep);
            Ok(append_decided(
                store, conn, loaded, events, options, attempts, keep,
            )?)
        }
        Err(refused) => {
            if cache.is_some() {
                *keep = Some(cached_state(loaded));
            }
            Err(ExecuteError::Domain(refused))
        }
    }
}

fn cached_state<A>(loaded: Loaded<A>) -> Cached<A> {
    Cached {
        state: loaded.state,
        version: loaded.version,
        snapshot_version: loaded.snapshot_version,
    }
}

/// Decides on a cached state. `None` when the state turned out not to be
/// the stream's: the caller loads the stream and decides again.
///
/// The append expects the cached version, so a state behind the stream
/// loses the race and writes nothing. A refusal, or a decision to write
/// nothing, writes nothing to lose a race with: it stands only if the
/// stream's version is the cached one (one read of one index entry, which
/// also finds a state ahead of a log that lost events, as long as the
/// stream has not grown back to the cached version).
fn decide_on_cached<A: Aggregate>(
    store: &EventStore,
    conn: &mut DbConnection,
    cached: Loaded<A>,
    command: &A::Command,
    options: &ExecuteOptions,
    keep: &mut Option<Cached<A>>,
) -> Result<Option<Executed<A>>, ExecuteError<A::Error>>
where
    A::Command: Clone,
{
    let decision = match cached.state.handle(command.clone()) {
        Ok(events) if !events.is_empty() => {
            return match append_decided(store, conn, cached, events, options, 1, Some(keep)) {
                Ok(done) => Ok(Some(done)),
                Err(Error::Conflict { .. }) => Ok(None),
                Err(other) => Err(other.into()),
            };
        }
        refused_or_nothing => refused_or_nothing,
    };
    if read::stream_version(conn, &cached.stream_id)? != cached.version {
        return Ok(None);
    }
    match decision {
        Err(refused) => {
            *keep = Some(cached_state(cached));
            Err(ExecuteError::Domain(refused))
        }
        Ok(_) => {
            let done = unchanged(&cached, 1);
            *keep = Some(cached_state(cached));
            Ok(Some(done))
        }
    }
}

/// What a command that decided no events returns: a copy of the state
/// (the cache keeps the state itself).
fn unchanged<A: Aggregate>(loaded: &Loaded<A>, attempts: u32) -> Executed<A> {
    let policy = A::CACHE.expect("only cached states are copied");
    Executed {
        stream_id: loaded.stream_id.clone(),
        state: policy.copy(&loaded.state),
        version: loaded.version,
        events: Vec::new(),
        attempts,
    }
}

/// Appends the events `loaded.state` decided, expecting `loaded.version`;
/// for a cached aggregate (`keep` given), leaves the new state in `keep`.
fn append_decided<A: Aggregate>(
    store: &EventStore,
    conn: &mut DbConnection,
    loaded: Loaded<A>,
    events: Vec<A::Event>,
    options: &ExecuteOptions,
    attempts: u32,
    mut keep: Option<&mut Option<Cached<A>>>,
) -> Result<Executed<A>> {
    if events.is_empty() {
        return Ok(match keep {
            Some(keep) => {
                let done = unchanged(&loaded, attempts);
                *keep = Some(cached_state(loaded));
                done
            }
            None => Executed {
                stream_id: loaded.stream_id,
                state: loaded.state,
                version: loaded.version,
                events: Vec::new(),
                attempts,
            },
        });
    }
    let stream = loaded.stream_id.as_str();
    let mut write = StreamWrite::new(stream, ExpectedVersion::Exact(loaded.version));
    for event in &events {
        write.push_new(NewEvent::new(event)?.with_metadata(options.metadata.clone()));
    }
    let writes = std::slice::from_ref(&write);
    let project = store.projects(writes)?;
    let recorded = if store.appends_in_one_statement(writes, project) {
        append_events(conn, writes, project)?
    } else if let Some(recorded) = store.append_optimistic(conn, writes, project)? {
        recorded
    } else {
        write_transaction(conn, |c| append_events(c, writes, project))?
    };
    // A cached state is folded from the events as a load will read them
    // (their JSON), not from the values the command made: a field that
    // serde skips must not live on in the cache alone.
    let mut state = loaded.state;
    let mut version = loaded.version;
    let mut out = Vec::with_capacity(events.len());
    for ((rec, event), new) in recorded.into_iter().zip(events).zip(&write.events) {
        if keep.is_some() {
            match <A::Event as es_core::Event>::decode(
                new.event_type,
                new.event_version,
                &new.payload,
            ) {
                Ok(stored) => state.apply(&stored),
                Err(err) => {
                    tracing::warn!(aggregate = A::TYPE, stream, event_type = new.event_type, error = %err, "an appended event does not decode from its JSON; its state is not cached, and loading the stream will fail");
                    keep = None;
                    state.apply(&event);
                }
            }
        } else {
            state.apply(&event);
        }
        version = rec.stream_version;
        out.push(rec.map(|_| event));
    }
    let mut snapshot_version = loaded.snapshot_version;
    if let Some(policy) = A::SNAPSHOTS {
        if version - snapshot_version.unwrap_or(0)
            >= i64::try_from(policy.every).unwrap_or(i64::MAX)
            && save_snapshot_in(conn, stream, &state, version)
        {
            snapshot_version = Some(version);
        }
    }
    if let (Some(keep), Some(policy)) = (keep, A::CACHE) {
        *keep = Some(Cached {
            state: policy.copy(&state),
            version,
            snapshot_version,
        });
    }
    Ok(Executed {
        stream_id: loaded.stream_id,
        state,
        version,
        events: out,
        attempts,
    })
}
