//! The queue in which a process's writers of one SQLite file wait for its
//! write lock.
//!
//! SQLite lets one connection write at a time. A connection that finds the
//! lock taken calls its busy handler, which sleeps (1, 2, 5, 10 … then
//! 100 ms at a time) and tries again: it does not learn when the lock is
//! released, and a writer that happens to try at the right moment overtakes
//! the ones asleep. Under a few concurrent writers most appends take no
//! time and an unlucky one sleeps for seconds (1.0–1.5 s in `es-bench`'s
//! phase C with 4 writers), and with enough writers one can reach the busy
//! timeout and fail although the lock was free most of the time.
//!
//! So every connection of a store on a SQLite file carries its file's
//! queue (as its Diesel instrumentation, which forwards every event to a
//! new instance of Diesel's default instrumentation, made when the queue is
//! installed), and every write transaction the store opens
//! ([`write_transaction`](crate::write_transaction)) and every append that
//! is one statement takes a turn first: writers of the process draw a
//! ticket and wait, blocked, until the writers before them are done.
//! SQLite's own lock still decides who writes; the queue only decides who
//! tries, so writers of other processes, connections whose instrumentation
//! the application replaced, the application's own Diesel writes and a few
//! single statements of the store outside transactions (a runner releasing
//! its lease, clearing a failure; a rebuild releasing its claim) wait in
//! the busy handler as before, and nothing depends on the queue for
//! correctness. A writer waits for its turn at most the busy timeout, and
//! then for SQLite's lock at most the busy timeout again.

use diesel::connection::{get_default_instrumentation, Instrumentation, InstrumentationEvent};
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{Thread, ThreadId};
use std::time::{Duration, Instant};

/// The writers of one SQLite file in this process: a ticket queue.
///
/// A writer draws a ticket and waits until the tickets before it have been
/// served: writers take the turn strictly in the order they came (a thread
/// that finds the turn free while others wait does not overtake them).
/// Reentrant: a thread that holds the turn and writes on a second
/// connection (a projector that opens one) goes straight to SQLite's lock,
/// where it meets its own transaction as it always did, instead of waiting
/// for itself.
#[derive(Default)]
pub(crate) struct WriterQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    /// The ticket the next writer to arrive draws.
    next: u64,
    /// The ticket whose writer takes the turn next.
    serving: u64,
    /// Tickets whose writers stopped waiting: skipped when their time comes.
    abandoned: BTreeSet<u64>,
    /// The thread that has the turn, and how many turns it holds.
    holder: Option<(ThreadId, usize)>,
    /// Writers asleep (or about to be), by ticket: a turn given back wakes
    /// the writer whose ticket comes next and no other, so the others sleep
    /// on instead of each waking to find it is not their turn.
    asleep: BTreeMap<u64, Thread>,
    /// How many times a writer woke up while waiting.
    #[cfg(test)]
    wakes: usize,
}

impl QueueState {
    fn skip_abandoned(&mut self) {
        while self.abandoned.remove(&self.serving) {
            self.serving += 1;
        }
    }

    /// With the turn free, the writer whose ticket is served next, if it
    /// sleeps (one that is awake sees the turn when it looks): to be woken
    /// once the state is unlocked.
    fn next_to_wake(&self) -> Option<Thread> {
        self.holder
            .is_none()
            .then(|| self.asleep.get(&self.serving).cloned())
            .flatten()
    }

    /// Writers holding a ticket that has not been served.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        (self.next - self.serving) as usize - self.abandoned.len()
    }
}

/// What identifies a file: on Unix its device and inode (a file deleted
/// and created again at the same path is another file), elsewhere its
/// canonical path. The file exists once a connection opened it; a path
/// that cannot be read keeps a queue of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FileKey {
    #[cfg(unix)]
    Inode(u64, u64),
    Path(PathBuf),
}

