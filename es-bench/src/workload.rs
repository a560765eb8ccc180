//! The `library` workload of `es-bench/WORKLOAD.md`, without a database:
//! the command stream, the log it must produce, and the final state that
//! every run is checked against (a port of `es-bench/expected.py`).

use serde::{Deserialize, Serialize};

/// Books, ids `1..=BOOKS`.
pub const BOOKS: i64 = 1_000;
/// Users, ids `1..=USERS`.
pub const USERS: i64 = 100;
/// Registration events written before the clock starts.
pub const REGISTRATIONS: i64 = BOOKS + USERS;
/// Concurrent writers of phase C.
pub const WRITERS: usize = 4;

/// splitmix64, the workload's only source of randomness.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One borrow-or-return command: which book, and who asks (ignored when
/// the book is out: the current borrower returns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    pub book_id: i64,
    pub user_id: i64,
}

/// The first `n` commands (splitmix64 seeded with 42, book drawn first).
pub fn commands(n: u64) -> impl Iterator<Item = Command> {
    let mut rng = SplitMix64::new(42);
    (0..n).map(move |_| {
        let book_id = 1 + (rng.next_u64() % BOOKS as u64) as i64;
        let user_id = 1 + (rng.next_u64() % USERS as u64) as i64;
        Command { book_id, user_id }
    })
}

/// The commands of writer `w` in phase C, in order: those on books with
/// `(book_id - 1) % WRITERS == w`.
pub fn writer_commands(all: &[Command], w: usize) -> Vec<Command> {
    all.iter()
        .copied()
        .filter(|c| ((c.book_id - 1) as usize) % WRITERS == w)
        .collect()
}

/// The `book-<id>` stream of a book.
pub fn book_stream(book_id: i64) -> String {
    format!("book-{book_id}")
}

/// The `user-<id>` stream of a user.
pub fn user_stream(user_id: i64) -> String {
    format!("user-{user_id}")
}

pub fn book_title(book_id: i64) -> String {
    format!("Book {book_id}")
}

pub fn book_author(book_id: i64) -> String {
    format!("Author {}", book_id % 50)
}

pub fn user_name(user_id: i64) -> String {
    format!("User {user_id}")
}

/// An event of the reference log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogEvent {
    BookRegistered { book_id: i64 },
    UserRegistered { user_id: i64 },
    BookBorrowed { book_id: i64, user_id: i64 },
    BookReturned { book_id: i64, user_id: i64 },
}

/// One row of the reference log: the event and its place in its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub event: LogEvent,
    pub version: i64,
}

impl LogEntry {
    pub fn stream_id(&self) -> String {
        match self.event {
            LogEvent::UserRegistered { user_id } => user_stream(user_id),
            LogEvent::BookRegistered { book_id }
            | LogEvent::BookBorrowed { book_id, .. }
            | LogEvent::BookReturned { book_id, .. } => book_stream(book_id),
        }
    }
}

/// The registrations (books 1..=1000, then users 1..=100), each version 1.
pub fn registrations() -> impl Iterator<Item = LogEntry> {
    let books = (1..=BOOKS).map(|book_id| LogEvent::BookRegistered { book_id });
    let users = (1..=USERS).map(|user_id| LogEvent::UserRegistered { user_id });
    books
        .chain(users)
        .map(|event| LogEntry { event, version: 1 })
}

/// The events the first `n` commands append, in command order, computed by
/// folding in memory (used to seed logs and for phase E, never to decide
/// commands in A, B or C).
pub fn command_events(n: u64) -> impl Iterator<Item = LogEntry> {
    let mut books = vec![(None::<i64>, 1_i64); BOOKS as usize + 1];
    commands(n).map(move |c| {
        let (borrowed_by, version) = &mut books[c.book_id as usize];
        *version += 1;
        let event = match *borrowed_by {
            None => {
                *borrowed_by = Some(c.user_id);
                LogEvent::BookBorrowed {
                    book_id: c.book_id,
                    user_id: c.user_id,
                }
            }
            Some(borrower) => {
                *borrowed_by = None;
                LogEvent::BookReturned {
                    book_id: c.book_id,
                    user_id: borrower,
                }
            }
        };
        LogEntry {
            event,
            version: *version,
        }
    })
}

/// Events per stream of the preloaded log (the last stream may be shorter).
pub const PRELOAD_STREAM_EVENTS: u64 = 100;
/// The first book of the preloaded log: its books are `PRELOAD_FIRST_BOOK..`,
/// streams the workload never touches (its books are `1..=BOOKS`).
pub const PRELOAD_FIRST_BOOK: i64 = 1_000_001;

