use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(tag = 42)]
struct Enrolled {
    course_id: String,
}

fn main() {}
