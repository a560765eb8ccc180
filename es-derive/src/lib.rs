//! Derive macros of the event store. Use them through `es_diesel`, which
//! re-exports them next to the runtime they generate code for.

mod attr;
mod event;
mod projector;
mod read_model;
mod upcaster;

use proc_macro::TokenStream;

/// Makes a struct (one event type) or an enum of event structs (the events
/// of one aggregate) storable in the log.
///
/// Struct attributes: `#[event(name = "BookBorrowed", version = 2,
/// view = "book_borrowed" | view = false, copy, crate = es_core)]`.
/// Field attribute: `#[event(json)]` exposes a nested value as JSON text in
/// the typed view.
///
/// Each stored name belongs to one Rust type: a second struct with the same
/// name is a compile error in the same crate, and refused by the store's
/// registry (appends, `migrate`) across crates, naming both types. `copy`
/// marks a struct that reads events another type owns (the part a consumer
/// crate needs, or an old version kept to write test logs); it may share
/// the owner's name. An enum only groups its variants' names.
///
/// The typed view shows the rows stored at the struct's current `version`
/// only (older rows are upcast in Rust, through the store). Its columns are
/// the fields of types i8, u8, i16, u16, i32, u32, i64, f32, f64, bool,
/// String, char, Uuid, an `Option` of one, or `#[event(json)]` fields;
/// `u64`, `usize`, `u128` and `i128` are refused since BIGINT cannot hold
/// all their values.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    event::derive(input).into()
}

/// Makes a struct a read model: a table kept up to date by projectors.
///
/// `#[read_model(table = "book_list", primary_key = book_id)]` (or
/// `primary_key(library_id, book_id)`), plus optional `index(field, ..)`,
/// `unique_index(field, ..)` and `version = N` (bump it to force a rebuild).
/// Generates the Diesel `table!` module named after the table, the
/// `Queryable`, `Selectable`, `Insertable` and `AsChangeset` impls, the
/// CREATE TABLE of each backend, and the `ReadModel` impl.
///
/// Field types: i16, i32, i64, f32, f64, bool, String, `Vec<u8>`,
/// `NaiveDateTime`, `NaiveDate`, `NaiveTime`, `DateTime<Utc>` (a UTC
/// timestamp), `Uuid` and `serde_json::Value` (both stored as text), and an
/// `Option` of any of them for a NULL-able column.
#[proc_macro_derive(ReadModel, attributes(read_model))]
pub fn derive_read_model(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    read_model::derive(input).into()
}

/// Registers a function as a projector of a read model.
///
/// Row-level: `#[projector(on = BookBorrowed, key = book_id)] fn f(e:
/// &Recorded<BookBorrowed>, row: &mut Option<BookList>)`; the store loads
/// the row whose key is the event's `book_id`, the function sets it (`Some`
/// inserts or updates, `None` deletes) and the store saves it.
///
/// SQL-level: `#[projector(on = [BookRegistered, BookReturned], read_model =
/// BookList)] fn f(e: &Recorded<LibraryEvent>, conn: &mut DbConnection) ->
/// QueryResult<()>`; with several event types the parameter is an event enum
/// wrapping each of them (or one event type, when `on` lists only it).
///
/// Either may take the event alone, `e: &BookBorrowed`, when it needs only
/// its values: rebuilds of a read model whose projectors all do so read
/// just the position, type and payload of each event, not its envelope
/// (event id, stream, metadata, time).
///
/// Either may return `()` or `Result<(), E>` with `E` convertible into a
/// boxed error. `name = ".."` replaces the default name, the function's path.
#[proc_macro_attribute]
pub fn projector(args: TokenStream, item: TokenStream) -> TokenStream {
    projector::expand(args.into(), item.into()).into()
}

/// Registers a function converting a stored event payload from version
/// `from` to version `from + 1`. Every read path (stream loads, log reads,
/// projections, rebuilds) applies the chain of upcasters from the stored
/// version up to the event's current `#[event(version = N)]`.
///
/// ```ignore
/// #[upcaster(BookBorrowed, from = 1)]
/// fn borrowed_v1_to_v2(mut payload: serde_json::Value) -> Result<serde_json::Value, String> {
///     payload["due_days"] = 14.into();
///     Ok(payload)
/// }
/// ```
///
/// The function takes the payload as `serde_json::Value` and returns
/// `Result<serde_json::Value, E>` where `E` converts into a boxed error.
/// `from` must be below the event's current version (checked at compile
/// time). Options: `crate = path` names the `es_core` crate when
/// `es_diesel` is not a dependency.
#[proc_macro_attribute]
pub fn upcaster(args: TokenStream, item: TokenStream) -> TokenStream {
    upcaster::expand(args.into(), item.into()).into()
}
