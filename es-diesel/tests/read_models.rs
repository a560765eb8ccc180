//! Read models and inline projectors on a small library domain, on every
//! backend: inline projection, rollback on a failing projector, rebuild
//! equality on a 10,000-event history, fingerprint-triggered rebuilds.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{
    check_projectors, registered_projectors, Error, EventStore, ExpectedVersion, ProjectorStyle,
    ReadModel, RebuildOptions, SqliteSync, StoreOptions, StreamWrite,
};
use std::time::Instant;

mod events {
    use es_diesel::Event;
    use serde::{Deserialize, Serialize};

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    pub struct BookRegistered {
        pub book_id: i64,
        pub title: String,
        pub author: String,
        pub isbn: uuid::Uuid,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    pub struct BookBorrowed {
        pub book_id: i64,
        pub user: String,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    pub struct BookReturned {
        pub book_id: i64,
        pub user: String,
        pub late_days: i32,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false)]
    pub struct BookRemoved {
        pub book_id: i64,
    }

    /// The loan events, for projectors handling both.
    #[derive(Event, Debug, Clone, PartialEq)]
    pub enum LoanEvent {
        BookBorrowed(BookBorrowed),
        BookReturned(BookReturned),
    }
}

mod models {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    use es_diesel::ReadModel;

    /// One row per book: every supported column type appears here.
    #[derive(ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "book_list", primary_key = book_id, index(author), unique_index(isbn))]
    pub struct BookList {
        pub book_id: i64,
        pub title: String,
        pub author: String,
        pub isbn: uuid::Uuid,
        pub borrower: Option<String>,
        pub times_borrowed: i32,
        pub late_days: i64,
        pub copies: i16,
        pub available: bool,
        pub updated_at: DateTime<Utc>,
        pub registered_on: NaiveDate,
        pub last_borrowed_at: Option<NaiveDateTime>,
        pub recent_borrowers: serde_json::Value,
        pub late_ratio: Option<f64>,
        pub cover: Option<Vec<u8>>,
    }

    /// Composite key, row-level.
    #[derive(ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "user_loans", primary_key(user_name, book_id))]
    pub struct UserLoans {
        pub user_name: String,
        pub book_id: i64,
        pub times: i32,
        pub out: bool,
    }

    /// SQL-level.
    #[derive(ReadModel, Debug, Clone, PartialEq)]
    #[read_model(table = "active_loans", primary_key = book_id, index(user_name))]
    pub struct ActiveLoan {
        pub book_id: i64,
        pub user_name: String,
        pub since: NaiveDateTime,
        pub position: i64,
    }
}

/// Row-level projectors (the Django way: load, change, save).
mod row_projectors {
    use crate::events::*;
    use crate::models::{BookList, UserLoans};
    use es_diesel::{projector, Recorded};

    #[projector(on = BookRegistered, read_model = BookList, key = book_id)]
    fn registered(e: &Recorded<BookRegistered>, row: &mut Option<BookList>) {
        *row = Some(BookList {
            book_id: e.book_id,
            title: e.title.clone(),
            author: e.author.clone(),
            isbn: e.isbn,
            borrower: None,
            times_borrowed: 0,
            late_days: 0,
            copies: 1,
            available: true,
            updated_at: e.created_at,
            registered_on: e.created_at.date_naive(),
            last_borrowed_at: None,
            recent_borrowers: serde_json::json!([]),
            late_ratio: None,
            cover: (e.book_id % 7 == 0).then(|| e.title.as_bytes().to_vec()),
        });
    }

