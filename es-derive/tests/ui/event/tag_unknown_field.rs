use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(tag = course)]
struct Enrolled {
    course_id: String,
    student_id: String,
}

fn main() {}
