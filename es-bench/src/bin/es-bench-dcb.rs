//! The cost of a decision across streams (a dynamic consistency boundary)
//! next to the aggregate path, on the library's borrow command.
//!
//! Both paths run the same borrow-or-return commands (the workload's
//! splitmix64 stream over 1,000 books and 100 readers) on tagged events:
//!
//! - **aggregate**: as the library app did before decisions: load the
//!   reader's stream to check the card, then `execute` the book's aggregate
//!   (load, decide, append with the expected version). The card check is
//!   outside the append's guarantee, and a loan limit cannot be checked.
//! - **decide**: one `EventStore::decide` over the book's events and the
//!   reader's (card and loans, with a loan limit), appended on the
//!   condition that neither changed since the read.
//!
//! The loan limit is set above what the workload reaches, so both paths
//! decide the same events and their logs are compared at the end. Returns
//! take the aggregate path in both. Each path runs sequentially and with 4
//! writers (books split between them, as phase C), on a fresh database per
//! run; the median of `--runs` is reported, with decide / aggregate.
//!
//! `cargo run --release -p es-bench --bin es-bench-dcb -- --backend sqlite`
//! (`postgres` / `mysql` take `ES_TEST_POSTGRES_URL` / `ES_TEST_MYSQL_URL`,
//! or `--url`; each run works in a schema or database of its own).

use clap::{Parser, ValueEnum};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    tag, Aggregate, DecisionState, Event, EventStore, ExecuteError, ExpectedVersion, Query,
    StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const BOOKS: i64 = 1_000;
const USERS: i64 = 100;
const WRITERS: usize = 4;
/// Above any reader's loans in this workload: both paths decide alike.
const MAX_LOANS: usize = 1_000;

#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[event(tag = "book:{book_id}")]
struct BookRegistered {
    book_id: i64,
    title: String,
}

#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[event(tag = "user:{user_id}")]
struct UserRegistered {
    user_id: i64,
    name: String,
}

#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[event(tag = "book:{book_id}", tag = "user:{user_id}")]
struct BookBorrowed {
    book_id: i64,
    user_id: i64,
}

#[derive(Event, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[event(tag = "book:{book_id}", tag = "user:{user_id}")]
struct BookReturned {
    book_id: i64,
    user_id: i64,
}

#[allow(clippy::enum_variant_names)]
#[derive(Event, Clone, Debug, PartialEq)]
enum BookEvent {
    BookRegistered(BookRegistered),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

#[allow(clippy::enum_variant_names)]
#[derive(Event, Clone, Debug, PartialEq)]
enum UserEvent {
    UserRegistered(UserRegistered),
}

#[derive(Event, Clone, Debug, PartialEq)]
enum LoanEvent {
    UserRegistered(UserRegistered),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("unknown book {0}")]
    UnknownBook(i64),
    #[error("unknown reader {0}")]
    UnknownUser(i64),
    #[error("reader {0} holds too many books")]
    TooMany(i64),
    #[error("book {0} is out")]
    Out(i64),
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Book {
    registered: bool,
    holder: Option<i64>,
}

#[derive(Clone, Copy, Debug)]
enum BookCommand {
    Borrow {
        book_id: i64,
        user_id: i64,
        user_registered: bool,
    },
    Return {
        book_id: i64,
    },
}

impl Aggregate for Book {
    const TYPE: &'static str = "book";
    type Event = BookEvent;
    type Command = BookCommand;
    type Error = Refused;

    fn apply(&mut self, e: &BookEvent) {
        match e {
            BookEvent::BookRegistered(_) => self.registered = true,
            BookEvent::BookBorrowed(e) => self.holder = Some(e.user_id),
            BookEvent::BookReturned(_) => self.holder = None,
        }
    }

