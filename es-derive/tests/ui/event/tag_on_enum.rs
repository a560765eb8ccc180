use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Enrolled {
    course_id: String,
}

#[derive(Event)]
#[event(tag = "course:{course_id}")]
enum CourseEvent {
    Enrolled(Enrolled),
}

fn main() {}
