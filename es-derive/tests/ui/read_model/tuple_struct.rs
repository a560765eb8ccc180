use es_diesel::ReadModel;

#[derive(ReadModel)]
#[read_model(table = "book_list", primary_key = book_id)]
struct BookList(i64, String);

fn main() {}
