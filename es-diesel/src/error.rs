use es_core::{DecodeError, EncodeError, ExpectedVersion, StreamIdError};

/// The actual version in an [`Error::Conflict`] that a failed statement
/// raised: it is not known until the failed transaction has been rolled
/// back; the store fills it in then.
pub(crate) const ACTUAL_UNKNOWN: i64 = i64::MIN;

/// Where a conflict found the stream, for its message.
fn stream_at(actual: i64) -> String {
    if actual == ACTUAL_UNKNOWN {
        "at a version another writer just wrote (not read yet)".to_owned()
    } else {
        format!("at version {actual}")
    }
}

/// Everything the store can fail with. Variants carry what you need to act.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another writer got there first; nothing of the append was written.
    /// Reload the stream and decide again.
    #[error("version conflict on stream `{stream}`: expected {expected}, but the stream is {}; nothing was written", stream_at(*actual))]
    Conflict {
        stream: String,
        expected: ExpectedVersion,
        actual: i64,
    },

    /// An append conditioned on a read ([`AppendCondition`](crate::AppendCondition))
    /// found that events matching its query were appended since that read;
    /// nothing was written. Read again and decide again
    /// ([`EventStore::decide`](crate::EventStore::decide) does).
    #[error("events matching the decision's query were appended since it read them ({seen} matched then, up to position {position}; {now} match now); nothing was written: read and decide again")]
    ConditionFailed { seen: u64, now: u64, position: i64 },

    /// A query of events that cannot be run.
    #[error("invalid query: {0}")]
    InvalidQuery(#[from] es_core::QueryError),

    /// An event with this id is already in the log (appends of events
    /// with ids you chose, e.g. an import, are idempotent through this).
    #[error(
        "an event with id {event_id} is already in the log; nothing of this append was written"
    )]
    DuplicateEventId { event_id: uuid::Uuid },

    #[error("invalid stream id {stream:?}: {source}")]
    InvalidStreamId {
        stream: String,
        #[source]
        source: StreamIdError,
    },

    #[error(transparent)]
    Encode(#[from] EncodeError),

    /// A stored event cannot be read as the requested type.
    #[error("cannot decode the event at global position {position} (`{event_type}` version {event_version} in stream `{stream}`): {source}")]
    Decode {
        position: i64,
        stream: String,
        event_type: String,
        event_version: u16,
        #[source]
        source: DecodeError,
    },

    /// A stored row is not what the store wrote (edited by hand?).
    #[error("malformed stored event at global position {position}: {reason}")]
    Malformed { position: i64, reason: String },

    /// A projector failed on an event. Inline, the whole append was rolled
    /// back and nothing was written; in a rebuild, the rebuild was.
    #[error("projector `{projector}` failed on the event at global position {position} (`{event_type}` in stream `{stream}`): {source}")]
    Projector {
        projector: String,
        position: i64,
        stream: String,
        event_type: String,
        #[source]
        source: es_core::BoxError,
    },

    /// Projectors or read models are registered twice (or feed no table),
    /// or two Rust types store events or typed views under one name.
    #[error("invalid registry of events, projectors and read models: {0}")]
    Registry(#[from] RegistryError),

    /// [`check_projectors`](crate::check_projectors) found event types no
    /// registered projector handles, typically because a crate holding
    /// projectors is not linked: refer to it from the application, e.g.
    /// `use my_projectors as _;`.
    #[error("missing projectors: {}; registered: [{}]. A crate that only registers projectors must be referenced by the program (`use that_crate as _;`) or the linker drops it", describe_missing(.missing), .registered.join("; "))]
    MissingProjectors {
        /// (read model, event type) pairs nothing handles.
        missing: Vec<(String, String)>,
        /// Every registered projector, as `name -> read_model on [types]`.
        registered: Vec<String>,
    },

    /// No read model with this table name is registered.
    #[error("no read model named `{name}` is registered; registered: [{}]", .known.join(", "))]
    UnknownReadModel { name: String, known: Vec<String> },

    /// The database aborted the transaction to break a deadlock, or because
    /// it could not be serialized with a concurrent one; nothing of it was
    /// written and running it again is safe. Appends and
    /// [`EventStore::execute`](crate::EventStore::execute) do so themselves;
    /// see [`Error::is_retryable`].
    #[error("the database aborted the transaction because of a concurrent one ({reason}); nothing was written, and it can be run again")]
    Transient {
        reason: &'static str,
        #[source]
        source: diesel::result::Error,
    },

    /// Another rebuild of this read model is running, in this process or
    /// another one; nothing was changed. Wait for it to finish.
    #[error("read model `{read_model}` is already being rebuilt by {holder}; this rebuild changed nothing: wait for that one to finish (a rebuild whose process died releases it within a minute)")]
    RebuildInProgress { read_model: String, holder: String },

    /// The read model is registered but its table is not in the database yet.
    #[error("read model `{read_model}` is not in this database yet: run migrate first")]
    ReadModelNotMigrated { read_model: String },

    /// While this rebuild ran, `migrate` (of a newer version of the
    /// application) gave the read model another shape; the rebuild changed
    /// nothing, and `migrate` builds the new shape.
    #[error("read model `{read_model}` changed shape while it was being rebuilt (a newer version migrated it); this rebuild changed nothing")]
    ReadModelChanged { read_model: String },

    /// The log cannot be followed safely this way (see [`crate::follow`]).
    #[error("cannot follow the log: {reason}")]
    Follow { reason: String },

    #[error("database error: {0}")]
    Database(diesel::result::Error),

    /// The SQLite file does not exist, and the store was opened without
    /// [`StoreOptions::create_if_missing`](crate::StoreOptions::create_if_missing).
    #[error("the SQLite database `{path}` does not exist; create it with `admin migrate`, or check the path")]
    DatabaseNotFound { path: String },

    /// [`EventStore::check_migrated`](crate::EventStore::check_migrated)
    /// found tables or views missing or out of date.
    #[error("{database} is not migrated: {}; run `admin migrate` (EventStore::migrate) first", .missing.join(", "))]
    NotMigrated {
        /// Where the store is (see [`EventStore::location`](crate::EventStore::location)).
        database: String,
        /// What `migrate` would create or change.
        missing: Vec<String>,
    },

    #[error("cannot connect to the database: {0}")]
    Connection(#[from] diesel::ConnectionError),

    #[error("no database connection available: {0}")]
    Pool(#[from] r2d2::Error),

    /// An aggregate's state cannot be serialized for a snapshot.
    #[error("cannot serialize the state of aggregate `{aggregate}` (stream `{stream}`) for a snapshot: {source}")]
    Snapshot {
        aggregate: &'static str,
        stream: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: diesel::result::Error,
    },
}

fn describe_missing(missing: &[(String, String)]) -> String {
    missing
        .iter()
        .map(|(m, t)| format!("nothing handles `{t}` for read model `{m}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn decode(ev: &es_core::RecordedEvent, source: DecodeError) -> Self {
        Error::Decode {
            position: ev.global_position,
            stream: ev.stream_id.clone(),
            event_type: ev.event_type.clone(),
            event_version: ev.event_version,
            source,
        }
    }

    /// Is this a lost optimistic-concurrency race: a stream at another
    /// version, or a failed [append condition](crate::AppendCondition)?
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::ConditionFailed { .. })
    }

    /// Did the database abort the transaction because of a concurrent one
    /// (a deadlock or a serialization failure), also inside a projector?
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transient { .. } => true,
            Error::Projector { source, .. } => {
                source
                    .downcast_ref::<diesel::result::Error>()
                    .is_some_and(|e| transient_reason(e).is_some())
                    || source
                        .downcast_ref::<Error>()
                        .is_some_and(Error::is_transient)
            }
            _ => false,
        }
    }

    /// Can the operation that failed simply be run again, after reloading
    /// what it decided on? True for [conflicts](Self::is_conflict) and
    /// [transient aborts](Self::is_transient).
    pub fn is_retryable(&self) -> bool {
        self.is_conflict() || self.is_transient()
    }
}

