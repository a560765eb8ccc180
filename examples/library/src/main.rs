//! The library app of the talk "Event Sourcing in Django", on es-diesel.
//!
//! `cargo run -p library` runs the demo on a SQLite file (library.db); every
//! command takes `--database-url postgres://...` to run on PostgreSQL.

mod domain;
mod read_models;
mod web;

use clap::{Parser, Subcommand};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use domain::*;
use es_diesel::cli::AdminCommand;
use es_diesel::runner::RunnerOptions;
use es_diesel::serde_json::json;
use es_diesel::{
    EventStore, ExecuteError, ExecuteOptions, ImportOptions, ImportReport, ImportRow, Metadata,
    StoreOptions,
};
use read_models::*;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Refused by the library's rules, or asked about a book it does not have.
const EXIT_REFUSED: u8 = 1;
/// The store or the database failed. (2 is clap's, for usage errors.)
const EXIT_ERROR: u8 = 3;

const EXIT_STATUS: &str = "\
Exit status:
  0  done (also when the output is closed early, as by `| head`)
  1  refused by the library's rules, or the book is not in the catalogue;
     the reason is on stderr and nothing was written
  2  usage error: an unknown command, a missing or malformed argument
  3  the store failed: cannot connect, a SQLite file that does not exist,
     a database that is not migrated (run `admin migrate`), an SQL error

Every command but `demo` and `admin migrate` expects a migrated database and
never changes its schema.";

#[derive(Parser)]
#[command(
    version,
    about = "The library app: register, borrow and return books; log in, list and view them",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// SQLite file, :memory:, postgres://user@host/db or mysql://user@host/db
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "library.db",
        global = true
    )]
    database_url: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create and migrate the database if needed, import the old CRUD table,
    /// register, borrow, return, show the pages (the default).
    Demo,
    /// Add a book to the catalogue.
    RegisterBook {
        /// The book's number.
        book_id: i64,
        /// Its title.
        title: String,
        /// Its author.
        author: String,
    },
    /// Give a reader a library card.
    RegisterUser {
        /// The reader's number.
        user_id: i64,
        /// The reader's name.
        name: String,
    },
    /// Log a reader in.
    Login {
        /// The reader's number.
        user_id: i64,
    },
    /// Lend a book to a reader.
    Borrow {
        /// The book's number.
        book_id: i64,
        /// The reader's number.
        user_id: i64,
    },
    /// Take a book back.
    Return {
        /// The book's number.
        book_id: i64,
        /// The reader who has it.
        user_id: i64,
    },
    /// The catalogue and the readers.
    List {
        /// One JSON object: {"books": [...], "readers": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// One book: its row in the catalogue, its loans and its stream.
    View {
        /// The book's number.
        book_id: i64,
        /// One JSON object: {"book": {...}, "loans": [...], "stream": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Bring the old CRUD application's `legacy_books` table over as events.
    ImportLegacy,
    /// Serve the library's pages, and the event browser at /admin/events;
    /// creates and migrates the database if needed. Stops on Ctrl-C.
    Serve {
        /// The address to listen on (port 0: any free port, printed).
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
    },
    /// Store administration: migrate, status, projectors, rebuild, tail, stream, work.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// Why a command did not do what it was asked.
enum Failure {
    /// The library's rules said no; nothing was written.
    Refused(LibraryError),
    /// What was asked about does not exist.
    NotFound(String),
    /// The store, the database or the output failed.
    Error(Box<dyn std::error::Error>),
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(Box::new(e))
    }
}

type AppResult<T = ()> = Result<T, Failure>;

/// `println!` that ends the process quietly when stdout is a closed pipe.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(es_diesel::cli::stdout(), $($arg)*)?
    };
}

fn actor(user_id: i64) -> ExecuteOptions {
    ExecuteOptions {
        metadata: Metadata::new().actor(format!("user-{user_id}")),
        ..ExecuteOptions::default()
    }
}

