//! Reading the log: one stream, the whole log in global order, by event type.
//! Every read is a bounded page.

use crate::backend::rows::{EventSql, EventTuple, Number};
use crate::backend::{per_backend, Bind, DbConnection, Stmt};
use crate::error::{Error, Result};
use es_core::{Payload, RecordedEvent};

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
    let event_id = event_id.0.map_err(malformed)?;
    let metadata = metadata.0.map_err(malformed)?;
    let event_version = stored_event_version(position, event_version)?;
    Ok(RecordedEvent {
        global_position: position,
        event_id,
        stream_id,
        stream_version,
        event_type,
        event_version,
        metadata,
        created_at: created_at.0.and_utc(),
        event: Payload(payload),
    })
}

/// A stored `event_version` as the type version it must be (1 or more).
fn stored_event_version(position: i64, stored: i16) -> Result<u16> {
    u16::try_from(stored)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| Error::Malformed {
            position,
            reason: format!("event_version {stored} is not a positive version"),
        })
}

fn rows_into_events(rows: Vec<EventTuple>) -> Result<Vec<RecordedEvent>> {
    rows.into_iter().map(recorded).collect()
}

fn clamp(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// `columns` of a page of one stream's events from a version on: binds the
/// stream id, the first version and the page size.
fn stream_page(d: &dyn crate::backend::Dialect, columns: &str) -> String {
    format!(
        "SELECT {columns} FROM es_events WHERE {} AND stream_version >= ? ORDER BY stream_version {}",
        d.stream_is(),
        d.limit()
    )
}

/// Events of `stream` with `stream_version >= from_version`, at most `limit`.
pub(crate) fn read_stream(
    conn: &mut DbConnection,
    stream: &str,
    from_version: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let d = conn.dialect();
    let sql = per_backend!(d => stream_page(d, d.event_columns()));
    let mut q = Stmt::with_capacity(sql, 4).rows::<EventSql>();
    d.push_stream(&mut q, stream);
    let rows = q
        .bind(Bind::BigInt(from_version))
        .bind(Bind::BigInt(clamp(limit)))
        .load::<EventTuple>(conn)?;
    rows_into_events(rows)
}

/// What folding an event needs of its row: no event id, metadata or
/// timestamp to read and parse (an aggregate's load reads only this).
pub(crate) struct FoldRow {
    pub global_position: i64,
    pub stream_version: i64,
    pub event_type: String,
    pub event_version: u16,
    pub payload: String,
}

impl FoldRow {
    /// The decode error of this row, with where it is in the log.
    pub(crate) fn decode_error(&self, stream: &str, source: es_core::DecodeError) -> Error {
        Error::Decode {
            position: self.global_position,
            stream: stream.to_owned(),
            event_type: self.event_type.clone(),
            event_version: self.event_version,
            source,
        }
    }
}

/// Like [`read_stream`], reading only what a fold needs.
pub(crate) fn read_stream_for_fold(
    conn: &mut DbConnection,
    stream: &str,
    from_version: i64,
    limit: usize,
) -> Result<Vec<FoldRow>> {
    type FoldSql = (
        diesel::sql_types::BigInt,
        diesel::sql_types::BigInt,
        diesel::sql_types::Text,
        diesel::sql_types::SmallInt,
        diesel::sql_types::Text,
    );
    /// The one text of this statement on each backend.
    struct FoldPage;
    let d = conn.dialect();
    let sql = per_backend!(d => stream_page(d, d.fold_columns()));
    let mut q = Stmt::with_capacity(sql, 4)
        .named::<FoldPage>()
        .rows::<FoldSql>();
    d.push_stream(&mut q, stream);
    let rows = q
        .bind(Bind::BigInt(from_version))
        .bind(Bind::BigInt(clamp(limit)))
        .load::<(i64, i64, String, i16, String)>(conn)?;
    rows.into_iter()
        .map(
            |(global_position, stream_version, event_type, event_version, payload)| {
                Ok(FoldRow {
                    global_position,
                    stream_version,
                    event_type,
                    event_version: stored_event_version(global_position, event_version)?,
                    payload,
                })
            },
        )
        .collect()
}

/// Events with `global_position > after`, in global order, at most `limit`.
pub(crate) fn read_all(
    conn: &mut DbConnection,
    after: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let d = conn.dialect();
    let sql = per_backend!(d => {
        format!(
            "SELECT {} FROM es_events WHERE global_position > ? ORDER BY global_position {}",
            d.event_columns(),
            d.limit()
        )
    });
    let rows = Stmt::new(sql)
        .rows::<EventSql>()
        .bind(Bind::BigInt(after))
        .bind(Bind::BigInt(clamp(limit)))
        .load::<EventTuple>(conn)?;
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
    let d = conn.dialect();
    let (is, binds) = d.type_is_any_of(types);
    let sql = format!(
        "SELECT {} FROM {} WHERE {is} AND global_position > ? \
         ORDER BY global_position {}",
        d.event_columns(),
        d.events_in_position_order(types.len()),
        d.limit()
    );
    let mut q = Stmt::with_capacity(sql, binds.len() + 2).rows::<EventSql>();
    binds.into_iter().for_each(|b| q.push(b));
    let rows = q
        .bind(Bind::BigInt(after))
        .bind(Bind::BigInt(clamp(limit)))
        .load::<EventTuple>(conn)?;
    rows_into_events(rows)
}

/// The stream's last version, 0 when it has no events.
pub(crate) fn stream_version(conn: &mut DbConnection, stream: &str) -> Result<i64> {
    let d = conn.dialect();
    let sql = per_backend!(d => {
        // Not MAX(): MySQL would read every version of the stream to check
        // the stream id; this reads the index from its end.
        format!(
            "SELECT COALESCE((SELECT stream_version FROM es_events WHERE {} \
             ORDER BY stream_version DESC LIMIT 1), 0) AS n",
            d.stream_is()
        )
    });
    let mut q = Stmt::new(sql);
    d.push_stream(&mut q, stream);
    Ok(q.get_result::<Number>(conn)?.n)
}

/// The highest global position in the log, 0 when it is empty.
pub(crate) fn head(conn: &mut DbConnection) -> Result<i64> {
    Ok(
        Stmt::new("SELECT COALESCE(MAX(global_position), 0) AS n FROM es_events")
            .get_result::<Number>(conn)?
            .n,
    )
}
