//! Asynchronous projections: runners that follow the log from a stored
//! checkpoint, apply a batch and move the checkpoint in the same transaction.
//!
//! * Exactly-once effect: the read-model writes and the checkpoint commit
//!   together; the checkpoint update is guarded by the checkpoint it started
//!   from, so a batch that raced another runner is rolled back whole.
//! * Never skipping: events are read with [`crate::follow::read_after`], which on
//!   PostgreSQL only returns events no slower writer can still precede.
//! * One active runner per projection across processes and machines: a lease
//!   in `es_checkpoints` (holder, expiry by the database clock). Every batch
//!   commit renews it, and a batch ends early, committing what it has, once
//!   half the lease has gone by, so a slow projector keeps its lease while it
//!   works. When the holder dies another runner takes over after the lease
//!   runs out, from the checkpoint, and meanwhile status says `stale`.
//! * Failure: a projection that fails on an event, by an error or a panic,
//!   stops at that event (the events before it in the batch are kept),
//!   records the error and the position, and retries with backoff; once the
//!   cause is fixed it resumes from exactly there. Store errors (a lost
//!   connection, an unreadable row) are recorded and logged the same way.

mod checkpoints;
mod failure;
mod lease;
mod read_models;
mod status;

use crate::projection::catch_panic;
use failure::{error_chain, error_position, readable_prefix};

pub(crate) use checkpoints::{hold_for_rebuild, rebuilt, restart};
pub use read_models::async_read_models;
pub use status::{ProjectionMode, ProjectionStatus};

use crate::backend::{write_transaction, DbConnection, Listener, LogMark};
use crate::error::{Error, Result};
use crate::follow::read_after;
use crate::EventStore;
use es_core::RecordedEvent;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::field::Empty;

/// A projection fed asynchronously by a runner.
pub trait AsyncProjection: Send + Sync + 'static {
    /// Unique name; the checkpoint is stored under it.
    fn name(&self) -> &str;
    /// The event types it handles; `None` for every event.
    fn event_types(&self) -> Option<Vec<&'static str>>;
    /// Applies one event inside the batch transaction on `conn`. An error
    /// or a panic stops the projection at this event; the batch's earlier
    /// events are kept.
    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> Result<()>;
}

/// Settings of a runner.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// Most events per transaction (0 is taken as 1). A batch also ends,
    /// committing what it has, once half the lease has gone by.
    pub batch_size: usize,
    /// How long an idle runner waits before looking at the log again
    /// (PostgreSQL runners watch the log's order keys and wake within
    /// milliseconds of an append's commit).
    pub idle_poll: Duration,
    /// How long a lease lasts without renewal; a dead runner's projection is
    /// taken over, and shown as `stale`, after at most this long. One event
    /// must take less than half of it to apply.
    pub lease: Duration,
    /// Longest pause between retries of a failing projection.
    pub max_backoff: Duration,
    /// This runner's name in status output.
    pub node: String,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            batch_size: 500,
            idle_poll: Duration::from_millis(250),
            lease: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            node: default_node_name(),
        }
    }
}

/// How often a waiting runner looks whether the log moved (PostgreSQL).
const WAKE_POLL: Duration = Duration::from_millis(10);

fn default_node_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "node".to_owned());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &tag[..8])
}

/// What one [`Runner::step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Applied this many events (0: nothing new yet).
    Applied(usize),
    /// Another runner holds the projection.
    Standby,
    /// Stopped at an event (its projector returned an error or panicked);
    /// the error is recorded in the projection's status.
    Failed { position: i64 },
}

/// Follows the log for one projection. Use [`Runner::spawn`] for a
/// background thread, or [`Runner::run`] in a dedicated worker process.
/// Dropping a runner releases its lease; a process that dies without doing
/// so leaves the projection `stale` until the lease runs out and another
/// runner takes over.
pub struct Runner {
    store: EventStore,
    projection: Arc<dyn AsyncProjection>,
    types: Option<Vec<&'static str>>,
    options: RunnerOptions,
    lease_renewed: Option<Instant>,
    listener: Option<Listener>,
    /// Where the log stood before the last step (PostgreSQL).
    mark: Option<LogMark>,
    failures: u32,
}

/// Why a batch transaction was abandoned.
enum Abort {
    Lost,
    Failed {
        index: usize,
        position: i64,
        error: Box<Error>,
    },
    Store(Error),
}

impl From<diesel::result::Error> for Abort {
    fn from(e: diesel::result::Error) -> Self {
        Abort::Store(e.into())
    }
}

impl From<Error> for Abort {
    fn from(e: Error) -> Self {
        Abort::Store(e)
    }
}

impl Runner {
    /// A runner for `projection`. A `batch_size` of 0 is taken as 1.
    pub fn new(
        store: EventStore,
        projection: Arc<dyn AsyncProjection>,
        mut options: RunnerOptions,
    ) -> Self {
        options.batch_size = options.batch_size.max(1);
        let types = projection.event_types();
        Runner {
            store,
            projection,
            types,
            options,
            lease_renewed: None,
            listener: None,
            mark: None,
            failures: 0,
        }
    }

