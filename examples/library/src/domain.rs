//! The library's events and its rules: what may happen to books and users.
//!
//! Registering, returning and logging in concern one stream each
//! (aggregates). Borrowing depends on two: the book must be on the shelf,
//! and the reader registered and holding fewer than [`MAX_LOANS`] books,
//! which their loans of every book decide. It is one decision across
//! streams ([`borrow`]), on the events tagged with the book and the reader.

use es_diesel::{tag, Aggregate, DecisionState, Event, Query, Snapshots};
use serde::{Deserialize, Serialize};

/// The most books one reader may hold at once.
pub const MAX_LOANS: usize = 5;

/// A book entered the catalogue.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "book:{book_id}")]
pub struct BookRegistered {
    pub book_id: i64,
    pub title: String,
    pub author: String,
}

/// A book that the old CRUD application knew, brought over by the import.
/// Carries the state the old table had, values and not references.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "book:{book_id}", tag = "user:{borrowed_by}")]
pub struct BookImported {
    pub book_id: i64,
    pub title: String,
    pub author: String,
    pub borrowed_by: Option<i64>,
}

/// A reader took a book home.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "book:{book_id}", tag = "user:{user_id}")]
pub struct BookBorrowed {
    pub book_id: i64,
    pub user_id: i64,
}

/// The book came back.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "book:{book_id}", tag = "user:{user_id}")]
pub struct BookReturned {
    pub book_id: i64,
    pub user_id: i64,
}

/// A reader got a library card.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "user:{user_id}")]
pub struct UserRegistered {
    pub user_id: i64,
    pub name: String,
}

/// A reader logged in.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UserLoggedIn {
    pub user_id: i64,
}

/// Everything that can happen to a book.
#[allow(clippy::enum_variant_names)]
#[derive(Event, Debug, Clone, PartialEq)]
pub enum BookEvent {
    BookRegistered(BookRegistered),
    BookImported(BookImported),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

/// Everything that can happen to a user.
#[derive(Event, Debug, Clone, PartialEq)]
pub enum UserEvent {
    UserRegistered(UserRegistered),
    UserLoggedIn(UserLoggedIn),
}

/// Why the library refuses a command. Nothing is written when it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibraryError {
    #[error("book {0} is not in the catalogue")]
    UnknownBook(i64),
    #[error("book {0} is already in the catalogue")]
    BookExists(i64),
    #[error("user {0} has no library card")]
    UnknownUser(i64),
    #[error("user {0} already has a library card")]
    UserExists(i64),
    #[error("book {book_id} is already borrowed by user {holder}")]
    AlreadyBorrowed { book_id: i64, holder: i64 },
    #[error("book {book_id} is not borrowed by user {user_id}")]
    NotHolder { book_id: i64, user_id: i64 },
    #[error("user {user_id} already holds {MAX_LOANS} books; return one first")]
    TooManyLoans { user_id: i64 },
}

/// A book as its rules need it, folded from its stream.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub id: Option<i64>,
    pub holder: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum BookCommand {
    Register {
        book_id: i64,
        title: String,
        author: String,
    },
    Return {
        book_id: i64,
        user_id: i64,
    },
}

impl Aggregate for Book {
    const TYPE: &'static str = "book";
    type Event = BookEvent;
    type Command = BookCommand;
    type Error = LibraryError;
    const SNAPSHOTS: Option<Snapshots<Self>> = Some(Snapshots::every(50));

    fn apply(&mut self, event: &BookEvent) {
        match event {
            BookEvent::BookRegistered(e) => self.id = Some(e.book_id),
            BookEvent::BookImported(e) => {
                self.id = Some(e.book_id);
                self.holder = e.borrowed_by;
            }
            BookEvent::BookBorrowed(e) => self.holder = Some(e.user_id),
            BookEvent::BookReturned(_) => self.holder = None,
        }
    }

