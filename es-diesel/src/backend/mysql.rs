//! MySQL and MariaDB (InnoDB): appends queue on one row, so positions
//! commit, and become visible, in order.
//!
//! ## Gap safety
//!
//! Auto-increment values commit out of order, and MySQL has neither
//! PostgreSQL's snapshot functions nor its advisory locks in `pg_locks`, so
//! the log hands out positions itself: the first statement of every append
//! is `UPDATE es_log_head SET position = position + n`, which takes the
//! row lock of the one head row and keeps it until the transaction ends.
//! Appends therefore run one after another, each taking the positions after
//! the previous one's. InnoDB makes a transaction visible to new reads
//! before it releases its locks (`trx_t::commit_in_memory`: the transaction
//! is deregistered, then its locks released), so when an append can read
//! the head, every append before it is visible: no reader ever sees a
//! position while a lower one is still to commit, and followers read by
//! position alone, as on SQLite. A rolled-back append leaves a hole in the
//! positions that nothing waits for.
//!
//! The cost is SQLite's: appends to different streams do not overlap. An
//! append holds the head from its first insert to its commit, inline
//! projectors included; the rest of a command (loading, deciding) runs
//! before it, concurrently.
//!
//! Sessions read committed (each statement sees what committed before it),
//! in UTC, with ANSI quotes and strict mode: see [`SESSION_SETUP`].

use super::insert::{cached_shape, map_insert_error, metadata_bind};
use super::rows::{Appended, EventTuple, Number};
mod migrations;

use super::{quote_literal, Backend, Bind, DbConnection, Dialect, Stmt};
use crate::error::{Error, Result};
use chrono::{Timelike, Utc};
use diesel::connection::SimpleConnection;
use diesel::connection::TransactionManager;
use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName};
use es_core::view::ColumnType;
use es_core::{ExpectedVersion, NewEvent};

pub(crate) struct Mysql;

/// Run on every new connection. ANSI_QUOTES: the store's SQL quotes
/// identifiers with `"` on every backend (Diesel's own queries use
/// backticks, which stay valid).
pub(crate) const SESSION_SETUP: &str = "SET SESSION sql_mode = \
     'ANSI_QUOTES,STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'; \
     SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
     SET time_zone = '+00:00'; \
     SET NAMES utf8mb4 COLLATE utf8mb4_bin";

/// How long `migrate` waits for another process's `migrate`, in seconds.
const MIGRATE_LOCK_WAIT_S: i64 = 600;

impl Dialect for Mysql {
    fn backend(&self) -> Backend {
        Backend::Mysql
    }

