//! Read models: ordinary tables kept up to date by projectors, described by
//! `#[derive(ReadModel)]`, created by `migrate` and rebuilt from the log when
//! their shape changes.

use crate::backend::{Backend, DbConnection, PerBackend};
use diesel::pg::Pg;
use diesel::query_builder::QueryFragment;
use diesel::QueryResult;
use std::any::Any;
use std::fmt::Debug;
use std::hash::Hash;

/// A table fed by projectors. Implemented by `#[derive(ReadModel)]`, which
/// also generates the Diesel `table!`, `Queryable`, `Selectable`,
/// `Insertable` and `AsChangeset` for the struct.
///
/// ```
/// use es_diesel::ReadModel;
///
/// #[derive(ReadModel, Debug, Clone, PartialEq)]
/// #[read_model(table = "shelf", primary_key = shelf_id, index(room))]
/// struct Shelf {
///     shelf_id: i64,
///     room: String,
///     books: i32,
///     note: Option<String>,
/// }
///
/// assert_eq!(<Shelf as ReadModel>::SCHEMA.name, "shelf");
/// assert!(<Shelf as ReadModel>::SCHEMA.postgres[0].starts_with("CREATE TABLE \"shelf\""));
/// ```
///
/// The methods are what projectors and rebuilds need; applications query
/// the table with Diesel's DSL through the generated `table!` module.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a read model",
    label = "not a read model",
    note = "add #[derive(ReadModel)] and #[read_model(table = \"..\", primary_key = ..)] to `{Self}`"
)]
pub trait ReadModel: Sized + Send + 'static {
    /// The table and its DDL.
    const SCHEMA: ReadModelSchema;

    /// The primary key: the key field's type, or a tuple for a composite key.
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;

    /// This row's primary key.
    fn key(&self) -> Self::Key;

    /// The row with `key`, locked for the rest of the transaction on
    /// PostgreSQL and MySQL (`FOR UPDATE`), so concurrent projectors cannot lose updates.
    fn find(conn: &mut DbConnection, key: &Self::Key) -> QueryResult<Option<Self>>;

    /// The rows with any of `keys`, in no particular order.
    fn find_many(conn: &mut DbConnection, keys: &[Self::Key]) -> QueryResult<Vec<Self>>;

    /// Inserts `rows` with multi-row INSERT statements.
    fn insert_many(conn: &mut DbConnection, rows: &[Self]) -> QueryResult<usize>;

    /// Writes every non-key column of `row` to the row with the same key.
    fn update(conn: &mut DbConnection, row: &Self) -> QueryResult<usize>;

    /// Deletes the rows with any of `keys`.
    fn delete_many(conn: &mut DbConnection, keys: &[Self::Key]) -> QueryResult<usize>;

    /// PostgreSQL: the rows with any of `keys`, read without locking, each
    /// with its row version (`xmin`), which a [`guarded_write`](Self::guarded_write)
    /// checks. `None` on the other backends (and for read models written
    /// by hand), which then lock rows as they read them.
    #[doc(hidden)]
    fn find_many_versioned(
        conn: &mut DbConnection,
        keys: &[Self::Key],
    ) -> QueryResult<Option<Vec<(i64, Self)>>> {
        let _ = (conn, keys);
        Ok(None)
    }

    /// PostgreSQL: the statement that writes one row, for a `WITH` clause.
    /// An update or a delete ends in its `WHERE` condition on the key, so
    /// that the caller can add the row version it read (an update of a
    /// table of key columns only sets its key to itself, to check that
    /// version); an insert is an `INSERT … SELECT` of the row's values on
    /// the condition that the append inserted its events
    /// ([`EventsInserted`]). `None` when the read model has no such
    /// statement.
    #[doc(hidden)]
    fn guarded_write(write: RowWrite<'_, Self>) -> Option<Box<dyn QueryFragment<Pg>>> {
        let _ = write;
        None
    }
}

