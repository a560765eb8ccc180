use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(tag = "course:{course_id")]
struct Enrolled {
    course_id: String,
}

fn main() {}
