//! The store from async code on tokio (the `tokio` feature).
//!
//! Diesel's connections block, so every operation of [`AsyncEventStore`]
//! runs the blocking [`EventStore`] on tokio's blocking thread pool
//! (`spawn_blocking`), as deadpool-diesel does: the async tasks that await
//! them never block the runtime's worker threads. The pool of database
//! connections is the store's own, so at most
//! [`StoreOptions::pool_size`](crate::StoreOptions::pool_size) operations
//! touch the database at once; the others wait for a connection on the
//! blocking pool, not on the runtime.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), es_diesel::Error> {
//! use es_diesel::{AsyncEventStore, Event, ExpectedVersion};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Event, Serialize, Deserialize)]
//! struct BookRegistered {
//!     book_id: i64,
//!     title: String,
//! }
//!
//! let store = AsyncEventStore::open(":memory:").await?;
//! store.migrate().await?;
//! let book = BookRegistered { book_id: 1, title: "Dune".into() };
//! store.append("book-1", ExpectedVersion::NoStream, vec![book]).await?;
//! assert_eq!(store.stream_version("book-1").await?, 1);
//! # Ok(()) }
//! ```

use crate::command::execute::{ExecuteError, ExecuteOptions, Executed, Loaded};
use crate::runner::{ProjectionStatus, RunnerHandle, RunnerOptions};
use crate::{
    Aggregate, AppendCondition, Decided, DecisionStates, Event, EventStore, ExpectedVersion, Query,
    QueryRead, RebuildReport, Recorded, RecordedEvent, Result, StoreOptions, StreamWrite,
};
use std::future::Future;

/// An [`EventStore`] for async code: the same operations, awaited. Cheap
/// to clone (the clones share the connection pool).
#[derive(Clone)]
pub struct AsyncEventStore {
    store: EventStore,
}

impl From<EventStore> for AsyncEventStore {
    fn from(store: EventStore) -> Self {
        AsyncEventStore { store }
    }
}

impl EventStore {
    /// The same store, for async code on tokio.
    pub fn into_async(self) -> AsyncEventStore {
        AsyncEventStore::from(self)
    }
}

impl AsyncEventStore {
    /// [`EventStore::open`], without blocking the runtime.
    pub async fn open(url: &str) -> Result<Self> {
        let url = url.to_owned();
        blocking(move || EventStore::open(&url))
            .await
            .map(Self::from)
    }

    /// [`EventStore::open_with`], without blocking the runtime.
    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Self> {
        let url = url.to_owned();
        blocking(move || EventStore::open_with(&url, options))
            .await
            .map(Self::from)
    }

    /// The blocking store, for code already off the runtime (inside
    /// [`AsyncEventStore::run`], a thread of its own).
    pub fn blocking(&self) -> &EventStore {
        &self.store
    }

