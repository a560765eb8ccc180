//! Appending to the log: optimistic concurrency per stream, all or nothing.

use crate::connection::DbConnection;
use crate::error::{check_stream_id, Error, Result};
use chrono::{NaiveDateTime, Utc};
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::BoxedSqlQuery;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, SmallInt, Text, Timestamp};
use diesel::sqlite::{Sqlite, SqliteConnection};
use es_core::{Event, ExpectedVersion, Metadata, NewEvent, Payload, RecordedEvent};

/// Rows per INSERT statement: far below every backend's bind-parameter limit.
const CHUNK: usize = 500;

/// Events to append to one stream, with what the writer expects of it.
#[derive(Clone, Debug)]
pub struct StreamWrite {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

impl StreamWrite {
    pub fn new(stream_id: impl Into<String>, expected: ExpectedVersion) -> Self {
        StreamWrite {
            stream_id: stream_id.into(),
            expected,
            events: Vec::new(),
        }
    }

    /// Adds an event (encoded now) with no metadata.
    pub fn push<E: Event>(&mut self, event: &E) -> Result<&mut Self> {
        self.events.push(NewEvent::new(event)?);
        Ok(self)
    }

    /// Adds an event (encoded now) with metadata.
    pub fn push_with<E: Event>(&mut self, event: &E, metadata: Metadata) -> Result<&mut Self> {
        self.events
            .push(NewEvent::new(event)?.with_metadata(metadata));
        Ok(self)
    }

