//! Importing an existing CRUD table as initial events.

use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{import_event_id, projector, Event, ImportOptions, ImportRow, ReadModel, Recorded};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct BookImported {
    book_id: i64,
    title: String,
    copies: i32,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "imported_books", primary_key = book_id)]
struct ImportedBook {
    book_id: i64,
    title: String,
    copies: i32,
}

#[projector(on = BookImported, key = book_id)]
fn imported(e: &Recorded<BookImported>, row: &mut Option<ImportedBook>) {
    *row = Some(ImportedBook {
        book_id: e.book_id,
        title: e.title.clone(),
        copies: e.copies,
    });
}

/// The old application's table, as its rows.
fn legacy_rows(n: i64) -> Vec<ImportRow<BookImported>> {
    (1..=n)
        .map(|id| ImportRow {
            stream_id: format!("book-{id}"),
            key: id.to_string(),
            event: BookImported {
                book_id: id,
                title: format!("Legacy {id}"),
                copies: (id % 3) as i32 + 1,
            },
        })
        .collect()
}

#[test]
fn import_is_batched_idempotent_and_feeds_read_models() {
    for db in TestDatabase::all() {
        let store = db.store();
        let options = ImportOptions {
            batch_size: 1000,
            ..ImportOptions::new("legacy.books")
        };

        // An import interrupted after 1,200 rows...
        let partial = store.import(legacy_rows(1200), &options, |_| {}).unwrap();
        assert_eq!((partial.imported, partial.skipped), (1200, 0));
        // ...is simply run again.
        let mut batches = 0;
        let full = store
            .import(legacy_rows(2500), &options, |_| batches += 1)
            .unwrap();
        assert_eq!(
            (full.imported, full.skipped),
            (1300, 1200),
            "{}",
            db.backend()
        );
        assert_eq!(batches, 3);
        let again = store.import(legacy_rows(2500), &options, |_| {}).unwrap();
        assert_eq!((again.imported, again.skipped), (0, 2500));

        assert_eq!(
            store.head().unwrap(),
            store
                .read_all(0, 5000)
                .unwrap()
                .last()
                .unwrap()
                .global_position
        );
        assert_eq!(store.read_all(0, 5000).unwrap().len(), 2500);
        let first = &store.read_stream("book-7", 1, 10).unwrap()[0];
        assert_eq!(first.event_id, import_event_id("legacy.books", "7"));
        assert_eq!(first.metadata.actor.as_deref(), Some("import"));

        let mut conn = store.connection().unwrap();
        let rows: i64 = imported_books::table
            .count()
            .get_result(&mut *conn)
            .unwrap();
        assert_eq!(rows, 2500, "the read model filled up during the import");
        let book: ImportedBook = imported_books::table.find(2500).first(&mut *conn).unwrap();
        assert_eq!(book.title, "Legacy 2500");
    }
}
