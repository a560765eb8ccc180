//! Event sourcing on Diesel.
//!
//! An append-only log of events in SQLite (the embedded default) or
//! PostgreSQL, written with optimistic concurrency and read back by stream,
//! in global order, or by type; typed SQL views that let Diesel query
//! events like tables; and read models kept up to date by projectors.
//!
//! An application depends on this crate (and on `diesel` and `serde` for its
//! own queries and types): it re-exports the backend-free model of
//! `es-core` and the derive macros of `es-derive`.
//!
//! # Read models and projectors
//!
//! A read model is a struct with `#[derive(ReadModel)]`; it gets a Diesel
//! `table!`, the `Queryable`/`Selectable`/`Insertable`/`AsChangeset` impls
//! and its CREATE TABLE per backend. [`EventStore::migrate`] creates it, and
//! when the struct changes shape (its DDL's fingerprint differs from the
//! stored one) drops it and rebuilds it from the log.
//!
//! A projector is a function marked `#[projector(on = EventType, ..)]`. By
//! default projectors run inline: inside the append transaction, for each
//! appended event in append order. If one fails, the append is rolled back
//! and [`Error::Projector`] names the projector and the event.
//!
//! ```
//! use es_diesel::{projector, DbConnection, Event, EventStore, ExpectedVersion, ReadModel, Recorded};
//! use diesel::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Event, Serialize, Deserialize)]
//! #[event(view = false)]
//! struct BookRegistered { book_id: i64, title: String }
//!
//! #[derive(Event, Serialize, Deserialize)]
//! #[event(view = false)]
//! struct BookBorrowed { book_id: i64, user: String }
//!
//! #[derive(ReadModel, Debug, Clone, PartialEq)]
//! #[read_model(table = "book_list", primary_key = book_id)]
//! struct BookList { book_id: i64, title: String, borrower: Option<String> }
//!
//! // Row-level: the store loads the row keyed by `e.book_id`, the projector
//! // changes it (`Some` inserts or updates, `None` deletes), the store saves it.
//! // A projector takes the event alone (`&BookRegistered`), or the event with
//! // its envelope (`&Recorded<BookBorrowed>`: position, stream, metadata,
//! // time). A rebuild of a read model whose projectors all take the event
//! // alone reads no envelope columns.
//! #[projector(on = BookRegistered, key = book_id)]
//! fn registered(e: &BookRegistered, row: &mut Option<BookList>) {
//!     *row = Some(BookList { book_id: e.book_id, title: e.title.clone(), borrower: None });
//! }
//!
//! // SQL-level: any Diesel query on the append transaction's connection.
//! #[projector(on = BookBorrowed, read_model = BookList)]
//! fn borrowed(e: &Recorded<BookBorrowed>, conn: &mut DbConnection) -> QueryResult<()> {
//!     diesel::update(book_list::table.find(e.book_id))
//!         .set(book_list::borrower.eq(&e.user))
//!         .execute(conn)?;
//!     Ok(())
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = EventStore::open(":memory:")?;
//! store.migrate()?;
//! store.append("book-1", ExpectedVersion::NoStream, [BookRegistered { book_id: 1, title: "Dune".into() }])?;
//! store.append("book-1", ExpectedVersion::Exact(1), [BookBorrowed { book_id: 1, user: "ada".into() }])?;
//! let rows: Vec<BookList> = book_list::table.load(&mut *store.connection()?)?;
//! assert_eq!(rows[0].borrower.as_deref(), Some("ada"));
//! // "Performing a full scan": empty the table and replay the log.
//! let report = store.rebuild("book_list")?;
//! assert_eq!((report.events, report.rows), (2, 1));
//! # Ok(()) }
//! ```
//!
//! # Asynchronous read models
//!
//! `#[read_model(mode = async)]` keeps the same projector code out of the
//! append transaction: [`EventStore::start_async_read_models`] starts one
//! runner thread per such read model (or [`EventStore::run_async_read_models`]
//! in a worker process). Runners follow the log from a checkpoint stored with
//! each batch, never skip an event on PostgreSQL (see [`follow`]), hold a
//! lease so that one runner per read model is active across processes (a
//! runner that dies shows as `stale` until another takes over), and stop at
//! a failing event, whether it returned an error or panicked, until it is
//! fixed ([`EventStore::projection_status`]).
//! [`EventStore::rebuild`] rebuilds them blue/green, into a shadow table.
//!
//! # Commands
//!
//! An [`Aggregate`] folds its stream and decides new events from a command;
//! [`EventStore::execute`] loads it, decides, and appends with the expected
//! version, retrying on a conflict; a refusal writes nothing. The
//! [`harness`] checks deciders without a database.
//!
//! ## Projectors in other crates
//!
//! Projectors register themselves with `inventory`. The linker drops a
//! crate the program never refers to, and its projectors with it, silently.
//! An application whose projectors live in a crate it does not otherwise use
//! must refer to that crate, e.g. `use library_projectors as _;` in
//! `main.rs`, and should check at start-up that what it expects is there:
//! [`check_projectors`] fails with the list of what is missing and of what is
//! registered; [`registered_projectors`] lists them all.

