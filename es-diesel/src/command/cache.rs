//! The in-memory cache of aggregates' states ([`es_core::Cache`]): one per
//! store, shared by its clones, one least-recently-used map per aggregate
//! type.
//!
//! No code of the application runs under the cache's lock: a state is moved
//! out of the cache for a command and moved back after it, so the lock is
//! held only to find, insert or remove an entry (a state evicted or
//! replaced is dropped after the lock is released).

use super::execute::Loaded;
use es_core::Aggregate;
use lru::LruCache;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard, PoisonError};

type Entries<A> = LruCache<String, Cached<A>>;

/// A stream's state: the fold of its events up to `version`, as stored.
pub(crate) struct Cached<A> {
    pub state: A,
    pub version: i64,
    /// The version of the stream's last snapshot known here.
    pub snapshot_version: Option<i64>,
}

impl<A> Cached<A> {
    pub fn into_loaded(self, stream: &str) -> Loaded<A> {
        Loaded {
            stream_id: stream.to_owned(),
            state: self.state,
            version: self.version,
            snapshot_version: self.snapshot_version,
        }
    }
}

#[derive(Default)]
pub(crate) struct StateCache {
    by_type: Mutex<HashMap<TypeId, Box<dyn Any + Send>>>,
}

impl StateCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<TypeId, Box<dyn Any + Send>>> {
        // Nothing panics while the lock is held but a state's `Drop`, and
        // the maps stay whole if one does.
        self.by_type.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the stream's state out of the cache: a command on the same
    /// stream that comes meanwhile loads the stream instead.
    pub fn take<A: Aggregate>(&self, stream: &str) -> Option<Cached<A>> {
        let mut by_type = self.lock();
        by_type
            .get_mut(&TypeId::of::<A>())?
            .downcast_mut::<Entries<A>>()?
            .pop(stream)
    }

    /// Keeps `cached` as the stream's state, unless the cache already holds
    /// a later one (put back by a command that ran meanwhile).
    pub fn put<A: Aggregate>(&self, stream: &str, cached: Cached<A>) {
        let Some(policy) = A::CACHE else { return };
        let _dropped_after_unlock;
        let mut by_type = self.lock();
        let entries = by_type.entry(TypeId::of::<A>()).or_insert_with(|| {
            let entries = NonZeroUsize::new(policy.entries).unwrap_or(NonZeroUsize::MIN);
            Box::new(Entries::<A>::new(entries))
        });
        let Some(entries) = entries.downcast_mut::<Entries<A>>() else {
            return;
        };
        if entries
            .peek(stream)
            .is_some_and(|held| held.version > cached.version)
        {
            _dropped_after_unlock = Some((String::new(), cached));
            return;
        }
        _dropped_after_unlock = entries.push(stream.to_owned(), cached);
    }

    /// Forgets every state.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache").finish_non_exhaustive()
    }
}
