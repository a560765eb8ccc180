//! The workload written as an application would write it with the
//! framework's public API: `#[derive(Event)]` events, a `Book` aggregate
//! executed with `EventStore::execute` (load + fold + decide + append with
//! the expected version, retried on conflict), the `book_list` read model
//! declared with `#[derive(ReadModel)]` and kept by `#[projector]`s, and
//! `EventStore::rebuild`.
//!
//! The projectors register themselves for the whole binary, so the store of
//! phases without a read model (A, C) is opened with inline projectors off
//! (see [`open`]); `migrate` still creates the empty `book_list` table there.

use crate::clock::Clock;
use crate::workload::{self, Command, LogEvent, State};
use crate::{latency, BenchError, Phase, Result};
use diesel::prelude::*;
use es_diesel::{
    projector, Aggregate, Backend, Cache, Event, EventStore, ExecuteError, ExpectedVersion,
    ReadModel, RebuildOptions, SqliteSync, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a command obtains the book's state, as printed in the report.
pub const APPROACH: &str = "load + fold (no snapshots)";
/// The framework's approach with `--aggregate-cache`.
pub const APPROACH_CACHED: &str = "state cache (Aggregate::CACHE); load + fold on a miss";

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

/// A book's state, folded from its stream: all a command needs to decide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Book {
    registered: bool,
    borrowed_by: Option<i64>,
}

/// Why the book aggregate refuses a command.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("book {0} is not registered")]
    UnknownBook(i64),
}

impl Aggregate for Book {
    const TYPE: &'static str = "book";
    type Event = BookEvent;
    type Command = Command;
    type Error = Refused;
    /// Used only with `--aggregate-cache` (`StoreOptions::cache_aggregates`
    /// is off otherwise, so that both implementations read every stream).
    const CACHE: Option<Cache<Self>> = Some(Cache::entries(10_000));

    fn apply(&mut self, event: &BookEvent) {
        match event {
            BookEvent::BookRegistered(_) => self.registered = true,
            BookEvent::BookBorrowed(e) => self.borrowed_by = Some(e.user_id),
            BookEvent::BookReturned(_) => self.borrowed_by = None,
        }
    }

    /// Borrow if the book is on the shelf, otherwise its borrower returns it.
    fn handle(&self, command: Command) -> Result<Vec<BookEvent>, Refused> {
        let book_id = command.book_id;
        if !self.registered {
            return Err(Refused::UnknownBook(book_id));
        }
        Ok(vec![match self.borrowed_by {
            None => BookBorrowed {
                book_id,
                user_id: command.user_id,
            }
            .into(),
            Some(borrower) => BookReturned {
                book_id,
                user_id: borrower,
            }
            .into(),
        }])
    }
}

/// The `book_list` read model of the workload.
#[derive(ReadModel, Clone, Debug, PartialEq)]
#[read_model(table = "book_list", primary_key = book_id)]
pub struct BookList {
    pub book_id: i64,
    pub title: String,
    pub author: String,
    pub borrowed_by: Option<i64>,
    pub times_borrowed: i64,
}

#[projector(on = BookRegistered, key = book_id)]
fn list_registered(e: &BookRegistered, row: &mut Option<BookList>) {
    *row = Some(BookList {
        book_id: e.book_id,
        title: e.title.clone(),
        author: e.author.clone(),
        borrowed_by: None,
        times_borrowed: 0,
    });
}

#[projector(on = BookBorrowed, key = book_id)]
fn list_borrowed(e: &BookBorrowed, row: &mut Option<BookList>) -> Result<(), String> {
    let book = row
        .as_mut()
        .ok_or_else(|| format!("book {} is not in book_list", e.book_id))?;
    book.borrowed_by = Some(e.user_id);
    book.times_borrowed += 1;
    Ok(())
}

#[projector(on = BookReturned, key = book_id)]
fn list_returned(e: &BookReturned, row: &mut Option<BookList>) -> Result<(), String> {
    let book = row
        .as_mut()
        .ok_or_else(|| format!("book {} is not in book_list", e.book_id))?;
    book.borrowed_by = None;
    Ok(())
}

/// Opens the store the way an application would, with the SQLite
/// durability (and writer queue) the benchmark runs under, and `Book`'s
/// state cache only with `--aggregate-cache`. Inline projectors run only in
/// phase B: the others measure appends without a read model (A, C) or
/// seed a log whose read model D rebuilds.
pub fn open(
    url: &str,
    sqlite_sync: SqliteSync,
    queue_sqlite_writers: bool,
    cache_aggregates: bool,
    optimistic_rows: bool,
    phase: Phase,
) -> Result<EventStore> {
    let options = StoreOptions {
        sqlite_sync,
        queue_sqlite_writers,
        cache_aggregates,
        optimistic_rows,
        inline_projectors: phase == Phase::B,
        ..StoreOptions::default()
    };
    Ok(EventStore::open_with(url, options)?)
}

