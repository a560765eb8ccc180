//! Everything that differs between databases: connections, placeholders,
//! DDL, upserts, locks, the follow horizon, wake-ups, the database clock.
//!
//! The rest of the crate writes statements with `?` placeholders
//! ([`Stmt`]) in SQL that every backend accepts, and asks the connection's
//! [`Dialect`] for anything else. A backend is one module implementing
//! [`Dialect`] (`sqlite`, `postgres`, `mysql`), one variant of [`Backend`] and of
//! [`DbConnection`]: the `match`es on them live in this folder only.

mod connection;
mod insert;
mod mysql;
mod postgres;
pub(crate) mod rows;
pub(crate) mod shadow;
mod sqlite;
mod stmt;
mod writer_queue;

pub(crate) use connection::{
    in_transaction, note_if_connection_lost, parse_url, private_write_transaction,
    read_only_snapshot, statement_turn, Listener, LogMark,
};
pub use connection::{write_transaction, DbConnection, Manager, SqliteSync, StoreOptions};
pub(crate) use insert::{cached_shape, CHUNK};
pub(crate) use postgres::refused;
pub(crate) use stmt::{Bind, Marked, SqlText, Stmt};
pub(crate) use writer_queue::Turn;

use crate::error::Result;
use es_core::view::ColumnType;
use es_core::{ExpectedVersion, NewEvent, Query};
use rows::{Appended, EventTuple};

/// Which columns of an event a reader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Columns {
    /// The whole recorded event.
    Envelope,
    /// Its position, type, type version and payload: the rest of the
    /// [`EventTuple`] is left empty (a nil id, an empty stream, version 0,
    /// empty metadata, the Unix epoch), for consumers that never look at it.
    Payload,
}

impl Columns {
    /// The select list of these columns on `d`.
    pub(crate) fn of(self, d: &dyn Dialect) -> &'static str {
        match self {
            Columns::Envelope => d.event_columns(),
            Columns::Payload => d.payload_columns(),
        }
    }
}

/// How many backends there are (the variants of [`Backend`]).
pub(crate) const BACKENDS: usize = 3;

/// A SQL text built once per backend, at the first use on it, its
/// placeholders [`Marked`]: `d` names a
/// `&'static dyn Dialect` in scope, and the expression builds the text.
macro_rules! per_backend {
    ($d:ident => $make:expr) => {{
        static TEXTS: [std::sync::OnceLock<$crate::backend::Marked>; $crate::backend::BACKENDS] =
            [const { std::sync::OnceLock::new() }; $crate::backend::BACKENDS];
        let d: &'static dyn $crate::backend::Dialect = $d;
        TEXTS[d.backend() as usize].get_or_init(|| $crate::backend::Marked::new($make))
    }};
}
pub(crate) use per_backend;

/// The database behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dialect().name())
    }
}

impl Backend {
    /// Every backend, in the order of their [`BACKENDS`] slots.
    pub(crate) const ALL: [Backend; BACKENDS] =
        [Backend::Sqlite, Backend::Postgres, Backend::Mysql];

    /// `per_backend!` keeps a backend's texts in slot `backend as usize`.
    const SLOTS_MATCH: () = {
        let mut i = 0;
        while i < BACKENDS {
            assert!(Backend::ALL[i] as usize == i);
            i += 1;
        }
    };

    /// What this backend's SQL looks like.
    pub(crate) fn dialect(self) -> &'static dyn Dialect {
        let () = Self::SLOTS_MATCH;
        match self {
            Backend::Sqlite => &sqlite::Sqlite,
            Backend::Postgres => &postgres::Postgres,
            Backend::Mysql => &mysql::Mysql,
        }
    }
}

impl DbConnection {
    pub fn backend(&self) -> Backend {
        match self {
            DbConnection::Postgres(_) => Backend::Postgres,
            DbConnection::Sqlite(_) => Backend::Sqlite,
            DbConnection::Mysql(_) => Backend::Mysql,
        }
    }

    /// What this connection's SQL looks like.
    pub(crate) fn dialect(&self) -> &'static dyn Dialect {
        self.backend().dialect()
    }
}

/// What differs between backends. Default methods give SQL that every
/// backend so far accepts; a backend overrides what it spells differently.
pub(crate) trait Dialect: Send + Sync {
    fn backend(&self) -> Backend;

