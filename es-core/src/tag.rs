//! Tags (what an event is about) and queries over them: the read side of
//! decisions that span several streams (dynamic consistency boundaries).

use crate::{EncodeError, Event};
use std::fmt::Display;

/// The longest tag, in bytes: tags are index keys on every backend.
pub const MAX_TAG_BYTES: usize = 512;

/// The most tags one event may carry.
pub const MAX_TAGS: usize = 64;

/// The most items of one query, and the most tags of one item: a query is
/// one statement, within every backend's limit of bound values.
pub const MAX_QUERY_ITEMS: usize = 64;

/// A tag of the conventional form `key:value`, e.g. `tag("course", 42)` is
/// `"course:42"`: the form `#[event(tag = "course:{course_id}")]` writes.
pub fn tag(key: &str, value: impl Display) -> String {
    format!("{key}:{value}")
}

/// Why a tag cannot be stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("a tag cannot be empty")]
    Empty,
    #[error("tag `{shown}` is {bytes} bytes long; at most {MAX_TAG_BYTES} bytes are indexed")]
    TooLong { shown: String, bytes: usize },
    #[error("tag `{shown}` holds a NUL character (\\u0000), which PostgreSQL cannot store")]
    Nul { shown: String },
    #[error("{count} tags on one event; at most {MAX_TAGS} are allowed")]
    TooMany { count: usize },
    /// The event came without tags, and its payload does not decode as the
    /// registered type that declares them.
    #[error("its type declares tags, but its payload does not decode as that type to compute them: {reason}")]
    Undecodable { reason: String },
}

/// Checks one tag: not empty, at most [`MAX_TAG_BYTES`], no NUL.
pub fn validate_tag(tag: &str) -> Result<(), TagError> {
    let shown = || {
        tag.chars()
            .take(60)
            .collect::<String>()
            .replace('\0', "\\0")
    };
    if tag.is_empty() {
        Err(TagError::Empty)
    } else if tag.len() > MAX_TAG_BYTES {
        Err(TagError::TooLong {
            shown: format!("{}…", shown()),
            bytes: tag.len(),
        })
    } else if tag.contains('\0') {
        Err(TagError::Nul { shown: shown() })
    } else {
        Ok(())
    }
}

/// Sorted, without repeats: one canonical form per set of tags.
pub(crate) fn normalize(mut tags: Vec<String>) -> Vec<String> {
    tags.sort_unstable();
    tags.dedup();
    tags
}

pub(crate) fn check_tags(event_type: &'static str, tags: &[String]) -> Result<(), EncodeError> {
    let refuse = |source| EncodeError::Tag { event_type, source };
    if tags.len() > MAX_TAGS {
        return Err(refuse(TagError::TooMany { count: tags.len() }));
    }
    tags.iter()
        .try_for_each(|t| validate_tag(t))
        .map_err(refuse)
}

/// Events of some types and tags: an event matches an item when its type is
/// one of the item's types (any type if none is given) and it carries every
/// tag of the item (any tags if none is given).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct QueryItem {
    pub types: Vec<String>,
    pub tags: Vec<String>,
}

impl QueryItem {
    /// Whether an event of `event_type` with `tags` matches this item.
    pub fn matches(&self, event_type: &str, tags: &[String]) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t == event_type))
            && self.tags.iter().all(|t| tags.contains(t))
    }
}

/// The events a decision depends on: any event matching one of its items.
///
/// ```
/// # use es_core::{Query, tag};
/// let course = Query::types(["CourseDefined", "StudentEnrolled"]).tagged(tag("course", "c1"));
/// let student = Query::types(["StudentEnrolled"]).tagged(tag("student", "s7"));
/// let both = course.or(student);
/// assert_eq!(both.items().len(), 2);
/// assert!(both.matches("StudentEnrolled", &["student:s7".to_owned()]));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Query {
    items: Vec<QueryItem>,
}

impl Query {
    /// One item: events of these types (any tags, until [`Query::tagged`]).
    pub fn types<S: Into<String>>(types: impl IntoIterator<Item = S>) -> Self {
        Query {
            items: vec![QueryItem {
                types: types.into_iter().map(Into::into).collect(),
                tags: Vec::new(),
            }],
        }
    }