/// Untimed set-up of a fresh database for `phase`: schema, the `preload`
/// events of `--preload-events` (history on books the workload does not
/// touch), registrations, for D the log of `replay_events` commands, then
/// the statements of `--framework-sql` (`alter`), if any.
/// On PostgreSQL a preloaded log is then vacuumed, analyzed and
/// checkpointed, as raw's is, so that neither autovacuum's reaction to the
/// bulk load nor the checkpoint writing its pages falls into the timed
/// phase.
pub fn prepare(
    store: &EventStore,
    phase: Phase,
    replay_events: u64,
    preload: u64,
    alter: Option<&str>,
) -> Result<()> {
    store.migrate()?;
    append_log(store, workload::preload_events(preload))?;
    match phase {
        Phase::A | Phase::B | Phase::C => register(store)?,
        Phase::D => {
            register(store)?;
            seed(store, replay_events)?;
        }
        Phase::E1 | Phase::E2 | Phase::E3 => return Err(BenchError::RawOnly(phase)),
    }
    if let Some(sql) = alter {
        use diesel::connection::SimpleConnection;
        store.connection()?.batch_execute(sql)?;
    }
    if preload > 0 && store.backend() == Backend::Postgres {
        use diesel::connection::SimpleConnection;
        let mut conn = store.connection()?;
        conn.batch_execute("VACUUM ANALYZE es_events")?;
        crate::checkpoint_after_preload(&mut *conn);
    }
    Ok(())
}

/// The timed part of `phase`; returns the wall time and, for A, B and C,
/// each command's latency in nanoseconds (in no particular order).
pub fn run(store: &EventStore, phase: Phase, commands: &[Command]) -> Result<(Duration, Vec<u64>)> {
    match phase {
        Phase::A | Phase::B => sequential(store, commands),
        Phase::C => concurrent(store, commands),
        Phase::D => Ok((rebuild(store)?, Vec::new())),
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
/// anything (untimed seed of phase D).
pub fn seed(store: &EventStore, n: u64) -> Result<()> {
    append_log(store, workload::command_events(n))
}

/// Appends precomputed log entries (the seed of D, the preloaded history)
/// with `append_streams`, 10,000 events per call. Each call is one atomic
/// append expecting every stream at the version before its first event
/// there; within a call the events are grouped by stream, so the global
/// order differs from the entries' order inside a call while every stream
/// keeps its order (the read model's final state does not depend on it).
fn append_log(store: &EventStore, entries: impl Iterator<Item = workload::LogEntry>) -> Result<()> {
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
    for entry in entries {
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
            LogEvent::BookRegistered { book_id } => write.push(&BookRegistered {
                book_id,
                title: workload::book_title(book_id),
                author: workload::book_author(book_id),
            })?,
            LogEvent::UserRegistered { user_id } => write.push(&UserRegistered {
                user_id,
                name: workload::user_name(user_id),
            })?,
        };
        pending += 1;
        if pending == BATCH {
            flush(&mut batch, &mut index)?;
            pending = 0;
        }
    }
    flush(&mut batch, &mut index)
}

/// Executes one command on its book: `execute` loads and folds the stream,
/// decides, appends expecting the loaded version, and on a conflict starts
/// again from the load.
fn execute(store: &EventStore, command: Command) -> Result<()> {
    match store.execute::<Book>(&command.book_id.to_string(), command) {
        Ok(_) => Ok(()),
        Err(ExecuteError::Domain(refused)) => Err(BenchError::Refused(refused)),
        Err(ExecuteError::Store(e)) => Err(e.into()),
    }
}

/// A and B: the commands one after the other, one transaction each (B's
/// store runs the `book_list` projectors in it).
fn sequential(store: &EventStore, commands: &[Command]) -> Result<(Duration, Vec<u64>)> {
    // The pool opens connections lazily; open one before the clock.
    drop(store.connection()?);
    let mut latencies = Vec::with_capacity(commands.len());
    let clock = Clock::start();
    latency::each(commands, &mut latencies, |c| execute(store, c))?;
    Ok((clock.stop(), latencies))
}

/// C: four writers on disjoint streams sharing one store (and its pool).
/// Each writer records its commands' latencies in its own vector.
fn concurrent(store: &EventStore, commands: &[Command]) -> Result<(Duration, Vec<u64>)> {
    let parts: Vec<Vec<Command>> = (0..workload::WRITERS)
        .map(|w| workload::writer_commands(commands, w))
        .collect();
    {
        let warm: Vec<_> = (0..workload::WRITERS)
            .map(|_| store.connection())
            .collect::<std::result::Result<_, _>>()?;
        drop(warm);
    }
    let mut latencies: Vec<Vec<u64>> = parts.iter().map(|p| Vec::with_capacity(p.len())).collect();
    let clock = Clock::start();
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .zip(&mut latencies)
            .map(|(part, out)| s.spawn(move || latency::each(part, out, |c| execute(store, c))))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| BenchError::WriterPanicked)?)
    })?;
    let elapsed = clock.stop();
    Ok((elapsed, latencies.concat()))
}

