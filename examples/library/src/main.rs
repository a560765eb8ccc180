//! The library app of the talk "Event Sourcing in Django", on es-diesel.
//!
//! `cargo run -p library` runs the demo on a SQLite file (library.db); every
//! command takes `--database-url postgres://...` to run on PostgreSQL.

mod domain;
mod read_models;

use clap::{Parser, Subcommand};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use domain::*;
use es_diesel::runner::RunnerOptions;
use es_diesel::{EventStore, ExecuteError, ExecuteOptions, ImportOptions, ImportRow, Metadata};
use read_models::*;
use std::time::Duration;

type AppResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(about = "The library app: register, borrow and return books; log in, list and view them")]
struct Cli {
    /// SQLite file, :memory:, or postgres://user@host/db
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
    /// Import the old CRUD table, register, borrow, return, show the pages (the default).
    Demo,
    /// Add a book to the catalogue.
    RegisterBook {
        book_id: i64,
        title: String,
        author: String,
    },
    /// Give a reader a library card.
    RegisterUser { user_id: i64, name: String },
    /// Log a reader in.
    Login { user_id: i64 },
    /// Lend a book to a reader.
    Borrow { book_id: i64, user_id: i64 },
    /// Take a book back.
    Return { book_id: i64, user_id: i64 },
    /// The catalogue.
    List,
    /// One book: its row in the catalogue and its history.
    View { book_id: i64 },
    /// Bring the old CRUD application's `legacy_books` table over as events.
    ImportLegacy,
    /// Store administration: migrate, status, rebuild, tail, stream, work.
    #[command(subcommand)]
    Admin(es_diesel::cli::AdminCommand),
}

fn actor(user_id: i64) -> ExecuteOptions {
    ExecuteOptions {
        metadata: Metadata::new().actor(format!("user-{user_id}")),
        ..ExecuteOptions::default()
    }
}

/// Runs a command and reports the library's refusal as a message, not a failure.
fn report<A: es_diesel::Aggregate>(
    done: &str,
    result: Result<es_diesel::Executed<A>, ExecuteError<LibraryError>>,
) -> AppResult {
    match result {
        Ok(executed) => println!(
            "{done} (stream {} now at version {})",
            executed.stream_id, executed.version
        ),
        Err(ExecuteError::Domain(refusal)) => println!("refused: {refusal}"),
        Err(ExecuteError::Store(e)) => return Err(e.into()),
    }
    Ok(())
}

fn borrow(store: &EventStore, book_id: i64, user_id: i64) -> AppResult {
    // Registrations are never undone: checking the card first cannot be
    // invalidated by a concurrent writer.
    let user_registered = store
        .load_aggregate::<User>(&user_id.to_string())?
        .state
        .id
        .is_some();
    let result = store.execute_with::<Book>(
        &book_id.to_string(),
        BookCommand::Borrow {
            book_id,
            user_id,
            user_registered,
        },
        &actor(user_id),
    );
    report(&format!("user {user_id} borrowed book {book_id}"), result)
}

fn give_back(store: &EventStore, book_id: i64, user_id: i64) -> AppResult {
    let result = store.execute_with::<Book>(
        &book_id.to_string(),
        BookCommand::Return { book_id, user_id },
        &actor(user_id),
    );
    report(&format!("user {user_id} returned book {book_id}"), result)
}

fn register_book(store: &EventStore, book_id: i64, title: &str, author: &str) -> AppResult {
    let command = BookCommand::Register {
        book_id,
        title: title.into(),
        author: author.into(),
    };
    report(
        &format!("registered book {book_id}: {title}"),
        store.execute::<Book>(&book_id.to_string(), command),
    )
}

fn register_user(store: &EventStore, user_id: i64, name: &str) -> AppResult {
    let command = UserCommand::Register {
        user_id,
        name: name.into(),
    };
    report(
        &format!("user {user_id} ({name}) has a library card"),
        store.execute::<User>(&user_id.to_string(), command),
    )
}

fn login(store: &EventStore, user_id: i64) -> AppResult {
    let result = store.execute_with::<User>(
        &user_id.to_string(),
        UserCommand::LogIn { user_id },
        &actor(user_id),
    );
    report(&format!("user {user_id} logged in"), result)
}

