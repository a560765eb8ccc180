use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(table = "borrowings")]
struct BookBorrowed {
    book_id: i64,
}

fn main() {}
