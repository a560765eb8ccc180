//! MySQL and MariaDB (InnoDB): appends queue on one row, so positions
//! commit, and become visible, in order.
//!
//! ## Gap safety
//!
//! Auto-increment values commit out of order, and MySQL has neither
//! PostgreSQL's snapshot functions nor its advisory locks in `pg_locks`, so
//! the log hands out positions itself: the insert trigger of `es_events`
//! (migration 1) gives each row the next position with `UPDATE es_log_head
//! SET position = position + 1`, which takes the row lock of the one head
//! row and keeps it until the transaction ends (the statement's own, when
//! the append is autocommitted). Appends therefore commit one after
//! another, each with the positions after the previous one's. InnoDB makes
//! a transaction visible to new reads before it releases its locks
//! (`trx_t::commit_in_memory`: the transaction is deregistered, then its
//! locks released), so when an append can take the head, every append
//! before it is visible: no reader ever sees a position while a lower one
//! is still to commit, and followers read by position alone, as on SQLite.
//! A rolled-back append gives its positions back (the head's update rolls
//! back with it).
//!
//! An append is one statement that checks the expectation and inserts,
//! atomic without a transaction around it (an `INSERT … VALUES` whose
//! version is the successor of the expected version's row, or an
//! `INSERT … SELECT` that reads the stream's last version), then a read of
//! the positions it got.
//!
//! The cost is SQLite's: appends to different streams do not overlap. An
//! append holds the head from its first insert to its commit, inline
//! projectors included; the rest of a command (loading, deciding) runs
//! before it, concurrently.
//!
//! Sessions read committed (each statement sees what committed before it),
//! in UTC, with ANSI quotes and strict mode: see [`SESSION_SETUP`].

use super::insert::{append_text, cached_shape, map_insert_error, metadata_bind, OneEventTexts};
use super::rows::{Appended, EventTuple, Number};
mod migrations;

use super::{
    per_backend, quote_literal, Backend, Bind, Columns, DbConnection, Dialect, ListOf, Marked, Stmt,
};
use crate::error::{Error, Result};
use chrono::{Timelike, Utc};
use diesel::connection::SimpleConnection;
use es_core::view::ColumnType;
use es_core::{ExpectedVersion, NewEvent, Query};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

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
        macro_rules! newer {
            () => {
                "(stream_id = VALUES(stream_id) AND \
                 (stream_version < VALUES(stream_version) OR shape <> VALUES(shape)))"
            };
        }
        Stmt::new(concat!(
            "INSERT INTO es_snapshots (aggregate_type, stream_id, shape, stream_version, state, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE state = IF(",
            newer!(),
            ", VALUES(state), state), created_at = IF(",
            newer!(),
            ", VALUES(created_at), created_at), stream_version = IF(",
            newer!(),
            ", VALUES(stream_version), stream_version), shape = IF(",
            newer!(),
            ", VALUES(shape), shape)"
        ))
        .bind(Bind::Text(aggregate_type))
        .bind(Bind::Text(stream))
        .bind(Bind::BigInt(shape))
        .bind(Bind::BigInt(stream_version))
        .bind(Bind::Text(state))
        .bind(Bind::Timestamp(Utc::now().naive_utc()))
    }

    fn events_in_position_order(&self, types: usize) -> &'static str {
        if types > 1 {
            "es_events IGNORE INDEX (es_events_by_type)"
        } else {
            "es_events"
        }
    }

    fn one_statement_append(&self) -> bool {
        true
    }

    fn lock_streams(&self, conn: &mut DbConnection, streams: &[&str]) -> Result<()> {
        // The head lock covers every stream.
        if !streams.is_empty() {
            Stmt::new("SELECT position AS n FROM es_log_head WHERE id = 1 FOR UPDATE")
                .get_result::<Number>(conn)?;
        }
        Ok(())
    }

    /// Every append takes the head's lock (in the insert trigger) and holds
    /// it until it commits: a conditional append that takes it first checks
    /// a log no one else appends to until it commits.
    fn lock_tags(
        &self,
        conn: &mut DbConnection,
        _streams: &[&str],
        _tags: &[&str],
        condition: Option<&Query>,
    ) -> Result<()> {
        if condition.is_some() {
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
        insert(conn, stream, expected, chunk)
    }

    fn read_after(
        &self,
        conn: &mut DbConnection,
        _after_key: i64,
        after_position: i64,
        types: Option<&[&str]>,
        limit: i64,
        columns: Columns,
    ) -> Result<Vec<(EventTuple, i64)>> {
        super::read_by_position(self, conn, after_position, types, limit, columns)
    }
}