/// The `n` events of `--preload-events`: history on books the workload does
/// not touch, written before the registrations. Book `PRELOAD_FIRST_BOOK + s`
/// gets `PRELOAD_STREAM_EVENTS` events (fewer for the last one): its
/// `BookRegistered`, then borrows (odd versions after the first: version 2,
/// 4, …, by user `1 + (book_id + version) % USERS`) each followed by the
/// return by that borrower.
pub fn preload_events(n: u64) -> impl Iterator<Item = LogEntry> {
    (0..n).map(|i| {
        let book_id = PRELOAD_FIRST_BOOK + (i / PRELOAD_STREAM_EVENTS) as i64;
        let version = (i % PRELOAD_STREAM_EVENTS) as i64 + 1;
        let borrower = |v: i64| 1 + (book_id + v) % USERS;
        let event = match version {
            1 => LogEvent::BookRegistered { book_id },
            v if v % 2 == 0 => LogEvent::BookBorrowed {
                book_id,
                user_id: borrower(v),
            },
            v => LogEvent::BookReturned {
                book_id,
                user_id: borrower(v - 1),
            },
        };
        LogEntry { event, version }
    })
}

/// The whole log after `n` commands: registrations, then the commands' events.
pub fn reference_log(n: u64) -> impl Iterator<Item = LogEntry> {
    registrations().chain(command_events(n))
}

/// What a run ends with: the log, and the `book_list` read model where the
/// phase has one. Compared field by field with [`expected`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub log_events: i64,
    pub borrowed_events: i64,
    pub rm_books: Option<i64>,
    pub rm_borrowed_now: Option<i64>,
    pub rm_times_borrowed: Option<i64>,
    pub rm_checksum: Option<i64>,
}

