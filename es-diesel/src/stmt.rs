//! Hand-written statements that Diesel can cache as prepared statements.
//!
//! `diesel::sql_query` marks itself unsafe to cache, so every call would be
//! parsed and planned again by the server. The store's hot statements (append,
//! stream reads) have a fixed text per shape, so they go through [`Stmt`],
//! which Diesel caches by its SQL text.

use chrono::NaiveDateTime;
use diesel::backend::Backend;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Integer, SmallInt, Text, Timestamp, Untyped};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, RunQueryDsl};
use std::marker::PhantomData;

/// One bound value.
#[derive(Debug)]
pub(crate) enum Bind<'a> {
    Text(&'a str),
    Owned(String),
    Int(i32),
    BigInt(i64),
    SmallInt(i16),
    Uuid(uuid::Uuid),
    Timestamp(NaiveDateTime),
    TextArray(&'a [&'a str]),
}

/// SQL text with `?` where values go (the backend writes its own placeholder
/// syntax), and the values in order. `ST` is the SQL type of its rows:
/// `Untyped` rows load by column name (`QueryableByName`); a tuple of SQL
/// types loads by position, without name look-ups.
#[derive(Debug)]
pub(crate) struct Stmt<'a, DB, ST = Untyped> {
    sql: &'a str,
    binds: Vec<Bind<'a>>,
    cache: bool,
    backend: PhantomData<(DB, ST)>,
}

impl<'a, DB, ST> Stmt<'a, DB, ST> {
    pub(crate) fn new(sql: &'a str) -> Self {
        Stmt {
            sql,
            binds: Vec::new(),
            cache: true,
            backend: PhantomData,
        }
    }

    pub(crate) fn with_capacity(sql: &'a str, binds: usize) -> Self {
        Stmt {
            sql,
            binds: Vec::with_capacity(binds),
            cache: true,
            backend: PhantomData,
        }
    }

    pub(crate) fn bind(mut self, value: Bind<'a>) -> Self {
        self.binds.push(value);
        self
    }

    pub(crate) fn push(&mut self, value: Bind<'a>) {
        self.binds.push(value);
    }

    /// Plans this statement per call instead of keeping it prepared: for
    /// texts whose shape varies (each shape would stay in the connection's
    /// statement cache for good).
    pub(crate) fn dont_cache(&mut self) {
        self.cache = false;
    }
}

impl<DB, ST> QueryId for Stmt<'_, DB, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB: Backend, ST> Query for Stmt<'_, DB, ST> {
    type SqlType = ST;
}

impl<Conn, DB, ST> RunQueryDsl<Conn> for Stmt<'_, DB, ST> {}

fn walk<'b, DB>(
    sql: &'b str,
    binds: &'b [Bind<'_>],
    cache: bool,
    mut out: AstPass<'_, 'b, DB>,
    push: impl Fn(&'b Bind<'_>, &mut AstPass<'_, 'b, DB>) -> QueryResult<()>,
) -> QueryResult<()>
where
    DB: Backend,
{
    if !cache {
        out.unsafe_to_cache_prepared();
    }
    let mut parts = sql.split('?');
    if let Some(first) = parts.next() {
        out.push_sql(first);
    }
    let mut values = binds.iter();
    for part in parts {
        let value = values.next().ok_or_else(|| {
            diesel::result::Error::QueryBuilderError(
                "statement has more placeholders than values".into(),
            )
        })?;
        push(value, &mut out)?;
        out.push_sql(part);
    }
    if values.next().is_some() {
        return Err(diesel::result::Error::QueryBuilderError(
            "statement has more values than placeholders".into(),
        ));
    }
    Ok(())
}

impl<ST> QueryFragment<Pg> for Stmt<'_, Pg, ST> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk(self.sql, &self.binds, self.cache, out, |b, out| match b {
            Bind::Text(s) => out.push_bind_param::<Text, _>(*s),
            Bind::Owned(s) => out.push_bind_param::<Text, _>(s),
            Bind::Int(v) => out.push_bind_param::<Integer, _>(v),
            Bind::BigInt(v) => out.push_bind_param::<BigInt, _>(v),
            Bind::SmallInt(v) => out.push_bind_param::<SmallInt, _>(v),
            Bind::Uuid(v) => out.push_bind_param::<diesel::sql_types::Uuid, _>(v),
            Bind::Timestamp(v) => out.push_bind_param::<Timestamp, _>(v),
            Bind::TextArray(v) => out.push_bind_param::<Array<Text>, _>(v),
        })
    }
}

impl<ST> QueryFragment<Sqlite> for Stmt<'_, Sqlite, ST> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        walk(self.sql, &self.binds, self.cache, out, |b, out| match b {
            Bind::Text(s) => out.push_bind_param::<Text, _>(*s),
            Bind::Owned(s) => out.push_bind_param::<Text, _>(s),
            Bind::Int(v) => out.push_bind_param::<Integer, _>(v),
            Bind::BigInt(v) => out.push_bind_param::<BigInt, _>(v),
            Bind::SmallInt(v) => out.push_bind_param::<SmallInt, _>(v),
            Bind::Timestamp(v) => out.push_bind_param::<Timestamp, _>(v),
            Bind::Uuid(_) | Bind::TextArray(_) => Err(diesel::result::Error::QueryBuilderError(
                "SQLite has no UUID or array parameters: bind text, one value each".into(),
            )),
        })
    }
}
