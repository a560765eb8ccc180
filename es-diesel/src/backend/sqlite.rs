//! SQLite: one writer at a time, positions visible in order.

use super::insert::{cached_shape, map_insert_error, metadata_bind};
use super::rows::{Appended, EventTuple, Name, Number};
mod migrations;

use super::{quote_ident, quote_literal};
use super::{Backend, Bind, Columns, DbConnection, Dialect, Marked, SqlText, Stmt};
use crate::error::{Error, Result};
use chrono::Utc;
use diesel::QueryResult;
use es_core::view::ColumnType;
use es_core::{ExpectedVersion, NewEvent};

pub(crate) struct Sqlite;

impl Dialect for Sqlite {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    fn event_columns(&self) -> &'static str {
        "global_position, event_id, stream_id, stream_version, event_type, \
         event_version, payload, metadata, created_at"
    }

    fn name(&self) -> &'static str {
        "sqlite"
    }

    /// SQLite (3.47 and later) reads a bare `LIMIT ?` while preparing and
    /// marks the statement stale whenever that value is bound again: every
    /// execution of a cached statement would be parsed and planned anew
    /// (about 100,000 instructions, a third of a command). An expression
    /// keeps the prepared statement.
    fn limit(&self) -> &'static str {
        "LIMIT CAST(? AS INTEGER)"
    }

    fn now_ms(&self) -> &'static str {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    }

    fn migrations(&self) -> &'static [(i32, &'static str)] {
        migrations::MIGRATIONS
    }

    fn relation_exists(&self, name: &str) -> Stmt<'static> {
        Stmt::new(
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?",
        )
        .bind(Bind::Owned(name.to_owned()))
    }

    fn json_field(&self, json: &str, key: &str, ty: ColumnType) -> String {
        let path = quote_literal(&format!("$.{}", quote_ident(key)));
        match ty {
            ColumnType::Json => format!("({json} -> {path})"),
            ColumnType::Float | ColumnType::Double => {
                format!("CAST(json_extract({json}, {path}) AS REAL)")
            }
            _ => format!("json_extract({json}, {path})"),
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
        Stmt::new(
            "INSERT INTO es_snapshots (aggregate_type, stream_id, shape, stream_version, state, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (aggregate_type, stream_id) DO UPDATE SET \
             shape = excluded.shape, stream_version = excluded.stream_version, \
             state = excluded.state, created_at = excluded.created_at \
             WHERE es_snapshots.stream_version < excluded.stream_version OR es_snapshots.shape <> excluded.shape",
        )
        .bind(Bind::Text(aggregate_type))
        .bind(Bind::Text(stream))
        .bind(Bind::BigInt(shape))
        .bind(Bind::BigInt(stream_version))
        .bind(Bind::Text(state))
        .bind(Bind::Timestamp(Utc::now().naive_utc()))
    }

    /// SQLite answers `IN (?, ?, ?)` on a column it does not search by
    /// index with a temporary b-tree probed for every row; a rebuild scans
    /// along the positions, so a few comparisons per row are cheaper.
    fn type_is_any_of<'a>(&self, types: &'a [&'a str]) -> (String, Vec<Bind<'a>>) {
        let mut sql = String::with_capacity(2 + types.len() * 20);
        sql.push('(');
        for (i, _) in types.iter().enumerate() {
            sql.push_str(if i == 0 {
                "event_type = ?"
            } else {
                " OR event_type = ?"
            });
        }
        sql.push(')');
        (sql, types.iter().map(|t| Bind::Text(t)).collect())
    }

    fn events_in_position_order(&self, types: usize) -> &'static str {
        // The rowid is no index: NOT INDEXED keeps the range scan on it.
        if types > 1 {
            "es_events NOT INDEXED"
        } else {
            "es_events"
        }
    }

    fn serial_writers(&self) -> bool {
        true
    }

    fn one_statement_append(&self) -> bool {
        true
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

/// An expected version gives the versions to write, and the insert trigger
/// of migration 11 refuses a version that is not the stream's last one + 1:
/// the insert alone checks the expectation, atomically (a statement holds
/// SQLite's write lock from its first write to its end), so such an append
/// needs no transaction around it. `Any` and `StreamExists` read the
/// version first; a writer that appends in between makes the insert fail
/// the same way, and the append is run again.
fn insert(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    let current = match expected {
        ExpectedVersion::Exact(v) => v,
        ExpectedVersion::NoStream => 0,
        ExpectedVersion::Any | ExpectedVersion::StreamExists => {
            let current = crate::read::stream_version(conn, stream)?;
            if !expected.is_satisfied_by(current) {
                return Ok(Vec::new());
            }
            current
        }
    };
    fn text(events: usize) -> String {
        let mut sql = String::with_capacity(200 + events * 32);
        sql.push_str(
            "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata, created_at) VALUES ",
        );
        for k in 0..events {
            sql.push_str(if k == 0 {
                "(?, ?, ?, ?, ?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?, ?, ?, ?, ?)"
            });
        }
        sql
    }
    // A one-event append, the common one, is written out once.
    static ONE: std::sync::OnceLock<Marked> = std::sync::OnceLock::new();
    let sql: SqlText<'_> = match chunk.len() {
        1 => ONE.get_or_init(|| Marked::new(text(1))).into(),
        n => text(n).into(),
    };
    // No `RETURNING`: SQLite collects returned rows in a temporary b-tree
    // it opens and closes per statement (about 12,000 instructions). The
    // versions and time are the ones bound, and the positions are the
    // connection's last rowid and those before it: a statement inserts its
    // rows one after another under the write lock, and `AUTOINCREMENT`
    // numbers each row after the one before.
    let now = Utc::now().naive_utc();
    // As Diesel writes a `Timestamp`, without chrono's formatting.
    let now_text = super::rows::format_sqlite_time(now);
    let mut q = Stmt::with_capacity(sql, chunk.len() * 8);
    if !cached_shape(chunk.len()) {
        q.dont_cache();
    }
    // No stream reaches an expected version this close to the limit.
    if current.checked_add(chunk.len() as i64).is_none() {
        return Ok(Vec::new());
    }
    for (k, ev) in chunk.iter().enumerate() {
        q.push(Bind::Owned(ev.event_id.hyphenated().to_string()));
        q.push(Bind::Text(stream));
        q.push(Bind::BigInt(current + k as i64 + 1));
        q.push(Bind::Text(ev.event_type));
        q.push(Bind::SmallInt(ev.event_version as i16));
        q.push(Bind::Text(&ev.payload));
        q.push(metadata_bind(&ev.metadata));
        q.push(Bind::Text(&now_text));
    }
    /// The text of a one-event insert.
    struct InsertOne;
    /// The rowid of the connection's last insert.
    struct LastRowid;
    let inserted = if chunk.len() == 1 {
        q.named::<InsertOne>().execute(conn)
    } else {
        q.execute(conn)
    }
    .and_then(|_| {
        Stmt::new("SELECT last_insert_rowid() AS n")
            .named::<LastRowid>()
            .get_result::<Number>(conn)
    });
    match inserted {
        Ok(Number { n: last }) => {
            let first = last - chunk.len() as i64 + 1;
            Ok((0..chunk.len() as i64)
                .map(|k| Appended {
                    global_position: first + k,
                    stream_version: current + k + 1,
                    created_at: super::rows::StoredTime(now),
                })
                .collect())
        }
        Err(e) => match map_insert_error(e, stream, expected, chunk) {
            Error::DuplicateEventId { event_id } if event_id.is_nil() => {
                Err(Error::DuplicateEventId {
                    event_id: existing_id(conn, chunk)?.unwrap_or_default(),
                })
            }
            // Only a writer between the version read and the insert: the
            // append may run again.
            conflict @ Error::Conflict { .. }
                if matches!(
                    expected,
                    ExpectedVersion::Any | ExpectedVersion::StreamExists
                ) =>
            {
                Err(conflict)
            }
            // The transaction is still usable: say what the stream is at.
            Error::Conflict {
                stream, expected, ..
            } => {
                let actual = crate::read::stream_version(conn, &stream)?;
                Err(Error::Conflict {
                    stream,
                    expected,
                    actual,
                })
            }
            other => Err(other),
        },
    }
}

