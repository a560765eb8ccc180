//! Rebuilding a read model ("performing a full scan"): replay, in follow
//! order, the event types its projectors handle into a shadow table, then
//! swap it in.

mod claim;

use crate::backend::quote_ident;
use crate::backend::rows::{Name, Number};
use crate::backend::shadow::Shadow;
use crate::backend::Columns;
use crate::backend::{private_write_transaction, write_transaction, DbConnection};
use crate::backend::{Bind, Stmt};
use crate::error::{Error, Result};
use crate::follow::{count_visible_after, read_columns_after, read_visible_after, Checkpoint};
use crate::projection::{
    handled_types, registry, Handler, HandlerKind, Projector, Registry, RowBatch,
};
use crate::read_model::ReadModelEntry;
use crate::{read, EventStore};
use claim::{needs_build, Claim};
use diesel::connection::TransactionManager;
use diesel::prelude::*;
use es_core::RecordedEvent;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};
use tracing::field::Empty;

/// Settings of [`EventStore::rebuild_with`].
#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// Events read and folded per step; each step is one short transaction.
    pub batch_size: usize,
    /// Row-level results are kept in memory across steps and written once;
    /// when more rows than this are held, they are written out and dropped.
    /// With `batch_size`, this bounds a rebuild's memory.
    pub max_rows_in_memory: usize,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        RebuildOptions {
            batch_size: 5_000,
            max_rows_in_memory: 50_000,
        }
    }
}

/// Where a rebuild is, reported after every batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildProgress {
    pub read_model: &'static str,
    /// Events replayed so far.
    pub events: u64,
    /// Global position of the last replayed event.
    pub position: i64,
    /// The log's last position when the rebuild began (for a progress bar:
    /// `position / head`).
    pub head: i64,
}

/// What a finished rebuild did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildReport {
    pub read_model: &'static str,
    /// Events replayed.
    pub events: u64,
    /// Committed events the rebuild could not include yet: on PostgreSQL,
    /// events of an asynchronous read model committed behind a transaction
    /// that was still writing to the log (see [`crate::follow`]). The
    /// read model's runner applies them once that transaction ends; until
    /// then they show in its lag. Always 0 for inline read models and on
    /// SQLite.
    pub pending: u64,
    /// Rows in the table afterwards.
    pub rows: i64,
    pub elapsed: Duration,
}

impl EventStore {
    /// Rebuilds the read model from the log ("performing a full scan")
    /// while the application goes on: readers see the current table and
    /// appends keep running until the new version replaces it whole.
    ///
    /// The new version is built in a shadow table private to this rebuild,
    /// in batches of short transactions (on SQLite they do not even take the
    /// database's write lock). Then one short transaction locks the live
    /// table, applies the events committed since the last batch and swaps
    /// the shadow in:
    ///
    /// * inline read model: the new table holds every event committed before
    ///   that transaction; appends waiting for it apply their inline
    ///   projectors to the new table afterwards.
    /// * asynchronous read model (`mode = async`): its runner is paused for
    ///   that transaction and continues from the shadow's checkpoint. On
    ///   PostgreSQL a rebuild, like a runner, only takes events up to the
    ///   follower horizon: events committed behind a transaction still
    ///   writing to the log are left to the runner, counted in
    ///   [`RebuildReport::pending`] and logged as a warning, and show as lag
    ///   in [`projection_status`](Self::projection_status). The rebuild does
    ///   not wait for them.
    ///
    /// One rebuild of a read model runs at a time, across processes: a
    /// second one fails at once with [`Error::RebuildInProgress`], having
    /// changed nothing ([`migrate`](Self::migrate) waits instead).
    ///
    /// On PostgreSQL the shadow table lives in a schema created for the
    /// rebuild (`<schema>_es_shadow_<token>`, dropped by the swap), so the
    /// database user needs the CREATE privilege on the database.
    ///
    /// `name` is the table name given in `#[read_model(table = "..")]`.
    pub fn rebuild(&self, name: &str) -> Result<RebuildReport> {
        self.rebuild_with(name, &RebuildOptions::default(), |_| {})
    }

    /// [`rebuild`](Self::rebuild), calling `progress` after every batch.
    pub fn rebuild_with(
        &self,
        name: &str,
        options: &RebuildOptions,
        mut progress: impl FnMut(&RebuildProgress),
    ) -> Result<RebuildReport> {
        let reg = registry()?;
        let entry = reg
            .read_model(name)
            .ok_or_else(|| Error::UnknownReadModel {
                name: name.to_owned(),
                known: reg
                    .read_models
                    .iter()
                    .map(|m| m.schema.name.to_owned())
                    .collect(),
            })?;
        let mut conn = self.connection()?;
        let claim = Claim::acquire(&mut conn, entry.schema.name, false)?;
        rebuild_claimed(&mut conn, entry, claim, options, &mut progress)
    }
}

