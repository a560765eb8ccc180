//! Beginning with an existing application ("How to begin with?"): turn the
//! rows of its tables into initial events, in large batches, idempotently.

use crate::append::{StreamWrite, RACE_RETRIES};
use crate::backend::rows::Name;
use crate::backend::{write_transaction, DbConnection, ListOf, Stmt};
use crate::error::{Error, Result};
use crate::projection::append_events;
use crate::EventStore;
use es_core::{Event, ExpectedVersion, Metadata, NewEvent};
use std::collections::HashSet;
use uuid::Uuid;

/// Namespace of the event ids of imported rows (UUID v5).
const IMPORT_NAMESPACE: Uuid = Uuid::from_u128(0x6573_6469_6573_656c_2d69_6d70_6f72_7401);

/// One row of the existing application, as an event for a stream.
#[derive(Clone, Debug)]
pub struct ImportRow<E> {
    pub stream_id: String,
    /// What identifies the row in the old system (its primary key). Together
    /// with the import's source name it fixes the event id, which makes a
    /// repeated import skip what is already there.
    pub key: String,
    pub event: E,
}

/// Settings of [`EventStore::import`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Names the old table or system; part of every event id.
    pub source: String,
    /// Rows per transaction.
    pub batch_size: usize,
    /// Metadata on every imported event (e.g. `actor = "import"`).
    pub metadata: Metadata,
}

impl ImportOptions {
    pub fn new(source: impl Into<String>) -> Self {
        ImportOptions {
            source: source.into(),
            batch_size: 1_000,
            metadata: Metadata::new().actor("import"),
        }
    }
}

/// What an import did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Events appended.
    pub imported: u64,
    /// Rows already imported earlier (same source and key).
    pub skipped: u64,
}

/// The event id an imported row gets.
pub fn import_event_id(source: &str, key: &str) -> Uuid {
    Uuid::new_v5(&IMPORT_NAMESPACE, format!("{source}\u{0}{key}").as_bytes())
}

fn existing_ids(conn: &mut DbConnection, ids: &[Uuid]) -> Result<HashSet<Uuid>> {
    let texts: Vec<String> = ids.iter().map(|u| u.hyphenated().to_string()).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let d = conn.dialect();
    let (any, binds) = d.any_of(&texts, ListOf::Uuid);
    let mut q = Stmt::new(format!(
        "SELECT {} AS name FROM es_events WHERE event_id {any}",
        d.as_text("event_id")
    ))
    .uncached();
    binds.into_iter().for_each(|b| q.push(b));
    let found: Vec<Name> = q.load(conn)?;
    Ok(found
        .iter()
        .filter_map(|f| Uuid::parse_str(&f.name).ok())
        .collect())
}

impl EventStore {
    /// Appends one event per row, in batches of `options.batch_size` rows per
    /// transaction (inline projectors run as for any append, so read models
    /// fill up as the import goes). Rows imported before, by an earlier run
    /// with the same source, are skipped: an interrupted import can simply
    /// be run again. `progress` is called after every batch.
    pub fn import<E: Event>(
        &self,
        rows: impl IntoIterator<Item = ImportRow<E>>,
        options: &ImportOptions,
        mut progress: impl FnMut(&ImportReport),
    ) -> Result<ImportReport> {
        let mut report = ImportReport::default();
        let project = self.inline_projectors();
        let mut conn = self.connection()?;
        let mut batch: Vec<(String, NewEvent)> = Vec::with_capacity(options.batch_size);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            batch.clear();
            for row in rows.by_ref().take(options.batch_size.max(1)) {
                crate::error::check_stream_id(&row.stream_id)?;
                let event = NewEvent::new(&row.event)?
                    .with_id(import_event_id(&options.source, &row.key))
                    .with_metadata(options.metadata.clone());
                batch.push((row.stream_id, event));
            }
            let run = |c: &mut DbConnection| -> Result<(u64, u64)> {
                let ids: Vec<Uuid> = batch.iter().map(|(_, e)| e.event_id).collect();
                let existing = existing_ids(c, &ids)?;
                let mut writes: Vec<StreamWrite> = Vec::new();
                let mut seen = HashSet::new();
                for (stream, event) in &batch {
                    if existing.contains(&event.event_id) || !seen.insert(event.event_id) {
                        continue;
                    }
                    match writes.last_mut() {
                        Some(w) if &w.stream_id == stream => {
                            w.push_new(event.clone());
                        }
                        _ => {
                            let mut w = StreamWrite::new(stream.clone(), ExpectedVersion::Any);
                            w.push_new(event.clone());
                            writes.push(w);
                        }
                    }
                }
                let appended = append_events(c, &writes, project)?.len() as u64;
                Ok((appended, batch.len() as u64 - appended))
            };
            // A concurrent import of the same rows commits first: run the
            // batch again, and what it wrote is skipped.
            let mut attempt = 0;
            let (imported, skipped) = loop {
                match write_transaction(&mut conn, run) {
                    Err(e)
                        if attempt < RACE_RETRIES
                            && (matches!(e, Error::DuplicateEventId { .. })
                                || e.is_transient()) =>
                    {
                        attempt += 1;
                        tracing::debug!(attempt, error = %e, "import batch raced another writer; retrying");
                    }
                    other => break other?,
                }
            };
            if imported > 0 {
                self.forget_cached_streams(batch.iter().map(|(stream, _)| stream.as_str()));
            }
            report.imported += imported;
            report.skipped += skipped;
            progress(&report);
        }
        tracing::info!(source = %options.source, imported = report.imported, skipped = report.skipped, "import finished");
        Ok(report)
    }
}
