use crate::json::{self, MAX_DEPTH};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// What is known about why and by whom an event was written.
///
/// Stored as JSON beside the payload. The named fields have a fixed meaning
/// and their keys (`correlation_id`, `causation_id`, `actor`) are reserved;
/// anything else goes into `fields`.
///
/// The store refuses (with [`EncodeError::Metadata`](crate::EncodeError))
/// metadata it could not read back: a reserved key in `fields` holding a
/// value of the wrong type, or given twice, a NUL character in a string or
/// key, or nesting deeper than 127 levels. [`Metadata::validate`] runs the
/// same checks.
///
/// ```
/// # use es_core::Metadata;
/// let id = uuid::Uuid::now_v7();
/// let m = Metadata::new().with("correlation_id", id.to_string()).with("actor", "ann");
/// assert_eq!((m.correlation_id, m.actor.as_deref()), (Some(id), Some("ann")));
///
/// let wrong = Metadata::new().with("correlation_id", "req-42");
/// let err = wrong.validate().unwrap_err();
/// assert!(err.to_string().contains("`correlation_id` is reserved for a UUID"), "{err}");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metadata {
    /// Groups all events caused by one request or workflow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The event or command that directly caused this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Who did it (a user name, a service name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Free-form application fields.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// Metadata that cannot be stored, or could not be read back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// A reserved key holds a value of another type than its named field.
    #[error("metadata key `{key}` is reserved for {expected}, but holds {found}; use Metadata::{key}(..), or put this value under another key")]
    ReservedKey {
        key: &'static str,
        /// What the key holds when read back, e.g. "a UUID string".
        expected: &'static str,
        /// What it holds here, e.g. `the string "req-42"`.
        found: String,
    },
    /// A reserved key is set both as the named field and in `fields`.
    #[error(
        "metadata key `{key}` is given twice, as Metadata::{key}(..) and in `fields`; keep one"
    )]
    DuplicateKey { key: &'static str },
    /// A NUL character, which PostgreSQL cannot store in JSON.
    #[error("metadata has a NUL character (\\u0000) at `{path}`, which PostgreSQL cannot store in JSON; remove it")]
    Nul {
        /// JSON path of the string or key, e.g. `$.actor` or `$.tags[1]`.
        path: String,
    },
    /// Arrays and objects nested deeper than can be read back.
    #[error("metadata nests arrays and objects {depth} levels deep at `{path}`; at most {max} levels can be read back", max = MAX_DEPTH)]
    TooDeep { path: String, depth: usize },
}

/// The reserved keys, and what each must hold.
const RESERVED: [(&str, &str); 3] = [
    ("correlation_id", "a UUID string"),
    ("causation_id", "a UUID string"),
    ("actor", "a string"),
];

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.fields.remove("correlation_id");
        self.correlation_id = Some(id);
        self
    }

    pub fn causation_id(mut self, id: Uuid) -> Self {
        self.fields.remove("causation_id");
        self.causation_id = Some(id);
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.fields.remove("actor");
        self.actor = Some(actor.into());
        self
    }

    /// Adds a free-form field.
    ///
    /// A reserved key sets its named field when the value has its type (a
    /// UUID string for `correlation_id` and `causation_id`, a string for
    /// `actor`; `null` clears it). Otherwise the value is kept in `fields`
    /// and appending the event fails with an error naming the key and the
    /// expected type, because it could not be read back.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        let key = key.into();
        let value = value.into();
        if fits_reserved(&key, &value) {
            self.fields.remove(&key);
            self.set_reserved(&key, value);
            return self;
        }
        self.fields.insert(key, value);
        self
    }

    /// Sets the named field of a reserved key to a value that fits it.
    fn set_reserved(&mut self, key: &str, value: Value) {
        let text = match value {
            Value::String(s) => Some(s),
            _ => None,
        };
        match key {
            "correlation_id" => self.correlation_id = text.and_then(|s| Uuid::parse_str(&s).ok()),
            "causation_id" => self.causation_id = text.and_then(|s| Uuid::parse_str(&s).ok()),
            _ => self.actor = text,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.actor.is_none()
            && self.fields.is_empty()
    }

    /// Fails if this metadata cannot be stored, or could not be read back
    /// as it was written (see the type's documentation). Appending checks it.
    pub fn validate(&self) -> Result<(), MetadataError> {
        if self.fields.is_empty() {
            return match &self.actor {
                Some(actor) if actor.contains('\0') => Err(MetadataError::Nul {
                    path: "$.actor".into(),
                }),
                _ => Ok(()),
            };
        }
        for (key, expected) in RESERVED {
            let Some(value) = self.fields.get(key) else {
                continue;
            };
            let set = match key {
                "actor" => self.actor.is_some(),
                "correlation_id" => self.correlation_id.is_some(),
                _ => self.causation_id.is_some(),
            };
            if !fits_reserved(key, value) {
                return Err(MetadataError::ReservedKey {
                    key,
                    expected,
                    found: describe(value),
                });
            }
            if set {
                return Err(MetadataError::DuplicateKey { key });
            }
        }
        if self.actor.as_deref().is_some_and(|a| a.contains('\0')) {
            return Err(MetadataError::Nul {
                path: "$.actor".into(),
            });
        }
        for (key, value) in &self.fields {
            let mut path = String::from("$");
            json::push_key(&mut path, key);
            if key.contains('\0') || json::find_nul(value, &mut path) {
                return Err(MetadataError::Nul { path });
            }
            path.truncate(1);
            json::push_key(&mut path, key);
            // The metadata object itself is the first level.
            if let Some(depth) = json::too_deep(value, 1, &mut path) {
                return Err(MetadataError::TooDeep { path, depth });
            }
        }
        Ok(())
    }

    /// The JSON text stored in the `metadata` column. Check it can be read
    /// back with [`validate`](Self::validate) first, as appending does.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("metadata is plain JSON and always serializes")
    }

    /// Reads stored metadata. A reserved key holding another type than its
    /// named field (written before such metadata was refused) stays in
    /// `fields`, so that the event remains readable.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// Whether `key` is reserved and `value` fits its named field (`null` clears it).
