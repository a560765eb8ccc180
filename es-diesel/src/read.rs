//! Reading the log: one stream, the whole log in global order, by event type.
//! Every read is a bounded page.

use crate::append::Version;
use crate::connection::DbConnection;
use crate::error::{Error, Result};
use crate::stmt::{Bind, Stmt};
use chrono::NaiveDateTime;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, SmallInt, Text, Timestamp};
use diesel::sqlite::Sqlite;
use es_core::{Metadata, Payload, RecordedEvent};
use std::sync::LazyLock;

/// The SQL types of the event columns, in `PG_COLUMNS`/`SQLITE_COLUMNS` order.
pub(crate) type EventSql = (
    BigInt,
    Text,
    Text,
    BigInt,
    Text,
    SmallInt,
    Text,
    Text,
    Timestamp,
);

/// An event row, loaded by position.
pub(crate) type EventTuple = (
    i64,
    String,
    String,
    i64,
    String,
    i16,
    String,
    String,
    NaiveDateTime,
);

/// Checks a stored row and turns it into a recorded event.
pub(crate) fn recorded(row: EventTuple) -> Result<RecordedEvent> {
    let (
        position,
        event_id,
        stream_id,
        stream_version,
        event_type,
        event_version,
        payload,
        metadata,
        created_at,
    ) = row;
    let malformed = |reason: String| Error::Malformed { position, reason };
    let event_id = uuid::Uuid::parse_str(&event_id)
        .map_err(|e| malformed(format!("event_id {event_id:?} is not a UUID: {e}")))?;
    let metadata = if metadata == "{}" {
        Metadata::default()
    } else {
        Metadata::from_json(&metadata)
            .map_err(|e| malformed(format!("metadata is not a JSON object: {e}")))?
    };
    let event_version = u16::try_from(event_version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            malformed(format!(
                "event_version {event_version} is not a positive version"
            ))
        })?;
    Ok(RecordedEvent {
        global_position: position,
        event_id,
        stream_id,
        stream_version,
        event_type,
        event_version,
        metadata,
        created_at: created_at.and_utc(),
        event: Payload(payload),
    })
}

pub(crate) const PG_COLUMNS: &str =
    "global_position, event_id::text AS event_id, stream_id, stream_version, event_type, \
     event_version, payload::text AS payload, metadata::text AS metadata, \
     (created_at AT TIME ZONE 'UTC') AS created_at";
pub(crate) const SQLITE_COLUMNS: &str =
    "global_position, event_id, stream_id, stream_version, event_type, \
     event_version, payload, metadata, created_at";

fn rows_into_events(rows: Vec<EventTuple>) -> Result<Vec<RecordedEvent>> {
    rows.into_iter().map(recorded).collect()
}

fn clamp(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Events of `stream` with `stream_version >= from_version`, at most `limit`.
pub(crate) fn read_stream(
    conn: &mut DbConnection,
    stream: &str,
    from_version: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    static PG: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {PG_COLUMNS} FROM es_events WHERE md5(stream_id) = md5(?) AND stream_id = ? \
             AND stream_version >= ? ORDER BY stream_version LIMIT ?"
        )
    });
    static SQLITE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {SQLITE_COLUMNS} FROM es_events WHERE stream_id = ? AND stream_version >= ? \
             ORDER BY stream_version LIMIT ?"
        )
    });
    let rows = match conn {
        DbConnection::Postgres(c) => Stmt::<Pg, EventSql>::new(&PG)
            .bind(Bind::Text(stream))
            .bind(Bind::Text(stream))
            .bind(Bind::BigInt(from_version))
            .bind(Bind::BigInt(clamp(limit)))
            .load::<EventTuple>(c)?,
        DbConnection::Sqlite(c) => Stmt::<Sqlite, EventSql>::new(&SQLITE)
            .bind(Bind::Text(stream))
            .bind(Bind::BigInt(from_version))
            .bind(Bind::BigInt(clamp(limit)))
            .load::<EventTuple>(c)?,
    };
    rows_into_events(rows)
}