fn list(store: &EventStore) -> AppResult {
    let mut conn = store.connection()?;
    let books: Vec<BookList> = book_list::table
        .order(book_list::book_id)
        .load(&mut *conn)?;
    println!(
        "\n{:>4}  {:<28} {:<22} {:<12} loans",
        "id", "title", "author", "status"
    );
    for b in books {
        let status = match b.borrowed_by {
            Some(user) => format!("with user {user}"),
            None => "on the shelf".into(),
        };
        println!(
            "{:>4}  {:<28} {:<22} {:<12} {}",
            b.book_id, b.title, b.author, status, b.times_borrowed
        );
    }
    let readers: Vec<Reader> = readers::table.order(readers::user_id).load(&mut *conn)?;
    for r in readers {
        let seen = r
            .last_login
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "never".into());
        println!(
            "reader {} {}: {} book(s) out, last login {seen}",
            r.user_id, r.name, r.books_out
        );
    }
    Ok(())
}

fn view(store: &EventStore, book_id: i64) -> AppResult {
    let mut conn = store.connection()?;
    match book_list::table
        .find(book_id)
        .first::<BookList>(&mut *conn)
        .optional()?
    {
        None => println!("book {book_id} is not in the catalogue"),
        Some(b) => {
            println!("\n{} by {} (book {})", b.title, b.author, b.book_id);
            // Events are queried like models, through their typed views.
            let loans: Vec<(i64, chrono::NaiveDateTime)> = book_borrowed::table
                .filter(book_borrowed::book_id.eq(book_id))
                .order(book_borrowed::global_position)
                .select((book_borrowed::user_id, book_borrowed::created_at))
                .load(&mut *conn)?;
            println!("borrowed {} time(s):", loans.len());
            for (user, at) in loans {
                println!("  by user {user} at {}", at.format("%Y-%m-%d %H:%M:%S"));
            }
            println!("its stream:");
            for e in store.load_stream::<BookEvent>(&format!("book-{book_id}"))? {
                let by = e.metadata.actor.as_deref().unwrap_or("-");
                println!(
                    "  v{} #{} {:<15} by {by}",
                    e.stream_version, e.global_position, e.event_type
                );
            }
        }
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

/// "How to begin with?": the current state of the old app becomes the first
/// events. Safe to run again: rows already imported are skipped.
fn import_legacy(store: &EventStore) -> AppResult {
    let mut conn = store.connection()?;
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS legacy_books (id BIGINT PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, borrowed_by BIGINT)",
    )?;
    if legacy_books::table.count().get_result::<i64>(&mut *conn)? == 0 {
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
                .execute(&mut *conn)?;
        }
    }
    let rows: Vec<(i64, String, String, Option<i64>)> = legacy_books::table
        .order(legacy_books::id)
        .load(&mut *conn)?;
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
    let report = store.import(rows, &ImportOptions::new("legacy_books"), |_| {})?;
    println!(
        "imported legacy_books: {} new event(s), {} already there",
        report.imported, report.skipped
    );
    Ok(())
}

fn demo(store: &EventStore) -> AppResult {
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
    // Commands are validated before anything is written:
    borrow(store, 3, 99)?;
    give_back(store, 3, 7)?;
    borrow(store, 102, 7)?;

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

    list(store)?;
    let mut conn = store.connection()?;
    let stats: Vec<AuthorStats> = author_stats::table
        .order(author_stats::author)
        .load(&mut *conn)?;
    println!("\nauthor_stats (kept asynchronously):");
    for s in stats {
        println!(
            "  {:<22} {} book(s), {} loan(s)",
            s.author, s.books, s.loans
        );
    }
    drop(conn);
    view(store, 1)?;
    println!("\nthe last events of the log:");
    es_diesel::cli::run(
        store,
        es_diesel::cli::AdminCommand::Tail {
            count: 8,
            follow: false,
        },
        &mut std::io::stdout(),
    )?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = (|| -> AppResult {
        let store = EventStore::open(&cli.database_url)?;
        store.migrate()?;
        match cli.command.unwrap_or(Command::Demo) {
            Command::Demo => demo(&store),
            Command::RegisterBook {
                book_id,
                title,
                author,
            } => register_book(&store, book_id, &title, &author),
            Command::RegisterUser { user_id, name } => register_user(&store, user_id, &name),
            Command::Login { user_id } => login(&store, user_id),
            Command::Borrow { book_id, user_id } => borrow(&store, book_id, user_id),
            Command::Return { book_id, user_id } => give_back(&store, book_id, user_id),
            Command::List => list(&store),
            Command::View { book_id } => view(&store, book_id),
            Command::ImportLegacy => import_legacy(&store),
            Command::Admin(cmd) => Ok(es_diesel::cli::run(&store, cmd, &mut std::io::stdout())?),
        }
    })();
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