/// Reports an executed command; a refusal is a [`Failure::Refused`].
fn report<A: es_diesel::Aggregate>(
    done: &str,
    result: Result<es_diesel::Executed<A>, ExecuteError<LibraryError>>,
) -> AppResult {
    match result {
        Ok(executed) => {
            say!(
                "{done} (stream {} now at version {})",
                executed.stream_id,
                executed.version
            );
            Ok(())
        }
        Err(ExecuteError::Domain(refusal)) => Err(Failure::Refused(refusal)),
        Err(ExecuteError::Store(e)) => Err(e.into()),
    }
}

/// The library's commands, for the command line and the web pages alike:
/// each returns what happened and prints nothing, so that a rule changed
/// here changes both.
pub(crate) mod commands {
    use super::*;
    use es_diesel::Aggregate;

    /// What a command did: the aggregate after it, or why it was refused.
    pub(crate) type Outcome<A> = Result<es_diesel::Executed<A>, ExecuteError<LibraryError>>;

    /// One decision across the book's and the reader's events (the book on
    /// the shelf, the reader registered and under the loan limit), appended
    /// to the book's stream on the condition that neither changed since
    /// they were read.
    pub(crate) fn borrow(store: &EventStore, book_id: i64, user_id: i64) -> Outcome<Book> {
        let decided = store.decide_with(
            &Book::stream_id(&book_id.to_string()),
            (Shelf::new(book_id), Borrower::new(user_id)),
            domain::borrow,
            &actor(user_id),
        )?;
        let (shelf, _) = decided.states;
        let mut state = shelf.book;
        let mut version = 0;
        let mut events = Vec::with_capacity(decided.events.len());
        for recorded in decided.events {
            version = recorded.stream_version;
            let event = BookEvent::from(recorded.event.clone());
            state.apply(&event);
            events.push(recorded.map(|_| event));
        }
        Ok(es_diesel::Executed {
            stream_id: Book::stream_id(&book_id.to_string()),
            state,
            version,
            events,
            attempts: decided.attempts,
        })
    }

    pub(crate) fn give_back(store: &EventStore, book_id: i64, user_id: i64) -> Outcome<Book> {
        store.execute_with::<Book>(
            &book_id.to_string(),
            BookCommand::Return { book_id, user_id },
            &actor(user_id),
        )
    }

    pub(crate) fn register_book(
        store: &EventStore,
        book_id: i64,
        title: &str,
        author: &str,
    ) -> Outcome<Book> {
        let command = BookCommand::Register {
            book_id,
            title: title.into(),
            author: author.into(),
        };
        store.execute::<Book>(&book_id.to_string(), command)
    }

    pub(crate) fn register_user(store: &EventStore, user_id: i64, name: &str) -> Outcome<User> {
        let command = UserCommand::Register {
            user_id,
            name: name.into(),
        };
        store.execute::<User>(&user_id.to_string(), command)
    }

    pub(crate) fn login(store: &EventStore, user_id: i64) -> Outcome<User> {
        store.execute_with::<User>(
            &user_id.to_string(),
            UserCommand::LogIn { user_id },
            &actor(user_id),
        )
    }

    /// "How to begin with?": the current state of the old app becomes the
    /// first events. Safe to run again: rows already imported are skipped.
    pub(crate) fn import_legacy(store: &EventStore) -> Result<ImportReport, es_diesel::Error> {
        let mut conn = store.connection()?;
        conn.batch_execute(
            "CREATE TABLE IF NOT EXISTS legacy_books (id BIGINT PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, borrowed_by BIGINT)",
        ).map_err(es_diesel::Error::from)?;
        if legacy_books::table
            .count()
            .get_result::<i64>(&mut *conn)
            .map_err(es_diesel::Error::from)?
            == 0
        {
            // (MultiConnection cannot send a multi-row INSERT: one row at a time.)
            for (id, title, author, borrowed_by) in [
                (101, "Middlemarch", "George Eliot", None),
                (102, "Invisible Cities", "Italo Calvino", Some(7)),
                (103, "Beloved", "Toni Morrison", None),
            ] {
                diesel::insert_into(legacy_books::table)
                    .values((
                        legacy_books::id.eq(id),
                        legacy_books::title.eq(title),
                        legacy_books::author.eq(author),
                        legacy_books::borrowed_by.eq(borrowed_by),
                    ))
                    .execute(&mut *conn)
                    .map_err(es_diesel::Error::from)?;
            }
        }
        let rows: Vec<(i64, String, String, Option<i64>)> = legacy_books::table
            .order(legacy_books::id)
            .load(&mut *conn)
            .map_err(es_diesel::Error::from)?;
        drop(conn);
        let rows = rows
            .into_iter()
            .map(|(id, title, author, borrowed_by)| ImportRow {
                stream_id: format!("book-{id}"),
                key: id.to_string(),
                event: BookImported {
                    book_id: id,
                    title,
                    author,
                    borrowed_by,
                },
            });
        store.import(rows, &ImportOptions::new("legacy_books"), |_| {})
    }
}

