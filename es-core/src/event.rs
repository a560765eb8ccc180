use crate::{DecodeError, EncodeError, Metadata};
use uuid::Uuid;

/// A fact that happened, stored as one row of the append-only log.
///
/// Implemented by `#[derive(Event)]`, either on a struct (one event type) or
/// on an enum whose variants each wrap one event struct (all the events of
/// one aggregate). Events are values: they carry the data that was true when
/// they happened, not references to rows that may change later.
pub trait Event: Sized + Send + Sync + 'static {
    /// Every event type name this Rust type decodes.
    const EVENT_TYPES: &'static [&'static str];

    /// The stored type name of this value.
    fn event_type(&self) -> &'static str;

    /// The schema version this code writes for this value.
    fn event_version(&self) -> u16;

    /// The JSON payload.
    fn encode(&self) -> Result<String, EncodeError>;

    /// Rebuilds a value from a stored row, upcasting older versions.
    fn decode(event_type: &str, event_version: u16, payload: &str) -> Result<Self, DecodeError>;

    /// Whether a stored event of `event_type` decodes into this type.
    fn handles(event_type: &str) -> bool {
        Self::EVENT_TYPES.contains(&event_type)
    }
}

/// An event struct: exactly one stored type name and one current version.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event type",
    label = "not an event: a projector listens to event structs",
    note = "add #[derive(Event)] to `{Self}`, or list event structs in `on = [..]`"
)]
pub trait EventType: Event {
    /// The stored type name (default: the struct's name).
    const NAME: &'static str;
    /// The current schema version (default: 1).
    const VERSION: u16;
}

/// An event ready to be appended: encoded, with its id and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub event_version: u16,
    /// JSON text.
    pub payload: String,
    pub metadata: Metadata,
}

impl NewEvent {
    /// Encodes `event` with a fresh time-ordered id (UUID v7) and empty metadata.
    pub fn new<E: Event>(event: &E) -> Result<Self, EncodeError> {
        Ok(NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: event.encode()?,
            metadata: Metadata::default(),
        })
    }

    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }
}