/// One statement: checks the expectation and inserts the chunk (see
/// [`insert_checked`]), each row taking the next position from the head
/// in the insert trigger (migration 1), which holds the head's lock until
/// the statement, or the caller's transaction, commits. Then the positions
/// are read back by event id. A concurrent writer of the same version loses
/// on the unique index.
fn insert(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    // Microseconds: what DATETIME(6) keeps.
    let now = Utc::now().naive_utc();
    let now = now
        .with_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now);
    let ids: Vec<String> = chunk
        .iter()
        .map(|e| e.event_id.hyphenated().to_string())
        .collect();
    match insert_checked(conn, stream, expected, chunk, &ids, now) {
        Ok(0) => {}
        Ok(_) => return read_back(conn, &ids),
        // The version is taken: a stale expectation, or a concurrent
        // append of the same version.
        Err(Error::Conflict { .. }) => {}
        // The expectation is checked before the event ids, as on the other
        // backends (an append resent after it committed is a conflict): an
        // `INSERT … VALUES` meets the event id's unique index first.
        Err(Error::DuplicateEventId { .. }) => {}
        Err(e) => return Err(e),
    }
    // The version was taken, or the expectation failed on what the
    // statement read, or an event id is taken. A caller's transaction at
    // REPEATABLE READ reads the snapshot of its first read in places:
    // before refusing, read the version with a locking read, which sees
    // the last commit.
    let actual = locked_version(conn, stream)?;
    if !expected.is_satisfied_by(actual) {
        return Ok(Vec::new());
    }
    match insert_checked(
        conn,
        stream,
        ExpectedVersion::Exact(actual),
        chunk,
        &ids,
        now,
    )? {
        0 => Ok(Vec::new()),
        _ => read_back(conn, &ids),
    }
}

/// Set once a server refused the `INSERT … VALUES` form that reads the
/// log (MySQL's "You can't specify target table … for update in FROM
/// clause", error 1093, which MariaDB does not raise).
static SELF_READ_REFUSED: AtomicBool = AtomicBool::new(false);

/// Is this MySQL's refusal of a statement that writes a table it reads in
/// a subquery (error 1093, in English as servers send it by default)?
fn refuses_self_read(message: &str) -> bool {
    message.contains("can't specify target table")
}