/// The rule of migration 11 (a stream's versions follow each other), which
/// appends with an expected version rely on, for a connection to a log
/// that has not applied it yet: a TEMP trigger of the connection's own, so
/// that a process opening an older database before (or without) migrating
/// cannot write a version above its stream's. Connections to a migrated
/// log (or to no log yet) get nothing.
pub(super) fn guard_unmigrated_versions(conn: &mut diesel::SqliteConnection) -> QueryResult<()> {
    use diesel::connection::SimpleConnection;
    use diesel::RunQueryDsl;
    let unguarded = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'es_events' \
         AND NOT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'es_events_append_only')",
    )
    .get_result::<Number>(conn)?
    .n;
    if unguarded > 0 {
        conn.batch_execute(
            "CREATE TEMP TRIGGER IF NOT EXISTS es_events_versions_follow BEFORE INSERT ON main.es_events \
             WHEN NEW.stream_version <> 1 + (SELECT COALESCE(MAX(stream_version), 0) FROM main.es_events WHERE stream_id = NEW.stream_id) \
             BEGIN SELECT RAISE(ABORT, 'es_events is append-only: a stream_version must follow the last version of its stream'); END;",
        )?;
    }
    Ok(())
}

/// SQLite does not say which key was duplicated; its transaction is still
/// usable after a failed statement, so ask.
fn existing_id(conn: &mut DbConnection, chunk: &[NewEvent]) -> QueryResult<Option<uuid::Uuid>> {
    for ev in chunk {
        let found = Stmt::new("SELECT event_id AS name FROM es_events WHERE event_id = ?")
            .bind(Bind::Owned(ev.event_id.hyphenated().to_string()))
            .load::<Name>(conn)?;
        if let Some(f) = found.first() {
            return Ok(uuid::Uuid::parse_str(&f.name).ok());
        }
    }
    Ok(None)
}
