//! What the append statements of every backend share: chunking, how a
//! failed insert is reported, how metadata is bound.

use super::rows::Appended;
use super::{Bind, Marked, SqlText};
use crate::error::{Error, ACTUAL_UNKNOWN};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use es_core::{ExpectedVersion, Metadata, NewEvent};

/// Rows per INSERT statement: far below every backend's bind-parameter limit.
pub(crate) const CHUNK: usize = 500;

/// Statement shapes (events per chunk) that are prepared once and cached
/// per connection; others are planned per call, which keeps the cache at a
/// few dozen statements however the chunk sizes vary.
pub(crate) fn cached_shape(events: usize) -> bool {
    events <= 16 || events == CHUNK
}

/// One-event append texts of a backend, one per kind of expectation.
pub(super) type OneEventTexts = [std::sync::OnceLock<Marked>; 4];

/// The text of an append of `events` events expecting `expected`, written
/// by `text`. A one-event append (every command's) is written once per kind
/// of expectation and kept in `one`, its placeholders marked; others are
/// written per call.
pub(super) fn append_text(
    one: &'static OneEventTexts,
    events: usize,
    expected: ExpectedVersion,
    text: impl FnOnce() -> String,
) -> SqlText<'static> {
    if events != 1 {
        return text().into();
    }
    let kind = match expected {
        ExpectedVersion::Any => 0,
        ExpectedVersion::NoStream => 1,
        ExpectedVersion::StreamExists => 2,
        ExpectedVersion::Exact(_) => 3,
    };
    one[kind].get_or_init(|| Marked::new(text())).into()
}

pub(super) fn map_insert_error(
    err: DieselError,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Error {
    // On SQLite the insert trigger of migration 11 refuses duplicates before
    // the unique constraints see them, and a version that does not follow
    // the stream's last one (an expectation above the stream's version).
    let duplicate = |kind: &DatabaseErrorKind, message: &str| {
        matches!(kind, DatabaseErrorKind::UniqueViolation)
            || message.starts_with("es_events is append-only")
                && (message.contains("already exist") || message.contains("must follow"))
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
            // PostgreSQL names the id in the details, MySQL in the message.
            let said = format!("{} {}", info.details().unwrap_or(""), info.message());
            let event_id = chunk
                .iter()
                .map(|e| e.event_id)
                .find(|id| said.contains(&id.to_string()))
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

pub(super) fn metadata_bind(m: &Metadata) -> Bind<'static> {
    if m.is_empty() {
        Bind::Text("{}")
    } else {
        Bind::Owned(m.to_json())
    }
}

pub(super) fn sorted(mut rows: Vec<Appended>) -> Vec<Appended> {
    rows.sort_by_key(|r| r.stream_version);
    rows
}