    fn name(&self) -> &'static str {
        "mysql"
    }

    fn event_columns(&self) -> &'static str {
        "global_position, event_id, stream_id, stream_version, event_type, \
         event_version, payload, metadata, created_at"
    }

    fn stream_is(&self) -> &'static str {
        "stream_hash = UNHEX(MD5(?)) AND stream_id = ?"
    }

    fn stream_binds(&self) -> usize {
        2
    }

    fn now_ms(&self) -> &'static str {
        "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"
    }

    fn migrations(&self) -> &'static [(i32, &'static str)] {
        migrations::MIGRATIONS
    }

    fn lock_migrations(&self, conn: &mut DbConnection) -> Result<()> {
        // A named lock of the session: MySQL commits DDL on the spot, so the
        // migration transaction cannot hold one.
        let got = Stmt::new(
            "SELECT COALESCE(GET_LOCK(CONCAT('es_diesel.migrate.', DATABASE()), ?), 0) AS n",
        )
        .bind(Bind::BigInt(MIGRATE_LOCK_WAIT_S))
        .get_result::<Number>(conn)?
        .n;
        if got != 1 {
            return Err(Error::Database(diesel::result::Error::QueryBuilderError(
                format!("another migrate held the migration lock for {MIGRATE_LOCK_WAIT_S} s")
                    .into(),
            )));
        }
        Ok(())
    }

    fn unlock_migrations(&self, conn: &mut DbConnection) {
        let _ = conn.batch_execute("DO RELEASE_LOCK(CONCAT('es_diesel.migrate.', DATABASE()))");
    }

    fn insert_ignore(&self) -> (&'static str, &'static str) {
        ("INSERT IGNORE", "")
    }

    fn relation_exists(&self, name: &str) -> Stmt<'static> {
        Stmt::new(
            "SELECT COUNT(*) AS n FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(Bind::Owned(name.to_owned()))
    }

    fn json_field(&self, json: &str, key: &str, ty: ColumnType) -> String {
        let path = quote_literal(&format!(
            "$.\"{}\"",
            key.replace('\\', "\\\\").replace('"', "\\\"")
        ));
        let value = format!("JSON_VALUE({json}, {path})");
        match ty {
            ColumnType::Json => format!("JSON_EXTRACT({json}, {path})"),
            ColumnType::Text => value,
            ColumnType::Float | ColumnType::Double => format!("CAST({value} AS DOUBLE)"),
            // MariaDB gives booleans as 1/0, MySQL as true/false.
            ColumnType::Bool => format!(
                "(CASE {value} WHEN 'true' THEN 1 WHEN '1' THEN 1 WHEN 'false' THEN 0 WHEN '0' THEN 0 END)"
            ),
            ColumnType::SmallInt | ColumnType::Integer | ColumnType::BigInt => {
                format!("CAST({value} AS SIGNED)")
            }
        }
    }

    fn save_snapshot<'a>(
        &self,
        aggregate_type: &'a str,
        stream: &'a str,
        shape: i64,
        stream_version: i64,
        state: &'a str,
    ) -> Stmt<'a> {
        // Assignments run left to right and later ones see the earlier
        // ones' results: the version goes before the shape, so both are
        // judged on the stored row (a shape change alone still replaces it).
        // The stream_id condition keeps an md5 collision from overwriting
        // another stream's snapshot.
        const NEWER: &str = "(stream_id = VALUES(stream_id) AND \
             (stream_version < VALUES(stream_version) OR shape <> VALUES(shape)))";
        Stmt::new(format!(
            "INSERT INTO es_snapshots (aggregate_type, stream_id, shape, stream_version, state, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
             state = IF({NEWER}, VALUES(state), state), \
             created_at = IF({NEWER}, VALUES(created_at), created_at), \
             stream_version = IF({NEWER}, VALUES(stream_version), stream_version), \
             shape = IF({NEWER}, VALUES(shape), shape)"
        ))
        .bind(Bind::Text(aggregate_type))
        .bind(Bind::Text(stream))
        .bind(Bind::BigInt(shape))
        .bind(Bind::BigInt(stream_version))
        .bind(Bind::Text(state))
        .bind(Bind::Timestamp(Utc::now().naive_utc()))
    }

    fn lock_streams(&self, conn: &mut DbConnection, streams: &[&str]) -> Result<()> {
        // The head lock covers every stream.
        if !streams.is_empty() {
            Stmt::new("SELECT position AS n FROM es_log_head WHERE id = 1 FOR UPDATE")
                .get_result::<Number>(conn)?;
        }
        Ok(())
    }

    fn insert_events(
        &self,
        conn: &mut DbConnection,
        stream: &str,
        expected: ExpectedVersion,
        chunk: &[NewEvent],
    ) -> Result<Vec<Appended>> {
        type Tm = <DbConnection as Connection>::TransactionManager;
        let in_transaction = Tm::transaction_manager_status_mut(conn)
            .transaction_depth()?
            .is_some();
        if in_transaction {
            insert(conn, stream, expected, chunk)
        } else {
            // Autocommitted, the head's update would release its lock before
            // the insert, and positions could commit out of order.
            super::write_transaction(conn, |c| insert(c, stream, expected, chunk))
        }
    }

    fn read_after(
        &self,
        conn: &mut DbConnection,
        _after_key: i64,
        after_position: i64,
        types: Option<&[&str]>,
        limit: i64,
    ) -> Result<Vec<(EventTuple, i64)>> {
        super::read_by_position(self, conn, after_position, types, limit)
    }
}

