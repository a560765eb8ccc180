//! Projectors: functions marked `#[projector(on = ..)]` that keep read
//! models up to date. They register themselves through `inventory`; this
//! module builds the registry once (sorted, duplicates reported) and applies
//! the projectors to appended events inside the append transaction.

pub(crate) mod rebuild;

use crate::backend::DbConnection;
use crate::error::{Error, Result};
use crate::read_model::{ReadModel, ReadModelEntry, ReadModelSchema};
use diesel::Connection;
use es_core::{BoxError, DecodeError, EventType, Recorded, RecordedEvent};
use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

/// How a projector writes its read model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProjectorStyle {
    /// Receives `&mut Option<Row>`, the row keyed by a field of the event:
    /// the store loads it, the projector changes it, the store saves it.
    /// Rebuilds fold these in memory and write in bulk.
    Row,
    /// Receives the connection and runs any SQL (Diesel DSL) it likes.
    Sql,
}

impl std::fmt::Display for ProjectorStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProjectorStyle::Row => "row-level",
            ProjectorStyle::Sql => "SQL-level",
        })
    }
}

/// A registered projector (submitted by `#[projector]`).
#[doc(hidden)]
pub struct Projector {
    pub name: &'static str,
    pub read_model: &'static str,
    pub style: ProjectorStyle,
    pub handlers: &'static [Handler],
    pub file: &'static str,
    pub line: u32,
}

inventory::collect!(Projector);

/// What a projector does with one event type.
#[doc(hidden)]
pub struct Handler {
    pub event_type: &'static str,
    pub kind: HandlerKind,
}

#[doc(hidden)]
pub enum HandlerKind {
    Sql {
        apply: fn(&RecordedEvent, &mut DbConnection) -> Result<(), Failure>,
    },
    Row {
        inline: fn(&RecordedEvent, &mut DbConnection) -> Result<(), Failure>,
        want: fn(&RecordedEvent, &mut dyn RowBatch) -> Result<(), Failure>,
        fold: fn(&RecordedEvent, &mut dyn RowBatch) -> Result<(), Failure>,
    },
}

/// Why one projector failed on one event; the caller adds which.
#[doc(hidden)]
#[derive(Debug)]
pub enum Failure {
    Decode(DecodeError),
    Projector(BoxError),
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        Failure::Decode(e)
    }
}

impl From<diesel::result::Error> for Failure {
    fn from(e: diesel::result::Error) -> Self {
        Failure::Projector(Box::new(e))
    }
}

impl Failure {
    pub(crate) fn into_error(self, projector: &str, ev: &RecordedEvent) -> Error {
        match self {
            Failure::Decode(source) => Error::decode(ev, source),
            Failure::Projector(source) => Error::Projector {
                projector: projector.to_owned(),
                position: ev.global_position,
                stream: ev.stream_id.clone(),
                event_type: ev.event_type.clone(),
                source,
            },
        }
    }
}

/// A registered projector, as [`registered_projectors`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectorInfo {
    /// `crate::module::function`, or the `name = ".."` given in the attribute.
    pub name: &'static str,
    /// The table of the read model it feeds.
    pub read_model: &'static str,
    pub style: ProjectorStyle,
    /// The event types it handles, in the order of `on = [..]`.
    pub event_types: Vec<&'static str>,
    /// Where it is defined.
    pub location: String,
}

/// Two registrations with one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// "projector", "read model", "event type", "event view", or "view and
    /// table" (a typed view named like a read model's table).
    pub kind: &'static str,
    pub name: String,
    /// Every registration: `file:line` of projectors, the Rust type and
    /// `file:line` of read models, the Rust type of event types and views.
    pub locations: Vec<String>,
}

/// Problems of the registry of projectors and read models.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_registry(.duplicates, .orphans))]
pub struct RegistryError {
    pub duplicates: Vec<Duplicate>,
    /// Projectors feeding a table no registered read model owns: (projector, table).
    pub orphans: Vec<(String, String)>,
}