    /// One item: the event types that `E` decodes.
    pub fn of<E: Event>() -> Self {
        Self::types(E::EVENT_TYPES.iter().copied())
    }

    /// One item: events of any type carrying `tag`.
    pub fn tag(tag: impl Into<String>) -> Self {
        Query {
            items: vec![QueryItem {
                types: Vec::new(),
                tags: vec![tag.into()],
            }],
        }
    }

    /// Narrows the last item (the one `types`, `of` or `tag` made, or the
    /// last one `or` added) to events that also carry `tag`. To narrow
    /// several items, narrow each before joining them with [`Query::or`].
    pub fn tagged(mut self, tag: impl Into<String>) -> Self {
        if self.items.is_empty() {
            self.items.push(QueryItem::default());
        }
        let last = self.items.last_mut().expect("one item");
        last.tags.push(tag.into());
        last.tags = normalize(std::mem::take(&mut last.tags));
        self
    }

    /// Events matching this query or `other`.
    pub fn or(mut self, other: Query) -> Self {
        self.items.extend(other.items);
        self
    }

    /// Adds one item.
    pub fn with_item(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    pub fn items(&self) -> &[QueryItem] {
        &self.items
    }

    /// Whether an event of `event_type` with `tags` matches some item.
    pub fn matches(&self, event_type: &str, tags: &[String]) -> bool {
        self.items.iter().any(|i| i.matches(event_type, tags))
    }

    /// Checks that the query can be run: at least one item, none that
    /// matches every event, valid tags.
    pub fn validate(&self) -> Result<(), QueryError> {
        if self.items.is_empty() {
            return Err(QueryError::Empty);
        }
        if self.items.len() > MAX_QUERY_ITEMS {
            return Err(QueryError::TooLarge {
                what: "items",
                count: self.items.len(),
            });
        }
        for (index, item) in self.items.iter().enumerate() {
            if item.tags.len() > MAX_QUERY_ITEMS || item.types.len() > 4 * MAX_QUERY_ITEMS {
                return Err(QueryError::TooLarge {
                    what: "tags or types in one item",
                    count: item.tags.len().max(item.types.len()),
                });
            }
            if item.types.is_empty() && item.tags.is_empty() {
                return Err(QueryError::MatchesEverything { index });
            }
            if item.types.iter().any(String::is_empty) {
                return Err(QueryError::EmptyType { index });
            }
            for t in &item.tags {
                validate_tag(t).map_err(|source| QueryError::Tag { index, source })?;
            }
        }
        Ok(())
    }
}

/// A query that cannot be run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the query has no item; build one with Query::of::<Events>(), Query::types([..]) or Query::tag(..)")]
    Empty,
    #[error("item {index} of the query has neither event types nor tags, so it matches every event; narrow it with .tagged(..) or give types")]
    MatchesEverything { index: usize },
    #[error("the query has {count} {what}; at most {MAX_QUERY_ITEMS} items of at most {MAX_QUERY_ITEMS} tags (and {} types) each", 4 * MAX_QUERY_ITEMS)]
    TooLarge { what: &'static str, count: usize },
    #[error("item {index} of the query names an empty event type")]
    EmptyType { index: usize },
    #[error("item {index} of the query: {source}")]
    Tag {
        index: usize,
        #[source]
        source: TagError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_match_types_and_all_tags() {
        let q = Query::types(["A", "B"]).tagged("x:1").tagged("y:2");
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(q.matches("A", &tags(&["x:1", "y:2", "z"])));
        assert!(!q.matches("A", &tags(&["x:1"])));
        assert!(!q.matches("C", &tags(&["x:1", "y:2"])));
        assert!(Query::tag("x:1").matches("Anything", &tags(&["x:1"])));
    }

    #[test]
    fn invalid_queries_are_refused() {
        assert_eq!(Query::default().validate(), Err(QueryError::Empty));
        assert_eq!(
            Query::types(Vec::<String>::new()).validate(),
            Err(QueryError::MatchesEverything { index: 0 })
        );
        assert!(matches!(
            Query::tag("a\0b").validate(),
            Err(QueryError::Tag { index: 0, .. })
        ));
        assert!(matches!(
            Query::tag("x".repeat(MAX_TAG_BYTES + 1)).validate(),
            Err(QueryError::Tag { .. })
        ));
    }
}