impl From<diesel::result::Error> for Error {
    fn from(source: diesel::result::Error) -> Self {
        crate::backend::note_if_connection_lost(&source);
        match transient_reason(&source) {
            Some(reason) => Error::Transient { reason, source },
            None => Error::Database(source),
        }
    }
}

/// PostgreSQL's deadlock (40P01) and serialization failure (40001), MySQL's
/// deadlock and lock wait timeout. Diesel names the serialization failures;
/// the others are known by their message.
fn transient_reason(e: &diesel::result::Error) -> Option<&'static str> {
    use diesel::result::{DatabaseErrorKind, Error as E};
    match e {
        E::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
            Some("serialization failure")
        }
        E::DatabaseError(_, info) if info.message().starts_with("deadlock detected") => {
            Some("deadlock")
        }
        // MySQL's lock wait timeout (1205); its deadlock (1213) is named
        // by Diesel above.
        E::DatabaseError(_, info) if info.message().contains("try restarting transaction") => {
            Some("lock wait timeout")
        }
        _ => None,
    }
}

pub(crate) fn check_stream_id(stream: &str) -> Result<()> {
    es_core::validate_stream_id(stream).map_err(|source| Error::InvalidStreamId {
        stream: truncate(stream, 80),
        source,
    })
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_says_where_the_stream_is_or_that_it_is_not_read_yet() {
        let conflict = |actual| Error::Conflict {
            stream: "s".to_owned(),
            expected: ExpectedVersion::Exact(2),
            actual,
        };
        assert!(conflict(5)
            .to_string()
            .contains("the stream is at version 5;"));
        let unknown = conflict(ACTUAL_UNKNOWN).to_string();
        assert!(unknown.contains("another writer just wrote"), "{unknown}");
        assert!(!unknown.contains(&i64::MIN.to_string()), "{unknown}");
    }
}