/// D: `rebuild` empties `book_list` and replays the book events of the log
/// in global order with the default options, in one transaction.
fn rebuild(store: &EventStore) -> Result<Duration> {
    drop(store.connection()?);
    let options = RebuildOptions::default();
    let clock = Clock::start();
    let report = store.rebuild_with(BookList::SCHEMA.name, &options, |_| {})?;
    let elapsed = clock.stop();
    // Every event but the user registrations feeds book_list.
    let log = count(
        &mut *store.connection()?,
        "SELECT COUNT(*) AS n FROM es_events",
    )?;
    if report.events as i64 != log - workload::USERS {
        return Err(BenchError::Inconsistent(format!(
            "rebuild replayed {} events of a log of {log} (expected all but the {} user registrations)",
            report.events,
            workload::USERS
        )));
    }
    Ok(elapsed)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn count(conn: &mut es_diesel::DbConnection, sql: &str) -> Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.n)
}

#[derive(QueryableByName)]
struct ReadModelState {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    books: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    borrowed_now: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    times_borrowed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    checksum: i64,
}

/// The log's size and number of borrows, and for B and D the `book_list`
/// aggregates the reference defines.
pub fn state(store: &EventStore, phase: Phase) -> Result<State> {
    let mut conn = store.connection()?;
    let log_events = count(&mut conn, "SELECT COUNT(*) AS n FROM es_events")?;
    // The typed view #[derive(Event)] generated for BookBorrowed.
    let borrowed_events = book_borrowed::table.count().get_result::<i64>(&mut *conn)?;
    let mut state = State {
        log_events,
        borrowed_events,
        rm_books: None,
        rm_borrowed_now: None,
        rm_times_borrowed: None,
        rm_checksum: None,
    };
    if matches!(phase, Phase::B | Phase::D) {
        // SUM of a BIGINT is NUMERIC on PostgreSQL, DECIMAL on MySQL: cast
        // back (MySQL's CAST calls its 64-bit integer SIGNED).
        let int = match store.backend() {
            Backend::Mysql => "SIGNED",
            Backend::Sqlite | Backend::Postgres => "BIGINT",
        };
        let rm: ReadModelState = diesel::sql_query(format!(
            "SELECT COUNT(*) AS books, COUNT(borrowed_by) AS borrowed_now, \
             CAST(COALESCE(SUM(times_borrowed), 0) AS {int}) AS times_borrowed, \
             CAST(COALESCE(SUM(book_id * borrowed_by), 0) AS {int}) AS checksum FROM book_list",
        ))
        .get_result(&mut *conn)?;
        state.rm_books = Some(rm.books);
        state.rm_borrowed_now = Some(rm.borrowed_now);
        state.rm_times_borrowed = Some(rm.times_borrowed);
        state.rm_checksum = Some(rm.checksum);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_diesel::testing::TestDatabase;

    /// Prepares and runs `phase` as the child processes do: a store opened
    /// for the phase for each step.
    fn prepare_and_run(db: &TestDatabase, phase: Phase, n: u64) -> State {
        prepare_and_run_with(db, phase, n, 0, false)
    }

    fn prepare_and_run_preloaded(db: &TestDatabase, phase: Phase, n: u64, preload: u64) -> State {
        prepare_and_run_with(db, phase, n, preload, false)
    }

    fn prepare_and_run_with(
        db: &TestDatabase,
        phase: Phase,
        n: u64,
        preload: u64,
        cache: bool,
    ) -> State {
        let url = db.url();
        prepare(
            &open(url, SqliteSync::Normal, true, false, true, phase).unwrap(),
            phase,
            n,
            preload,
            None,
        )
        .unwrap();
        let store = open(url, SqliteSync::Normal, true, cache, true, phase).unwrap();
        let commands: Vec<Command> = match phase {
            Phase::D => Vec::new(),
            _ => workload::commands(n).collect(),
        };
        let (_, latencies) = run(&store, phase, &commands).unwrap();
        assert_eq!(latencies.len(), commands.len(), "a latency per command");
        state(&store, phase).unwrap()
    }

    #[test]
    fn a_c_d_on_a_preloaded_log_end_in_the_expected_state() {
        let (n, preload) = (200, 1_250);
        for (phase, expected) in [
            (Phase::A, workload::expected(n).log_only()),
            (Phase::C, workload::expected(n).log_only()),
            (Phase::D, workload::expected(n)),
        ] {
            for db in TestDatabase::all() {
                assert_eq!(
                    prepare_and_run_preloaded(&db, phase, n, preload),
                    expected.with_preload(preload),
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    /// With Book's state cache (`--aggregate-cache`), concurrent writers
    /// included.
    #[test]
    fn phases_a_b_c_on_cached_states_end_in_the_expected_state() {
        let n = 300;
        for (phase, expected) in [
            (Phase::A, workload::expected(n).log_only()),
            (Phase::B, workload::expected(n)),
            (Phase::C, workload::expected(n).log_only()),
        ] {
            for db in TestDatabase::all() {
                assert_eq!(
                    prepare_and_run_with(&db, phase, n, 0, true),
                    expected,
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    #[test]
    fn phases_a_b_c_d_end_in_the_expected_state() {
        let n = 300;
        for (phase, expected) in [
            (Phase::A, workload::expected(n).log_only()),
            (Phase::B, workload::expected(n)),
            (Phase::C, workload::expected(n).log_only()),
            (Phase::D, workload::expected(n)),
        ] {
            for db in TestDatabase::all() {
                assert_eq!(
                    prepare_and_run(&db, phase, n),
                    expected,
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    fn book_list_rows(store: &EventStore) -> i64 {
        book_list::table
            .count()
            .get_result::<i64>(&mut *store.connection().unwrap())
            .unwrap()
    }

    #[test]
    fn a_and_c_run_no_projector() {
        for phase in [Phase::A, Phase::C] {
            for db in TestDatabase::all() {
                prepare_and_run(&db, phase, 100);
                assert_eq!(
                    book_list_rows(&db.store()),
                    0,
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    #[test]
    fn d_seeds_an_empty_read_model_and_the_rebuild_fills_it() {
        for db in TestDatabase::all() {
            let store = open(db.url(), SqliteSync::Normal, true, false, true, Phase::D).unwrap();
            prepare(&store, Phase::D, 200, 0, None).unwrap();
            assert_eq!(book_list_rows(&store), 0, "seed on {}", db.backend());
            run(&store, Phase::D, &[]).unwrap();
            assert_eq!(
                book_list_rows(&store),
                workload::BOOKS,
                "rebuild on {}",
                db.backend()
            );
        }
    }

    #[test]
    fn the_book_decides_borrow_or_return() {
        use es_diesel::harness::given;
        let registered: BookEvent = BookRegistered {
            book_id: 7,
            title: workload::book_title(7),
            author: workload::book_author(7),
        }
        .into();
        let borrowed: BookEvent = BookBorrowed {
            book_id: 7,
            user_id: 3,
        }
        .into();
        given::<Book>([registered.clone()])
            .when(Command {
                book_id: 7,
                user_id: 5,
            })
            .then([BookBorrowed {
                book_id: 7,
                user_id: 5,
            }
            .into()]);
        // Out: the borrower (3) returns it, whoever asks.
        given::<Book>([registered, borrowed])
            .when(Command {
                book_id: 7,
                user_id: 5,
            })
            .then([BookReturned {
                book_id: 7,
                user_id: 3,
            }
            .into()]);
        given::<Book>([])
            .when(Command {
                book_id: 7,
                user_id: 5,
            })
            .then_error_matches(|e| matches!(e, Refused::UnknownBook(7)));
    }

    #[test]
    fn seed_writes_the_reference_log() {
        let n = 25_000;
        for db in TestDatabase::all() {
            let store = db.store();
            register(&store).unwrap();
            seed(&store, n).unwrap();
            assert_eq!(
                state(&store, Phase::A).unwrap(),
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
                let book = store
                    .load_aggregate::<Book>(&book_id.to_string())
                    .unwrap()
                    .state;
                assert_eq!(
                    book.borrowed_by, borrowed[book_id as usize],
                    "book {book_id}"
                );
            }
        }
    }
}
