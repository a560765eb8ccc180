use es_diesel::testing::TestDatabase;
use es_diesel::{Event, ExpectedVersion};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct BookBorrowed {
    book_id: i64,
    user_id: i64,
}

#[test]
fn smoke() {
    for db in TestDatabase::all() {
        let store = db.store();
        let r = store
            .append(
                "book-1",
                ExpectedVersion::NoStream,
                [BookBorrowed {
                    book_id: 1,
                    user_id: 2,
                }],
            )
            .unwrap();
        assert_eq!(r[0].stream_version, 1);
        let err = store
            .append(
                "book-1",
                ExpectedVersion::NoStream,
                [BookBorrowed {
                    book_id: 1,
                    user_id: 2,
                }],
            )
            .unwrap_err();
        println!("{err}");
        let evs = store.load_stream::<BookBorrowed>("book-1").unwrap();
        assert_eq!(evs.len(), 1);
    }
}
