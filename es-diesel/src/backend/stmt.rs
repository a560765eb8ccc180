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

/// A statement text with the byte offsets of its `?` placeholders, found
/// once: a statement the store runs at every command is then not searched
/// for them again in each of Diesel's passes over it (two per execution).
#[derive(Debug)]
pub(crate) struct Marked {
    sql: String,
    marks: Box<[usize]>,
}

impl Marked {
    pub(crate) fn new(sql: String) -> Self {
        let marks = sql.match_indices('?').map(|(at, _)| at).collect();
        Marked { sql, marks }
    }

    #[cfg(any(debug_assertions, test))]
    pub(crate) fn as_str(&self) -> &str {
        &self.sql
    }
}

/// A statement's text: searched for placeholders at each pass, or
/// [`Marked`] once.
#[derive(Debug)]
pub(crate) enum SqlText<'a> {
    Plain(Cow<'a, str>),
    Marked(&'a Marked),
}

impl SqlText<'_> {
    #[cfg(debug_assertions)]
    fn as_str(&self) -> &str {
        match self {
            SqlText::Plain(s) => s,
            SqlText::Marked(m) => m.as_str(),
        }
    }
}

impl<'a> From<&'a str> for SqlText<'a> {
    fn from(s: &'a str) -> Self {
        SqlText::Plain(Cow::Borrowed(s))
    }
}

impl<'a> From<&'a String> for SqlText<'a> {
    fn from(s: &'a String) -> Self {
        SqlText::Plain(Cow::Borrowed(s))
    }
}

impl From<String> for SqlText<'_> {
    fn from(s: String) -> Self {
        SqlText::Plain(Cow::Owned(s))
    }
}

impl<'a> From<Cow<'a, str>> for SqlText<'a> {
    fn from(s: Cow<'a, str>) -> Self {
        SqlText::Plain(s)
    }
}

impl<'a> From<&'a Marked> for SqlText<'a> {
    fn from(m: &'a Marked) -> Self {
        SqlText::Marked(m)
    }
}

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
/// look-ups. `K` is how the connection finds the statement it prepared
/// before: by its text ([`ByText`]) or by a name ([`Stmt::named`]).
#[derive(Debug)]
pub(crate) struct Stmt<'a, ST = Untyped, K = ByText> {
    sql: SqlText<'a>,
    binds: Vec<Bind<'a>>,
    cache: bool,
    rows: PhantomData<ST>,
    key: PhantomData<K>,
}

/// How a connection finds a statement among those it keeps prepared.
pub(crate) trait CacheKey {
    type Id: 'static;
    const NAMED: bool;
}

/// By the statement's text, which Diesel writes out and hashes at every
/// call.
#[derive(Debug)]
pub(crate) struct ByText;

impl CacheKey for ByText {
    type Id = ();
    const NAMED: bool = false;
}

/// By the type `M`, which names one statement text per backend (see
/// [`Stmt::named`]).
#[derive(Debug)]
pub(crate) struct Named<M>(PhantomData<M>);

impl<M: 'static> CacheKey for Named<M> {
    type Id = M;
    const NAMED: bool = true;
}

impl<'a> Stmt<'a> {
    pub(crate) fn new(sql: impl Into<SqlText<'a>>) -> Self {
        Self::with_capacity(sql, 0)
    }

    pub(crate) fn with_capacity(sql: impl Into<SqlText<'a>>, binds: usize) -> Self {
        Stmt {
            sql: sql.into(),
            binds: Vec::with_capacity(binds),
            cache: true,
            rows: PhantomData,
            key: PhantomData,
        }
    }
}

impl<'a, ST> Stmt<'a, ST> {
    /// The same statement, found among the prepared ones by the type `M`
    /// rather than by its text, which then is not written out and hashed at
    /// every call. Only for a statement whose text, on each backend, is the
    /// same at every call that names it `M`: the connection runs what it
    /// prepared under that name.
    pub(crate) fn named<M: 'static>(self) -> Stmt<'a, ST, Named<M>> {
        debug_assert!(self.cache, "a named statement is kept prepared");
        self.retyped()
    }
}

