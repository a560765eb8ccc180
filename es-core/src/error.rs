/// A boxed error from user code (projectors, upcasters).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An event cannot be written to the log. Nothing was written.
///
/// Everything the store accepts can be read back on every backend, so what
/// one backend would refuse, or what this code could not read again, is
/// refused here for all of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde_json refused the value.
    #[error("cannot serialize event `{event_type}` to JSON: {source}")]
    Json {
        event_type: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A string or key of the payload holds a NUL character, which
    /// PostgreSQL cannot store in JSON.
    #[error("event `{event_type}` cannot be stored: its payload has a NUL character (\\u0000) at `{path}`, which PostgreSQL cannot store in JSON; remove it, or encode the field (e.g. base64) before storing it")]
    Nul {
        event_type: &'static str,
        /// JSON path of the string or key, e.g. `$.title` or `$.lines[2].text`.
        path: String,
    },
    /// A float field holds NaN or an infinity: JSON has no such number, so
    /// it would be written as `null` and could not be read back.
    #[error("event `{event_type}` cannot be stored: field `{path}` is {value}, which JSON cannot represent (it would be stored as null and fail to decode); store an Option or a finite value")]
    NonFinite {
        event_type: &'static str,
        /// JSON path of the field, e.g. `$.price`.
        path: &'static str,
        value: f64,
    },
    /// The payload nests arrays and objects deeper than can be read back.
    #[error("event `{event_type}` cannot be stored: its payload nests arrays and objects {depth} levels deep; at most {max} levels can be read back", max = crate::json::MAX_DEPTH)]
    TooDeep {
        event_type: &'static str,
        depth: usize,
    },
    /// A tag cannot be stored (see [`crate::validate_tag`]).
    #[error("event `{event_type}` cannot be stored: {source}")]
    Tag {
        event_type: &'static str,
        #[source]
        source: crate::TagError,
    },
    /// The metadata cannot be stored or read back.
    #[error("event `{event_type}` cannot be stored: {source}")]
    Metadata {
        event_type: &'static str,
        #[source]
        source: crate::MetadataError,
    },
}

impl EncodeError {
    /// The stored type name of the refused event.
    pub fn event_type(&self) -> &'static str {
        match self {
            EncodeError::Json { event_type, .. }
            | EncodeError::Nul { event_type, .. }
            | EncodeError::NonFinite { event_type, .. }
            | EncodeError::TooDeep { event_type, .. }
            | EncodeError::Tag { event_type, .. }
            | EncodeError::Metadata { event_type, .. } => event_type,
        }
    }

    /// Checks the JSON text of `event_type`'s payload.
    pub(crate) fn check_payload(event_type: &'static str, payload: &str) -> Result<(), Self> {
        crate::json::check_text(payload).map_err(|problem| match problem {
            crate::json::Problem::Nul { path } => EncodeError::Nul { event_type, path },
            crate::json::Problem::TooDeep { depth } => EncodeError::TooDeep { event_type, depth },
        })
    }
}

/// A stored payload could not be turned into the requested Rust type.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The stored event type is not one the Rust type knows.
    #[error("event type `{event_type}` is not one of {expected:?}")]
    UnknownType {
        event_type: String,
        expected: &'static [&'static str],
    },
    /// The stored version is newer than the code.
    #[error("`{event_type}` version {stored} is newer than this code's version {current}; deploy the newer code to read it")]
    FutureVersion {
        event_type: String,
        stored: u16,
        current: u16,
    },
    /// No registered upcaster leads from the stored version to the current one.
    #[error("`{event_type}` is stored at version {stored} but the code is at version {current}, and no upcaster converts version {missing}; register one with #[upcaster({event_type}, from = {missing})]")]
    NoUpcaster {
        event_type: String,
        stored: u16,
        current: u16,
        missing: u16,
    },
    /// Two upcasters claim the same step; remove all but one.
    #[error("`{event_type}` has {} upcasters from version {from}: {names:?}; keep exactly one", names.len())]
    DuplicateUpcaster {
        event_type: String,
        from: u16,
        names: Vec<&'static str>,
    },
    /// An upcaster returned an error.
    #[error("upcaster of `{event_type}` from version {from} failed: {source}")]
    Upcaster {
        event_type: String,
        from: u16,
        #[source]
        source: BoxError,
    },
    /// The JSON does not match the Rust type.
    #[error("payload does not match the Rust type: {0}")]
    Payload(#[source] serde_json::Error),
}
