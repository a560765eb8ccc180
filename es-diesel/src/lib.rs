//! Event sourcing on Diesel.
//!
//! An append-only log of events in SQLite (the embedded default) or
//! PostgreSQL, written with optimistic concurrency and read back by stream,
//! in global order, or by type; plus typed SQL views that let Diesel query
//! events like tables.
//!
//! An application depends on this crate (and on `diesel` and `serde` for its
//! own queries and types): it re-exports the backend-free model of
//! `es-core` and the derive macros of `es-derive`.

mod append;
mod connection;
mod error;
mod migrations;
mod read;
mod store;
pub mod testing;

pub use append::StreamWrite;
pub use connection::{write_transaction, Backend, DbConnection, Manager, SqliteSync, StoreOptions};
pub use error::{Error, Result};
pub use store::{EventStore, LogIter, PooledConnection};

/// The `Event` trait and its derive.
pub use es_core::Event;
pub use es_core::{
    upcast, validate_stream_id, view, BoxError, DecodeError, EncodeError, EventType,
    ExpectedVersion, Metadata, NewEvent, Payload, Recorded, RecordedEvent, StreamIdError,
};
pub use es_derive::Event;

/// The Diesel this crate is built on.
pub use diesel;

/// Items used by generated code. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use es_core;
}
