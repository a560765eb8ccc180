//! The library of the talk as aggregates: books and users, with the rules
//! "a book cannot be borrowed twice, returned by someone who does not hold
//! it, or borrowed by an unregistered user".

#![allow(dead_code)]

use es_diesel::{Aggregate, Event, EventStore, ExecuteError, ExecuteOptions, Executed, Snapshots};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookRegistered {
    pub book_id: String,
    pub title: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UserRegistered {
    pub user_id: String,
    pub name: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookBorrowed {
    pub book_id: String,
    pub user_id: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BookReturned {
    pub book_id: String,
    pub user_id: String,
}

// Variants are named after the event structs they wrap.
#[allow(clippy::enum_variant_names)]
#[derive(Event, Debug, Clone, PartialEq)]
pub enum BookEvent {
    BookRegistered(BookRegistered),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

#[derive(Event, Debug, Clone, PartialEq)]
pub enum UserEvent {
    UserRegistered(UserRegistered),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibraryError {
    #[error("the book is not registered")]
    UnknownBook,
    #[error("book {0} is already registered")]
    BookExists(String),
    #[error("user {0} is not registered")]
    UnknownUser(String),
    #[error("user {0} is already registered")]
    UserExists(String),
    #[error("book {book_id} is already borrowed by {holder}")]
    AlreadyBorrowed { book_id: String, holder: String },
    #[error("book {book_id} is not held by {user_id}")]
    NotHolder { book_id: String, user_id: String },
}

/// A book's state: enough to decide borrowing and returning.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub id: Option<String>,
    pub title: String,
    pub holder: Option<String>,
    pub times_borrowed: u64,
}

#[derive(Debug, Clone)]
pub enum BookCommand {
    Register {
        book_id: String,
        title: String,
    },
    /// `user_registered` is a fact of the user aggregate, looked up by the
    /// caller (see [`borrow`]).
    Borrow {
        user_id: String,
        user_registered: bool,
    },
    Return {
        user_id: String,
    },
}

impl Aggregate for Book {
    const TYPE: &'static str = "book";
    type Event = BookEvent;
    type Command = BookCommand;
    type Error = LibraryError;
    const SNAPSHOTS: Option<Snapshots<Self>> = Some(Snapshots::every(3));

    fn apply(&mut self, event: &BookEvent) {
        match event {
            BookEvent::BookRegistered(e) => {
                self.id = Some(e.book_id.clone());
                self.title = e.title.clone();
            }
            BookEvent::BookBorrowed(e) => {
                self.holder = Some(e.user_id.clone());
                self.times_borrowed += 1;
            }
            BookEvent::BookReturned(_) => self.holder = None,
        }
    }

    fn handle(&self, command: BookCommand) -> Result<Vec<BookEvent>, LibraryError> {
        match command {
            BookCommand::Register { book_id, title } => match &self.id {
                Some(id) => Err(LibraryError::BookExists(id.clone())),
                None => Ok(vec![BookRegistered { book_id, title }.into()]),
            },
            BookCommand::Borrow {
                user_id,
                user_registered,
            } => {
                let book_id = self.registered_id()?;
                if !user_registered {
                    return Err(LibraryError::UnknownUser(user_id));
                }
                match &self.holder {
                    Some(holder) => Err(LibraryError::AlreadyBorrowed {
                        book_id,
                        holder: holder.clone(),
                    }),
                    None => Ok(vec![BookBorrowed { book_id, user_id }.into()]),
                }
            }
            BookCommand::Return { user_id } => {
                let book_id = self.registered_id()?;
                if self.holder.as_deref() != Some(user_id.as_str()) {
                    return Err(LibraryError::NotHolder { book_id, user_id });
                }
                Ok(vec![BookReturned { book_id, user_id }.into()])
            }
        }
    }
}

impl Book {
    fn registered_id(&self) -> Result<String, LibraryError> {
        self.id.clone().ok_or(LibraryError::UnknownBook)
    }
}

#[derive(Default, Debug, Clone, PartialEq)]
pub struct User {
    pub registered: bool,
}

#[derive(Debug, Clone)]
pub struct RegisterUser {
    pub user_id: String,
    pub name: String,
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Event = UserEvent;
    type Command = RegisterUser;
    type Error = LibraryError;

    fn apply(&mut self, event: &UserEvent) {
        match event {
            UserEvent::UserRegistered(_) => self.registered = true,
        }
    }

    fn handle(&self, cmd: RegisterUser) -> Result<Vec<UserEvent>, LibraryError> {
        if self.registered {
            return Err(LibraryError::UserExists(cmd.user_id));
        }
        Ok(vec![UserRegistered {
            user_id: cmd.user_id,
            name: cmd.name,
        }
        .into()])
    }
}

/// Registration is never undone, so checking it before the book's
/// transaction cannot be invalidated by a concurrent writer.
pub fn borrow(
    store: &EventStore,
    book_id: &str,
    user_id: &str,
    options: &ExecuteOptions,
) -> Result<Executed<Book>, ExecuteError<LibraryError>> {
    let user = store.load_aggregate::<User>(user_id)?;
    store.execute_with::<Book>(
        book_id,
        BookCommand::Borrow {
            user_id: user_id.into(),
            user_registered: user.state.registered,
        },
        options,
    )
}

pub fn give_back(
    store: &EventStore,
    book_id: &str,
    user_id: &str,
) -> Result<Executed<Book>, ExecuteError<LibraryError>> {
    store.execute::<Book>(
        book_id,
        BookCommand::Return {
            user_id: user_id.into(),
        },
    )
}

pub fn register_book(store: &EventStore, book_id: &str, title: &str) {
    store
        .execute::<Book>(
            book_id,
            BookCommand::Register {
                book_id: book_id.into(),
                title: title.into(),
            },
        )
        .expect("register book");
}

pub fn register_user(store: &EventStore, user_id: &str) {
    store
        .execute::<User>(
            user_id,
            RegisterUser {
                user_id: user_id.into(),
                name: format!("User {user_id}"),
            },
        )
        .expect("register user");
}
