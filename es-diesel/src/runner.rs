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

use crate::backend::{write_transaction, Backend, DbConnection};
use crate::error::{Error, Result};
use crate::follow::{read_after, Checkpoint, Followed};
use crate::EventStore;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use es_core::RecordedEvent;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// (PostgreSQL runners are woken earlier by NOTIFY).
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
    listener: Option<diesel::PgConnection>,
    failures: u32,
}

struct StoredCheckpoint {
    checkpoint: Checkpoint,
    holder: Option<String>,
}

#[derive(QueryableByName)]
struct CheckpointRow {
    #[diesel(sql_type = BigInt)]
    position: i64,
    #[diesel(sql_type = BigInt)]
    transaction_id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    holder: Option<String>,
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

/// The database clock in milliseconds since the epoch.
pub(crate) fn now_ms_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// `$n` placeholders on PostgreSQL, `?` on SQLite.
pub(crate) fn sql(backend: Backend, text: &str) -> String {
    match backend {
        Backend::Postgres => {
            let mut out = String::with_capacity(text.len() + 8);
            let mut n = 0;
            for c in text.chars() {
                if c == '?' {
                    n += 1;
                    out.push_str(&format!("${n}"));
                } else {
                    out.push(c);
                }
            }
            out
        }
        Backend::Sqlite => text.to_owned(),
    }
}

pub(crate) fn ensure_checkpoint_row(conn: &mut DbConnection, name: &str) -> Result<()> {
    let backend = conn.backend();
    diesel::sql_query(sql(
        backend,
        "INSERT INTO es_checkpoints (projection, position, transaction_id, state) VALUES (?, 0, 0, 'idle') \
         ON CONFLICT (projection) DO NOTHING",
    ))
    .bind::<Text, _>(name)
    .execute(conn)?;
    Ok(())
}

fn load_checkpoint(conn: &mut DbConnection, name: &str) -> Result<StoredCheckpoint> {
    let backend = conn.backend();
    let row = diesel::sql_query(sql(
        backend,
        "SELECT position, transaction_id, holder FROM es_checkpoints WHERE projection = ?",
    ))
    .bind::<Text, _>(name)
    .get_result::<CheckpointRow>(conn)?;
    Ok(StoredCheckpoint {
        checkpoint: Checkpoint {
            transaction: row.transaction_id,
            position: row.position,
        },
        holder: row.holder,
    })
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
            failures: 0,
        }
    }

    pub fn name(&self) -> &str {
        self.projection.name()
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes or renews the lease (renewal only once half of it has gone by,
    /// unless `force`). Returns whether this runner holds it.
    fn hold_lease(&mut self, conn: &mut DbConnection, force: bool) -> Result<bool> {
        let half = self.options.lease / 2;
        if !force && self.lease_renewed.is_some_and(|t| t.elapsed() < half) {
            return Ok(true);
        }
        let backend = conn.backend();
        let now = now_ms_sql(backend);
        let lease_ms = self.lease_ms();
        // The database clock sets the expiry later than this instant.
        let renewed = Instant::now();
        let taken = write_transaction(conn, |c| -> Result<usize> {
            ensure_checkpoint_row(c, self.projection.name())?;
            Ok(diesel::sql_query(sql(
                backend,
                &format!(
                    "UPDATE es_checkpoints SET holder = ?, lease_expires_ms = {now} + ?, \
                     state = CASE WHEN state = 'failed' THEN state ELSE 'running' END \
                     WHERE projection = ? AND (holder IS NULL OR holder = ? OR lease_expires_ms < {now})"
                ),
            ))
            .bind::<Text, _>(&self.options.node)
            .bind::<BigInt, _>(lease_ms)
            .bind::<Text, _>(self.projection.name())
            .bind::<Text, _>(&self.options.node)
            .execute(c)?)
        })?;
        if taken == 1 {
            if self.lease_renewed.is_none() {
                tracing::info!(projection = self.name(), node = %self.options.node, "runner took the projection");
            }
            self.lease_renewed = Some(renewed);
            Ok(true)
        } else {
            if self.lease_renewed.take().is_some() {
                tracing::warn!(projection = self.name(), node = %self.options.node, "runner lost the projection");
            }
            Ok(false)
        }
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

    /// Logs a store error and records it in the status, if this runner
    /// still holds the projection and the database answers.
    fn store_failed(&self, conn: &mut DbConnection, error: &Error) {
        tracing::error!(projection = self.name(), node = %self.options.node, error = %error_chain(error), "runner failed on a store error");
        if let Err(e) = self.record_failure(conn, error_position(error), error) {
            tracing::warn!(projection = self.name(), error = %error_chain(&e), "cannot record the runner's error in the projection's status");
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
        write_transaction(conn, |c| {
            let stored = load_checkpoint(c, name)?;
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
            let backend = c.backend();
            let renewed = Instant::now();
            let moved = diesel::sql_query(sql(
                backend,
                &format!(
                    "UPDATE es_checkpoints SET position = ?, transaction_id = ?, state = 'running', \
                     last_error = NULL, failed_position = NULL, updated_at = CURRENT_TIMESTAMP, \
                     lease_expires_ms = {} + ? \
                     WHERE projection = ? AND holder = ? AND position = ? AND transaction_id = ?",
                    now_ms_sql(backend)
                ),
            ))
            .bind::<BigInt, _>(last.position)
            .bind::<BigInt, _>(last.transaction)
            .bind::<BigInt, _>(self.lease_ms())
            .bind::<Text, _>(name)
            .bind::<Text, _>(node)
            .bind::<BigInt, _>(stored.checkpoint.position)
            .bind::<BigInt, _>(stored.checkpoint.transaction)
            .execute(c)?;
            if moved != 1 {
                return Err(Abort::Lost);
            }
            Ok((applied, Some(renewed)))
        })
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

    fn record_failure(
        &self,
        conn: &mut DbConnection,
        position: Option<i64>,
        error: &Error,
    ) -> Result<()> {
        let backend = conn.backend();
        let message = error_chain(error);
        write_transaction(conn, |c| -> Result<()> {
            diesel::sql_query(sql(
                backend,
                "UPDATE es_checkpoints SET state = 'failed', last_error = ?, failed_position = ?, \
                 updated_at = CURRENT_TIMESTAMP WHERE projection = ? AND holder = ?",
            ))
            .bind::<Text, _>(&message)
            .bind::<Nullable<BigInt>, _>(position)
            .bind::<Text, _>(self.projection.name())
            .bind::<Text, _>(&self.options.node)
            .execute(c)?;
            Ok(())
        })
    }

    fn clear_failure(&self, conn: &mut DbConnection) -> Result<()> {
        diesel::sql_query(sql(
            conn.backend(),
            "UPDATE es_checkpoints SET state = 'running', last_error = NULL, failed_position = NULL, \
             updated_at = CURRENT_TIMESTAMP WHERE projection = ? AND holder = ? AND state = 'failed'",
        ))
        .bind::<Text, _>(self.projection.name())
        .bind::<Text, _>(&self.options.node)
        .execute(conn)?;
        Ok(())
    }

    /// Waits for new events: a NOTIFY on PostgreSQL, or `idle_poll`.
    fn wait(&mut self, stop: &AtomicBool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if self.store.backend() == Backend::Postgres && self.listener.is_none() {
            self.listener = self.store.listen_connection();
        }
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if let Some(listener) = &mut self.listener {
                let mut woken = false;
                let mut broken = None;
                for n in listener.notifications_iter() {
                    match n {
                        Ok(_) => woken = true,
                        Err(e) => broken = Some(e),
                    }
                }
                if let Some(e) = broken {
                    tracing::warn!(projection = self.name(), error = %e, "lost the connection listening for appends; polling until it is back");
                    self.listener = None;
                }
                if woken {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10).min(timeout));
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

    /// Gives the lease up so another runner can take over at once. Done by
    /// [`Runner::run`] when it stops, and when a runner is dropped.
    pub fn release(&mut self) {
        if self.lease_renewed.take().is_none() {
            return;
        }
        let released = self.store.connection().and_then(|mut conn| {
            let backend = conn.backend();
            Ok(diesel::sql_query(sql(
                backend,
                "UPDATE es_checkpoints SET holder = NULL, lease_expires_ms = NULL, \
                 state = CASE WHEN state = 'failed' THEN state ELSE 'stopped' END \
                 WHERE projection = ? AND holder = ?",
            ))
            .bind::<Text, _>(self.projection.name())
            .bind::<Text, _>(&self.options.node)
            .execute(&mut *conn)?)
        });
        match released {
            Ok(_) => {
                tracing::info!(projection = self.name(), node = %self.options.node, "runner stopped and released the projection")
            }
            Err(e) => {
                tracing::warn!(projection = self.name(), node = %self.options.node, error = %error_chain(&e), "runner stopped but could not release its lease; another runner takes over when it runs out")
            }
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

impl Drop for Runner {
    fn drop(&mut self) {
        if std::thread::panicking() && self.lease_renewed.is_some() {
            // Unexpected: projector panics are caught. Status shows the
            // projection stale once the lease runs out, not cleanly stopped.
            tracing::error!(projection = self.name(), node = %self.options.node, "runner panicked; its lease runs out");
            return;
        }
        self.release();
    }
}

/// Runs `apply` on `conn`, turning a panic into its message. Transactions
/// the panicking code opened and left open are rolled back first, so the
/// caller's transaction can still roll back cleanly.
pub(crate) fn catch_panic<T>(
    conn: &mut DbConnection,
    apply: impl FnOnce(&mut DbConnection) -> T,
) -> std::result::Result<T, String> {
    use diesel::connection::{Connection, TransactionManager};
    type Tm = <DbConnection as Connection>::TransactionManager;
    let depth = |c: &mut DbConnection| {
        Tm::transaction_manager_status_mut(c)
            .transaction_depth()
            .ok()
            .flatten()
            .map_or(0, |d| d.get())
    };
    let outer = depth(conn);
    match catch_unwind(AssertUnwindSafe(|| apply(&mut *conn))) {
        Ok(value) => Ok(value),
        Err(payload) => {
            while depth(conn) > outer {
                if Tm::rollback_transaction(conn).is_err() {
                    break;
                }
            }
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a value that is not a message".to_owned());
            Err(format!("panicked: {message}"))
        }
    }
}

/// The events before an unreadable row, so that they are applied and the
/// projection stops exactly at that row; the error when the row comes first.
fn readable_prefix(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: Option<&[&str]>,
    limit: usize,
    error: Error,
) -> Result<Vec<Followed>> {
    // Decoding fails in Rust, not in SQL, so the transaction is still usable.
    let (mut readable, mut unreadable) = (0, limit);
    while unreadable - readable > 1 {
        let mid = readable + (unreadable - readable) / 2;
        match read_after(conn, after, types, mid) {
            Ok(_) => readable = mid,
            Err(_) => unreadable = mid,
        }
    }
    if readable == 0 {
        return Err(error);
    }
    read_after(conn, after, types, readable)
}

/// The event a store error is about, if it names one.
fn error_position(error: &Error) -> Option<i64> {
    match error {
        Error::Malformed { position, .. }
        | Error::Decode { position, .. }
        | Error::Projector { position, .. } => Some(*position),
        _ => None,
    }
}

fn error_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
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

/// When a projection is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectionMode {
    /// In the append's transaction: always current.
    Inline,
    /// By a runner, after commit.
    Async,
}

/// A projection's state as stored, plus how far behind the log it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionStatus {
    pub name: String,
    pub mode: ProjectionMode,
    pub checkpoint: Checkpoint,
    /// The highest global position in the log.
    pub head: i64,
    /// Events after the checkpoint's position that the projection handles
    /// (for a read model: the types its projectors handle; otherwise all).
    pub lag: i64,
    /// `idle` (no runner has started it), `running`, `stale` (its runner
    /// stopped renewing the lease: it died, hangs or lost the database;
    /// another runner takes over), `stopped` (its runner shut down and
    /// released it), `failed` (stopped at an error, retrying) or
    /// `rebuilding`; `current` for an inline read model.
    pub state: String,
    /// The runner holding the lease, if any.
    pub holder: Option<String>,
    /// When the holder's lease runs out unless renewed, by the database
    /// clock; `None` when no runner holds the projection.
    pub lease_expires: Option<DateTime<Utc>>,
    /// The lease has run out: its holder is no longer known to be alive.
    pub lease_expired: bool,
    /// The error the projection stopped at (a projector's error or panic,
    /// or a store error), until a batch succeeds again.
    pub last_error: Option<String>,
    /// The position of the event it stopped at, when the error is about one.
    pub failed_position: Option<i64>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    projection: String,
    #[diesel(sql_type = BigInt)]
    position: i64,
    #[diesel(sql_type = BigInt)]
    transaction_id: i64,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Nullable<Text>)]
    holder: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    failed_position: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    lease_expires_ms: Option<i64>,
    #[diesel(sql_type = BigInt)]
    now_ms: i64,
}

/// An asynchronous read model (`#[read_model(mode = async)]`) as a runner
/// sees it: its registered projectors, applied after commit.
struct ReadModelProjection {
    name: &'static str,
    types: Vec<&'static str>,
}

impl AsyncProjection for ReadModelProjection {
    fn name(&self) -> &str {
        self.name
    }

    fn event_types(&self) -> Option<Vec<&'static str>> {
        Some(self.types.clone())
    }

    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> Result<()> {
        crate::projection::apply_read_model(conn, self.name, event)
    }
}

/// Every registered read model with `mode = async`, as runner projections.
pub fn async_read_models() -> Result<Vec<Arc<dyn AsyncProjection>>> {
    let reg = crate::projection::registry()?;
    Ok(reg
        .read_models
        .iter()
        .filter(|m| m.schema.asynchronous)
        .map(|m| {
            Arc::new(ReadModelProjection {
                name: m.schema.name,
                types: crate::projection::handled_types(reg, m.schema.name),
            }) as Arc<dyn AsyncProjection>
        })
        .collect())
}

/// Events after `position`, only of `types` unless it is empty.
fn count_after(
    conn: &mut DbConnection,
    backend: Backend,
    position: i64,
    types: &[&str],
) -> Result<i64> {
    let filter = if types.is_empty() {
        String::new()
    } else {
        format!(" AND event_type IN ({})", vec!["?"; types.len()].join(", "))
    };
    let text = sql(
        backend,
        &format!("SELECT COUNT(*) AS n FROM es_events WHERE global_position > ?{filter}"),
    );
    let mut q = diesel::sql_query(text)
        .into_boxed()
        .bind::<BigInt, _>(position);
    for t in types {
        q = q.bind::<Text, _>(*t);
    }
    Ok(q.get_result::<Count>(conn)?.n)
}

impl EventStore {
    /// Starts a background runner for every read model with `mode = async`.
    /// Runners stop when the handles are dropped or stopped. Any number of
    /// processes may do this against one database: one runner per read
    /// model is active at a time.
    #[must_use = "the runners stop when their handles are dropped"]
    pub fn start_async_read_models(&self, options: RunnerOptions) -> Result<Vec<RunnerHandle>> {
        Ok(self.start_runners(async_read_models()?, options))
    }

    /// Runs every `mode = async` read model until `stop` is set (by a signal
    /// handler, for instance), then stops the runners, which release their
    /// leases: the main loop of a dedicated projection worker process.
    pub fn run_async_read_models(&self, options: RunnerOptions, stop: &AtomicBool) -> Result<()> {
        let mut handles = self.start_async_read_models(options)?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // All at once: each finishes its batch while the others do.
        for h in &handles {
            h.stop.store(true, Ordering::Relaxed);
        }
        for h in &mut handles {
            h.shutdown();
        }
        Ok(())
    }

    /// A runner for `projection` with default options.
    pub fn runner(&self, projection: Arc<dyn AsyncProjection>) -> Runner {
        Runner::new(self.clone(), projection, RunnerOptions::default())
    }

    /// Starts one background runner per projection.
    #[must_use = "the runners stop when their handles are dropped"]
    pub fn start_runners(
        &self,
        projections: Vec<Arc<dyn AsyncProjection>>,
        options: RunnerOptions,
    ) -> Vec<RunnerHandle> {
        projections
            .into_iter()
            .map(|p| Runner::new(self.clone(), p, options.clone()).spawn())
            .collect()
    }

    /// Status of every registered read model and of every projection with a
    /// checkpoint, sorted by name.
    pub fn projection_status(&self) -> Result<Vec<ProjectionStatus>> {
        let mut conn = self.connection()?;
        let head = crate::read::head(&mut conn)?;
        let backend = conn.backend();
        let rows = diesel::sql_query(format!(
            "SELECT projection, position, transaction_id, state, holder, last_error, failed_position, \
             lease_expires_ms, {} AS now_ms FROM es_checkpoints ORDER BY projection",
            now_ms_sql(backend)
        ))
        .load::<StatusRow>(&mut *conn)?;
        let reg = crate::projection::registry()?;
        let mut all: Vec<ProjectionStatus> = reg
            .read_models
            .iter()
            .filter(|m| !rows.iter().any(|r| r.projection == m.schema.name))
            .map(|m| ProjectionStatus {
                name: m.schema.name.to_owned(),
                mode: if m.schema.asynchronous {
                    ProjectionMode::Async
                } else {
                    ProjectionMode::Inline
                },
                checkpoint: Checkpoint {
                    transaction: 0,
                    position: if m.schema.asynchronous { 0 } else { head },
                },
                head,
                lag: 0,
                state: if m.schema.asynchronous {
                    "idle"
                } else {
                    "current"
                }
                .to_owned(),
                holder: None,
                lease_expires: None,
                lease_expired: false,
                last_error: None,
                failed_position: None,
            })
            .collect();
        let stored = rows
            .into_iter()
            .map(|r| {
                // A read model's lag counts only the events its projectors handle.
                let types = reg
                    .read_model(&r.projection)
                    .map(|_| crate::projection::handled_types(reg, &r.projection));
                let lag = match &types {
                    Some(types) if types.is_empty() => 0,
                    Some(types) => count_after(&mut conn, backend, r.position, types)?,
                    None => count_after(&mut conn, backend, r.position, &[])?,
                };
                let lease_expired = r.holder.is_some()
                    && r.lease_expires_ms.is_some_and(|expires| expires < r.now_ms);
                let state = if lease_expired && r.state == "running" {
                    "stale".to_owned()
                } else {
                    r.state
                };
                Ok(ProjectionStatus {
                    name: r.projection,
                    mode: ProjectionMode::Async,
                    checkpoint: Checkpoint {
                        transaction: r.transaction_id,
                        position: r.position,
                    },
                    head,
                    lag,
                    state,
                    holder: r.holder,
                    lease_expires: r.lease_expires_ms.and_then(DateTime::from_timestamp_millis),
                    lease_expired,
                    last_error: r.last_error,
                    failed_position: r.failed_position,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        all.extend(stored);
        // An async read model that no runner has started yet is behind by
        // every event it handles.
        for s in all
            .iter_mut()
            .filter(|s| s.mode == ProjectionMode::Async && s.state == "idle" && s.holder.is_none())
        {
            let types = crate::projection::handled_types(reg, &s.name);
            if s.checkpoint.position == 0 && !types.is_empty() {
                s.lag = count_after(&mut conn, backend, 0, &types)?;
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// A connection that listens for appends (PostgreSQL only).
    pub(crate) fn listen_connection(&self) -> Option<diesel::PgConnection> {
        match self.manager().establish().ok()? {
            DbConnection::Postgres(mut c) => {
                diesel::sql_query("LISTEN es_events").execute(&mut c).ok()?;
                Some(c)
            }
            DbConnection::Sqlite(_) => None,
        }
    }
}