    pub fn name(&self) -> &str {
        self.projection.name()
    }

    /// Applies at most one batch, if this runner holds the projection.
    ///
    /// A failing event gives `Ok(Step::Failed { .. })`; a store error (the
    /// database unreachable, an unreadable row) is returned as `Err`. Both
    /// are logged and recorded in the projection's status.
    pub fn step(&mut self) -> Result<Step> {
        let result = self.try_step();
        match &result {
            Ok(Step::Failed { .. }) | Err(_) => self.failures = self.failures.saturating_add(1),
            Ok(_) => {
                if self.failures > 0 {
                    tracing::info!(projection = self.name(), "projection recovered");
                }
                self.failures = 0;
            }
        }
        result
    }

    fn try_step(&mut self) -> Result<Step> {
        let mut conn = match self.store.connection() {
            Ok(conn) => conn,
            Err(error) => {
                tracing::error!(projection = self.name(), node = %self.options.node, error = %error_chain(&error), "runner cannot reach the store");
                return Err(error);
            }
        };
        let conn = &mut *conn;
        match self.step_on(conn) {
            Err(Abort::Store(error)) => {
                self.store_failed(conn, &error);
                Err(error)
            }
            Err(Abort::Lost) => {
                self.lease_renewed = None;
                Ok(Step::Standby)
            }
            Err(Abort::Failed {
                position, error, ..
            }) => {
                if let Err(e) = self.record_failure(conn, Some(position), &error) {
                    self.store_failed(conn, &e);
                    return Err(e);
                }
                tracing::error!(projection = self.name(), position, error = %error_chain(&error), "projection stopped at an event");
                Ok(Step::Failed { position })
            }
            Ok(step) => Ok(step),
        }
    }

    fn step_on(&mut self, conn: &mut DbConnection) -> std::result::Result<Step, Abort> {
        if !self.hold_lease(conn, false)? {
            return Ok(Step::Standby);
        }
        let deadline = self.lease_renewed.map(|t| t + self.options.lease / 2);
        match self.batch(conn, self.options.batch_size, deadline) {
            Ok((n, renewed)) => {
                if renewed.is_some() {
                    self.lease_renewed = renewed;
                } else if self.failures > 0 {
                    // Nothing to apply, but the error is over.
                    self.clear_failure(conn)?;
                }
                Ok(Step::Applied(n))
            }
            Err(Abort::Failed {
                index,
                position,
                error,
            }) => {
                // Keep the good events before the failing one, then stop
                // there. The retry gets a fresh lease: it redoes the work.
                if index > 0 {
                    if !self.hold_lease(conn, true)? {
                        return Err(Abort::Lost);
                    }
                    if let (_, Some(renewed)) = self.batch(conn, index, None)? {
                        self.lease_renewed = Some(renewed);
                    }
                }
                Err(Abort::Failed {
                    index,
                    position,
                    error,
                })
            }
            Err(other) => Err(other),
        }
    }

    /// Applies up to `limit` events after the checkpoint in one transaction
    /// and moves the checkpoint, renewing the lease in the same statement.
    /// Past `deadline` it takes no further event (after the first one), so
    /// that the commit comes before the lease runs out. Returns how many
    /// events were applied and when the lease was renewed.
    fn batch(
        &self,
        conn: &mut DbConnection,
        limit: usize,
        deadline: Option<Instant>,
    ) -> std::result::Result<(usize, Option<Instant>), Abort> {
        let name = self.projection.name();
        let node = &self.options.node;
        let started = Instant::now();
        let mut span = tracing::Span::none();
        let mut range = None;
        let result = write_transaction(conn, |c| {
            let stored = checkpoints::load(c, name)?;
            if stored.holder.as_deref() != Some(node) {
                return Err(Abort::Lost);
            }
            let types = self.types.as_deref();
            let events = match read_after(c, stored.checkpoint, types, limit) {
                Err(e) if error_position(&e).is_some() => {
                    readable_prefix(c, stored.checkpoint, types, limit, e)?
                }
                read => read?,
            };
            if events.is_empty() {
                return Ok((0, None));
            }
            // Idle polls have no span: only batches with events to apply.
            span = tracing::debug_span!(
                "es.runner.batch",
                projection = name,
                node = node.as_str(),
                from_position = Empty,
                to_position = Empty,
                events = Empty,
                lag = Empty,
                duration_us = Empty,
            );
            let _entered = span.enter();
            let mut last = None;
            for (index, f) in events.iter().enumerate() {
                if index > 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Err(error) = self.apply(c, &f.event) {
                    return Err(Abort::Failed {
                        index,
                        position: f.event.global_position,
                        error: Box::new(error),
                    });
                }
                last = Some((index + 1, f.checkpoint));
            }
            let Some((applied, last)) = last else {
                return Ok((0, None));
            };
            let renewed = Instant::now();
            let moved =
                checkpoints::advance(c, name, node, stored.checkpoint, last, self.lease_ms())?;
            if !moved {
                return Err(Abort::Lost);
            }
            range = Some((stored.checkpoint.position, last.position));
            Ok((applied, Some(renewed)))
        });
        if let (Ok((applied, _)), Some((from, to))) = (&result, range) {
            let _entered = span.enter();
            self.batch_done(conn, &span, started, from, to, *applied);
        }
        result
    }

