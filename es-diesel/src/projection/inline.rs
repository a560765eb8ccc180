//! Applying projectors to events as they are appended (inside the append
//! transaction), or to one read model at a time for a runner.

use super::{registry, Failure, HandlerKind, RowProjection, SqlProjection};
use crate::append::{insert_writes, retrying, StreamWrite};
use crate::backend::{in_transaction, write_transaction, DbConnection};
use crate::error::Result;
use crate::query::AppendCondition;
use crate::read_model::ReadModel;
use diesel::Connection;
use es_core::{EventType, Recorded, RecordedEvent};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Appends `writes` inside the caller's transaction on `conn` (open it with
/// [`write_transaction`](crate::write_transaction) or Diesel's
/// `Connection::transaction`; a transaction begun by sending `BEGIN` as SQL
/// is not seen, and this call would commit it with its own), then runs the inline
/// projectors on the recorded events in log order, so that the events,
/// the read models and any other writes of the caller commit or roll back
/// together. Returns the recorded events in the order of `writes`.
///
/// Streams are written in the order of their ids, whatever the order of
/// `writes`, so that two appends never wait for each other in a cycle. A
/// transaction that appends in several calls holds the locks of its
/// earlier calls while a later one takes its own, so it can deadlock with
/// another writer (the server then fails one of them). On PostgreSQL the append runs in a
/// savepoint: a lost race with [`ExpectedVersion::Any`](crate::ExpectedVersion::Any) or
/// [`ExpectedVersion::StreamExists`](crate::ExpectedVersion::StreamExists) is retried, and after an error the
/// caller's transaction is still usable (roll it back or go on).
///
/// A deadlock or another [transient](crate::Error::is_transient) error is
/// returned without retrying: the caller runs its transaction again from
/// the start (on MySQL the server has already rolled it back whole; on
/// PostgreSQL it still holds the locks of its earlier statements, which a
/// retry of the append alone would wait in the same cycle with).
pub fn append_in(conn: &mut DbConnection, writes: &[StreamWrite]) -> Result<Vec<RecordedEvent>> {
    // Inside a transaction on SQLite no other writer can come in between.
    if conn.dialect().serial_writers() && in_transaction(conn)? {
        return append_events(conn, writes, true);
    }
    retrying(conn, writes, |conn| {
        write_transaction(conn, |c| append_events(c, writes, true))
    })
}

/// [`append_in`], running the inline projectors only if `project`.
pub(crate) fn append_events(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    project: bool,
) -> Result<Vec<RecordedEvent>> {
    append_events_if(conn, writes, None, project)
}

/// [`append_events`] on the condition that the events matching its query
/// are still the ones it saw.
pub(crate) fn append_events_if(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    condition: Option<&AppendCondition>,
    project: bool,
) -> Result<Vec<RecordedEvent>> {
    // An append that commits by itself waits for its turn to write here
    // (one that writes nothing needs none).
    let _turn = if writes.iter().any(|w| !w.events.is_empty()) {
        crate::backend::statement_turn(conn)
    } else {
        None
    };
    // An ambiguous registry refuses before anything is inserted.
    let check = || registry().map(|_| ());
    insert_writes(
        conn,
        writes,
        condition,
        check,
        project.then_some(&apply_inline),
    )
}

/// Runs every inline projector on each of `events`, in append order, on
/// `conn` (inside the append transaction).
pub(crate) fn apply_inline(conn: &mut DbConnection, events: &[RecordedEvent]) -> Result<()> {
    let reg = registry()?;
    if reg.inline_by_event.is_empty() {
        return Ok(());
    }
    for ev in events {
        for (p, h) in reg.inline_handlers(&ev.event_type) {
            let run = match &h.kind {
                HandlerKind::Sql { apply } => apply,
                HandlerKind::Row { inline, .. } => inline,
            };
            let _span = projector_span(p.name, ev).entered();
            run(ev, conn).map_err(|f| f.into_error(p.name, ev))?;
        }
    }
    Ok(())
}

