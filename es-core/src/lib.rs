//! Backend-free model of an event-sourced application: events, the recorded
//! envelope, metadata, expected versions and stream ids.
//!
//! Applications normally depend on `es-diesel`, which re-exports everything
//! here together with the derive macros.

pub mod aggregate;
mod envelope;
mod error;
mod event;
pub mod harness;
mod json;
mod metadata;
mod stream;
pub mod upcast;
mod version;
pub mod view;

pub use aggregate::{fold, Aggregate, Snapshots};
pub use envelope::{Payload, Recorded, RecordedEvent};
pub use error::{BoxError, DecodeError, EncodeError};
pub use event::{
    name_clashes, registered_event_types, Event, EventRegistration, EventType, NameClash, NewEvent,
};
pub use metadata::{Metadata, MetadataError};
pub use stream::{validate_stream_id, StreamIdError};
pub use version::ExpectedVersion;

/// Re-exports used by code that the derive macros generate. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::event::EventRegistration;
    pub use crate::upcast::{decode_payload, Upcaster};
    pub use crate::view::{ColumnType, EventView, ViewColumn};
    pub use inventory;
    pub use serde;
    pub use serde_json;
}
