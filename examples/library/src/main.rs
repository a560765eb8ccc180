//! The library app of the talk "Event Sourcing in Django", on es-diesel.
//!
//! `cargo run -p library` runs the demo on a SQLite file (library.db);
//! `--database-url postgres://...` runs it on PostgreSQL.

use clap::{Parser, Subcommand};
use diesel::prelude::*;
use es_diesel::{Event, EventStore, ExpectedVersion, Metadata};
use serde::{Deserialize, Serialize};

/// A book entered the library's catalogue.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub struct BookRegistered {
    pub book_id: i64,
    pub title: String,
    pub author: String,
}

/// A reader got a library card.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub struct UserRegistered {
    pub user_id: i64,
    pub name: String,
}

/// A reader took a book home. Carries the values, not references.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub struct BookBorrowed {
    pub book_id: i64,
    pub user_id: i64,
}

/// The book came back.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub struct BookReturned {
    pub book_id: i64,
    pub user_id: i64,
}

/// Everything that can happen to a book.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub enum BookEvent {
    BookRegistered(BookRegistered),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

#[derive(Parser)]
#[command(about = "The library app: register, borrow and return books")]
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
    /// Register books and a reader, borrow and return, print the log (the default).
    Demo,
    /// Print the whole log.
    Log,
}

/// The state of one book, folded from its stream.
#[derive(Default, Debug)]
struct Book {
    registered: bool,
    borrowed_by: Option<i64>,
    version: i64,
}

fn load_book(store: &EventStore, book_id: i64) -> es_diesel::Result<Book> {
    let mut book = Book::default();
    for e in store.load_stream::<BookEvent>(&format!("book-{book_id}"))? {
        book.version = e.stream_version;
        match &e.event {
            BookEvent::BookRegistered(_) => book.registered = true,
            BookEvent::BookBorrowed(b) => book.borrowed_by = Some(b.user_id),
            BookEvent::BookReturned(_) => book.borrowed_by = None,
        }
    }
    Ok(book)
}

fn demo(store: &EventStore) -> Result<(), Box<dyn std::error::Error>> {
    let books = [
        (1, "The Left Hand of Darkness", "Ursula K. Le Guin"),
        (2, "Dune", "Frank Herbert"),
        (3, "Kindred", "Octavia E. Butler"),
    ];
    for (id, title, author) in books {
        let stream = format!("book-{id}");
        if store.stream_version(&stream)? == 0 {
            let event = BookRegistered {
                book_id: id,
                title: title.into(),
                author: author.into(),
            };
            store.append(&stream, ExpectedVersion::NoStream, [event])?;
            println!("registered book {id}: {title}");
        }
    }
    if store.stream_version("user-7")? == 0 {
        store.append(
            "user-7",
            ExpectedVersion::NoStream,
            [UserRegistered {
                user_id: 7,
                name: "Ada".into(),
            }],
        )?;
        println!("registered user 7: Ada");
    }
    let as_ada = Metadata::new()
        .actor("user-7")
        .correlation_id(uuid::Uuid::now_v7());
    for id in [1, 2] {
        let book = load_book(store, id)?;
        let stream = format!("book-{id}");
        // The command is validated against the folded state before anything is written.
        match book.borrowed_by {
            None => {
                store.append_with(
                    &stream,
                    ExpectedVersion::Exact(book.version),
                    [BookBorrowed {
                        book_id: id,
                        user_id: 7,
                    }],
                    &as_ada,
                )?;
                println!("user 7 borrowed book {id}");
            }
            Some(user) => {
                store.append_with(
                    &stream,
                    ExpectedVersion::Exact(book.version),
                    [BookReturned {
                        book_id: id,
                        user_id: user,
                    }],
                    &as_ada,
                )?;
                println!("user {user} returned book {id}");
            }
        }
    }
    print_log(store)?;

    // The typed view: events queried like a Django model.
    let mut conn = store.connection()?;
    let by_ada: Vec<(i64, i64, chrono::NaiveDateTime)> = book_borrowed::table
        .filter(book_borrowed::user_id.eq(7))
        .order(book_borrowed::global_position)
        .select((
            book_borrowed::global_position,
            book_borrowed::book_id,
            book_borrowed::created_at,
        ))
        .load(&mut *conn)?;
    println!("\nbook_borrowed where user_id = 7:");
    for (pos, book, at) in by_ada {
        println!(
            "  #{pos}: book {book} at {}",
            at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

fn print_log(store: &EventStore) -> es_diesel::Result<()> {
    println!("\nthe log:");
    for e in store.iter_all(0, 500) {
        let e = e?;
        println!(
            "  #{:<4} {:<10} v{:<3} {:<15} {}",
            e.global_position,
            e.stream_id,
            e.stream_version,
            e.event_type,
            e.payload()
        );
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let store = EventStore::open(&cli.database_url)?;
        store.migrate()?;
        match cli.command.unwrap_or(Command::Demo) {
            Command::Demo => demo(&store),
            Command::Log => Ok(print_log(&store)?),
        }
    })();
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
