//! The library as a web app (`library serve`): the talk's pages (log in,
//! the catalogue with who holds each book, one book and its history,
//! register, borrow, return, import), and the event browser at
//! `/admin/events`.
//!
//! Commands go through [`crate::commands`], as on the command line; a
//! refusal is shown on the page, and nothing is written for it.

use crate::commands::{self, Outcome};
use crate::domain::{book_borrowed, BookEvent, LibraryError};
use crate::read_models::{book_list, readers, BookList, Reader};
use axum::extract::{Form, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use diesel::prelude::*;
use es_diesel::runner::RunnerOptions;
use es_diesel::{AsyncEventStore, EventStore, ExecuteError};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use std::io::Write;
use std::time::Duration;

type BoxError = Box<dyn std::error::Error>;

/// Serves until Ctrl-C or SIGTERM; the asynchronous read models run
/// meanwhile, and are released at the end.
pub(crate) fn serve(store: EventStore, listen: &str) -> Result<(), BoxError> {
    es_web::migrate(&store)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let store = store.into_async();
        let runners = store
            .start_async_read_models(RunnerOptions {
                idle_poll: Duration::from_millis(100),
                ..RunnerOptions::default()
            })
            .await?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout();
        writeln!(
            out,
            "library: serving http://{addr}/ (event browser at http://{addr}/admin/events); stop with Ctrl-C"
        )?;
        out.flush()?;
        axum::serve(listener, app(store)).with_graceful_shutdown(stop_signal()).await?;
        runners.shutdown().await;
        writeln!(std::io::stdout(), "library: stopped")?;
        Ok(())
    })
}

async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The app's routes, and the event browser under `/admin/events`. (A real
/// app would put the browser behind its admin login: see the README's "In a web app" section.)
pub(crate) fn app(store: AsyncEventStore) -> Router {
    let browser = es_web::router_with(
        store.clone(),
        es_web::Options {
            title: "Library · events".to_owned(),
            ..es_web::Options::default()
        },
    );
    Router::new()
        .route("/", get(home))
        .route("/books", post(register_book))
        .route("/books/{id}", get(book))
        .route("/books/{id}/borrow", post(borrow))
        .route("/books/{id}/return", post(give_back))
        .route("/readers", post(register_reader))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/import-legacy", post(import_legacy))
        .route("/style.css", get(style))
        .layer(middleware::from_fn(same_origin_posts))
        .with_state(store)
        .nest("/admin/events", browser)
        // `nest` routes the mount point without its trailing slash.
        .route(
            "/admin/events/",
            get(|| async { Redirect::permanent("/admin/events") }),
        )
}

/// Refuses a POST that the browser says comes from another site.
async fn same_origin_posts(request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        let h = request.headers();
        let value = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let cross_site = value("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none");
        let other_origin = value("origin").is_some_and(|o| {
            o.split_once("://").map(|(_, host)| host) != Some(value("host").unwrap_or(""))
        });
        if cross_site || other_origin {
            return (
                StatusCode::FORBIDDEN,
                "refused: the request came from another site",
            )
                .into_response();
        }
    }
    next.run(request).await
}

// --- the session: which reader is logged in, and the last command's message

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn reader_id(headers: &HeaderMap) -> Option<i64> {
    cookie(headers, "reader")?.parse().ok()
}

/// A message for the next page: `ok` or `refused`, and its text.
struct Flash {
    ok: bool,
    text: String,
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn flash_cookie(ok: bool, text: &str) -> String {
    format!(
        "flash={}{}; Path=/; HttpOnly; SameSite=Lax",
        if ok { "ok:" } else { "no:" },
        encode(text)
    )
}

fn take_flash(headers: &HeaderMap) -> Option<Flash> {
    let raw = cookie(headers, "flash")?;
    let (kind, text) = raw.split_at_checked(3)?;
    Some(Flash {
        ok: kind == "ok:",
        text: decode(text),
    })
}

/// Back to `to`, with a message.
fn done(to: &str, ok: bool, text: &str) -> Response {
    let mut res = Redirect::to(to).into_response();
    if let Ok(v) = HeaderValue::from_str(&flash_cookie(ok, text)) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

/// The message of a command's outcome.
fn told<A: es_diesel::Aggregate>(
    to: &str,
    success: String,
    outcome: Outcome<A>,
) -> Result<Response, AppError> {
    match outcome {
        Ok(_) => Ok(done(to, true, &success)),
        Err(ExecuteError::Domain(refusal)) => Ok(refused(to, &refusal)),
        Err(ExecuteError::Store(e)) => Err(AppError(e.to_string())),
    }
}

fn refused(to: &str, refusal: &LibraryError) -> Response {
    done(
        to,
        false,
        &format!("Refused: {refusal}. Nothing was written."),
    )
}

/// The store failed: a plain 500 page.
struct AppError(String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the store failed: {}", self.0),
        )
            .into_response()
    }
}