impl State {
    /// The same state without the read-model fields.
    pub fn log_only(self) -> State {
        State {
            rm_books: None,
            rm_borrowed_now: None,
            rm_times_borrowed: None,
            rm_checksum: None,
            ..self
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        write!(
            f,
            "log_events={} borrowed_events={} rm_books={} rm_borrowed_now={} rm_times_borrowed={} rm_checksum={}",
            self.log_events,
            self.borrowed_events,
            opt(self.rm_books),
            opt(self.rm_borrowed_now),
            opt(self.rm_times_borrowed),
            opt(self.rm_checksum)
        )
    }
}

impl State {
    /// This state on a log that also holds the `n` events of
    /// [`preload_events`]: the log, its borrows and, where the state has a
    /// read model, the preloaded books' rows.
    pub fn with_preload(self, n: u64) -> State {
        if n == 0 {
            return self;
        }
        let mut borrowed_by: Vec<(i64, Option<i64>)> = Vec::new();
        let mut borrowed_events = 0;
        for entry in preload_events(n) {
            match entry.event {
                LogEvent::BookRegistered { book_id } => borrowed_by.push((book_id, None)),
                LogEvent::BookBorrowed { user_id, .. } => {
                    borrowed_events += 1;
                    borrowed_by.last_mut().expect("registered first").1 = Some(user_id);
                }
                LogEvent::BookReturned { .. } => {
                    borrowed_by.last_mut().expect("registered first").1 = None
                }
                LogEvent::UserRegistered { .. } => unreachable!("no users are preloaded"),
            }
        }
        let now = borrowed_by
            .iter()
            .filter_map(|&(book, user)| user.map(|u| (book, u)));
        let add = |v: Option<i64>, x: i64| v.map(|v| v + x);
        State {
            log_events: self.log_events + n as i64,
            borrowed_events: self.borrowed_events + borrowed_events,
            rm_books: add(self.rm_books, borrowed_by.len() as i64),
            rm_borrowed_now: add(self.rm_borrowed_now, now.clone().count() as i64),
            rm_times_borrowed: add(self.rm_times_borrowed, borrowed_events),
            rm_checksum: add(self.rm_checksum, now.map(|(b, u)| b * u).sum()),
        }
    }
}

/// The state after `n` commands, read model included (`python3 es-bench/expected.py n`).
pub fn expected(n: u64) -> State {
    let mut borrowed_by = vec![None::<i64>; BOOKS as usize + 1];
    let mut borrowed_events = 0;
    for c in commands(n) {
        let slot = &mut borrowed_by[c.book_id as usize];
        if slot.is_none() {
            *slot = Some(c.user_id);
            borrowed_events += 1;
        } else {
            *slot = None;
        }
    }
    let now = borrowed_by
        .iter()
        .enumerate()
        .filter_map(|(book, user)| user.map(|u| (book as i64, u)));
    State {
        log_events: n as i64 + REGISTRATIONS,
        borrowed_events,
        rm_books: Some(BOOKS),
        rm_borrowed_now: Some(now.clone().count() as i64),
        rm_times_borrowed: Some(borrowed_events),
        rm_checksum: Some(now.map(|(b, u)| b * u).sum()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of splitmix64 seeded with 42 (as computed by es-bench/expected.py's nxt()).
        let mut rng = SplitMix64::new(42);
        assert_eq!(rng.next_u64(), 0xBDD7_3226_2FEB_6E95);
        assert_eq!(rng.next_u64(), 0x28EF_E333_B266_F103);
    }

    #[test]
    fn expected_state_matches_the_workload_table() {
        let cases = [
            (20_000, 21_100, 10_266, 532, 14_340_191),
            (100_000, 101_100, 50_253, 506, 12_662_099),
        ];
        for (n, log, borrowed, now, checksum) in cases {
            let s = expected(n);
            assert_eq!(
                s,
                State {
                    log_events: log,
                    borrowed_events: borrowed,
                    rm_books: Some(1_000),
                    rm_borrowed_now: Some(now),
                    rm_times_borrowed: Some(borrowed),
                    rm_checksum: Some(checksum),
                },
                "N = {n}"
            );
        }
    }

    #[test]
    fn reference_log_agrees_with_expected_state() {
        let n = 20_000;
        let log: Vec<LogEntry> = reference_log(n).collect();
        let e = expected(n);
        assert_eq!(log.len() as i64, e.log_events);
        let borrowed = log
            .iter()
            .filter(|l| matches!(l.event, LogEvent::BookBorrowed { .. }))
            .count() as i64;
        assert_eq!(borrowed, e.borrowed_events);
        // Versions are gapless per stream.
        let mut last = std::collections::HashMap::new();
        for entry in &log {
            let v = last.entry(entry.stream_id()).or_insert(0);
            assert_eq!(entry.version, *v + 1, "{entry:?}");
            *v = entry.version;
        }
    }

    #[test]
    fn preloaded_log_is_gapless_and_adds_to_the_expected_state() {
        let n = 250;
        let log: Vec<LogEntry> = preload_events(n).collect();
        assert_eq!(log.len(), 250);
        let mut last = std::collections::HashMap::new();
        for entry in &log {
            let v = last.entry(entry.stream_id()).or_insert(0);
            assert_eq!(entry.version, *v + 1, "{entry:?}");
            *v = entry.version;
            // Disjoint from the workload's streams.
            let book = match entry.event {
                LogEvent::BookRegistered { book_id }
                | LogEvent::BookBorrowed { book_id, .. }
                | LogEvent::BookReturned { book_id, .. } => book_id,
                LogEvent::UserRegistered { .. } => panic!("{entry:?}"),
            };
            assert!(book >= PRELOAD_FIRST_BOOK);
        }
        // Three books of 100, 100 and 50 events: the registration, then
        // borrow (even versions) and return; each ends with a borrow (of
        // version 100, 100 and 50), so all three are out.
        assert_eq!(last.len(), 3);
        let base = expected(10);
        let s = base.with_preload(n);
        assert_eq!(s.log_events, base.log_events + 250);
        assert_eq!(s.borrowed_events, base.borrowed_events + 50 + 50 + 25);
        assert_eq!(s.rm_books, Some(1_003));
        assert_eq!(s.rm_borrowed_now, base.rm_borrowed_now.map(|v| v + 3));
        let out = |book: i64, version: i64| book * (1 + (book + version) % USERS);
        let b = PRELOAD_FIRST_BOOK;
        assert_eq!(
            s.rm_checksum,
            base.rm_checksum
                .map(|v| v + out(b, 100) + out(b + 1, 100) + out(b + 2, 50))
        );
        assert_eq!(base.log_only().with_preload(n), s.log_only());
        assert_eq!(base.with_preload(0), base);
    }

    #[test]
    fn writers_partition_the_commands() {
        let all: Vec<Command> = commands(1_000).collect();
        let parts: Vec<Vec<Command>> = (0..WRITERS).map(|w| writer_commands(&all, w)).collect();
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), all.len());
        for (w, part) in parts.iter().enumerate() {
            assert!(part.iter().all(|c| (c.book_id - 1) as usize % WRITERS == w));
        }
    }
}
