//! Derive macros of the event store. Use them through `es_diesel`, which
//! re-exports them next to the runtime they generate code for.

mod attr;
mod event;

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
