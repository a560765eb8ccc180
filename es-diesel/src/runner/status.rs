//! What `status` shows of each projection: its checkpoint, lag, lease and
//! last error.

use super::checkpoints;
use crate::backend::rows::Number;
use crate::backend::{Bind, DbConnection, ListOf, Stmt};
use crate::error::Result;
use crate::follow::Checkpoint;
use crate::EventStore;
use chrono::{DateTime, Utc};

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

/// Events after `position`, only of `types` unless it is empty.
fn count_after(conn: &mut DbConnection, position: i64, types: &[&str]) -> Result<i64> {
    let (filter, binds) = if types.is_empty() {
        (String::new(), Vec::new())
    } else {
        let (any, binds) = conn.dialect().any_of(types, ListOf::Text);
        (format!(" AND event_type {any}"), binds)
    };
    let mut q = Stmt::new(format!(
        "SELECT COUNT(*) AS n FROM es_events WHERE global_position > ?{filter}"
    ))
    .bind(Bind::BigInt(position))
    .uncached();
    binds.into_iter().for_each(|b| q.push(b));
    Ok(q.get_result::<Number>(conn)?.n)
}

impl EventStore {
    /// Status of every registered read model and of every projection with a
    /// checkpoint, sorted by name.
    pub fn projection_status(&self) -> Result<Vec<ProjectionStatus>> {
        let mut conn = self.connection()?;
        let head = crate::read::head(&mut conn)?;
        let rows = checkpoints::all(&mut conn)?;
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
                    order_key: 0,
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
                    Some(types) => count_after(&mut conn, r.position, types)?,
                    None => count_after(&mut conn, r.position, &[])?,
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
                        order_key: r.transaction_id,
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
                s.lag = count_after(&mut conn, 0, &types)?;
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
}

impl EventStore {
    /// Each projection's lag, `(name, events it has still to apply)`, sorted
    /// by name: the `lag` of [`projection_status`](Self::projection_status),
    /// for a metrics exporter to publish as a gauge per projection. Runners
    /// also emit it after every batch that applied events, as a `debug`
    /// event with the fields `projection`, `events`, `position` and `lag`
    /// (there `lag` counts positions up to the head of the log, whatever
    /// their type).
    pub fn projection_lag(&self) -> Result<Vec<(String, i64)>> {
        Ok(self
            .projection_status()?
            .into_iter()
            .map(|s| (s.name, s.lag))
            .collect())
    }
}
