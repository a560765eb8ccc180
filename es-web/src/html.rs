//! The pages, server-rendered with maud: every value that comes from the
//! log (stream ids, types, payloads, metadata, errors) goes through maud's
//! escaping, and every link is built with [`url`].

use crate::db::{Ev, Filter, LogPage, TypeCount};
use crate::rebuilds::Action;
use chrono::NaiveDateTime;
use es_diesel::runner::ProjectionStatus;
use maud::{html, Markup, DOCTYPE};

/// What every page needs to draw links and forms.
pub(crate) struct Ctx<'a> {
    /// Where the router is mounted, without a trailing slash ("" at the root).
    pub base: &'a str,
    pub title: &'a str,
    pub read_only: bool,
    pub csrf: &'a str,
}

impl Ctx<'_> {
    /// `path` under the mount point. The log is the mount point itself:
    /// axum's `nest` routes `/admin/events`, not `/admin/events/`.
    pub(crate) fn link(&self, path: &str) -> String {
        if path == "/" && !self.base.is_empty() {
            self.base.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved).
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `path?k=v&..`, skipping empty values.
pub(crate) fn url(ctx: &Ctx, path: &str, params: &[(&str, &str)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    if query.is_empty() {
        ctx.link(path)
    } else {
        format!("{}?{}", ctx.link(path), query.join("&"))
    }
}

fn time(t: &NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// JSON text pretty-printed; text that is not JSON is shown as it is.
pub(crate) fn pretty(json: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| json.to_owned()),
        Err(_) => json.to_owned(),
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Tab {
    Log,
    Types,
    ReadModels,
    Tail,
    None,
}

pub(crate) fn layout(ctx: &Ctx, tab: Tab, heading: &str, head: i64, body: Markup) -> Markup {
    let item = |t: Tab, path: &str, label: &str| {
        html! { a href=(ctx.link(path)) class=@if t == tab { "current" } { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (heading) " · " (ctx.title) }
                link rel="stylesheet" href=(ctx.link("/assets/style.css"));
            }
            body {
                header.top {
                    a.brand href=(ctx.link("/")) { (ctx.title) }
                    nav {
                        (item(Tab::Log, "/", "Log"))
                        (item(Tab::Types, "/types", "Event types"))
                        (item(Tab::ReadModels, "/read-models", "Read models"))
                        (item(Tab::Tail, "/tail", "Live tail"))
                    }
                    span.head title="highest global position" { "head #" (head) }
                    @if ctx.read_only { span.badge.muted { "read-only" } }
                }
                main {
                    h1 { (heading) }
                    (body)
                }
            }
        }
    }
}

/// The links of an event's correlation and causation.
fn relations(ctx: &Ctx, e: &Ev) -> Markup {
    let correlation = e.meta("correlation_id");
    let causation = e.meta("causation_id");
    let actor = e.meta("actor");
    html! {
        @if let Some(a) = &actor { span.meta { "by " b { (a) } } }
        @if let Some(c) = &correlation {
            a.meta href=(url(ctx, "/", &[("correlation", c)])) title="events with this correlation id" {
                "correlation " code { (short(c)) }
            }
        }
        @if let Some(c) = &causation {
            a.meta href=(url(ctx, "/", &[("causation", c)])) title="events with this causation id" {
                "causation " code { (short(c)) }
            }
        }
    }
}

fn short(id: &str) -> String {
    let s: String = id.chars().take(8).collect();
    if s.len() < id.len() {
        format!("{s}…")
    } else {
        s
    }
}

/// One event as a table row (the log, the stream page and the live tail).
pub(crate) fn event_row(ctx: &Ctx, e: &Ev) -> Markup {
    let pos = e.global_position.to_string();
    html! {
        tr id=(format!("e{pos}")) {
            td.pos { a href=(ctx.link(&format!("/event/{pos}"))) { "#" (pos) } }
            td.when { (time(&e.created_at)) }
            td.stream {
                a href=(url(ctx, "/stream", &[("id", &e.stream_id)])) { (e.stream_id) }
                span.version { " v" (e.stream_version) }
            }
            td.type {
                a href=(url(ctx, "/", &[("type", &e.event_type)])) { (e.event_type) }
                span.version { " v" (e.event_version) }
            }
            td.payload {
                pre.json { (pretty(&e.payload)) }
                @if e.metadata != "{}" {
                    div.relations { (relations(ctx, e)) }
                    details {
                        summary { "metadata" }
                        pre.json { (pretty(&e.metadata)) }
                    }
                }
            }
        }
    }
}

fn events_table(ctx: &Ctx, events: &[Ev], tbody_id: Option<&str>) -> Markup {
    html! {
        table.events {
            thead { tr { th { "position" } th { "created (UTC)" } th { "stream" } th { "type" } th { "payload" } } }
            tbody id=[tbody_id] {
                @for e in events { (event_row(ctx, e)) }
            }
        }
    }
}

/// The form values of the log's filter.
#[derive(Default)]
pub(crate) struct FilterForm {
    pub stream: String,
    pub event_type: String,
    pub correlation: String,
    pub causation: String,
    pub from: String,
    pub to: String,
}

impl FilterForm {
    fn params(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("stream", &self.stream),
            ("type", &self.event_type),
            ("correlation", &self.correlation),
            ("causation", &self.causation),
            ("from", &self.from),
            ("to", &self.to),
        ]
    }
}

pub(crate) fn log_page(
    ctx: &Ctx,
    head: i64,
    form: &FilterForm,
    filter: &Filter,
    types: &[String],
    page: &LogPage,
    error: Option<&str>,
) -> Markup {
    let params = form.params();
    let with = |k: &'static str, v: String| {
        let mut p: Vec<(&str, String)> = params.iter().map(|(k, v)| (*k, v.to_string())).collect();
        p.push((k, v));
        p
    };
    let link = |p: Vec<(&str, String)>| {
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        url(ctx, "/", &p)
    };
    let body = html! {
        form.filters method="get" action=(ctx.link("/")) {
            label { "Stream id starts with" input type="text" name="stream" value=(form.stream) placeholder="book-"; }
            label { "Event type"
                input type="text" name="type" value=(form.event_type) list="event-types" placeholder="any";
                datalist id="event-types" { @for t in types { option value=(t) {} } }
            }
            label { "Correlation id" input type="text" name="correlation" value=(form.correlation) placeholder="uuid"; }
            label { "From (UTC)" input type="datetime-local" step="1" name="from" value=(form.from); }
            label { "To (UTC)" input type="datetime-local" step="1" name="to" value=(form.to); }
            @if !form.causation.is_empty() { input type="hidden" name="causation" value=(form.causation); }
            div.buttons {
                button type="submit" { "Filter" }
                @if !filter.is_empty() { a.button.secondary href=(ctx.link("/")) { "Clear" } }
            }
        }
        @if !form.causation.is_empty() {
            p.note { "Events caused by " code { (form.causation) } "." }
        }
        @if let Some(e) = error { p.error { (e) } }
        @if page.events.is_empty() {
            p.empty { @if filter.is_empty() { "The log is empty." } @else { "No event matches." } }
        } @else {
            (events_table(ctx, &page.events, None))
        }
        nav.pager {
            @if page.newer {
                a.button.secondary href=(link(params.iter().map(|(k, v)| (*k, v.to_string())).collect())) { "⇤ Newest" }
                @if let Some(first) = page.events.first() {
                    a.button.secondary href=(link(with("after", first.global_position.to_string()))) { "← Newer" }
                }
            }
            @if page.older {
                @if let Some(last) = page.events.last() {
                    a.button.secondary href=(link(with("before", last.global_position.to_string()))) { "Older →" }
                }
            }
        }
    };
    layout(ctx, Tab::Log, "Log", head, body)
}

