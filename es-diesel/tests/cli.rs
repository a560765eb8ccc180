//! The embedded management commands.

use es_diesel::cli::{run, AdminCommand};
use es_diesel::testing::TestDatabase;
use es_diesel::{projector, Event, ExpectedVersion, ReadModel, Recorded};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(view = false)]
struct Shelved {
    book_id: i64,
    shelf: String,
}

#[derive(ReadModel, Debug, Clone)]
#[read_model(table = "shelves", primary_key = book_id)]
struct Shelf {
    book_id: i64,
    shelf: String,
}

#[derive(ReadModel, Debug, Clone)]
#[read_model(table = "shelf_counts", primary_key = shelf, mode = async)]
struct ShelfCount {
    shelf: String,
    books: i64,
}

#[projector(on = Shelved, key = book_id)]
fn shelved(e: &Recorded<Shelved>, row: &mut Option<Shelf>) {
    *row = Some(Shelf {
        book_id: e.book_id,
        shelf: e.shelf.clone(),
    });
}

#[projector(on = Shelved, key = shelf)]
fn counted(e: &Recorded<Shelved>, row: &mut Option<ShelfCount>) {
    let books = row.as_ref().map_or(0, |r| r.books) + 1;
    *row = Some(ShelfCount {
        shelf: e.shelf.clone(),
        books,
    });
}

fn output(store: &es_diesel::EventStore, cmd: AdminCommand) -> String {
    let mut out = Vec::new();
    run(store, cmd, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn admin_commands_report_the_store() {
    for db in TestDatabase::all() {
        let store = db.store();
        for id in 1..=5 {
            let shelf = if id % 2 == 0 { "sf" } else { "poetry" };
            store
                .append(
                    &format!("book-{id}"),
                    ExpectedVersion::NoStream,
                    [Shelved {
                        book_id: id,
                        shelf: shelf.into(),
                    }],
                )
                .unwrap();
        }
        assert!(output(&store, AdminCommand::Migrate).contains("migrations applied"));
        let status = output(&store, AdminCommand::Status);
        assert!(status.contains("log head: position 5"), "{status}");
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("shelves") && l.contains("inline") && l.contains("current")),
            "{status}"
        );
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("shelf_counts") && l.contains("async")),
            "{status}"
        );
        let projectors = output(&store, AdminCommand::Projectors);
        assert!(
            projectors.contains("shelf_counts (async") && projectors.contains("cli::counted"),
            "{projectors}"
        );
        let rebuilt = output(
            &store,
            AdminCommand::Rebuild {
                name: "shelves".into(),
                batch_size: 2,
            },
        );
        assert!(
            rebuilt.contains("rebuilt shelves: 5 events replayed, 5 rows"),
            "{rebuilt}"
        );
        let rebuilt = output(
            &store,
            AdminCommand::Rebuild {
                name: "shelf_counts".into(),
                batch_size: 2,
            },
        );
        assert!(
            rebuilt.contains("rebuilt shelf_counts: 5 events replayed, 2 rows"),
            "{rebuilt}"
        );
        let tail = output(
            &store,
            AdminCommand::Tail {
                count: 2,
                follow: false,
            },
        );
        assert_eq!(tail.lines().count(), 2, "{tail}");
        assert!(
            tail.contains("book-5") && !tail.contains("book-3"),
            "{tail}"
        );
        let stream = output(
            &store,
            AdminCommand::Stream {
                stream_id: "book-2".into(),
            },
        );
        assert!(
            stream.contains("Shelved") && stream.contains("\"sf\""),
            "{stream}"
        );
        assert!(output(
            &store,
            AdminCommand::Stream {
                stream_id: "nope".into()
            }
        )
        .contains("has no events"));
    }
}
