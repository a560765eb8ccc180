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
use crate::read::{EventRow, PG_COLUMNS, SQLITE_COLUMNS};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
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

#[derive(QueryableByName)]
struct FollowRow {
    #[diesel(embed)]
    event: EventRow,
    #[diesel(sql_type = BigInt)]
    tx: i64,
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
    let rows: Vec<FollowRow> = match conn {
        DbConnection::Postgres(c) => {
            let filter = if types.is_some() {
                "AND event_type = ANY($4)"
            } else {
                ""
            };
            let sql = format!(
                "SELECT {PG_COLUMNS}, transaction_id::text::bigint AS tx FROM es_events \
                 WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
                 AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) {filter} \
                 ORDER BY transaction_id, global_position LIMIT $3"
            );
            let q = diesel::sql_query(sql)
                .into_boxed()
                .bind::<BigInt, _>(after.transaction)
                .bind::<BigInt, _>(after.position)
                .bind::<BigInt, _>(limit);
            match types {
                Some(types) => q.bind::<Array<Text>, _>(types).load(c)?,
                None => q.load(c)?,
            }
        }
        DbConnection::Sqlite(c) => {
            let (filter, marks) = match types {
                Some(types) => (
                    format!(
                        "AND event_type IN ({})",
                        vec!["?"; types.len().max(1)].join(", ")
                    ),
                    types,
                ),
                None => (String::new(), &[][..]),
            };
            let sql = format!(
                "SELECT {SQLITE_COLUMNS}, 0 AS tx FROM es_events WHERE global_position > ? {filter} \
                 ORDER BY global_position LIMIT ?"
            );
            let mut q = diesel::sql_query(sql)
                .into_boxed()
                .bind::<BigInt, _>(after.position);
            if types.is_some_and(|t| t.is_empty()) {
                q = q.bind::<Text, _>("");
            }
            for t in marks {
                q = q.bind::<Text, _>(*t);
            }
            q.bind::<BigInt, _>(limit).load(c)?
        }
    };
    rows.into_iter()
        .map(|r| {
            let checkpoint = Checkpoint {
                transaction: r.tx,
                position: r.event.global_position(),
            };
            Ok(Followed {
                event: r.event.into_recorded()?,
                checkpoint,
            })
        })
        .collect()
}
