//! An event browser for an [es-diesel](es_diesel) store: an axum [`Router`]
//! of server-rendered pages that an application mounts under a path of its
//! choice, behind its own authentication.
//!
//! - **Log**: newest first, paged by position (keyset: a page is one index
//!   range, whatever its depth), filtered by stream-id prefix, event type,
//!   time range (UTC), correlation or causation id; payloads and metadata
//!   pretty-printed.
//! - **Event** and **stream** pages, linked through correlation and
//!   causation ids.
//! - **Event types**: counts, last event, the Rust types and the columns of
//!   each typed view.
//! - **Read models**: table, mode, rows, state, checkpoint, lag, lease
//!   holder, last error at its position; **Rebuild** and **Retry** buttons
//!   (POST forms with a per-process token, refused from other origins;
//!   hidden and refused with [`Options::read_only`]).
//! - **Live tail**: new events as server-sent events, each once, also on
//!   PostgreSQL where positions commit out of order.
//!
//! The router takes no credentials: put it behind the application's own
//! authentication layer (see the example in the README's "In a web app" section, which is also
//! this crate's doctest). Call [`migrate`] once (it is idempotent) to create
//! the indexes the filters use.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = es_diesel::EventStore::open(":memory:")?;
//! store.migrate()?;
//! es_web::migrate(&store)?;
//! let app: axum::Router = axum::Router::new().nest("/admin/events", es_web::router(store));
//! # let _ = app; Ok(()) }
//! ```

mod db;
mod html;
mod rebuilds;
mod tail;

use axum::extract::{Form, OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use db::{Filter, Page};
use es_diesel::{AsyncEventStore, EventStore};
use html::{Ctx, FilterForm};
use maud::Markup;
use rebuilds::Actions;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The README's examples (its "In a web app" section needs axum and this
/// crate), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;

/// Settings of the browser.
#[derive(Clone, Debug)]
pub struct Options {
    /// No rebuild or retry: the buttons are hidden and POSTs refused (403).
    pub read_only: bool,
    /// Events per page of the log and of a stream.
    pub page_size: usize,
    /// Shown in the header and the window title.
    pub title: String,
    /// How often the live tail looks for new events.
    pub tail_poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            page_size: 50,
            title: "Event browser".to_owned(),
            tail_poll: Duration::from_millis(250),
        }
    }
}

struct Shared {
    store: AsyncEventStore,
    options: Options,
    /// The token POST forms must carry: random per process, so that another
    /// site cannot know it.
    csrf: String,
    actions: Actions,
}

type St = Arc<Shared>;

/// Creates the indexes the log's filters use (correlation and causation
/// ids, time; stream-id prefixes on PostgreSQL, where the store indexes
/// only their md5): without them every page still works, but filtered
/// pages scan. Idempotent. On MySQL and MariaDB it creates nothing: there
/// the stream, correlation and time filters scan the log.
pub fn migrate(store: &EventStore) -> es_diesel::Result<()> {
    let mut conn = store.connection()?;
    for sql in db::index_statements(conn.backend()) {
        db::execute(&mut conn, &sql)?;
    }
    Ok(())
}

/// The browser with default [`Options`], for any state type of the
/// application's router: `.nest("/admin/events", es_web::router(store))`.
pub fn router<S>(store: impl Into<AsyncEventStore>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router_with(store, Options::default())
}

/// The browser with `options`.
pub fn router_with<S>(store: impl Into<AsyncEventStore>, options: Options) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let csrf = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let shared = Arc::new(Shared {
        store: store.into(),
        options,
        csrf,
        actions: Actions::default(),
    });
    Router::new()
        .route("/", get(log_page))
        .route("/event/{position}", get(event_page))
        .route("/stream", get(stream_page))
        .route("/types", get(types_page))
        .route("/read-models", get(read_models_page))
        .route("/read-models/{name}/rebuild", post(rebuild))
        .route("/read-models/{name}/retry", post(retry))
        .route("/tail", get(tail_page))
        .route("/tail/events", get(tail::events))
        .route("/assets/style.css", get(style))
        .route("/assets/tail.js", get(script))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(shared)
}

/// What no page needs: inline scripts, other origins, being framed.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

/// Where the router is mounted: the request's full path less the path the
/// router saw.
fn base(original: &Uri, inner: &Uri) -> String {
    let (full, own) = (original.path(), inner.path());
    let base = full
        .strip_suffix(own)
        .or_else(|| (own == "/").then_some(full))
        .unwrap_or("");
    base.trim_end_matches('/').to_owned()
}

/// A page, or an error page with its status.
enum Out {
    Page(Markup),
    Error(StatusCode, String),
}