impl From<es_diesel::Error> for AppError {
    fn from(e: es_diesel::Error) -> Self {
        AppError(e.to_string())
    }
}

/// A form's whole number, or the message saying it is not one.
fn number(what: &str, value: &str) -> Result<i64, String> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{what} must be a positive whole number, not `{value}`."))
}

// --- pages

fn layout(title: &str, me: Option<&Reader>, flash: Option<Flash>, body: Markup) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Library" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header.top {
                    a.brand href="/" { "Library" }
                    nav { a href="/" { "Catalogue" } a href="/admin/events" { "Event browser" } }
                    div.session {
                        @if let Some(me) = me {
                            span #me { "Logged in as " b { (me.name.as_deref().unwrap_or("?")) } " (reader " (me.user_id) ")" }
                            form method="post" action="/logout" { button.link type="submit" { "Log out" } }
                        } @else {
                            form #login method="post" action="/login" {
                                input type="number" name="user_id" placeholder="reader number" min="1" required;
                                button type="submit" { "Log in" }
                            }
                        }
                    }
                }
                main {
                    @if let Some(f) = &flash {
                        div #flash class=(if f.ok { "flash ok" } else { "flash refused" }) { (f.text) }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    let mut res = Html(page.into_string()).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if flash.is_some() {
        res.headers_mut().append(
            header::SET_COOKIE,
            HeaderValue::from_static("flash=; Path=/; Max-Age=0"),
        );
    }
    res
}

