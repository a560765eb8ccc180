//! The browser's queries: hand-written SQL over the store's tables, with
//! the few texts that differ per backend, run on the store's own
//! connections. Every page reads a bounded number of rows through an index
//! (keyset pagination on `global_position`); see [`crate::migrate`] for the
//! indexes the filters use.

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::mysql::Mysql;
use diesel::pg::Pg;
use diesel::query_builder::BoxedSqlQuery;
use diesel::sql_types::{BigInt, Nullable, SmallInt, Text, Timestamp, Timestamptz};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, QueryableByName, RunQueryDsl};
use es_diesel::{Backend, DbConnection, RecordedEvent};

/// A bound value.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Text(String),
    BigInt(i64),
    Time(DateTime<Utc>),
}

/// `?` placeholders as PostgreSQL's `$1`, `$2`, ... (no statement here has a
/// `?` anywhere else).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A raw query on backend `DB`, with its binds.
type Query<'f, DB> = BoxedSqlQuery<'f, DB, diesel::query_builder::SqlQuery>;

/// Binds `binds` in order; `time` binds a timestamp as the backend
/// stores `created_at` (without time zone on SQLite and MySQL, with one on
/// PostgreSQL).
fn bind<'f, DB>(
    mut q: Query<'f, DB>,
    binds: &[Val],
    time: fn(Query<'f, DB>, &DateTime<Utc>) -> Query<'f, DB>,
) -> Query<'f, DB>
where
    DB: diesel::backend::Backend
        + diesel::sql_types::HasSqlType<Text>
        + diesel::sql_types::HasSqlType<BigInt>,
    String: diesel::serialize::ToSql<Text, DB>,
    i64: diesel::serialize::ToSql<BigInt, DB>,
{
    for b in binds {
        q = match b {
            Val::Text(s) => q.bind::<Text, _>(s.clone()),
            Val::BigInt(n) => q.bind::<BigInt, _>(*n),
            Val::Time(t) => time(q, t),
        };
    }
    q
}

/// Runs `sql` (with `?` placeholders) and loads its rows by column name.
pub(crate) fn load<R>(conn: &mut DbConnection, sql: &str, binds: &[Val]) -> QueryResult<Vec<R>>
where
    R: QueryableByName<Sqlite> + QueryableByName<Pg> + QueryableByName<Mysql> + 'static,
{
    match conn {
        DbConnection::Sqlite(c) => bind(
            diesel::sql_query(sql).into_boxed::<Sqlite>(),
            binds,
            |q, t| q.bind::<Timestamp, _>(t.naive_utc()),
        )
        .load(c),
        DbConnection::Postgres(c) => bind(
            diesel::sql_query(numbered(sql)).into_boxed::<Pg>(),
            binds,
            |q, t| q.bind::<Timestamptz, _>(*t),
        )
        .load(c),
        DbConnection::Mysql(c) => bind(
            diesel::sql_query(sql).into_boxed::<Mysql>(),
            binds,
            |q, t| q.bind::<Timestamp, _>(t.naive_utc()),
        )
        .load(c),
    }
}

/// Runs a statement that returns no rows.
pub(crate) fn execute(conn: &mut DbConnection, sql: &str) -> QueryResult<usize> {
    match conn {
        DbConnection::Sqlite(c) => diesel::sql_query(sql).execute(c),
        DbConnection::Postgres(c) => diesel::sql_query(sql).execute(c),
        DbConnection::Mysql(c) => diesel::sql_query(sql).execute(c),
    }
}

/// `SELECT .. AS n` of a number that may be NULL.
#[derive(QueryableByName)]
pub(crate) struct MaybeNumber {
    #[diesel(sql_type = Nullable<BigInt>)]
    pub n: Option<i64>,
}

/// `SELECT .. AS n` of a number.
#[derive(QueryableByName)]
pub(crate) struct Number {
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// An event row as the pages show it.
#[derive(QueryableByName, Clone, Debug)]
pub(crate) struct Ev {
    #[diesel(sql_type = BigInt)]
    pub global_position: i64,
    #[diesel(sql_type = Text)]
    pub event_id: String,
    #[diesel(sql_type = Text)]
    pub stream_id: String,
    #[diesel(sql_type = BigInt)]
    pub stream_version: i64,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = SmallInt)]
    pub event_version: i16,
    #[diesel(sql_type = Text)]
    pub payload: String,
    #[diesel(sql_type = Text)]
    pub metadata: String,
    #[diesel(sql_type = Timestamp)]
    pub created_at: NaiveDateTime,
}

