//! [`EventStore`]: the one handle an application keeps.

use crate::append::{retrying, StreamWrite};
use crate::backend::{parse_url, write_transaction, Backend, Manager, StoreOptions};
use crate::command::cache::StateCache;
use crate::error::{check_stream_id, Error, Result};
use crate::projection::append_events;
use crate::{migrations, read};
use es_core::{Aggregate, Event, ExpectedVersion, Metadata, NewEvent, Recorded, RecordedEvent};
use std::collections::VecDeque;
use std::sync::Arc;

/// A connection checked out of the store's pool.
pub type PooledConnection = r2d2::PooledConnection<Manager>;

/// Page size of the reads that load whole streams.
const STREAM_PAGE: usize = 1_000;

/// The event store: an append-only log in a SQL database, with a pool of
/// connections. Cheap to clone; clones share the pool (and the cache of
/// aggregates' states, see [`Cache`](crate::Cache)).
///
/// ```
/// use es_diesel::{Event, EventStore, ExpectedVersion};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Event, Serialize, Deserialize, Debug, PartialEq)]
/// #[event(view = false)]
/// struct BookRegistered { book_id: i64, title: String }
///
/// # fn main() -> es_diesel::Result<()> {
/// let store = EventStore::open(":memory:")?;
/// store.migrate()?;
/// let recorded = store.append("book-1", ExpectedVersion::NoStream, [BookRegistered { book_id: 1, title: "Dune".into() }])?;
/// assert_eq!(recorded[0].stream_version, 1);
/// let events = store.load_stream::<BookRegistered>("book-1")?;
/// assert_eq!(events[0].title, "Dune");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventStore {
    pool: r2d2::Pool<Manager>,
    manager: Manager,
    backend: Backend,
    inline_projectors: bool,
    optimistic_rows: bool,
    /// Aggregates' states kept between commands; `None` with
    /// [`StoreOptions::cache_aggregates`] off.
    states: Option<Arc<StateCache>>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl EventStore {
    /// Opens a store with default options. The URL chooses the backend:
    /// a SQLite file path (`library.db`, `sqlite://library.db`), `:memory:`,
    /// `postgres://user@host/db` or `mysql://user@host/db` (MySQL or MariaDB).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, StoreOptions::default())
    }

    /// [`open`](Self::open) with settings. Fails rather than waits past
    /// [`StoreOptions::connection_timeout`] on a PostgreSQL server that does
    /// not answer, both here and for the connections the pool opens later.
    /// With [`StoreOptions::create_if_missing`] off, a SQLite file that does
    /// not exist is [`Error::DatabaseNotFound`] rather than a new empty
    /// database.
    pub fn open_with(url: &str, options: StoreOptions) -> Result<Self> {
        let target = parse_url(url)?;
        if let Some(file) = target.sqlite_file() {
            if !options.create_if_missing && !file.exists() {
                return Err(Error::DatabaseNotFound {
                    path: file.display().to_string(),
                });
            }
        }
        let memory = target.is_memory();
        let (backend, size) = (target.backend(), target.pool_size(&options));
        let manager = Manager {
            target,
            options: options.clone(),
        };
        // Fail now with the real connection error rather than a pool timeout.
        let first = manager.establish()?;
        drop(first);
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(if memory { 1 } else { 0 }))
            .connection_timeout(options.connection_timeout)
            // No `SELECT 1` round trip per checkout: a connection the server
            // closed fails its next query with an error, and is then dropped
            // (see `Manager::has_broken`).
            .test_on_check_out(false)
            // An in-memory database lives and dies with its one connection.
            .idle_timeout(if memory {
                None
            } else {
                Some(std::time::Duration::from_secs(600))
            })
            .max_lifetime(if memory {
                None
            } else {
                Some(std::time::Duration::from_secs(1800))
            })
            .build(manager.clone())?;
        Ok(EventStore {
            pool,
            manager,
            backend,
            inline_projectors: options.inline_projectors,
            optimistic_rows: options.optimistic_rows,
            states: options
                .cache_aggregates
                .then(|| Arc::new(StateCache::default())),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where the store is, for messages: "the SQLite database `library.db`",
    /// "the PostgreSQL database `app` at db.example:5432" (never a password).
    pub fn location(&self) -> String {
        self.manager.target.to_string()
    }

    /// Whether appending `writes` runs any inline projector.
    pub(crate) fn projects(&self, writes: &[StreamWrite]) -> Result<bool> {
        Ok(self.inline_projectors
            && !crate::projection::registry()?.no_inline_projector_for(writes))
    }

    /// Whether `writes` can be appended without BEGIN and COMMIT around
    /// them: one statement that writes only events (no inline projector,
    /// `project` false) is atomic by itself. Where an append takes several
    /// statements (SQLite's version read for `Any` and `StreamExists`, an
    /// `Any` stream's lock), it needs the transaction.
    pub(crate) fn appends_in_one_statement(&self, writes: &[StreamWrite], project: bool) -> bool {
        let dialect = self.backend.dialect();
        dialect.one_statement_append()
            && !project
            && writes.len() == 1
            && writes[0].expected != ExpectedVersion::Any
            && !(dialect.serial_writers() && writes[0].expected == ExpectedVersion::StreamExists)
            && writes[0].events.len() <= crate::append::CHUNK
            // Tags are a second statement.
            && writes[0]
                .events
                .iter()
                .all(|e| e.tags.is_empty() && !crate::append::declares_tags(e.event_type))
    }

    /// Appends `writes`, whose inline projectors run (`project`), in one
    /// statement that commits by itself and writes their rows, where the
    /// backend and the projectors allow it (see `projection::guarded`);
    /// `None`, having written nothing, where they do not or a row moved on.
    pub(crate) fn append_optimistic(
        &self,
        conn: &mut crate::backend::DbConnection,
        writes: &[StreamWrite],
        project: bool,
    ) -> Result<Option<Vec<RecordedEvent>>> {
        if !(project && self.optimistic_rows && self.appends_in_one_statement(writes, false)) {
            return Ok(None);
        }
        crate::projection::guarded::append(conn, &writes[0])
    }

    /// The cache of `A`'s states, when `A` asks for one and the store keeps
    /// them.
    pub(crate) fn state_cache<A: Aggregate>(&self) -> Option<&StateCache> {
        A::CACHE.and(self.states.as_deref())
    }

    /// Forgets the cached states of the streams this store just appended
    /// to other than through a command: the next command on each reads
    /// its stream instead of losing a race first.
    pub(crate) fn forget_cached_states(&self, writes: &[StreamWrite]) {
        self.forget_cached_streams(writes.iter().map(|w| w.stream_id.as_str()));
    }

    pub(crate) fn forget_cached_streams<'s>(&self, streams: impl IntoIterator<Item = &'s str>) {
        if let Some(states) = &self.states {
            states.forget(streams);
        }
    }

    /// Forgets every aggregate state this store (and its clones) keeps in
    /// memory (see [`Cache`](crate::Cache)): the next command on each
    /// aggregate loads its stream. Needed only when the log changed other
    /// than by appends, such as a database restored from a backup under a
    /// running process.
    pub fn clear_aggregate_cache(&self) {
        if let Some(states) = &self.states {
            states.clear();
        }
    }

    /// Whether this store runs inline projectors on append.
    pub(crate) fn inline_projectors(&self) -> bool {
        self.inline_projectors
    }

    /// Opens connections outside the pool (for long-lived listeners).
    pub(crate) fn manager(&self) -> &Manager {
        &self.manager
    }

    /// A connection from the pool, for Diesel queries on views and read models.
    pub fn connection(&self) -> Result<PooledConnection> {
        Ok(self.pool.get()?)
    }

    /// Creates or upgrades the store's tables and the typed event views.
    /// Idempotent, and safe to run from several processes at once.
    ///
    /// Read models it creates or re-creates (their shape changed) are built
    /// from the log after the schema changes commit: inline ones by a
    /// [rebuild](Self::rebuild) before it returns (appends go on meanwhile;
    /// a rebuild already in progress is waited for), asynchronous ones by
    /// their runners.
    pub fn migrate(&self) -> Result<()> {
        let mut conn = self.connection()?;
        migrations::migrate(&mut conn)
    }

    /// Checks, reading only, that [`migrate`](Self::migrate) has nothing
    /// left to do: the store's migrations are applied and every registered
    /// read model and event view exists in its current shape. Otherwise
    /// [`Error::NotMigrated`] lists what is missing. Commands that should not
    /// change the schema (or run as a role that may not) call this instead of
    /// `migrate`.
    pub fn check_migrated(&self) -> Result<()> {
        let missing = migrations::missing(&mut *self.connection()?)?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::NotMigrated {
                database: self.location(),
                missing,
            })
        }
    }

    /// The newest schema version this code knows and the number of
    /// migrations the database has applied.
    pub fn schema_versions(&self) -> Result<(i32, i64)> {
        migrations::schema_versions(&mut *self.connection()?)
    }

    /// Appends `events` to `stream` if it is at the `expected` version, in
    /// one transaction. Returns the recorded events. On
    /// [`Error::Conflict`] nothing is written.
    pub fn append<E: Event>(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Recorded<E>>> {
        self.append_with(stream, expected, events, &Metadata::default())
    }

    /// [`append`](Self::append) with the same metadata on every event.
    pub fn append_with<E: Event>(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = E>,
        metadata: &Metadata,
    ) -> Result<Vec<Recorded<E>>> {
        let events: Vec<E> = events.into_iter().collect();
        let mut write = StreamWrite::new(stream, expected);
        for e in &events {
            write.push_new(NewEvent::new(e)?.with_metadata(metadata.clone()));
        }
        let recorded = self.append_streams(std::slice::from_ref(&write))?;
        Ok(recorded
            .into_iter()
            .zip(events)
            .map(|(r, e)| r.map(|_| e))
            .collect())
    }

    /// Appends to several streams atomically: every expectation holds and
    /// everything is written, or nothing is. Returns the recorded events in
    /// the order of `writes`.
    ///
    /// Streams are written in the order of their ids (their events' global
    /// positions follow that order), so that concurrent multi-stream appends
    /// never deadlock. A race lost by a write that expects
    /// [`ExpectedVersion::Any`] or [`ExpectedVersion::StreamExists`], and a
    /// transaction the database aborted because of a concurrent one, are
    /// retried; a stale [`ExpectedVersion::Exact`] or
    /// [`ExpectedVersion::NoStream`] is an [`Error::Conflict`].
    pub fn append_streams(&self, writes: &[StreamWrite]) -> Result<Vec<RecordedEvent>> {
        // Stream ids are checked by `append_events`, before anything is written.
        let mut conn = self.connection()?;
        let projects = self.projects(writes)?;
        let single_statement = self.appends_in_one_statement(writes, projects);
        let project = self.inline_projectors;
        let appended = retrying(&mut conn, writes, |conn| {
            if single_statement {
                append_events(conn, writes, false)
            } else if let Some(appended) = self.append_optimistic(conn, writes, projects)? {
                Ok(appended)
            } else {
                write_transaction(conn, |c| append_events(c, writes, project))
            }
        })?;
        self.forget_cached_states(writes);
        Ok(appended)
    }

    /// Events of `stream` from `from_version` (1 = the start), at most `limit`.
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        check_stream_id(stream)?;
        read::read_stream(&mut *self.connection()?, stream, from_version, limit)
    }

    /// Every event of `stream`, decoded as `E`, read in pages.
    pub fn load_stream<E: Event>(&self, stream: &str) -> Result<Vec<Recorded<E>>> {
        check_stream_id(stream)?;
        let mut conn = self.connection()?;
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let page = read::read_stream(&mut conn, stream, from, STREAM_PAGE)?;
            let full = page.len() == STREAM_PAGE;
            for ev in page {
                from = ev.stream_version + 1;
                out.push(ev.decode::<E>().map_err(|e| Error::decode(&ev, e))?);
            }
            if !full {
                return Ok(out);
            }
        }
    }

    /// The stream's current version (0 if it has no events).
    pub fn stream_version(&self, stream: &str) -> Result<i64> {
        check_stream_id(stream)?;
        read::stream_version(&mut *self.connection()?, stream)
    }

    /// Events with a global position above `after`, in global order, at most `limit`.
    ///
    /// On PostgreSQL, concurrent writers commit positions out of order: a
    /// page may miss an event that commits later with a lower position. Use a
    /// projection runner, not this, to follow the log.
    pub fn read_all(&self, after: i64, limit: usize) -> Result<Vec<RecordedEvent>> {
        read::read_all(&mut *self.connection()?, after, limit)
    }

    /// Iterates over the whole log after `after`, `page` events per query.
    pub fn iter_all(&self, after: i64, page: usize) -> LogIter {
        LogIter {
            store: self.clone(),
            after,
            page: page.max(1),
            types: None,
            buffer: VecDeque::new(),
            done: false,
        }
    }

    /// Events whose type is one of `types`, after `after`, in global order.
    pub fn read_types(
        &self,
        types: &[&str],
        after: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        read::read_types(&mut *self.connection()?, types, after, limit)
    }

    /// Iterates over all events of the given types after `after`.
    pub fn iter_types(&self, types: &[&str], after: i64, page: usize) -> LogIter {
        LogIter {
            types: Some(types.iter().map(|t| t.to_string()).collect()),
            ..self.iter_all(after, page)
        }
    }

    /// Events decodable as `E` (one type, or all variants of an event enum),
    /// after `after`, in global order, at most `limit`.
    pub fn read_events<E: Event>(&self, after: i64, limit: usize) -> Result<Vec<Recorded<E>>> {
        self.read_types(E::EVENT_TYPES, after, limit)?
            .into_iter()
            .map(|ev| ev.decode::<E>().map_err(|e| Error::decode(&ev, e)))
            .collect()
    }

    /// The highest global position (0 for an empty log).
    pub fn head(&self) -> Result<i64> {
        read::head(&mut *self.connection()?)
    }
}

/// Pages through the log; see [`EventStore::iter_all`].
pub struct LogIter {
    store: EventStore,
    after: i64,
    page: usize,
    types: Option<Vec<String>>,
    buffer: VecDeque<RecordedEvent>,
    done: bool,
}

impl Iterator for LogIter {
    type Item = Result<RecordedEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffer.is_empty() && !self.done {
            let page = match &self.types {
                None => self.store.read_all(self.after, self.page),
                Some(types) => {
                    let types: Vec<&str> = types.iter().map(String::as_str).collect();
                    self.store.read_types(&types, self.after, self.page)
                }
            };
            match page {
                Ok(events) => {
                    self.done = events.len() < self.page;
                    if let Some(last) = events.last() {
                        self.after = last.global_position;
                    }
                    self.buffer.extend(events);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.buffer.pop_front().map(Ok)
    }
}