    /// The name in messages: `sqlite`, `postgres`, `mysql`.
    fn name(&self) -> &'static str;

    /// The columns of `es_events` as [`rows::EventSql`] reads them.
    fn event_columns(&self) -> &'static str;

    /// The columns of [`Columns::Payload`], as [`rows::PayloadSql`] reads them.
    fn payload_columns(&self) -> &'static str {
        "global_position, event_type, event_version, payload"
    }

    /// What a fold reads of an event, as `read::FoldRow`: position,
    /// stream version, type, type version and payload text.
    fn fold_columns(&self) -> &'static str {
        "global_position, stream_version, event_type, event_version, payload"
    }

    /// `LIMIT` with the row count as a bound value.
    fn limit(&self) -> &'static str {
        "LIMIT ?"
    }

    /// The condition selecting the rows of one stream of `es_events` (or of
    /// a table with a `stream_id` column), with [`Dialect::stream_binds`]
    /// placeholders for the stream id: see [`Dialect::push_stream`].
    fn stream_is(&self) -> &'static str {
        "stream_id = ?"
    }

    /// How many times [`Dialect::stream_is`] takes the stream id.
    fn stream_binds(&self) -> usize {
        1
    }

    /// The right-hand side of `expr IN values` and its bound values: one
    /// array on backends that have them, one placeholder per value otherwise.
    /// An empty list matches nothing.
    fn any_of<'a>(&self, values: &'a [&'a str], of: ListOf) -> (String, Vec<Bind<'a>>) {
        let _ = of;
        if values.is_empty() {
            // `IN ()` is not SQL; no event type or id is empty.
            return ("IN (?)".to_owned(), vec![Bind::Text("")]);
        }
        let marks = vec!["?"; values.len()].join(", ");
        (
            format!("IN ({marks})"),
            values.iter().map(|v| Bind::Text(v)).collect(),
        )
    }

    /// The condition `event_type` is one of `types` (not empty), and its
    /// bound values.
    fn type_is_any_of<'a>(&self, types: &'a [&'a str]) -> (String, Vec<Bind<'a>>) {
        let (any, binds) = self.any_of(types, ListOf::Text);
        (format!("event_type {any}"), binds)
    }

    /// The statements of every migration of the store's schema, by version
    /// (see `crate::schema::migrations`); "" where this backend needs none.
    fn migrations(&self) -> &'static [(i32, &'static str)];

    /// First in the migration transaction: makes concurrent `migrate`s
    /// wait for each other, where the transaction alone does not.
    fn lock_migrations(&self, conn: &mut DbConnection) -> Result<()> {
        let _ = conn;
        Ok(())
    }

    /// After the migration transaction, whatever its outcome: releases what
    /// [`Dialect::lock_migrations`] took beyond the transaction.
    fn unlock_migrations(&self, conn: &mut DbConnection) {
        let _ = conn;
    }

    /// The start and end of an INSERT that skips rows whose key exists.
    fn insert_ignore(&self) -> (&'static str, &'static str) {
        ("INSERT", " ON CONFLICT DO NOTHING")
    }

    /// A query of `n`: 1 when a table or view named `name` is visible to
    /// the connection (on PostgreSQL, through its `search_path`, as queries
    /// see it), 0 otherwise.
    fn relation_exists(&self, name: &str) -> Stmt<'static>;

    /// A stored timestamp column as a UTC timestamp without time zone.
    fn utc_timestamp(&self, column: &str) -> String {
        column.to_owned()
    }

    /// The field `key` of the JSON column `json` as SQL type `ty`.
    fn json_field(&self, json: &str, key: &str, ty: ColumnType) -> String;

    /// A JSON (or UUID) column as text.
    fn as_text(&self, column: &str) -> String {
        column.to_owned()
    }

    /// Saves the JSON `state` as the snapshot of `stream` for
    /// `aggregate_type` at `stream_version`, unless a snapshot of the same
    /// shape at that version or later is stored.
    fn save_snapshot<'a>(
        &self,
        aggregate_type: &'a str,
        stream: &'a str,
        shape: i64,
        stream_version: i64,
        state: &'a str,
    ) -> Stmt<'a>;

    /// Appending to one stream is one statement, atomic without a
    /// transaction around it.
    fn one_statement_append(&self) -> bool {
        false
    }

    /// Each stream has an append lock of its own, which every insert into
    /// the stream takes before it writes (then a write that takes tag
    /// locks takes its streams' locks first). Otherwise one lock covers
    /// every stream.
    fn locks_each_stream(&self) -> bool {
        false
    }

    /// One writer at a time: appends inside a write transaction never race
    /// each other (no row a concurrent projector may insert first), and
    /// positions become visible in order, so a follower's checkpoint is
    /// just a position.
    fn serial_writers(&self) -> bool {
        false
    }

    /// Takes the append locks of these streams (serializing appends with
    /// `ExpectedVersion::Any`, and ordering writes of several streams),
    /// before the inserts, in the order of the stream ids.
    fn lock_streams(&self, conn: &mut DbConnection, streams: &[&str]) -> Result<()> {
        let _ = (conn, streams);
        Ok(())
    }

    /// After [`Dialect::lock_streams`], before the inserts of an append that
    /// writes events with `tags` (sorted, distinct) or has a `condition`
    /// (the query of an [`AppendCondition`](crate::AppendCondition)): takes
    /// what makes the check of the condition and the append's commit one
    /// step for every other writer, so that no event the query matches
    /// commits in between. Backends with one writer at a time have nothing
    /// to take. Where [`Dialect::locks_each_stream`], the append locks of
    /// `streams` come here instead of to `lock_streams`, to be taken first,
    /// in the same round trip.
    fn lock_tags(
        &self,
        conn: &mut DbConnection,
        streams: &[&str],
        tags: &[&str],
        condition: Option<&Query>,
    ) -> Result<()> {
        let _ = (conn, streams, tags, condition);
        Ok(())
    }

    /// Inserts `chunk` (at most [`CHUNK`] events) at the end of `stream` if
    /// it is at the `expected` version; no row when it is not (nothing is
    /// written then). The rows come in stream-version order.
    fn insert_events(
        &self,
        conn: &mut DbConnection,
        stream: &str,
        expected: ExpectedVersion,
        chunk: &[NewEvent],
    ) -> Result<Vec<Appended>>;

    /// Appends `chunk` as [`insert_events`](Self::insert_events) does and
    /// writes the read-model `rows` in the same statement, committing by
    /// itself, each row only if no other writer changed it since it was
    /// read. No rows when the stream was not at the expected version;
    /// `Ok(None)` when the backend has no such statement or refused it (a
    /// row moved on): nothing was written either way.
    fn insert_events_guarded(
        &self,
        conn: &mut DbConnection,
        stream: &str,
        expected: ExpectedVersion,
        chunk: &[NewEvent],
        rows: &[crate::read_model::GuardedRow],
    ) -> Result<Option<Vec<Appended>>> {
        let _ = (conn, stream, expected, chunk, rows);
        Ok(None)
    }

    /// Whether [`insert_events_guarded`](Self::insert_events_guarded) can write.
    fn guards_rows(&self) -> bool {
        false
    }

    /// Whether a runner can watch the log for appends on a connection of
    /// its own ([`Manager::listen`]) instead of waiting its idle poll.
    fn watches_appends(&self) -> bool {
        false
    }

    /// Up to `limit` events after the checkpoint (`after_key`,
    /// `after_position`) that no event committed later can precede, only of
    /// `types` if given, in follow order, each with its order key: see
    /// [`crate::follow`].
    fn read_after(
        &self,
        conn: &mut DbConnection,
        after_key: i64,
        after_position: i64,
        types: Option<&[&str]>,
        limit: i64,
        columns: Columns,
    ) -> Result<Vec<(EventTuple, i64)>>;

    /// [`Dialect::read_after`] of every visible event, beyond the horizon too.
    fn read_visible_after(
        &self,
        conn: &mut DbConnection,
        after_key: i64,
        after_position: i64,
        types: &[&str],
        limit: i64,
        columns: Columns,
    ) -> Result<Vec<(EventTuple, i64)>> {
        self.read_after(conn, after_key, after_position, Some(types), limit, columns)
    }

    /// How many events of `types` after the checkpoint are visible but
    /// beyond the horizon.
    fn count_visible_after(
        &self,
        conn: &mut DbConnection,
        after_key: i64,
        after_position: i64,
        types: &[&str],
    ) -> Result<u64> {
        let _ = (conn, after_key, after_position, types);
        Ok(0)
    }

    /// The follow horizon once every append in flight has published its
    /// order key (waiting for that), or `None` where there is no horizon
    /// because positions become visible in order.
    fn settled_horizon(&self, conn: &mut DbConnection) -> Result<Option<i64>> {
        let _ = conn;
        Ok(None)
    }

    /// `es_events` for a query of several event types in position order: read
    /// along the positions. With an index on (type, position), a planner
    /// that reads each type's range would sort all the matches after the
    /// start before returning the first page, which makes paging through a
    /// log quadratic. One type reads its range of that index, in order.
    fn events_in_position_order(&self, types: usize) -> &'static str {
        let _ = types;
        "es_events"
    }

    /// Before reading the whole log (a rebuild): makes sure the planner
    /// knows the log's size, where it plans by statistics.
    fn prepare_full_scan(&self, conn: &mut DbConnection) {
        let _ = conn;
    }

    /// The database clock in milliseconds since the epoch, as an expression.
    fn now_ms(&self) -> &'static str;
}

