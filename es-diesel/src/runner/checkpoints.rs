//! `es_checkpoints`: one row per asynchronous projection, with its
//! checkpoint, its runner's lease and its state. The one place that reads
//! or writes the table.

use crate::backend::rows::Number;
use crate::backend::{per_backend, Bind, DbConnection, Stmt};
use crate::error::Result;
use crate::follow::Checkpoint;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;

/// A projection's checkpoint and the runner holding its lease.
pub(crate) struct Stored {
    pub checkpoint: Checkpoint,
    pub holder: Option<String>,
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

/// A row as the status shows it.
#[derive(QueryableByName)]
pub(crate) struct StatusRow {
    #[diesel(sql_type = Text)]
    pub projection: String,
    #[diesel(sql_type = BigInt)]
    pub position: i64,
    #[diesel(sql_type = BigInt)]
    pub transaction_id: i64,
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub holder: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub failed_position: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub lease_expires_ms: Option<i64>,
    /// The database clock when the row was read.
    #[diesel(sql_type = BigInt)]
    pub now_ms: i64,
}

/// Creates the projection's row (at the start of the log, idle) unless it
/// exists.
pub(crate) fn ensure(conn: &mut DbConnection, name: &str) -> Result<()> {
    // Only when missing: an insert that finds the row takes a shared lock
    // on it on MySQL, and the lease update that follows in the same
    // transaction would then deadlock with another runner doing the same.
    let exists = Stmt::new("SELECT COUNT(*) AS n FROM es_checkpoints WHERE projection = ?")
        .bind(Bind::Text(name))
        .get_result::<Number>(conn)?
        .n;
    if exists > 0 {
        return Ok(());
    }
    let d = conn.dialect();
    let sql = per_backend!(d => {
        let (insert, ignore) = d.insert_ignore();
        format!(
            "{insert} INTO es_checkpoints (projection, position, transaction_id, state) \
             VALUES (?, 0, 0, 'idle'){ignore}"
        )
    });
    Stmt::new(sql).bind(Bind::Text(name)).execute(conn)?;
    Ok(())
}

pub(crate) fn load(conn: &mut DbConnection, name: &str) -> Result<Stored> {
    let row = Stmt::new(
        "SELECT position, transaction_id, holder FROM es_checkpoints WHERE projection = ?",
    )
    .bind(Bind::Text(name))
    .get_result::<CheckpointRow>(conn)?;
    Ok(Stored {
        checkpoint: Checkpoint {
            order_key: row.transaction_id,
            position: row.position,
        },
        holder: row.holder,
    })
}

/// Every row, by name.
pub(crate) fn all(conn: &mut DbConnection) -> Result<Vec<StatusRow>> {
    let d = conn.dialect();
    let sql = per_backend!(d => format!(
        "SELECT projection, position, transaction_id, state, holder, last_error, failed_position, \
         lease_expires_ms, {} AS now_ms FROM es_checkpoints ORDER BY projection",
        d.now_ms()
    ));
    Ok(Stmt::new(sql).load::<StatusRow>(conn)?)
}

/// Gives `node` the lease for `lease_ms` from now (by the database clock)
/// if nobody holds it, `node` does, or the holder's lease ran out. Whether
/// `node` holds it now.
pub(crate) fn take_lease(
    conn: &mut DbConnection,
    name: &str,
    node: &str,
    lease_ms: i64,
) -> Result<bool> {
    let d = conn.dialect();
    let sql = per_backend!(d => format!(
        "UPDATE es_checkpoints SET holder = ?, lease_expires_ms = {now} + ?, \
         state = CASE WHEN state = 'failed' THEN state ELSE 'running' END \
         WHERE projection = ? AND (holder IS NULL OR holder = ? OR lease_expires_ms < {now})",
        now = d.now_ms()
    ));
    let taken = Stmt::new(sql)
        .bind(Bind::Text(node))
        .bind(Bind::BigInt(lease_ms))
        .bind(Bind::Text(name))
        .bind(Bind::Text(node))
        .execute(conn)?;
    Ok(taken == 1)
}

/// Moves the checkpoint from `from` to `to` and renews `node`'s lease, if
/// `node` still holds it and nothing moved the checkpoint meanwhile.
/// Whether it did.
pub(crate) fn advance(
    conn: &mut DbConnection,
    name: &str,
    node: &str,
    from: Checkpoint,
    to: Checkpoint,
    lease_ms: i64,
) -> Result<bool> {
    let d = conn.dialect();
    let sql = per_backend!(d => format!(
        "UPDATE es_checkpoints SET position = ?, transaction_id = ?, state = 'running', \
         last_error = NULL, failed_position = NULL, updated_at = CURRENT_TIMESTAMP, \
         lease_expires_ms = {} + ? \
         WHERE projection = ? AND holder = ? AND position = ? AND transaction_id = ?",
        d.now_ms()
    ));
    let moved = Stmt::new(sql)
        .bind(Bind::BigInt(to.position))
        .bind(Bind::BigInt(to.order_key))
        .bind(Bind::BigInt(lease_ms))
        .bind(Bind::Text(name))
        .bind(Bind::Text(node))
        .bind(Bind::BigInt(from.position))
        .bind(Bind::BigInt(from.order_key))
        .execute(conn)?;
    Ok(moved == 1)
}

/// Marks the projection failed at `position` (if the error is about an
/// event), if `node` holds it.
pub(crate) fn record_failure(
    conn: &mut DbConnection,
    name: &str,
    node: &str,
    message: &str,
    position: Option<i64>,
) -> Result<()> {
    Stmt::new(
        "UPDATE es_checkpoints SET state = 'failed', last_error = ?, failed_position = ?, \
         updated_at = CURRENT_TIMESTAMP WHERE projection = ? AND holder = ?",
    )
    .bind(Bind::Text(message))
    .bind(Bind::NullableBigInt(position))
    .bind(Bind::Text(name))
    .bind(Bind::Text(node))
    .execute(conn)?;
    Ok(())
}

/// The failure is over: running again, if `node` holds the projection.
pub(crate) fn clear_failure(conn: &mut DbConnection, name: &str, node: &str) -> Result<()> {
    Stmt::new(
        "UPDATE es_checkpoints SET state = 'running', last_error = NULL, failed_position = NULL, \
         updated_at = CURRENT_TIMESTAMP WHERE projection = ? AND holder = ? AND state = 'failed'",
    )
    .bind(Bind::Text(name))
    .bind(Bind::Text(node))
    .execute(conn)?;
    Ok(())
}

/// `node` gives its lease up: stopped, unless failed.
pub(crate) fn release(conn: &mut DbConnection, name: &str, node: &str) -> Result<()> {
    Stmt::new(
        "UPDATE es_checkpoints SET holder = NULL, lease_expires_ms = NULL, \
         state = CASE WHEN state = 'failed' THEN state ELSE 'stopped' END \
         WHERE projection = ? AND holder = ?",
    )
    .bind(Bind::Text(name))
    .bind(Bind::Text(node))
    .execute(conn)?;
    Ok(())
}

/// A rebuild takes the lease (for ten minutes) whoever holds it: the
/// runner's next batch fails its checkpoint guard and rolls back.
pub(crate) fn hold_for_rebuild(conn: &mut DbConnection, name: &str, rebuilder: &str) -> Result<()> {
    ensure(conn, name)?;
    let d = conn.dialect();
    let sql = per_backend!(d => format!(
        "UPDATE es_checkpoints SET holder = ?, lease_expires_ms = {} + 600000, state = 'rebuilding' \
         WHERE projection = ?",
        d.now_ms()
    ));
    Stmt::new(sql)
        .bind(Bind::Text(rebuilder))
        .bind(Bind::Text(name))
        .execute(conn)?;
    Ok(())
}

/// After a rebuild: the runner continues from `checkpoint`, the shadow's.
pub(crate) fn rebuilt(conn: &mut DbConnection, name: &str, checkpoint: Checkpoint) -> Result<()> {
    Stmt::new(
        "UPDATE es_checkpoints SET position = ?, transaction_id = ?, holder = NULL, lease_expires_ms = NULL, \
         state = 'idle', last_error = NULL, failed_position = NULL, updated_at = CURRENT_TIMESTAMP \
         WHERE projection = ?",
    )
    .bind(Bind::BigInt(checkpoint.position))
    .bind(Bind::BigInt(checkpoint.order_key))
    .bind(Bind::Text(name))
    .execute(conn)?;
    Ok(())
}

/// The projection starts over from the beginning of the log (its table was
/// re-created).
pub(crate) fn restart(conn: &mut DbConnection, name: &str) -> Result<()> {
    ensure(conn, name)?;
    Stmt::new(
        "UPDATE es_checkpoints SET position = 0, transaction_id = 0, last_error = NULL, \
         failed_position = NULL WHERE projection = ?",
    )
    .bind(Bind::Text(name))
    .execute(conn)?;
    Ok(())
}
