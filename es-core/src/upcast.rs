//! Event schema versions: upcasters turn a stored older payload into the
//! shape of the next version, step by step, on every read path.

use crate::{BoxError, DecodeError};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One step of an event's schema history: version `from` to `from + 1`.
///
/// Registered with `inventory::submit!` (the `#[upcaster]` attribute does it).
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u16,
    pub upcast: fn(Value) -> Result<Value, BoxError>,
}

inventory::collect!(Upcaster);

fn find(event_type: &str, from: u16) -> Option<&'static Upcaster> {
    inventory::iter::<Upcaster>
        .into_iter()
        .find(|u| u.event_type == event_type && u.from_version == from)
}

/// Decodes a stored payload of `event_type` at `stored` version into the
/// current version `current` of `T`, applying upcasters as needed.
pub fn decode_payload<T: DeserializeOwned>(
    event_type: &'static str,
    current: u16,
    stored: u16,
    payload: &str,
) -> Result<T, DecodeError> {
    if stored == current {
        return serde_json::from_str(payload).map_err(DecodeError::Payload);
    }
    if stored > current {
        return Err(DecodeError::FutureVersion {
            event_type: event_type.to_owned(),
            stored,
            current,
        });
    }
    let mut value: Value = serde_json::from_str(payload).map_err(DecodeError::Payload)?;
    for from in stored..current {
        let step = find(event_type, from).ok_or_else(|| DecodeError::NoUpcaster {
            event_type: event_type.to_owned(),
            stored,
            current,
            missing: from,
        })?;
        value = (step.upcast)(value).map_err(|source| DecodeError::Upcaster {
            event_type: event_type.to_owned(),
            from,
            source,
        })?;
    }
    serde_json::from_value(value).map_err(DecodeError::Payload)
}
