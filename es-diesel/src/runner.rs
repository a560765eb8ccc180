//! Asynchronous projections: runners that follow the log from a stored
//! checkpoint, apply a batch and move the checkpoint in the same transaction.
//!
//! * Exactly-once effect: the read-model writes and the checkpoint commit
//!   together; the checkpoint update is guarded by the checkpoint it started
//!   from, so a batch that raced another runner is rolled back whole.
//! * Never skipping: events are read with [`crate::follow::read_after`], which on
//!   PostgreSQL only returns events no slower writer can still precede.
//! * One active runner per projection across processes and machines: a lease
//!   in `es_checkpoints` (holder, expiry by the database clock), renewed while
//!   the holder lives; when it dies another runner takes over after the lease
//!   runs out, from the checkpoint.
//! * Failure: a projection that fails on an event stops at that event (the
//!   events before it in the batch are kept), records the error and the
//!   position, and retries with backoff; once the cause is fixed it resumes
//!   from exactly there.

use crate::connection::{write_transaction, Backend, DbConnection};
use crate::error::{Error, Result};
use crate::follow::{read_after, Checkpoint, Followed};
use crate::EventStore;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use es_core::RecordedEvent;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A projection fed asynchronously by a runner.
pub trait AsyncProjection: Send + Sync + 'static {
    /// Unique name; the checkpoint is stored under it.
    fn name(&self) -> &str;
    /// The event types it handles; `None` for every event.
    fn event_types(&self) -> Option<Vec<&'static str>>;
    /// Applies one event inside the batch transaction on `conn`.
    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> Result<()>;
}

/// Settings of a runner.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// Events per transaction.
    pub batch_size: usize,
    /// How long an idle runner waits before looking at the log again
    /// (PostgreSQL runners are woken earlier by NOTIFY).
    pub idle_poll: Duration,
    /// How long a lease lasts without renewal; a dead runner's projection is
    /// taken over after at most this long.
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
    /// Stopped at an event; the error is recorded in the projection's status.
    Failed { position: i64 },
}

