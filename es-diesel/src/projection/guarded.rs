//! Appends whose inline projectors all write rows, in one statement that
//! commits by itself (PostgreSQL).
//!
//! The projectors' rows are read without locking them, each with its row
//! version; the projectors run on them before anything is written; then one
//! statement inserts the events and writes each row only if it is still at
//! the version it was read at (or, for a new row, still missing). When a row
//! moved on, or anything else fails, the statement writes nothing and the
//! append runs as before: in a transaction that locks each row as it reads
//! it. So the rows end as the transaction would have left them, and the
//! errors (a projector's, with the event's position) are the transaction's.
//!
//! An append then costs the reads of its rows and one statement, where the
//! transaction costs BEGIN, the insert, a locking read and a write per row,
//! and COMMIT.

use super::{registry, HandlerKind};
use crate::append::StreamWrite;
use crate::backend::{in_transaction, DbConnection};
use crate::error::Result;
use crate::read_model::{GuardedRow, RowBatch};
use es_core::{ExpectedVersion, Payload, RecordedEvent};

/// Projector runs, and so rows, of one statement at most: its check grows
/// with its rows (a subquery each).
const MAX_ROWS: usize = 64;

/// Appends `write` with its row-level projectors in one statement, or
/// returns `None` having written nothing: the backend has no such
/// statement, the caller holds a transaction, a projector reads the
/// envelope or writes SQL, a projector fails, or a row moved on since it
/// was read. A stream not at the expected version is an
/// [`Error::Conflict`](crate::Error::Conflict), nothing written.
pub(crate) fn append(
    conn: &mut DbConnection,
    write: &StreamWrite,
) -> Result<Option<Vec<RecordedEvent>>> {
    if !eligible(conn, write)? {
        return Ok(None);
    }
    crate::append::traced_append(std::slice::from_ref(write), || guarded(conn, write))
}

/// Whether `write` can go in one statement with its rows: the backend
/// has the statement, no transaction of the caller's is open, the
/// expectation gives the events' versions, and every inline projector of
/// its events takes a row and the event alone (one that could see more of
/// the envelope, its position or its time, runs after the insert).
fn eligible(conn: &mut DbConnection, write: &StreamWrite) -> Result<bool> {
    if !conn.dialect().guards_rows()
        || write.events.is_empty()
        || !matches!(
            write.expected,
            ExpectedVersion::Exact(_) | ExpectedVersion::NoStream
        )
        || in_transaction(conn)?
    {
        return Ok(false);
    }
    let reg = registry()?;
    Ok(write.events.iter().all(|ev| {
        reg.inline_handlers(ev.event_type)
            .iter()
            .all(|(p, h)| !p.reads_envelope && matches!(h.kind, HandlerKind::Row { .. }))
    }))
}

fn guarded(conn: &mut DbConnection, write: &StreamWrite) -> Result<Option<Vec<RecordedEvent>>> {
    let dialect = conn.dialect();
    let base = match write.expected {
        ExpectedVersion::Exact(v) => v,
        _ => 0,
    };
    if crate::error::check_stream_id(&write.stream_id).is_err()
        || write.events.iter().any(|e| e.check().is_err())
    {
        return Ok(None);
    }
    let reg = registry()?;
    let now = chrono::Utc::now();
    let mut events: Vec<RecordedEvent> = write
        .events
        .iter()
        .zip(1..)
        .map(|(ev, k)| RecordedEvent {
            global_position: 0,
            event_id: ev.event_id,
            stream_id: write.stream_id.clone(),
            stream_version: base + k,
            event_type: ev.event_type.to_owned(),
            event_version: ev.event_version,
            metadata: ev.metadata.clone(),
            created_at: now,
            event: Payload(ev.payload.clone()),
        })
        .collect();
    // The rows each read model's projectors want, in the order they are
    // first wanted.
    let mut batches: Vec<(&'static str, Box<dyn RowBatch>)> = Vec::new();
    let mut folds = Vec::new();
    for ev in &events {
        for (p, h) in reg.inline_handlers(&ev.event_type) {
            // `eligible` saw every handler row-level, without the envelope.
            let HandlerKind::Row { want, fold, .. } = &h.kind else {
                return Ok(None);
            };
            let at = match batches.iter().position(|(name, _)| *name == p.read_model) {
                Some(at) => at,
                None => {
                    let Some(model) = reg.read_model(p.read_model) else {
                        return Ok(None);
                    };
                    batches.push((p.read_model, (model.new_rows)()));
                    batches.len() - 1
                }
            };
            if want(ev, &mut *batches[at].1).is_err() {
                return Ok(None);
            }
            folds.push((ev, p.name, *fold, at));
            // A bulk append goes in a transaction, before decoding the rest
            // of its events or reading its rows.
            if folds.len() > MAX_ROWS {
                return Ok(None);
            }
        }
    }
    if batches.is_empty() {
        return Ok(None);
    }
    for (_, batch) in &mut batches {
        match batch.load_versioned(conn) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            // A row that does not read back, a table that is missing: the
            // transaction reports it as its projector's error, at its event.
            Err(e)
                if crate::backend::refused(&e)
                    || matches!(e, diesel::result::Error::DeserializationError(_)) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        }
    }
    for (ev, projector, fold, at) in folds {
        // As inside the transaction, but before the insert: no position yet.
        let _span = tracing::debug_span!(
            "es.projector",
            projector,
            event_type = ev.event_type.as_str(),
            stream = ev.stream_id.as_str(),
            position = tracing::field::Empty,
        )
        .entered();
        if fold(ev, &mut *batches[at].1).is_err() {
            return Ok(None);
        }
    }
    let mut rows: Vec<GuardedRow> = Vec::new();
    for (_, batch) in &batches {
        if !batch.guarded_writes(&mut rows) {
            return Ok(None);
        }
    }
    // One order of rows for every such statement: two of them take their
    // rows' locks in one order.
    rows.sort_by(|a, b| a.order.cmp(&b.order));
    let Some(appended) = dialect.insert_events_guarded(
        conn,
        &write.stream_id,
        write.expected,
        &write.events,
        &rows,
    )?
    else {
        return Ok(None);
    };
    if appended.is_empty() {
        // Nothing written: the stream was not at the expected version when
        // the statement looked, and if it is now, the append in a
        // transaction looks again.
        let actual = crate::read::stream_version(conn, &write.stream_id)?;
        if write.expected.is_satisfied_by(actual) {
            return Ok(None);
        }
        return Err(crate::Error::Conflict {
            stream: write.stream_id.clone(),
            expected: write.expected,
            actual,
        });
    }
    // The statement inserts every event or none.
    debug_assert_eq!(appended.len(), events.len());
    tracing::debug!(rows = rows.len(), "appended with its rows in one statement");
    for (ev, row) in events.iter_mut().zip(appended) {
        ev.global_position = row.global_position;
        ev.stream_version = row.stream_version;
        ev.created_at = row.created_at.0.and_utc();
    }
    Ok(Some(events))
}