/// The insert of [`insert`] (`ids`: the chunk's event ids as text); the
/// number of rows inserted (0 when the expectation does not hold).
///
/// One event expecting no stream or a version of at least 0 (every
/// command's append) is an `INSERT … VALUES`: its version is 1 for a new
/// stream, and otherwise the successor of the expected version read from
/// that version's own row (NULL, which the column refuses, when the row is
/// missing). The unique index on (stream, version) refuses it when the
/// stream has moved past the expectation: with versions numbered from 1
/// without gaps, the two checks together are the expectation. MariaDB runs
/// an `INSERT … SELECT` that reads its own table through an internal
/// temporary table, prepared and optimized again at every execution; the
/// `VALUES` form takes one unique-key lookup, a locking read that waits for
/// an uncommitted row of that key. At READ COMMITTED (the store's sessions)
/// it locks only the row it finds; in a caller's REPEATABLE READ
/// transaction, a missing row (an expectation ahead of the stream) takes a
/// gap lock, which can deadlock with an append in flight that writes into
/// that gap (MariaDB then rolls the caller's transaction back with a
/// retryable error).
///
/// The position trigger runs before the row is refused, so a refused
/// one-event append takes the log's head for its statement, waiting for
/// appends in flight like any append, and gives it back when the statement
/// fails (or, inside a transaction, when `append_in`'s savepoint is rolled
/// back). Other appends (several events, any version, an existing stream,
/// a version below 0) read the stream's last version in an
/// `INSERT … SELECT` and select nothing when the expectation fails,
/// without firing the trigger; so do appends expecting a version on a
/// MySQL server, which refuses the `VALUES` form that reads the log (see
/// [`SELF_READ_REFUSED`]).
fn insert_checked(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
    ids: &[String],
    now: chrono::NaiveDateTime,
) -> Result<usize> {
    const INTO: &str = "INSERT INTO es_events (global_position, event_id, stream_id, \
         stream_version, event_type, event_version, payload, metadata, created_at)";
    // One event at a version of 0 (no stream) or more: `Some(after)`, the
    // version it follows, `None` for a new stream.
    let values_form = match (chunk, expected) {
        ([ev], ExpectedVersion::NoStream | ExpectedVersion::Exact(0)) => Some((ev, None)),
        ([ev], ExpectedVersion::Exact(v))
            if v > 0 && !SELF_READ_REFUSED.load(Ordering::Relaxed) =>
        {
            Some((ev, Some(v)))
        }
        _ => None,
    };
    if let Some((ev, after)) = values_form {
        static AT_VERSION: OnceLock<Marked> = OnceLock::new();
        static NEW: OnceLock<Marked> = OnceLock::new();
        let mut q = Stmt::with_capacity(
            match after {
                Some(_) => AT_VERSION.get_or_init(|| {
                    Marked::new(format!(
                        "{INTO} VALUES (0, ?, ?, (SELECT e.stream_version + 1 FROM es_events AS e \
                         WHERE e.stream_hash = UNHEX(MD5(?)) AND e.stream_id = ? \
                         AND e.stream_version = ?), ?, ?, ?, ?, ?)"
                    ))
                }),
                None => NEW.get_or_init(|| {
                    Marked::new(format!("{INTO} VALUES (0, ?, ?, 1, ?, ?, ?, ?, ?)"))
                }),
            },
            10,
        );
        q.push(Bind::Text(&ids[0]));
        q.push(Bind::Text(stream));
        if let Some(v) = after {
            q.push(Bind::Text(stream));
            q.push(Bind::Text(stream));
            q.push(Bind::BigInt(v));
        }
        push_event_values(&mut q, ev);
        q.push(Bind::Timestamp(now));
        /// The texts of one-event appends that expect a version or no stream.
        struct OneAtVersion;
        struct OneNew;
        let done = match after {
            Some(_) => q.named::<OneAtVersion>().execute(conn),
            None => q.named::<OneNew>().execute(conn),
        };
        match done {
            // The expected version's row is missing: the expectation does
            // not hold (the caller reads the version again with a locking
            // read before refusing).
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::NotNullViolation,
                info,
            )) if after.is_some() && info.message().contains("stream_version") => return Ok(0),
            // MySQL (not MariaDB) refuses an `INSERT … VALUES` that reads
            // its own table, before running it: from now on this process
            // appends with the `INSERT … SELECT` below.
            Err(diesel::result::Error::DatabaseError(_, info))
                if after.is_some() && refuses_self_read(info.message()) =>
            {
                SELF_READ_REFUSED.store(true, Ordering::Relaxed);
                tracing::info!(
                    "the server refuses an INSERT … VALUES that reads its own table; \
                     appending with INSERT … SELECT"
                );
            }
            done => return done.map_err(|e| map_insert_error(e, stream, expected, chunk)),
        }
    }
    static ONE: OneEventTexts = [const { OnceLock::new() }; 4];
    let sql = append_text(&ONE, chunk.len(), expected, || {
        use std::fmt::Write;
        let mut sql = String::with_capacity(700 + chunk.len() * 60);
        // The stream's last version, read once.
        let cur = format!(
            "FROM (SELECT COALESCE((SELECT stream_version FROM es_events WHERE {} \
             ORDER BY stream_version DESC LIMIT 1), 0) AS v) AS cur",
            Mysql.stream_is()
        );
        if chunk.len() == 1 {
            // One event selects its values directly: MariaDB materializes the
            // derived table of the general form as an internal temporary table
            // at every append, besides the one an `INSERT … SELECT` reading its
            // own table needs (`Created_tmp_tables`).
            let _ = write!(sql, "{INTO} SELECT 0, ?, ?, cur.v + 1, ?, ?, ?, ?, ? {cur}");
        } else {
            let _ = write!(
                sql,
                "{INTO} SELECT 0, e.event_id, ?, cur.v + e.k, e.event_type, e.event_version, \
                 e.payload, e.metadata, ? {cur}, ("
            );
            for k in 1..=chunk.len() {
                if k == 1 {
                    sql.push_str(
                        "SELECT ? AS event_id, 1 AS k, ? AS event_type, ? AS event_version, ? AS payload, ? AS metadata",
                    );
                } else {
                    let _ = write!(sql, " UNION ALL SELECT ?, {k}, ?, ?, ?, ?");
                }
            }
            sql.push_str(") AS e");
        }
        match expected {
            ExpectedVersion::Any => {}
            ExpectedVersion::NoStream => sql.push_str(" WHERE cur.v = 0"),
            ExpectedVersion::StreamExists => sql.push_str(" WHERE cur.v > 0"),
            ExpectedVersion::Exact(_) => sql.push_str(" WHERE cur.v = ?"),
        }
        if chunk.len() > 1 {
            // The trigger numbers the rows in insertion order.
            sql.push_str(" ORDER BY e.k");
        }
        sql
    });
    let mut q = Stmt::with_capacity(sql, 4 + chunk.len() * 5);
    if !cached_shape(chunk.len()) {
        q.dont_cache();
    }
    if let [ev] = chunk {
        q.push(Bind::Text(&ids[0]));
        q.push(Bind::Text(stream));
        push_event_values(&mut q, ev);
        q.push(Bind::Timestamp(now));
        q.push(Bind::Text(stream));
        q.push(Bind::Text(stream));
    } else {
        q.push(Bind::Text(stream));
        q.push(Bind::Timestamp(now));
        q.push(Bind::Text(stream));
        q.push(Bind::Text(stream));
        for (ev, id) in chunk.iter().zip(ids) {
            q.push(Bind::Text(id));
            push_event_values(&mut q, ev);
        }
    }
    if let ExpectedVersion::Exact(v) = expected {
        q.push(Bind::BigInt(v));
    }
    q.execute(conn)
        .map_err(|e| map_insert_error(e, stream, expected, chunk))
}