impl IntoResponse for Out {
    fn into_response(self) -> Response {
        match self {
            Out::Page(m) => (
                [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
                axum::response::Html(m.into_string()),
            )
                .into_response(),
            Out::Error(code, text) => (code, text).into_response(),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> Out {
    tracing::warn!(error = %e, "event browser: a page failed");
    Out::Error(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the store failed: {e}"),
    )
}

fn ctx<'a>(s: &'a Shared, base: &'a str) -> Ctx<'a> {
    Ctx {
        base,
        title: &s.options.title,
        read_only: s.options.read_only,
        csrf: &s.csrf,
    }
}

#[derive(Deserialize, Default)]
struct LogQuery {
    #[serde(default)]
    stream: String,
    #[serde(default, rename = "type")]
    event_type: String,
    #[serde(default)]
    correlation: String,
    #[serde(default)]
    causation: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    after: String,
}

/// `2024-05-01T10:00`, `2024-05-01T10:00:30`, `2024-05-01 10:00:30` or
/// `2024-05-01`, in UTC.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn some(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

async fn log_page(
    State(s): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    Query(q): Query<LogQuery>,
) -> Out {
    let base = base(&original, &uri);
    let mut errors = Vec::new();
    let mut time = |label: &str, v: &str| {
        let t = some(v).and_then(|v| parse_time(&v));
        if t.is_none() && !v.trim().is_empty() {
            errors.push(format!(
                "{label}: `{v}` is not a time (2024-05-01T10:00:00, in UTC)"
            ));
        }
        t
    };
    let filter = Filter {
        stream: some(&q.stream),
        event_type: some(&q.event_type),
        correlation: some(&q.correlation),
        causation: some(&q.causation),
        from: time("from", &q.from),
        to: time("to", &q.to),
    };
    let page = match (
        q.before.trim().parse::<i64>(),
        q.after.trim().parse::<i64>(),
    ) {
        (Ok(p), _) => Page::Before(p),
        (_, Ok(p)) => Page::After(p),
        _ => Page::Newest,
    };
    let size = s.options.page_size.max(1);
    let f = filter.clone();
    let result = s
        .store
        .run(move |store| -> es_diesel::Result<_> {
            let mut conn = store.connection()?;
            let head = db::head(&mut conn)?;
            let page = db::log_page(&mut conn, &f, page, size)?;
            Ok((head, page))
        })
        .await;
    let (head, page) = match result {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let types: Vec<String> = es_diesel::registered_event_types()
        .iter()
        .map(|r| r.name.to_owned())
        .collect();
    let form = FilterForm {
        stream: q.stream,
        event_type: q.event_type,
        correlation: q.correlation,
        causation: q.causation,
        from: q.from,
        to: q.to,
    };
    let error = (!errors.is_empty()).then(|| errors.join("; "));
    Out::Page(html::log_page(
        &ctx(&s, &base),
        head,
        &form,
        &filter,
        &types,
        &page,
        error.as_deref(),
    ))
}

async fn event_page(
    State(s): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    Path(position): Path<String>,
) -> Out {
    let base = base(&original, &uri);
    let Ok(position) = position.parse::<i64>() else {
        return Out::Error(StatusCode::BAD_REQUEST, "not a position".to_owned());
    };
    let result = s
        .store
        .run(move |store| -> es_diesel::Result<_> {
            let mut conn = store.connection()?;
            let head = db::head(&mut conn)?;
            let Some(e) = db::event_at(&mut conn, position)? else {
                return Ok((head, None));
            };
            let cause = match e.meta("causation_id") {
                Some(id) => db::event_by_id(&mut conn, &id)?,
                None => None,
            };
            let caused = db::log_page(
                &mut conn,
                &Filter {
                    causation: Some(e.event_id.clone()),
                    ..Filter::default()
                },
                Page::Newest,
                100,
            )?
            .events
            .len();
            Ok((head, Some((e, cause, caused))))
        })
        .await;
    let c = ctx(&s, &base);
    match result {
        Ok((head, Some((e, cause, caused)))) => {
            Out::Page(html::event_page(&c, head, &e, cause.as_ref(), caused))
        }
        Ok((head, None)) => Out::Page(html::message_page(
            &c,
            head,
            "No such event",
            &format!("The log has no event at position {position}."),
        )),
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default)]
    id: String,
    #[serde(default)]
    from: Option<String>,
}

async fn stream_page(
    State(s): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    Query(q): Query<StreamQuery>,
) -> Out {
    let base = base(&original, &uri);
    let from = q
        .from
        .as_deref()
        .and_then(|f| f.parse::<i64>().ok())
        .unwrap_or(1)
        .max(1);
    let size = s.options.page_size.max(1);
    let id = q.id.clone();
    let result = s
        .store
        .run(move |store| -> es_diesel::Result<_> {
            let head = store.head()?;
            if es_diesel::validate_stream_id(&id).is_err() {
                return Ok((head, 0, Vec::new()));
            }
            let version = store.stream_version(&id)?;
            let events = store.read_stream(&id, from, size + 1)?;
            Ok((head, version, events))
        })
        .await;
    let (head, version, events) = match result {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let mut shown: Vec<db::Ev> = events.iter().map(db::Ev::from).collect();
    let next = (shown.len() > size).then(|| shown[size].stream_version);
    shown.truncate(size);
    Out::Page(html::stream_page(
        &ctx(&s, &base),
        head,
        &q.id,
        version,
        &shown,
        next,
    ))
}

async fn types_page(State(s): State<St>, OriginalUri(original): OriginalUri, uri: Uri) -> Out {
    let base = base(&original, &uri);
    let result = s
        .store
        .run(|store| -> es_diesel::Result<_> {
            let mut conn = store.connection()?;
            Ok((db::head(&mut conn)?, db::type_counts(&mut conn)?))
        })
        .await;
    let (head, counts) = match result {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let mut types: Vec<html::TypeInfo> = Vec::new();
    let registered = es_diesel::registered_event_types();
    let views = es_diesel::view::event_views();
    let mut names: Vec<String> = counts.iter().map(|c| c.event_type.clone()).collect();
    names.extend(registered.iter().map(|r| r.name.to_owned()));
    names.sort();
    names.dedup();
    for name in names {
        types.push(html::TypeInfo {
            count: counts.iter().find(|c| c.event_type == name).cloned(),
            rust: registered
                .iter()
                .filter(|r| r.name == name)
                .map(|r| format!("{} v{}", r.rust_type, r.version))
                .collect(),
            view: views.iter().copied().find(|v| v.event_type == name),
            name,
        });
    }
    Out::Page(html::types_page(&ctx(&s, &base), head, &types))
}

async fn read_models_page(
    State(s): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
) -> Out {
    let base = base(&original, &uri);
    let result = s
        .store
        .run(|store| -> es_diesel::Result<_> {
            let models = es_diesel::registered_read_models()?;
            let status = store.projection_status()?;
            let mut conn = store.connection()?;
            let head = db::head(&mut conn)?;
            let mut rows = Vec::new();
            for m in &models {
                // A table that is not there yet (not migrated) has no count.
                rows.push(db::row_count(&mut conn, m.name).ok());
            }
            Ok((head, models, status, rows))
        })
        .await;
    let (head, models, status, rows) = match result {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let infos: Vec<html::ReadModelInfo> = models
        .iter()
        .zip(rows)
        .map(|(m, rows)| html::ReadModelInfo {
            name: m.name.to_owned(),
            rust_type: m.rust_type.to_owned(),
            asynchronous: m.asynchronous,
            rows,
            status: status.iter().find(|st| st.name == m.name).cloned(),
            action: s.actions.get(m.name),
        })
        .collect();
    Out::Page(html::read_models_page(&ctx(&s, &base), head, &infos))
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

/// Why a POST is refused, if it is: read-only, another site's request
/// (by `Sec-Fetch-Site` or `Origin`), or a missing or wrong token.
fn refuse_post(s: &Shared, headers: &HeaderMap, token: &str) -> Option<&'static str> {
    if s.options.read_only {
        return Some("the event browser is read-only");
    }
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Some("refused: the request came from another site");
        }
    }
    if let Some(origin) = value("origin") {
        let host = value("host").unwrap_or("");
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        if origin_host != Some(host) {
            return Some("refused: the request came from another origin");
        }
    }
    // Compared in constant time: a timing leak would not reveal it either.
    let (a, b) = (token.as_bytes(), s.csrf.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if !same {
        return Some("refused: the form's token is missing or wrong; reload the page");
    }
    None
}

fn known_read_model(name: &str) -> bool {
    es_diesel::registered_read_models().is_ok_and(|all| all.iter().any(|m| m.name == name))
}

/// Why a POST on read model `name` is refused: a bad or cross-site form,
/// or a read model that is not registered.
fn refuse_action(s: &St, headers: &HeaderMap, form: &ActionForm, name: &str) -> Option<Response> {
    if let Some(why) = refuse_post(s, headers, &form.csrf) {
        return Some((StatusCode::FORBIDDEN, why).into_response());
    }
    if !known_read_model(name) {
        return Some((StatusCode::NOT_FOUND, "no such read model").into_response());
    }
    None
}

async fn rebuild(
    State(s): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(refused) = refuse_action(&s, &headers, &form, &name) {
        return refused;
    }
    s.actions.start_rebuild(&s.store, name);
    to_read_models(&original, &uri)
}

async fn retry(
    State(s): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(refused) = refuse_action(&s, &headers, &form, &name) {
        return refused;
    }
    s.actions.retry(&s.store, name).await;
    to_read_models(&original, &uri)
}

fn to_read_models(original: &Uri, uri: &Uri) -> Response {
    let base = base(original, uri);
    Redirect::to(&format!("{base}/read-models")).into_response()
}

async fn tail_page(State(s): State<St>, OriginalUri(original): OriginalUri, uri: Uri) -> Out {
    let base = base(&original, &uri);
    let size = s.options.page_size.max(1);
    let result = s
        .store
        .run(move |store| -> es_diesel::Result<_> {
            let mut conn = store.connection()?;
            let head = db::head(&mut conn)?;
            let page = db::log_page(&mut conn, &Filter::default(), Page::Newest, size)?;
            Ok((head, page.events))
        })
        .await;
    match result {
        Ok((head, events)) => Out::Page(html::tail_page(&ctx(&s, &base), head, &events)),
        Err(e) => failed(e),
    }
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        html::STYLE,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        html::TAIL_JS,
    )
}
