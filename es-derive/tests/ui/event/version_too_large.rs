use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(version = 40000)]
struct BookBorrowed {
    book_id: i64,
}

fn main() {}
