use es_diesel::ReadModel;

#[derive(ReadModel)]
#[read_model(table = "book_list", primary_key = book_id)]
struct BookList {
    book_id: i64,
    copies: u64,
    tags: std::collections::HashMap<String, String>,
}

fn main() {}
