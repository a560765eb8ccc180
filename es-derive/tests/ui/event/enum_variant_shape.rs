use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
enum LibraryEvent {
    BookBorrowed { book_id: i64 },
}

fn main() {}