impl<'a, ST, K> Stmt<'a, ST, K> {
    /// The same statement, its rows loaded by position as the SQL types `T`.
    pub(crate) fn rows<T>(self) -> Stmt<'a, T, K> {
        self.retyped()
    }

    /// The same text and values with other row types or cache key.
    fn retyped<T, L>(self) -> Stmt<'a, T, L> {
        Stmt {
            sql: self.sql,
            binds: self.binds,
            cache: self.cache,
            rows: PhantomData,
            key: PhantomData,
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

    fn on<DB: 'static>(self) -> On<'a, DB, ST, K>
    where
        K: CacheKey,
    {
        #[cfg(debug_assertions)]
        if K::NAMED {
            same_text_per_name::<K::Id, DB>(self.sql.as_str());
        }
        On {
            stmt: self,
            backend: PhantomData,
        }
    }

    /// This statement as a part of a larger one on PostgreSQL.
    pub(crate) fn on_pg(self) -> On<'a, Pg, ST, K>
    where
        K: CacheKey,
    {
        self.on::<Pg>()
    }

    pub(crate) fn execute(self, conn: &mut DbConnection) -> QueryResult<usize>
    where
        K: CacheKey,
    {
        match conn {
            DbConnection::Postgres(c) => self.on::<Pg>().execute(c),
            DbConnection::Sqlite(c) => self.on::<Sqlite>().execute(c),
            DbConnection::Mysql(c) => self.on::<Mysql>().execute(c),
        }
    }

    pub(crate) fn load<U>(self, conn: &mut DbConnection) -> QueryResult<Vec<U>>
    where
        K: CacheKey,
        On<'a, Pg, ST, K>: LoadQuery<'a, PgConnection, U>,
        On<'a, Sqlite, ST, K>: LoadQuery<'a, SqliteConnection, U>,
        On<'a, Mysql, ST, K>: LoadQuery<'a, MysqlConnection, U>,
    {
        match conn {
            DbConnection::Postgres(c) => self.on::<Pg>().load(c),
            DbConnection::Sqlite(c) => self.on::<Sqlite>().load(c),
            DbConnection::Mysql(c) => self.on::<Mysql>().load(c),
        }
    }

    pub(crate) fn get_result<U>(self, conn: &mut DbConnection) -> QueryResult<U>
    where
        K: CacheKey,
        On<'a, Pg, ST, K>: LoadQuery<'a, PgConnection, U>,
        On<'a, Sqlite, ST, K>: LoadQuery<'a, SqliteConnection, U>,
        On<'a, Mysql, ST, K>: LoadQuery<'a, MysqlConnection, U>,
    {
        match conn {
            DbConnection::Postgres(c) => self.on::<Pg>().get_result(c),
            DbConnection::Sqlite(c) => self.on::<Sqlite>().get_result(c),
            DbConnection::Mysql(c) => self.on::<Mysql>().get_result(c),
        }
    }
}

/// Checks, in debug builds, that a named statement has one text per
/// backend (see [`Stmt::named`]).
#[cfg(debug_assertions)]
fn same_text_per_name<M: 'static, DB: 'static>(sql: &str) {
    use std::any::TypeId;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static TEXTS: OnceLock<Mutex<HashMap<(TypeId, TypeId), String>>> = OnceLock::new();
    let mut texts = TEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = texts
        .entry((TypeId::of::<M>(), TypeId::of::<DB>()))
        .or_insert_with(|| sql.to_owned());
    assert_eq!(
        text.as_str(),
        sql,
        "the statement named {} has another text than before",
        std::any::type_name::<M>()
    );
}

/// A [`Stmt`] on one Diesel backend.
pub(crate) struct On<'a, DB, ST, K = ByText> {
    stmt: Stmt<'a, ST, K>,
    backend: PhantomData<DB>,
}

impl<DB, ST, K: CacheKey> QueryId for On<'_, DB, ST, K> {
    type QueryId = K::Id;
    const HAS_STATIC_QUERY_ID: bool = K::NAMED;
}

impl<DB: Backend, ST, K> Query for On<'_, DB, ST, K> {
    type SqlType = ST;
}

impl<Conn, DB, ST, K> RunQueryDsl<Conn> for On<'_, DB, ST, K> {}

fn walk<'b, DB, K>(
    stmt: &'b Stmt<'_, impl Sized, K>,
    mut out: AstPass<'_, 'b, DB>,
    push: impl Fn(&'b Bind<'_>, &mut AstPass<'_, 'b, DB>) -> QueryResult<()>,
) -> QueryResult<()>
where
    DB: Backend,
{
    if !stmt.cache {
        out.unsafe_to_cache_prepared();
    }
    let too_few = || {
        diesel::result::Error::QueryBuilderError(
            "statement has more placeholders than values".into(),
        )
    };
    let too_many = || {
        diesel::result::Error::QueryBuilderError(
            "statement has more values than placeholders".into(),
        )
    };
    match &stmt.sql {
        SqlText::Marked(m) => {
            if m.marks.len() > stmt.binds.len() {
                return Err(too_few());
            }
            if m.marks.len() < stmt.binds.len() {
                return Err(too_many());
            }
            let mut from = 0;
            for (&at, value) in m.marks.iter().zip(&stmt.binds) {
                out.push_sql(&m.sql[from..at]);
                push(value, &mut out)?;
                from = at + 1;
            }
            out.push_sql(&m.sql[from..]);
        }
        SqlText::Plain(sql) => {
            let mut parts = sql.split('?');
            if let Some(first) = parts.next() {
                out.push_sql(first);
            }
            let mut values = stmt.binds.iter();
            for part in parts {
                push(values.next().ok_or_else(too_few)?, &mut out)?;
                out.push_sql(part);
            }
            if values.next().is_some() {
                return Err(too_many());
            }
        }
    }
    Ok(())
}

