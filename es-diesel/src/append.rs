//! Appending to the log: optimistic concurrency per stream, all or nothing.

use crate::connection::{write_transaction, DbConnection};
use crate::error::{check_stream_id, Error, Result};
use crate::stmt::{Bind, Stmt};
use chrono::{NaiveDateTime, Utc};
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Text, Timestamp};
use diesel::sqlite::{Sqlite, SqliteConnection};
use es_core::{Event, ExpectedVersion, Metadata, NewEvent, Payload, RecordedEvent};

/// Rows per INSERT statement: far below every backend's bind-parameter limit.
pub(crate) const CHUNK: usize = 500;

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

/// Appends `writes` inside the caller's transaction on `conn` (open it with
/// [`write_transaction`](crate::write_transaction)), then runs the inline
/// projectors on the recorded events in log order, so that the events,
/// the read models and any other writes of the caller commit or roll back
/// together. Returns the recorded events in the order of `writes`.
///
/// Streams are written in the order of their ids, whatever the order of
/// `writes`, so that two transactions writing the same streams never wait
/// for each other in a cycle. On PostgreSQL the append runs in a savepoint:
/// a lost race with [`ExpectedVersion::Any`] or
/// [`ExpectedVersion::StreamExists`] is retried, and after an error the
/// caller's transaction is still usable (roll it back or go on).
pub fn append_in(conn: &mut DbConnection, writes: &[StreamWrite]) -> Result<Vec<RecordedEvent>> {
    if conn.backend() == crate::Backend::Sqlite {
        return append_events(conn, writes, true);
    }
    let mut attempt = 0;
    loop {
        match write_transaction(conn, |c| append_events(c, writes, true)) {
            Err(e) if attempt < RACE_RETRIES && retry_after(&e, writes) => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "append lost a race; retrying");
            }
            Err(e) => return Err(known_actual(conn, e)?),
            ok => return ok,
        }
    }
}

/// How many times an append is retried after losing a race it may simply
/// run again (see [`retry_after`]).
pub(crate) const RACE_RETRIES: usize = 16;

/// Whether an append that failed with `err` (and was rolled back) can just
/// be run again: a race lost by a write that expects [`ExpectedVersion::Any`]
/// or [`ExpectedVersion::StreamExists`] (the stream exists, since another
/// writer just wrote the version it wanted), or a transaction the database
/// aborted to break a deadlock or a serialization failure.
pub(crate) fn retry_after(err: &Error, writes: &[StreamWrite]) -> bool {
    match err {
        Error::Conflict { stream, actual, .. } if *actual == ACTUAL_UNKNOWN => {
            writes.iter().any(|w| {
                &w.stream_id == stream
                    && matches!(
                        w.expected,
                        ExpectedVersion::Any | ExpectedVersion::StreamExists
                    )
            })
        }
        other => other.is_transient(),
    }
}

/// Fills in the actual version of a conflict that happened in a statement
/// (the transaction that failed must be rolled back first).
pub(crate) fn known_actual(conn: &mut DbConnection, err: Error) -> Result<Error> {
    match err {
        Error::Conflict {
            stream,
            expected,
            actual,
        } if actual == ACTUAL_UNKNOWN => {
            let actual = crate::read::stream_version(conn, &stream)?;
            Ok(Error::Conflict {
                stream,
                expected,
                actual,
            })
        }
        other => Ok(other),
    }
}

