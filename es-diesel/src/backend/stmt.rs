//! Hand-written statements: SQL text with `?` where values go, whatever the
//! backend (each renders its own placeholder syntax), run on any
//! [`DbConnection`], and cached as prepared statements.
//!
//! `diesel::sql_query` marks itself unsafe to cache, so every call would be
//! parsed and planned again by the server. Statements of a fixed text go
//! through [`Stmt`], which Diesel caches by its SQL text on the backend's own
//! connection type (not through `MultiConnection`, which would box every
//! bound value).

use super::DbConnection;
use chrono::NaiveDateTime;
use diesel::backend::Backend;
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::pg::{Pg, PgConnection};
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::query_dsl::LoadQuery;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, SmallInt, Text, Timestamp, Untyped};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::{QueryResult, RunQueryDsl};
use std::borrow::Cow;
use std::marker::PhantomData;

/// One bound value.
#[derive(Debug)]
pub(crate) enum Bind<'a> {
    Text(&'a str),
    Owned(String),
    Int(i32),
    BigInt(i64),
    NullableBigInt(Option<i64>),
    SmallInt(i16),
    Uuid(uuid::Uuid),
    Timestamp(NaiveDateTime),
    TextArray(&'a [&'a str]),
}

/// SQL text with `?` where values go, and the values in order. `ST` is the
/// SQL type of its rows: `Untyped` rows load by column name
/// (`QueryableByName`); a tuple of SQL types loads by position, without name
/// look-ups.
#[derive(Debug)]
pub(crate) struct Stmt<'a, ST = Untyped> {
    sql: Cow<'a, str>,
    binds: Vec<Bind<'a>>,
    cache: bool,
    rows: PhantomData<ST>,
}

impl<'a> Stmt<'a> {
    pub(crate) fn new(sql: impl Into<Cow<'a, str>>) -> Self {
        Self::with_capacity(sql, 0)
    }

    pub(crate) fn with_capacity(sql: impl Into<Cow<'a, str>>, binds: usize) -> Self {
        Stmt {
            sql: sql.into(),
            binds: Vec::with_capacity(binds),
            cache: true,
            rows: PhantomData,
        }
    }
}

impl<'a, ST> Stmt<'a, ST> {
    /// The same statement, its rows loaded by position as the SQL types `T`.
    pub(crate) fn rows<T>(self) -> Stmt<'a, T> {
        Stmt {
            sql: self.sql,
            binds: self.binds,
            cache: self.cache,
            rows: PhantomData,
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

    /// The same statement without caching (see [`Stmt::dont_cache`]).
    pub(crate) fn uncached(mut self) -> Self {
        self.cache = false;
        self
    }

    fn on<DB>(self) -> On<'a, DB, ST> {
        On {
            stmt: self,
            backend: PhantomData,
        }
    }

    pub(crate) fn execute(self, conn: &mut DbConnection) -> QueryResult<usize> {
        match conn {
            DbConnection::Postgres(c) => self.on::<Pg>().execute(c),
            DbConnection::Sqlite(c) => self.on::<Sqlite>().execute(c),
            DbConnection::Mysql(c) => self.on::<Mysql>().execute(c),
        }
    }

    pub(crate) fn load<U>(self, conn: &mut DbConnection) -> QueryResult<Vec<U>>
    where
        On<'a, Pg, ST>: LoadQuery<'a, PgConnection, U>,
        On<'a, Sqlite, ST>: LoadQuery<'a, SqliteConnection, U>,
        On<'a, Mysql, ST>: LoadQuery<'a, MysqlConnection, U>,
    {
        match conn {
            DbConnection::Postgres(c) => self.on::<Pg>().load(c),
            DbConnection::Sqlite(c) => self.on::<Sqlite>().load(c),
            DbConnection::Mysql(c) => self.on::<Mysql>().load(c),
        }
    }

    pub(crate) fn get_result<U>(self, conn: &mut DbConnection) -> QueryResult<U>
    where
        On<'a, Pg, ST>: LoadQuery<'a, PgConnection, U>,
        On<'a, Sqlite, ST>: LoadQuery<'a, SqliteConnection, U>,
        On<'a, Mysql, ST>: LoadQuery<'a, MysqlConnection, U>,
    {
        match conn {
            DbConnection::Postgres(c) => self.on::<Pg>().get_result(c),
            DbConnection::Sqlite(c) => self.on::<Sqlite>().get_result(c),
            DbConnection::Mysql(c) => self.on::<Mysql>().get_result(c),
        }
    }
}

/// A [`Stmt`] on one Diesel backend.
pub(crate) struct On<'a, DB, ST> {
    stmt: Stmt<'a, ST>,
    backend: PhantomData<DB>,
}

impl<DB, ST> QueryId for On<'_, DB, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<DB: Backend, ST> Query for On<'_, DB, ST> {
    type SqlType = ST;
}

impl<Conn, DB, ST> RunQueryDsl<Conn> for On<'_, DB, ST> {}

