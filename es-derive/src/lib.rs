//! Derive macros of the event store. Use them through `es_diesel`, which
//! re-exports them next to the runtime they generate code for.

mod attr;
mod event;
mod upcaster;

use proc_macro::TokenStream;

/// Makes a struct (one event type) or an enum of event structs (the events
/// of one aggregate) storable in the log.
///
/// Struct attributes: `#[event(name = "BookBorrowed", version = 2,
/// view = "book_borrowed" | view = false, crate = es_core)]`.
/// Field attribute: `#[event(json)]` exposes a nested value as JSON text in
/// the typed view.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    event::derive(input).into()
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
