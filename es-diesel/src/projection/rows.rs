//! The rows of read models a rebuild holds in memory: loaded in bulk,
//! folded by row-level projectors, written back in bulk.

use super::inline::checked_apply;
use super::{Failure, RowProjection};
use crate::backend::DbConnection;
use crate::read_model::{GuardedRow, ReadModel, RowBatch, RowWrite};
use es_core::{EventType, RecordedEvent};
use std::any::Any;
use std::collections::{HashMap, HashSet};

struct Slot<M> {
    existed: bool,
    row: Option<M>,
    /// The row version read with it (PostgreSQL's `xmin`), for a guarded write.
    version: Option<i64>,
}

/// The rows of one read model touched by a batch of events.
#[doc(hidden)]
pub struct Rows<M: ReadModel> {
    wanted: Vec<M::Key>,
    slots: HashMap<M::Key, Slot<M>>,
    /// The keys of a versioned load, in the order first wanted.
    order: Vec<M::Key>,
}

impl<M: ReadModel> Default for Rows<M> {
    fn default() -> Self {
        Rows {
            wanted: Vec::new(),
            slots: HashMap::new(),
            order: Vec::new(),
        }
    }
}

/// The constructor registered for each read model.
#[doc(hidden)]
pub fn new_rows<M: ReadModel>() -> Box<dyn RowBatch> {
    Box::new(Rows::<M>::default())
}

/// Keys per SELECT/DELETE when loading or removing rows by key.
const KEYS_PER_STATEMENT: usize = 500;

impl<M: ReadModel> RowBatch for Rows<M> {
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }

    fn load(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<()> {
        let mut wanted = std::mem::take(&mut self.wanted);
        wanted.retain(|k| !self.slots.contains_key(k));
        let mut unique = HashSet::with_capacity(wanted.len());
        wanted.retain(|k| unique.insert(k.clone()));
        for chunk in wanted.chunks(KEYS_PER_STATEMENT) {
            for row in M::find_many(conn, chunk)? {
                self.slots.insert(
                    row.key(),
                    Slot {
                        existed: true,
                        row: Some(row),
                        version: None,
                    },
                );
            }
        }
        for k in wanted {
            self.slots.entry(k).or_insert(Slot {
                existed: false,
                row: None,
                version: None,
            });
        }
        Ok(())
    }

    fn load_versioned(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<bool> {
        let mut wanted = std::mem::take(&mut self.wanted);
        let mut unique = HashSet::with_capacity(wanted.len());
        wanted.retain(|k| !self.slots.contains_key(k) && unique.insert(k.clone()));
        for chunk in wanted.chunks(KEYS_PER_STATEMENT) {
            let Some(rows) = M::find_many_versioned(conn, chunk)? else {
                return Ok(false);
            };
            for (version, row) in rows {
                self.slots.insert(
                    row.key(),
                    Slot {
                        existed: true,
                        row: Some(row),
                        version: Some(version),
                    },
                );
            }
        }
        for k in &wanted {
            self.slots.entry(k.clone()).or_insert(Slot {
                existed: false,
                row: None,
                version: None,
            });
        }
        self.order.extend(wanted);
        Ok(true)
    }

    fn guarded_writes(&self, out: &mut Vec<GuardedRow>) -> bool {
        for key in &self.order {
            let slot = &self.slots[key];
            let write = match (slot.existed, &slot.row, slot.version) {
                // A row missing when read and left missing: one that
                // another writer commits before this append's events would
                // be missed (the statement's snapshot predates them), where
                // the transaction, reading after its insert, sees it.
                (false, None, _) => return false,
                (false, Some(row), _) => M::guarded_write(RowWrite::Insert(row)).map(|w| (w, None)),
                (true, Some(row), Some(v)) => {
                    M::guarded_write(RowWrite::Update(row)).map(|w| (w, Some(v)))
                }
                (true, None, Some(v)) => {
                    M::guarded_write(RowWrite::Delete(key)).map(|w| (w, Some(v)))
                }
                (true, _, None) => None,
            };
            let Some((statement, version)) = write else {
                return false;
            };
            out.push(GuardedRow {
                statement,
                version,
                order: format!("{}\u{0}{key:?}", M::SCHEMA.name),
            });
        }
        true
    }

    fn flush(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<usize> {
        let mut gone = Vec::new();
        let mut rows = Vec::new();
        for (key, slot) in self.slots.drain() {
            if slot.existed {
                gone.push(key);
            }
            rows.extend(slot.row);
        }
        for chunk in gone.chunks(KEYS_PER_STATEMENT) {
            M::delete_many(conn, chunk)?;
        }
        let per = crate::read_model::rows_per_statement(M::SCHEMA.columns);
        let mut written = 0;
        for chunk in rows.chunks(per) {
            written += M::insert_many(conn, chunk)?;
        }
        Ok(written)
    }

    fn is_empty(&self) -> bool {
        self.wanted.is_empty() && self.slots.is_empty()
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

fn rows_of<M: ReadModel>(batch: &mut dyn RowBatch) -> &mut Rows<M> {
    batch
        .as_any()
        .downcast_mut::<Rows<M>>()
        .expect("a rebuild hands each row-level projector the row batch of its own read model")
}

pub(super) fn row_want<P: RowProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    batch: &mut dyn RowBatch,
) -> Result<(), Failure> {
    let event = ev.decode::<E>()?;
    rows_of::<P::Model>(batch).wanted.push(P::key(&event));
    Ok(())
}

pub(super) fn row_fold<P: RowProjection<E>, E: EventType>(
    ev: &RecordedEvent,
    batch: &mut dyn RowBatch,
) -> Result<(), Failure> {
    let event = ev.decode::<E>()?;
    let key = P::key(&event);
    let rows = rows_of::<P::Model>(batch);
    let slot = rows.slots.entry(key.clone()).or_insert(Slot {
        existed: false,
        row: None,
        version: None,
    });
    checked_apply::<P, E>(event, &key, &mut slot.row)
}