fn borrow(store: &EventStore, book_id: i64, user_id: i64) -> AppResult {
    report(
        &format!("user {user_id} borrowed book {book_id}"),
        commands::borrow(store, book_id, user_id),
    )
}

fn give_back(store: &EventStore, book_id: i64, user_id: i64) -> AppResult {
    report(
        &format!("user {user_id} returned book {book_id}"),
        commands::give_back(store, book_id, user_id),
    )
}

fn register_book(store: &EventStore, book_id: i64, title: &str, author: &str) -> AppResult {
    report(
        &format!("registered book {book_id}: {title}"),
        commands::register_book(store, book_id, title, author),
    )
}

fn register_user(store: &EventStore, user_id: i64, name: &str) -> AppResult {
    report(
        &format!("user {user_id} ({name}) has a library card"),
        commands::register_user(store, user_id, name),
    )
}

fn login(store: &EventStore, user_id: i64) -> AppResult {
    report(
        &format!("user {user_id} logged in"),
        commands::login(store, user_id),
    )
}

fn list(store: &EventStore, as_json: bool) -> AppResult {
    let mut conn = store.connection()?;
    let books: Vec<BookList> = book_list::table
        .order(book_list::book_id)
        .load(&mut *conn)?;
    let readers: Vec<read_models::Reader> =
        readers::table.order(readers::user_id).load(&mut *conn)?;
    if as_json {
        say!("{}", json!({ "books": books, "readers": readers }));
        return Ok(());
    }
    say!(
        "\n{:>4}  {:<28} {:<22} {:<12} loans",
        "id",
        "title",
        "author",
        "status"
    );
    for b in books {
        let status = match b.borrowed_by {
            Some(user) => format!("with user {user}"),
            None => "on the shelf".into(),
        };
        say!(
            "{:>4}  {:<28} {:<22} {:<12} {}",
            b.book_id,
            b.title,
            b.author,
            status,
            b.times_borrowed
        );
    }
    for r in readers {
        let seen = r
            .last_login
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "never".into());
        let name = r.name.as_deref().unwrap_or("(no library card yet)");
        say!(
            "reader {} {name}: {} book(s) out, last login {seen}",
            r.user_id,
            r.books_out
        );
    }
    Ok(())
}