/// Follows the log for one projection. Use [`Runner::spawn`] for a
/// background thread, or [`Runner::run`] in a dedicated worker process.
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
    pub fn new(
        store: EventStore,
        projection: Arc<dyn AsyncProjection>,
        options: RunnerOptions,
    ) -> Self {
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

    /// Takes or renews the lease. Returns whether this runner holds it.
    fn hold_lease(&mut self, conn: &mut DbConnection) -> Result<bool> {
        let half = self.options.lease / 2;
        if self.lease_renewed.is_some_and(|t| t.elapsed() < half) {
            return Ok(true);
        }
        let backend = conn.backend();
        let now = now_ms_sql(backend);
        let lease_ms = i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX);
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
            self.lease_renewed = Some(Instant::now());
            Ok(true)
        } else {
            if self.lease_renewed.take().is_some() {
                tracing::warn!(projection = self.name(), node = %self.options.node, "runner lost the projection");
            }
            Ok(false)
        }
    }

    /// Applies at most one batch, if this runner holds the projection.
    pub fn step(&mut self) -> Result<Step> {
        let mut conn = self.store.connection()?;
        if !self.hold_lease(&mut conn)? {
            return Ok(Step::Standby);
        }
        match self.batch(&mut conn, self.options.batch_size) {
            Ok(n) => {
                if self.failures > 0 {
                    tracing::info!(projection = self.name(), "projection recovered");
                }
                self.failures = 0;
                Ok(Step::Applied(n))
            }
            Err(Abort::Lost) => {
                self.lease_renewed = None;
                Ok(Step::Standby)
            }
            Err(Abort::Store(e)) => Err(e),
            Err(Abort::Failed {
                index,
                position,
                error,
            }) => {
                // Keep the good events before the failing one, then stop there.
                if index > 0 {
                    match self.batch(&mut conn, index) {
                        Ok(_) => {}
                        Err(Abort::Store(e)) => return Err(e),
                        Err(_) => return Ok(Step::Standby),
                    }
                }
                self.failures += 1;
                self.record_failure(&mut conn, position, &error)?;
                tracing::error!(projection = self.name(), position, error = %error, "projection stopped at an event");
                Ok(Step::Failed { position })
            }
        }
    }

    fn batch(&self, conn: &mut DbConnection, limit: usize) -> std::result::Result<usize, Abort> {
        let name = self.projection.name();
        let node = &self.options.node;
        write_transaction(conn, |c| {
            let stored = load_checkpoint(c, name)?;
            if stored.holder.as_deref() != Some(node) {
                return Err(Abort::Lost);
            }
            let types: Option<Vec<&str>> = self.types.clone();
            let events: Vec<Followed> = read_after(c, stored.checkpoint, types.as_deref(), limit)?;
            let Some(last) = events.last().map(|f| f.checkpoint) else {
                return Ok(0);
            };
            for (index, f) in events.iter().enumerate() {
                if let Err(error) = self.projection.apply(c, &f.event) {
                    return Err(Abort::Failed {
                        index,
                        position: f.event.global_position,
                        error: Box::new(error),
                    });
                }
            }
            let backend = c.backend();
            let moved = diesel::sql_query(sql(
                backend,
                "UPDATE es_checkpoints SET position = ?, transaction_id = ?, state = 'running', \
                 last_error = NULL, failed_position = NULL, updated_at = CURRENT_TIMESTAMP \
                 WHERE projection = ? AND holder = ? AND position = ? AND transaction_id = ?",
            ))
            .bind::<BigInt, _>(last.position)
            .bind::<BigInt, _>(last.transaction)
            .bind::<Text, _>(name)
            .bind::<Text, _>(node)
            .bind::<BigInt, _>(stored.checkpoint.position)
            .bind::<BigInt, _>(stored.checkpoint.transaction)
            .execute(c)?;
            if moved != 1 {
                return Err(Abort::Lost);
            }
            Ok(events.len())
        })
    }

    fn record_failure(&self, conn: &mut DbConnection, position: i64, error: &Error) -> Result<()> {
        let backend = conn.backend();
        let message = error_chain(error);
        write_transaction(conn, |c| -> Result<()> {
            diesel::sql_query(sql(
                backend,
                "UPDATE es_checkpoints SET state = 'failed', last_error = ?, failed_position = ?, \
                 updated_at = CURRENT_TIMESTAMP WHERE projection = ? AND holder = ?",
            ))
            .bind::<Text, _>(&message)
            .bind::<BigInt, _>(position)
            .bind::<Text, _>(self.projection.name())
            .bind::<Text, _>(&self.options.node)
            .execute(c)?;
            Ok(())
        })
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
                let mut broken = false;
                for n in listener.notifications_iter() {
                    match n {
                        Ok(_) => woken = true,
                        Err(_) => broken = true,
                    }
                }
                if broken {
                    self.listener = None;
                }
                if woken {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10).min(timeout));
        }
    }

    /// Runs until `stop` is set: the loop of a dedicated worker.
    pub fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            match self.step() {
                Ok(Step::Applied(n)) if n > 0 => continue,
                Ok(Step::Applied(_)) | Ok(Step::Standby) => {
                    let pause = self.options.idle_poll;
                    self.wait(stop, pause);
                }
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

    /// Gives the lease up so another runner can take over at once.
    fn release(&mut self) {
        if self.lease_renewed.take().is_none() {
            return;
        }
        let Ok(mut conn) = self.store.connection() else {
            return;
        };
        let backend = conn.backend();
        let _ = diesel::sql_query(sql(
            backend,
            "UPDATE es_checkpoints SET holder = NULL, lease_expires_ms = NULL, \
             state = CASE WHEN state = 'failed' THEN state ELSE 'stopped' END \
             WHERE projection = ? AND holder = ?",
        ))
        .bind::<Text, _>(self.projection.name())
        .bind::<Text, _>(&self.options.node)
        .execute(&mut *conn);
        tracing::info!(projection = self.name(), "runner stopped");
    }

    /// Runs in a background thread until the handle is stopped or dropped.
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

/// A runner in a background thread. Stopping is graceful: the current batch
/// finishes and the lease is released.
pub struct RunnerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    name: String,
}

impl RunnerHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the runner and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
    /// `idle`, `running`, `stopped`, `failed` or `rebuilding`; `current`
    /// for an inline read model.
    pub state: String,
    /// The runner holding the lease, if any.
    pub holder: Option<String>,
    pub last_error: Option<String>,
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
    pub fn start_async_read_models(&self, options: RunnerOptions) -> Result<Vec<RunnerHandle>> {
        Ok(self.start_runners(async_read_models()?, options))
    }

    /// Runs every `mode = async` read model until `stop` is set: the main
    /// loop of a dedicated projection worker process.
    pub fn run_async_read_models(&self, options: RunnerOptions, stop: &AtomicBool) -> Result<()> {
        let handles = self.start_async_read_models(options)?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for h in handles {
            h.stop();
        }
        Ok(())
    }

    /// A runner for `projection` with default options.
    pub fn runner(&self, projection: Arc<dyn AsyncProjection>) -> Runner {
        Runner::new(self.clone(), projection, RunnerOptions::default())
    }

    /// Starts one background runner per projection.
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
        let rows = diesel::sql_query(
            "SELECT projection, position, transaction_id, state, holder, last_error, failed_position \
             FROM es_checkpoints ORDER BY projection",
        )
        .load::<StatusRow>(&mut *conn)?;
        let reg = crate::projection::registry()?;
        let backend = conn.backend();
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
                Ok(ProjectionStatus {
                    name: r.projection,
                    mode: ProjectionMode::Async,
                    checkpoint: Checkpoint {
                        transaction: r.transaction_id,
                        position: r.position,
                    },
                    head,
                    lag,
                    state: r.state,
                    holder: r.holder,
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