// The README's examples are compiled and run as doctests of es-web, whose
// dependencies (axum) its "In a web app" section needs.

/// The examples of the guides in `docs/`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/concepts.md")]
struct ConceptsExamples;

#[cfg(doctest)]
#[doc = include_str!("../../docs/your-first-model.md")]
struct YourFirstModelExamples;

#[cfg(doctest)]
#[doc = include_str!("../../docs/production-postgres.md")]
struct ProductionPostgresExamples;

#[cfg(doctest)]
#[doc = include_str!("../../docs/mysql.md")]
struct MysqlExamples;

#[cfg(feature = "tokio")]
mod async_store;
mod backend;
pub mod cli;
mod command;
mod error;
mod import;
mod log;
pub mod projection;
pub mod read_model;
mod rebuild;
pub mod runner;
mod schema;
mod store;
pub mod testing;

pub use log::follow;
use log::{append, query, read};
use schema::migrations;

pub use append::StreamWrite;
#[cfg(feature = "tokio")]
pub use async_store::{AsyncEventStore, AsyncRunners};
pub use backend::{write_transaction, Backend, DbConnection, Manager, SqliteSync, StoreOptions};
pub use command::decide::Decided;
pub use command::execute::{ExecuteError, ExecuteOptions, Executed, Loaded};
pub use error::{Error, Result};
pub use import::{import_event_id, ImportOptions, ImportReport, ImportRow};
pub use projection::inline::append_in;
pub use projection::{
    check_projectors, registered_projectors, registered_read_models, Duplicate, ProjectorInfo,
    ProjectorStyle, RegistryError,
};
pub use query::{AppendCondition, QueriedEvent, QueryRead};
pub use read_model::{ReadModel, ReadModelSchema};
pub use rebuild::{RebuildOptions, RebuildProgress, RebuildReport};
pub use store::{EventStore, LogIter, PooledConnection};

/// The `Event` trait and its derive.
pub use es_core::Event;
pub use es_core::{
    decision, fold, harness, name_clashes, registered_event_types, tag, upcast, validate_stream_id,
    validate_tag, view, Aggregate, BoxError, Cache, DecisionState, DecisionStates, DecodeError,
    EncodeError, EventRegistration, EventType, ExpectedVersion, Metadata, MetadataError, NameClash,
    NewEvent, Payload, Query, QueryError, QueryItem, Recorded, RecordedEvent, Snapshots,
    StreamIdError, TagError, MAX_QUERY_ITEMS, MAX_TAGS, MAX_TAG_BYTES,
};
/// `#[projector(on = .., ..)]`: see the crate documentation.
pub use es_derive::projector;
/// The `#[upcaster(Event, from = N)]` attribute; see [`upcast`].
pub use es_derive::upcaster;
pub use es_derive::Event;
/// `#[derive(ReadModel)]`: see the [`ReadModel`] trait.
pub use es_derive::ReadModel;

/// The JSON library of payloads, for upcasters (`serde_json::Value`).
pub use serde_json;

/// The Diesel this crate is built on.
pub use diesel;

/// Items used by generated code. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::projection::{
        new_rows, row_handler, sql_handler, Handler, HoldsEvent, Projector, ProjectorOutput,
        ProjectorStyle, RowProjection, SqlProjection,
    };
    pub use crate::read_model::{
        convert, rows_per_statement, EventsInserted, ReadModelEntry, RowUpdate, RowVersion,
        RowWrite,
    };
    pub use crate::{DbConnection, ReadModel, ReadModelSchema};
    pub use chrono;
    pub use diesel;
    pub use es_core;
    pub use es_core::__private::inventory;
    pub use serde_json;
    pub use uuid;
}
