//! Following the log without ever skipping an event.
//!
//! On SQLite one writer commits at a time, so positions become visible in
//! order and a checkpoint is just a position. On MySQL appends queue on the
//! log's head row, which each holds until it commits, with the same result
//! (see `backend/mysql.rs`).
//!
//! On PostgreSQL identity values are handed out at INSERT and become visible
//! at COMMIT, so position 11 can be visible while position 10 is still in
//! flight; a reader that moved its checkpoint to 11 would never see 10.
//! Followers therefore read in the order of an *order key* that every event
//! gets from the store, and only below a *horizon* that no append still in
//! flight can reach:
//!
//! * An appending transaction first announces itself (a shared advisory lock
//!   of the schema's log), then draws a key from a sequence, then publishes
//!   its first key (a shared advisory lock on the key). Each append
//!   statement draws a new key; an event's key is the larger of that key and
//!   the key of its stream's previous event, so each stream's versions are in
//!   key order whatever the interleaving of writers.
//! * A follower reads the sequence's next value `b` (every key drawn from now
//!   on is at least `b`), then, in one consistent look at the lock table, the
//!   keys of the appends in flight. If one has announced itself but not yet
//!   published its key, it looks again. The horizon is the smallest of `b`
//!   and the published keys. Then, in a new statement (a later snapshot), it
//!   reads the visible events with a key below the horizon, in (key,
//!   position) order.
//!
//! Every event not visible to that statement belongs to an append that was
//! in flight at the look (its key is at least its published one) or that
//! announced itself after it (its key is at least `b`): it can never sort
//! before an event the follower has passed. Only transactions that append to
//! this log hold the horizon back, never unrelated work on a shared server;
//! a rolled-back append leaves no gap to wait for. Reads must run in READ
//! COMMITTED (PostgreSQL's default), so that each statement sees what
//! committed before it.

use crate::backend::rows::EventTuple;
use crate::backend::{Columns, DbConnection};
use crate::error::Result;
use crate::read::recorded;
use es_core::RecordedEvent;

/// How far a follower has read. Totally ordered; compare with `<`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Checkpoint {
    /// The order key of the last event read (PostgreSQL; 0 on SQLite). See
    /// the [module documentation](self).
    pub order_key: i64,
    /// The global position of the last event read.
    pub position: i64,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.order_key == 0 {
            write!(f, "position {}", self.position)
        } else {
            write!(f, "position {} (key {})", self.position, self.order_key)
        }
    }
}

/// An event read by a follower, with the checkpoint that lies just past it.
#[derive(Clone, Debug)]
pub struct Followed {
    pub event: RecordedEvent,
    pub checkpoint: Checkpoint,
}

/// Up to `limit` events after `after` that can never be preceded by an event
/// committed later, optionally only of the given types, in follow order.
pub fn read_after(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: Option<&[&str]>,
    limit: usize,
) -> Result<Vec<Followed>> {
    read_columns_after(conn, after, types, limit, Columns::Envelope)
}

/// [`read_after`], reading only `columns` of each event.
pub(crate) fn read_columns_after(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: Option<&[&str]>,
    limit: usize,
    columns: Columns,
) -> Result<Vec<Followed>> {
    let rows = conn.dialect().read_after(
        conn,
        after.order_key,
        after.position,
        types,
        clamp(limit),
        columns,
    )?;
    into_followed(rows)
}

fn clamp(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn into_followed(rows: Vec<(EventTuple, i64)>) -> Result<Vec<Followed>> {
    rows.into_iter()
        .map(|(row, key)| {
            let checkpoint = Checkpoint {
                order_key: key,
                position: row.0,
            };
            Ok(Followed {
                event: recorded(row)?,
                checkpoint,
            })
        })
        .collect()
}

/// Up to `limit` events of `types` after `after` in follow order that are
/// visible now, with no regard for the horizon: complete only when every
/// append that could still sort before them is excluded otherwise (a
/// rebuild that holds the table such appends' projectors must write to).
/// Where positions become visible in order (SQLite), the same as
/// [`read_after`].
pub(crate) fn read_visible_after(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: &[&str],
    limit: usize,
    columns: Columns,
) -> Result<Vec<Followed>> {
    let rows = conn.dialect().read_visible_after(
        conn,
        after.order_key,
        after.position,
        types,
        clamp(limit),
        columns,
    )?;
    into_followed(rows)
}

/// How many events of `types` after `after` are visible now but beyond the
/// horizon (always 0 on SQLite, whose horizon is the head).
pub(crate) fn count_visible_after(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: &[&str],
) -> Result<u64> {
    conn.dialect()
        .count_visible_after(conn, after.order_key, after.position, types)
}