    fn handle(&self, command: BookCommand) -> Result<Vec<BookEvent>, LibraryError> {
        match command {
            BookCommand::Register {
                book_id,
                title,
                author,
            } => match self.id {
                Some(id) => Err(LibraryError::BookExists(id)),
                None => Ok(vec![BookRegistered {
                    book_id,
                    title,
                    author,
                }
                .into()]),
            },
            BookCommand::Return { book_id, user_id } => {
                self.id.ok_or(LibraryError::UnknownBook(book_id))?;
                if self.holder != Some(user_id) {
                    return Err(LibraryError::NotHolder { book_id, user_id });
                }
                Ok(vec![BookReturned { book_id, user_id }.into()])
            }
        }
    }
}

/// The events a reader's loans are counted from.
#[derive(Event, Debug, Clone, PartialEq)]
pub enum BorrowerEvent {
    UserRegistered(UserRegistered),
    BookImported(BookImported),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

/// A book on or off the shelf: the book's events, across the streams they
/// are in.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct Shelf {
    pub book_id: i64,
    pub book: Book,
}

impl Shelf {
    pub fn new(book_id: i64) -> Self {
        Shelf {
            book_id,
            book: Book::default(),
        }
    }
}

impl DecisionState for Shelf {
    type Event = BookEvent;

    fn query(&self) -> Query {
        Query::of::<BookEvent>().tagged(tag("book", self.book_id))
    }

    fn apply(&mut self, event: &BookEvent) {
        self.book.apply(event);
    }
}

/// A reader: whether they have a card, and which books they hold.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct Borrower {
    pub user_id: i64,
    pub registered: bool,
    pub holding: std::collections::BTreeSet<i64>,
}

impl Borrower {
    pub fn new(user_id: i64) -> Self {
        Borrower {
            user_id,
            ..Borrower::default()
        }
    }
}

impl DecisionState for Borrower {
    type Event = BorrowerEvent;

    fn query(&self) -> Query {
        Query::of::<BorrowerEvent>().tagged(tag("user", self.user_id))
    }

    fn apply(&mut self, event: &BorrowerEvent) {
        match event {
            BorrowerEvent::UserRegistered(_) => self.registered = true,
            BorrowerEvent::BookImported(e) => {
                self.holding.insert(e.book_id);
            }
            BorrowerEvent::BookBorrowed(e) => {
                self.holding.insert(e.book_id);
            }
            BorrowerEvent::BookReturned(e) => {
                self.holding.remove(&e.book_id);
            }
        }
    }
}

/// The borrow rule, one decision across the book's and the reader's
/// events: the book is in the catalogue and on the shelf, the reader has a
/// card and holds fewer than [`MAX_LOANS`] books.
pub fn borrow((shelf, reader): &(Shelf, Borrower)) -> Result<Vec<BookBorrowed>, LibraryError> {
    let (book_id, user_id) = (shelf.book_id, reader.user_id);
    shelf.book.id.ok_or(LibraryError::UnknownBook(book_id))?;
    if !reader.registered {
        return Err(LibraryError::UnknownUser(user_id));
    }
    if let Some(holder) = shelf.book.holder {
        return Err(LibraryError::AlreadyBorrowed { book_id, holder });
    }
    if reader.holding.len() >= MAX_LOANS {
        return Err(LibraryError::TooManyLoans { user_id });
    }
    Ok(vec![BookBorrowed { book_id, user_id }])
}

