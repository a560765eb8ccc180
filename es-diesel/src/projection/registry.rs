//! The registry of projectors and read models linked into the program:
//! built once, sorted, with duplicates and orphans reported.

use super::{Handler, Projector, ProjectorInfo};
use crate::error::{Duplicate, Error, RegistryError, Result};
use crate::read_model::{ReadModelEntry, ReadModelSchema};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

/// The projectors and read models linked into this program, sorted by name.
pub(crate) struct Registry {
    pub projectors: Vec<&'static Projector>,
    pub read_models: Vec<&'static ReadModelEntry>,
    /// For each event type: (projector, its handler) in projector-name order,
    /// for every read model.
    pub(super) by_event: HashMap<&'static str, Vec<(&'static Projector, &'static Handler)>>,
    /// The same, for the inline read models only.
    pub(super) inline_by_event: HashMap<&'static str, Vec<(&'static Projector, &'static Handler)>>,
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
