//! Page times of the event browser on a log of a million events (the table
//! in the README's "In a web app" section). Not a test: it loads 1,000,000 events first.
//!
//! ```sh
//! cargo run --release -p es-web --example page_times                 # SQLite, in a temporary file
//! cargo run --release -p es-web --example page_times -- postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! On PostgreSQL it works in a schema of its own, dropped at the end.
//! `EVENTS=100000` loads fewer events.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use es_diesel::{
    projector, Event, EventStore, ExpectedVersion, Metadata, NewEvent, ReadModel, Recorded,
    SqliteSync, StoreOptions, StreamWrite,
};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tower::ServiceExt;

#[derive(Event, Serialize, Deserialize, Clone)]
struct ItemRegistered {
    item_id: i64,
    title: String,
}

#[derive(Event, Serialize, Deserialize, Clone)]
struct ItemLent {
    item_id: i64,
    user_id: i64,
}

#[derive(Event, Serialize, Deserialize, Clone)]
struct ItemBack {
    item_id: i64,
    user_id: i64,
}

/// One event in a thousand: a selective type filter.
#[derive(Event, Serialize, Deserialize, Clone)]
struct ItemLost {
    item_id: i64,
}

#[derive(ReadModel)]
#[read_model(table = "item_list", primary_key = item_id)]
struct ItemList {
    item_id: i64,
    title: String,
}

#[projector(on = ItemRegistered, key = item_id)]
fn registered(e: &Recorded<ItemRegistered>, row: &mut Option<ItemList>) {
    *row = Some(ItemList {
        item_id: e.item_id,
        title: e.title.clone(),
    });
}

const STREAMS: i64 = 100_000;
const CHUNK: usize = 5_000;

fn load(store: &EventStore, total: i64) -> es_diesel::Result<uuid::Uuid> {
    let rounds = (total / STREAMS).max(1);
    let streams = total / rounds;
    let mut sample_correlation = uuid::Uuid::nil();
    let started = Instant::now();
    let mut written = 0i64;
    for round in 0..rounds {
        let mut writes = Vec::with_capacity(CHUNK);
        for s in 0..streams {
            let expected = if round == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(round)
            };
            let mut w = StreamWrite::new(format!("item-{s}"), expected);
            let n = round * streams + s;
            let correlation = uuid::Uuid::new_v4();
            if n == total / 2 {
                sample_correlation = correlation;
            }
            let meta = Metadata::new()
                .correlation_id(correlation)
                .actor(format!("user-{}", n % 997));
            let event = if round == 0 {
                NewEvent::new(&ItemRegistered {
                    item_id: s,
                    title: format!("Item number {s}"),
                })?
            } else if n % 1000 == 0 {
                NewEvent::new(&ItemLost { item_id: s })?
            } else if round % 2 == 1 {
                NewEvent::new(&ItemLent {
                    item_id: s,
                    user_id: n % 997,
                })?
            } else {
                NewEvent::new(&ItemBack {
                    item_id: s,
                    user_id: n % 997,
                })?
            };
            w.push_new(event.with_metadata(meta));
            writes.push(w);
            if writes.len() == CHUNK {
                store.append_streams(&writes)?;
                written += writes.len() as i64;
                writes.clear();
                if written % 100_000 == 0 {
                    eprintln!("  {written} events in {:.1?}", started.elapsed());
                }
            }
        }
        if !writes.is_empty() {
            store.append_streams(&writes)?;
            written += writes.len() as i64;
        }
    }
    eprintln!("loaded {written} events in {:.1?}", started.elapsed());
    Ok(sample_correlation)
}

