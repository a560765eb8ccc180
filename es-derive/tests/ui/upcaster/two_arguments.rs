use es_diesel::serde_json::Value;
use es_diesel::{upcaster, Event};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, view = false)]
struct BookBorrowed {
    book_id: i64,
}

#[upcaster(BookBorrowed, from = 1)]
fn v1_to_v2(payload: Value, extra: u32) -> Result<Value, String> {
    let _ = extra;
    Ok(payload)
}

fn main() {}