fn describe_registry(duplicates: &[Duplicate], orphans: &[(String, String)]) -> String {
    let mut parts: Vec<String> = duplicates
        .iter()
        .map(|d| match d.kind {
            "event type" => format!(
                "event type `{}` is stored by {} Rust types ({}): events of one would be decoded as the other; give each its own #[event(name = \"..\")], or mark a struct that only reads the other's events #[event(copy)]",
                d.name,
                d.locations.len(),
                d.locations.join(", ")
            ),
            "event view" => format!(
                "typed view `{}` is generated by {} event types ({}): one would replace the other; name each with #[event(view = \"..\")], or turn one off with #[event(view = false)]",
                d.name,
                d.locations.len(),
                d.locations.join(", ")
            ),
            "view and table" => format!(
                "the typed view of {} and the read model `{}` are both named `{}`; rename one with #[event(view = \"..\")] or #[read_model(table = \"..\")]",
                d.locations[0],
                d.locations[1],
                d.name
            ),
            _ => format!(
                "{} `{}` is registered {} times (at {}); give each a distinct name",
                d.kind,
                d.name,
                d.locations.len(),
                d.locations.join(", ")
            ),
        })
        .collect();
    parts.extend(orphans.iter().map(|(p, t)| {
        format!("projector `{p}` feeds table `{t}`, but no #[derive(ReadModel)] with that table is linked")
    }));
    parts.join("; ")
}

/// The projectors and read models linked into this program, sorted by name.
pub(crate) struct Registry {
    pub projectors: Vec<&'static Projector>,
    pub read_models: Vec<&'static ReadModelEntry>,
    /// For each event type: (projector, its handler) in projector-name order,
    /// for every read model.
    by_event: HashMap<&'static str, Vec<(&'static Projector, &'static Handler)>>,
    /// The same, for the inline read models only.
    inline_by_event: HashMap<&'static str, Vec<(&'static Projector, &'static Handler)>>,
}

impl Registry {
    fn build() -> std::result::Result<Registry, RegistryError> {
        let mut projectors: Vec<&'static Projector> =
            inventory::iter::<Projector>.into_iter().collect();
        projectors.sort_by(|a, b| (a.name, a.file, a.line).cmp(&(b.name, b.file, b.line)));
        let mut read_models: Vec<&'static ReadModelEntry> =
            inventory::iter::<ReadModelEntry>.into_iter().collect();
        read_models
            .sort_by(|a, b| (a.schema.name, a.file, a.line).cmp(&(b.schema.name, b.file, b.line)));

        let mut duplicates = Vec::new();
        let mut by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for p in &projectors {
            by_name
                .entry(p.name)
                .or_default()
                .push(format!("{}:{}", p.file, p.line));
        }
        duplicates.extend(by_name.into_iter().filter(|(_, l)| l.len() > 1).map(
            |(name, locations)| Duplicate {
                kind: "projector",
                name: name.to_owned(),
                locations,
            },
        ));
        let mut by_table: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for m in &read_models {
            by_table
                .entry(m.schema.name)
                .or_default()
                .push(format!("{} at {}:{}", m.schema.rust_type, m.file, m.line));
        }
        duplicates.extend(by_table.into_iter().filter(|(_, l)| l.len() > 1).map(
            |(name, locations)| Duplicate {
                kind: "read model",
                name: name.to_owned(),
                locations,
            },
        ));
        duplicates.extend(es_core::name_clashes().into_iter().map(|c| Duplicate {
            kind: c.kind,
            name: c.name.to_owned(),
            locations: c.rust_types.iter().map(|t| (*t).to_owned()).collect(),
        }));
        for view in es_core::view::event_views() {
            if let Some(m) = read_models.iter().find(|m| m.schema.name == view.name) {
                duplicates.push(Duplicate {
                    kind: "view and table",
                    name: view.name.to_owned(),
                    locations: vec![view.rust_type.to_owned(), m.schema.rust_type.to_owned()],
                });
            }
        }
        let tables: HashSet<&str> = read_models.iter().map(|m| m.schema.name).collect();
        let orphans: Vec<(String, String)> = projectors
            .iter()
            .filter(|p| !tables.contains(p.read_model))
            .map(|p| (p.name.to_owned(), p.read_model.to_owned()))
            .collect();
        if !duplicates.is_empty() || !orphans.is_empty() {
            return Err(RegistryError {
                duplicates,
                orphans,
            });
        }

        let asynchronous: HashSet<&str> = read_models
            .iter()
            .filter(|m| m.schema.asynchronous)
            .map(|m| m.schema.name)
            .collect();
        let mut by_event: HashMap<&'static str, Vec<(&'static Projector, &'static Handler)>> =
            HashMap::new();
        let mut inline_by_event = HashMap::new();
        for p in &projectors {
            for h in p.handlers {
                by_event.entry(h.event_type).or_default().push((p, h));
                if !asynchronous.contains(p.read_model) {
                    inline_by_event
                        .entry(h.event_type)
                        .or_insert_with(Vec::new)
                        .push((*p, h));
                }
            }
        }
        Ok(Registry {
            projectors,
            read_models,
            by_event,
            inline_by_event,
        })
    }