/// An event's type, type version, payload and metadata, in that order.
fn push_event_values<'a>(q: &mut Stmt<'a>, ev: &'a NewEvent) {
    q.push(Bind::Text(ev.event_type));
    q.push(Bind::SmallInt(ev.event_version as i16));
    q.push(Bind::Text(&ev.payload));
    q.push(metadata_bind(&ev.metadata));
}

/// The positions and versions the rows of these event ids got, in version
/// order.
fn read_back(conn: &mut DbConnection, ids: &[String]) -> Result<Vec<Appended>> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (any, binds) = Mysql.any_of(&ids, ListOf::Uuid);
    let mut q = Stmt::with_capacity(
        format!(
            "SELECT global_position, stream_version, created_at FROM es_events \
             WHERE event_id {any} ORDER BY stream_version"
        ),
        binds.len(),
    );
    if !cached_shape(ids.len()) {
        q.dont_cache();
    }
    binds.into_iter().for_each(|b| q.push(b));
    /// The text of the read-back of one event.
    struct One;
    Ok(match ids.len() {
        1 => q.named::<One>().load::<Appended>(conn)?,
        _ => q.load::<Appended>(conn)?,
    })
}

/// The stream's last committed version, whatever the transaction's
/// snapshot.
fn locked_version(conn: &mut DbConnection, stream: &str) -> Result<i64> {
    let d: &'static dyn Dialect = &Mysql;
    let sql = per_backend!(d => format!(
        "SELECT COALESCE(MAX(stream_version), 0) AS n FROM es_events WHERE {} LOCK IN SHARE MODE",
        d.stream_is()
    ));
    let mut q = Stmt::new(sql);
    d.push_stream(&mut q, stream);
    Ok(q.get_result::<Number>(conn)?.n)
}
