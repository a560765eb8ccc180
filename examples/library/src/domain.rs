//! The library's events and its rules: what may happen to books and users.

use es_diesel::{Aggregate, Event, Snapshots};
use serde::{Deserialize, Serialize};

/// A book entered the catalogue.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookRegistered {
    pub book_id: i64,
    pub title: String,
    pub author: String,
}

/// A book that the old CRUD application knew, brought over by the import.
/// Carries the state the old table had, values and not references.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookImported {
    pub book_id: i64,
    pub title: String,
    pub author: String,
    pub borrowed_by: Option<i64>,
}

/// A reader took a book home.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookBorrowed {
    pub book_id: i64,
    pub user_id: i64,
}

/// The book came back.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookReturned {
    pub book_id: i64,
    pub user_id: i64,
}

/// A reader got a library card.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
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
    /// `user_registered` comes from the user's own stream (see `main::borrow`).
    Borrow {
        book_id: i64,
        user_id: i64,
        user_registered: bool,
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
            BookCommand::Borrow {
                book_id,
                user_id,
                user_registered,
            } => {
                self.id.ok_or(LibraryError::UnknownBook(book_id))?;
                if !user_registered {
                    return Err(LibraryError::UnknownUser(user_id));
                }
                match self.holder {
                    Some(holder) => Err(LibraryError::AlreadyBorrowed { book_id, holder }),
                    None => Ok(vec![BookBorrowed { book_id, user_id }.into()]),
                }
            }
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
    use es_diesel::harness::given;

    fn registered(book_id: i64) -> BookEvent {
        BookRegistered {
            book_id,
            title: "Dune".into(),
            author: "Frank Herbert".into(),
        }
        .into()
    }

    #[test]
    fn a_free_book_can_be_borrowed_by_a_registered_user() {
        given::<Book>([registered(1)])
            .when(BookCommand::Borrow {
                book_id: 1,
                user_id: 7,
                user_registered: true,
            })
            .then([BookBorrowed {
                book_id: 1,
                user_id: 7,
            }
            .into()]);
    }

    #[test]
    fn a_book_cannot_be_borrowed_twice() {
        given::<Book>([
            registered(1),
            BookBorrowed {
                book_id: 1,
                user_id: 7,
            }
            .into(),
        ])
        .when(BookCommand::Borrow {
            book_id: 1,
            user_id: 8,
            user_registered: true,
        })
        .then_error(LibraryError::AlreadyBorrowed {
            book_id: 1,
            holder: 7,
        });
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
    fn an_unregistered_user_cannot_borrow() {
        given::<Book>([registered(1)])
            .when(BookCommand::Borrow {
                book_id: 1,
                user_id: 9,
                user_registered: false,
            })
            .then_error(LibraryError::UnknownUser(9));
    }

    #[test]
    fn an_imported_borrowed_book_must_come_back_first() {
        let imported = BookImported {
            book_id: 2,
            title: "Kindred".into(),
            author: "Octavia E. Butler".into(),
            borrowed_by: Some(3),
        };
        given::<Book>([imported.into()])
            .when(BookCommand::Borrow {
                book_id: 2,
                user_id: 7,
                user_registered: true,
            })
            .then_error(LibraryError::AlreadyBorrowed {
                book_id: 2,
                holder: 3,
            });
    }
}