    pub(crate) fn handlers(&self, event_type: &str) -> &[(&'static Projector, &'static Handler)] {
        self.by_event
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The handlers of inline read models for `event_type`.
    pub(crate) fn inline_handlers(
        &self,
        event_type: &str,
    ) -> &[(&'static Projector, &'static Handler)] {
        self.inline_by_event
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether appending events of these types runs no projector.
    pub(crate) fn no_inline_projector_for(&self, writes: &[crate::StreamWrite]) -> bool {
        writes
            .iter()
            .flat_map(|w| &w.events)
            .all(|e| !self.inline_by_event.contains_key(e.event_type))
    }

    pub(crate) fn read_model(&self, name: &str) -> Option<&'static ReadModelEntry> {
        self.read_models
            .iter()
            .copied()
            .find(|m| m.schema.name == name)
    }

    pub(crate) fn projectors_of<'a>(
        &'a self,
        read_model: &'a str,
    ) -> impl Iterator<Item = &'static Projector> + 'a {
        self.projectors
            .iter()
            .copied()
            .filter(move |p| p.read_model == read_model)
    }
}

/// The registry, built on first use.
pub(crate) fn registry() -> Result<&'static Registry> {
    static REGISTRY: OnceLock<std::result::Result<Registry, RegistryError>> = OnceLock::new();
    REGISTRY
        .get_or_init(Registry::build)
        .as_ref()
        .map_err(|e| Error::Registry(e.clone()))
}

/// Every projector linked into this program, sorted by name.
///
/// A crate that only defines projectors is linked only if the program
/// refers to it; see [`check_projectors`].
pub fn registered_projectors() -> Result<Vec<ProjectorInfo>> {
    Ok(registry()?
        .projectors
        .iter()
        .map(|p| ProjectorInfo {
            name: p.name,
            read_model: p.read_model,
            style: p.style,
            event_types: p.handlers.iter().map(|h| h.event_type).collect(),
            location: format!("{}:{}", p.file, p.line),
        })
        .collect())
}

/// Every read model linked into this program, sorted by table name.
pub fn registered_read_models() -> Result<Vec<ReadModelSchema>> {
    Ok(registry()?.read_models.iter().map(|m| *m.schema).collect())
}

