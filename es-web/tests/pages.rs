//! The browser's pages through its router, on SQLite, and on PostgreSQL
//! and MySQL when `ES_TEST_POSTGRES_URL` and `ES_TEST_MYSQL_URL` are set:
//! what they show, hostile input escaped, keyset pages and filters, POSTs
//! refused without the token or from another origin, rebuild, read-only,
//! the live tail.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use chrono::Utc;
use es_diesel::testing::TestDatabase;
use es_diesel::{
    projector, Event, EventStore, ExpectedVersion, Metadata, NewEvent, ReadModel, Recorded,
    StreamWrite,
};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tower::ServiceExt;

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
struct NoteTaken {
    note_id: i64,
    text: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
struct NoteRead {
    note_id: i64,
}

#[derive(ReadModel, Debug, Clone)]
#[read_model(table = "web_notes", primary_key = note_id)]
struct WebNote {
    note_id: i64,
    text: String,
    reads: i64,
}

#[projector(on = NoteTaken, key = note_id)]
fn taken(e: &Recorded<NoteTaken>, row: &mut Option<WebNote>) {
    *row = Some(WebNote {
        note_id: e.note_id,
        text: e.text.clone(),
        reads: 0,
    });
}

#[projector(on = NoteRead, key = note_id)]
fn read(_e: &Recorded<NoteRead>, row: &mut Option<WebNote>) {
    if let Some(n) = row {
        n.reads += 1;
    }
}

const HOSTILE_STREAM: &str = "note-<script>alert('stream')</script>";
const HOSTILE_TEXT: &str = "</pre><img src=x onerror=alert('payload')>&amp;";

fn databases() -> Vec<TestDatabase> {
    TestDatabase::all()
}

fn store(db: &TestDatabase) -> EventStore {
    let store = db.store();
    es_web::migrate(&store).expect("create the browser's indexes");
    store
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, String, axum::http::HeaderMap) {
    let res = app.clone().oneshot(req).await.expect("the router answers");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("a body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

async fn get(app: &Router, uri: &str) -> (StatusCode, String) {
    let (s, b, _) = send(app, Request::get(uri).body(Body::empty()).unwrap()).await;
    (s, b)
}

async fn page(app: &Router, uri: &str) -> String {
    let (status, body) = get(app, uri).await;
    assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    body
}

/// The browser mounted where an application would put it.
fn mounted(store: &EventStore, options: es_web::Options) -> Router {
    Router::new().nest("/admin/events", es_web::router_with(store.clone(), options))
}

fn csrf_of(body: &str) -> String {
    let at = body
        .find("name=\"csrf\" value=\"")
        .expect("a form with the token");
    let rest = &body[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn post(uri: &str, form: &str) -> axum::http::request::Builder {
    let _ = form;
    Request::post(uri).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_the_log_and_escape_what_it_holds() {
    for db in databases() {
        let store = store(&db);
        let meta = Metadata::new()
            .correlation_id(uuid::Uuid::new_v4())
            .actor("<b>mallory</b>");
        store
            .append_with(
                HOSTILE_STREAM,
                ExpectedVersion::NoStream,
                [NoteTaken {
                    note_id: 1,
                    text: HOSTILE_TEXT.into(),
                }],
                &meta,
            )
            .unwrap();
        let app = mounted(&store, es_web::Options::default());
        let stream_q = format!(
            "/admin/events/stream?id={}",
            HOSTILE_STREAM
                .bytes()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>()
        );
        for uri in [
            "/admin/events",
            "/admin/events/event/1",
            stream_q.as_str(),
            "/admin/events/types",
            "/admin/events/read-models",
            "/admin/events/tail",
        ] {
            let body = page(&app, uri).await;
            for raw in ["<script>alert", "<img src=x", "<b>mallory"] {
                assert!(
                    !body.contains(raw),
                    "{uri} shows {raw:?} unescaped:\n{body}"
                );
            }
        }
        let log = page(&app, "/admin/events").await;
        assert!(log.contains("note-&lt;script&gt;alert("), "{log}");
        assert!(log.contains("&lt;/pre&gt;&lt;img src=x onerror="), "{log}");
        assert!(log.contains("NoteTaken"), "{log}");
        // Links stay under the mount point.
        assert!(log.contains("href=\"/admin/events/event/1\""), "{log}");
        assert!(
            log.contains("href=\"/admin/events/assets/style.css\""),
            "{log}"
        );
        let stream = page(&app, &stream_q).await;
        assert!(stream.contains("is at version <b>1</b>"), "{stream}");
        let event = page(&app, "/admin/events/event/1").await;
        assert!(event.contains("&lt;b&gt;mallory&lt;/b&gt;"), "{event}");
        let types = page(&app, "/admin/events/types").await;
        assert!(
            types.contains("note_taken") && types.contains("<code>text</code>"),
            "the typed view and its columns: {types}"
        );
        let (status, headers) = {
            let (s, _, h) = send(
                &app,
                Request::get("/admin/events").body(Body::empty()).unwrap(),
            )
            .await;
            (s, h)
        };
        assert_eq!(status, StatusCode::OK);
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        let (status, _) = get(&app, "/admin/events/event/999").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = get(&app, "/admin/events/event/x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_pages_by_position_and_filters() {
    for db in databases() {
        let store = store(&db);
        let correlation = uuid::Uuid::new_v4();
        let mut cause = None;
        for i in 1..=12_i64 {
            let stream = if i % 3 == 0 {
                format!("other-{i}")
            } else {
                format!("note-{i}")
            };
            let mut meta = Metadata::new();
            if i >= 10 {
                meta = meta.correlation_id(correlation);
            }
            if i == 11 {
                meta = meta.causation_id(cause.unwrap());
            }
            let recorded = store
                .append_with(
                    &stream,
                    ExpectedVersion::NoStream,
                    [NoteTaken {
                        note_id: i,
                        text: format!("note {i}"),
                    }],
                    &meta,
                )
                .unwrap();
            if i == 10 {
                cause = Some(recorded[0].event_id);
            }
        }
        store
            .append(
                "note-1",
                ExpectedVersion::Exact(1),
                [NoteRead { note_id: 1 }],
            )
            .unwrap();
        let app = mounted(
            &store,
            es_web::Options {
                page_size: 5,
                ..es_web::Options::default()
            },
        );
        let positions = |body: &str| -> Vec<i64> {
            body.split("<td class=\"pos\"><a href=\"/admin/events/event/")
                .skip(1)
                .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
                .collect()
        };
        let first = page(&app, "/admin/events").await;
        assert_eq!(positions(&first), vec![13, 12, 11, 10, 9]);
        assert!(first.contains("before=9"), "an older link: {first}");
        let second = page(&app, "/admin/events?before=9").await;
        assert_eq!(positions(&second), vec![8, 7, 6, 5, 4]);
        assert!(second.contains("after=8"), "a newer link");
        let newer = page(&app, "/admin/events?after=8").await;
        assert_eq!(positions(&newer), vec![13, 12, 11, 10, 9]);
        let last = page(&app, "/admin/events?before=4").await;
        assert_eq!(positions(&last), vec![3, 2, 1]);
        assert!(!last.contains("Older"), "no older page");

        let by_type = page(&app, "/admin/events?type=NoteRead").await;
        assert_eq!(positions(&by_type), vec![13]);
        let by_stream = page(&app, "/admin/events?stream=other-").await;
        assert_eq!(positions(&by_stream), vec![12, 9, 6, 3]);
        let one_stream = page(&app, "/admin/events?stream=note-1").await;
        assert_eq!(positions(&one_stream), vec![13, 11, 10, 1]);
        let paged = page(&app, "/admin/events?stream=note-&before=7").await;
        assert_eq!(positions(&paged), vec![5, 4, 2, 1]);
        let by_correlation = page(&app, &format!("/admin/events?correlation={correlation}")).await;
        assert_eq!(positions(&by_correlation), vec![12, 11, 10]);
        let by_causation = page(&app, &format!("/admin/events?causation={}", cause.unwrap())).await;
        assert_eq!(positions(&by_causation), vec![11]);
        let event10 = page(&app, "/admin/events/event/10").await;
        assert!(event10.contains("1 event caused by this one"), "{event10}");
        let event11 = page(&app, "/admin/events/event/11").await;
        assert!(
            event11.contains("caused by <a href=\"/admin/events/event/10\">"),
            "{event11}"
        );

        let now = Utc::now();
        let from = (now - chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%S");
        let to = (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%S");
        let in_range = page(
            &app,
            &format!("/admin/events?from={from}&to={to}&type=NoteTaken"),
        )
        .await;
        assert_eq!(positions(&in_range), vec![12, 11, 10, 9, 8]);
        let future = (now + chrono::Duration::hours(2)).format("%Y-%m-%dT%H:%M");
        let none = page(&app, &format!("/admin/events?from={future}")).await;
        assert!(
            positions(&none).is_empty() && none.contains("No event matches"),
            "{none}"
        );
        let bad = page(&app, "/admin/events?from=yesterday").await;
        assert!(bad.contains("is not a time"), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_need_the_token_and_the_same_origin() {
    for db in databases() {
        let store = store(&db);
        store
            .append(
                "note-1",
                ExpectedVersion::NoStream,
                [NoteTaken {
                    note_id: 1,
                    text: "x".into(),
                }],
            )
            .unwrap();
        let app = mounted(&store, es_web::Options::default());
        let body = page(&app, "/admin/events/read-models").await;
        assert!(body.contains("web_notes"), "{body}");
        let token = csrf_of(&body);
        let uri = "/admin/events/read-models/web_notes/rebuild";
        let (status, text, _) = send(&app, post(uri, "").body(Body::from("")).unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "no token: {text}");
        let (status, _, _) =
            send(&app, post(uri, "").body(Body::from("csrf=wrong")).unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "a wrong token");
        let form = format!("csrf={token}");
        let (status, text, _) = send(
            &app,
            post(uri, "")
                .header("host", "app.example")
                .header("origin", "https://evil.example")
                .body(Body::from(form.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "another origin: {text}");
        let (status, _, _) = send(
            &app,
            post(uri, "")
                .header("sec-fetch-site", "cross-site")
                .body(Body::from(form.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "another site");
        let (status, text, headers) = send(
            &app,
            post(uri, "")
                .header("host", "app.example")
                .header("origin", "http://app.example")
                .header("sec-fetch-site", "same-origin")
                .body(Body::from(form.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{text}");
        assert_eq!(headers[header::LOCATION], "/admin/events/read-models");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = page(&app, "/admin/events/read-models").await;
            if body.contains("rebuilt") {
                assert!(body.contains("1 events replayed, 1 rows"), "{body}");
                break;
            }
            assert!(Instant::now() < deadline, "no rebuild report: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, _, _) = send(
            &app,
            post("/admin/events/read-models/nope/rebuild", "")
                .body(Body::from(form.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let read_only = mounted(
            &store,
            es_web::Options {
                read_only: true,
                ..es_web::Options::default()
            },
        );
        let body = page(&read_only, "/admin/events/read-models").await;
        assert!(
            !body.contains("Rebuild</button>") && body.contains("read-only"),
            "{body}"
        );
        let (status, _, _) = send(&read_only, post(uri, "").body(Body::from(form)).unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "read-only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_tail_sends_each_new_event_once() {
    for db in databases() {
        let store = store(&db);
        store
            .append(
                "note-1",
                ExpectedVersion::NoStream,
                [NoteTaken {
                    note_id: 1,
                    text: "old".into(),
                }],
            )
            .unwrap();
        let app = mounted(
            &store,
            es_web::Options {
                tail_poll: Duration::from_millis(20),
                ..es_web::Options::default()
            },
        );
        let res = app
            .clone()
            .oneshot(
                Request::get("/admin/events/tail/events")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut body = res.into_body();
        // Let the tail find its start before appending.
        let writer = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut w = StreamWrite::new("note-2", ExpectedVersion::NoStream);
            w.push_new(
                NewEvent::new(&NoteTaken {
                    note_id: 2,
                    text: "<new & shiny>".into(),
                })
                .unwrap(),
            );
            writer.append_streams(&[w]).unwrap();
        });
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.contains("note-2") {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, body.frame())
                .await
                .expect("the new event within 20 s")
                .expect("a frame")
                .expect("no error");
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        assert!(seen.contains("event: event"), "{seen}");
        assert!(seen.contains("&lt;new &amp; shiny&gt;"), "{seen}");
        assert!(!seen.contains("old"), "only new events: {seen}");
        assert_eq!(seen.matches("id=\"e2\"").count(), 1, "{seen}");
    }
}