/// Events with `global_position > after`, in global order, at most `limit`.
pub(crate) fn read_all(
    conn: &mut DbConnection,
    after: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    static PG: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {PG_COLUMNS} FROM es_events WHERE global_position > ? ORDER BY global_position LIMIT ?")
    });
    static SQLITE: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {SQLITE_COLUMNS} FROM es_events WHERE global_position > ? ORDER BY global_position LIMIT ?")
    });
    let rows = match conn {
        DbConnection::Postgres(c) => Stmt::<Pg, EventSql>::new(&PG)
            .bind(Bind::BigInt(after))
            .bind(Bind::BigInt(clamp(limit)))
            .load::<EventTuple>(c)?,
        DbConnection::Sqlite(c) => Stmt::<Sqlite, EventSql>::new(&SQLITE)
            .bind(Bind::BigInt(after))
            .bind(Bind::BigInt(clamp(limit)))
            .load::<EventTuple>(c)?,
    };
    rows_into_events(rows)
}

/// Events of the given types with `global_position > after`, in global order.
pub(crate) fn read_types(
    conn: &mut DbConnection,
    types: &[&str],
    after: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    if types.is_empty() {
        return Ok(Vec::new());
    }
    static PG: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {PG_COLUMNS} FROM es_events WHERE event_type = ANY(?) AND global_position > ? \
             ORDER BY global_position LIMIT ?"
        )
    });
    let rows = match conn {
        DbConnection::Postgres(c) => Stmt::<Pg, EventSql>::new(&PG)
            .bind(Bind::TextArray(types))
            .bind(Bind::BigInt(after))
            .bind(Bind::BigInt(clamp(limit)))
            .load::<EventTuple>(c)?,
        DbConnection::Sqlite(c) => {
            let sql = format!(
                "SELECT {SQLITE_COLUMNS} FROM es_events WHERE event_type IN ({}) AND global_position > ? \
                 ORDER BY global_position LIMIT ?",
                vec!["?"; types.len()].join(", ")
            );
            let mut q = Stmt::<Sqlite, EventSql>::with_capacity(&sql, types.len() + 2);
            for t in types {
                q.push(Bind::Text(t));
            }
            q.bind(Bind::BigInt(after))
                .bind(Bind::BigInt(clamp(limit)))
                .load::<EventTuple>(c)?
        }
    };
    rows_into_events(rows)
}

/// The stream's last version, 0 when it has no events.
pub(crate) fn stream_version(conn: &mut DbConnection, stream: &str) -> Result<i64> {
    let v = match conn {
        DbConnection::Postgres(c) => Stmt::<Pg>::new(
            "SELECT COALESCE(MAX(stream_version), 0) AS v FROM es_events WHERE md5(stream_id) = md5(?) AND stream_id = ?",
        )
        .bind(Bind::Text(stream))
        .bind(Bind::Text(stream))
        .get_result::<Version>(c)?,
        DbConnection::Sqlite(c) => Stmt::<Sqlite>::new(
            "SELECT COALESCE(MAX(stream_version), 0) AS v FROM es_events WHERE stream_id = ?",
        )
        .bind(Bind::Text(stream))
        .get_result::<Version>(c)?,
    };
    Ok(v.v)
}

/// The highest global position in the log, 0 when it is empty.
pub(crate) fn head(conn: &mut DbConnection) -> Result<i64> {
    let v = match conn {
        DbConnection::Postgres(c) => {
            diesel::sql_query("SELECT COALESCE(MAX(global_position), 0) AS v FROM es_events")
                .get_result::<Version>(c)?
        }
        DbConnection::Sqlite(c) => {
            diesel::sql_query("SELECT COALESCE(MAX(global_position), 0) AS v FROM es_events")
                .get_result::<Version>(c)?
        }
    };
    Ok(v.v)
}
