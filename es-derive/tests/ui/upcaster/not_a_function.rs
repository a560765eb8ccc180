use es_diesel::{upcaster, Event};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, view = false)]
struct BookBorrowed {
    book_id: i64,
}

#[upcaster(BookBorrowed, from = 1)]
struct V1ToV2;

fn main() {}
