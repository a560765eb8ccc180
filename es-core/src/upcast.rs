//! Event schema versions: upcasters turn a stored older payload into the
//! shape of the next version, step by step, on every read path.

use crate::{BoxError, DecodeError};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::OnceLock;

/// One step of an event's schema history: version `from` to `from + 1`.
///
/// Registered with `inventory::submit!` (the `#[upcaster]` attribute does it).
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u16,
    pub upcast: fn(Value) -> Result<Value, BoxError>,
    /// The function's path, to name it when two upcasters claim the same step.
    pub name: &'static str,
}

impl std::fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upcaster")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("name", &self.name)
            .finish()
    }
}

inventory::collect!(Upcaster);

/// Event type -> from version -> upcasters (more than one is an error).
type Steps = HashMap<&'static str, HashMap<u16, Vec<&'static Upcaster>>>;

/// Built once: inventory iteration is unordered and walks a linked list.
fn registry() -> &'static Steps {
    static REGISTRY: OnceLock<Steps> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut steps = Steps::new();
        for u in inventory::iter::<Upcaster> {
            steps
                .entry(u.event_type)
                .or_default()
                .entry(u.from_version)
                .or_default()
                .push(u);
        }
        for list in steps.values_mut().flat_map(HashMap::values_mut) {
            list.sort_by_key(|u| u.name);
        }
        steps
    })
}

/// Every registered upcaster, sorted by event type and version.
pub fn upcasters() -> Vec<&'static Upcaster> {
    let mut all: Vec<_> = registry()
        .values()
        .flat_map(HashMap::values)
        .flatten()
        .copied()
        .collect();
    all.sort_by_key(|u| (u.event_type, u.from_version, u.name));
    all
}

/// Fails when two upcasters convert the same event type from the same
/// version (reading such an event fails too); call it at start-up to find
/// out before the first read.
pub fn check_upcasters() -> Result<(), DecodeError> {
    let first = upcasters()
        .windows(2)
        .find(|w| (w[0].event_type, w[0].from_version) == (w[1].event_type, w[1].from_version))
        .map(|w| w[0]);
    match first {
        None => Ok(()),
        Some(u) => Err(duplicate(
            u.event_type,
            u.from_version,
            &registry()[u.event_type][&u.from_version],
        )),
    }
}

fn duplicate(event_type: &str, from: u16, list: &[&'static Upcaster]) -> DecodeError {
    DecodeError::DuplicateUpcaster {
        event_type: event_type.to_owned(),
        from,
        names: list.iter().map(|u| u.name).collect(),
    }
}

fn find(event_type: &str, from: u16) -> Result<Option<&'static Upcaster>, DecodeError> {
    match registry()
        .get(event_type)
        .and_then(|steps| steps.get(&from))
        .map(Vec::as_slice)
    {
        None | Some([]) => Ok(None),
        Some([one]) => Ok(Some(one)),
        Some(list) => Err(duplicate(event_type, from, list)),
    }
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
        let step = find(event_type, from)?.ok_or_else(|| DecodeError::NoUpcaster {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn add_field(mut v: Value) -> Result<Value, BoxError> {
        v["added"] = Value::from(true);
        Ok(v)
    }

    fn double(mut v: Value) -> Result<Value, BoxError> {
        let n = v["n"].as_i64().ok_or("`n` is not a number")?;
        v["n"] = Value::from(n * 2);
        Ok(v)
    }

    inventory::submit! { Upcaster { event_type: "Chained", from_version: 1, upcast: double, name: "tests::double" } }
    inventory::submit! { Upcaster { event_type: "Chained", from_version: 2, upcast: add_field, name: "tests::add_field" } }
    inventory::submit! { Upcaster { event_type: "Twice", from_version: 1, upcast: add_field, name: "tests::b" } }
    inventory::submit! { Upcaster { event_type: "Twice", from_version: 1, upcast: double, name: "tests::a" } }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Chained {
        n: i64,
        added: bool,
    }

    #[test]
    fn steps_apply_in_order_from_the_stored_version() {
        let v1 = decode_payload::<Chained>("Chained", 3, 1, r#"{"n":21}"#).unwrap();
        assert_eq!(v1, Chained { n: 42, added: true });
        let v2 = decode_payload::<Chained>("Chained", 3, 2, r#"{"n":21}"#).unwrap();
        assert_eq!(v2, Chained { n: 21, added: true });
        let v3 = decode_payload::<Chained>("Chained", 3, 3, r#"{"n":5,"added":false}"#).unwrap();
        assert_eq!(v3, Chained { n: 5, added: false });
    }

    #[test]
    fn a_missing_step_is_named() {
        let err = decode_payload::<Chained>("Chained", 4, 1, r#"{"n":1}"#).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::NoUpcaster {
                    stored: 1,
                    current: 4,
                    missing: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("#[upcaster(Chained, from = 3)]"),
            "{err}"
        );
    }

    #[test]
    fn a_future_version_is_refused() {
        let err = decode_payload::<Chained>("Chained", 2, 3, "{}").unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::FutureVersion {
                    stored: 3,
                    current: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn an_upcaster_error_names_its_step() {
        let err = decode_payload::<Chained>("Chained", 3, 1, r#"{"n":"x"}"#).unwrap_err();
        match err {
            DecodeError::Upcaster {
                event_type,
                from,
                source,
            } => {
                assert_eq!((event_type.as_str(), from), ("Chained", 1));
                assert_eq!(source.to_string(), "`n` is not a number");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_upcasters_for_one_step_are_reported_by_name() {
        let err = decode_payload::<Chained>("Twice", 2, 1, r#"{"n":1}"#).unwrap_err();
        assert!(
            matches!(&err, DecodeError::DuplicateUpcaster { from: 1, names, .. } if names == &["tests::a", "tests::b"]),
            "{err:?}"
        );
        let checked = check_upcasters().unwrap_err();
        assert_eq!(checked.to_string(), err.to_string());
        assert!(err.to_string().contains("keep exactly one"), "{err}");
        assert_eq!(upcasters().len(), 4);
    }
}
