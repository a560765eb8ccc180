//! The workload written as an application would write it with the
//! framework's public API: `#[derive(Event)]` events, `EventStore::append`
//! with optimistic concurrency, state rebuilt by `load_stream` and a fold.
//!
//! Phases B (inline read model) and D (rebuild) need `#[derive(ReadModel)]`,
//! `#[projector]` and the rebuild API, which are not in the framework yet:
//! [`run`] reports them as [`BenchError::NotAvailable`] instead of measuring
//! something else. Adding them means writing `phase_b` / `phase_d` here and
//! registering the read model in [`prepare`].

use crate::workload::{self, Command, LogEvent, State};
use crate::{BenchError, Phase, Result};
use diesel::prelude::*;
use es_diesel::{
    Event, EventStore, ExpectedVersion, Recorded, SqliteSync, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A book entered the catalogue.
#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BookRegistered {
    pub book_id: i64,
    pub title: String,
    pub author: String,
}

/// A user signed up.
#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct UserRegistered {
    pub user_id: i64,
    pub name: String,
}

#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BookBorrowed {
    pub book_id: i64,
    pub user_id: i64,
}

#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BookReturned {
    pub book_id: i64,
    pub user_id: i64,
}

/// Everything that happens to a book (the events of its stream).
// Variants are named after the event structs they wrap, as the derive expects.
#[allow(clippy::enum_variant_names)]
#[derive(Event, Clone, Debug, PartialEq)]
pub enum BookEvent {
    BookRegistered(BookRegistered),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

/// A book's state, folded from its stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Book {
    borrowed_by: Option<i64>,
    version: i64,
}

impl Book {
    fn load(store: &EventStore, stream: &str) -> Result<Book> {
        let events = store.load_stream::<BookEvent>(stream)?;
        Ok(events.iter().fold(Book::default(), Book::apply))
    }

    fn apply(self, event: &Recorded<BookEvent>) -> Book {
        let borrowed_by = match &event.event {
            BookEvent::BookRegistered(_) => None,
            BookEvent::BookBorrowed(e) => Some(e.user_id),
            BookEvent::BookReturned(_) => None,
        };
        Book {
            borrowed_by,
            version: event.stream_version,
        }
    }

    /// Borrow if the book is on the shelf, otherwise its borrower returns it.
    fn decide(&self, book_id: i64, user_id: i64) -> BookEvent {
        match self.borrowed_by {
            None => BookEvent::BookBorrowed(BookBorrowed { book_id, user_id }),
            Some(borrower) => BookEvent::BookReturned(BookReturned {
                book_id,
                user_id: borrower,
            }),
        }
    }
}

/// Opens the store the way an application would, with the SQLite
/// durability the benchmark runs under.
pub fn open(url: &str, sqlite_sync: SqliteSync) -> Result<EventStore> {
    let options = StoreOptions {
        sqlite_sync,
        ..StoreOptions::default()
    };
    Ok(EventStore::open_with(url, options)?)
}

/// Whether the framework side of `phase` exists yet.
pub fn available(phase: Phase) -> bool {
    matches!(phase, Phase::A | Phase::C)
}

/// Untimed set-up of a fresh database for `phase`: schema and registrations.
pub fn prepare(store: &EventStore, phase: Phase, _replay_events: u64) -> Result<()> {
    store.migrate()?;
    match phase {
        Phase::A | Phase::C => register(store),
        Phase::B | Phase::D => Err(BenchError::NotAvailable(phase)),
        Phase::E1 | Phase::E2 | Phase::E3 => Err(BenchError::RawOnly(phase)),
    }
}

/// The timed part of `phase`; returns the wall time.
pub fn run(store: &EventStore, phase: Phase, commands: &[Command]) -> Result<Duration> {
    match phase {
        Phase::A => phase_a(store, commands),
        Phase::C => phase_c(store, commands),
        Phase::B | Phase::D => Err(BenchError::NotAvailable(phase)),
        Phase::E1 | Phase::E2 | Phase::E3 => Err(BenchError::RawOnly(phase)),
    }
}

/// The 1,100 registrations, one stream each, in one atomic multi-stream append.
pub fn register(store: &EventStore) -> Result<()> {
    let mut writes = Vec::with_capacity(workload::REGISTRATIONS as usize);
    for entry in workload::registrations() {
        let mut write = StreamWrite::new(entry.stream_id(), ExpectedVersion::NoStream);
        match entry.event {
            LogEvent::BookRegistered { book_id } => write.push(&BookRegistered {
                book_id,
                title: workload::book_title(book_id),
                author: workload::book_author(book_id),
            })?,
            LogEvent::UserRegistered { user_id } => write.push(&UserRegistered {
                user_id,
                name: workload::user_name(user_id),
            })?,
            other => unreachable!("registrations() yields registrations only, got {other:?}"),
        };
        writes.push(write);
    }
    store.append_streams(&writes)?;
    Ok(())
}

