use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct BookWeighed {
    book_id: i64,
    grams: u64,
}

fn main() {}
