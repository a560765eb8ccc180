/// A boxed error from user code (projectors, upcasters).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An event could not be serialized.
#[derive(Debug, thiserror::Error)]
#[error("cannot serialize event `{event_type}` to JSON: {source}")]
pub struct EncodeError {
    pub event_type: &'static str,
    #[source]
    pub source: serde_json::Error,
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
