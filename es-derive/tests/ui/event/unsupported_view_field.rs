use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct BookTagged {
    book_id: i64,
    tags: Vec<String>,
}

fn main() {}
