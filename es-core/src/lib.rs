//! Backend-free model of an event-sourced application: events, the recorded
//! envelope, metadata, expected versions and stream ids.
//!
//! Applications normally depend on `es-diesel`, which re-exports everything
//! here together with the derive macros.

pub mod aggregate;
pub mod decision;
mod envelope;
mod error;
mod event;
pub mod harness;
mod json;
mod metadata;
mod stream;
mod tag;
pub mod upcast;
mod version;
pub mod view;

pub use aggregate::{fold, Aggregate, Cache, Snapshots};
pub use decision::{DecisionState, DecisionStates};
pub use envelope::{Payload, Recorded, RecordedEvent};
pub use error::{BoxError, DecodeError, EncodeError};
pub use event::{
    name_clashes, registered_event_types, Event, EventRegistration, EventType, NameClash, NewEvent,
    TagsOf,
};
pub use metadata::{Metadata, MetadataError};
pub use stream::{validate_stream_id, StreamIdError};
pub use tag::{
    tag, validate_tag, Query, QueryError, QueryItem, TagError, MAX_QUERY_ITEMS, MAX_TAGS,
    MAX_TAG_BYTES,
};
pub use version::ExpectedVersion;

/// Re-exports used by code that the derive macros generate. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::event::{EventRegistration, TagsOf};
    pub use crate::upcast::{decode_payload, Upcaster};
    pub use crate::view::{ColumnType, EventView, ViewColumn};
    pub use inventory;
    pub use serde;
    pub use serde_json;
}