impl From<&RecordedEvent> for Ev {
    fn from(e: &RecordedEvent) -> Self {
        Ev {
            global_position: e.global_position,
            event_id: e.event_id.to_string(),
            stream_id: e.stream_id.clone(),
            stream_version: e.stream_version,
            event_type: e.event_type.clone(),
            event_version: i16::try_from(e.event_version).unwrap_or(i16::MAX),
            payload: e.payload().to_owned(),
            metadata: e.metadata.to_json(),
            created_at: e.created_at.naive_utc(),
        }
    }
}

impl Ev {
    /// A metadata key's value, when it is a string.
    pub(crate) fn meta(&self, key: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.metadata).ok()?;
        v.get(key)?.as_str().map(str::to_owned)
    }
}

fn columns(b: Backend) -> &'static str {
    match b {
        Backend::Postgres => {
            "global_position, event_id::text AS event_id, stream_id, stream_version, event_type, \
             event_version, payload::text AS payload, metadata::text AS metadata, \
             (created_at AT TIME ZONE 'UTC') AS created_at"
        }
        Backend::Sqlite | Backend::Mysql => {
            "global_position, event_id, stream_id, stream_version, event_type, \
             event_version, payload, metadata, created_at"
        }
    }
}

/// The expression of a metadata key's text, as the indexes of
/// [`crate::migrate`] have it.
fn meta_expr(b: Backend, key: &str) -> String {
    match b {
        Backend::Sqlite => format!("json_extract(metadata, '$.{key}')"),
        Backend::Postgres => format!("(metadata->>'{key}')"),
        Backend::Mysql => format!("JSON_UNQUOTE(JSON_EXTRACT(metadata, '$.{key}'))"),
    }
}

/// The longest stream-id prefix the PostgreSQL prefix index holds.
const PREFIX_INDEXED: usize = 200;

/// The indexes the browser's filters use, per backend. Created by
/// [`crate::migrate`]; every page works without them, only slower.
pub(crate) fn index_statements(b: Backend) -> Vec<String> {
    let mut statements = match b {
        // Stream ids may be longer than a btree entry: their first
        // characters are indexed, the rest compared on the rows.
        Backend::Postgres => vec![format!(
            "CREATE INDEX IF NOT EXISTS es_web_events_stream ON es_events ((left(stream_id, {PREFIX_INDEXED})) COLLATE \"C\", global_position)"
        )],
        Backend::Sqlite => Vec::new(),
        // MySQL has no CREATE INDEX IF NOT EXISTS (MariaDB has).
        Backend::Mysql => return Vec::new(),
    };
    for (name, key) in [
        ("correlation", "correlation_id"),
        ("causation", "causation_id"),
    ] {
        statements.push(format!(
            "CREATE INDEX IF NOT EXISTS es_web_events_{name} ON es_events ({}, global_position)",
            meta_expr(b, key)
        ));
    }
    statements
        .push("CREATE INDEX IF NOT EXISTS es_web_events_time ON es_events (created_at)".to_owned());
    statements
}

/// What the log page filters by.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Filter {
    pub stream: Option<String>,
    pub event_type: Option<String>,
    pub correlation: Option<String>,
    pub causation: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl Filter {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

/// Which page of the log: the newest, older than a position, or newer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Page {
    Newest,
    Before(i64),
    After(i64),
}

/// A page of the log, newest first.
pub(crate) struct LogPage {
    pub events: Vec<Ev>,
    /// There are older events matching the filter.
    pub older: bool,
    /// There are newer events matching the filter.
    pub newer: bool,
}