fn view(store: &EventStore, book_id: i64, as_json: bool) -> AppResult {
    let mut conn = store.connection()?;
    let Some(b) = book_list::table
        .find(book_id)
        .first::<BookList>(&mut *conn)
        .optional()?
    else {
        return Err(Failure::NotFound(format!(
            "book {book_id} is not in the catalogue"
        )));
    };
    // Events are queried like models, through their typed views. A book the
    // old application had lent out came over with its reader: that loan
    // counts too, as it does in the catalogue.
    let mut loans: Vec<(i64, chrono::NaiveDateTime, bool)> = book_imported::table
        .filter(book_imported::book_id.eq(book_id))
        .filter(book_imported::borrowed_by.is_not_null())
        .select((book_imported::borrowed_by, book_imported::created_at))
        .load::<(Option<i64>, chrono::NaiveDateTime)>(&mut *conn)?
        .into_iter()
        .filter_map(|(user, at)| Some((user?, at, true)))
        .collect();
    loans.extend(
        book_borrowed::table
            .filter(book_borrowed::book_id.eq(book_id))
            .order(book_borrowed::global_position)
            .select((book_borrowed::user_id, book_borrowed::created_at))
            .load::<(i64, chrono::NaiveDateTime)>(&mut *conn)?
            .into_iter()
            .map(|(user, at)| (user, at, false)),
    );
    drop(conn);
    let stream = store.load_stream::<BookEvent>(&format!("book-{book_id}"))?;
    if as_json {
        let loans: Vec<_> = loans
            .iter()
            .map(|(user, at, imported)| {
                json!({ "user_id": user, "at": at.and_utc(), "imported": imported })
            })
            .collect();
        let stream: Vec<_> = stream
            .iter()
            .map(|e| {
                json!({
                    "stream_version": e.stream_version,
                    "global_position": e.global_position,
                    "event_type": e.event_type,
                    "actor": e.metadata.actor,
                    "created_at": e.created_at,
                })
            })
            .collect();
        say!("{}", json!({ "book": b, "loans": loans, "stream": stream }));
        return Ok(());
    }
    say!("\n{} by {} (book {})", b.title, b.author, b.book_id);
    say!("borrowed {} time(s):", b.times_borrowed);
    for (user, at, imported) in loans {
        let at = at.format("%Y-%m-%d %H:%M:%S");
        if imported {
            say!("  by user {user}, already out when imported at {at}");
        } else {
            say!("  by user {user} at {at}");
        }
    }
    say!("its stream:");
    for e in stream {
        let by = e.metadata.actor.as_deref().unwrap_or("-");
        say!(
            "  v{} #{} {:<15} by {by}",
            e.stream_version,
            e.global_position,
            e.event_type
        );
    }
    Ok(())
}

diesel::table! {
    /// The old CRUD application's table.
    legacy_books (id) {
        id -> BigInt,
        title -> Text,
        author -> Text,
        borrowed_by -> Nullable<BigInt>,
    }
}

/// "How to begin with?": see [`commands::import_legacy`].
fn import_legacy(store: &EventStore) -> AppResult {
    let report = commands::import_legacy(store)?;
    say!(
        "imported legacy_books: {} new event(s), {} already there",
        report.imported,
        report.skipped
    );
    Ok(())
}

/// In the demo a refusal is part of the show: printed, not fatal.
fn shown(result: AppResult) -> AppResult {
    match result {
        Err(Failure::Refused(refusal)) => {
            say!("refused: {refusal}");
            Ok(())
        }
        other => other,
    }
}

