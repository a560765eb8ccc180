use es_diesel::ReadModel;

#[derive(ReadModel)]
#[read_model(table = "book_list", primary_key = book_id, index(author))]
struct BookList {
    book_id: i64,
    title: String,
}

fn main() {}