impl FileKey {
    fn of(path: &Path) -> FileKey {
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            return FileKey::Inode(meta.dev(), meta.ino());
        }
        FileKey::Path(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()))
    }
}

/// Having the turn; dropping it lets the next writer take it.
pub(crate) struct Turn(Arc<WriterQueue>);

impl Drop for Turn {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if let Some((thread, depth)) = &mut state.holder {
            debug_assert_eq!(*thread, std::thread::current().id());
            *depth -= 1;
            if *depth == 0 {
                state.holder = None;
                let next = state.next_to_wake();
                drop(state);
                if let Some(next) = next {
                    next.unpark();
                }
            }
        }
    }
}

impl WriterQueue {
    /// The queue of the SQLite file at `path` (one per file in the process,
    /// whichever path names it), while a store on it is open.
    pub(crate) fn of_file(path: &Path) -> Arc<WriterQueue> {
        static QUEUES: Mutex<Option<HashMap<FileKey, Weak<WriterQueue>>>> = Mutex::new(None);
        let key = FileKey::of(path);
        let mut queues = QUEUES.lock().unwrap_or_else(|e| e.into_inner());
        let queues = queues.get_or_insert_with(HashMap::new);
        if let Some(queue) = queues.get(&key).and_then(Weak::upgrade) {
            return queue;
        }
        queues.retain(|_, q| q.strong_count() > 0);
        let queue = Arc::new(WriterQueue::default());
        queues.insert(key, Arc::downgrade(&queue));
        queue
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The state is consistent between statements: a panic elsewhere
        // while it was locked leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the turn, at most `wait`; `None` when it did not come (the
    /// writer then goes on to SQLite's own busy handling).
    pub(crate) fn take(self: &Arc<Self>, wait: Duration) -> Option<Turn> {
        let me = std::thread::current().id();
        let mut state = self.lock();
        if let Some((thread, depth)) = &mut state.holder {
            if *thread == me {
                *depth += 1;
                return Some(Turn(Arc::clone(self)));
            }
        }
        let ticket = state.next;
        state.next += 1;
        let deadline = Instant::now() + wait;
        while state.holder.is_some() || state.serving != ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.abandoned.insert(ticket);
                state.skip_abandoned();
                let next = state.next_to_wake();
                drop(state);
                if let Some(next) = next {
                    next.unpark();
                }
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    "no turn to write within the busy timeout; trying SQLite's lock directly"
                );
                return None;
            }
            // An unpark that comes between the unlock and the park is kept
            // by the thread, and the park returns at once.
            state.asleep.insert(ticket, std::thread::current());
            drop(state);
            std::thread::park_timeout(left);
            state = self.lock();
            state.asleep.remove(&ticket);
            #[cfg(test)]
            {
                state.wakes += 1;
            }
        }
        state.holder = Some((me, 1));
        state.serving += 1;
        state.skip_abandoned();
        Some(Turn(Arc::clone(self)))
    }

    /// How many writers are waiting for the turn.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting()
    }
}

/// The instrumentation installed on a store's SQLite connections: it carries
/// the file's [`WriterQueue`] and passes every event on to the
/// instrumentation Diesel gave the connection.
pub(crate) struct QueuedWriters {
    pub(crate) queue: Arc<WriterQueue>,
    /// How long to wait for a turn: the store's busy timeout.
    pub(crate) wait: Duration,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Instrumentation for QueuedWriters {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let Some(inner) = &mut self.inner {
            inner.on_connection_event(event);
        }
    }
}

/// Gives `conn` the file's queue.
pub(crate) fn install(conn: &mut SqliteConnection, queue: Arc<WriterQueue>, wait: Duration) {
    conn.set_instrumentation(QueuedWriters {
        queue,
        wait,
        inner: get_default_instrumentation(),
    });
}

