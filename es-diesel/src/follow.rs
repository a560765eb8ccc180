//! Following the log without ever skipping an event.
//!
//! On SQLite one writer commits at a time, so positions become visible in
//! order and a checkpoint is just a position.
//!
//! On PostgreSQL identity values are handed out at INSERT and become visible
//! at COMMIT, so position 11 can be visible while position 10 is still in
//! flight; a reader that moved its checkpoint to 11 would never see 10.
//! Every event therefore records its writer's transaction id
//! (`pg_current_xact_id()`), and followers read in (transaction id, position)
//! order, only events of transactions older than the oldest one still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`). Such transactions are over:
//! no event can appear behind the checkpoint any more, and a rolled-back
//! transaction leaves no gap to wait for. The cost: one long-running writing
//! transaction holds back every follower until it ends, and transaction ids
//! are server-wide, so that includes writers in other databases of the same
//! PostgreSQL server. Keep writing transactions short.

use crate::connection::DbConnection;
use crate::error::Result;
use crate::read::{recorded, EventSql, EventTuple, PG_COLUMNS, SQLITE_COLUMNS};
use crate::stmt::{Bind, Stmt};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel::sqlite::Sqlite;
use es_core::RecordedEvent;

/// How far a follower has read. Totally ordered; compare with `<`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Checkpoint {
    /// The writer's transaction id of the last event read (PostgreSQL; 0 on SQLite).
    pub transaction: i64,
    /// The global position of the last event read.
    pub position: i64,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.transaction == 0 {
            write!(f, "position {}", self.position)
        } else {
            write!(
                f,
                "position {} (transaction {})",
                self.position, self.transaction
            )
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
            let filter = if types.is_some() {
                "AND event_type = ANY(?)"
            } else {
                ""
            };
            let sql = format!(
                "SELECT {PG_COLUMNS}, transaction_id::text::bigint AS tx FROM es_events \
                 WHERE (transaction_id, global_position) > (?::bigint::text::xid8, ?) \
                 AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) {filter} \
                 ORDER BY transaction_id, global_position LIMIT ?"
            );
            let mut q = Stmt::<Pg, (EventSql, BigInt)>::with_capacity(&sql, 4)
                .bind(Bind::BigInt(after.transaction))
                .bind(Bind::BigInt(after.position));
            if let Some(types) = types {
                q.push(Bind::TextArray(types));
            }
            q.bind(Bind::BigInt(limit)).load(c)?
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
    rows.into_iter()
        .map(|(row, tx)| {
            let checkpoint = Checkpoint {
                transaction: tx,
                position: row.0,
            };
            Ok(Followed {
                event: recorded(row)?,
                checkpoint,
            })
        })
        .collect()
}