/// `s` as an SQL string literal.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `s` as an SQL identifier (ANSI double quotes, which every backend so far
/// accepts).
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// One value for each backend, such as the DDL `#[derive(ReadModel)]`
/// generates per backend.
pub(crate) struct PerBackend<T> {
    pub sqlite: T,
    pub postgres: T,
    pub mysql: T,
}

impl<T> PerBackend<T> {
    pub(crate) fn get(self, backend: Backend) -> T {
        match backend {
            Backend::Sqlite => self.sqlite,
            Backend::Postgres => self.postgres,
            Backend::Mysql => self.mysql,
        }
    }
}

/// The type of the values of [`Dialect::any_of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListOf {
    Text,
    /// UUIDs given as text.
    Uuid,
}

/// [`Dialect::read_after`] where positions become visible in order: by
/// position alone (the order key is 0).
fn read_by_position(
    d: &dyn Dialect,
    conn: &mut DbConnection,
    after_position: i64,
    types: Option<&[&str]>,
    limit: i64,
    columns: Columns,
) -> Result<Vec<(EventTuple, i64)>> {
    let (filter, binds) = match types {
        Some(types) if !types.is_empty() => {
            let (is, binds) = d.type_is_any_of(types);
            (format!("AND {is}"), binds)
        }
        Some(_) => ("AND event_type IN (?)".to_owned(), vec![Bind::Text("")]),
        None => (String::new(), Vec::new()),
    };
    let from = d.events_in_position_order(types.map_or(0, <[&str]>::len));
    let sql = format!(
        "SELECT {} FROM {from} WHERE global_position > ? {filter} \
         ORDER BY global_position {}",
        columns.of(d),
        d.limit()
    );
    let mut q = Stmt::new(sql).bind(Bind::BigInt(after_position));
    binds.into_iter().for_each(|b| q.push(b));
    q.push(Bind::BigInt(limit));
    Ok(match columns {
        Columns::Envelope => q
            .rows::<rows::EventSql>()
            .load::<EventTuple>(conn)?
            .into_iter()
            .map(|row| (row, 0))
            .collect(),
        Columns::Payload => q
            .rows::<rows::PayloadSql>()
            .load::<rows::PayloadTuple>(conn)?
            .into_iter()
            .map(|row| (rows::payload_only(row), 0))
            .collect(),
    })
}

impl dyn Dialect {
    /// The statements of migration `version` ("" when there are none).
    pub(crate) fn migration(&self, version: i32) -> &'static str {
        self.migrations()
            .iter()
            .find(|(v, _)| *v == version)
            .map_or("", |(_, sql)| sql)
    }

    /// Binds `stream` where [`Dialect::stream_is`] takes it.
    pub(crate) fn push_stream<'a, ST, K>(&self, q: &mut Stmt<'a, ST, K>, stream: &'a str) {
        for _ in 0..self.stream_binds() {
            q.push(Bind::Text(stream));
        }
    }
}
