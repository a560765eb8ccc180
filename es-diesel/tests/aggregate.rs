//! Commands validated against aggregates: the library's rules, decided
//! without a database (given/when/then) and executed on every backend.

mod common;

use common::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use es_diesel::harness::given;
use es_diesel::testing::TestDatabase;
use es_diesel::{
    Aggregate, Backend, Error, EventStore, ExecuteError, ExecuteOptions, ExpectedVersion, Metadata,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn registered(book: &str) -> BookEvent {
    BookRegistered {
        book_id: book.into(),
        title: "Dune".into(),
    }
    .into()
}

fn borrowed(book: &str, user: &str) -> BookEvent {
    BookBorrowed {
        book_id: book.into(),
        user_id: user.into(),
    }
    .into()
}

fn returned(book: &str, user: &str) -> BookEvent {
    BookReturned {
        book_id: book.into(),
        user_id: user.into(),
    }
    .into()
}

fn borrow_cmd(user: &str, registered: bool) -> BookCommand {
    BookCommand::Borrow {
        user_id: user.into(),
        user_registered: registered,
    }
}

#[test]
fn decides_a_borrow_of_a_free_book() {
    let state = given::<Book>([registered("b1")])
        .when(borrow_cmd("ann", true))
        .then([borrowed("b1", "ann")]);
    assert_eq!(state.holder.as_deref(), Some("ann"));
    assert_eq!(state.times_borrowed, 1);
}

#[test]
fn a_book_cannot_be_borrowed_twice() {
    given::<Book>([registered("b1"), borrowed("b1", "ann")])
        .when(borrow_cmd("bob", true))
        .then_error(LibraryError::AlreadyBorrowed {
            book_id: "b1".into(),
            holder: "ann".into(),
        });
    given::<Book>([registered("b1"), borrowed("b1", "ann")])
        .when(borrow_cmd("ann", true))
        .then_error(LibraryError::AlreadyBorrowed {
            book_id: "b1".into(),
            holder: "ann".into(),
        });
}

#[test]
fn only_the_holder_returns_a_book() {
    given::<Book>([registered("b1"), borrowed("b1", "ann")])
        .when(BookCommand::Return {
            user_id: "bob".into(),
        })
        .then_error(LibraryError::NotHolder {
            book_id: "b1".into(),
            user_id: "bob".into(),
        });
    given::<Book>([registered("b1")])
        .when(BookCommand::Return {
            user_id: "ann".into(),
        })
        .then_error_matches(|e| matches!(e, LibraryError::NotHolder { .. }));
    given::<Book>([registered("b1"), borrowed("b1", "ann")])
        .when(BookCommand::Return {
            user_id: "ann".into(),
        })
        .then([returned("b1", "ann")]);
}

#[test]
fn an_unregistered_user_cannot_borrow() {
    given::<Book>([registered("b1")])
        .when(borrow_cmd("eve", false))
        .then_error(LibraryError::UnknownUser("eve".into()));
}

#[test]
fn an_unregistered_book_cannot_be_borrowed_and_a_book_is_registered_once() {
    given::<Book>([])
        .when(borrow_cmd("ann", true))
        .then_error(LibraryError::UnknownBook);
    given::<Book>([registered("b1")])
        .when(BookCommand::Register {
            book_id: "b1".into(),
            title: "Dune".into(),
        })
        .then_error(LibraryError::BookExists("b1".into()));
    let after_return = given::<Book>([
        registered("b1"),
        borrowed("b1", "ann"),
        returned("b1", "ann"),
    ]);
    assert_eq!(after_return.state().holder, None);
    after_return
        .when(borrow_cmd("bob", true))
        .then([borrowed("b1", "bob")]);
}

#[test]
#[should_panic(expected = "expected events")]
fn the_harness_reports_other_events() {
    given::<Book>([registered("b1")])
        .when(borrow_cmd("ann", true))
        .then([borrowed("b1", "bob")]);
}

#[test]
#[should_panic(expected = "expected error")]
fn the_harness_reports_a_decision_that_should_have_been_refused() {
    given::<Book>([registered("b1")])
        .when(borrow_cmd("ann", true))
        .then_error(LibraryError::UnknownUser("ann".into()));
}

#[test]
#[should_panic(expected = "but the command was refused")]
fn the_harness_reports_a_refusal() {
    given::<Book>([registered("b1")])
        .when(borrow_cmd("ann", false))
        .then([borrowed("b1", "ann")]);
}

fn book_events(store: &EventStore, book: &str) -> Vec<BookEvent> {
    store
        .load_stream::<BookEvent>(&Book::stream_id(book))
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect()
}

fn domain<T: std::fmt::Debug>(result: Result<T, ExecuteError<LibraryError>>) -> LibraryError {
    match result {
        Err(ExecuteError::Domain(e)) => e,
        other => panic!("expected a domain error, got {other:?}"),
    }
}

#[test]
fn library_rules_hold_in_the_store() {
    for db in TestDatabase::all() {
        let store = db.store();
        let fast = ExecuteOptions::default();
        register_book(&store, "b1", "Dune");
        register_user(&store, "ann");
        register_user(&store, "bob");
        assert!(matches!(
            store.execute::<User>(
                "ann",
                RegisterUser {
                    user_id: "ann".into(),
                    name: "Ann".into()
                }
            ),
            Err(ExecuteError::Domain(LibraryError::UserExists(_)))
        ));

        let meta = Metadata::new().actor("desk-1");
        let done = borrow(&store, "b1", "ann", &fast.clone().metadata(meta.clone())).unwrap();
        assert_eq!((done.version, done.attempts, done.events.len()), (2, 1, 1));
        assert_eq!(done.state.holder.as_deref(), Some("ann"));
        assert_eq!(done.events[0].event, borrowed("b1", "ann"));
        assert_eq!(done.events[0].metadata, meta);
        assert_eq!(done.stream_id, "book-b1");

        // Refusals come back typed and write nothing.
        let head = store.head().unwrap();
        assert_eq!(
            domain(borrow(&store, "b1", "bob", &fast)),
            LibraryError::AlreadyBorrowed {
                book_id: "b1".into(),
                holder: "ann".into()
            }
        );
        assert_eq!(
            domain(give_back(&store, "b1", "bob")),
            LibraryError::NotHolder {
                book_id: "b1".into(),
                user_id: "bob".into()
            }
        );
        assert_eq!(
            domain(borrow(&store, "b1", "eve", &fast)),
            LibraryError::UnknownUser("eve".into())
        );
        assert_eq!(
            domain(borrow(&store, "nope", "ann", &fast)),
            LibraryError::UnknownBook
        );
        assert_eq!(
            store.head().unwrap(),
            head,
            "{}: a refused command wrote events",
            db.backend()
        );
        assert_eq!(store.stream_version("book-nope").unwrap(), 0);

        give_back(&store, "b1", "ann").unwrap();
        let done = borrow(&store, "b1", "bob", &fast).unwrap();
        assert_eq!(done.version, 4);
        assert_eq!(
            book_events(&store, "b1"),
            vec![
                registered("b1"),
                borrowed("b1", "ann"),
                returned("b1", "ann"),
                borrowed("b1", "bob")
            ]
        );
        let loaded = store.load_aggregate::<Book>("b1").unwrap();
        assert_eq!(loaded.state.holder.as_deref(), Some("bob"));
        assert_eq!(loaded.state.times_borrowed, 2);
        assert_eq!(loaded.version, 4);
    }
}

#[test]
fn an_event_the_aggregate_does_not_know_is_an_error_naming_its_position() {
    for db in TestDatabase::all() {
        let store = db.store();
        register_book(&store, "b1", "Dune");
        let stray = store
            .append(
                "book-b1",
                ExpectedVersion::Any,
                [UserRegistered {
                    user_id: "x".into(),
                    name: "X".into(),
                }],
            )
            .unwrap();
        let err = store
            .execute::<Book>("b1", borrow_cmd("ann", true))
            .unwrap_err();
        match &err {
            ExecuteError::Store(Error::Decode {
                position,
                event_type,
                stream,
                ..
            }) => {
                assert_eq!(*position, stray[0].global_position);
                assert_eq!(event_type, "UserRegistered");
                assert_eq!(stream, "book-b1");
            }
            other => panic!("{}: expected a decode error, got {other:?}", db.backend()),
        }
        assert!(
            err.to_string()
                .contains(&format!("global position {}", stray[0].global_position)),
            "{err}"
        );
    }
}

/// Replays the log with the rules written out again, independently of
/// `Book::apply`: every borrow finds the book free, every return comes from
/// its holder.
fn assert_invariant(events: &[BookEvent]) -> usize {
    let mut holder: Option<&str> = None;
    let mut borrows = 0;
    for (i, e) in events.iter().enumerate() {
        match e {
            BookEvent::BookRegistered(_) => assert_eq!(i, 0),
            BookEvent::BookBorrowed(b) => {
                assert_eq!(
                    holder, None,
                    "event {i}: {} borrowed a book held by {holder:?}",
                    b.user_id
                );
                holder = Some(&b.user_id);
                borrows += 1;
            }
            BookEvent::BookReturned(r) => {
                assert_eq!(
                    holder,
                    Some(r.user_id.as_str()),
                    "event {i}: returned by a non-holder"
                );
                holder = None;
            }
        }
    }
    borrows
}

#[test]
fn eight_threads_borrowing_one_book_keep_the_invariant() {
    const THREADS: usize = 8;
    const BORROWS_EACH: usize = 5;
    for db in TestDatabase::all() {
        let store = db.store();
        register_book(&store, "b1", "Dune");
        for t in 0..THREADS {
            register_user(&store, &format!("u{t}"));
        }
        let barrier = Arc::new(Barrier::new(THREADS));
        let retries = Arc::new(AtomicU32::new(0));
        let refused = Arc::new(AtomicU32::new(0));
        // A retry on SQLite holds the write lock from its load on: it
        // cannot lose a race, so no command takes more than two attempts.
        let at_most_two = db.backend() == Backend::Sqlite;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, barrier, retries, refused) = (
                    store.clone(),
                    barrier.clone(),
                    retries.clone(),
                    refused.clone(),
                );
                std::thread::spawn(move || {
                    let user = format!("u{t}");
                    // Far above what 8 writers need, so that a test run cannot
                    // fail by an unlucky streak; the bound itself is tested below.
                    let options = ExecuteOptions::default().max_retries(200);
                    barrier.wait();
                    let mut done = 0;
                    while done < BORROWS_EACH {
                        match borrow(&store, "b1", &user, &options) {
                            Ok(executed) => {
                                retries.fetch_add(executed.attempts - 1, Ordering::Relaxed);
                                let back = give_back(&store, "b1", &user).unwrap_or_else(|e| {
                                    panic!("{user} cannot return the book it holds: {e}")
                                });
                                assert!(
                                    !at_most_two || executed.attempts.max(back.attempts) <= 2,
                                    "{user}: {} and {} attempts",
                                    executed.attempts,
                                    back.attempts
                                );
                                retries.fetch_add(back.attempts - 1, Ordering::Relaxed);
                                done += 1;
                            }
                            Err(ExecuteError::Domain(LibraryError::AlreadyBorrowed { .. })) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                std::thread::yield_now();
                            }
                            Err(other) => panic!("{user}: {other}"),
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("borrower thread");
        }
        let events = book_events(&store, "b1");
        assert_eq!(assert_invariant(&events), THREADS * BORROWS_EACH);
        assert_eq!(events.len(), 1 + 2 * THREADS * BORROWS_EACH);
        let loaded = store.load_aggregate::<Book>("b1").unwrap();
        assert_eq!(loaded.state.holder, None);
        assert_eq!(loaded.state.times_borrowed, (THREADS * BORROWS_EACH) as u64);
        eprintln!(
            "{}: {} commands succeeded after {} conflict retries; {} borrows refused (book taken)",
            db.backend(),
            2 * THREADS * BORROWS_EACH,
            retries.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        );
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Appends `BookBorrowed` by `user` as version 2 of book-b1 in a transaction
/// of its own, left open until `commit` is called.
struct OpenWriter {
    conn: es_diesel::PooledConnection,
}

impl OpenWriter {
    fn begin(store: &EventStore, user: &str) -> Self {
        let mut conn = store.connection().unwrap();
        let payload = format!(r#"{{"book_id":"b1","user_id":"{user}"}}"#);
        let id = uuid::Uuid::now_v7();
        let sql = match conn.backend() {
            Backend::Postgres => format!(
                "BEGIN; INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata) \
                 VALUES ('{id}', 'book-b1', 2, 'BookBorrowed', 1, '{payload}', '{{}}')"
            ),
            // As the store's appends do: the log's head first (see backend/mysql.rs).
            Backend::Mysql => format!(
                "BEGIN; UPDATE es_log_head SET position = position + 1 WHERE id = 1; \
                 INSERT INTO es_events (global_position, event_id, stream_id, stream_version, event_type, event_version, payload, metadata, created_at) \
                 VALUES ((SELECT position FROM es_log_head WHERE id = 1), '{id}', 'book-b1', 2, 'BookBorrowed', 1, '{payload}', '{{}}', '2024-01-01 00:00:00')"
            ),
            Backend::Sqlite => format!(
                "BEGIN IMMEDIATE; INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata, created_at) \
                 VALUES ('{id}', 'book-b1', 2, 'BookBorrowed', 1, '{payload}', '{{}}', '2024-01-01 00:00:00')"
            ),
        };
        conn.batch_execute(&sql).unwrap();
        OpenWriter { conn }
    }

    /// On PostgreSQL and MySQL: waits until another session is blocked by this one
    /// (the command's insert waiting on the unique index). Asked from
    /// another connection: inside a transaction, PostgreSQL keeps showing
    /// the activity it saw first.
    fn wait_until_blocking(&mut self, store: &EventStore) {
        let mysql = self.conn.backend() == Backend::Mysql;
        let me = if mysql {
            "SELECT CAST(trx_id AS SIGNED) AS n FROM information_schema.innodb_trx \
             WHERE trx_mysql_thread_id = CONNECTION_ID()"
        } else {
            "SELECT pg_backend_pid()::bigint AS n"
        };
        let pid = diesel::sql_query(me)
            .get_result::<Count>(&mut *self.conn)
            .unwrap()
            .n;
        let mut observer = store.connection().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let waiting = if mysql {
                "SELECT COUNT(*) AS n FROM information_schema.innodb_lock_waits \
                 WHERE CAST(blocking_trx_id AS SIGNED) = ?"
            } else {
                "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))"
            };
            let blocked = diesel::sql_query(waiting)
                .bind::<BigInt, _>(pid)
                .get_result::<Count>(&mut *observer)
                .unwrap()
                .n;
            if blocked > 0 {
                return;
            }
            if Instant::now() >= deadline {
                let _ = self.conn.batch_execute("ROLLBACK");
                panic!("the command never reached its insert");
            }
            // InnoDB refreshes its lock tables only when they were not read
            // for 100 ms.
            std::thread::sleep(Duration::from_millis(if mysql { 150 } else { 10 }));
        }
    }

    fn commit(mut self) {
        self.conn.batch_execute("COMMIT").unwrap();
    }
}

/// Another writer takes version 2 between the command's load and its append.
/// With retries the command is decided again on the new state (and refused,
/// since the book is now taken); without retries it fails with a conflict.
/// On SQLite the command's insert waits for the open writer's lock, then
/// finds the stream moved on, like elsewhere.
///
/// SQLite shows no lock waits: there the writer commits once the command
/// has opened its `es.append` span (it has loaded and decided).
/// Sets the flag of the thread a span `es.append` opens on, if it has one
/// (see [`watch_appends`]).
struct AppendStarted;

fn append_flags() -> &'static Mutex<HashMap<std::thread::ThreadId, Arc<AtomicBool>>> {
    static FLAGS: OnceLock<Mutex<HashMap<std::thread::ThreadId, Arc<AtomicBool>>>> =
        OnceLock::new();
    FLAGS.get_or_init(Default::default)
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AppendStarted {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "es.append" {
            let flags = append_flags().lock().unwrap();
            if let Some(flag) = flags.get(&std::thread::current().id()) {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Sets `flag` when the calling thread opens a span `es.append`. The layer
/// is the process's global subscriber, installed once: a subscriber scoped
/// to the thread (`with_default`) was seen to miss the span when tests ran
/// at the same time (tracing caches each callsite's interest and the
/// highest enabled level for all threads, computed from the subscribers
/// registered at that moment).
fn watch_appends(flag: Arc<AtomicBool>) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(AppendStarted))
            .expect("no other global subscriber in this test binary");
    });
    append_flags()
        .lock()
        .unwrap()
        .insert(std::thread::current().id(), flag);
}

fn race(
    db: &TestDatabase,
    max_retries: u32,
) -> Result<es_diesel::Executed<Book>, ExecuteError<LibraryError>> {
    let store = db.store();
    register_book(&store, "b1", "Dune");
    register_user(&store, "bob");
    let mut writer = OpenWriter::begin(&store, "ann");
    let appending = Arc::new(AtomicBool::new(false));
    let command = {
        let store = store.clone();
        let appending = appending.clone();
        std::thread::spawn(move || {
            watch_appends(appending);
            borrow(
                &store,
                "b1",
                "bob",
                &ExecuteOptions::default().max_retries(max_retries),
            )
        })
    };
    match db.backend() {
        Backend::Postgres | Backend::Mysql => writer.wait_until_blocking(&store),
        Backend::Sqlite => {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !appending.load(Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "the command never reached its append"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    writer.commit();
    let result = command.join().unwrap();
    assert_eq!(
        book_events(&store, "b1"),
        vec![registered("b1"), borrowed("b1", "ann")]
    );
    result
}

#[test]
fn a_lost_race_is_decided_again_on_the_new_state() {
    for db in TestDatabase::all() {
        let err = domain(race(&db, 3));
        assert_eq!(
            err,
            LibraryError::AlreadyBorrowed {
                book_id: "b1".into(),
                holder: "ann".into()
            }
        );
    }
}

#[test]
fn retries_are_bounded() {
    for db in TestDatabase::all() {
        match (db.backend(), race(&db, 0)) {
            (
                _,
                Err(ExecuteError::Store(Error::Conflict {
                    stream,
                    expected,
                    actual,
                })),
            ) => {
                assert_eq!(stream, "book-b1");
                assert_eq!(expected, ExpectedVersion::Exact(1));
                assert_eq!(actual, 2);
            }
            (backend, other) => panic!("{backend}: unexpected {other:?}"),
        }
    }
}

/// Commands on four books at once while a follower reads the log: the
/// follower sees every event exactly once, each stream's in version order.
/// (On MySQL a command appended without a transaction once let a later
/// position commit before an earlier one, and followers skipped it.)
#[test]
fn concurrent_commands_are_followed_without_gaps() {
    const THREADS: usize = 4;
    const CYCLES: usize = 40;
    for db in TestDatabase::all() {
        let store = db.store();
        for t in 0..THREADS {
            register_book(&store, &format!("b{t}"), "Dune");
            register_user(&store, &format!("u{t}"));
        }
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let follower = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut conn = store.connection().unwrap();
                let mut cp = es_diesel::follow::Checkpoint::default();
                let mut seen = Vec::new();
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let page = es_diesel::follow::read_after(&mut conn, cp, None, 50).unwrap();
                    for f in &page {
                        seen.push((
                            f.event.global_position,
                            f.event.stream_id.clone(),
                            f.event.stream_version,
                        ));
                        cp = f.checkpoint;
                    }
                    if finished && page.is_empty() {
                        return seen;
                    }
                }
            })
        };
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let (book, user) = (format!("b{t}"), format!("u{t}"));
                    for _ in 0..CYCLES {
                        borrow(&store, &book, &user, &ExecuteOptions::default()).unwrap();
                        give_back(&store, &book, &user).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        // Every command has committed: the follower's last empty page comes
        // after all of them.
        let head = store.head().unwrap();
        done.store(true, Ordering::SeqCst);
        let seen = follower.join().unwrap();
        let all: Vec<i64> = store
            .read_all(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.global_position)
            .collect();
        assert_eq!(all.last().copied(), Some(head));
        let mut last = std::collections::HashMap::new();
        for (position, stream, version) in &seen {
            let before = last.insert(stream.clone(), *version).unwrap_or(0);
            assert_eq!(
                *version,
                before + 1,
                "{}: {stream} at {position}",
                db.backend()
            );
        }
        let mut positions: Vec<i64> = seen.iter().map(|(p, _, _)| *p).collect();
        positions.sort_unstable();
        assert_eq!(
            positions,
            all,
            "{}: the follower saw every event once",
            db.backend()
        );
    }
}