/// A reader.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct User {
    pub id: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum UserCommand {
    Register { user_id: i64, name: String },
    LogIn { user_id: i64 },
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Event = UserEvent;
    type Command = UserCommand;
    type Error = LibraryError;

    fn apply(&mut self, event: &UserEvent) {
        if let UserEvent::UserRegistered(e) = event {
            self.id = Some(e.user_id);
        }
    }

    fn handle(&self, command: UserCommand) -> Result<Vec<UserEvent>, LibraryError> {
        match command {
            UserCommand::Register { user_id, name } => match self.id {
                Some(id) => Err(LibraryError::UserExists(id)),
                None => Ok(vec![UserRegistered { user_id, name }.into()]),
            },
            UserCommand::LogIn { user_id } => {
                self.id.ok_or(LibraryError::UnknownUser(user_id))?;
                Ok(vec![UserLoggedIn { user_id }.into()])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_diesel::harness::{given, given_states};

    fn registered(book_id: i64) -> BookEvent {
        BookRegistered {
            book_id,
            title: "Dune".into(),
            author: "Frank Herbert".into(),
        }
        .into()
    }

    #[test]
    fn a_book_cannot_be_borrowed_twice() {
        given_states((Shelf::new(1), Borrower::new(8)))
            .event(book(1))
            .event(card(7))
            .event(card(8))
            .event(lent(1, 7))
            .when(borrow)
            .then_error(LibraryError::AlreadyBorrowed {
                book_id: 1,
                holder: 7,
            });
    }

    #[test]
    fn a_book_not_in_the_catalogue_cannot_be_borrowed() {
        given_states((Shelf::new(5), Borrower::new(7)))
            .event(card(7))
            .when(borrow)
            .then_error(LibraryError::UnknownBook(5));
    }

    #[test]
    fn only_the_holder_returns_a_book() {
        given::<Book>([
            registered(1),
            BookBorrowed {
                book_id: 1,
                user_id: 7,
            }
            .into(),
        ])
        .when(BookCommand::Return {
            book_id: 1,
            user_id: 8,
        })
        .then_error(LibraryError::NotHolder {
            book_id: 1,
            user_id: 8,
        });
    }

    #[test]
    fn an_imported_borrowed_book_must_come_back_first() {
        let imported = BookImported {
            book_id: 2,
            title: "Kindred".into(),
            author: "Octavia E. Butler".into(),
            borrowed_by: Some(3),
        };
        given_states((Shelf::new(2), Borrower::new(7)))
            .event(card(7))
            .event(imported)
            .when(borrow)
            .then_error(LibraryError::AlreadyBorrowed {
                book_id: 2,
                holder: 3,
            });
    }

    fn card(user_id: i64) -> UserRegistered {
        UserRegistered {
            user_id,
            name: "Ann".into(),
        }
    }

    fn book(book_id: i64) -> BookRegistered {
        BookRegistered {
            book_id,
            title: "Dune".into(),
            author: "Frank Herbert".into(),
        }
    }

    fn lent(book_id: i64, user_id: i64) -> BookBorrowed {
        BookBorrowed { book_id, user_id }
    }

    #[test]
    fn borrowing_is_one_decision_over_the_book_and_the_reader() {
        given_states((Shelf::new(1), Borrower::new(7)))
            .event(book(1))
            .event(card(7))
            .when(borrow)
            .then([lent(1, 7)]);
    }

    #[test]
    fn a_reader_without_a_card_cannot_borrow() {
        given_states((Shelf::new(1), Borrower::new(9)))
            .event(book(1))
            .when(borrow)
            .then_error(LibraryError::UnknownUser(9));
    }

    #[test]
    fn a_reader_holding_the_limit_must_return_one_first() {
        let mut given = given_states((Shelf::new(99), Borrower::new(7)))
            .event(book(99))
            .event(card(7));
        for b in 0..MAX_LOANS as i64 {
            given = given.event(book(b)).event(lent(b, 7));
        }
        given
            .when(borrow)
            .then_error(LibraryError::TooManyLoans { user_id: 7 });
    }

    #[test]
    fn a_returned_book_frees_a_loan_and_the_shelf() {
        let mut given = given_states((Shelf::new(0), Borrower::new(7))).event(card(7));
        for b in 0..MAX_LOANS as i64 {
            given = given.event(book(b)).event(lent(b, 7));
        }
        given
            .event(BookReturned {
                book_id: 0,
                user_id: 7,
            })
            .when(borrow)
            .then([lent(0, 7)]);
    }

    #[test]
    fn a_book_the_old_app_lent_counts_for_its_reader() {
        let imported = BookImported {
            book_id: 2,
            title: "Kindred".into(),
            author: "Octavia E. Butler".into(),
            borrowed_by: Some(7),
        };
        assert_eq!(imported.tags(), ["book:2", "user:7"]);
        let (_, reader) = given_states((Shelf::new(3), Borrower::new(7)))
            .event(card(7))
            .event(imported)
            .states();
        assert!(reader.holding.contains(&2));
    }
}
