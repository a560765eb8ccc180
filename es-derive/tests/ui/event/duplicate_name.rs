use es_diesel::Event;
use serde::{Deserialize, Serialize};

mod orders {
    use super::*;

    #[derive(Event, Serialize, Deserialize)]
    #[event(view = false)]
    pub struct Created {
        pub order_id: i64,
    }
}

mod users {
    use super::*;

    #[derive(Event, Serialize, Deserialize)]
    #[event(view = false)]
    pub struct Created {
        pub user_id: i64,
    }
}

fn main() {}
