//! Aggregate snapshots: the folded state of a stream at some version, so a
//! load reads the snapshot and the events after it. One row per aggregate
//! type and stream, replaced by newer snapshots; a cache that can be deleted.

use crate::backend::DbConnection;
use crate::error::Result;
use chrono::Utc;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamp};

/// A stored snapshot of the current shape.
#[derive(QueryableByName, Debug)]
pub(crate) struct StoredSnapshot {
    #[diesel(sql_type = BigInt)]
    pub stream_version: i64,
    #[diesel(sql_type = Text)]
    pub state: String,
}

/// The snapshot of `stream` for `aggregate_type`, if one of `shape` exists.
pub(crate) fn load(
    conn: &mut DbConnection,
    aggregate_type: &str,
    stream: &str,
    shape: u32,
) -> Result<Option<StoredSnapshot>> {
    let found = match conn {
        DbConnection::Postgres(c) => diesel::sql_query(
            "SELECT stream_version, state::text AS state FROM es_snapshots \
             WHERE aggregate_type = $1 AND md5(stream_id) = md5($2) AND stream_id = $2 AND shape = $3",
        )
        .bind::<Text, _>(aggregate_type)
        .bind::<Text, _>(stream)
        .bind::<BigInt, _>(i64::from(shape))
        .get_result::<StoredSnapshot>(c)
        .optional()?,
        DbConnection::Sqlite(c) => diesel::sql_query(
            "SELECT stream_version, state FROM es_snapshots \
             WHERE aggregate_type = ? AND stream_id = ? AND shape = ?",
        )
        .bind::<Text, _>(aggregate_type)
        .bind::<Text, _>(stream)
        .bind::<BigInt, _>(i64::from(shape))
        .get_result::<StoredSnapshot>(c)
        .optional()?,
    };
    Ok(found)
}

/// Saves `state` (JSON) as the snapshot of `stream` at `stream_version`,
/// unless a snapshot of the same shape at that version or later is stored.
pub(crate) fn save(
    conn: &mut DbConnection,
    aggregate_type: &str,
    stream: &str,
    shape: u32,
    stream_version: i64,
    state: &str,
) -> Result<()> {
    match conn {
        // The stream_id condition keeps an md5 collision from overwriting
        // another stream's snapshot.
        DbConnection::Postgres(c) => diesel::sql_query(
            "INSERT INTO es_snapshots (aggregate_type, stream_id, shape, stream_version, state) \
             VALUES ($1, $2, $3, $4, $5::jsonb) \
             ON CONFLICT (aggregate_type, md5(stream_id)) DO UPDATE SET \
             shape = EXCLUDED.shape, stream_version = EXCLUDED.stream_version, \
             state = EXCLUDED.state, created_at = now() \
             WHERE es_snapshots.stream_id = EXCLUDED.stream_id \
             AND (es_snapshots.stream_version < EXCLUDED.stream_version OR es_snapshots.shape <> EXCLUDED.shape)",
        )
        .bind::<Text, _>(aggregate_type)
        .bind::<Text, _>(stream)
        .bind::<BigInt, _>(i64::from(shape))
        .bind::<BigInt, _>(stream_version)
        .bind::<Text, _>(state)
        .execute(c)?,
        DbConnection::Sqlite(c) => diesel::sql_query(
            "INSERT INTO es_snapshots (aggregate_type, stream_id, shape, stream_version, state, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (aggregate_type, stream_id) DO UPDATE SET \
             shape = excluded.shape, stream_version = excluded.stream_version, \
             state = excluded.state, created_at = excluded.created_at \
             WHERE es_snapshots.stream_version < excluded.stream_version OR es_snapshots.shape <> excluded.shape",
        )
        .bind::<Text, _>(aggregate_type)
        .bind::<Text, _>(stream)
        .bind::<BigInt, _>(i64::from(shape))
        .bind::<BigInt, _>(stream_version)
        .bind::<Text, _>(state)
        .bind::<Timestamp, _>(Utc::now().naive_utc())
        .execute(c)?,
    };
    Ok(())
}

/// Deletes every snapshot of `aggregate_type`; returns how many there were.
pub(crate) fn delete_all(conn: &mut DbConnection, aggregate_type: &str) -> Result<usize> {
    let n = match conn {
        DbConnection::Postgres(c) => {
            diesel::sql_query("DELETE FROM es_snapshots WHERE aggregate_type = $1")
                .bind::<Text, _>(aggregate_type)
                .execute(c)?
        }
        DbConnection::Sqlite(c) => {
            diesel::sql_query("DELETE FROM es_snapshots WHERE aggregate_type = ?")
                .bind::<Text, _>(aggregate_type)
                .execute(c)?
        }
    };
    Ok(n)
}
