//! The pages of the app read these tables, which the projectors keep
//! current: the talk's read models, fed by its signals.

use crate::domain::*;
use chrono::{DateTime, Utc};
use es_diesel::{projector, ReadModel, Recorded};
use serde::Serialize;

/// The catalogue page: one row per book.
#[derive(ReadModel, Serialize, Debug, Clone, PartialEq)]
#[read_model(table = "book_list", primary_key = book_id, index(author))]
pub struct BookList {
    pub book_id: i64,
    pub title: String,
    pub author: String,
    pub borrowed_by: Option<i64>,
    pub times_borrowed: i64,
}

/// The readers: who they are, when they last came, how many books they hold.
/// A reader the old application lent a book to is here from the import on,
/// with no name until they register.
#[derive(ReadModel, Serialize, Debug, Clone, PartialEq)]
#[read_model(table = "readers", primary_key = user_id)]
pub struct Reader {
    pub user_id: i64,
    pub name: Option<String>,
    pub last_login: Option<DateTime<Utc>>,
    pub books_out: i32,
}

/// Statistics per author, kept by a runner after commit: the write path
/// does not pay for it.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "author_stats", primary_key = author, mode = async)]
pub struct AuthorStats {
    pub author: String,
    pub books: i64,
    pub loans: i64,
}

#[projector(on = [BookRegistered, BookImported, BookBorrowed, BookReturned], key = book_id)]
fn book_list(e: &BookEvent, row: &mut Option<BookList>) -> Result<(), String> {
    match e {
        BookEvent::BookRegistered(b) => {
            *row = Some(BookList {
                book_id: b.book_id,
                title: b.title.clone(),
                author: b.author.clone(),
                borrowed_by: None,
                times_borrowed: 0,
            })
        }
        BookEvent::BookImported(b) => {
            *row = Some(BookList {
                book_id: b.book_id,
                title: b.title.clone(),
                author: b.author.clone(),
                borrowed_by: b.borrowed_by,
                times_borrowed: i64::from(b.borrowed_by.is_some()),
            })
        }
        BookEvent::BookBorrowed(b) => {
            let book = row
                .as_mut()
                .ok_or_else(|| format!("book {} is not in book_list", b.book_id))?;
            book.borrowed_by = Some(b.user_id);
            book.times_borrowed += 1;
        }
        BookEvent::BookReturned(b) => {
            let book = row
                .as_mut()
                .ok_or_else(|| format!("book {} is not in book_list", b.book_id))?;
            book.borrowed_by = None;
        }
    }
    Ok(())
}

#[projector(on = [UserRegistered, UserLoggedIn], key = user_id)]
fn readers(e: &Recorded<UserEvent>, row: &mut Option<Reader>) {
    match &e.event {
        UserEvent::UserRegistered(u) => {
            // Books the old application lent them are already counted.
            let books_out = row.as_ref().map_or(0, |r| r.books_out);
            *row = Some(Reader {
                user_id: u.user_id,
                name: Some(u.name.clone()),
                last_login: None,
                books_out,
            })
        }
        UserEvent::UserLoggedIn(_) => {
            if let Some(reader) = row {
                reader.last_login = Some(e.created_at);
            }
        }
    }
}

#[projector(on = BookBorrowed, key = user_id)]
fn reader_borrowed(_e: &BookBorrowed, row: &mut Option<Reader>) {
    if let Some(reader) = row {
        reader.books_out += 1;
    }
}

#[projector(on = BookReturned, key = user_id)]
fn reader_returned(_e: &BookReturned, row: &mut Option<Reader>) {
    if let Some(reader) = row {
        reader.books_out -= 1;
    }
}

/// A book imported as lent out counts for its reader like a loan. SQL-level,
/// because the key (`borrowed_by`) is optional: no row when nobody has it.
#[projector(on = BookImported, read_model = Reader)]
fn reader_imported(
    e: &BookImported,
    conn: &mut es_diesel::DbConnection,
) -> diesel::QueryResult<()> {
    use diesel::prelude::*;
    let Some(user_id) = e.borrowed_by else {
        return Ok(());
    };
    let sql = match conn.backend() {
        es_diesel::Backend::Sqlite => {
            "INSERT INTO readers (user_id, name, last_login, books_out) VALUES (?, NULL, NULL, 1) \
             ON CONFLICT (user_id) DO UPDATE SET books_out = readers.books_out + 1"
        }
        es_diesel::Backend::Postgres => {
            "INSERT INTO readers (user_id, name, last_login, books_out) VALUES ($1, NULL, NULL, 1) \
             ON CONFLICT (user_id) DO UPDATE SET books_out = readers.books_out + 1"
        }
        es_diesel::Backend::Mysql => {
            "INSERT INTO readers (user_id, name, last_login, books_out) VALUES (?, NULL, NULL, 1) \
             ON DUPLICATE KEY UPDATE books_out = books_out + 1"
        }
    };
    diesel::sql_query(sql)
        .bind::<diesel::sql_types::BigInt, _>(user_id)
        .execute(conn)?;
    Ok(())
}

/// SQL-level: the author is not in the loan events (they carry the book id
/// only), so it is looked up in the catalogue.
#[projector(on = [BookRegistered, BookImported, BookBorrowed], read_model = AuthorStats)]
fn author_stats(e: &AuthorEvent, conn: &mut es_diesel::DbConnection) -> diesel::QueryResult<()> {
    use diesel::prelude::*;
    let (author, books, loans) = match e {
        AuthorEvent::BookRegistered(b) => (b.author.clone(), 1, 0),
        AuthorEvent::BookImported(b) => (b.author.clone(), 1, i64::from(b.borrowed_by.is_some())),
        AuthorEvent::BookBorrowed(b) => {
            let author = book_list::table
                .find(b.book_id)
                .select(book_list::author)
                .first::<String>(conn)?;
            (author, 0, 1)
        }
    };
    let current = author_stats::table
        .find(&author)
        .first::<AuthorStats>(conn)
        .optional()?;
    match current {
        Some(s) => diesel::update(author_stats::table.find(&author))
            .set((
                author_stats::books.eq(s.books + books),
                author_stats::loans.eq(s.loans + loans),
            ))
            .execute(conn)?,
        None => diesel::insert_into(author_stats::table)
            .values(AuthorStats {
                author,
                books,
                loans,
            })
            .execute(conn)?,
    };
    Ok(())
}

/// The events `author_stats` handles.
#[allow(clippy::enum_variant_names)]
#[derive(es_diesel::Event, Debug, Clone, PartialEq)]
pub enum AuthorEvent {
    BookRegistered(BookRegistered),
    BookImported(BookImported),
    BookBorrowed(BookBorrowed),
}
