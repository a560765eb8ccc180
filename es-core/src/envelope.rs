use crate::{DecodeError, Event, Metadata};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An event as stored in the log, with everything the store knows about it.
///
/// `Recorded<E>` dereferences to `E`, so a projector can write `event.book_id`.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded<E> {
    /// Position in the whole log; strictly increasing in commit order of visibility
    /// (see the store's documentation for concurrent writers).
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: String,
    /// 1 for a stream's first event, then +1 per event, without gaps.
    pub stream_version: i64,
    pub event_type: String,
    pub event_version: u16,
    pub metadata: Metadata,
    /// Set by the store when the event was appended.
    pub created_at: DateTime<Utc>,
    pub event: E,
}

/// The JSON payload of an event whose Rust type is not chosen yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload(pub String);

impl Payload {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A recorded event whose payload is still JSON text.
pub type RecordedEvent = Recorded<Payload>;

impl<E> std::ops::Deref for Recorded<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.event
    }
}

impl<E> Recorded<E> {
    /// The same envelope around another value.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> Recorded<F> {
        let Recorded {
            global_position,
            event_id,
            stream_id,
            stream_version,
            event_type,
            event_version,
            metadata,
            created_at,
            event,
        } = self;
        Recorded {
            global_position,
            event_id,
            stream_id,
            stream_version,
            event_type,
            event_version,
            metadata,
            created_at,
            event: f(event),
        }
    }
}

impl RecordedEvent {
    /// Decodes the payload into `E` (upcasting older versions).
    pub fn decode<E: Event>(&self) -> Result<Recorded<E>, DecodeError> {
        let event = E::decode(&self.event_type, self.event_version, self.event.as_str())?;
        Ok(Recorded {
            global_position: self.global_position,
            event_id: self.event_id,
            stream_id: self.stream_id.clone(),
            stream_version: self.stream_version,
            event_type: self.event_type.clone(),
            event_version: self.event_version,
            metadata: self.metadata.clone(),
            created_at: self.created_at,
            event,
        })
    }

    /// The payload as JSON text.
    pub fn payload(&self) -> &str {
        self.event.as_str()
    }
}