/// Builds the inline read models that `migrate` created or re-created
/// (`rebuilt_at` NULL), each once, whichever process gets to it first.
pub(crate) fn build_pending(conn: &mut DbConnection) -> Result<()> {
    let reg = registry()?;
    for entry in reg.read_models.iter().filter(|m| !m.schema.asynchronous) {
        let name = entry.schema.name;
        if !needs_build(conn, name)? {
            continue;
        }
        let claim = Claim::acquire(conn, name, true)?;
        if !needs_build(conn, name)? {
            claim.release(conn);
            continue;
        }
        let report = rebuild_claimed(conn, entry, claim, &RebuildOptions::default(), &mut |_| {})?;
        tracing::info!(
            read_model = name,
            events = report.events,
            rows = report.rows,
            "built read model from the log"
        );
    }
    Ok(())
}

/// Rebuilds `entry` under `claim`; on failure (or a panic, e.g. in
/// `progress`) drops the shadow and releases the claim.
fn rebuild_claimed(
    conn: &mut DbConnection,
    entry: &'static ReadModelEntry,
    claim: Claim,
    options: &RebuildOptions,
    progress: &mut dyn FnMut(&RebuildProgress),
) -> Result<RebuildReport> {
    let span = tracing::debug_span!(
        "es.rebuild",
        read_model = entry.schema.name,
        head = Empty,
        events = Empty,
        pending = Empty,
        rows = Empty,
        outcome = Empty,
        duration_us = Empty,
    );
    let _entered = span.enter();
    let result = rebuild_traced(conn, entry, claim, options, progress);
    if !span.is_disabled() {
        match &result {
            Ok(report) => {
                span.record("events", report.events);
                span.record("pending", report.pending);
                span.record("rows", report.rows);
                span.record(
                    "duration_us",
                    u64::try_from(report.elapsed.as_micros()).unwrap_or(u64::MAX),
                );
                span.record("outcome", "rebuilt");
            }
            Err(_) => {
                span.record("outcome", "error");
            }
        }
    }
    result
}

fn rebuild_traced(
    conn: &mut DbConnection,
    entry: &'static ReadModelEntry,
    mut claim: Claim,
    options: &RebuildOptions,
    progress: &mut dyn FnMut(&RebuildProgress),
) -> Result<RebuildReport> {
    let mut shadow = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let ddl = entry.schema.ddl(conn.backend());
        let s = shadow.insert(Shadow::prepare(
            conn,
            entry.schema.name,
            ddl,
            claim.token(),
        )?);
        build_and_swap(conn, entry, s, &mut claim, options, progress)
    }));
    let failure = match outcome {
        Ok(Ok(report)) => return Ok(report),
        Ok(Err(error)) => Ok(error),
        Err(panic) => Err(panic),
    };
    roll_back_open(conn);
    if let Some(s) = &shadow {
        s.discard(conn);
    }
    claim.release(conn);
    match failure {
        Ok(error) => Err(error),
        Err(panic) => resume_unwind(panic),
    }
}

/// After a panic inside a transaction the connection is still in it.
fn roll_back_open(conn: &mut DbConnection) {
    type Tm = <DbConnection as Connection>::TransactionManager;
    while matches!(
        Tm::transaction_manager_status_mut(conn).transaction_depth(),
        Ok(Some(_))
    ) {
        if Tm::rollback_transaction(conn).is_err() {
            break;
        }
    }
}

