//! Read models with `mode = async`: the same projector code as inline,
//! applied by runners after commit, and rebuilt blue/green.

use diesel::prelude::*;
use es_diesel::runner::{ProjectionMode, RunnerOptions};
use es_diesel::testing::TestDatabase;
use es_diesel::{projector, Event, EventStore, ExpectedVersion, ReadModel, Recorded, StreamWrite};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct BookRegistered {
    book_id: i64,
    title: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct BookBorrowed {
    book_id: i64,
    user_id: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct BookReturned {
    book_id: i64,
    user_id: i64,
}

#[derive(Event, Debug, Clone, PartialEq)]
#[allow(clippy::enum_variant_names)]
enum BookEvent {
    BookRegistered(BookRegistered),
    BookBorrowed(BookBorrowed),
    BookReturned(BookReturned),
}

/// Kept inline: the reference.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "shelf_inline", primary_key = book_id)]
struct ShelfInline {
    book_id: i64,
    title: String,
    borrowed_by: Option<i64>,
    times_borrowed: i32,
}

/// The same, kept by a runner.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "shelf_async", primary_key = book_id, index(borrowed_by), mode = async)]
struct ShelfAsync {
    book_id: i64,
    title: String,
    borrowed_by: Option<i64>,
    times_borrowed: i32,
}

/// One row per borrowing, SQL-level, also async.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "loans_async", primary_key = position, mode = async)]
struct LoanAsync {
    position: i64,
    book_id: i64,
    user_id: i64,
}

/// The shelf after `e`: the logic both read models share.
fn next_shelf(row: Option<ShelfInline>, e: &BookEvent) -> Option<ShelfInline> {
    match e {
        BookEvent::BookRegistered(r) => Some(ShelfInline {
            book_id: r.book_id,
            title: r.title.clone(),
            borrowed_by: None,
            times_borrowed: 0,
        }),
        BookEvent::BookBorrowed(b) => row.map(|r| ShelfInline {
            borrowed_by: Some(b.user_id),
            times_borrowed: r.times_borrowed + 1,
            ..r
        }),
        BookEvent::BookReturned(_) => row.map(|r| ShelfInline {
            borrowed_by: None,
            ..r
        }),
    }
}

impl From<ShelfAsync> for ShelfInline {
    fn from(r: ShelfAsync) -> Self {
        ShelfInline {
            book_id: r.book_id,
            title: r.title,
            borrowed_by: r.borrowed_by,
            times_borrowed: r.times_borrowed,
        }
    }
}

impl From<ShelfInline> for ShelfAsync {
    fn from(r: ShelfInline) -> Self {
        ShelfAsync {
            book_id: r.book_id,
            title: r.title,
            borrowed_by: r.borrowed_by,
            times_borrowed: r.times_borrowed,
        }
    }
}

#[projector(on = [BookRegistered, BookBorrowed, BookReturned], key = book_id)]
fn shelf_inline(e: &Recorded<BookEvent>, row: &mut Option<ShelfInline>) {
    *row = next_shelf(row.take(), &e.event);
}

#[projector(on = [BookRegistered, BookBorrowed, BookReturned], key = book_id)]
fn shelf_async(e: &Recorded<BookEvent>, row: &mut Option<ShelfAsync>) {
    *row = next_shelf(row.take().map(Into::into), &e.event).map(Into::into);
}

#[projector(on = BookBorrowed, read_model = LoanAsync)]
fn loan_async(e: &Recorded<BookBorrowed>, conn: &mut es_diesel::DbConnection) -> QueryResult<()> {
    diesel::insert_into(loans_async::table)
        .values(LoanAsync {
            position: e.global_position,
            book_id: e.book_id,
            user_id: e.user_id,
        })
        .execute(conn)?;
    Ok(())
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Fuse {
    n: i64,
}

/// Fuses that burnt, kept by a projector that panics on fuse 13 until defused.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "fuses_async", primary_key = n, mode = async)]
struct FuseAsync {
    n: i64,
}

static DEFUSED: AtomicBool = AtomicBool::new(false);

#[projector(on = Fuse, read_model = FuseAsync)]
fn burn_fuse(e: &Recorded<Fuse>, conn: &mut es_diesel::DbConnection) -> QueryResult<()> {
    diesel::insert_into(fuses_async::table)
        .values(FuseAsync { n: e.n })
        .execute(conn)?;
    if e.n == 13 && !DEFUSED.load(Ordering::SeqCst) {
        panic!("fuse {} blew", e.n);
    }
    Ok(())
}

fn options() -> RunnerOptions {
    RunnerOptions {
        batch_size: 250,
        idle_poll: Duration::from_millis(20),
        lease: Duration::from_secs(2),
        max_backoff: Duration::from_millis(200),
        node: "test".into(),
    }
}

/// Registers `books` books, then borrows or returns `n` times.
fn history(store: &EventStore, books: i64, n: u64, seed: u64) {
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for book_id in 1..=books {
        let stream = format!("book-{book_id}");
        if store.stream_version(&stream).unwrap() == 0 {
            store
                .append(
                    &stream,
                    ExpectedVersion::NoStream,
                    [BookRegistered {
                        book_id,
                        title: format!("Book {book_id}"),
                    }],
                )
                .unwrap();
        }
    }
    for _ in 0..n {
        let book_id = 1 + (next() % books as u64) as i64;
        let user_id = 1 + (next() % 20) as i64;
        let stream = format!("book-{book_id}");
        let events = store.load_stream::<BookEvent>(&stream).unwrap();
        let version = events.last().unwrap().stream_version;
        let borrowed = events.iter().fold(None, |b, e| match &e.event {
            BookEvent::BookBorrowed(x) => Some(x.user_id),
            BookEvent::BookReturned(_) => None,
            BookEvent::BookRegistered(_) => b,
        });
        let mut w = StreamWrite::new(stream, ExpectedVersion::Exact(version));
        match borrowed {
            None => w.push(&BookBorrowed { book_id, user_id }).unwrap(),
            Some(holder) => w
                .push(&BookReturned {
                    book_id,
                    user_id: holder,
                })
                .unwrap(),
        };
        store.append_streams(&[w]).unwrap();
    }
}

fn shelves(store: &EventStore) -> (Vec<ShelfInline>, Vec<ShelfInline>) {
    let mut conn = store.connection().unwrap();
    let inline: Vec<ShelfInline> = shelf_inline::table
        .order(shelf_inline::book_id)
        .load(&mut *conn)
        .unwrap();
    let asynchronous: Vec<ShelfInline> = shelf_async::table
        .order(shelf_async::book_id)
        .load::<ShelfAsync>(&mut *conn)
        .unwrap()
        .into_iter()
        .map(Into::into)
        .collect();
    (inline, asynchronous)
}

fn loans(store: &EventStore) -> i64 {
    loans_async::table
        .count()
        .get_result(&mut *store.connection().unwrap())
        .unwrap()
}

fn borrowed_events(store: &EventStore) -> i64 {
    store.iter_types(&["BookBorrowed"], 0, 1000).count() as i64
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn async_read_models_are_not_touched_inline_and_catch_up_through_runners() {
    for db in TestDatabase::all() {
        let store = db.store();
        history(&store, 30, 300, 7);
        let (inline, asynchronous) = shelves(&store);
        assert_eq!(inline.len(), 30);
        assert!(
            asynchronous.is_empty(),
            "{}: nothing inline for async read models",
            db.backend()
        );
        assert_eq!(loans(&store), 0);

        let runners = store.start_async_read_models(options()).unwrap();
        assert_eq!(runners.len(), 3);
        wait_until("catch-up", || {
            shelves(&store).1.len() == 30 && loans(&store) == borrowed_events(&store)
        });
        history(&store, 30, 200, 11);
        wait_until("new events", || {
            let (i, a) = shelves(&store);
            i == a && loans(&store) == borrowed_events(&store)
        });
        let status = store.projection_status().unwrap();
        let names: Vec<(&str, ProjectionMode)> =
            status.iter().map(|s| (s.name.as_str(), s.mode)).collect();
        assert_eq!(
            names,
            [
                ("fuses_async", ProjectionMode::Async),
                ("loans_async", ProjectionMode::Async),
                ("shelf_async", ProjectionMode::Async),
                ("shelf_inline", ProjectionMode::Inline)
            ]
        );
        // A loaded machine can keep a runner thread from renewing its lease
        // for a moment (it shows as `stale` then): wait for the settled state.
        wait_until("every async read model running and current", || {
            store
                .projection_status()
                .unwrap()
                .iter()
                .filter(|s| s.mode == ProjectionMode::Async)
                .all(|s| {
                    (s.state.as_str(), s.holder.as_deref(), s.lag) == ("running", Some("test"), 0)
                })
        });
        assert_eq!(status[3].state, "current");
        for r in runners {
            r.stop();
        }
    }
}

/// Readers never see a half-built model: the shadow is swapped in whole,
/// while appends and the runner go on.
#[test]
fn blue_green_rebuild_keeps_serving_the_old_table_until_the_swap() {
    for db in TestDatabase::all() {
        let store = db.store();
        history(&store, 40, 400, 3);
        let runners = store.start_async_read_models(options()).unwrap();
        wait_until("catch-up", || {
            let (i, a) = shelves(&store);
            i == a
        });

        let stop = Arc::new(AtomicBool::new(false));
        let min_seen = Arc::new(AtomicI64::new(i64::MAX));
        let reader = {
            let (store, stop, min_seen) = (store.clone(), stop.clone(), min_seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = shelf_async::table
                        .count()
                        .get_result(&mut *store.connection().unwrap())
                        .unwrap();
                    min_seen.fetch_min(n, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || history(&store, 40, 150, 99))
        };
        let mut steps = 0;
        let report = store
            .rebuild_with(
                "shelf_async",
                &es_diesel::RebuildOptions {
                    batch_size: 50,
                    ..Default::default()
                },
                |_| steps += 1,
            )
            .unwrap();
        writer.join().unwrap();
        assert!(steps > 3, "built in several batches");
        assert!(report.events > 0);
        wait_until("the runner after the swap", || {
            let (i, a) = shelves(&store);
            i == a
        });
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert_eq!(
            min_seen.load(Ordering::Relaxed),
            40,
            "{}: readers always saw every book",
            db.backend()
        );
        let status = store.projection_status().unwrap();
        let s = status.iter().find(|s| s.name == "shelf_async").unwrap();
        assert_ne!(s.state, "rebuilding");
        for r in runners {
            r.stop();
        }
        // A rebuild with no runner running gives the same table.
        store.rebuild("shelf_async").unwrap();
        let (i, a) = shelves(&store);
        assert_eq!(i, a);
    }
}

fn fuses(store: &EventStore) -> i64 {
    fuses_async::table
        .count()
        .get_result(&mut *store.connection().unwrap())
        .unwrap()
}

/// A read model's projector that panics stops the read model at that event,
/// named in the status, and the runner resumes once it no longer panics.
#[test]
fn a_panicking_projector_of_an_async_read_model_is_reported_by_name() {
    for db in TestDatabase::all() {
        DEFUSED.store(false, Ordering::SeqCst);
        let store = db.store();
        let mut position_13 = 0;
        for n in 0..20 {
            let recorded = store
                .append(
                    &format!("fuse-{n}"),
                    ExpectedVersion::NoStream,
                    [Fuse { n }],
                )
                .unwrap();
            if n == 13 {
                position_13 = recorded[0].global_position;
            }
        }
        let runners = store.start_async_read_models(options()).unwrap();
        let status = || {
            store
                .projection_status()
                .unwrap()
                .into_iter()
                .find(|s| s.name == "fuses_async")
                .unwrap()
        };
        wait_until("the failure in status", || status().state == "failed");
        let s = status();
        assert_eq!(s.failed_position, Some(position_13), "{}", db.backend());
        let error = s.last_error.unwrap();
        assert!(
            error.contains("burn_fuse") && error.contains("panicked: fuse 13 blew"),
            "{error}"
        );
        assert_eq!(fuses(&store), 13, "the fuses before 13 are kept");
        assert!(runners.iter().all(|r| r.is_running()));

        DEFUSED.store(true, Ordering::SeqCst);
        wait_until("recovery", || {
            fuses(&store) == 20 && status().state == "running"
        });
        assert_eq!(status().last_error, None);
        drop(runners);
    }
}