async fn home(
    State(store): State<AsyncEventStore>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let me_id = reader_id(&headers);
    let (books, all_readers) = store
        .run(|s| -> es_diesel::Result<_> {
            let mut conn = s.connection()?;
            let books: Vec<BookList> = book_list::table
                .order(book_list::book_id)
                .load(&mut *conn)
                .map_err(es_diesel::Error::from)?;
            let readers: Vec<Reader> = readers::table
                .order(readers::user_id)
                .load(&mut *conn)
                .map_err(es_diesel::Error::from)?;
            Ok((books, readers))
        })
        .await?;
    let me = me_id.and_then(|id| all_readers.iter().find(|r| r.user_id == id));
    let name_of = |id: i64| {
        all_readers
            .iter()
            .find(|r| r.user_id == id)
            .and_then(|r| r.name.clone())
            .unwrap_or_else(|| "a reader without a card".to_owned())
    };
    let body = html! {
        section {
            h2 { "Books" }
            @if books.is_empty() {
                p.empty { "The catalogue is empty: register a book below, or import the old app's books." }
            } @else {
                table #books {
                    thead { tr { th.num { "#" } th { "title" } th { "author" } th { "status" } th.num { "loans" } th {} } }
                    tbody {
                        @for b in &books {
                            tr id=(format!("book-{}", b.book_id)) {
                                td.num { (b.book_id) }
                                td { a href=(format!("/books/{}", b.book_id)) { (b.title) } }
                                td { (b.author) }
                                td.status {
                                    @match b.borrowed_by {
                                        Some(u) => { span.badge.busy { "borrowed" } " by " (name_of(u)) span.muted { " (reader " (u) ")" } }
                                        None => { span.badge.ok { "on the shelf" } }
                                    }
                                }
                                td.num { (b.times_borrowed) }
                                td.actions {
                                    @if let Some(me) = me {
                                        @if b.borrowed_by == Some(me.user_id) {
                                            form method="post" action=(format!("/books/{}/return", b.book_id)) {
                                                button.secondary id=(format!("return-{}", b.book_id)) type="submit" { "Return" }
                                            }
                                        } @else {
                                            form method="post" action=(format!("/books/{}/borrow", b.book_id)) {
                                                button id=(format!("borrow-{}", b.book_id)) type="submit" { "Borrow" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                @if me.is_none() { p.muted { "Log in as a reader (top right) to borrow and return books." } }
            }
        }
        div.cards {
            form.card #register-book method="post" action="/books" {
                h2 { "Register a book" }
                label { "Number" input type="number" name="book_id" min="1" required; }
                label { "Title" input type="text" name="title" required; }
                label { "Author" input type="text" name="author" required; }
                button type="submit" { "Register the book" }
            }
            form.card #register-reader method="post" action="/readers" {
                h2 { "Register a reader" }
                label { "Number" input type="number" name="user_id" min="1" required; }
                label { "Name" input type="text" name="name" required; }
                button type="submit" { "Give a library card" }
            }
            form.card #import method="post" action="/import-legacy" {
                h2 { "Begin from the old app" }
                p.muted { "Brings the old CRUD app's " code { "legacy_books" } " table over as " code { "BookImported" } " events. Safe to run again." }
                button.secondary type="submit" { "Import legacy books" }
            }
        }
        section {
            h2 { "Readers" }
            @if all_readers.is_empty() { p.empty { "No reader yet." } }
            @else {
                table #readers {
                    thead { tr { th.num { "#" } th { "name" } th.num { "books out" } th { "last login (UTC)" } } }
                    tbody {
                        @for r in &all_readers {
                            tr {
                                td.num { (r.user_id) }
                                td { @if let Some(n) = &r.name { (n) } @else { span.muted { "no library card yet" } } }
                                td.num { (r.books_out) }
                                td { @if let Some(t) = r.last_login { (t.format("%Y-%m-%d %H:%M:%S")) } @else { span.muted { "never" } } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout("Catalogue", me, take_flash(&headers), body))
}

async fn book(
    State(store): State<AsyncEventStore>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Ok(book_id) = id.parse::<i64>() else {
        return Ok((StatusCode::NOT_FOUND, "no such book").into_response());
    };
    let me_id = reader_id(&headers);
    let found = store
        .run(move |s| -> es_diesel::Result<_> {
            let mut conn = s.connection()?;
            let Some(b) = book_list::table
                .find(book_id)
                .first::<BookList>(&mut *conn)
                .optional()
                .map_err(es_diesel::Error::from)?
            else {
                return Ok(None);
            };
            let me = match me_id {
                Some(id) => readers::table
                    .find(id)
                    .first::<Reader>(&mut *conn)
                    .optional()
                    .map_err(es_diesel::Error::from)?,
                None => None,
            };
            // Events queried like models, through their typed view.
            let loans: Vec<(i64, chrono::NaiveDateTime, i64)> = book_borrowed::table
                .filter(book_borrowed::book_id.eq(book_id))
                .order(book_borrowed::global_position)
                .select((
                    book_borrowed::user_id,
                    book_borrowed::created_at,
                    book_borrowed::global_position,
                ))
                .load(&mut *conn)
                .map_err(es_diesel::Error::from)?;
            drop(conn);
            let stream = s.load_stream::<BookEvent>(&format!("book-{book_id}"))?;
            Ok(Some((b, me, loans, stream)))
        })
        .await?;
    let Some((b, me, loans, stream)) = found else {
        let body = html! { p.empty { "Book " (book_id) " is not in the catalogue." } };
        let mut res = layout("No such book", None, take_flash(&headers), body);
        *res.status_mut() = StatusCode::NOT_FOUND;
        return Ok(res);
    };
    let body = html! {
        p.lead { "by " b { (b.author) } " · book " (b.book_id) " · borrowed " (b.times_borrowed) " time(s) · "
            @match b.borrowed_by {
                Some(u) => { span.badge.busy { "with reader " (u) } }
                None => { span.badge.ok { "on the shelf" } }
            }
        }
        @if let Some(me) = &me {
            @if b.borrowed_by == Some(me.user_id) {
                form method="post" action=(format!("/books/{}/return", b.book_id)) { button.secondary #return type="submit" { "Return it" } }
            } @else {
                form method="post" action=(format!("/books/{}/borrow", b.book_id)) { button #borrow type="submit" { "Borrow it" } }
            }
        }
        h2 { "Loans" }
        @if loans.is_empty() { p.muted { "Never borrowed here." } }
        @else {
            ul { @for (user, at, pos) in &loans {
                li { "by reader " (user) " at " (at.format("%Y-%m-%d %H:%M:%S")) " UTC "
                    a.muted href=(format!("/admin/events/event/{pos}")) { "(event #" (pos) ")" } }
            } }
        }
        h2 { "Its history" }
        table #history {
            thead { tr { th.num { "version" } th { "event" } th { "by" } th { "when (UTC)" } th.num { "position" } } }
            tbody {
                @for e in &stream {
                    tr {
                        td.num { (e.stream_version) }
                        td { code { (e.event_type) } }
                        td { (e.metadata.actor.as_deref().unwrap_or("–")) }
                        td { (e.created_at.format("%Y-%m-%d %H:%M:%S")) }
                        td.num { a href=(format!("/admin/events/event/{}", e.global_position)) { "#" (e.global_position) } }
                    }
                }
            }
        }
        p { a href=(format!("/admin/events/stream?id=book-{}", b.book_id)) { "This stream in the event browser →" } }
    };
    Ok(layout(&b.title, me.as_ref(), take_flash(&headers), body))
}

#[derive(Deserialize)]
struct BookForm {
    #[serde(default)]
    book_id: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    author: String,
}

async fn register_book(
    State(store): State<AsyncEventStore>,
    Form(f): Form<BookForm>,
) -> Result<Response, AppError> {
    let book_id = match number("The book's number", &f.book_id) {
        Ok(n) => n,
        Err(why) => return Ok(done("/", false, &why)),
    };
    let (title, author) = (f.title.trim().to_owned(), f.author.trim().to_owned());
    if title.is_empty() || author.is_empty() {
        return Ok(done("/", false, "A book needs a title and an author."));
    }
    let message = format!("Registered book {book_id}: {title} by {author}.");
    let outcome = store
        .run(move |s| commands::register_book(s, book_id, &title, &author))
        .await;
    told("/", message, outcome)
}

#[derive(Deserialize)]
struct ReaderForm {
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    name: String,
}

async fn register_reader(
    State(store): State<AsyncEventStore>,
    Form(f): Form<ReaderForm>,
) -> Result<Response, AppError> {
    let user_id = match number("The reader's number", &f.user_id) {
        Ok(n) => n,
        Err(why) => return Ok(done("/", false, &why)),
    };
    let name = f.name.trim().to_owned();
    if name.is_empty() {
        return Ok(done("/", false, "A reader needs a name."));
    }
    let message = format!("{name} (reader {user_id}) has a library card.");
    let outcome = store
        .run(move |s| commands::register_user(s, user_id, &name))
        .await;
    told("/", message, outcome)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user_id: String,
}

async fn login(
    State(store): State<AsyncEventStore>,
    Form(f): Form<LoginForm>,
) -> Result<Response, AppError> {
    let user_id = match number("The reader's number", &f.user_id) {
        Ok(n) => n,
        Err(why) => return Ok(done("/", false, &why)),
    };
    match store.run(move |s| commands::login(s, user_id)).await {
        Ok(_) => {
            let mut res = done("/", true, &format!("Welcome, reader {user_id}."));
            if let Ok(v) =
                HeaderValue::from_str(&format!("reader={user_id}; Path=/; HttpOnly; SameSite=Lax"))
            {
                res.headers_mut().append(header::SET_COOKIE, v);
            }
            Ok(res)
        }
        Err(ExecuteError::Domain(refusal)) => Ok(refused("/", &refusal)),
        Err(ExecuteError::Store(e)) => Err(e.into()),
    }
}

async fn logout() -> Response {
    let mut res = done("/", true, "Logged out.");
    res.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("reader=; Path=/; Max-Age=0"),
    );
    res
}

/// Where to go back to after a loan: the page the button was on.
fn back(headers: &HeaderMap, book_id: i64) -> String {
    let from_book = headers
        .get(header::REFERER)
        .and_then(|r| r.to_str().ok())
        .is_some_and(|r| r.ends_with(&format!("/books/{book_id}")));
    if from_book {
        format!("/books/{book_id}")
    } else {
        "/".to_owned()
    }
}

async fn borrow(
    State(store): State<AsyncEventStore>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Ok(book_id) = id.parse::<i64>() else {
        return Ok((StatusCode::NOT_FOUND, "no such book").into_response());
    };
    let to = back(&headers, book_id);
    let Some(user_id) = reader_id(&headers) else {
        return Ok(done(&to, false, "Log in as a reader to borrow a book."));
    };
    let outcome = store
        .run(move |s| commands::borrow(s, book_id, user_id))
        .await;
    told(
        &to,
        format!("Reader {user_id} borrowed book {book_id}."),
        outcome,
    )
}

async fn give_back(
    State(store): State<AsyncEventStore>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Ok(book_id) = id.parse::<i64>() else {
        return Ok((StatusCode::NOT_FOUND, "no such book").into_response());
    };
    let to = back(&headers, book_id);
    let Some(user_id) = reader_id(&headers) else {
        return Ok(done(&to, false, "Log in as a reader to return a book."));
    };
    let outcome = store
        .run(move |s| commands::give_back(s, book_id, user_id))
        .await;
    told(
        &to,
        format!("Reader {user_id} returned book {book_id}."),
        outcome,
    )
}

async fn import_legacy(State(store): State<AsyncEventStore>) -> Result<Response, AppError> {
    let report = store.run(commands::import_legacy).await?;
    Ok(done(
        "/",
        true,
        &format!(
            "Imported legacy_books: {} new event(s), {} already there.",
            report.imported, report.skipped
        ),
    ))
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

const STYLE: &str = r#"
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --soft:#f6f8fa; --accent:#0969da;
  font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; font-size: 15px; color: var(--fg); }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
header.top { display: flex; align-items: center; gap: 24px; padding: 10px 28px; background: #0b3d2e; color: #fff; }
header.top .brand { color: #fff; font-weight: 700; font-size: 18px; }
header.top nav { display: flex; gap: 16px; flex: 1; } header.top nav a { color: #cde8dc; }
.session { display: flex; align-items: center; gap: 10px; color: #cde8dc; }
.session form { display: flex; gap: 6px; margin: 0; }
.session button { white-space: nowrap; }
.session input { width: 150px; }
main { max-width: 1100px; padding: 8px 28px 48px; }
h1 { font-size: 26px; margin: 20px 0 10px; } h2 { font-size: 17px; margin: 24px 0 10px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 8px 10px; border-bottom: 1px solid var(--line); vertical-align: middle; }
th { background: var(--soft); color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
td.actions form { margin: 0; }
input[type=text], input[type=number] { font: inherit; padding: 6px 9px; border: 1px solid var(--line); border-radius: 6px; width: 100%; }
button { font: inherit; padding: 6px 14px; border-radius: 6px; border: 1px solid #1f883d; background: #1f883d; color: #fff; cursor: pointer; }
button.secondary { background: var(--soft); color: var(--fg); border-color: var(--line); }
button.link { background: none; border: none; color: #cde8dc; text-decoration: underline; padding: 0; }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 16px; margin-top: 28px; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 4px 16px 16px; display: flex; flex-direction: column; gap: 8px; background: #fcfdfd; }
.card label { display: flex; flex-direction: column; gap: 3px; font-size: 13px; color: var(--muted); }
.card button { align-self: flex-start; margin-top: 4px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12.5px; font-weight: 600; border: 1px solid; }
.badge.ok { color: #1a7f37; border-color: #aceebb; background: #dafbe1; }
.badge.busy { color: #9a6700; border-color: #f5e0a0; background: #fff8c5; }
.muted { color: var(--muted); }
.flash { margin: 16px 0 0; padding: 10px 14px; border-radius: 8px; border: 1px solid; }
.flash.ok { color: #1a7f37; background: #dafbe1; border-color: #aceebb; }
.flash.refused { color: #cf222e; background: #ffebe9; border-color: #ffcecb; font-weight: 600; }
p.empty { color: var(--muted); padding: 18px; border: 1px dashed var(--line); border-radius: 8px; text-align: center; }
p.lead { font-size: 16px; }
"#;
