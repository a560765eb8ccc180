//! The in-memory cache of aggregates' states ([`es_core::Cache`]): one per
//! store, shared by its clones, one least-recently-used map per aggregate
//! type.
//!
//! No code of the application runs under the cache's lock: a state is moved
//! out of the cache for a command and moved back after it, and states that
//! are evicted, replaced or forgotten are dropped after the lock is
//! released.

use super::execute::Loaded;
use es_core::Aggregate;
use lru::LruCache;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// One aggregate type's entries, whatever the type.
trait AnyEntries: Send {
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// Removes the stream's state, returned to be dropped after unlocking.
    fn forget(&mut self, stream: &str) -> Option<Box<dyn Any + Send>>;
}

impl<A: Aggregate> AnyEntries for Entries<A> {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn forget(&mut self, stream: &str) -> Option<Box<dyn Any + Send>> {
        self.pop(stream)
            .map(|cached| Box::new(cached) as Box<dyn Any + Send>)
    }
}

#[derive(Default)]
struct Inner {
    /// Raised by [`StateCache::clear`]: a state taken or loaded before it
    /// is not put back.
    generation: u64,
    by_type: HashMap<TypeId, Box<dyn AnyEntries>>,
}

#[derive(Default)]
pub(crate) struct StateCache {
    inner: Mutex<Inner>,
    /// Whether a state was ever put: appends of a store whose aggregates
    /// cache nothing do not take the lock.
    used: AtomicBool,
}

impl StateCache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code that can panic runs under the lock, and the maps stay
        // whole if something did.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cache's generation, read before a command takes or loads a
    /// state, and given back to [`put`](Self::put).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Moves the stream's state out of the cache: a command on the same
    /// stream that comes meanwhile loads the stream instead.
    pub fn take<A: Aggregate>(&self, stream: &str) -> Option<Cached<A>> {
        let mut inner = self.lock();
        inner
            .by_type
            .get_mut(&TypeId::of::<A>())?
            .as_any_mut()
            .downcast_mut::<Entries<A>>()?
            .pop(stream)
    }

    /// Keeps `cached` as the stream's state, unless the cache was cleared
    /// since `generation`, or holds a later state (put back by a command
    /// that ran meanwhile).
    pub fn put<A: Aggregate>(&self, stream: &str, cached: Cached<A>, generation: u64) {
        let Some(policy) = A::CACHE else { return };
        self.used.store(true, Ordering::Relaxed);
        let _dropped_after_unlock;
        let mut inner = self.lock();
        if inner.generation != generation {
            _dropped_after_unlock = Some((String::new(), cached));
            return;
        }
        let entries = inner.by_type.entry(TypeId::of::<A>()).or_insert_with(|| {
            let entries = NonZeroUsize::new(policy.entries).unwrap_or(NonZeroUsize::MIN);
            Box::new(Entries::<A>::new(entries))
        });
        let Some(entries) = entries.as_any_mut().downcast_mut::<Entries<A>>() else {
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

    /// Forgets the states of these streams, of every aggregate type: the
    /// store appended to them by other means than a command.
    pub fn forget<'s>(&self, streams: impl IntoIterator<Item = &'s str>) {
        if !self.used.load(Ordering::Relaxed) {
            return;
        }
        let mut forgotten = Vec::new();
        let mut inner = self.lock();
        if inner.by_type.is_empty() {
            return;
        }
        for stream in streams {
            for entries in inner.by_type.values_mut() {
                forgotten.extend(entries.forget(stream));
            }
        }
        drop(inner);
        drop(forgotten);
    }

    /// Forgets every state of `A` (its snapshots were deleted: the
    /// snapshot versions kept with the states no longer hold).
    pub fn forget_type<A: Aggregate>(&self) {
        let mut inner = self.lock();
        let entries = inner.by_type.remove(&TypeId::of::<A>());
        drop(inner);
        drop(entries);
    }

    /// Forgets every state, including those taken by commands under way.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        let all = std::mem::take(&mut inner.by_type);
        drop(inner);
        drop(all);
    }
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Wrote;
    use es_core::Cache;

    #[derive(Default, Clone, Debug, PartialEq)]
    struct Counter(u32);

    impl Aggregate for Counter {
        const TYPE: &'static str = "counter";
        type Event = Wrote;
        type Command = ();
        type Error = std::fmt::Error;
        const CACHE: Option<Cache<Self>> = Some(Cache::entries(2));
        fn apply(&mut self, _: &Wrote) {
            self.0 += 1;
        }
        fn handle(&self, (): ()) -> Result<Vec<Wrote>, std::fmt::Error> {
            Ok(vec![Wrote])
        }
    }

    fn at(version: i64) -> Cached<Counter> {
        Cached {
            state: Counter(version as u32),
            version,
            snapshot_version: None,
        }
    }

    /// A command under way when the cache is cleared does not put its
    /// state back.
    #[test]
    fn a_state_taken_before_a_clear_is_not_put_back() {
        let cache = StateCache::default();
        let generation = cache.generation();
        cache.put("c-1", at(3), generation);
        let taken = cache.take::<Counter>("c-1").unwrap();
        cache.clear();
        cache.put("c-1", taken, generation);
        assert!(cache.take::<Counter>("c-1").is_none());
        // A command that starts after the clear caches again.
        cache.put("c-1", at(4), cache.generation());
        assert_eq!(cache.take::<Counter>("c-1").unwrap().version, 4);
    }

    /// A later state put back first is not replaced by an earlier one.
    #[test]
    fn an_earlier_state_does_not_replace_a_later_one() {
        let cache = StateCache::default();
        let generation = cache.generation();
        cache.put("c-1", at(5), generation);
        cache.put("c-1", at(4), generation);
        assert_eq!(cache.take::<Counter>("c-1").unwrap().version, 5);
        cache.put("c-1", at(5), generation);
        cache.put("c-1", at(6), generation);
        assert_eq!(cache.take::<Counter>("c-1").unwrap().state, Counter(6));
    }

    /// Forgetting a stream removes it whatever the aggregate type; other
    /// streams stay.
    #[test]
    fn forgetting_removes_the_streams_named() {
        let cache = StateCache::default();
        let generation = cache.generation();
        for stream in ["c-1", "c-2"] {
            cache.put(stream, at(1), generation);
        }
        cache.forget(["c-1", "c-9"]);
        assert!(cache.take::<Counter>("c-1").is_none());
        assert!(cache.take::<Counter>("c-2").is_some());
    }
}