    fn handle(&self, c: BookCommand) -> Result<Vec<BookEvent>, Refused> {
        match (c, self.holder) {
            (BookCommand::Borrow { book_id, .. }, _) if !self.registered => {
                Err(Refused::UnknownBook(book_id))
            }
            (
                BookCommand::Borrow {
                    user_registered: false,
                    user_id,
                    ..
                },
                _,
            ) => Err(Refused::UnknownUser(user_id)),
            (BookCommand::Borrow { .. }, Some(h)) => Err(Refused::Out(h)),
            (
                BookCommand::Borrow {
                    book_id, user_id, ..
                },
                None,
            ) => Ok(vec![BookBorrowed { book_id, user_id }.into()]),
            (BookCommand::Return { book_id }, Some(user_id)) => {
                Ok(vec![BookReturned { book_id, user_id }.into()])
            }
            (BookCommand::Return { .. }, None) => Ok(vec![]),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct User {
    registered: bool,
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Event = UserEvent;
    type Command = ();
    type Error = Refused;

    fn apply(&mut self, _: &UserEvent) {
        self.registered = true;
    }

    fn handle(&self, (): ()) -> Result<Vec<UserEvent>, Refused> {
        Ok(vec![])
    }
}

#[derive(Clone, Debug, Default)]
struct Shelf {
    book_id: i64,
    book: Book,
}

impl DecisionState for Shelf {
    type Event = BookEvent;
    fn query(&self) -> Query {
        Query::of::<BookEvent>().tagged(tag("book", self.book_id))
    }
    fn apply(&mut self, e: &BookEvent) {
        self.book.apply(e);
    }
}

#[derive(Clone, Debug, Default)]
struct Loans {
    user_id: i64,
    registered: bool,
    holding: BTreeSet<i64>,
}

impl DecisionState for Loans {
    type Event = LoanEvent;
    fn query(&self) -> Query {
        Query::of::<LoanEvent>().tagged(tag("user", self.user_id))
    }
    fn apply(&mut self, e: &LoanEvent) {
        match e {
            LoanEvent::UserRegistered(_) => self.registered = true,
            LoanEvent::BookBorrowed(e) => {
                self.holding.insert(e.book_id);
            }
            LoanEvent::BookReturned(e) => {
                self.holding.remove(&e.book_id);
            }
        }
    }
}

fn borrow_rule((shelf, loans): &(Shelf, Loans)) -> Result<Vec<BookBorrowed>, Refused> {
    if !shelf.book.registered {
        return Err(Refused::UnknownBook(shelf.book_id));
    }
    if !loans.registered {
        return Err(Refused::UnknownUser(loans.user_id));
    }
    if let Some(h) = shelf.book.holder {
        return Err(Refused::Out(h));
    }
    if loans.holding.len() >= MAX_LOANS {
        return Err(Refused::TooMany(loans.user_id));
    }
    Ok(vec![BookBorrowed {
        book_id: shelf.book_id,
        user_id: loans.user_id,
    }])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
    Mysql,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Aggregate,
    Decide,
}

#[derive(Parser)]
#[command(about = "Borrow with the reader check: a decision across streams vs the aggregate path")]
struct Cli {
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendArg,
    /// Server URL (default: ES_TEST_POSTGRES_URL or ES_TEST_MYSQL_URL).
    #[arg(long)]
    url: Option<String>,
    /// Commands per run.
    #[arg(short = 'n', long, default_value_t = 4_000)]
    commands: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The workload's command stream (splitmix64 seeded with 42).
fn commands(n: u64) -> Vec<(i64, i64)> {
    let mut state = 42u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let book = 1 + (next() % BOOKS as u64) as i64;
            let user = 1 + (next() % USERS as u64) as i64;
            (book, user)
        })
        .collect()
}

fn run_command(store: &EventStore, path: Path, book: i64, user: i64) {
    let id = book.to_string();
    let loaded = store.load_aggregate::<Book>(&id).expect("load");
    if loaded.state.holder.is_some() {
        store
            .execute::<Book>(&id, BookCommand::Return { book_id: book })
            .expect("return");
        return;
    }
    match path {
        Path::Aggregate => {
            let user_registered = store
                .load_aggregate::<User>(&user.to_string())
                .expect("load user")
                .state
                .registered;
            store
                .execute::<Book>(
                    &id,
                    BookCommand::Borrow {
                        book_id: book,
                        user_id: user,
                        user_registered,
                    },
                )
                .expect("borrow");
        }
        Path::Decide => {
            let states = (
                Shelf {
                    book_id: book,
                    ..Shelf::default()
                },
                Loans {
                    user_id: user,
                    ..Loans::default()
                },
            );
            match store.decide(&Book::stream_id(&id), states, borrow_rule) {
                Ok(_) => {}
                // The holder changed since the load above (another writer):
                // the same outcome as the aggregate path's refusal.
                Err(ExecuteError::Domain(Refused::Out(_))) => {}
                Err(e) => panic!("decide: {e}"),
            }
        }
    }
}

fn setup(db: &TestDatabase) -> EventStore {
    let store = EventStore::open_with(
        db.url(),
        StoreOptions {
            pool_size: WRITERS as u32 + 1,
            ..StoreOptions::default()
        },
    )
    .expect("open");
    store.migrate().expect("migrate");
    let mut writes = Vec::new();
    for b in 1..=BOOKS {
        let mut w = StreamWrite::new(Book::stream_id(&b.to_string()), ExpectedVersion::NoStream);
        w.push(&BookRegistered {
            book_id: b,
            title: format!("Book {b}"),
        })
        .expect("encode");
        writes.push(w);
    }
    for u in 1..=USERS {
        let mut w = StreamWrite::new(User::stream_id(&u.to_string()), ExpectedVersion::NoStream);
        w.push(&UserRegistered {
            user_id: u,
            name: format!("User {u}"),
        })
        .expect("encode");
        writes.push(w);
    }
    for chunk in writes.chunks(100) {
        store.append_streams(chunk).expect("register");
    }
    store
}

/// Runs the commands on a fresh database; returns the time and a digest of
/// the log (types and streams in stream order) to compare the paths.
fn run(
    backend: BackendArg,
    path: Path,
    writers: usize,
    cmds: &[(i64, i64)],
) -> (Duration, Vec<String>) {
    let db = match backend {
        BackendArg::Sqlite => TestDatabase::sqlite(),
        BackendArg::Postgres => TestDatabase::postgres().expect("ES_TEST_POSTGRES_URL"),
        BackendArg::Mysql => TestDatabase::mysql().expect("ES_TEST_MYSQL_URL"),
    };
    let store = setup(&db);
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let store = store.clone();
            s.spawn(move || {
                for &(book, user) in cmds {
                    if ((book - 1) as usize) % writers == w {
                        run_command(&store, path, book, user);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let mut digest: Vec<String> = store
        .read_all(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|e| format!("{} {} {}", e.stream_id, e.stream_version, e.event.0))
        .collect();
    digest.sort();
    (elapsed, digest)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let cli = Cli::parse();
    if let Some(url) = &cli.url {
        let var = match cli.backend {
            BackendArg::Postgres => "ES_TEST_POSTGRES_URL",
            BackendArg::Mysql => "ES_TEST_MYSQL_URL",
            BackendArg::Sqlite => "ES_BENCH_UNUSED",
        };
        std::env::set_var(var, url);
    }
    let cmds = commands(cli.commands);
    println!(
        "backend {:?}, {} commands (borrow or return), median of {} runs",
        cli.backend, cli.commands, cli.runs
    );
    println!(
        "{:<12} {:>8} {:>12} {:>12} {:>8}",
        "phase", "writers", "aggregate/s", "decide/s", "ratio"
    );
    for writers in [1, WRITERS] {
        let mut rates = [Vec::new(), Vec::new()];
        let mut digests: [Option<Vec<String>>; 2] = [None, None];
        for _ in 0..cli.runs {
            for (i, path) in [Path::Aggregate, Path::Decide].into_iter().enumerate() {
                let (t, digest) = run(cli.backend, path, writers, &cmds);
                rates[i].push(cli.commands as f64 / t.as_secs_f64());
                digests[i] = Some(digest);
            }
        }
        if writers == 1 {
            assert_eq!(digests[0], digests[1], "both paths write the same log");
        }
        let (agg, dec) = (median(rates[0].clone()), median(rates[1].clone()));
        println!(
            "{:<12} {:>8} {:>12.0} {:>12.0} {:>8.2}",
            if writers == 1 {
                "sequential"
            } else {
                "concurrent"
            },
            writers,
            agg,
            dec,
            dec / agg
        );
    }
}