/// The conditions of `filter` and their values.
fn conditions(
    conn: &mut DbConnection,
    filter: &Filter,
) -> QueryResult<Option<(Vec<String>, Vec<Val>)>> {
    let b = conn.backend();
    let mut conds = Vec::new();
    let mut binds = Vec::new();
    if let Some(prefix) = &filter.stream {
        // A range on the index, then the exact prefix on the row: U+10FFFF
        // sorts after any other character, byte for byte.
        match b {
            Backend::Postgres => {
                let head: String = prefix.chars().take(PREFIX_INDEXED).collect();
                let e = format!("left(stream_id, {PREFIX_INDEXED}) COLLATE \"C\"");
                conds.push(format!(
                    "{e} >= ? AND {e} < ? AND starts_with(stream_id, ?)"
                ));
                binds.push(Val::Text(head.clone()));
                binds.push(Val::Text(format!("{head}\u{10FFFF}")));
                binds.push(Val::Text(prefix.clone()));
            }
            Backend::Sqlite => {
                conds.push(
                    "stream_id >= ? AND stream_id < ? AND substr(stream_id, 1, ?) = ?".to_owned(),
                );
                binds.push(Val::Text(prefix.clone()));
                binds.push(Val::Text(format!("{prefix}\u{10FFFF}")));
                binds.push(Val::BigInt(prefix.chars().count() as i64));
                binds.push(Val::Text(prefix.clone()));
            }
            Backend::Mysql => {
                conds.push("LEFT(stream_id, ?) = ?".to_owned());
                binds.push(Val::BigInt(prefix.chars().count() as i64));
                binds.push(Val::Text(prefix.clone()));
            }
        }
    }
    if let Some(t) = &filter.event_type {
        conds.push("event_type = ?".to_owned());
        binds.push(Val::Text(t.clone()));
    }
    for (key, value) in [
        ("correlation_id", &filter.correlation),
        ("causation_id", &filter.causation),
    ] {
        if let Some(v) = value {
            conds.push(format!("{} = ?", meta_expr(b, key)));
            binds.push(Val::Text(v.clone()));
        }
    }
    if filter.from.is_some() || filter.to.is_some() {
        // The time range as a range of positions, found through the time
        // index. Positions follow time but for commits that overlap, so the
        // bounds are taken over the 1,000 events nearest each end.
        if let Some(from) = filter.from {
            let lo = load::<MaybeNumber>(
                conn,
                "SELECT MIN(global_position) AS n FROM (SELECT global_position FROM es_events \
                 WHERE created_at >= ? ORDER BY created_at LIMIT 1000) t",
                &[Val::Time(from)],
            )?
            .pop()
            .and_then(|r| r.n);
            let Some(lo) = lo else { return Ok(None) };
            conds.push("global_position >= ? AND created_at >= ?".to_owned());
            binds.push(Val::BigInt(lo));
            binds.push(Val::Time(from));
        }
        if let Some(to) = filter.to {
            let hi = load::<MaybeNumber>(
                conn,
                "SELECT MAX(global_position) AS n FROM (SELECT global_position FROM es_events \
                 WHERE created_at < ? ORDER BY created_at DESC LIMIT 1000) t",
                &[Val::Time(to)],
            )?
            .pop()
            .and_then(|r| r.n);
            let Some(hi) = hi else { return Ok(None) };
            conds.push("global_position <= ? AND created_at < ?".to_owned());
            binds.push(Val::BigInt(hi));
            binds.push(Val::Time(to));
        }
    }
    Ok(Some((conds, binds)))
}

/// Rows of the newest window a scan by position looks at before it asks
/// the filter's index instead.
const PROBE: i64 = 2_000;

/// One page of the log matching `filter`, newest first, and whether there
/// are more on either side.
pub(crate) fn log_page(
    conn: &mut DbConnection,
    filter: &Filter,
    page: Page,
    size: usize,
) -> QueryResult<LogPage> {
    let b = conn.backend();
    let Some((mut conds, mut binds)) = conditions(conn, filter)? else {
        return Ok(LogPage {
            events: Vec::new(),
            older: false,
            newer: false,
        });
    };
    let (order, descending) = match page {
        Page::Newest => ("DESC", true),
        Page::Before(p) => {
            conds.push("global_position < ?".to_owned());
            binds.push(Val::BigInt(p));
            ("DESC", true)
        }
        Page::After(p) => {
            conds.push("global_position > ?".to_owned());
            binds.push(Val::BigInt(p));
            ("ASC", false)
        }
    };
    let limit = size as i64 + 1;
    let wher = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let cols = columns(b);
    // A stream prefix or a time range alone: the newest rows by position
    // usually hold a page; when they do not, the filter is selective and
    // its index finds the rows.
    let probe_first = descending
        && (filter.stream.is_some() || filter.from.is_some() || filter.to.is_some())
        && filter.event_type.is_none()
        && filter.correlation.is_none()
        && filter.causation.is_none();
    let mut rows: Vec<Ev> = Vec::new();
    let mut done = false;
    if probe_first {
        let (window, mut wbinds) = match page {
            Page::Before(p) => ("WHERE global_position < ?", vec![Val::BigInt(p)]),
            _ => ("", Vec::new()),
        };
        wbinds.push(Val::BigInt(PROBE));
        wbinds.extend(binds.iter().cloned());
        wbinds.push(Val::BigInt(limit));
        let sql = format!(
            "SELECT {cols} FROM (SELECT * FROM es_events {window} ORDER BY global_position DESC LIMIT ?) w \
             {wher} ORDER BY global_position DESC LIMIT ?"
        );
        rows = load(conn, &sql, &wbinds)?;
        done = rows.len() as i64 == limit;
    }
    if !done {
        binds.push(Val::BigInt(limit));
        let sql =
            format!("SELECT {cols} FROM es_events {wher} ORDER BY global_position {order} LIMIT ?");
        rows = load(conn, &sql, &binds)?;
    }
    let more = rows.len() as i64 == limit;
    rows.truncate(size);
    if !descending {
        rows.reverse();
    }
    let (older, newer) = match page {
        Page::Newest => (more, false),
        Page::Before(_) => (more, true),
        Page::After(_) => (true, more),
    };
    Ok(LogPage {
        events: rows,
        older,
        newer,
    })
}

