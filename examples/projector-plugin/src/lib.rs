//! A crate that only registers things: the `author_shelf` read model and its
//! projector. Nothing in it needs to be called; an application links it by
//! referring to it (`use projector_plugin as _;`) and can check it is there:
//!
//! ```
//! use projector_plugin as _;
//! es_diesel::check_projectors(&[("author_shelf", &["BookRegistered"])]).unwrap();
//! ```
//!
//! It decodes `BookRegistered` events by their stored name and JSON shape, so
//! it does not depend on the crate that appends them.

use es_diesel::{projector, Event, ReadModel, Recorded};
use serde::{Deserialize, Serialize};

/// The part of `BookRegistered` this crate reads.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "BookRegistered", view = false, copy)]
pub struct BookRegistered {
    pub book_id: i64,
    pub author: String,
}

/// How many books each author has on the shelves.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "author_shelf", primary_key = author)]
pub struct AuthorShelf {
    pub author: String,
    pub books: i32,
}

#[projector(on = BookRegistered, key = author)]
fn shelve(e: &Recorded<BookRegistered>, row: &mut Option<AuthorShelf>) {
    match row {
        Some(shelf) => shelf.books += 1,
        None => {
            *row = Some(AuthorShelf {
                author: e.author.clone(),
                books: 1,
            })
        }
    }
}