/// [`append_in`], running the inline projectors only if `project`.
pub(crate) fn append_events(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    project: bool,
) -> Result<Vec<RecordedEvent>> {
    for w in writes {
        check_stream_id(&w.stream_id)?;
        for ev in &w.events {
            ev.check()?;
        }
    }
    // An ambiguous registry refuses before anything is inserted.
    crate::projection::registry()?;
    // One canonical order of streams for every writer: no lock cycles.
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by(|&a, &b| writes[a].stream_id.cmp(&writes[b].stream_id));
    let reordered = order.iter().enumerate().any(|(k, &i)| k != i);
    if let DbConnection::Postgres(c) = conn {
        lock_any_streams_pg(c, writes)?;
    }
    let total = writes.iter().map(|w| w.events.len()).sum();
    // In log order: the order of `order`.
    let mut out = Vec::with_capacity(total);
    for &i in &order {
        let w = &writes[i];
        if w.events.is_empty() {
            if w.expected != ExpectedVersion::Any {
                let actual = crate::read::stream_version(conn, &w.stream_id)?;
                if !w.expected.is_satisfied_by(actual) {
                    return Err(Error::Conflict {
                        stream: w.stream_id.clone(),
                        expected: w.expected,
                        actual,
                    });
                }
            }
            continue;
        }
        let mut expected = w.expected;
        for chunk in w.events.chunks(CHUNK) {
            let mut tries = 0;
            let rows = loop {
                let rows = match conn {
                    DbConnection::Postgres(c) => insert_pg(c, &w.stream_id, expected, chunk)?,
                    DbConnection::Sqlite(c) => insert_sqlite(c, &w.stream_id, expected, chunk)?,
                };
                if rows.len() == chunk.len() {
                    break rows;
                }
                let actual = crate::read::stream_version(conn, &w.stream_id)?;
                // The statement's snapshot predates a commit that satisfies
                // the expectation (PostgreSQL): nothing was written, so the
                // statement can run again on a newer snapshot.
                if expected.is_satisfied_by(actual) && tries < RACE_RETRIES {
                    tries += 1;
                    continue;
                }
                return Err(Error::Conflict {
                    stream: w.stream_id.clone(),
                    expected: w.expected,
                    actual,
                });
            };
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
    if project {
        crate::projection::apply_inline(conn, &out)?;
    }
    if !reordered {
        return Ok(out);
    }
    // Back to the caller's order of writes.
    let mut per_write: Vec<Vec<RecordedEvent>> = writes
        .iter()
        .map(|w| Vec::with_capacity(w.events.len()))
        .collect();
    let mut events = out.into_iter();
    for &i in &order {
        per_write[i].extend(events.by_ref().take(writes[i].events.len()));
    }
    Ok(per_write.into_iter().flatten().collect())
}

fn map_insert_error(
    err: DieselError,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Error {
    // On SQLite the insert triggers of migration 7 refuse duplicates before
    // the unique constraints see them.
    let duplicate = |kind: &DatabaseErrorKind, message: &str| {
        matches!(kind, DatabaseErrorKind::UniqueViolation)
            || message.starts_with("es_events is append-only") && message.contains("already exist")
    };
    if let DieselError::DatabaseError(kind, info) = &err {
        if !duplicate(kind, info.message()) {
            return Error::from(err);
        }
        let on_event_id = info
            .constraint_name()
            .is_some_and(|c| c.contains("event_id"))
            || info.message().contains("event_id");
        if on_event_id {
            let event_id = info
                .details()
                .and_then(|d| {
                    chunk
                        .iter()
                        .map(|e| e.event_id)
                        .find(|id| d.contains(&id.to_string()))
                })
                .or_else(|| repeated_id(chunk))
                .unwrap_or_default();
            return Error::DuplicateEventId { event_id };
        }
        return Error::Conflict {
            stream: stream.to_owned(),
            expected,
            actual: ACTUAL_UNKNOWN,
        };
    }
    Error::from(err)
}

fn repeated_id(chunk: &[NewEvent]) -> Option<uuid::Uuid> {
    let mut seen = std::collections::HashSet::new();
    chunk
        .iter()
        .map(|e| e.event_id)
        .find(|id| !seen.insert(*id))
}

/// SQLite does not say which key was duplicated; its transaction is still
/// usable after a failed statement, so ask.
fn existing_id_sqlite(
    conn: &mut SqliteConnection,
    chunk: &[NewEvent],
) -> QueryResult<Option<uuid::Uuid>> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Text)]
        event_id: String,
    }
    for ev in chunk {
        let found = diesel::sql_query("SELECT event_id FROM es_events WHERE event_id = ?")
            .bind::<Text, _>(ev.event_id.hyphenated().to_string())
            .get_results::<Found>(conn)?;
        if let Some(f) = found.first() {
            return Ok(uuid::Uuid::parse_str(&f.event_id).ok());
        }
    }
    Ok(None)
}

fn sorted(mut rows: Vec<Appended>) -> Vec<Appended> {
    rows.sort_by_key(|r| r.stream_version);
    rows
}

/// Advisory-lock namespace of per-stream append locks ("ES" + 1).
const STREAM_LOCK_CLASS: i32 = 0x4553_0001;

/// Appends with `ExpectedVersion::Any` read the stream's version and write
/// the next one; serializing them per stream keeps them from colliding with
/// each other. The locks must be held before the insert statement takes its
/// snapshot, hence a statement of their own; they are keyed by schema and
/// stream and taken in key order, so two batches never wait for each other
/// in a cycle.
fn lock_any_streams_pg(conn: &mut PgConnection, writes: &[StreamWrite]) -> QueryResult<()> {
    let streams: Vec<&str> = writes
        .iter()
        .filter(|w| w.expected == ExpectedVersion::Any && !w.events.is_empty())
        .map(|w| w.stream_id.as_str())
        .collect();
    if streams.is_empty() {
        return Ok(());
    }
    Stmt::<Pg>::new(
        "SELECT COUNT(pg_advisory_xact_lock(?, k)) FROM \
         (SELECT DISTINCT hashtext(current_schema() || '/' || s) AS k FROM unnest(?::text[]) AS s ORDER BY k) AS keys",
    )
    .bind(Bind::Int(STREAM_LOCK_CLASS))
    .bind(Bind::TextArray(&streams))
    .execute(conn)
    .map(|_| ())
}