fn fits_reserved(key: &str, value: &Value) -> bool {
    match (key, value) {
        ("correlation_id" | "causation_id" | "actor", Value::Null) => true,
        ("correlation_id" | "causation_id", Value::String(s)) => Uuid::parse_str(s).is_ok(),
        ("actor", Value::String(_)) => true,
        _ => false,
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let fields = Map::<String, Value>::deserialize(deserializer)?;
        let mut metadata = Metadata::default();
        for (key, value) in fields {
            if fits_reserved(&key, &value) {
                metadata.set_reserved(&key, value);
            } else {
                metadata.fields.insert(key, value);
            }
        }
        Ok(metadata)
    }
}

/// A value's JSON type, with a short excerpt.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if short.len() < s.len() { "…" } else { "" };
            format!("the string {}{more}", Value::from(short))
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reserved_keys_of_the_right_type_set_the_named_fields() {
        let id = Uuid::now_v7();
        let m = Metadata::new()
            .with("correlation_id", id.to_string())
            .with("causation_id", id.simple().to_string())
            .with("actor", "ann")
            .with("tenant", 7);
        assert_eq!(m.correlation_id, Some(id));
        assert_eq!(m.causation_id, Some(id));
        assert_eq!(m.actor.as_deref(), Some("ann"));
        assert_eq!(m.fields, json!({"tenant": 7}).as_object().unwrap().clone());
        m.validate().unwrap();
        assert_eq!(Metadata::from_json(&m.to_json()).unwrap(), m);
        let cleared = m.with("actor", Value::Null);
        assert_eq!(cleared.actor, None);
    }

    #[test]
    fn reserved_keys_of_another_type_are_refused_by_name() {
        for (key, value, expected) in [
            ("correlation_id", json!("req-42"), "a UUID string"),
            ("correlation_id", json!(5), "a UUID string"),
            ("causation_id", json!({"id": 1}), "a UUID string"),
            ("actor", json!(5), "a string"),
            ("actor", json!(["ann"]), "a string"),
            ("actor", json!(true), "a string"),
        ] {
            let m = Metadata::new().with(key, value.clone());
            let err = m.validate().unwrap_err();
            assert!(
                matches!(&err, MetadataError::ReservedKey { key: k, expected: e, .. } if *k == key && *e == expected),
                "{key} = {value}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
        }
        let mut m = Metadata::new().actor("ann");
        m.fields.insert("actor".into(), json!("bob"));
        assert_eq!(
            m.validate(),
            Err(MetadataError::DuplicateKey { key: "actor" })
        );
    }

    #[test]
    fn nul_and_deep_nesting_are_refused_with_their_path() {
        let m = Metadata::new().with("note", json!({"lines": ["ok", "a\u{0}"]}));
        assert_eq!(
            m.validate(),
            Err(MetadataError::Nul {
                path: "$.note.lines[1]".into()
            })
        );
        let m = Metadata::new().actor("a\u{0}");
        assert_eq!(
            m.validate(),
            Err(MetadataError::Nul {
                path: "$.actor".into()
            })
        );
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH - 1 {
            deep = json!([deep]);
        }
        let fits = Metadata::new().with("deep", deep.clone());
        fits.validate().unwrap();
        assert_eq!(Metadata::from_json(&fits.to_json()).unwrap(), fits);
        let m = Metadata::new().with("deep", json!([deep]));
        let err = m.validate().unwrap_err();
        assert!(
            matches!(&err, MetadataError::TooDeep { depth, path } if *depth == MAX_DEPTH + 1 && path.starts_with("$.deep[0][0]")),
            "{err:?}"
        );
        assert!(Metadata::from_json(&m.to_json()).is_err());
    }

    #[test]
    fn metadata_stored_before_it_was_checked_is_still_read() {
        let m = Metadata::from_json(r#"{"correlation_id":"req-42","actor":5,"x":1}"#).unwrap();
        assert_eq!((m.correlation_id, &m.actor), (None, &None));
        assert_eq!(
            m.fields,
            json!({"correlation_id": "req-42", "actor": 5, "x": 1})
                .as_object()
                .unwrap()
                .clone()
        );
        let id = Uuid::now_v7();
        let twice = format!(r#"{{"actor":"ann","actor":"bob","causation_id":"{id}"}}"#);
        let m = Metadata::from_json(&twice).unwrap();
        assert_eq!(
            (m.actor.as_deref(), m.causation_id),
            (Some("bob"), Some(id))
        );
    }
}
