use crate::{DecodeError, EncodeError, Metadata};
use uuid::Uuid;

/// A fact that happened, stored as one row of the append-only log.
///
/// Implemented by `#[derive(Event)]`, either on a struct (one event type) or
/// on an enum whose variants each wrap one event struct (all the events of
/// one aggregate). Events are values: they carry the data that was true when
/// they happened, not references to rows that may change later.
pub trait Event: Sized + Send + Sync + 'static {
    /// Every event type name this Rust type decodes.
    const EVENT_TYPES: &'static [&'static str];

    /// The stored type name of this value.
    fn event_type(&self) -> &'static str;

    /// The schema version this code writes for this value.
    fn event_version(&self) -> u16;

    /// The JSON payload.
    fn encode(&self) -> Result<String, EncodeError>;

    /// Rebuilds a value from a stored row, upcasting older versions.
    fn decode(event_type: &str, event_version: u16, payload: &str) -> Result<Self, DecodeError>;

    /// Whether a stored event of `event_type` decodes into this type.
    fn handles(event_type: &str) -> bool {
        Self::EVENT_TYPES.contains(&event_type)
    }

    /// What this event is about, as tags such as `"course:c1"` (see
    /// [`crate::tag`]): stored in an index beside the event, so that a
    /// [`Query`](crate::Query) finds the events of several streams that
    /// concern one thing. Declared with `#[event(tag = "course:{course_id}")]`;
    /// none by default.
    fn tags(&self) -> Vec<String> {
        Vec::new()
    }
}

/// An event struct: exactly one stored type name and one current version.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event type",
    label = "not an event: a projector listens to event structs",
    note = "add #[derive(Event)] to `{Self}`, or list event structs in `on = [..]`"
)]
pub trait EventType: Event {
    /// The stored type name (default: the struct's name).
    const NAME: &'static str;
    /// The current schema version (default: 1).
    const VERSION: u16;
}

/// An event ready to be appended: encoded, with its id and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub event_version: u16,
    /// JSON text.
    pub payload: String,
    pub metadata: Metadata,
    /// What the event is about (see [`Event::tags`]), sorted, without
    /// repeats.
    pub tags: Vec<String>,
}

impl NewEvent {
    /// Encodes `event` with a fresh time-ordered id (UUID v7) and empty metadata.
    ///
    /// Fails when the payload could not be stored on every backend or read
    /// back: a NUL character in a string or key (the error names its JSON
    /// path), a non-finite float field, or nesting deeper than 127 levels.
    pub fn new<E: Event>(event: &E) -> Result<Self, EncodeError> {
        let event_type = event.event_type();
        let payload = event.encode()?;
        EncodeError::check_payload(event_type, &payload)?;
        let tags = crate::tag::normalize(event.tags());
        crate::tag::check_tags(event_type, &tags)?;
        Ok(NewEvent {
            event_id: Uuid::now_v7(),
            event_type,
            event_version: event.event_version(),
            payload,
            metadata: Metadata::default(),
            tags,
        })
    }

    /// Checks what the store checks before appending: the payload as in
    /// [`NewEvent::new`] (its fields are public, so it may have been built
    /// by hand) and the metadata as in [`Metadata::validate`].
    pub fn check(&self) -> Result<(), EncodeError> {
        EncodeError::check_payload(self.event_type, &self.payload)?;
        crate::tag::check_tags(self.event_type, &self.tags)?;
        self.metadata
            .validate()
            .map_err(|source| EncodeError::Metadata {
                event_type: self.event_type,
                source,
            })
    }

    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Replaces the tags (sorted and deduplicated here).
    pub fn with_tags(mut self, tags: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.tags = crate::tag::normalize(tags.into_iter().map(Into::into).collect());
        self
    }
}

/// A Rust type that `#[derive(Event)]` registered under a stored name.
#[derive(Debug)]
pub struct EventRegistration {
    /// The stored type name.
    pub name: &'static str,
    pub version: u16,
    /// `crate::module::Type`.
    pub rust_type: &'static str,
    /// Declared with `#[event(copy)]`: another Rust shape of events that a
    /// different type owns (the fields a consumer crate reads, or an old
    /// version kept to write test logs), so it may share the owner's name.
    pub copy: bool,
    /// The tags of a stored payload of this type (decoded, upcast, then
    /// [`Event::tags`]), when the type declares tags: how `migrate` tags
    /// events appended before the declaration.
    pub tags: Option<TagsOf>,
    /// The tag declaration as written (`#[event(tag = ..)]`), compared by
    /// `migrate` to the one the stored tags were computed with.
    pub tag_spec: &'static str,
}

/// The tags of a stored event: (event_version, payload) -> tags.
pub type TagsOf = fn(u16, &str) -> Result<Vec<String>, DecodeError>;

inventory::collect!(EventRegistration);

/// Every event struct linked into this program, sorted by stored name and
/// Rust path (enums of event structs are not listed: their variants are).
pub fn registered_event_types() -> Vec<&'static EventRegistration> {
    let mut all: Vec<_> = inventory::iter::<EventRegistration>.into_iter().collect();
    all.sort_by_key(|r| (r.name, r.rust_type));
    all.dedup_by_key(|r| (r.name, r.rust_type));
    all
}

/// A stored name that more than one Rust type claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameClash {
    /// "event type" or "event view".
    pub kind: &'static str,
    pub name: &'static str,
    /// The claiming Rust types, sorted.
    pub rust_types: Vec<&'static str>,
}

/// Event type names stored by two Rust types that are not `#[event(copy)]`,
/// and typed view names generated by two event types: events of one would
/// be decoded as the other, and one view would replace the other.
pub fn name_clashes() -> Vec<NameClash> {
    let mut clashes = Vec::new();
    let types = registered_event_types();
    for group in types.chunk_by(|a, b| a.name == b.name) {
        let owners: Vec<_> = group
            .iter()
            .filter(|r| !r.copy)
            .map(|r| r.rust_type)
            .collect();
        if owners.len() > 1 {
            clashes.push(NameClash {
                kind: "event type",
                name: group[0].name,
                rust_types: owners,
            });
        }
    }
    let mut views: Vec<_> = crate::view::event_views();
    views.sort_by_key(|v| (v.name, v.rust_type));
    views.dedup_by_key(|v| (v.name, v.rust_type));
    for group in views.chunk_by(|a, b| a.name == b.name) {
        if group.len() > 1 {
            clashes.push(NameClash {
                kind: "event view",
                name: group[0].name,
                rust_types: group.iter().map(|v| v.rust_type).collect(),
            });
        }
    }
    clashes
}
