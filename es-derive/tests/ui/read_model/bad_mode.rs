use es_diesel::ReadModel;

#[derive(ReadModel)]
#[read_model(table = "book_list", primary_key = book_id, mode = later)]
struct BookList {
    book_id: i64,
}

fn main() {}