pub(crate) fn event_page(
    ctx: &Ctx,
    head: i64,
    e: &Ev,
    cause: Option<&Ev>,
    caused: usize,
) -> Markup {
    let correlation = e.meta("correlation_id");
    let causation = e.meta("causation_id");
    let body = html! {
        dl.facts {
            dt { "position" } dd { "#" (e.global_position) }
            dt { "event id" } dd { code { (e.event_id) } }
            dt { "stream" } dd {
                a href=(url(ctx, "/stream", &[("id", &e.stream_id)])) { (e.stream_id) }
                " at version " (e.stream_version)
            }
            dt { "type" } dd {
                a href=(url(ctx, "/", &[("type", &e.event_type)])) { (e.event_type) }
                " version " (e.event_version)
            }
            dt { "created (UTC)" } dd { (time(&e.created_at)) }
            @if let Some(c) = &correlation {
                dt { "correlation" } dd {
                    a href=(url(ctx, "/", &[("correlation", c)])) { code { (c) } }
                    " (every event of this correlation)"
                }
            }
            @if let Some(c) = &causation {
                dt { "causation" } dd {
                    @if let Some(cause) = cause {
                        "caused by " a href=(ctx.link(&format!("/event/{}", cause.global_position))) {
                            "#" (cause.global_position) " " (cause.event_type)
                        }
                        " · "
                    }
                    a href=(url(ctx, "/", &[("causation", c)])) { "events with causation " code { (short(c)) } }
                }
            }
            dt { "caused" } dd {
                @if caused == 0 { "no event names this one as its cause" }
                @else {
                    a href=(url(ctx, "/", &[("causation", &e.event_id)])) {
                        (caused) @if caused == 1 { " event" } @else { " events" } " caused by this one"
                    }
                }
            }
        }
        h2 { "Payload" }
        pre.json.big { (pretty(&e.payload)) }
        h2 { "Metadata" }
        pre.json.big { (pretty(&e.metadata)) }
    };
    layout(
        ctx,
        Tab::None,
        &format!("Event #{}", e.global_position),
        head,
        body,
    )
}