fn demo(store: &EventStore, database_url: &str) -> AppResult {
    say!("demo on {}", store.location());
    import_legacy(store)?;
    for (id, title, author) in [
        (1, "The Left Hand of Darkness", "Ursula K. Le Guin"),
        (2, "Dune", "Frank Herbert"),
        (3, "Kindred", "Octavia E. Butler"),
    ] {
        if store.load_aggregate::<Book>(&id.to_string())?.version == 0 {
            register_book(store, id, title, author)?;
        }
    }
    if store.load_aggregate::<User>("7")?.version == 0 {
        register_user(store, 7, "Ada")?;
    }
    login(store, 7)?;
    // Borrow or return, depending on where the books are: the demo can run again.
    for book_id in [1, 2] {
        match store
            .load_aggregate::<Book>(&book_id.to_string())?
            .state
            .holder
        {
            None => borrow(store, book_id, 7)?,
            Some(holder) => give_back(store, book_id, holder)?,
        }
    }
    say!(
        "\nThe rules are checked before anything is written. These three commands \
         break them,\nso they are refused and leave no event (run alone, they \
         exit with status 1):"
    );
    shown(borrow(store, 3, 99))?;
    shown(give_back(store, 3, 7))?;
    shown(borrow(store, 102, 7))?;

    // The async read model catches up in the background.
    let runners = store.start_async_read_models(RunnerOptions {
        idle_poll: Duration::from_millis(20),
        ..RunnerOptions::default()
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.projection_status()?.iter().any(|s| s.lag > 0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in runners {
        r.stop();
    }

    list(store, false)?;
    let mut conn = store.connection()?;
    let stats: Vec<AuthorStats> = author_stats::table
        .order(author_stats::author)
        .load(&mut *conn)?;
    say!("\nauthor_stats (kept asynchronously):");
    for s in stats {
        say!(
            "  {:<22} {} book(s), {} loan(s)",
            s.author,
            s.books,
            s.loans
        );
    }
    drop(conn);
    view(store, 1, false)?;
    say!("\nthe last events of the log:");
    es_diesel::cli::run(
        store,
        AdminCommand::Tail {
            count: 8,
            follow: false,
            json: false,
        },
        &mut es_diesel::cli::stdout(),
    )?;
    let run = if database_url == "library.db" {
        "cargo run -p library --".to_owned()
    } else {
        "cargo run -p library -- --database-url <the same URL>".to_owned()
    };
    say!(
        "\nTry next:\n  \
         {run} register-user 8 Grace      a second reader\n  \
         {run} borrow 3 8                 then `return 3 8`; `borrow 1 8` is refused\n  \
         {run} view 102 --json            a book, its loans and its stream as JSON\n  \
         {run} admin status               the read models, their state and lag\n  \
         {run} admin tail -f              new events as they come (Ctrl-C to stop)\n  \
         {run} --help                     every command, and the exit statuses"
    );
    Ok(())
}

/// Diagnostics on stderr, filtered by `RUST_LOG` (warnings only without it):
/// `RUST_LOG=es_diesel=debug` shows the store's spans (`es.append`,
/// `es.execute`, `es.projector`, `es.runner.batch`, `es.rebuild`) as they
/// close, with their fields and durations.
fn init_tracing() {
    use tracing_subscriber::fmt::format::FmtSpan;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Demo);
    // Only these may create the database; every other command needs one
    // that exists and is migrated, and says so otherwise.
    let creates = matches!(
        command,
        Command::Demo | Command::Serve { .. } | Command::Admin(AdminCommand::Migrate)
    );
    let result = (|| -> AppResult {
        let options = StoreOptions {
            create_if_missing: creates,
            ..StoreOptions::default()
        };
        let store = EventStore::open_with(&cli.database_url, options)?;
        match command {
            Command::Demo => {
                store.migrate()?;
                return demo(&store, &cli.database_url);
            }
            Command::Serve { listen } => {
                store.migrate()?;
                return web::serve(store, &listen).map_err(Failure::Error);
            }
            // Checks the schema itself (all but `migrate` and `projectors`).
            Command::Admin(cmd) => {
                return Ok(es_diesel::cli::run(
                    &store,
                    cmd,
                    &mut es_diesel::cli::stdout(),
                )?)
            }
            _ => store.check_migrated()?,
        }
        match command {
            Command::Demo | Command::Serve { .. } | Command::Admin(_) => {
                unreachable!("handled above")
            }
            Command::RegisterBook {
                book_id,
                title,
                author,
            } => register_book(&store, book_id, &title, &author),
            Command::RegisterUser { user_id, name } => register_user(&store, user_id, &name),
            Command::Login { user_id } => login(&store, user_id),
            Command::Borrow { book_id, user_id } => borrow(&store, book_id, user_id),
            Command::Return { book_id, user_id } => give_back(&store, book_id, user_id),
            Command::List { json } => list(&store, json),
            Command::View { book_id, json } => view(&store, book_id, json),
            Command::ImportLegacy => import_legacy(&store),
        }
    })();
    let (code, message) = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Refused(refusal)) => (EXIT_REFUSED, format!("refused: {refusal}")),
        Err(Failure::NotFound(what)) => (EXIT_REFUSED, what),
        Err(Failure::Error(e)) => (EXIT_ERROR, format!("error: {e}")),
    };
    let _ = writeln!(std::io::stderr(), "{message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command, argument and option says what it is in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        Cli::command().debug_assert();
        let mut missing = Vec::new();
        walk(&Cli::command(), "library", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
