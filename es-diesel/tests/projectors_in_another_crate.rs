//! Projectors registered by another crate, which this program refers to only
//! to link it: the documented answer to inventory's linking caveat.

// Without this line the linker drops the crate and its projector silently;
// `check_projectors` below would then fail and say so.
use projector_plugin as _;

use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{check_projectors, registered_projectors, Event, ExpectedVersion, ProjectorStyle};
use serde::{Deserialize, Serialize};

/// This crate's own definition of the event, with more fields than the
/// plugin reads.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct BookRegistered {
    book_id: i64,
    title: String,
    author: String,
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Shelf {
    #[diesel(sql_type = diesel::sql_types::Text)]
    author: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    books: i32,
}

fn shelves(store: &es_diesel::EventStore) -> Vec<Shelf> {
    let mut conn = store.connection().unwrap();
    diesel::sql_query("SELECT author, books FROM author_shelf ORDER BY author")
        .load(&mut *conn)
        .unwrap()
}

#[test]
fn a_linked_crate_registers_its_projectors() {
    let all = registered_projectors().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].name, "projector_plugin::shelve");
    assert_eq!(
        (all[0].read_model, all[0].style),
        ("author_shelf", ProjectorStyle::Row)
    );
    assert_eq!(all[0].event_types, vec!["BookRegistered"]);
    assert!(
        all[0].location.contains("projector-plugin"),
        "{}",
        all[0].location
    );
    check_projectors(&[("author_shelf", &["BookRegistered"])]).unwrap();
    let missing = check_projectors(&[("book_list", &["BookRegistered"])])
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("nothing handles `BookRegistered` for read model `book_list`"),
        "{missing}"
    );
    assert!(
        missing.contains("projector_plugin::shelve -> author_shelf on [BookRegistered]"),
        "{missing}"
    );
    assert!(missing.contains("use that_crate as _;"), "{missing}");
}

#[test]
fn its_projectors_run_inline_and_rebuild() {
    for db in TestDatabase::all() {
        let store = db.store();
        for (id, author) in [(1, "Herbert"), (2, "Austen"), (3, "Herbert")] {
            let title = format!("Book {id}");
            store
                .append(
                    &format!("book-{id}"),
                    ExpectedVersion::NoStream,
                    [BookRegistered {
                        book_id: id,
                        title,
                        author: author.into(),
                    }],
                )
                .unwrap();
        }
        let expected = vec![
            Shelf {
                author: "Austen".into(),
                books: 1,
            },
            Shelf {
                author: "Herbert".into(),
                books: 2,
            },
        ];
        assert_eq!(shelves(&store), expected, "inline on {}", db.backend());
        let report = store.rebuild("author_shelf").unwrap();
        assert_eq!((report.events, report.rows), (3, 2));
        assert_eq!(shelves(&store), expected, "rebuilt on {}", db.backend());
    }
}