    #[projector(on = [BookBorrowed, BookReturned], key = book_id)]
    fn loans(e: &Recorded<LoanEvent>, row: &mut Option<BookList>) -> Result<(), String> {
        let book = row
            .as_mut()
            .ok_or_else(|| format!("book {} is not registered", e.stream_id))?;
        match &e.event {
            LoanEvent::BookBorrowed(b) => {
                book.borrower = Some(b.user.clone());
                book.available = false;
                book.times_borrowed += 1;
                book.last_borrowed_at = Some(e.created_at.naive_utc());
                let mut recent = book
                    .recent_borrowers
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                recent.insert(0, b.user.clone().into());
                recent.truncate(3);
                book.recent_borrowers = recent.into();
            }
            LoanEvent::BookReturned(r) => {
                book.borrower = None;
                book.available = true;
                book.late_days += i64::from(r.late_days);
                book.late_ratio = Some(book.late_days as f64 / f64::from(book.times_borrowed));
            }
        }
        book.updated_at = e.created_at;
        Ok(())
    }

    #[projector(on = BookRemoved, key = book_id)]
    fn removed(_e: &Recorded<BookRemoved>, row: &mut Option<BookList>) {
        *row = None;
    }

    #[projector(on = [BookBorrowed, BookReturned], key = (user, book_id))]
    fn user_loans(e: &Recorded<LoanEvent>, row: &mut Option<UserLoans>) {
        let (user_name, book_id) = match &e.event {
            LoanEvent::BookBorrowed(b) => (&b.user, b.book_id),
            LoanEvent::BookReturned(r) => (&r.user, r.book_id),
        };
        let loans = row.get_or_insert_with(|| UserLoans {
            user_name: user_name.clone(),
            book_id,
            times: 0,
            out: false,
        });
        match &e.event {
            LoanEvent::BookBorrowed(_) => {
                loans.times += 1;
                loans.out = true;
            }
            LoanEvent::BookReturned(_) => loans.out = false,
        }
        // A user who returned a book borrowed once is forgotten: deletes happen too.
        if !loans.out && loans.times == 1 {
            *row = None;
        }
    }
}

/// SQL-level projectors (full Diesel DSL on the append transaction).
mod sql_projectors {
    use crate::events::*;
    use crate::models::{active_loans, ActiveLoan};
    use diesel::prelude::*;
    use es_diesel::{projector, BoxError, DbConnection, Recorded};

    #[projector(on = [BookBorrowed, BookReturned], read_model = ActiveLoan)]
    fn active(e: &Recorded<LoanEvent>, conn: &mut DbConnection) -> Result<(), BoxError> {
        match &e.event {
            LoanEvent::BookBorrowed(b) => {
                if b.user == "mallory" {
                    return Err("mallory is banned from the library".into());
                }
                diesel::insert_into(active_loans::table)
                    .values(ActiveLoan {
                        book_id: b.book_id,
                        user_name: b.user.clone(),
                        since: e.created_at.naive_utc(),
                        position: e.global_position,
                    })
                    .execute(conn)?;
            }
            LoanEvent::BookReturned(r) => {
                diesel::delete(active_loans::table.find(r.book_id)).execute(conn)?;
            }
        }
        Ok(())
    }