fn build_and_swap(
    conn: &mut DbConnection,
    entry: &'static ReadModelEntry,
    shadow: &Shadow,
    claim: &mut Claim,
    options: &RebuildOptions,
    progress: &mut dyn FnMut(&RebuildProgress),
) -> Result<RebuildReport> {
    let started = Instant::now();
    let name = entry.schema.name;
    let asynchronous = entry.schema.asynchronous;
    let types = handled_types(registry()?, name);
    let handlers = ModelHandlers::of(registry()?, name);
    let columns = handlers.columns();
    let batch_size = options.batch_size.max(1);
    let head = read::head(conn)?;
    tracing::Span::current().record("head", head);
    conn.dialect().prepare_full_scan(conn);
    let mut rows = (entry.new_rows)();
    // The shadow starts empty, and nothing but this rebuild writes to it.
    let mut only_in_memory = true;
    let mut checkpoint = Checkpoint::default();
    let mut events = 0u64;

    loop {
        claim.renew(conn)?;
        let n = private_write_transaction(conn, |c| -> Result<usize> {
            if !shadow.enter(c)? {
                return Err(claim.lost(c));
            }
            let batch = read_columns_after(c, checkpoint, Some(&types), batch_size, columns)?;
            let Some(last) = batch.last().map(|f| f.checkpoint) else {
                return Ok(0);
            };
            let flush = rows.len() >= options.max_rows_in_memory;
            project_batch(
                c,
                &handlers,
                rows.as_mut(),
                batch.iter().map(|f| &f.event),
                flush,
                &mut only_in_memory,
            )?;
            checkpoint = last;
            Ok(batch.len())
        })
        .map_err(|e| with_stream(conn, e, columns))?;
        if n == 0 {
            break;
        }
        events += n as u64;
        tracing::debug!(
            read_model = name,
            events,
            position = checkpoint.position,
            head,
            "rebuild progress"
        );
        progress(&RebuildProgress {
            read_model: name,
            events,
            position: checkpoint.position,
            head,
        });
        if n < batch_size {
            break;
        }
    }

    let rebuilder = claim.holder.clone();
    let built = events;
    let (rows_after, pending) = write_transaction(conn, |c| -> Result<(i64, u64)> {
        shadow.lock_live(c)?;
        claim.extend(c)?;
        // A newer version's migrate may have replaced the table with another
        // shape meanwhile: swapping this shadow in would undo it.
        let stored = Stmt::new("SELECT fingerprint AS name FROM es_read_models WHERE name = ?")
            .bind(Bind::Text(name))
            .get_result::<Name>(c)
            .optional()?;
        if stored.is_some_and(|s| s.name != entry.schema.fingerprint(c.backend())) {
            return Err(Error::ReadModelChanged {
                read_model: name.to_owned(),
            });
        }
        if asynchronous {
            // The runner's next batch fails its checkpoint guard and rolls
            // back; afterwards it continues from the shadow's checkpoint.
            crate::runner::hold_for_rebuild(c, name, &rebuilder)?;
        }
        if !shadow.enter(c)? {
            return Err(claim.lost(c));
        }
        loop {
            // An inline read model must include every committed event: the
            // writers that could still precede them in follow order hold the
            // live table, so the lock waited for them to commit. A runner
            // needs a checkpoint with nothing missing before it: only events
            // up to the horizon.
            let batch = if asynchronous {
                read_columns_after(c, checkpoint, Some(&types), batch_size, columns)?
            } else {
                read_visible_after(c, checkpoint, &types, batch_size, columns)?
            };
            let Some(last) = batch.last().map(|f| f.checkpoint) else {
                break;
            };
            let flush = rows.len() >= options.max_rows_in_memory;
            project_batch(
                c,
                &handlers,
                rows.as_mut(),
                batch.iter().map(|f| &f.event),
                flush,
                &mut only_in_memory,
            )?;
            events += batch.len() as u64;
            checkpoint = last;
        }
        if !rows.is_empty() {
            rows.flush(c)?;
        }
        let pending = if asynchronous {
            count_visible_after(c, checkpoint, &types)?
        } else {
            0
        };
        shadow.swap(c)?;
        if asynchronous {
            crate::runner::rebuilt(c, name, checkpoint)?;
        }
        claim.finish(c)?;
        let rows_after = Stmt::new(format!("SELECT COUNT(*) AS n FROM {}", quote_ident(name)))
            .uncached()
            .get_result::<Number>(c)?
            .n;
        Ok((rows_after, pending))
    })
    .map_err(|e| with_stream(conn, e, columns))?;
    if events > built {
        progress(&RebuildProgress {
            read_model: name,
            events,
            position: checkpoint.position,
            head,
        });
    }
    let report = RebuildReport {
        read_model: name,
        events,
        pending,
        rows: rows_after,
        elapsed: started.elapsed(),
    };
    if pending > 0 {
        tracing::warn!(
            read_model = name,
            pending,
            checkpoint = %checkpoint,
            "rebuilt read model without {pending} committed events that wait behind a transaction still writing to the log; its runner applies them when that transaction ends"
        );
    }
    tracing::info!(read_model = name, events, pending, rows = rows_after, elapsed = ?report.elapsed, "rebuilt read model");
    Ok(report)
}

/// The handlers of one read model's projectors, by event type: looked up
/// once per rebuild instead of hashing each event's type into the registry
/// and skipping the other read models' projectors.
pub(crate) struct ModelHandlers {
    by_type: Vec<(&'static str, Vec<(&'static Projector, &'static Handler)>)>,
}

impl ModelHandlers {
    pub(crate) fn of(reg: &Registry, name: &str) -> ModelHandlers {
        let by_type = handled_types(reg, name)
            .into_iter()
            .map(|t| {
                let of_model = reg
                    .handlers(t)
                    .iter()
                    .filter(|(p, _)| p.read_model == name)
                    .copied()
                    .collect();
                (t, of_model)
            })
            .collect();
        ModelHandlers { by_type }
    }