/// One row's write after projectors changed it (see [`ReadModel::guarded_write`]).
#[doc(hidden)]
pub enum RowWrite<'a, M: ReadModel> {
    /// A row that did not exist.
    Insert(&'a M),
    /// Every non-key column of an existing row.
    Update(&'a M),
    /// The existing row of the key.
    Delete(&'a M::Key),
}

/// What the store needs to know about a read model's table.
#[derive(Clone, Copy, Debug)]
pub struct ReadModelSchema {
    /// The table name; also the read model's name in `rebuild(name)`.
    pub name: &'static str,
    /// The Rust type, for messages.
    pub rust_type: &'static str,
    /// `#[read_model(version = N)]`: bump it to force a rebuild when the
    /// projectors change but the table does not.
    pub version: u32,
    /// `#[read_model(mode = async)]`: kept current by a runner after commit
    /// instead of inside the append transaction.
    pub asynchronous: bool,
    /// Number of columns.
    pub columns: usize,
    /// CREATE TABLE then CREATE INDEX statements for SQLite.
    pub sqlite: &'static [&'static str],
    /// The same for PostgreSQL.
    pub postgres: &'static [&'static str],
    /// The same for MySQL and MariaDB.
    pub mysql: &'static [&'static str],
}

impl ReadModelSchema {
    /// The statements that create the table on `backend`.
    pub fn ddl(&self, backend: Backend) -> &'static [&'static str] {
        PerBackend {
            sqlite: self.sqlite,
            postgres: self.postgres,
            mysql: self.mysql,
        }
        .get(backend)
    }

    /// A stable digest of the DDL and version: when it changes, `migrate`
    /// drops the table and rebuilds it from the log.
    pub fn fingerprint(&self, backend: Backend) -> String {
        // FNV-1a: stable across Rust versions and platforms, unlike `DefaultHasher`.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(&self.version.to_le_bytes());
        for stmt in self.ddl(backend) {
            eat(stmt.as_bytes());
            eat(b";\n");
        }
        format!("v{}-{h:016x}", self.version)
    }
}