/// Fails with [`Error::MissingProjectors`] unless, for every
/// `(read model, event types)` pair, some registered projector of that read
/// model handles each event type. Call it at start-up (or in a test) to
/// detect a projector crate that the linker dropped.
///
/// ```
/// # fn main() -> es_diesel::Result<()> {
/// // No projector handles this here, so the check fails loudly:
/// let err = es_diesel::check_projectors(&[("book_list", &["BookRegistered"])]).unwrap_err();
/// assert!(err.to_string().contains("book_list"));
/// # Ok(()) }
/// ```
pub fn check_projectors(expected: &[(&str, &[&str])]) -> Result<()> {
    let reg = registry()?;
    let mut missing = Vec::new();
    for (read_model, types) in expected {
        for t in *types {
            let handled = reg
                .projectors_of(read_model)
                .any(|p| p.handlers.iter().any(|h| h.event_type == *t));
            if !handled {
                missing.push(((*read_model).to_owned(), (*t).to_owned()));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let registered = reg
        .projectors
        .iter()
        .map(|p| {
            let types: Vec<&str> = p.handlers.iter().map(|h| h.event_type).collect();
            format!("{} -> {} on [{}]", p.name, p.read_model, types.join(", "))
        })
        .collect();
    Err(Error::MissingProjectors {
        missing,
        registered,
    })
}

/// Runs every inline projector on each of `events`, in append order, on
/// `conn` (inside the append transaction).
pub(crate) fn apply_inline(conn: &mut DbConnection, events: &[RecordedEvent]) -> Result<()> {
    let reg = registry()?;
    if reg.inline_by_event.is_empty() {
        return Ok(());
    }
    for ev in events {
        for (p, h) in reg.inline_handlers(&ev.event_type) {
            let run = match &h.kind {
                HandlerKind::Sql { apply } => apply,
                HandlerKind::Row { inline, .. } => inline,
            };
            run(ev, conn).map_err(|f| f.into_error(p.name, ev))?;
        }
    }
    Ok(())
}

/// Runs the projectors of `read_model` on one event, as an inline append
/// would (used by asynchronous runners). A projector that panics fails like
/// one that returns an error, named, at this event.
pub(crate) fn apply_read_model(
    conn: &mut DbConnection,
    read_model: &str,
    ev: &RecordedEvent,
) -> Result<()> {
    for (p, h) in registry()?.handlers(&ev.event_type) {
        if p.read_model != read_model {
            continue;
        }
        let run = match &h.kind {
            HandlerKind::Sql { apply } => apply,
            HandlerKind::Row { inline, .. } => inline,
        };
        crate::runner::catch_panic(conn, |c| run(ev, c))
            .unwrap_or_else(|message| Err(Failure::Projector(message.into())))
            .map_err(|f| f.into_error(p.name, ev))?;
    }
    Ok(())
}

/// The event types the projectors of `read_model` handle, sorted.
pub(crate) fn handled_types(reg: &Registry, read_model: &str) -> Vec<&'static str> {
    let mut types: Vec<&'static str> = reg
        .projectors_of(read_model)
        .flat_map(|p| p.handlers.iter().map(|h| h.event_type))
        .collect();
    types.sort_unstable();
    types.dedup();
    types
}

/// A batch of read-model rows held in memory during a rebuild. Object-safe
/// face of [`Rows`].
#[doc(hidden)]
pub trait RowBatch: Any {
    fn as_any(&mut self) -> &mut dyn Any;
    /// Loads the rows of every wanted key not yet in memory.
    fn load(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<()>;
    /// Writes back every row in memory (delete, then multi-row insert) and forgets them.
    fn flush(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<usize>;
    fn is_empty(&self) -> bool;
    /// Rows held in memory.
    fn len(&self) -> usize;
}

struct Slot<M> {
    existed: bool,
    row: Option<M>,
}

/// The rows of one read model touched by a batch of events.
#[doc(hidden)]
pub struct Rows<M: ReadModel> {
    wanted: Vec<M::Key>,
    slots: HashMap<M::Key, Slot<M>>,
}

impl<M: ReadModel> Default for Rows<M> {
    fn default() -> Self {
        Rows {
            wanted: Vec::new(),
            slots: HashMap::new(),
        }
    }
}

/// The constructor registered for each read model.
#[doc(hidden)]
pub fn new_rows<M: ReadModel>() -> Box<dyn RowBatch> {
    Box::new(Rows::<M>::default())
}

/// Keys per SELECT/DELETE when loading or removing rows by key.
const KEYS_PER_STATEMENT: usize = 500;

impl<M: ReadModel> RowBatch for Rows<M> {
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }

    fn load(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<()> {
        let mut wanted = std::mem::take(&mut self.wanted);
        wanted.retain(|k| !self.slots.contains_key(k));
        let mut unique = HashSet::with_capacity(wanted.len());
        wanted.retain(|k| unique.insert(k.clone()));
        for chunk in wanted.chunks(KEYS_PER_STATEMENT) {
            for row in M::find_many(conn, chunk)? {
                self.slots.insert(
                    row.key(),
                    Slot {
                        existed: true,
                        row: Some(row),
                    },
                );
            }
        }
        for k in wanted {
            self.slots.entry(k).or_insert(Slot {
                existed: false,
                row: None,
            });
        }
        Ok(())
    }

    fn flush(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<usize> {
        let mut gone = Vec::new();
        let mut rows = Vec::new();
        for (key, slot) in self.slots.drain() {
            if slot.existed {
                gone.push(key);
            }
            rows.extend(slot.row);
        }
        for chunk in gone.chunks(KEYS_PER_STATEMENT) {
            M::delete_many(conn, chunk)?;
        }
        let per = crate::read_model::rows_per_statement(M::SCHEMA.columns);
        let mut written = 0;
        for chunk in rows.chunks(per) {
            written += M::insert_many(conn, chunk)?;
        }
        Ok(written)
    }

    fn is_empty(&self) -> bool {
        self.wanted.is_empty() && self.slots.is_empty()
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// A row-level projector's code for one event type `E` (implemented by
/// `#[projector(.., key = ..)]`).
#[doc(hidden)]
pub trait RowProjection<E> {
    type Model: ReadModel;
    fn key(event: &Recorded<E>) -> <Self::Model as ReadModel>::Key;
    fn apply(event: Recorded<E>, row: &mut Option<Self::Model>) -> Result<(), BoxError>;
}

/// A SQL-level projector's code for one event type `E`.
#[doc(hidden)]
pub trait SqlProjection<E> {
    fn apply(event: Recorded<E>, conn: &mut DbConnection) -> Result<(), BoxError>;
}

fn checked_apply<P: RowProjection<E>, E: EventType>(
    event: Recorded<E>,
    key: &<P::Model as ReadModel>::Key,
    row: &mut Option<P::Model>,
) -> Result<(), Failure> {
    P::apply(event, row).map_err(Failure::Projector)?;
    if let Some(r) = row {
        let new_key = r.key();
        if &new_key != key {
            return Err(Failure::Projector(
                format!(
                    "the projector set a row with key {new_key:?} in place of the row with the event's key {key:?}; a row-level projector may only write the row of its key"
                )
                .into(),
            ));
        }
    }
    Ok(())
}

fn row_inline<P: RowProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    conn: &mut DbConnection,
) -> Result<(), Failure> {
    let mut raced = false;
    loop {
        let event = ev.decode::<E>()?;
        let key = P::key(&event);
        let mut row = P::Model::find(conn, &key)?;
        let existed = row.is_some();
        checked_apply::<P, E>(event, &key, &mut row)?;
        match (existed, row) {
            (false, None) => {}
            (false, Some(r)) if !conn.dialect().serial_writers() && !raced => {
                // Nothing to lock when the row does not exist yet: a concurrent
                // append may insert it first. Then start over on its row.
                let inserted =
                    conn.transaction(|c| P::Model::insert_many(c, std::slice::from_ref(&r)));
                match inserted {
                    Ok(_) => {}
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) => {
                        raced = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            (false, Some(r)) => {
                P::Model::insert_many(conn, std::slice::from_ref(&r))?;
            }
            (true, Some(r)) => {
                P::Model::update(conn, &r)?;
            }
            (true, None) => {
                P::Model::delete_many(conn, std::slice::from_ref(&key))?;
            }
        }
        return Ok(());
    }
}

fn rows_of<M: ReadModel>(batch: &mut dyn RowBatch) -> &mut Rows<M> {
    batch
        .as_any()
        .downcast_mut::<Rows<M>>()
        .expect("a rebuild hands each row-level projector the row batch of its own read model")
}

fn row_want<P: RowProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    batch: &mut dyn RowBatch,
) -> Result<(), Failure> {
    let event = ev.decode::<E>()?;
    rows_of::<P::Model>(batch).wanted.push(P::key(&event));
    Ok(())
}

fn row_fold<P: RowProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    batch: &mut dyn RowBatch,
) -> Result<(), Failure> {
    let event = ev.decode::<E>()?;
    let key = P::key(&event);
    let rows = rows_of::<P::Model>(batch);
    let slot = rows.slots.entry(key.clone()).or_insert(Slot {
        existed: false,
        row: None,
    });
    checked_apply::<P, E>(event, &key, &mut slot.row)
}

fn sql_apply<P: SqlProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    conn: &mut DbConnection,
) -> Result<(), Failure> {
    let event = ev.decode::<E>()?;
    P::apply(event, conn).map_err(Failure::Projector)
}

/// The handler of a row-level projector for `E`.
#[doc(hidden)]
pub const fn row_handler<P: RowProjection<E>, E: EventType>() -> Handler {
    Handler {
        event_type: E::NAME,
        kind: HandlerKind::Row {
            inline: row_inline::<P, E>,
            want: row_want::<P, E>,
            fold: row_fold::<P, E>,
        },
    }
}

/// The handler of a SQL-level projector for `E`.
#[doc(hidden)]
pub const fn sql_handler<P: SqlProjection<E>, E: EventType>() -> Handler {
    Handler {
        event_type: E::NAME,
        kind: HandlerKind::Sql {
            apply: sql_apply::<P, E>,
        },
    }
}

/// What a projector function may return: `()` or `Result<(), E>`.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "a projector returns `()` or `Result<(), E>` where `E` converts into a boxed error, not `{Self}`",
    label = "unsupported return type",
    note = "write `-> Result<(), diesel::result::Error>` (or any std::error::Error type), or return nothing"
)]
pub trait ProjectorOutput {
    fn into_result(self) -> Result<(), BoxError>;
}

impl ProjectorOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> ProjectorOutput for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// `Self` can hold an `E` event: the parameter type of a projector listed
/// `on = E` (the event itself, or an event enum with a variant for it).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "the projector takes `&Recorded<{Self}>`, which cannot hold a `{E}` event",
    label = "`{E}` is listed in `on`",
    note = "take `&Recorded<{E}>`, or an event enum with a variant wrapping `{E}`"
)]
pub trait HoldsEvent<E> {
    fn hold(event: E) -> Self;
}

impl<E, T: From<E>> HoldsEvent<E> for T {
    fn hold(event: E) -> Self {
        T::from(event)
    }
}