    #[projector(on = BookRemoved, read_model = ActiveLoan)]
    fn removed(e: &Recorded<BookRemoved>, conn: &mut DbConnection) -> QueryResult<()> {
        diesel::delete(active_loans::table.filter(active_loans::book_id.eq(e.book_id)))
            .execute(conn)?;
        Ok(())
    }
}

use events::*;
use models::*;

fn fast_store(db: &TestDatabase) -> EventStore {
    db.store_with(StoreOptions {
        sqlite_sync: SqliteSync::Off,
        ..StoreOptions::default()
    })
}

fn book_list(store: &EventStore) -> Vec<BookList> {
    let mut conn = store.connection().unwrap();
    book_list::table
        .order(book_list::book_id)
        .load(&mut *conn)
        .unwrap()
}

fn user_loans(store: &EventStore) -> Vec<UserLoans> {
    let mut conn = store.connection().unwrap();
    user_loans::table
        .order((user_loans::user_name, user_loans::book_id))
        .load(&mut *conn)
        .unwrap()
}

fn active_loans(store: &EventStore) -> Vec<ActiveLoan> {
    let mut conn = store.connection().unwrap();
    active_loans::table
        .order(active_loans::book_id)
        .load(&mut *conn)
        .unwrap()
}

fn register(store: &EventStore, book_id: i64, title: &str) {
    let isbn = uuid::Uuid::from_u128(0x1000 + book_id as u128);
    store
        .append(
            &format!("book-{book_id}"),
            ExpectedVersion::NoStream,
            [BookRegistered {
                book_id,
                title: title.into(),
                author: "Herbert".into(),
                isbn,
            }],
        )
        .unwrap();
}

#[test]
fn projectors_are_registered_sorted_per_read_model() {
    let all = registered_projectors().unwrap();
    let names: Vec<&str> = all.iter().map(|p| p.name).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    let of = |table: &str| -> Vec<(&str, ProjectorStyle, Vec<&str>)> {
        all.iter()
            .filter(|p| p.read_model == table)
            .map(|p| (p.name, p.style, p.event_types.clone()))
            .collect()
    };
    assert_eq!(
        of("book_list"),
        vec![
            (
                "read_models::row_projectors::loans",
                ProjectorStyle::Row,
                vec!["BookBorrowed", "BookReturned"]
            ),
            (
                "read_models::row_projectors::registered",
                ProjectorStyle::Row,
                vec!["BookRegistered"]
            ),
            (
                "read_models::row_projectors::removed",
                ProjectorStyle::Row,
                vec!["BookRemoved"]
            ),
        ]
    );
    assert_eq!(
        of("active_loans"),
        vec![
            (
                "read_models::sql_projectors::active",
                ProjectorStyle::Sql,
                vec!["BookBorrowed", "BookReturned"]
            ),
            (
                "read_models::sql_projectors::removed",
                ProjectorStyle::Sql,
                vec!["BookRemoved"]
            ),
        ]
    );
    check_projectors(&[
        (
            "book_list",
            &[
                "BookRegistered",
                "BookBorrowed",
                "BookReturned",
                "BookRemoved",
            ],
        ),
        (
            "active_loans",
            &["BookBorrowed", "BookReturned", "BookRemoved"],
        ),
    ])
    .unwrap();
    match check_projectors(&[
        ("book_list", &["BookRegistered", "BookLost"]),
        ("nowhere", &["BookBorrowed"]),
    ]) {
        Err(Error::MissingProjectors {
            missing,
            registered,
        }) => {
            assert_eq!(
                missing,
                vec![
                    ("book_list".to_owned(), "BookLost".to_owned()),
                    ("nowhere".to_owned(), "BookBorrowed".to_owned())
                ]
            );
            assert_eq!(registered.len(), all.len());
        }
        other => panic!("expected MissingProjectors, got {other:?}"),
    }
}

#[test]
fn generated_ddl_per_backend() {
    let s = <BookList as ReadModel>::SCHEMA;
    assert_eq!(s.name, "book_list");
    assert_eq!(s.columns, 15);
    assert_eq!(
        s.postgres[0],
        "CREATE TABLE \"book_list\" (\"book_id\" BIGINT NOT NULL, \"title\" TEXT NOT NULL, \"author\" TEXT NOT NULL, \
         \"isbn\" TEXT NOT NULL, \"borrower\" TEXT, \"times_borrowed\" INTEGER NOT NULL, \"late_days\" BIGINT NOT NULL, \
         \"copies\" SMALLINT NOT NULL, \"available\" BOOLEAN NOT NULL, \"updated_at\" TIMESTAMP NOT NULL, \
         \"registered_on\" DATE NOT NULL, \"last_borrowed_at\" TIMESTAMP, \"recent_borrowers\" TEXT NOT NULL, \
         \"late_ratio\" DOUBLE PRECISION, \"cover\" BYTEA, PRIMARY KEY (\"book_id\"))"
    );
    assert!(s.sqlite[0].contains("\"late_ratio\" DOUBLE, \"cover\" BLOB"));
    assert_eq!(
        s.postgres[1],
        "CREATE INDEX \"book_list_author_idx\" ON \"book_list\" (\"author\")"
    );
    assert_eq!(
        s.postgres[2],
        "CREATE UNIQUE INDEX \"book_list_isbn_key\" ON \"book_list\" (\"isbn\")"
    );
    assert!(<UserLoans as ReadModel>::SCHEMA.sqlite[0]
        .ends_with("PRIMARY KEY (\"user_name\", \"book_id\"))"));
    assert_ne!(
        s.fingerprint(es_diesel::Backend::Sqlite),
        <UserLoans as ReadModel>::SCHEMA.fingerprint(es_diesel::Backend::Sqlite)
    );
}

#[test]
fn inline_projectors_run_in_the_append_transaction() {
    for db in TestDatabase::all() {
        let store = db.store();
        register(&store, 1, "Dune");
        register(&store, 2, "Emma");
        let borrowed = store
            .append(
                "book-1",
                ExpectedVersion::Exact(1),
                [BookBorrowed {
                    book_id: 1,
                    user: "ada".into(),
                }],
            )
            .unwrap();
        let books = book_list(&store);
        assert_eq!(books.len(), 2, "{}", db.backend());
        assert_eq!(books[0].borrower.as_deref(), Some("ada"));
        assert_eq!(books[0].times_borrowed, 1);
        assert!(!books[0].available);
        assert_eq!(books[0].recent_borrowers, serde_json::json!(["ada"]));
        assert_eq!(books[0].updated_at, borrowed[0].created_at);
        assert_eq!(
            books[0].last_borrowed_at,
            Some(borrowed[0].created_at.naive_utc())
        );
        assert_eq!(books[0].isbn, uuid::Uuid::from_u128(0x1001));
        assert_eq!(books[1].borrower, None);
        let active = active_loans(&store);
        assert_eq!(active.len(), 1);
        assert_eq!(
            (active[0].book_id, active[0].user_name.as_str()),
            (1, "ada")
        );
        assert_eq!(active[0].position, borrowed[0].global_position);
        assert_eq!(
            user_loans(&store),
            vec![UserLoans {
                user_name: "ada".into(),
                book_id: 1,
                times: 1,
                out: true
            }]
        );

        store
            .append(
                "book-1",
                ExpectedVersion::Exact(2),
                [BookReturned {
                    book_id: 1,
                    user: "ada".into(),
                    late_days: 3,
                }],
            )
            .unwrap();
        let books = book_list(&store);
        assert_eq!(
            (
                books[0].borrower.as_deref(),
                books[0].late_days,
                books[0].late_ratio
            ),
            (None, 3, Some(3.0))
        );
        assert!(active_loans(&store).is_empty());
        assert!(
            user_loans(&store).is_empty(),
            "a single loan, returned, deletes the row"
        );

        store
            .append(
                "book-2",
                ExpectedVersion::Exact(1),
                [BookRemoved { book_id: 2 }],
            )
            .unwrap();
        assert_eq!(
            book_list(&store)
                .iter()
                .map(|b| b.book_id)
                .collect::<Vec<_>>(),
            vec![1]
        );
    }
}

#[test]
fn a_failing_projector_rolls_the_append_back() {
    for db in TestDatabase::all() {
        let store = db.store();
        register(&store, 1, "Dune");
        let head = store.head().unwrap();
        let before = book_list(&store);

        // `loans` (book_list) runs before `active` (active_loans) fails.
        let err = store
            .append(
                "book-1",
                ExpectedVersion::Exact(1),
                [BookBorrowed {
                    book_id: 1,
                    user: "mallory".into(),
                }],
            )
            .unwrap_err();
        match &err {
            Error::Projector {
                projector,
                position,
                stream,
                event_type,
                source,
            } => {
                assert_eq!(projector, "read_models::sql_projectors::active");
                assert_eq!(stream, "book-1");
                assert_eq!(event_type, "BookBorrowed");
                assert!(*position > head);
                assert_eq!(source.to_string(), "mallory is banned from the library");
            }
            other => panic!("expected a projector error, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("read_models::sql_projectors::active") && msg.contains("BookBorrowed"),
            "{msg}"
        );
        assert_eq!(
            store.head().unwrap(),
            head,
            "no event written on {}",
            db.backend()
        );
        assert_eq!(store.stream_version("book-1").unwrap(), 1);
        assert_eq!(
            book_list(&store),
            before,
            "no row changed on {}",
            db.backend()
        );
        assert!(active_loans(&store).is_empty());
        assert!(user_loans(&store).is_empty());

        // A row-level projector's error rolls back the same way: book 9 is not registered.
        let err = store
            .append(
                "book-9",
                ExpectedVersion::NoStream,
                [BookBorrowed {
                    book_id: 9,
                    user: "ada".into(),
                }],
            )
            .unwrap_err();
        match &err {
            Error::Projector {
                projector, source, ..
            } => {
                assert_eq!(projector, "read_models::row_projectors::loans");
                assert_eq!(source.to_string(), "book book-9 is not registered");
            }
            other => panic!("expected a projector error, got {other:?}"),
        }
        assert_eq!(store.head().unwrap(), head);
        assert_eq!(store.stream_version("book-9").unwrap(), 0);

        // The store is still usable afterwards.
        store
            .append(
                "book-1",
                ExpectedVersion::Exact(1),
                [BookBorrowed {
                    book_id: 1,
                    user: "ada".into(),
                }],
            )
            .unwrap();
        assert_eq!(active_loans(&store).len(), 1);
    }
}

/// A deterministic library history: books registered, borrowed, returned
/// and removed by a small pseudo-random generator.
fn library_history(store: &EventStore, total: usize) {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    const BOOKS: i64 = 400;
    let users: Vec<String> = (0..60).map(|u| format!("user-{u:02}")).collect();
    let mut borrower: Vec<Option<String>> = vec![None; BOOKS as usize + 1];
    let mut removed = vec![false; BOOKS as usize + 1];
    let mut written = 0;
    let mut batch: Vec<StreamWrite> = Vec::new();
    let flush = |batch: &mut Vec<StreamWrite>| {
        if !batch.is_empty() {
            store.append_streams(batch).unwrap();
            batch.clear();
        }
    };
    for book_id in 1..=BOOKS {
        let mut w = StreamWrite::new(format!("book-{book_id}"), ExpectedVersion::NoStream);
        w.push(&BookRegistered {
            book_id,
            title: format!("Book {book_id}"),
            author: format!("Author {}", book_id % 37),
            isbn: uuid::Uuid::from_u128(0xb00c_0000 + book_id as u128),
        })
        .unwrap();
        batch.push(w);
        written += 1;
        if batch.len() == 200 {
            flush(&mut batch);
        }
    }
    flush(&mut batch);
    while written < total {
        let book_id = 1 + rand(BOOKS as u64) as i64;
        let i = book_id as usize;
        if removed[i] {
            continue;
        }
        let mut w = StreamWrite::new(format!("book-{book_id}"), ExpectedVersion::Any);
        match borrower[i].take() {
            Some(user) => {
                w.push(&BookReturned {
                    book_id,
                    user,
                    late_days: rand(5) as i32,
                })
                .unwrap();
            }
            None if rand(1000) < 3 => {
                w.push(&BookRemoved { book_id }).unwrap();
                removed[i] = true;
            }
            None => {
                let user = users[rand(users.len() as u64) as usize].clone();
                w.push(&BookBorrowed {
                    book_id,
                    user: user.clone(),
                })
                .unwrap();
                borrower[i] = Some(user);
            }
        }
        batch.push(w);
        written += 1;
        if batch.len() == 100 {
            flush(&mut batch);
        }
    }
    flush(&mut batch);
}

#[test]
fn rebuild_equals_inline_on_a_10000_event_history() {
    for db in TestDatabase::all() {
        let store = fast_store(&db);
        let started = Instant::now();
        library_history(&store, 10_000);
        let inline_time = started.elapsed();
        assert_eq!(store.head().unwrap(), 10_000);
        let (books, loans, active) = (book_list(&store), user_loans(&store), active_loans(&store));
        assert!(books.len() > 300 && !loans.is_empty() && !active.is_empty());
        assert!(books
            .iter()
            .any(|b| b.late_ratio.is_some() && b.cover.is_some()));

        let started = Instant::now();
        let report = store.rebuild("book_list").unwrap();
        let rebuild_time = started.elapsed();
        assert_eq!(report.events, 10_000, "book_list handles every event type");
        assert_eq!(report.rows, books.len() as i64);
        assert_eq!(
            book_list(&store),
            books,
            "rebuilt book_list equals the inline one on {}",
            db.backend()
        );

        let mut steps = Vec::new();
        let report = store
            .rebuild_with(
                "user_loans",
                &RebuildOptions {
                    batch_size: 333,
                    max_rows_in_memory: 37,
                },
                |p| steps.push(p.clone()),
            )
            .unwrap();
        assert_eq!(
            user_loans(&store),
            loans,
            "rebuilt user_loans equals the inline one on {}",
            db.backend()
        );
        let loan_events =
            10_000 - 400 - store.read_types(&["BookRemoved"], 0, 10_000).unwrap().len() as u64;
        assert_eq!(report.events, loan_events);
        assert_eq!(steps.len() as u64, loan_events.div_ceil(333));
        assert!(steps
            .windows(2)
            .all(|w| w[0].position < w[1].position && w[0].events < w[1].events));
        let last = steps.last().unwrap();
        assert_eq!(
            (last.events, last.head, last.read_model),
            (loan_events, 10_000, "user_loans")
        );

        store
            .rebuild_with(
                "active_loans",
                &RebuildOptions {
                    batch_size: 1000,
                    ..Default::default()
                },
                |_| {},
            )
            .unwrap();
        assert_eq!(
            active_loans(&store),
            active,
            "rebuilt active_loans equals the inline one on {}",
            db.backend()
        );

        eprintln!(
            "{}: 10,000 events appended with inline projectors in {inline_time:?}; book_list rebuilt in {rebuild_time:?}",
            db.backend()
        );
    }
}

/// The plan of a page of a rebuild of `book_list` (every event type after
/// the start, as the follow order reads it).
fn page_plan(conn: &mut PgConnection) -> String {
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    diesel::sql_query(
        "EXPLAIN SELECT global_position FROM es_events \
         WHERE (order_key, global_position) > (0, 0) AND order_key < 9223372036854775807 \
           AND event_type = ANY('{BookRegistered,BookBorrowed,BookReturned,BookRemoved}') \
         ORDER BY order_key, global_position LIMIT 5000",
    )
    .load::<Line>(conn)
    .unwrap()
    .into_iter()
    .map(|l| l.line)
    .collect::<Vec<_>>()
    .join("\n")
}

/// A log written just before a rebuild has no statistics yet (autovacuum
/// has not come by): without them PostgreSQL reads each page of several
/// event types through a bitmap of every later match and a sort, so each
/// batch reads the rest of the log. The rebuild samples the columns its
/// page depends on first, without waiting for the counts of changes that
/// reach the statistics views up to a second after a commit.
#[test]
fn a_rebuild_on_postgres_samples_a_log_without_statistics() {
    use diesel::connection::SimpleConnection;
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = fast_store(&db);
    library_history(&store, 3_000);
    let books = book_list(&store);
    let mut conn = PgConnection::establish(db.url()).unwrap();
    let forget = "DELETE FROM pg_statistic WHERE starelid = 'es_events'::regclass; \
                  UPDATE pg_class SET reltuples = -1, relpages = 0 WHERE oid = 'es_events'::regclass";
    conn.batch_execute(forget).unwrap();
    let before = page_plan(&mut conn);
    assert!(
        !before.contains("Index Scan using es_events_follow"),
        "without statistics the page is not read in index order:\n{before}"
    );
    let report = store.rebuild("book_list").unwrap();
    assert_eq!(report.events, 3_000);
    assert_eq!(book_list(&store), books);
    let after = page_plan(&mut conn);
    assert!(
        after.contains("Index Scan using es_events_follow") && !after.contains("Sort"),
        "after the rebuild's sample the page is read in index order:\n{after}"
    );
}

/// `ReadModel::update` writes every non-key column, `None` as NULL and back,
/// touches only the row of its key (composite keys too), and its statement
/// is prepared once per connection whatever the values (on PostgreSQL,
/// where the server lists a session's prepared statements).
#[test]
fn a_row_update_writes_every_column_and_is_prepared_once() {
    for db in TestDatabase::all() {
        let store = fast_store(&db);
        store.migrate().unwrap();
        register(&store, 1, "Dune");
        register(&store, 2, "Emma");
        let original = book_list(&store);
        let mut conn = store.connection().unwrap();
        let mut row = original[0].clone();
        for round in 0..4 {
            let set = round % 2 == 0;
            row.borrower = set.then(|| format!("reader-{round}"));
            row.late_ratio = set.then_some(0.25 * f64::from(round));
            row.cover = set.then(|| vec![0, 159, 146, 150, round]);
            row.last_borrowed_at = set.then(|| {
                NaiveDate::from_ymd_opt(2024, 2, 29)
                    .unwrap()
                    .and_hms_micro_opt(23, 59, 58, 123_456)
                    .unwrap()
            });
            row.times_borrowed = i32::from(round) + 1;
            row.recent_borrowers = serde_json::json!({ "round": round, "ünïcode": "✓" });
            assert_eq!(BookList::update(&mut conn, &row).unwrap(), 1);
            let now = book_list(&store);
            assert_eq!(now[0], row, "round {round} on {}", db.backend());
            assert_eq!(now[1], original[1], "the other row is untouched");
        }
        let loan = |user: &str, book_id: i64, times: i32| UserLoans {
            user_name: user.into(),
            book_id,
            times,
            out: times % 2 == 1,
        };
        UserLoans::insert_many(
            &mut conn,
            &[loan("ann", 1, 1), loan("ann", 2, 1), loan("bob", 1, 1)],
        )
        .unwrap();
        assert_eq!(UserLoans::update(&mut conn, &loan("ann", 2, 4)).unwrap(), 1);
        assert_eq!(UserLoans::update(&mut conn, &loan("cid", 2, 4)).unwrap(), 0);
        assert_eq!(
            user_loans(&store),
            vec![loan("ann", 1, 1), loan("ann", 2, 4), loan("bob", 1, 1)]
        );
        if let es_diesel::DbConnection::Postgres(pg) = &mut *conn {
            #[derive(QueryableByName)]
            struct Prepared {
                #[diesel(sql_type = diesel::sql_types::Text)]
                statement: String,
            }
            let updates: Vec<String> =
                diesel::sql_query("SELECT statement FROM pg_prepared_statements")
                    .load::<Prepared>(pg)
                    .unwrap()
                    .into_iter()
                    .map(|p| p.statement)
                    .filter(|s| s.starts_with("UPDATE"))
                    .collect();
            assert_eq!(
                updates.len(),
                2,
                "one prepared UPDATE per read model: {updates:#?}"
            );
        }
    }
}

#[test]
fn rebuild_of_an_unknown_read_model_names_the_known_ones() {
    let db = TestDatabase::sqlite();
    let store = db.store();
    match store.rebuild("books") {
        Err(Error::UnknownReadModel { name, known }) => {
            assert_eq!(name, "books");
            assert_eq!(known, vec!["active_loans", "book_list", "user_loans"]);
        }
        other => panic!("expected UnknownReadModel, got {other:?}"),
    }
}

#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = diesel::sql_types::Text)]
    fingerprint: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    rebuilt: Option<String>,
}

fn stored(store: &EventStore, name: &str) -> Stored {
    let mut conn = store.connection().unwrap();
    let text = match conn.backend() {
        es_diesel::Backend::Mysql => "CHAR",
        _ => "TEXT",
    };
    diesel::sql_query(format!(
        "SELECT fingerprint, CAST(rebuilt_at AS {text}) AS rebuilt FROM es_read_models WHERE name = '{name}'"
    ))
    .get_result(&mut *conn)
    .unwrap()
}

#[test]
fn a_changed_shape_is_dropped_and_rebuilt_by_migrate() {
    for db in TestDatabase::all() {
        let store = fast_store(&db);
        library_history(&store, 1_000);
        let expected = book_list(&store);
        let fingerprint = <BookList as ReadModel>::SCHEMA.fingerprint(db.backend());
        assert_eq!(stored(&store, "book_list").fingerprint, fingerprint);

        // Unchanged shape: migrate keeps the table as it is (even a row no projector wrote).
        {
            let mut conn = store.connection().unwrap();
            diesel::sql_query("DELETE FROM book_list WHERE book_id = 1")
                .execute(&mut *conn)
                .unwrap();
        }
        store.migrate().unwrap();
        assert_eq!(
            book_list(&store).len(),
            expected.len() - 1,
            "no rebuild without a shape change"
        );

        // An older version of the struct: other columns, another fingerprint.
        {
            let mut conn = store.connection().unwrap();
            let conn = &mut *conn;
            diesel::sql_query("DROP TABLE book_list")
                .execute(conn)
                .unwrap();
            diesel::sql_query("CREATE TABLE book_list (book_id BIGINT PRIMARY KEY, title TEXT, stale_column TEXT)")
                .execute(conn)
                .unwrap();
            diesel::sql_query("INSERT INTO book_list VALUES (999, 'junk', 'stale')")
                .execute(conn)
                .unwrap();
            diesel::sql_query("UPDATE es_read_models SET fingerprint = 'v1-0000000000000000', rebuilt_at = NULL WHERE name = 'book_list'")
                .execute(conn)
                .unwrap();
        }
        store.migrate().unwrap();
        assert_eq!(
            book_list(&store),
            expected,
            "rebuilt from the log on {}",
            db.backend()
        );
        let after = stored(&store, "book_list");
        assert_eq!(after.fingerprint, fingerprint);
        assert!(after.rebuilt.is_some());
        let mut conn = store.connection().unwrap();
        let stale = diesel::sql_query("SELECT stale_column FROM book_list").execute(&mut *conn);
        assert!(stale.is_err(), "the stale column is gone");
    }
}

#[test]
fn migrate_builds_a_new_read_model_from_an_existing_log() {
    for db in TestDatabase::all() {
        let store = fast_store(&db);
        library_history(&store, 600);
        let expected = active_loans(&store);
        assert!(!expected.is_empty());
        {
            // As if `active_loans` were added to an app that already has events.
            let mut conn = store.connection().unwrap();
            diesel::sql_query("DROP TABLE active_loans")
                .execute(&mut *conn)
                .unwrap();
            diesel::sql_query("DELETE FROM es_read_models WHERE name = 'active_loans'")
                .execute(&mut *conn)
                .unwrap();
        }
        store.migrate().unwrap();
        assert_eq!(active_loans(&store), expected);
    }
}

#[test]
fn typed_queries_on_the_generated_table() {
    for db in TestDatabase::all() {
        let store = db.store();
        register(&store, 1, "Dune");
        register(&store, 2, "Emma");
        let mut conn = store.connection().unwrap();
        let conn = &mut *conn;
        let titles: Vec<String> = book_list::table
            .filter(book_list::author.eq("Herbert"))
            .filter(book_list::isbn.eq(uuid::Uuid::from_u128(0x1002).to_string()))
            .select(book_list::title)
            .load(conn)
            .unwrap();
        assert_eq!(titles, vec!["Emma"]);
        let selected: Vec<BookList> = book_list::table
            .select(BookList::as_select())
            .order(book_list::book_id.desc())
            .load(conn)
            .unwrap();
        assert_eq!(selected[0].book_id, 2);
        let changed = diesel::update(book_list::table.find(2))
            .set(BookList {
                title: "Emma (2nd ed.)".into(),
                ..selected[0].clone()
            })
            .execute(conn)
            .unwrap();
        assert_eq!(changed, 1);
        let now: DateTime<Utc> = Utc::now();
        let _: (NaiveDate, NaiveDateTime) = (now.date_naive(), now.naive_utc());
    }
}