    /// Runs `f` on the blocking store, on tokio's blocking pool: for
    /// anything this type does not wrap, such as a transaction of your own
    /// with [`write_transaction`](crate::write_transaction) and
    /// [`append_in`](crate::append_in). A panic in `f` resumes in the caller.
    pub async fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&EventStore) -> T + Send + 'static,
    {
        let store = self.store.clone();
        blocking(move || f(&store)).await
    }

    /// [`EventStore::migrate`].
    pub async fn migrate(&self) -> Result<()> {
        self.run(|s| s.migrate()).await
    }

    /// [`EventStore::check_migrated`].
    pub async fn check_migrated(&self) -> Result<()> {
        self.run(|s| s.check_migrated()).await
    }

    /// [`EventStore::append`].
    pub async fn append<E>(
        &self,
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<E>,
    ) -> Result<Vec<Recorded<E>>>
    where
        E: Event + Send + 'static,
    {
        let stream = stream.into();
        self.run(move |s| s.append(&stream, expected, events)).await
    }

    /// [`EventStore::append_streams`].
    pub async fn append_streams(&self, writes: Vec<StreamWrite>) -> Result<Vec<RecordedEvent>> {
        self.run(move |s| s.append_streams(&writes)).await
    }

    /// [`EventStore::execute`].
    pub async fn execute<A>(
        &self,
        id: impl Into<String>,
        command: A::Command,
    ) -> std::result::Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Aggregate + Send + 'static,
        A::Command: Clone + Send + 'static,
        A::Error: Send + 'static,
    {
        self.execute_with::<A>(id, command, ExecuteOptions::default())
            .await
    }

    /// [`EventStore::execute_with`].
    pub async fn execute_with<A>(
        &self,
        id: impl Into<String>,
        command: A::Command,
        options: ExecuteOptions,
    ) -> std::result::Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Aggregate + Send + 'static,
        A::Command: Clone + Send + 'static,
        A::Error: Send + 'static,
    {
        let id = id.into();
        self.run(move |s| s.execute_with::<A>(&id, command, &options))
            .await
    }

    /// [`EventStore::decide`].
    pub async fn decide<S, E, Err, F>(
        &self,
        stream: impl Into<String>,
        states: S,
        decide: F,
    ) -> std::result::Result<Decided<S, E>, ExecuteError<Err>>
    where
        S: DecisionStates + Clone,
        E: Event + Send + 'static,
        Err: Send + 'static,
        F: Fn(&S) -> std::result::Result<Vec<E>, Err> + Send + 'static,
    {
        self.decide_with(stream, states, decide, ExecuteOptions::default())
            .await
    }

    /// [`EventStore::decide_with`].
    pub async fn decide_with<S, E, Err, F>(
        &self,
        stream: impl Into<String>,
        states: S,
        decide: F,
        options: ExecuteOptions,
    ) -> std::result::Result<Decided<S, E>, ExecuteError<Err>>
    where
        S: DecisionStates + Clone,
        E: Event + Send + 'static,
        Err: Send + 'static,
        F: Fn(&S) -> std::result::Result<Vec<E>, Err> + Send + 'static,
    {
        let stream = stream.into();
        self.run(move |s| s.decide_with(&stream, states, decide, &options))
            .await
    }

    /// [`EventStore::load_states`].
    pub async fn load_states<S: DecisionStates>(&self, states: S) -> Result<S> {
        self.run(move |s| s.load_states(states)).await
    }

    /// [`EventStore::read_query`].
    pub async fn read_query(&self, query: Query) -> Result<QueryRead> {
        self.run(move |s| s.read_query(&query)).await
    }

    /// [`EventStore::append_if`].
    pub async fn append_if(
        &self,
        writes: Vec<StreamWrite>,
        condition: AppendCondition,
    ) -> Result<Vec<RecordedEvent>> {
        self.run(move |s| s.append_if(&writes, &condition)).await
    }

    /// [`EventStore::load_aggregate`].
    pub async fn load_aggregate<A>(&self, id: impl Into<String>) -> Result<Loaded<A>>
    where
        A: Aggregate + Send + 'static,
    {
        let id = id.into();
        self.run(move |s| s.load_aggregate::<A>(&id)).await
    }

    /// [`EventStore::read_stream`].
    pub async fn read_stream(
        &self,
        stream: impl Into<String>,
        from_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let stream = stream.into();
        self.run(move |s| s.read_stream(&stream, from_version, limit))
            .await
    }

    /// [`EventStore::stream_version`].
    pub async fn stream_version(&self, stream: impl Into<String>) -> Result<i64> {
        let stream = stream.into();
        self.run(move |s| s.stream_version(&stream)).await
    }

    /// [`EventStore::read_all`].
    pub async fn read_all(&self, after: i64, limit: usize) -> Result<Vec<RecordedEvent>> {
        self.run(move |s| s.read_all(after, limit)).await
    }

    /// [`EventStore::head`].
    pub async fn head(&self) -> Result<i64> {
        self.run(|s| s.head()).await
    }

    /// [`EventStore::rebuild`].
    pub async fn rebuild(&self, name: impl Into<String>) -> Result<RebuildReport> {
        let name = name.into();
        self.run(move |s| s.rebuild(&name)).await
    }

    /// [`EventStore::projection_status`].
    pub async fn projection_status(&self) -> Result<Vec<ProjectionStatus>> {
        self.run(|s| s.projection_status()).await
    }

    /// [`EventStore::start_async_read_models`]: the runners work on threads
    /// of their own; stop them with [`AsyncRunners::shutdown`] or
    /// [`AsyncRunners::run_until`].
    pub async fn start_async_read_models(&self, options: RunnerOptions) -> Result<AsyncRunners> {
        self.run(move |s| s.start_async_read_models(options))
            .await
            .map(|handles| AsyncRunners { handles })
    }
}

/// Runners started from async code. Dropping them stops them too, but
/// blocks the dropping thread until their batches commit: prefer
/// [`AsyncRunners::shutdown`].
#[must_use = "the runners stop when this is dropped"]
pub struct AsyncRunners {
    handles: Vec<RunnerHandle>,
}

impl AsyncRunners {
    /// The names of the projections the runners keep.
    pub fn names(&self) -> Vec<&str> {
        self.handles.iter().map(RunnerHandle::name).collect()
    }

    /// Stops every runner and waits for them (each commits its current
    /// batch and releases its lease), without blocking the runtime.
    pub async fn shutdown(self) {
        let handles = self.handles;
        blocking(move || {
            for mut h in handles {
                h.shutdown();
            }
        })
        .await;
    }

    /// Runs until `signal` completes (a cancellation token's
    /// `cancelled()`, `tokio::signal::ctrl_c()`, a channel), then shuts
    /// down.
    pub async fn run_until<F: Future>(self, signal: F) {
        signal.await;
        self.shutdown().await;
    }
}

/// Runs `f` on tokio's blocking pool; a panic in `f` resumes in the caller.
async fn blocking<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match ::tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only when the runtime shuts down under the caller.
            Err(e) => panic!("the store's blocking task did not finish: {e}"),
        },
    }
}
