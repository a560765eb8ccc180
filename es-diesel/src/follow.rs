//! Following the log without ever skipping an event.
//!
//! On SQLite one writer commits at a time, so positions become visible in
//! order and a checkpoint is just a position.
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

use crate::connection::DbConnection;
use crate::error::{Error, Result};
use crate::read::{recorded, EventSql, EventTuple, PG_COLUMNS, SQLITE_COLUMNS};
use crate::stmt::{Bind, Stmt};
use diesel::connection::TransactionManager;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel::sqlite::Sqlite;
use es_core::RecordedEvent;

/// How far a follower has read. Totally ordered; compare with `<`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Checkpoint {
    /// The order key of the last event read (PostgreSQL; 0 on SQLite). See
    /// the [module documentation](self).
    pub transaction: i64,
    /// The global position of the last event read.
    pub position: i64,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.transaction == 0 {
            write!(f, "position {}", self.position)
        } else {
            write!(f, "position {} (key {})", self.position, self.transaction)
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
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    type Row = (EventTuple, i64);
    let rows: Vec<Row> = match conn {
        DbConnection::Postgres(c) => {
            let Some(horizon) = horizon(c)? else {
                return Ok(Vec::new());
            };
            load_pg(c, after, types, Some(horizon), limit)?
        }
        DbConnection::Sqlite(c) => {
            let filter = match types {
                Some(types) => format!(
                    "AND event_type IN ({})",
                    vec!["?"; types.len().max(1)].join(", ")
                ),
                None => String::new(),
            };
            let sql = format!(
                "SELECT {SQLITE_COLUMNS}, 0 AS tx FROM es_events WHERE global_position > ? {filter} \
                 ORDER BY global_position LIMIT ?"
            );
            let mut q =
                Stmt::<Sqlite, (EventSql, BigInt)>::new(&sql).bind(Bind::BigInt(after.position));
            match types {
                // `IN ()` is not SQL: an empty list matches nothing.
                Some([]) => q.push(Bind::Text("")),
                Some(types) => types.iter().for_each(|t| q.push(Bind::Text(t))),
                None => {}
            }
            q.bind(Bind::BigInt(limit)).load(c)?
        }
    };
    into_followed(rows)
}

/// PostgreSQL: events after `after` in follow order, below `horizon` if given.
fn load_pg(
    c: &mut diesel::PgConnection,
    after: Checkpoint,
    types: Option<&[&str]>,
    horizon: Option<i64>,
    limit: i64,
) -> Result<Vec<(EventTuple, i64)>> {
    let below = if horizon.is_some() {
        "AND order_key < ?"
    } else {
        ""
    };
    let filter = if types.is_some() {
        "AND event_type = ANY(?)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {PG_COLUMNS}, order_key FROM es_events \
         WHERE (order_key, global_position) > (?, ?) {below} {filter} \
         ORDER BY order_key, global_position LIMIT ?"
    );
    let mut q = Stmt::<Pg, (EventSql, BigInt)>::with_capacity(&sql, 5)
        .bind(Bind::BigInt(after.transaction))
        .bind(Bind::BigInt(after.position));
    if let Some(h) = horizon {
        q.push(Bind::BigInt(h));
    }
    if let Some(types) = types {
        q.push(Bind::TextArray(types));
    }
    Ok(q.bind(Bind::BigInt(limit)).load(c)?)
}

fn into_followed(rows: Vec<(EventTuple, i64)>) -> Result<Vec<Followed>> {
    rows.into_iter()
        .map(|(row, key)| {
            let checkpoint = Checkpoint {
                transaction: key,
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
/// On SQLite the same as [`read_after`].
pub(crate) fn read_visible_after(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: &[&str],
    limit: usize,
) -> Result<Vec<Followed>> {
    match conn {
        DbConnection::Postgres(c) => {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            into_followed(load_pg(c, after, Some(types), None, limit)?)
        }
        DbConnection::Sqlite(_) => read_after(conn, after, Some(types), limit),
    }
}

/// How many events of `types` after `after` are visible now but beyond the
/// horizon (PostgreSQL; always 0 on SQLite, whose horizon is the head).
pub(crate) fn count_visible_after(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: &[&str],
) -> Result<u64> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let DbConnection::Postgres(c) = conn else {
        return Ok(0);
    };
    let n = Stmt::<Pg>::new(
        "SELECT COUNT(*) AS n FROM es_events \
         WHERE (order_key, global_position) > (?, ?) AND event_type = ANY(?)",
    )
    .bind(Bind::BigInt(after.transaction))
    .bind(Bind::BigInt(after.position))
    .bind(Bind::TextArray(types))
    .get_result::<Count>(c)?
    .n;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The order key below which no append in flight can still write (see the
/// module documentation), or `None` when an append kept announcing itself
/// without a published key for a while (then nothing is safe to read yet).
pub(crate) fn horizon(conn: &mut diesel::PgConnection) -> Result<Option<i64>> {
    #[derive(QueryableByName)]
    struct Horizon {
        #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
        h: Option<i64>,
        #[diesel(sql_type = diesel::sql_types::Text)]
        isolation: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        later_statement: bool,
    }
    type Tm = <diesel::PgConnection as Connection>::TransactionManager;
    let in_transaction = Tm::transaction_manager_status_mut(conn)
        .transaction_depth()?
        .is_some();
    // An append is between its announcement and its published key for
    // microseconds; a few short looks almost always find it done.
    for attempt in 0..50u32 {
        let row = Stmt::<Pg>::new(
            "SELECT es_follow_horizon() AS h, current_setting('transaction_isolation') AS isolation, \
             now() <> statement_timestamp() AS later_statement",
        )
        .get_result::<Horizon>(conn)?;
        // Under REPEATABLE READ or SERIALIZABLE the read that follows would
        // see the snapshot of the transaction's first statement, older than
        // this look at the appends in flight.
        if (in_transaction || row.later_statement) && row.isolation != "read committed" {
            return Err(Error::Follow {
                reason: format!(
                    "the log is followed inside a {} transaction; followers must read in READ COMMITTED \
                     (open the transaction with `write_transaction`, or outside any transaction)",
                    row.isolation.to_uppercase()
                ),
            });
        }
        if row.h.is_some() {
            return Ok(row.h);
        }
        std::thread::sleep(std::time::Duration::from_micros(
            200 * u64::from(attempt.min(10) + 1),
        ));
    }
    tracing::debug!("appends in flight have not published their order keys yet");
    Ok(None)
}
