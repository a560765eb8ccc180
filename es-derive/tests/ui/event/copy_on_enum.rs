use es_diesel::Event;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Created {
    order_id: i64,
}

#[derive(Event)]
#[event(copy)]
enum OrderEvent {
    Created(Created),
}

fn main() {}
