//! The embedded management commands.

use es_diesel::cli::{run, tail, AdminCommand};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    append_in, projector, write_transaction, Backend, Error, Event, EventStore, ExpectedVersion,
    ReadModel, Recorded, StoreOptions, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[path = "support/capture.rs"]
mod capture;
use capture::Capture;

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
        let status = output(&store, AdminCommand::Status { json: false });
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
                json: false,
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
                json: false,
            },
        );
        assert!(
            stream.contains("Shelved") && stream.contains("\"sf\""),
            "{stream}"
        );
        assert!(output(
            &store,
            AdminCommand::Stream {
                stream_id: "nope".into(),
                json: false,
            }
        )
        .contains("has no events"));
    }
}

/// Output shared with a `tail` running on another thread.
impl Capture {
    /// How many printed events are on `shelf`.
    fn count(&self, shelf: &str) -> usize {
        self.text().matches(&format!("\"{shelf}\"")).count()
    }

    fn wait_for(&self, what: &str, shelves: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while shelves.iter().any(|s| self.count(s) == 0) {
            assert!(
                Instant::now() < deadline,
                "{what}: {shelves:?} not all printed:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn shelved_on(book_id: i64, shelf: &str) -> Shelved {
    Shelved {
        book_id,
        shelf: shelf.into(),
    }
}

fn start_tail(
    store: &EventStore,
    count: usize,
    stop: &Arc<AtomicBool>,
) -> (Capture, std::thread::JoinHandle<()>) {
    let out = Capture::default();
    let (store, stop, mut sink) = (store.clone(), stop.clone(), out.clone());
    let handle =
        std::thread::spawn(move || tail(&store, count, false, Some(&stop), &mut sink).unwrap());
    (out, handle)
}

/// `tail -f` prints every event once, including one whose transaction
/// commits after an event with a higher position (PostgreSQL), also when it
/// starts while that transaction is open.
#[test]
fn tail_follow_prints_late_commits_once() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append(
                "shelf-0",
                ExpectedVersion::NoStream,
                [shelved_on(100, "start")],
            )
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (early, early_tail) = start_tail(&store, 1, &stop);
        early.wait_for("before any write", &["start"]);

        // On PostgreSQL "held" gets the lower position but commits last.
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let writer = if db.backend() == Backend::Postgres {
            let store = store.clone();
            let writer = std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                write_transaction(&mut conn, |c| {
                    let mut w = StreamWrite::new("shelf-1", ExpectedVersion::NoStream);
                    w.push(&shelved_on(101, "held"))?;
                    let recorded = append_in(c, &[w])?;
                    held_tx.send(recorded[0].global_position).unwrap();
                    go_rx.recv().unwrap();
                    Ok::<_, es_diesel::Error>(())
                })
                .unwrap();
            });
            Some(writer)
        } else {
            store
                .append(
                    "shelf-1",
                    ExpectedVersion::NoStream,
                    [shelved_on(101, "held")],
                )
                .unwrap();
            held_tx.send(store.head().unwrap()).unwrap();
            None
        };
        let held = held_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let after = store
            .append(
                "shelf-2",
                ExpectedVersion::NoStream,
                [shelved_on(102, "after")],
            )
            .unwrap();
        assert!(after[0].global_position > held);

        let (late, late_tail) = start_tail(&store, 1, &stop);
        late.wait_for("started while held was open", &["after"]);
        // Lets the early tail poll a few times while "held" is still open.
        std::thread::sleep(Duration::from_millis(500));
        go_tx.send(()).ok();
        if let Some(writer) = writer {
            writer.join().unwrap();
        }
        store
            .append(
                "shelf-3",
                ExpectedVersion::NoStream,
                [shelved_on(103, "last")],
            )
            .unwrap();
        // Followers print in one order, so once "last" is out nothing else
        // is still to come.
        early.wait_for(
            &format!("{}, early tail", db.backend()),
            &["held", "after", "last"],
        );
        // On SQLite "held" had committed before the late tail started, and
        // is not among its last 1 event.
        let postgres = db.backend() == Backend::Postgres;
        let late_shelves: &[&str] = if postgres {
            &["held", "after", "last"]
        } else {
            &["after", "last"]
        };
        late.wait_for(&format!("{}, late tail", db.backend()), late_shelves);
        stop.store(true, Ordering::Relaxed);
        early_tail.join().unwrap();
        late_tail.join().unwrap();
        for shelf in ["start", "held", "after", "last"] {
            assert_eq!(
                early.count(shelf),
                1,
                "{}: {shelf}:\n{}",
                db.backend(),
                early.text()
            );
            let expected = usize::from(late_shelves.contains(&shelf));
            assert_eq!(
                late.count(shelf),
                expected,
                "{}: {shelf}:\n{}",
                db.backend(),
                late.text()
            );
        }
    }
}