pub(crate) fn stream_page(
    ctx: &Ctx,
    head: i64,
    stream: &str,
    version: i64,
    events: &[Ev],
    next_from: Option<i64>,
) -> Markup {
    let body = html! {
        p.summary {
            "Stream " code { (stream) } " is at version " b { (version) } "."
            @if version == 0 { " It has no events." }
        }
        @if !events.is_empty() { (events_table(ctx, events, None)) }
        nav.pager {
            @if let Some(from) = next_from {
                a.button.secondary href=(url(ctx, "/stream", &[("id", stream), ("from", &from.to_string())])) { "Later versions →" }
            }
            a.button.secondary href=(url(ctx, "/", &[("stream", stream)])) { "In the log, newest first" }
        }
    };
    layout(ctx, Tab::None, "Stream", head, body)
}

/// A registered event type as the types page shows it.
pub(crate) struct TypeInfo {
    pub name: String,
    pub count: Option<TypeCount>,
    /// `rust::Type vN` of each registration.
    pub rust: Vec<String>,
    pub view: Option<&'static es_diesel::view::EventView>,
}

pub(crate) fn types_page(ctx: &Ctx, head: i64, types: &[TypeInfo]) -> Markup {
    let body = html! {
        @if types.is_empty() { p.empty { "No event type is registered or logged." } }
        @else {
            table.types {
                thead { tr { th { "event type" } th.num { "events" } th { "last" } th { "Rust type" } th { "typed view and its columns" } } }
                tbody {
                    @for t in types {
                        tr {
                            td { a href=(url(ctx, "/", &[("type", &t.name)])) { (t.name) } }
                            td.num { (t.count.as_ref().map_or(0, |c| c.n)) }
                            td { @if let Some(c) = &t.count {
                                a href=(ctx.link(&format!("/event/{}", c.last))) { "#" (c.last) }
                            } }
                            td { @for r in &t.rust { div { code { (r) } } } @if t.rust.is_empty() { span.muted { "not registered here" } } }
                            td {
                                @if let Some(v) = t.view {
                                    div { code.view { (v.name) } span.muted { " (version " (v.event_version) " rows)" } }
                                    ul.columns {
                                        li { code { "global_position" } } li { code { "stream_id" } } li { code { "stream_version" } } li { code { "created_at" } }
                                        @for c in v.columns {
                                            li { code { (c.name) } span.muted { " " (format!("{:?}", c.ty).to_lowercase()) @if c.nullable { "?" } } }
                                        }
                                    }
                                } @else { span.muted { "no view" } }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, Tab::Types, "Event types", head, body)
}

/// A read model as its page shows it.
pub(crate) struct ReadModelInfo {
    pub name: String,
    pub rust_type: String,
    pub asynchronous: bool,
    pub rows: Option<i64>,
    pub status: Option<ProjectionStatus>,
    pub action: Option<Action>,
}

fn state_class(state: &str) -> &'static str {
    match state {
        "running" | "current" => "ok",
        "failed" | "stale" => "bad",
        "rebuilding" => "busy",
        _ => "muted",
    }
}

pub(crate) fn read_models_page(ctx: &Ctx, head: i64, models: &[ReadModelInfo]) -> Markup {
    let busy = models
        .iter()
        .any(|m| matches!(m.action, Some(Action::Rebuilding { .. })));
    let body = html! {
        @if busy { p.note { "A rebuild is running; " a href=(ctx.link("/read-models")) { "refresh" } " to follow it." } }
        @if models.is_empty() { p.empty { "No read model is registered in this application." } }
        @else {
            table.models {
                thead { tr {
                    th { "read model" } th { "mode" } th.num { "rows" } th { "state" } th.num { "checkpoint" }
                    th.num { "lag" } th { "lease holder" } th { "last error" }
                    @if !ctx.read_only { th { "actions" } }
                } }
                tbody {
                    @for m in models {
                        @let s = m.status.as_ref();
                        @let state = s.map_or("unknown", |s| s.state.as_str());
                        tr id=(format!("rm-{}", m.name)) {
                            td { b { (m.name) } div.muted { code { (m.rust_type) } } }
                            td { @if m.asynchronous { "async" } @else { "inline" } }
                            td.num { @if let Some(r) = m.rows { (r) } @else { span.muted { "?" } } }
                            td { span class=(format!("badge {}", state_class(state))) { (state) } }
                            td.num { @if let Some(s) = s { "#" (s.checkpoint.position) } }
                            td.num { @if let Some(s) = s { (s.lag) } }
                            td {
                                @if let Some(h) = s.and_then(|s| s.holder.as_ref()) {
                                    code { (h) }
                                    @if let Some(exp) = s.and_then(|s| s.lease_expires) {
                                        div.muted { @if s.is_some_and(|s| s.lease_expired) { "expired " } @else { "until " } (exp.format("%H:%M:%S")) }
                                    }
                                } @else { span.muted { "none" } }
                            }
                            td.error {
                                @if let Some(err) = s.and_then(|s| s.last_error.as_ref()) {
                                    @if let Some(p) = s.and_then(|s| s.failed_position) {
                                        "at " a href=(ctx.link(&format!("/event/{p}"))) { "#" (p) } ": "
                                    }
                                    (err)
                                }
                            }
                            @if !ctx.read_only {
                                td.actions {
                                    form method="post" action=(ctx.link(&format!("/read-models/{}/rebuild", enc(&m.name)))) {
                                        input type="hidden" name="csrf" value=(ctx.csrf);
                                        button type="submit" disabled[matches!(m.action, Some(Action::Rebuilding { .. }))] { "Rebuild" }
                                    }
                                    @if m.asynchronous && state == "failed" {
                                        form method="post" action=(ctx.link(&format!("/read-models/{}/retry", enc(&m.name)))) {
                                            input type="hidden" name="csrf" value=(ctx.csrf);
                                            button.secondary type="submit" { "Retry" }
                                        }
                                    }
                                }
                            }
                        }
                        @if let Some(a) = &m.action {
                            tr.action { td colspan="9" { (action(a)) } }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, Tab::ReadModels, "Read models", head, body)
}

fn action(a: &Action) -> Markup {
    match a {
        Action::Rebuilding {
            events,
            position,
            head,
        } => html! {
            span.badge.busy { "rebuilding" } " " (events) " events replayed, at #" (position) " of #" (head)
        },
        Action::Rebuilt {
            events,
            rows,
            millis,
            pending,
            at,
        } => html! {
            span.badge.ok { "rebuilt" } " at " (at.format("%H:%M:%S")) " UTC: " (events) " events replayed, "
            (rows) " rows, in " (millis) " ms"
            @if *pending > 0 { " (" (pending) " events left to its runner)" }
        },
        Action::Failed { what, error, at } => html! {
            span.badge.bad { (what) " failed" } " at " (at.format("%H:%M:%S")) " UTC: " (error)
        },
        Action::Retried { message, at } => html! {
            span.badge.ok { "retried" } " at " (at.format("%H:%M:%S")) " UTC: " (message)
        },
    }
}

pub(crate) fn tail_page(ctx: &Ctx, head: i64, recent: &[Ev]) -> Markup {
    let body = html! {
        p.note { span #tail-status .badge .muted { "connecting…" } " New events appear at the top as they are committed." }
        div data-tail=(ctx.link("/tail/events")) {
            (events_table(ctx, recent, Some("tail")))
        }
        script src=(ctx.link("/assets/tail.js")) {}
    };
    layout(ctx, Tab::Tail, "Live tail", head, body)
}

pub(crate) fn message_page(ctx: &Ctx, head: i64, heading: &str, text: &str) -> Markup {
    layout(
        ctx,
        Tab::None,
        heading,
        head,
        html! { p.error { (text) } p { a href=(ctx.link("/")) { "Back to the log" } } },
    )
}

/// The stylesheet.
pub(crate) const STYLE: &str = include_str!("../assets/style.css");
/// The live tail's script: an `EventSource` that inserts the server's rows.
pub(crate) const TAIL_JS: &str = include_str!("../assets/tail.js");
