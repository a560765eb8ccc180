use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct LedgerPosted {
    entry_id: i64,
    amount: Option<i128>,
}

fn main() {}
