//! Rebuilding a read model ("performing a full scan"): empty its table and
//! replay, in global order, the event types its projectors handle.

use crate::connection::{write_transaction, Backend, DbConnection};
use crate::error::{Error, Result};
use crate::migrations::{quote_ident, quote_literal};
use crate::projection::{handled_types, registry, Handler, HandlerKind, Projector, RowBatch};
use crate::read_model::ReadModelEntry;
use crate::{read, EventStore};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use es_core::RecordedEvent;
use std::time::{Duration, Instant};

/// Settings of [`EventStore::rebuild_with`].
#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// Events read and folded per step.
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
    /// Rows in the table afterwards.
    pub rows: i64,
    pub elapsed: Duration,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

impl EventStore {
    /// Empties the read model's table and replays every event its
    /// projectors handle, in one transaction: readers see the old rows until
    /// it commits, and appends that feed this read model wait for it.
    ///
    /// An asynchronous read model (`mode = async`) is rebuilt blue/green
    /// instead: into a shadow table, batch by batch, while the live table
    /// keeps serving and appends go on; then the shadow replaces it in one
    /// transaction and its runner continues from the shadow's checkpoint.
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
        if entry.schema.asynchronous {
            return crate::shadow::rebuild_blue_green(&mut conn, entry, options, &mut progress);
        }
        write_transaction(&mut conn, |c| rebuild_in(c, entry, options, &mut progress))
    }
}

/// Rebuilds `entry` on `conn`, which must be inside a write transaction.
pub(crate) fn rebuild_in(
    conn: &mut DbConnection,
    entry: &'static ReadModelEntry,
    options: &RebuildOptions,
    progress: &mut dyn FnMut(&RebuildProgress),
) -> Result<RebuildReport> {
    let started = Instant::now();
    let reg = registry()?;
    let name = entry.schema.name;
    let table = quote_ident(name);
    if conn.backend() == Backend::Postgres {
        // Blocks inline projectors of this table (their writes and their
        // SELECT .. FOR UPDATE) until the rebuild commits; readers go on.
        conn.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))?;
    }
    conn.batch_execute(&format!("DELETE FROM {table}"))?;

    let types = handled_types(reg, name);
    let head = read::head(conn)?;
    let batch_size = options.batch_size.max(1);
    let mut rows = (entry.new_rows)();
    // The table was just emptied.
    let mut only_in_memory = true;
    let mut state = Progress {
        events: 0,
        position: 0,
    };
    loop {
        let batch = read::read_types(conn, &types, state.position, batch_size)?;
        let Some(last) = batch.last() else { break };
        let last_position = last.global_position;
        let full = rows.len() >= options.max_rows_in_memory;
        project_batch(conn, name, rows.as_mut(), &batch, full, &mut only_in_memory)?;
        state.events += batch.len() as u64;
        state.position = last_position;
        progress(&RebuildProgress {
            read_model: name,
            events: state.events,
            position: state.position,
            head,
        });
        if batch.len() < batch_size {
            break;
        }
    }
    if !rows.is_empty() {
        rows.flush(conn)?;
    }
    conn.batch_execute(&format!(
        "UPDATE es_read_models SET rebuilt_at = CURRENT_TIMESTAMP WHERE name = {}",
        quote_literal(name)
    ))?;
    let count = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table}"))
        .get_result::<Count>(conn)?;
    let report = RebuildReport {
        read_model: name,
        events: state.events,
        rows: count.n,
        elapsed: started.elapsed(),
    };
    tracing::info!(read_model = name, events = report.events, rows = report.rows, elapsed = ?report.elapsed, "rebuilt read model");
    Ok(report)
}

/// Applies the projectors of read model `name` to `batch`: row-level ones
/// folded in memory and written in bulk, SQL-level ones in order between.
///
/// Row-level results stay in memory after the batch unless `flush` says
/// otherwise (or a SQL-level projector is about to read the table), so a
/// rebuild writes each row once rather than once per batch.
///
/// `only_in_memory`: the table holds no row that is not in `rows` (it was
/// emptied and nothing has been written back since), so rows are not looked
/// up; it turns false at the first write-back.
pub(crate) fn project_batch(
    conn: &mut DbConnection,
    name: &str,
    rows: &mut dyn RowBatch,
    batch: &[RecordedEvent],
    flush: bool,
    only_in_memory: &mut bool,
) -> Result<()> {
    let reg = registry()?;
    let mut segment: Vec<(&RecordedEvent, &'static Projector, &'static Handler)> = Vec::new();
    for ev in batch {
        for (p, h) in reg.handlers(&ev.event_type) {
            if p.read_model != name {
                continue;
            }
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
    fold_segment(conn, rows, &mut segment, flush, only_in_memory)?;
    if flush && !rows.is_empty() {
        rows.flush(conn)?;
        *only_in_memory = false;
    }
    Ok(())
}

struct Progress {
    events: u64,
    position: i64,
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