impl<ST, K> QueryFragment<Pg> for On<'_, Pg, ST, K> {
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

impl<ST, K> QueryFragment<Sqlite> for On<'_, Sqlite, ST, K> {
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

impl<ST, K> QueryFragment<Mysql> for On<'_, Mysql, ST, K> {
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
        DB: Backend + Default + 'static,
        DB::QueryBuilder: Default,
        for<'a> On<'a, DB, Untyped>: QueryFragment<DB>,
    {
        let on = stmt.on::<DB>();
        let mut builder = DB::QueryBuilder::default();
        on.to_sql(&mut builder, &DB::default()).unwrap();
        diesel::query_builder::QueryBuilder::finish(builder)
    }

    impl<DB> On<'_, DB, Untyped>
    where
        DB: Backend + Default + 'static,
        DB::QueryBuilder: Default,
        Self: QueryFragment<DB>,
    {
        fn sql_text(self) -> String {
            let mut builder = DB::QueryBuilder::default();
            self.to_sql(&mut builder, &DB::default()).unwrap();
            diesel::query_builder::QueryBuilder::finish(builder)
        }
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

    fn sql_copy<'a>(sql: &SqlText<'a>) -> SqlText<'a> {
        match sql {
            SqlText::Plain(s) => SqlText::Plain(s.clone()),
            SqlText::Marked(m) => SqlText::Marked(m),
        }
    }

    #[test]
    fn a_marked_text_renders_as_its_plain_text() {
        let marked = Marked::new("SELECT a FROM t WHERE b = ? AND c IN (?, ?) AND d = 'x'".into());
        let stmt = |text: SqlText<'_>| {
            Stmt::new(text)
                .bind(Bind::Int(1))
                .bind(Bind::Text("x"))
                .bind(Bind::BigInt(2))
                .on::<Pg>()
                .sql_text()
        };
        assert_eq!(
            stmt((&marked).into()),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3) AND d = 'x'"
        );
        assert_eq!(stmt((&marked).into()), stmt(marked.as_str().into()));
        // Both forms bind the same values in the same places, on every
        // backend, whatever surrounds the marks.
        for text in ["?", "??", "? ,?", "é?ü?x", "?é"] {
            let marked = Marked::new(text.into());
            let both = |sql: SqlText<'_>| {
                let q = || {
                    let mut q = Stmt::new(sql_copy(&sql));
                    for k in 0..text.matches('?').count() {
                        q.push(Bind::Int(k as i32 + 7));
                    }
                    q
                };
                (
                    diesel::debug_query::<Pg, _>(&q().on::<Pg>()).to_string(),
                    diesel::debug_query::<Sqlite, _>(&q().on::<Sqlite>()).to_string(),
                    diesel::debug_query::<Mysql, _>(&q().on::<Mysql>()).to_string(),
                )
            };
            assert_eq!(both((&marked).into()), both(text.into()), "{text:?}");
        }
        let ends = Marked::new("?".into());
        for binds in [0, 2] {
            let mut q = Stmt::new(&ends);
            (0..binds).for_each(|_| q.push(Bind::Int(1)));
            let mut builder = <Pg as Backend>::QueryBuilder::default();
            assert!(
                q.on::<Pg>().to_sql(&mut builder, &Pg).is_err(),
                "{binds} values for one mark"
            );
        }
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

    /// A named statement is found by its name alone: two texts under one
    /// name would run the first one's prepared statement for the second.
    #[test]
    #[cfg(debug_assertions)]
    fn a_name_stands_for_one_text_per_backend() {
        struct Named;
        let on = |sql: &'static str| {
            let _ = Stmt::new(sql).named::<Named>().on::<Sqlite>();
        };
        on("SELECT 1");
        on("SELECT 1");
        let _ = Stmt::new("SELECT 2").named::<Named>().on::<Pg>();
        let other = std::panic::catch_unwind(|| on("SELECT 2"));
        assert!(
            other.is_err(),
            "another text under the same name is refused"
        );
    }
}