/// Waits for `conn`'s turn to write, if it has a queue.
pub(crate) fn turn(conn: &mut SqliteConnection) -> Option<Turn> {
    let queued = conn.instrumentation().downcast_ref::<QueuedWriters>()?;
    let (queue, wait) = (Arc::clone(&queued.queue), queued.wait);
    queue.take(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Wrote;
    use crate::{write_transaction, DbConnection, EventStore, ExpectedVersion, StoreOptions};
    use std::time::Instant;

    fn store(dir: &tempfile::TempDir, busy_timeout: Duration) -> EventStore {
        let path = dir.path().join("queue.db");
        let store = EventStore::open_with(
            path.to_str().unwrap(),
            StoreOptions {
                pool_size: 12,
                busy_timeout,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        store.migrate().unwrap();
        store
    }

    fn write(stream: &str) -> crate::StreamWrite {
        let mut w = crate::StreamWrite::new(stream, ExpectedVersion::NoStream);
        w.push(&Wrote).unwrap();
        w
    }

    /// The queue a connection of `store` carries, if any.
    fn queued(store: &EventStore) -> Option<Arc<WriterQueue>> {
        let mut conn = store.connection().unwrap();
        let DbConnection::Sqlite(c) = &mut *conn else {
            panic!("a SQLite store")
        };
        let queued = c.instrumentation().downcast_ref::<QueuedWriters>()?;
        Some(Arc::clone(&queued.queue))
    }

    fn queue_of(store: &EventStore) -> Arc<WriterQueue> {
        queued(store).expect("the store's connections carry the queue")
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn position(store: &EventStore, stream: &str) -> i64 {
        store.read_stream(stream, 1, 1).unwrap()[0].global_position
    }

    /// Writers that find the write lock taken wait in the queue and write in
    /// the order they came, as soon as the lock is free: in SQLite's busy
    /// handler they would wake at times of their own and write in any order.
    #[test]
    fn writers_of_one_file_write_in_the_order_they_came() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, Duration::from_secs(30));
        let queue = queue_of(&store);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (began, has_begun) = std::sync::mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                write_transaction(&mut conn, |c| -> crate::Result<()> {
                    crate::append_in(c, &[write("holder")])?;
                    began.send(()).unwrap();
                    released.recv().unwrap();
                    Ok(())
                })
                .unwrap();
            })
        };
        has_begun.recv().unwrap();
        let writers: Vec<_> = (0..6)
            .map(|i| {
                let store = store.clone();
                let writer = std::thread::spawn(move || {
                    store
                        .append(&format!("w{i}"), ExpectedVersion::NoStream, [Wrote])
                        .unwrap();
                });
                wait_until(&format!("writer {i} waits"), || queue.waiting() == i + 1);
                writer
            })
            .collect();
        release.send(()).unwrap();
        holder.join().unwrap();
        for w in writers {
            w.join().unwrap();
        }
        let positions: Vec<i64> = (0..6).map(|i| position(&store, &format!("w{i}"))).collect();
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        assert_eq!(positions, sorted, "writers wrote out of their order");
        assert!(position(&store, "holder") < positions[0]);
    }

    /// A writer whose turn does not come within the busy timeout tries
    /// SQLite's lock itself, and writes if it is free.
    #[test]
    fn a_writer_whose_turn_does_not_come_tries_the_lock_itself() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_millis(300);
        let store = store(&dir, timeout);
        let queue = queue_of(&store);
        let held = queue.take(Duration::ZERO).expect("a free turn");
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let written = store.append("late", ExpectedVersion::NoStream, [Wrote]);
                (written, started.elapsed())
            })
        };
        wait_until("the writer waits", || queue.waiting() == 1);
        let (written, waited) = writer.join().unwrap();
        assert!(written.is_ok(), "{written:?}");
        assert!(waited >= timeout, "wrote after {waited:?}, before its turn");
        assert_eq!(queue.waiting(), 0);
        // The abandoned ticket does not hold up the writers after it.
        drop(held);
        let next = queue.take(Duration::ZERO);
        assert!(next.is_some(), "the turn stayed with an abandoned ticket");
    }

    /// A writer that arrives while the turn is free but others wait for it
    /// takes its place behind them; a thread that holds the turn takes it
    /// again at once.
    #[test]
    fn the_turn_goes_by_ticket_and_again_to_its_holder() {
        let queue = Arc::new(WriterQueue::default());
        let first = queue.take(Duration::ZERO).unwrap();
        let again = queue.take(Duration::ZERO).expect("reentrant");
        drop(again);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let (queue, tx) = (Arc::clone(&queue), tx.clone());
            std::thread::spawn(move || {
                let turn = queue.take(Duration::from_secs(30)).unwrap();
                tx.send("waiter").unwrap();
                drop(turn);
            })
        };
        wait_until("the waiter waits", || queue.waiting() == 1);
        // Still held once: a third thread waits for the turn, not for an
        // abandoned second hold.
        let late = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let turn = queue.take(Duration::from_secs(30)).unwrap();
                tx.send("late").unwrap();
                drop(turn);
            })
        };
        wait_until("both wait", || queue.waiting() == 2);
        let released = Instant::now();
        drop(first);
        waiter.join().unwrap();
        late.join().unwrap();
        assert_eq!(rx.iter().collect::<Vec<_>>(), ["waiter", "late"]);
        woken_when_given_back(&queue, released);
    }

    /// Writers that waited with a 30-second timeout were woken when the
    /// turn was given back at `released`, not by their timeout (a turn given
    /// back wakes the sleeper registered for the next ticket, and the
    /// registry must not miss one), and nobody is left registered asleep.
    fn woken_when_given_back(queue: &WriterQueue, released: Instant) {
        assert!(
            released.elapsed() < Duration::from_secs(10),
            "the writers slept {:?} after the turn was given back",
            released.elapsed()
        );
        assert!(
            queue.lock().asleep.is_empty(),
            "nobody is left registered asleep"
        );
    }

    /// A turn given back wakes the writer whose ticket comes next, not every
    /// sleeper: with a wake-all, each of the five turns below would wake
    /// all the writers still waiting (15 wake-ups), since each turn is
    /// given back only once every later writer sleeps.
    #[test]
    fn a_turn_given_back_wakes_the_next_writer_only() {
        let queue = Arc::new(WriterQueue::default());
        let first = queue.take(Duration::ZERO).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writers: Vec<_> = (0..5)
            .map(|i| {
                let (mine, tx) = (Arc::clone(&queue), tx.clone());
                let writer = std::thread::spawn(move || {
                    let turn = mine.take(Duration::from_secs(30)).unwrap();
                    tx.send(i).unwrap();
                    // Give the turn back only once every later writer is
                    // asleep again, so that a wake-all would wake them all.
                    wait_until("the later writers sleep", || {
                        mine.lock().asleep.len() == 4 - i
                    });
                    drop(turn);
                });
                wait_until(&format!("writer {i} sleeps"), || {
                    queue.lock().asleep.len() == i + 1
                });
                writer
            })
            .collect();
        let released = Instant::now();
        drop(first);
        for w in writers {
            w.join().unwrap();
        }
        drop(tx);
        assert_eq!(rx.iter().collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        woken_when_given_back(&queue, released);
        // Each writer wakes once; a spurious return from `park` is allowed
        // by its contract, so a little slack, well below a wake-all's 15.
        let wakes = queue.lock().wakes;
        assert!((5..=8).contains(&wakes), "{wakes} wake-ups for 5 writers");
    }

    /// A writer that gives up waiting while others sleep does not strand
    /// them: they take the turn when it is given back, not at their
    /// timeout, and nobody is left registered asleep.
    #[test]
    fn a_writer_that_gives_up_does_not_strand_the_others() {
        let queue = Arc::new(WriterQueue::default());
        let first = queue.take(Duration::ZERO).unwrap();
        let waiter = |wait: Duration| {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.take(wait).map(drop).is_some())
        };
        let patient = waiter(Duration::from_secs(30));
        wait_until("the patient writer waits", || queue.waiting() == 1);
        let hasty = waiter(Duration::from_millis(200));
        assert!(!hasty.join().unwrap(), "the hasty writer gave up");
        let late = waiter(Duration::from_secs(30));
        wait_until("a late writer waits too", || queue.waiting() == 2);
        let released = Instant::now();
        drop(first);
        assert!(patient.join().unwrap() && late.join().unwrap());
        woken_when_given_back(&queue, released);
    }

    /// A thread that holds the turn and writes on a second connection is not
    /// made to wait for itself: it meets its own transaction's lock in
    /// SQLite, which fails after one busy timeout, as it did without a queue.
    #[test]
    fn a_second_write_of_the_thread_holding_the_turn_waits_one_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_millis(1000);
        let store = store(&dir, timeout);
        let mut conn = store.connection().unwrap();
        let mut elapsed = Duration::ZERO;
        let inner = write_transaction(&mut conn, |c| -> crate::Result<_> {
            crate::append_in(c, &[write("outer")])?;
            let started = Instant::now();
            let inner = store.append("inner", ExpectedVersion::NoStream, [Wrote]);
            elapsed = started.elapsed();
            Ok(inner.is_err())
        })
        .unwrap();
        assert!(
            inner,
            "the second connection wrote while the first held the lock"
        );
        assert!(
            elapsed < timeout * 19 / 10,
            "waited {elapsed:?}: for its own turn and then for SQLite"
        );
    }

    /// Stores opened on one file, by any path, share its queue; another
    /// file has its own.
    #[test]
    fn stores_on_one_file_share_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let one = store(&dir, Duration::from_secs(5));
        let other_spelling = dir.path().join(".").join("queue.db");
        let two = EventStore::open(other_spelling.to_str().unwrap()).unwrap();
        assert!(Arc::ptr_eq(&queue_of(&one), &queue_of(&two)));
        // A URI with escapes, as SQLite reads them.
        let escaped = format!(
            "file:{}?mode=rw",
            dir.path().join("queue%2Edb").to_str().unwrap()
        );
        let uri = EventStore::open(&escaped).unwrap();
        assert!(Arc::ptr_eq(&queue_of(&one), &queue_of(&uri)));
        let elsewhere = tempfile::tempdir().unwrap();
        let three = store(&elsewhere, Duration::from_secs(5));
        assert!(!Arc::ptr_eq(&queue_of(&one), &queue_of(&three)));
    }

    /// With `queue_sqlite_writers` off, connections keep the instrumentation
    /// Diesel gave them, and writers wait in SQLite's busy handler.
    #[test]
    fn a_store_without_the_queue_leaves_its_connections_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unqueued.db");
        let store = EventStore::open_with(
            path.to_str().unwrap(),
            StoreOptions {
                queue_sqlite_writers: false,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        store.migrate().unwrap();
        store
            .append("s", ExpectedVersion::NoStream, [Wrote])
            .unwrap();
        assert!(queued(&store).is_none());
    }

    /// A write transaction that panics gives the turn back as it unwinds.
    #[test]
    fn a_panic_in_a_write_transaction_gives_the_turn_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, Duration::from_secs(30));
        let queue = queue_of(&store);
        let panicked = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                let _ = write_transaction(&mut conn, |_| -> crate::Result<()> {
                    panic!("a projector's bug")
                });
            })
            .join()
        };
        assert!(panicked.is_err());
        assert!(
            queue.take(Duration::ZERO).is_some(),
            "the turn stayed with the thread that panicked"
        );
    }

    /// An in-memory database has one connection and no queue.
    #[test]
    fn an_in_memory_store_has_no_queue() {
        let store = EventStore::open(":memory:").unwrap();
        assert!(queued(&store).is_none());
    }
}