/// The event at `position`.
pub(crate) fn event_at(conn: &mut DbConnection, position: i64) -> QueryResult<Option<Ev>> {
    let sql = format!(
        "SELECT {} FROM es_events WHERE global_position = ?",
        columns(conn.backend())
    );
    Ok(load::<Ev>(conn, &sql, &[Val::BigInt(position)])?.pop())
}

/// The event whose id is `id`, if `id` is an event id at all.
pub(crate) fn event_by_id(conn: &mut DbConnection, id: &str) -> QueryResult<Option<Ev>> {
    let Ok(id) = uuid::Uuid::parse_str(id) else {
        return Ok(None);
    };
    let b = conn.backend();
    let cond = match b {
        Backend::Postgres => "event_id = CAST(? AS uuid)",
        _ => "event_id = ?",
    };
    let sql = format!("SELECT {} FROM es_events WHERE {cond}", columns(b));
    Ok(load::<Ev>(conn, &sql, &[Val::Text(id.hyphenated().to_string())])?.pop())
}

/// How many events of each type the log holds, with the last position.
#[derive(QueryableByName, Clone, Debug)]
pub(crate) struct TypeCount {
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = BigInt)]
    pub n: i64,
    #[diesel(sql_type = BigInt)]
    pub last: i64,
}

/// Counts per event type: one pass over the type index (an index-only
/// scan; the page times in the README show what it costs).
pub(crate) fn type_counts(conn: &mut DbConnection) -> QueryResult<Vec<TypeCount>> {
    load(
        conn,
        "SELECT event_type, COUNT(*) AS n, MAX(global_position) AS last FROM es_events \
         GROUP BY event_type ORDER BY event_type",
        &[],
    )
}

/// The rows of a read model's table.
pub(crate) fn row_count(conn: &mut DbConnection, table: &str) -> QueryResult<i64> {
    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
    Ok(
        load::<Number>(conn, &format!("SELECT COUNT(*) AS n FROM {quoted}"), &[])?
            .pop()
            .map_or(0, |r| r.n),
    )
}

/// The highest position.
pub(crate) fn head(conn: &mut DbConnection) -> QueryResult<i64> {
    Ok(load::<Number>(
        conn,
        "SELECT COALESCE(MAX(global_position), 0) AS n FROM es_events",
        &[],
    )?
    .pop()
    .map_or(0, |r| r.n))
}

/// PostgreSQL: the lowest order key an append still in flight may write
/// (`None` while one is between announcing itself and drawing its key).
pub(crate) fn follow_horizon(conn: &mut DbConnection) -> QueryResult<Option<i64>> {
    Ok(
        load::<MaybeNumber>(conn, "SELECT es_follow_horizon() AS n", &[])?
            .pop()
            .and_then(|r| r.n),
    )
}

/// PostgreSQL: positions of the visible events with an order key of at
/// least `key`.
pub(crate) fn positions_from_key(conn: &mut DbConnection, key: i64) -> QueryResult<Vec<i64>> {
    Ok(load::<Number>(
        conn,
        "SELECT global_position AS n FROM es_events WHERE order_key >= ?",
        &[Val::BigInt(key)],
    )?
    .into_iter()
    .map(|r| r.n)
    .collect())
}