async fn time(app: &Router, uri: &str, runs: usize) -> (Duration, Duration, String) {
    let mut times = Vec::with_capacity(runs);
    let mut body = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        let res = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{uri}");
        body = String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes())
            .into_owned();
        times.push(t.elapsed());
    }
    times.sort();
    (times[runs / 2], times[runs * 95 / 100], body)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: i64 = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let server = std::env::args().nth(1);
    let (url, cleanup) = match &server {
        Some(admin) => {
            let schema = format!("es_web_pages_{}", std::process::id());
            diesel::PgConnection::establish(admin)?
                .batch_execute(&format!("CREATE SCHEMA {schema}"))?;
            let sep = if admin.contains('?') { '&' } else { '?' };
            (
                format!("{admin}{sep}options=-csearch_path%3D{schema}"),
                Some((admin.clone(), schema)),
            )
        }
        None => (dir.path().join("pages.db").display().to_string(), None),
    };
    let result = run(&url, total).await;
    if let Some((admin, schema)) = cleanup {
        diesel::PgConnection::establish(&admin)?
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    }
    result
}

async fn run(url: &str, total: i64) -> Result<(), Box<dyn std::error::Error>> {
    let options = StoreOptions {
        // Loading: the read model is built once at the end.
        inline_projectors: false,
        sqlite_sync: SqliteSync::Normal,
        ..StoreOptions::default()
    };
    let loader = EventStore::open_with(url, options)?;
    loader.migrate()?;
    es_web::migrate(&loader)?;
    let correlation = load(&loader, total)?;
    let t = Instant::now();
    let report = loader.rebuild("item_list")?;
    eprintln!(
        "rebuilt item_list ({} rows) in {:.1?}",
        report.rows,
        t.elapsed()
    );
    if loader.backend() == es_diesel::Backend::Postgres {
        loader.connection()?.batch_execute("ANALYZE es_events")?;
    }
    drop(loader);

    let store = EventStore::open(url)?;
    let head = store.head()?;
    let middle = head / 2;
    let created = store.read_all(middle - 1, 1)?[0].created_at;
    let from = (created - chrono::Duration::seconds(1)).format("%Y-%m-%dT%H:%M:%S");
    let to = (created + chrono::Duration::seconds(1)).format("%Y-%m-%dT%H:%M:%S");
    let app = Router::new().nest("/admin/events", es_web::router(store));
    let pages = [
        ("log, first page", "/admin/events".to_owned()),
        (
            "log, page at the middle (keyset)",
            format!("/admin/events?before={middle}"),
        ),
        (
            "log, oldest page (keyset)",
            "/admin/events?before=51".to_owned(),
        ),
        ("by type (common)", "/admin/events?type=ItemLent".to_owned()),
        (
            "by type (common), deep",
            format!("/admin/events?type=ItemLent&before={middle}"),
        ),
        (
            "by type (1 in 1,000)",
            "/admin/events?type=ItemLost".to_owned(),
        ),
        (
            "by stream prefix (all streams)",
            "/admin/events?stream=item-".to_owned(),
        ),
        (
            "by stream prefix (11 streams)",
            "/admin/events?stream=item-4242".to_owned(),
        ),
        (
            "by stream prefix (one stream)",
            "/admin/events?stream=item-77777".to_owned(),
        ),
        (
            "by correlation id",
            format!("/admin/events?correlation={correlation}"),
        ),
        (
            "by time range (2 s in the middle)",
            format!("/admin/events?from={from}&to={to}"),
        ),
        ("event page", format!("/admin/events/event/{middle}")),
        (
            "stream page",
            "/admin/events/stream?id=item-77777".to_owned(),
        ),
        ("event types (counts)", "/admin/events/types".to_owned()),
        (
            "read models (status, row counts)",
            "/admin/events/read-models".to_owned(),
        ),
    ];
    println!("| page | median | p95 | events shown |\n|---|---:|---:|---:|");
    for (label, uri) in &pages {
        let (median, p95, body) = time(&app, uri, 15).await;
        if std::env::var("SHOW").is_ok_and(|v| uri.contains(&v)) {
            eprintln!("{body}");
        }
        println!(
            "| {label} | {:.1} ms | {:.1} ms | {} |",
            median.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            body.matches("<td class=\"pos\">").count()
        );
    }
    Ok(())
}
