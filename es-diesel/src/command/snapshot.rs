//! Aggregate snapshots: the folded state of a stream at some version, so a
//! load reads the snapshot and the events after it. One row per aggregate
//! type and stream, replaced by newer snapshots; a cache that can be deleted.

use crate::backend::{per_backend, Bind, DbConnection, Stmt};
use crate::error::Result;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

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
    let d = conn.dialect();
    let sql = per_backend!(d => format!(
        "SELECT stream_version, {} AS state FROM es_snapshots \
         WHERE aggregate_type = ? AND {} AND shape = ?",
        d.as_text("state"),
        d.stream_is()
    ));
    let mut q = Stmt::new(sql).bind(Bind::Text(aggregate_type));
    d.push_stream(&mut q, stream);
    Ok(q.bind(Bind::BigInt(i64::from(shape)))
        .get_result::<StoredSnapshot>(conn)
        .optional()?)
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
    conn.dialect()
        .save_snapshot(
            aggregate_type,
            stream,
            i64::from(shape),
            stream_version,
            state,
        )
        .execute(conn)?;
    Ok(())
}

/// Deletes every snapshot of `aggregate_type`; returns how many there were.
pub(crate) fn delete_all(conn: &mut DbConnection, aggregate_type: &str) -> Result<usize> {
    Ok(
        Stmt::new("DELETE FROM es_snapshots WHERE aggregate_type = ?")
            .bind(Bind::Text(aggregate_type))
            .execute(conn)?,
    )
}