/// Statement shapes (events per chunk) that are prepared once and cached
/// per connection; others are planned per call, which keeps the cache at a
/// few dozen statements however the chunk sizes vary.
pub(crate) fn cached_shape(events: usize) -> bool {
    events <= 16 || events == CHUNK
}

/// One statement: draws the append's order key, reads the stream's last
/// version and key, checks the expectation and inserts the chunk, so an
/// append costs one round trip. A concurrent writer of the same version
/// loses on the unique index.
///
/// The order key (see [`crate::follow`]) is the larger of a key drawn now
/// and the key of the stream's previous event, so that followers, which
/// read in key order, see every stream's versions in increasing order.
fn insert_pg(
    conn: &mut PgConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    let mut sql = String::with_capacity(900 + chunk.len() * 70);
    sql.push_str(
        "WITH k AS MATERIALIZED (SELECT es_append_key() AS k), \
         last AS (SELECT stream_version, order_key FROM es_events \
         WHERE md5(stream_id) = md5(?) AND stream_id = ? ORDER BY stream_version DESC LIMIT 1), \
         cur AS (SELECT COALESCE((SELECT stream_version FROM last), 0) AS v, \
         GREATEST((SELECT k FROM k), (SELECT order_key FROM last)) AS key) \
         INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata, order_key) \
         SELECT e.event_id, ?, cur.v + e.k, e.event_type, e.event_version, e.payload, e.metadata, cur.key \
         FROM cur, (VALUES ",
    );
    for k in 1..=chunk.len() {
        if k > 1 {
            sql.push_str(", ");
        }
        use std::fmt::Write;
        let _ = write!(
            sql,
            "(?::uuid, {k}::bigint, ?::text, ?::smallint, ?::jsonb, ?::jsonb)"
        );
    }
    sql.push_str(") AS e(event_id, k, event_type, event_version, payload, metadata)");
    match expected {
        ExpectedVersion::Any => {}
        ExpectedVersion::NoStream => sql.push_str(" WHERE cur.v = 0"),
        ExpectedVersion::StreamExists => sql.push_str(" WHERE cur.v > 0"),
        ExpectedVersion::Exact(_) => sql.push_str(" WHERE cur.v = ?"),
    }
    sql.push_str(
        " ORDER BY e.k RETURNING global_position, stream_version, (created_at AT TIME ZONE 'UTC') AS created_at",
    );
    let mut q = Stmt::<Pg>::with_capacity(&sql, 4 + chunk.len() * 5);
    if !cached_shape(chunk.len()) {
        q.dont_cache();
    }
    q.push(Bind::Text(stream));
    q.push(Bind::Text(stream));
    q.push(Bind::Text(stream));
    for ev in chunk {
        q.push(Bind::Uuid(ev.event_id));
        q.push(Bind::Text(ev.event_type));
        q.push(Bind::SmallInt(ev.event_version as i16));
        q.push(Bind::Text(&ev.payload));
        q.push(metadata_bind(&ev.metadata));
    }
    if let ExpectedVersion::Exact(v) = expected {
        q.push(Bind::BigInt(v));
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
    let current = Stmt::<Sqlite>::new(
        "SELECT COALESCE(MAX(stream_version), 0) AS v FROM es_events WHERE stream_id = ?",
    )
    .bind(Bind::Text(stream))
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
    let mut q = Stmt::<Sqlite>::with_capacity(&sql, chunk.len() * 8);
    if !cached_shape(chunk.len()) {
        q.dont_cache();
    }
    for (k, ev) in chunk.iter().enumerate() {
        q.push(Bind::Owned(ev.event_id.hyphenated().to_string()));
        q.push(Bind::Text(stream));
        q.push(Bind::BigInt(current + k as i64 + 1));
        q.push(Bind::Text(ev.event_type));
        q.push(Bind::SmallInt(ev.event_version as i16));
        q.push(Bind::Text(&ev.payload));
        q.push(metadata_bind(&ev.metadata));
        q.push(Bind::Timestamp(now));
    }
    match q.load::<Appended>(conn) {
        Ok(rows) => Ok(sorted(rows)),
        Err(e) => match map_insert_error(e, stream, expected, chunk) {
            Error::DuplicateEventId { event_id } if event_id.is_nil() => {
                Err(Error::DuplicateEventId {
                    event_id: existing_id_sqlite(conn, chunk)?.unwrap_or_default(),
                })
            }
            // The transaction is still usable: say what the stream is at.
            Error::Conflict {
                stream, expected, ..
            } => {
                let actual = Stmt::<Sqlite>::new(
                    "SELECT COALESCE(MAX(stream_version), 0) AS v FROM es_events WHERE stream_id = ?",
                )
                .bind(Bind::Text(&stream))
                .get_result::<Version>(conn)?
                .v;
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

fn metadata_bind(m: &Metadata) -> Bind<'static> {
    if m.is_empty() {
        Bind::Text("{}")
    } else {
        Bind::Owned(m.to_json())
    }
}
