//! Descriptions of the typed SQL views over the log, one per event type.
//! `#[derive(Event)]` registers them; the store's `migrate` creates them.

/// A column type of a typed event view, common to every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    SmallInt,
    Integer,
    BigInt,
    Float,
    Double,
    Bool,
    Text,
    /// The field's JSON text (nested structs, vectors, maps).
    Json,
}

/// One payload field exposed as a column.
#[derive(Clone, Copy, Debug)]
pub struct ViewColumn {
    /// Column name (the Rust field name).
    pub name: &'static str,
    /// Key in the JSON payload (differs from `name` under `#[serde(rename)]`).
    pub json_key: &'static str,
    pub ty: ColumnType,
    pub nullable: bool,
}

/// A SQL view selecting one event type's rows with one column per field, plus
/// `global_position`, `stream_id`, `stream_version` and `created_at`.
///
/// It shows only the rows stored at `event_version`, the struct's current
/// version: older rows may lack fields or hold them in another type, and
/// their upcasters run in Rust, not in SQL. Read those through the store.
#[derive(Debug)]
pub struct EventView {
    /// SQL name of the view (and of the generated Diesel `table!` module).
    pub name: &'static str,
    pub event_type: &'static str,
    /// The only stored version the view shows.
    pub event_version: u16,
    /// `crate::module::Type` of the event struct.
    pub rust_type: &'static str,
    pub columns: &'static [ViewColumn],
}

inventory::collect!(EventView);

/// Every registered view, sorted by name.
pub fn event_views() -> Vec<&'static EventView> {
    let mut views: Vec<_> = inventory::iter::<EventView>.into_iter().collect();
    views.sort_by_key(|v| v.name);
    views
}
