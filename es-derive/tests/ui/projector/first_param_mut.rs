#[allow(unused_imports)]
use es_diesel::{projector, DbConnection, Event, ReadModel, Recorded};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(view = false)]
struct BookBorrowed {
    book_id: i64,
}

#[derive(Event, Serialize, Deserialize)]
#[event(view = false)]
struct BookReturned {
    book_id: i64,
}

#[derive(ReadModel)]
#[read_model(table = "book_list", primary_key = book_id)]
struct BookList {
    book_id: i64,
    borrowed: bool,
}

#[projector(on = BookBorrowed, read_model = BookList)]
fn borrowed(_e: &mut BookBorrowed, _conn: &mut DbConnection) {}

fn main() {}