/// Writes the log of `n` commands after the registrations without deciding
/// anything (untimed seed of phase D). Each batch is one atomic append;
/// within a batch the events are grouped by stream, so the global order
/// differs from command order inside a batch while every stream keeps its
/// order (the read model's final state does not depend on it).
// Seeds phase D, which waits for the rebuild API; tested below meanwhile.
#[allow(dead_code)]
pub fn seed(store: &EventStore, n: u64) -> Result<()> {
    const BATCH: usize = 10_000;
    let mut batch: Vec<StreamWrite> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut pending = 0;
    let flush = |batch: &mut Vec<StreamWrite>,
                 index: &mut std::collections::HashMap<String, usize>|
     -> Result<()> {
        if !batch.is_empty() {
            store.append_streams(batch)?;
        }
        batch.clear();
        index.clear();
        Ok(())
    };
    for entry in workload::command_events(n) {
        let stream = entry.stream_id();
        let at = *index.entry(stream.clone()).or_insert_with(|| {
            batch.push(StreamWrite::new(
                stream,
                ExpectedVersion::Exact(entry.version - 1),
            ));
            batch.len() - 1
        });
        let write = &mut batch[at];
        match entry.event {
            LogEvent::BookBorrowed { book_id, user_id } => {
                write.push(&BookBorrowed { book_id, user_id })?
            }
            LogEvent::BookReturned { book_id, user_id } => {
                write.push(&BookReturned { book_id, user_id })?
            }
            other => {
                unreachable!("command_events() yields borrows and returns only, got {other:?}")
            }
        };
        pending += 1;
        if pending == BATCH {
            flush(&mut batch, &mut index)?;
            pending = 0;
        }
    }
    flush(&mut batch, &mut index)
}

/// Executes one command: load the stream, fold, decide, append expecting
/// the version that was loaded; on a conflict, start again from the load.
fn execute(store: &EventStore, command: Command) -> Result<()> {
    let stream = workload::book_stream(command.book_id);
    loop {
        let book = Book::load(store, &stream)?;
        let event = book.decide(command.book_id, command.user_id);
        match store.append(&stream, ExpectedVersion::Exact(book.version), [event]) {
            Ok(_) => return Ok(()),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A: the commands one after the other, one transaction each.
fn phase_a(store: &EventStore, commands: &[Command]) -> Result<Duration> {
    // The pool opens connections lazily; open one before the clock.
    drop(store.connection()?);
    let start = Instant::now();
    for &c in commands {
        execute(store, c)?;
    }
    Ok(start.elapsed())
}

/// C: four writers on disjoint streams sharing one store (and its pool).
fn phase_c(store: &EventStore, commands: &[Command]) -> Result<Duration> {
    let parts: Vec<Vec<Command>> = (0..workload::WRITERS)
        .map(|w| workload::writer_commands(commands, w))
        .collect();
    {
        let warm: Vec<_> = (0..workload::WRITERS)
            .map(|_| store.connection())
            .collect::<std::result::Result<_, _>>()?;
        drop(warm);
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|part| s.spawn(move || part.iter().try_for_each(|&c| execute(store, c))))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| BenchError::WriterPanicked)?)
    })?;
    Ok(start.elapsed())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The log's size and number of borrows (no read model exists yet).
pub fn state(store: &EventStore) -> Result<State> {
    let mut conn = store.connection()?;
    let log_events = diesel::sql_query("SELECT COUNT(*) AS n FROM es_events")
        .get_result::<Count>(&mut *conn)?
        .n;
    // The typed view #[derive(Event)] generated for BookBorrowed.
    let borrowed_events = book_borrowed::table.count().get_result::<i64>(&mut *conn)?;
    Ok(State {
        log_events,
        borrowed_events,
        rm_books: None,
        rm_borrowed_now: None,
        rm_times_borrowed: None,
        rm_checksum: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_diesel::testing::TestDatabase;

    #[test]
    fn phase_a_and_c_end_in_the_expected_state() {
        let n = 300;
        let commands: Vec<Command> = workload::commands(n).collect();
        let expected = workload::expected(n).log_only();
        for phase in [Phase::A, Phase::C] {
            for db in TestDatabase::all() {
                let store = db.store();
                prepare(&store, phase, 0).unwrap();
                run(&store, phase, &commands).unwrap();
                assert_eq!(
                    state(&store).unwrap(),
                    expected,
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    #[test]
    fn seed_writes_the_reference_log() {
        let n = 25_000;
        for db in TestDatabase::all() {
            let store = db.store();
            register(&store).unwrap();
            seed(&store, n).unwrap();
            assert_eq!(
                state(&store).unwrap(),
                workload::expected(n).log_only(),
                "{}",
                db.backend()
            );
            // Every book's stream folds to the reference borrower.
            let mut borrowed = vec![None; workload::BOOKS as usize + 1];
            for e in workload::command_events(n) {
                match e.event {
                    LogEvent::BookBorrowed { book_id, user_id } => {
                        borrowed[book_id as usize] = Some(user_id)
                    }
                    LogEvent::BookReturned { book_id, .. } => borrowed[book_id as usize] = None,
                    _ => {}
                }
            }
            for book_id in [1, 500, 1000] {
                let book = Book::load(&store, &workload::book_stream(book_id)).unwrap();
                assert_eq!(
                    book.borrowed_by, borrowed[book_id as usize],
                    "book {book_id}"
                );
            }
        }
    }

    #[test]
    fn not_yet_available_phases_say_so() {
        let db = TestDatabase::sqlite();
        let store = db.store();
        for phase in [Phase::B, Phase::D] {
            assert!(
                matches!(run(&store, phase, &[]), Err(BenchError::NotAvailable(p)) if p == phase)
            );
        }
    }
}