    /// Adds an already encoded event.
    pub fn push_new(&mut self, event: NewEvent) -> &mut Self {
        self.events.push(event);
        self
    }
}

/// The actual version of a stream is not known until the failed transaction
/// has been rolled back; the store fills it in then.
pub(crate) const ACTUAL_UNKNOWN: i64 = i64::MIN;

#[derive(QueryableByName)]
struct Appended {
    #[diesel(sql_type = BigInt)]
    global_position: i64,
    #[diesel(sql_type = BigInt)]
    stream_version: i64,
    #[diesel(sql_type = Timestamp)]
    created_at: NaiveDateTime,
}

#[derive(QueryableByName)]
pub(crate) struct Version {
    #[diesel(sql_type = BigInt)]
    pub v: i64,
}

/// Appends `writes` on `conn`, which must be inside a write transaction.
/// Returns the recorded events in append order.
pub(crate) fn append_in(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
) -> Result<Vec<RecordedEvent>> {
    for w in writes {
        check_stream_id(&w.stream_id)?;
    }
    let total = writes.iter().map(|w| w.events.len()).sum();
    let mut out = Vec::with_capacity(total);
    for w in writes {
        let mut expected = w.expected;
        for chunk in w.events.chunks(CHUNK) {
            let rows = match conn {
                DbConnection::Postgres(c) => insert_pg(c, &w.stream_id, expected, chunk)?,
                DbConnection::Sqlite(c) => insert_sqlite(c, &w.stream_id, expected, chunk)?,
            };
            if rows.len() != chunk.len() {
                let actual = crate::read::stream_version(conn, &w.stream_id)?;
                return Err(Error::Conflict {
                    stream: w.stream_id.clone(),
                    expected: w.expected,
                    actual,
                });
            }
            let last = rows.iter().map(|r| r.stream_version).max().unwrap_or(0);
            expected = ExpectedVersion::Exact(last);
            out.extend(chunk.iter().zip(rows).map(|(ev, row)| RecordedEvent {
                global_position: row.global_position,
                event_id: ev.event_id,
                stream_id: w.stream_id.clone(),
                stream_version: row.stream_version,
                event_type: ev.event_type.to_owned(),
                event_version: ev.event_version,
                metadata: ev.metadata.clone(),
                created_at: row.created_at.and_utc(),
                event: Payload(ev.payload.clone()),
            }));
        }
    }
    Ok(out)
}

fn map_insert_error(
    err: DieselError,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Error {
    if let DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) = &err {
        let on_event_id = info
            .constraint_name()
            .is_some_and(|c| c.contains("event_id"))
            || info.message().contains("event_id");
        if on_event_id {
            let event_id = chunk.first().map(|e| e.event_id).unwrap_or_default();
            return Error::DuplicateEventId { event_id };
        }
        return Error::Conflict {
            stream: stream.to_owned(),
            expected,
            actual: ACTUAL_UNKNOWN,
        };
    }
    Error::Database(err)
}

fn sorted(mut rows: Vec<Appended>) -> Vec<Appended> {
    rows.sort_by_key(|r| r.stream_version);
    rows
}

/// One statement: reads the stream's version, checks the expectation and
/// inserts the chunk, so an append costs one round trip. A concurrent writer
/// of the same version loses on the unique index.
fn insert_pg(
    conn: &mut PgConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    let mut sql = String::with_capacity(512 + chunk.len() * 64);
    sql.push_str(
        "WITH cur AS (SELECT COALESCE(MAX(stream_version), 0) AS v FROM es_events \
         WHERE md5(stream_id) = md5($1) AND stream_id = $1) \
         INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata) \
         SELECT e.event_id, $1, cur.v + e.k, e.event_type, e.event_version, e.payload, e.metadata \
         FROM cur, (VALUES ",
    );
    let mut n = 2;
    for (k, _) in chunk.iter().enumerate() {
        if k > 0 {
            sql.push_str(", ");
        }
        use std::fmt::Write;
        let _ = write!(
            sql,
            "(${}::uuid, {}::bigint, ${}::text, ${}::smallint, ${}::jsonb, ${}::jsonb)",
            n,
            k + 1,
            n + 1,
            n + 2,
            n + 3,
            n + 4
        );
        n += 5;
    }
    sql.push_str(") AS e(event_id, k, event_type, event_version, payload, metadata)");
    match expected {
        ExpectedVersion::Any => {}
        ExpectedVersion::NoStream => sql.push_str(" WHERE cur.v = 0"),
        ExpectedVersion::StreamExists => sql.push_str(" WHERE cur.v > 0"),
        ExpectedVersion::Exact(_) => {
            use std::fmt::Write;
            let _ = write!(sql, " WHERE cur.v = ${n}");
        }
    }
    sql.push_str(
        " ORDER BY e.k RETURNING global_position, stream_version, (created_at AT TIME ZONE 'UTC') AS created_at",
    );
    let mut q: BoxedSqlQuery<'_, Pg, _> =
        diesel::sql_query(sql).into_boxed().bind::<Text, _>(stream);
    for ev in chunk {
        q = q
            .bind::<diesel::sql_types::Uuid, _>(ev.event_id)
            .bind::<Text, _>(ev.event_type)
            .bind::<SmallInt, _>(ev.event_version as i16)
            .bind::<Text, _>(ev.payload.as_str())
            .bind::<Text, _>(metadata_json(&ev.metadata));
    }
    if let ExpectedVersion::Exact(v) = expected {
        q = q.bind::<BigInt, _>(v);
    }
    q.load::<Appended>(conn)
        .map(sorted)
        .map_err(|e| map_insert_error(e, stream, expected, chunk))
}

/// SQLite holds the write lock for the whole transaction (BEGIN IMMEDIATE),
/// so reading the version and then inserting cannot race.
fn insert_sqlite(
    conn: &mut SqliteConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    let current = diesel::sql_query(
        "SELECT COALESCE(MAX(stream_version), 0) AS v FROM es_events WHERE stream_id = ?",
    )
    .bind::<Text, _>(stream)
    .get_result::<Version>(conn)?
    .v;
    if !expected.is_satisfied_by(current) {
        return Ok(Vec::new());
    }
    let mut sql = String::with_capacity(200 + chunk.len() * 32);
    sql.push_str(
        "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata, created_at) VALUES ",
    );
    for k in 0..chunk.len() {
        sql.push_str(if k == 0 {
            "(?, ?, ?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?, ?, ?)"
        });
    }
    sql.push_str(" RETURNING global_position, stream_version, created_at");
    let now = Utc::now().naive_utc();
    let mut q: BoxedSqlQuery<'_, Sqlite, _> = diesel::sql_query(sql).into_boxed();
    for (k, ev) in chunk.iter().enumerate() {
        q = q
            .bind::<Text, _>(ev.event_id.hyphenated().to_string())
            .bind::<Text, _>(stream)
            .bind::<BigInt, _>(current + k as i64 + 1)
            .bind::<Text, _>(ev.event_type)
            .bind::<SmallInt, _>(ev.event_version as i16)
            .bind::<Text, _>(ev.payload.as_str())
            .bind::<Text, _>(metadata_json(&ev.metadata))
            .bind::<Timestamp, _>(now);
    }
    q.load::<Appended>(conn)
        .map(sorted)
        .map_err(|e| map_insert_error(e, stream, expected, chunk))
}

fn metadata_json(m: &Metadata) -> String {
    if m.is_empty() {
        "{}".to_owned()
    } else {
        m.to_json()
    }
}