/// A batch of read-model rows held in memory during a rebuild. Object-safe
/// face of [`Rows`](crate::projection::Rows).
#[doc(hidden)]
pub trait RowBatch: Any {
    fn as_any(&mut self) -> &mut dyn Any;
    /// Loads the rows of every wanted key not yet in memory.
    fn load(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<()>;
    /// Writes back every row in memory (delete, then multi-row insert) and forgets them.
    fn flush(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<usize>;
    fn is_empty(&self) -> bool;
    /// Rows held in memory.
    fn len(&self) -> usize;
    /// PostgreSQL: loads the rows of every wanted key not yet in memory
    /// without locking them, with their row versions. `false` where the
    /// read model has no versioned read (nothing is loaded then).
    fn load_versioned(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<bool>;
    /// PostgreSQL: the write of each row of a versioned load that has one
    /// (a row that neither existed nor exists has none), in the order the
    /// rows were first wanted. `false` where a row has no guarded write.
    fn guarded_writes(&self, out: &mut Vec<GuardedRow>) -> bool;
}

/// One row's write for an append that projects without a transaction: its
/// statement, and the row version it was read at (`None` for an insert).
#[doc(hidden)]
pub struct GuardedRow {
    pub statement: Box<dyn QueryFragment<Pg>>,
    pub version: Option<i64>,
    /// Its table and key, the order in which one statement writes its rows
    /// (so two such statements lock rows in one order).
    pub order: String,
}

/// A registered read model (submitted by `#[derive(ReadModel)]`).
#[doc(hidden)]
pub struct ReadModelEntry {
    pub schema: &'static ReadModelSchema,
    /// A fresh in-memory batch of rows for rebuilds.
    pub new_rows: fn() -> Box<dyn RowBatch>,
    pub file: &'static str,
    pub line: u32,
}

inventory::collect!(ReadModelEntry);

/// Conversions between field types and the column types every backend of
/// [`DbConnection`] supports. Used by generated code.
#[doc(hidden)]
pub mod convert {
    use chrono::{DateTime, NaiveDateTime, Utc};
    use diesel::deserialize;

    pub fn uuid_to_sql(u: &uuid::Uuid) -> String {
        u.hyphenated().to_string()
    }

    pub fn uuid_from_sql(s: String) -> deserialize::Result<uuid::Uuid> {
        uuid::Uuid::parse_str(&s).map_err(|e| format!("column holds {s:?}, not a UUID: {e}").into())
    }

    pub fn json_to_sql(v: &serde_json::Value) -> String {
        v.to_string()
    }

    pub fn json_from_sql(s: String) -> deserialize::Result<serde_json::Value> {
        serde_json::from_str(&s).map_err(|e| format!("column does not hold JSON: {e}").into())
    }

    pub fn utc_to_sql(t: &DateTime<Utc>) -> NaiveDateTime {
        t.naive_utc()
    }

    pub fn utc_from_sql(t: NaiveDateTime) -> deserialize::Result<DateTime<Utc>> {
        Ok(t.and_utc())
    }
}

/// Rows per statement in bulk writes: far below every backend's limit on
/// bind parameters (SQLite 32766, PostgreSQL 65535).
#[doc(hidden)]
pub const fn rows_per_statement(columns: usize) -> usize {
    let n = 20_000 / if columns == 0 { 1 } else { columns };
    if n == 0 {
        1
    } else {
        n
    }
}

/// A read model's UPDATE of one row by its key, kept prepared on each
/// connection like Diesel's other statements.
///
/// Diesel prepares an `update(..).set(..)` anew every time, because a
/// changeset may skip `None` fields and so change its SQL with its values.
/// The changeset that `#[derive(ReadModel)]` generates sets every non-key
/// column (a `None` as NULL) and the filter compares the key columns, so
/// the SQL of this statement depends on the read model `M` alone: one
/// prepared statement per read model and connection saves a parse per
/// row-level projector call, and on PostgreSQL a round trip.
#[doc(hidden)]
pub struct RowUpdate<M, T, V, W> {
    table: T,
    values: V,
    filter: W,
    model: std::marker::PhantomData<fn() -> M>,
}

/// The statement-cache identity of [`RowUpdate`]: its read model.
#[doc(hidden)]
pub struct RowUpdateId<M>(std::marker::PhantomData<fn() -> M>);

impl<M: ReadModel, T, V, W> RowUpdate<M, T, V, W> {
    /// `UPDATE table SET values WHERE filter`: `table` is the read model's
    /// from clause, `values` its generated changeset of a row, `filter` the
    /// comparison of its key columns.
    pub fn new(table: T, values: V, filter: W) -> Self {
        RowUpdate {
            table,
            values,
            filter,
            model: std::marker::PhantomData,
        }
    }
}

impl<M: ReadModel, T, V, W> diesel::query_builder::QueryId for RowUpdate<M, T, V, W> {
    type QueryId = RowUpdateId<M>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<M, T, V, W, DB> diesel::query_builder::QueryFragment<DB> for RowUpdate<M, T, V, W>
where
    DB: diesel::backend::Backend,
    T: diesel::query_builder::QueryFragment<DB>,
    V: diesel::query_builder::QueryFragment<DB>,
    W: diesel::query_builder::QueryFragment<DB>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        out.push_sql("UPDATE ");
        self.table.walk_ast(out.reborrow())?;
        out.push_sql(" SET ");
        self.values.walk_ast(out.reborrow())?;
        out.push_sql(" WHERE ");
        self.filter.walk_ast(out.reborrow())
    }
}

impl<M, T, V, W, Conn> diesel::RunQueryDsl<Conn> for RowUpdate<M, T, V, W> {}

/// A unit struct that is a PostgreSQL expression of a fixed text and SQL
/// type, whose statements stay prepared (Diesel's `sql` literal would have
/// them parsed again at every run).
macro_rules! pg_expression {
    ($(#[$doc:meta])* $name:ident: $ty:ty = $sql:literal) => {
        $(#[$doc])*
        #[doc(hidden)]
        #[derive(Debug, Clone, Copy, Default, diesel::query_builder::QueryId)]
        pub struct $name;

        impl diesel::expression::Expression for $name {
            type SqlType = $ty;
        }

        impl<QS> diesel::expression::AppearsOnTable<QS> for $name {}

        impl<QS> diesel::expression::SelectableExpression<QS> for $name {}

        impl<GB> diesel::expression::ValidGrouping<GB> for $name {
            type IsAggregate = diesel::expression::is_aggregate::Never;
        }

        impl QueryFragment<Pg> for $name {
            fn walk_ast<'b>(
                &'b self,
                mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
            ) -> QueryResult<()> {
                out.push_sql($sql);
                Ok(())
            }
        }
    };
}

pg_expression! {
    /// PostgreSQL's version of a row (`xmin`, the transaction that wrote
    /// it), read with the row for a [`ReadModel::guarded_write`].
    RowVersion: diesel::sql_types::BigInt = "xmin::text::bigint"
}

pg_expression! {
    /// In the statement of an append that writes its rows (see
    /// [`ReadModel::guarded_write`]): whether the append inserted its
    /// events, so that a new row's insert waits for them and writes nothing
    /// without them.
    EventsInserted: diesel::sql_types::Bool = "(SELECT n FROM n) > 0"
}
