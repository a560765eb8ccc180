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

/// Row-level projectors lock their row (`FOR UPDATE` on PostgreSQL), and an
/// insert that loses a race for a new key starts over on the winner's row:
/// concurrent appends to different streams feeding one row lose no update.
#[test]
fn concurrent_appends_lose_no_row_update() {
    const THREADS: i64 = 4;
    const ROUNDS: i64 = 25;
    for db in TestDatabase::all() {
        let store = db.store();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS as usize));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    for round in 0..ROUNDS {
                        // Every thread registers a book of the same new author at once.
                        barrier.wait();
                        let id = round * 100 + t;
                        let author = format!("Author {round:02}");
                        let event = BookRegistered {
                            book_id: id,
                            title: format!("Book {id}"),
                            author,
                        };
                        store
                            .append(&format!("book-{id}"), ExpectedVersion::NoStream, [event])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let expected: Vec<Shelf> = (0..ROUNDS)
            .map(|round| Shelf {
                author: format!("Author {round:02}"),
                books: THREADS as i32,
            })
            .collect();
        assert_eq!(shelves(&store), expected, "on {}", db.backend());
    }
}