fn walk<'b, DB>(
    stmt: &'b Stmt<'_, impl Sized>,
    mut out: AstPass<'_, 'b, DB>,
    push: impl Fn(&'b Bind<'_>, &mut AstPass<'_, 'b, DB>) -> QueryResult<()>,
) -> QueryResult<()>
where
    DB: Backend,
{
    if !stmt.cache {
        out.unsafe_to_cache_prepared();
    }
    let mut parts = stmt.sql.split('?');
    if let Some(first) = parts.next() {
        out.push_sql(first);
    }
    let mut values = stmt.binds.iter();
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

impl<ST> QueryFragment<Pg> for On<'_, Pg, ST> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        walk(&self.stmt, out, |b, out| match b {
            Bind::Text(s) => out.push_bind_param::<Text, _>(*s),
            Bind::Owned(s) => out.push_bind_param::<Text, _>(s),
            Bind::Int(v) => out.push_bind_param::<Integer, _>(v),
            Bind::BigInt(v) => out.push_bind_param::<BigInt, _>(v),
            Bind::NullableBigInt(v) => out.push_bind_param::<Nullable<BigInt>, _>(v),
            Bind::SmallInt(v) => out.push_bind_param::<SmallInt, _>(v),
            Bind::Uuid(v) => out.push_bind_param::<diesel::sql_types::Uuid, _>(v),
            Bind::Timestamp(v) => out.push_bind_param::<Timestamp, _>(v),
            Bind::TextArray(v) => out.push_bind_param::<Array<Text>, _>(v),
        })
    }
}

impl<ST> QueryFragment<Sqlite> for On<'_, Sqlite, ST> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        walk(&self.stmt, out, |b, out| match b {
            Bind::Text(s) => out.push_bind_param::<Text, _>(*s),
            Bind::Owned(s) => out.push_bind_param::<Text, _>(s),
            Bind::Int(v) => out.push_bind_param::<Integer, _>(v),
            Bind::BigInt(v) => out.push_bind_param::<BigInt, _>(v),
            Bind::NullableBigInt(v) => out.push_bind_param::<Nullable<BigInt>, _>(v),
            Bind::SmallInt(v) => out.push_bind_param::<SmallInt, _>(v),
            Bind::Timestamp(v) => out.push_bind_param::<Timestamp, _>(v),
            Bind::Uuid(_) | Bind::TextArray(_) => Err(diesel::result::Error::QueryBuilderError(
                "SQLite has no UUID or array parameters: bind text, one value each".into(),
            )),
        })
    }
}

impl<ST> QueryFragment<Mysql> for On<'_, Mysql, ST> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        walk(&self.stmt, out, |b, out| match b {
            Bind::Text(s) => out.push_bind_param::<Text, _>(*s),
            Bind::Owned(s) => out.push_bind_param::<Text, _>(s),
            Bind::Int(v) => out.push_bind_param::<Integer, _>(v),
            Bind::BigInt(v) => out.push_bind_param::<BigInt, _>(v),
            Bind::NullableBigInt(v) => out.push_bind_param::<Nullable<BigInt>, _>(v),
            Bind::SmallInt(v) => out.push_bind_param::<SmallInt, _>(v),
            Bind::Timestamp(v) => out.push_bind_param::<diesel::sql_types::Datetime, _>(v),
            Bind::Uuid(_) | Bind::TextArray(_) => Err(diesel::result::Error::QueryBuilderError(
                "MySQL has no UUID or array parameters: bind text, one value each".into(),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered<DB>(stmt: Stmt<'_>) -> String
    where
        DB: Backend + Default,
        DB::QueryBuilder: Default,
        for<'a> On<'a, DB, Untyped>: QueryFragment<DB>,
    {
        let on = stmt.on::<DB>();
        let mut builder = DB::QueryBuilder::default();
        on.to_sql(&mut builder, &DB::default()).unwrap();
        diesel::query_builder::QueryBuilder::finish(builder)
    }

    #[test]
    fn each_backend_writes_its_own_placeholders() {
        let stmt = || {
            Stmt::new("SELECT a FROM t WHERE b = ? AND c IN (?, ?)")
                .bind(Bind::Int(1))
                .bind(Bind::Text("x"))
                .bind(Bind::BigInt(2))
        };
        assert_eq!(
            rendered::<Pg>(stmt()),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
        );
        assert_eq!(
            rendered::<Sqlite>(stmt()),
            "SELECT a FROM t WHERE b = ? AND c IN (?, ?)"
        );
        assert_eq!(
            rendered::<Mysql>(stmt()),
            "SELECT a FROM t WHERE b = ? AND c IN (?, ?)"
        );
    }

    #[test]
    fn placeholders_and_values_must_match() {
        let missing = Stmt::new("SELECT ? + ?").bind(Bind::Int(1)).on::<Sqlite>();
        let mut builder = <Sqlite as Backend>::QueryBuilder::default();
        assert!(missing.to_sql(&mut builder, &Sqlite).is_err());
        let extra = Stmt::new("SELECT ?")
            .bind(Bind::Int(1))
            .bind(Bind::Int(2))
            .on::<Sqlite>();
        let mut builder = <Sqlite as Backend>::QueryBuilder::default();
        assert!(extra.to_sql(&mut builder, &Sqlite).is_err());
    }
}