fn shelve(store: &EventStore, id: i64, shelf: &str) {
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

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn json_output_of_status_stream_and_tail() {
    for db in TestDatabase::all() {
        let store = db.store();
        for id in 1..=3 {
            shelve(&store, id, "sf");
        }
        let status = json_lines(&output(&store, AdminCommand::Status { json: true }));
        assert_eq!(status.len(), 1, "{status:?}");
        assert_eq!(status[0]["head"], 3);
        let projections = status[0]["projections"].as_array().unwrap();
        let shelves = projections.iter().find(|p| p["name"] == "shelves").unwrap();
        assert_eq!(
            (&shelves["mode"], &shelves["state"], &shelves["lag"]),
            (&"inline".into(), &"current".into(), &0.into()),
            "{shelves}"
        );
        let counts = projections
            .iter()
            .find(|p| p["name"] == "shelf_counts")
            .unwrap();
        assert_eq!(
            (&counts["mode"], &counts["state"], &counts["lag"]),
            (&"async".into(), &"idle".into(), &3.into()),
            "{counts}"
        );

        let stream = json_lines(&output(
            &store,
            AdminCommand::Stream {
                stream_id: "book-2".into(),
                json: true,
            },
        ));
        assert_eq!(stream.len(), 1);
        assert_eq!(stream[0]["stream_id"], "book-2");
        assert_eq!(stream[0]["stream_version"], 1);
        assert_eq!(stream[0]["event_type"], "Shelved");
        assert_eq!(
            stream[0]["payload"]["shelf"], "sf",
            "payload is JSON, not text"
        );

        let tail = json_lines(&output(
            &store,
            AdminCommand::Tail {
                count: 2,
                follow: false,
                json: true,
            },
        ));
        let positions: Vec<i64> = tail
            .iter()
            .map(|e| e["global_position"].as_i64().unwrap())
            .collect();
        assert_eq!(positions, [2, 3], "{tail:?}");
        assert_eq!(tail[1]["payload"]["book_id"], 3);
    }
}

/// Commands other than `migrate` refuse an unmigrated database, say what is
/// missing, and change nothing; `migrate` then makes them work.
#[test]
fn admin_commands_on_an_unmigrated_database_say_to_migrate() {
    for db in TestDatabase::all() {
        let store = EventStore::open(db.url()).unwrap();
        let commands = [
            AdminCommand::Status { json: false },
            AdminCommand::Tail {
                count: 5,
                follow: false,
                json: false,
            },
            AdminCommand::Stream {
                stream_id: "book-1".into(),
                json: true,
            },
            AdminCommand::Rebuild {
                name: "shelves".into(),
                batch_size: 10,
            },
        ];
        for cmd in commands.clone() {
            let mut out = Vec::new();
            let err = run(&store, cmd.clone(), &mut out).unwrap_err();
            assert!(matches!(err, Error::NotMigrated { .. }), "{cmd:?}: {err:?}");
            let text = err.to_string();
            assert!(
                text.contains("no migration has run") && text.contains("admin migrate"),
                "{text}"
            );
            assert!(out.is_empty());
        }
        let err = store.check_migrated().unwrap_err();
        match db.backend() {
            es_diesel::Backend::Sqlite => assert!(err.to_string().contains(db.url()), "{err}"),
            es_diesel::Backend::Postgres => assert!(
                err.to_string().starts_with("the PostgreSQL database `"),
                "{err}"
            ),
            es_diesel::Backend::Mysql => {
                assert!(err.to_string().starts_with("the MySQL database `"), "{err}")
            }
        }
        // Still nothing created.
        assert!(store.check_migrated().is_err());

        assert!(output(&store, AdminCommand::Migrate).contains("migrations applied"));
        store.check_migrated().unwrap();
        for cmd in commands {
            let mut out = Vec::new();
            run(&store, cmd.clone(), &mut out).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        }
    }
}

/// A database migrated by older code (a migration not applied, a read
/// model missing or of another shape, an event view missing) is not
/// migrated either, and the error lists each.
#[test]
fn check_migrated_lists_each_missing_piece() {
    use diesel::connection::SimpleConnection;
    for db in TestDatabase::all() {
        let store = db.store();
        store.check_migrated().unwrap();
        let mut conn = store.connection().unwrap();
        conn.batch_execute(
            "DELETE FROM es_schema_migrations WHERE version = 3;
             DELETE FROM es_read_models WHERE name = 'shelves';
             UPDATE es_read_models SET fingerprint = 'old' WHERE name = 'shelf_counts';
             DROP VIEW shelved_with_view;",
        )
        .unwrap();
        drop(conn);
        let err = store.check_migrated().unwrap_err().to_string();
        for piece in [
            "store migration 3 (aggregate snapshots)",
            "read model `shelves`",
            "read model `shelf_counts` in its current shape",
            "event view `shelved_with_view`",
        ] {
            assert!(err.contains(piece), "{piece}: {err}");
        }
        assert!(!err.contains("store migration 2"), "{err}");
    }
}

/// Registered for its typed view only.
#[allow(dead_code)]
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
struct ShelvedWithView {
    book_id: i64,
}

#[test]
fn a_missing_sqlite_file_is_an_error_naming_it_unless_creating_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such.db");
    let url = path.to_str().unwrap();
    let no_create = StoreOptions {
        create_if_missing: false,
        ..StoreOptions::default()
    };
    let err = EventStore::open_with(url, no_create.clone()).unwrap_err();
    assert!(matches!(err, Error::DatabaseNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(url), "{err}");
    assert!(!path.exists(), "nothing created");
    let err = EventStore::open_with(&format!("sqlite://{url}"), no_create.clone()).unwrap_err();
    assert!(err.to_string().contains(url), "{err}");

    // A file in a missing folder cannot be created: the error names it.
    let nested = dir.path().join("nowhere/x.db");
    let err = EventStore::open(nested.to_str().unwrap()).unwrap_err();
    assert!(err.to_string().contains(nested.to_str().unwrap()), "{err}");

    let store = EventStore::open(url).unwrap();
    store.migrate().unwrap();
    drop(store);
    let store = EventStore::open_with(url, no_create).unwrap();
    store.check_migrated().unwrap();
    // In-memory databases have no file to miss.
    EventStore::open_with(
        ":memory:",
        StoreOptions {
            create_if_missing: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
}

#[test]
fn connection_errors_name_the_host() {
    let err = EventStore::open("postgres://nobody:secret@127.0.0.1:1/nothing").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("`nothing` at 127.0.0.1:1") && !text.contains("secret"),
        "{text}"
    );
}
