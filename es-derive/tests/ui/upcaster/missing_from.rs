use es_diesel::serde_json::Value;
use es_diesel::{upcaster, Event};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, view = false)]
struct BookBorrowed {
    book_id: i64,
}

#[upcaster(BookBorrowed)]
fn v1_to_v2(payload: Value) -> Result<Value, String> {
    Ok(payload)
}

fn main() {}