    /// What a rebuild reads of each event: the payload alone when none of
    /// the projectors takes the envelope (`&Recorded<E>`).
    pub(crate) fn columns(&self) -> Columns {
        let envelope = self
            .by_type
            .iter()
            .flat_map(|(_, h)| h)
            .any(|(p, _)| p.reads_envelope);
        if envelope {
            Columns::Envelope
        } else {
            Columns::Payload
        }
    }

    fn get(&self, event_type: &str) -> &[(&'static Projector, &'static Handler)] {
        self.by_type
            .iter()
            .find(|(t, _)| *t == event_type)
            .map_or(&[], |(_, h)| h.as_slice())
    }
}

/// A projector's failure on an event read with [`Columns::Payload`] names
/// the event's stream, read now by its position.
fn with_stream(conn: &mut DbConnection, mut error: Error, columns: Columns) -> Error {
    if columns == Columns::Envelope {
        return error;
    }
    if let Error::Projector {
        position, stream, ..
    }
    | Error::Decode {
        position, stream, ..
    } = &mut error
    {
        if let Ok(found) =
            Stmt::new("SELECT stream_id AS name FROM es_events WHERE global_position = ?")
                .bind(Bind::BigInt(*position))
                .get_result::<Name>(conn)
        {
            *stream = found.name;
        }
    }
    error
}

/// Applies the projectors of one read model (`handlers`) to `batch`:
/// row-level ones folded in memory and written in bulk, SQL-level ones in
/// order between.
///
/// Row-level results stay in memory after the batch unless `flush` says
/// otherwise (or a SQL-level projector is about to read the table), so a
/// rebuild writes each row once rather than once per batch.
///
/// `only_in_memory`: the table holds no row that is not in `rows` (it was
/// emptied and nothing has been written back since), so rows are not looked
/// up; it turns false at the first write-back.
pub(crate) fn project_batch<'e>(
    conn: &mut DbConnection,
    handlers: &ModelHandlers,
    rows: &mut dyn RowBatch,
    batch: impl Iterator<Item = &'e RecordedEvent>,
    flush: bool,
    only_in_memory: &mut bool,
) -> Result<()> {
    let mut segment: Vec<(&RecordedEvent, &'static Projector, &'static Handler)> = Vec::new();
    for ev in batch {
        for &(p, h) in handlers.get(&ev.event_type) {
            match &h.kind {
                HandlerKind::Row { .. } => segment.push((ev, p, h)),
                HandlerKind::Sql { apply } => {
                    // A SQL projector may read rows the batch still holds in memory.
                    fold_segment(conn, rows, &mut segment, true, only_in_memory)?;
                    apply(ev, conn).map_err(|f| f.into_error(p.name, ev))?;
                    // It may have written rows the batch does not hold: from
                    // now on, rows are looked up before they are folded.
                    *only_in_memory = false;
                }
            }
        }
    }
    fold_segment(conn, rows, &mut segment, flush, only_in_memory)
}

/// Folds the row-level events of `segment` into rows loaded in one query
/// (those not in memory yet), then, if `flush`, writes them back with bulk
/// statements.
fn fold_segment(
    conn: &mut DbConnection,
    rows: &mut dyn RowBatch,
    segment: &mut Vec<(&RecordedEvent, &'static Projector, &'static Handler)>,
    flush: bool,
    only_in_memory: &mut bool,
) -> Result<()> {
    if segment.is_empty() {
        // Rows folded in earlier batches may still be held: a SQL-level
        // projector about to run must find them in the table.
        if flush && !rows.is_empty() {
            rows.flush(conn)?;
            *only_in_memory = false;
        }
        return Ok(());
    }
    if !*only_in_memory {
        for (ev, p, h) in segment.iter() {
            if let HandlerKind::Row { want, .. } = &h.kind {
                want(ev, rows).map_err(|f| f.into_error(p.name, ev))?;
            }
        }
        rows.load(conn)?;
    }
    for (ev, p, h) in segment.iter() {
        if let HandlerKind::Row { fold, .. } = &h.kind {
            fold(ev, rows).map_err(|f| f.into_error(p.name, ev))?;
        }
    }
    if flush {
        rows.flush(conn)?;
        *only_in_memory = false;
    }
    segment.clear();
    Ok(())
}
