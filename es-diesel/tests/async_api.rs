//! The async face (`tokio` feature): operations run on tokio's blocking
//! pool, so a busy store never starves the runtime.
#![cfg(feature = "tokio")]

mod common;

use common::*;
use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{projector, AsyncEventStore, ExpectedVersion, ReadModel, Recorded, StoreOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 200 concurrent commands from tasks on a two-thread runtime, sharing a
/// pool of two connections (each command's inline projector takes 3 ms),
/// while a timer task ticks every 5 ms: every command succeeds, and the
/// ticker is never held up for long. A store that blocked the worker
/// threads would park both of them on the database and on the pool, and
/// stop the ticker for most of the burst.
#[test]
fn two_hundred_concurrent_commands_do_not_starve_the_runtime() {
    for db in TestDatabase::all() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let store: AsyncEventStore = db
            .store_with(StoreOptions {
                pool_size: 2,
                ..StoreOptions::default()
            })
            .into_async();
        let started = Instant::now();
        let (longest_gap, ticks, results) = runtime.block_on(async {
            let stop = Arc::new(AtomicBool::new(false));
            let ticker = {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut longest = Duration::ZERO;
                    let mut ticks = 0u32;
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        longest = longest.max(last.elapsed());
                        last = Instant::now();
                        ticks += 1;
                    }
                    (longest, ticks)
                })
            };
            let commands: Vec<_> = (0..200)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .execute::<Book>(
                                format!("b{i}"),
                                BookCommand::Register {
                                    book_id: format!("b{i}"),
                                    title: "Dune".into(),
                                },
                            )
                            .await
                    })
                })
                .collect();
            let mut results = Vec::new();
            for c in commands {
                results.push(c.await.unwrap());
            }
            stop.store(true, Ordering::Relaxed);
            let (longest, ticks) = ticker.await.unwrap();
            (longest, ticks, results)
        });
        for r in &results {
            assert!(r.is_ok(), "{}: {r:?}", db.backend());
        }
        assert_eq!(
            runtime.block_on(store.read_all(0, 1000)).unwrap().len(),
            200
        );
        let elapsed = started.elapsed();
        eprintln!(
            "{}: 200 commands in {elapsed:?}; the 5 ms ticker ticked {ticks} times, longest gap {longest_gap:?}",
            db.backend()
        );
        assert!(ticks > 0);
        assert!(
            longest_gap < Duration::from_millis(150),
            "{}: the runtime was starved for {longest_gap:?}",
            db.backend()
        );
    }
}

/// A panic inside `run` reaches the awaiting task; errors come back typed.
#[test]
fn panics_and_errors_come_back_to_the_caller() {
    let db = TestDatabase::sqlite();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = db.store().into_async();
    runtime.block_on(async {
        let err = store
            .append(
                "s",
                ExpectedVersion::Exact(3),
                vec![BookRegistered {
                    book_id: "b".into(),
                    title: "t".into(),
                }],
            )
            .await
            .unwrap_err();
        assert!(err.is_conflict(), "{err}");
        let caught = tokio::spawn({
            let store = store.clone();
            async move { store.run(|_| panic!("boom")).await }
        })
        .await
        .unwrap_err();
        assert!(caught.is_panic());
    });
}

/// An inline read model whose projector takes 3 ms per book: each command
/// holds its connection for a while, as a real one with work to do would.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "slow_titles", primary_key = book_id)]
struct SlowTitle {
    book_id: String,
    title: String,
}

#[projector(on = BookRegistered, key = book_id)]
fn slow_title(e: &Recorded<BookRegistered>, row: &mut Option<SlowTitle>) {
    std::thread::sleep(Duration::from_millis(3));
    *row = Some(SlowTitle {
        book_id: e.book_id.clone(),
        title: e.title.clone(),
    });
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "async_titles", primary_key = book_id, mode = async)]
struct AsyncTitle {
    book_id: String,
    title: String,
}

#[projector(on = BookRegistered, key = book_id)]
fn async_title(e: &Recorded<BookRegistered>, row: &mut Option<AsyncTitle>) {
    *row = Some(AsyncTitle {
        book_id: e.book_id.clone(),
        title: e.title.clone(),
    });
}

/// Runners started from async code keep their read model current, then
/// stop on a signal and release their leases.
#[test]
fn runners_started_from_async_code_work_and_stop_on_a_signal() {
    let db = TestDatabase::sqlite();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = db.store().into_async();
    runtime.block_on(async {
        let runners = store
            .start_async_read_models(Default::default())
            .await
            .unwrap();
        assert_eq!(runners.names(), ["async_titles"]);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stopped = tokio::spawn(runners.run_until(async {
            let _ = rx.await;
        }));
        store
            .append(
                "book-1",
                ExpectedVersion::NoStream,
                vec![BookRegistered {
                    book_id: "b1".into(),
                    title: "Dune".into(),
                }],
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let titles = store
                .run(|s| {
                    async_titles::table
                        .select(async_titles::title)
                        .load::<String>(&mut *s.connection().unwrap())
                        .unwrap()
                })
                .await;
            if titles == ["Dune"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the runner never applied the event"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), stopped)
            .await
            .expect("the runners stopped")
            .unwrap();
        let status = store.projection_status().await.unwrap();
        let titles = status.iter().find(|s| s.name == "async_titles").unwrap();
        assert!(titles.holder.is_none(), "{titles:?}");
    });
}