#[derive(QueryableByName)]
struct Head {
    #[diesel(sql_type = BigInt)]
    position: i64,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

/// Takes the head (see the module docs) and the positions of the chunk,
/// reads the stream's version under it, and inserts the chunk if the
/// expectation holds. Positions taken by an append that finds the stream at
/// another version are never used: a hole, as after a rollback.
fn insert(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    let n = chunk.len() as i64;
    Stmt::new("UPDATE es_log_head SET position = position + ? WHERE id = 1")
        .bind(Bind::BigInt(n))
        .execute(conn)?;
    // The head as this transaction just wrote it; the stream's last version
    // read from the end of its index (MAX() would read every version).
    let mut head = Stmt::new(
        "SELECT (SELECT position FROM es_log_head WHERE id = 1) AS position, \
         COALESCE((SELECT stream_version FROM es_events WHERE stream_hash = UNHEX(MD5(?)) \
         AND stream_id = ? ORDER BY stream_version DESC LIMIT 1), 0) AS version",
    )
    .bind(Bind::Text(stream))
    .bind(Bind::Text(stream))
    .get_result::<Head>(conn)?;
    // Under the head lock the version read is the stream's, unless the
    // caller's transaction runs at REPEATABLE READ and reads the snapshot
    // of its first read: before refusing, or after a collision, read it
    // again with a locking read, which sees the last commit.
    let mut reread = false;
    if !expected.is_satisfied_by(head.version) {
        reread = true;
        head.version = locked_version(conn, stream)?;
        if !expected.is_satisfied_by(head.version) {
            return Ok(Vec::new());
        }
    }
    loop {
        match insert_at(conn, stream, expected, chunk, &head) {
            Err(Error::Conflict { .. }) if !reread => {
                reread = true;
                let now = locked_version(conn, stream)?;
                if now == head.version {
                    return Err(Error::Conflict {
                        stream: stream.to_owned(),
                        expected,
                        actual: now,
                    });
                }
                if !expected.is_satisfied_by(now) {
                    return Ok(Vec::new());
                }
                head.version = now;
            }
            other => return other,
        }
    }
}

/// The stream's last committed version, whatever the transaction's
/// snapshot.
fn locked_version(conn: &mut DbConnection, stream: &str) -> Result<i64> {
    Ok(Stmt::new(
        "SELECT COALESCE(MAX(stream_version), 0) AS n FROM es_events \
         WHERE stream_hash = UNHEX(MD5(?)) AND stream_id = ? LOCK IN SHARE MODE",
    )
    .bind(Bind::Text(stream))
    .bind(Bind::Text(stream))
    .get_result::<Number>(conn)?
    .n)
}

/// Inserts the chunk at the positions ending at `head.position`, after
/// version `head.version` of the stream.
fn insert_at(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
    head: &Head,
) -> Result<Vec<Appended>> {
    let n = chunk.len() as i64;
    let first = head.position - n + 1;
    let mut sql = String::with_capacity(200 + chunk.len() * 32);
    sql.push_str(
        "INSERT INTO es_events (global_position, event_id, stream_id, stream_version, event_type, \
         event_version, payload, metadata, created_at) VALUES ",
    );
    for k in 0..chunk.len() {
        sql.push_str(if k == 0 {
            "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        });
    }
    // Microseconds: what DATETIME(6) keeps, so the returned time is the
    // stored one.
    let now = Utc::now().naive_utc();
    let now = now
        .with_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now);
    let mut q = Stmt::with_capacity(&sql, chunk.len() * 9);
    if !cached_shape(chunk.len()) {
        q.dont_cache();
    }
    let mut appended = Vec::with_capacity(chunk.len());
    for (k, ev) in chunk.iter().enumerate() {
        let k = k as i64;
        q.push(Bind::BigInt(first + k));
        q.push(Bind::Owned(ev.event_id.hyphenated().to_string()));
        q.push(Bind::Text(stream));
        q.push(Bind::BigInt(head.version + k + 1));
        q.push(Bind::Text(ev.event_type));
        q.push(Bind::SmallInt(ev.event_version as i16));
        q.push(Bind::Text(&ev.payload));
        q.push(metadata_bind(&ev.metadata));
        q.push(Bind::Timestamp(now));
        appended.push(Appended {
            global_position: first + k,
            stream_version: head.version + k + 1,
            created_at: now,
        });
    }
    match q.execute(conn) {
        Ok(_) => Ok(appended),
        Err(e) => Err(match map_insert_error(e, stream, expected, chunk) {
            // Under the head lock the version read above is the stream's.
            Error::Conflict {
                stream, expected, ..
            } => Error::Conflict {
                stream,
                expected,
                actual: head.version,
            },
            other => other,
        }),
    }
}
