//! Projectors: functions marked `#[projector(on = ..)]` that keep read
//! models up to date. They register themselves through `inventory`; this
//! module builds the registry once (sorted, duplicates reported) and applies
//! the projectors to appended events inside the append transaction.

pub(crate) mod guarded;
pub(crate) mod inline;
mod registry;
mod rows;

pub use crate::error::{Duplicate, RegistryError};
pub use crate::read_model::RowBatch;
pub(crate) use inline::{append_events, append_events_if, apply_read_model, catch_panic};
pub use registry::{check_projectors, registered_projectors, registered_read_models};
pub(crate) use registry::{handled_types, registry, Registry};
pub use rows::{new_rows, Rows};

use crate::backend::DbConnection;
use crate::error::Error;
use crate::read_model::ReadModel;
use es_core::{BoxError, DecodeError, EventType, Recorded, RecordedEvent};
use inline::{row_inline, sql_apply};
use rows::{row_fold, row_want};

/// How a projector writes its read model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProjectorStyle {
    /// Receives `&mut Option<Row>`, the row keyed by a field of the event:
    /// the store loads it, the projector changes it, the store saves it.
    /// Rebuilds fold these in memory and write in bulk.
    Row,
    /// Receives the connection and runs any SQL (Diesel DSL) it likes.
    Sql,
}

impl std::fmt::Display for ProjectorStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProjectorStyle::Row => "row-level",
            ProjectorStyle::Sql => "SQL-level",
        })
    }
}

/// A registered projector (submitted by `#[projector]`).
#[doc(hidden)]
pub struct Projector {
    pub name: &'static str,
    pub read_model: &'static str,
    pub style: ProjectorStyle,
    pub handlers: &'static [Handler],
    /// It takes `&Recorded<E>`, not `&E`: it may read the envelope.
    pub reads_envelope: bool,
    pub file: &'static str,
    pub line: u32,
}

inventory::collect!(Projector);

/// What a projector does with one event type.
#[doc(hidden)]
pub struct Handler {
    pub event_type: &'static str,
    pub kind: HandlerKind,
}

#[doc(hidden)]
pub enum HandlerKind {
    Sql {
        apply: fn(&RecordedEvent, &mut DbConnection) -> Result<(), Failure>,
    },
    Row {
        inline: fn(&RecordedEvent, &mut DbConnection) -> Result<(), Failure>,
        want: fn(&RecordedEvent, &mut dyn RowBatch) -> Result<(), Failure>,
        fold: fn(&RecordedEvent, &mut dyn RowBatch) -> Result<(), Failure>,
    },
}

/// Why one projector failed on one event; the caller adds which.
#[doc(hidden)]
#[derive(Debug)]
pub enum Failure {
    Decode(DecodeError),
    Projector(BoxError),
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        Failure::Decode(e)
    }
}

impl From<diesel::result::Error> for Failure {
    fn from(e: diesel::result::Error) -> Self {
        Failure::Projector(Box::new(e))
    }
}

impl Failure {
    pub(crate) fn into_error(self, projector: &str, ev: &RecordedEvent) -> Error {
        match self {
            Failure::Decode(source) => Error::decode(ev, source),
            Failure::Projector(source) => Error::Projector {
                projector: projector.to_owned(),
                position: ev.global_position,
                stream: ev.stream_id.clone(),
                event_type: ev.event_type.clone(),
                source,
            },
        }
    }
}

/// A registered projector, as [`registered_projectors`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectorInfo {
    /// `crate::module::function`, or the `name = ".."` given in the attribute.
    pub name: &'static str,
    /// The table of the read model it feeds.
    pub read_model: &'static str,
    pub style: ProjectorStyle,
    /// The event types it handles, in the order of `on = [..]`.
    pub event_types: Vec<&'static str>,
    /// Where it is defined.
    pub location: String,
}

/// A row-level projector's code for one event type `E` (implemented by
/// `#[projector(.., key = ..)]`).
#[doc(hidden)]
pub trait RowProjection<E> {
    type Model: ReadModel;
    fn key(event: &Recorded<E>) -> <Self::Model as ReadModel>::Key;
    fn apply(event: Recorded<E>, row: &mut Option<Self::Model>) -> Result<(), BoxError>;
}

/// A SQL-level projector's code for one event type `E`.
#[doc(hidden)]
pub trait SqlProjection<E> {
    fn apply(event: Recorded<E>, conn: &mut DbConnection) -> Result<(), BoxError>;
}

/// The handler of a row-level projector for `E`.
#[doc(hidden)]
pub const fn row_handler<P: RowProjection<E>, E: EventType>() -> Handler {
    Handler {
        event_type: E::NAME,
        kind: HandlerKind::Row {
            inline: row_inline::<P, E>,
            want: row_want::<P, E>,
            fold: row_fold::<P, E>,
        },
    }
}

/// The handler of a SQL-level projector for `E`.
#[doc(hidden)]
pub const fn sql_handler<P: SqlProjection<E>, E: EventType>() -> Handler {
    Handler {
        event_type: E::NAME,
        kind: HandlerKind::Sql {
            apply: sql_apply::<P, E>,
        },
    }
}

/// What a projector function may return: `()` or `Result<(), E>`.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "a projector returns `()` or `Result<(), E>` where `E` converts into a boxed error, not `{Self}`",
    label = "unsupported return type",
    note = "write `-> Result<(), diesel::result::Error>` (or any std::error::Error type), or return nothing"
)]
pub trait ProjectorOutput {
    fn into_result(self) -> Result<(), BoxError>;
}

impl ProjectorOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> ProjectorOutput for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// `Self` can hold an `E` event: the parameter type of a projector listed
/// `on = E` (the event itself, or an event enum with a variant for it).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "the projector takes `{Self}` events, which cannot hold a `{E}` event",
    label = "`{E}` is listed in `on`",
    note = "take `&{E}` (or `&Recorded<{E}>`), or an event enum with a variant wrapping `{E}`"
)]
pub trait HoldsEvent<E> {
    fn hold(event: E) -> Self;
}

impl<E, T: From<E>> HoldsEvent<E> for T {
    fn hold(event: E) -> Self {
        T::from(event)
    }
}