fn projector_span(projector: &'static str, ev: &RecordedEvent) -> tracing::Span {
    tracing::debug_span!(
        "es.projector",
        projector,
        event_type = ev.event_type.as_str(),
        stream = ev.stream_id.as_str(),
        position = ev.global_position,
    )
}

/// Runs the projectors of `read_model` on one event, as an inline append
/// would (used by asynchronous runners). A projector that panics fails like
/// one that returns an error, named, at this event.
pub(crate) fn apply_read_model(
    conn: &mut DbConnection,
    read_model: &str,
    ev: &RecordedEvent,
) -> Result<()> {
    for (p, h) in registry()?.handlers(&ev.event_type) {
        if p.read_model != read_model {
            continue;
        }
        let run = match &h.kind {
            HandlerKind::Sql { apply } => apply,
            HandlerKind::Row { inline, .. } => inline,
        };
        let _span = projector_span(p.name, ev).entered();
        catch_panic(conn, |c| run(ev, c))
            .unwrap_or_else(|message| Err(Failure::Projector(message.into())))
            .map_err(|f| f.into_error(p.name, ev))?;
    }
    Ok(())
}

pub(super) fn checked_apply<P: RowProjection<E>, E: EventType>(
    event: Recorded<E>,
    key: &<P::Model as ReadModel>::Key,
    row: &mut Option<P::Model>,
) -> Result<(), Failure> {
    P::apply(event, row).map_err(Failure::Projector)?;
    if let Some(r) = row {
        let new_key = r.key();
        if &new_key != key {
            return Err(Failure::Projector(
                format!(
                    "the projector set a row with key {new_key:?} in place of the row with the event's key {key:?}; a row-level projector may only write the row of its key"
                )
                .into(),
            ));
        }
    }
    Ok(())
}

pub(super) fn row_inline<P: RowProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    conn: &mut DbConnection,
) -> Result<(), Failure> {
    let mut raced = false;
    loop {
        let event = ev.decode::<E>()?;
        let key = P::key(&event);
        let mut row = P::Model::find(conn, &key)?;
        let existed = row.is_some();
        checked_apply::<P, E>(event, &key, &mut row)?;
        match (existed, row) {
            (false, None) => {}
            (false, Some(r)) if !conn.dialect().serial_writers() && !raced => {
                // Nothing to lock when the row does not exist yet: a concurrent
                // append may insert it first. Then start over on its row.
                let inserted =
                    conn.transaction(|c| P::Model::insert_many(c, std::slice::from_ref(&r)));
                match inserted {
                    Ok(_) => {}
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) => {
                        raced = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            (false, Some(r)) => {
                P::Model::insert_many(conn, std::slice::from_ref(&r))?;
            }
            (true, Some(r)) => {
                P::Model::update(conn, &r)?;
            }
            (true, None) => {
                P::Model::delete_many(conn, std::slice::from_ref(&key))?;
            }
        }
        return Ok(());
    }
}

pub(super) fn sql_apply<P: SqlProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    conn: &mut DbConnection,
) -> Result<(), Failure> {
    let event = ev.decode::<E>()?;
    P::apply(event, conn).map_err(Failure::Projector)
}

/// Runs `apply` on `conn`, turning a panic into its message. Transactions
/// the panicking code opened and left open are rolled back first, so the
/// caller's transaction can still roll back cleanly.
pub(crate) fn catch_panic<T>(
    conn: &mut DbConnection,
    apply: impl FnOnce(&mut DbConnection) -> T,
) -> std::result::Result<T, String> {
    use diesel::connection::{Connection, TransactionManager};
    type Tm = <DbConnection as Connection>::TransactionManager;
    let depth = |c: &mut DbConnection| {
        Tm::transaction_manager_status_mut(c)
            .transaction_depth()
            .ok()
            .flatten()
            .map_or(0, |d| d.get())
    };
    let outer = depth(conn);
    match catch_unwind(AssertUnwindSafe(|| apply(&mut *conn))) {
        Ok(value) => Ok(value),
        Err(payload) => {
            while depth(conn) > outer {
                if Tm::rollback_transaction(conn).is_err() {
                    break;
                }
            }
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a value that is not a message".to_owned());
            Err(format!("panicked: {message}"))
        }
    }
}