    /// Records a committed batch in its span and, for metrics, emits an
    /// event with the projection's lag: positions from its checkpoint to the
    /// head of the log. Nothing is read unless someone listens.
    fn batch_done(
        &self,
        conn: &mut DbConnection,
        span: &tracing::Span,
        started: Instant,
        from: i64,
        to: i64,
        events: usize,
    ) {
        let event_wanted = events > 0 && tracing::enabled!(tracing::Level::DEBUG);
        if span.is_disabled() && !event_wanted {
            return;
        }
        let lag = crate::read::head(conn).map(|head| (head - to).max(0)).ok();
        span.record("from_position", from);
        span.record("to_position", to);
        span.record("events", events);
        if let Some(lag) = lag {
            span.record("lag", lag);
        }
        span.record("duration_us", crate::append::micros(started));
        if event_wanted {
            tracing::debug!(
                projection = self.projection.name(),
                events,
                position = to,
                lag,
                "projection batch committed"
            );
        }
    }

    /// Applies one event; a panic becomes an error at that event.
    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> Result<()> {
        match catch_panic(conn, |c| self.projection.apply(c, event)) {
            Ok(result) => result,
            Err(message) => Err(Error::Projector {
                projector: self.projection.name().to_owned(),
                position: event.global_position,
                stream: event.stream_id.clone(),
                event_type: event.event_type.clone(),
                source: message.into(),
            }),
        }
    }

    /// On PostgreSQL, notes where the log stands before a step reads it,
    /// so that [`Runner::wait`] can tell when there is more to read.
    fn mark_log(&mut self) {
        if !self.store.backend().dialect().watches_appends() {
            return;
        }
        if self.listener.is_none() {
            self.listener = self.store.manager().listen();
        }
        self.mark = None;
        if let Some(listener) = &mut self.listener {
            match listener.mark() {
                Ok(mark) => self.mark = mark,
                Err(e) => {
                    tracing::warn!(projection = self.name(), error = %e, "lost the connection watching for appends; polling until it is back");
                    self.listener = None;
                }
            }
        }
    }

    /// Waits for new events, at most `timeout` (`idle_poll`): on
    /// PostgreSQL, looks every few milliseconds whether the log moved past
    /// the mark taken before the last step (or a NOTIFY came).
    fn wait(&mut self, stop: &AtomicBool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(WAKE_POLL.min(timeout));
            if let Some(listener) = &mut self.listener {
                let (woken, broken) = listener.drain();
                let moved = match broken {
                    Some(e) => Err(e),
                    None if woken => Ok(true),
                    None => listener.moved_since(self.mark),
                };
                match moved {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(projection = self.name(), error = %e, "lost the connection watching for appends; polling until it is back");
                        self.listener = None;
                    }
                }
            }
        }
    }

    /// Runs until `stop` is set: the loop of a dedicated worker. Failures
    /// are retried with backoff; the lease is released at the end.
    pub fn run(&mut self, stop: &AtomicBool) {
        // Idle, the lease is renewed every few polls, well before it runs out.
        let idle = self
            .options
            .idle_poll
            .min(self.options.lease / 4)
            .max(Duration::from_millis(1));
        while !stop.load(Ordering::Relaxed) {
            self.mark_log();
            match self.step() {
                Ok(Step::Applied(n)) if n > 0 => continue,
                Ok(Step::Applied(_)) | Ok(Step::Standby) => self.wait(stop, idle),
                // `step` has logged and recorded the failure.
                Ok(Step::Failed { .. }) | Err(_) => {
                    let exp = self.failures.clamp(1, 16) - 1;
                    let pause =
                        (Duration::from_millis(200) * 2u32.pow(exp)).min(self.options.max_backoff);
                    self.wait_plain(stop, pause);
                }
            }
        }
        self.release();
    }

    fn wait_plain(&self, stop: &AtomicBool, pause: Duration) {
        let deadline = Instant::now() + pause;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs in a background thread until the handle is shut down or dropped.
    pub fn spawn(mut self) -> RunnerHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = self.name().to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("es-runner-{name}"))
            .spawn(move || self.run(&flag))
            .expect("spawn a runner thread");
        RunnerHandle {
            stop,
            thread: Some(thread),
            name,
        }
    }
}

/// A runner in a background thread. Shutting it down (explicitly, or by
/// dropping the handle) is graceful: the current batch commits and the lease
/// is released, so another runner can take over at once.
#[must_use = "the runner stops when its handle is dropped"]
pub struct RunnerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    name: String,
}

impl RunnerHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the runner's thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the runner and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops the runner and waits for it: the current batch commits and the
    /// lease is released. Does nothing the second time.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(projection = %self.name, "runner thread panicked");
            }
        }
    }
}

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
