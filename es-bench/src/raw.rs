//! The baseline: the same workload hand-written on Diesel, without the
//! framework, as well as we can write it. It is the limit the framework is
//! measured against, so it takes every shortcut a careful author would:
//! only the columns it needs, cached prepared statements (Diesel's DSL),
//! autocommit single statements (one round trip per append), JSON parsed
//! only for the events whose payload matters, on PostgreSQL the inline
//! read-model update folded into the append statement, and on MySQL
//! phase B's transaction without BEGIN (autocommit off) and with a
//! prepared COMMIT.
//!
//! Tables (`raw_events`, `raw_book_list`) are its own; `raw_events` has a
//! bigserial global position, `UNIQUE (stream_id, version)` as the
//! optimistic-concurrency guard, and a JSONB payload (TEXT on SQLite; on
//! MySQL an `AUTO_INCREMENT` position, VARCHAR ids, a JSON payload, InnoDB).

use crate::clock::Clock;
use crate::workload::{self, Command, LogEntry, LogEvent, State};
use crate::{latency, BenchError, Phase, Result};
use diesel::connection::SimpleConnection;
use diesel::deserialize::{self, FromSql};
use diesel::mysql::{Mysql, MysqlConnection, MysqlValue};
use diesel::pg::{Pg, PgConnection, PgValue};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{BigInt, Jsonb, Nullable, Text};
use diesel::sqlite::{Sqlite, SqliteConnection, SqliteValue};
use es_diesel::SqliteSync;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

/// Rows per multi-row INSERT (phase E2, seeds, read-model upserts).
const INSERT_BATCH: usize = 1_000;
/// Rows per page when phase D reads the log.
const READ_PAGE: i64 = 10_000;

/// A JSON document as text; stored as JSONB on PostgreSQL (binary format:
/// a version byte, then the text), as TEXT on SQLite, and sent to and read
/// from MySQL's JSON column as text.
#[derive(Debug, Clone, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = Jsonb)]
#[diesel(sql_type = Text)]
pub struct Json(pub String);

impl ToSql<Jsonb, Pg> for Json {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        out.write_all(&[1])?;
        out.write_all(self.0.as_bytes())?;
        Ok(IsNull::No)
    }
}

impl FromSql<Jsonb, Pg> for Json {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        match value.as_bytes().split_first() {
            Some((1, text)) => Ok(Json(std::str::from_utf8(text)?.to_owned())),
            _ => Err("unsupported JSONB binary format (expected version 1)".into()),
        }
    }
}

impl ToSql<Text, Sqlite> for Json {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.0.as_str());
        Ok(IsNull::No)
    }
}

impl FromSql<Text, Sqlite> for Json {
    fn from_sql(value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        <String as FromSql<Text, Sqlite>>::from_sql(value).map(Json)
    }
}

impl ToSql<Text, Mysql> for Json {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Mysql>) -> serialize::Result {
        <str as ToSql<Text, Mysql>>::to_sql(self.0.as_str(), out)
    }
}

impl FromSql<Text, Mysql> for Json {
    fn from_sql(value: MysqlValue<'_>) -> deserialize::Result<Self> {
        <String as FromSql<Text, Mysql>>::from_sql(value).map(Json)
    }
}

// Payloads: the same JSON the framework's events serialize to.
#[derive(Serialize, Deserialize)]
struct BookRegisteredJson<'a> {
    book_id: i64,
    #[serde(borrow)]
    title: Cow<'a, str>,
    #[serde(borrow)]
    author: Cow<'a, str>,
}

#[derive(Serialize)]
struct UserRegisteredJson<'a> {
    user_id: i64,
    name: &'a str,
}

#[derive(Serialize, Deserialize)]
struct LoanJson {
    book_id: i64,
    user_id: i64,
}

fn json_error(e: serde_json::Error) -> DieselError {
    DieselError::DeserializationError(Box::new(e))
}

/// An event row to insert.
pub struct NewRow {
    pub stream_id: String,
    pub version: i64,
    pub event_type: &'static str,
    pub payload: Json,
}

impl NewRow {
    pub fn from_entry(entry: &LogEntry) -> NewRow {
        let (event_type, payload) = match entry.event {
            LogEvent::BookRegistered { book_id } => (
                "BookRegistered",
                serde_json::to_string(&BookRegisteredJson {
                    book_id,
                    title: workload::book_title(book_id).into(),
                    author: workload::book_author(book_id).into(),
                }),
            ),
            LogEvent::UserRegistered { user_id } => (
                "UserRegistered",
                serde_json::to_string(&UserRegisteredJson {
                    user_id,
                    name: &workload::user_name(user_id),
                }),
            ),
            LogEvent::BookBorrowed { book_id, user_id } => (
                "BookBorrowed",
                serde_json::to_string(&LoanJson { book_id, user_id }),
            ),
            LogEvent::BookReturned { book_id, user_id } => (
                "BookReturned",
                serde_json::to_string(&LoanJson { book_id, user_id }),
            ),
        };
        NewRow {
            stream_id: entry.stream_id(),
            version: entry.version,
            event_type,
            payload: Json(
                payload.expect("serializing a struct of integers and strings cannot fail"),
            ),
        }
    }
}

/// A row of `raw_book_list`.
pub struct BookRow {
    pub book_id: i64,
    pub title: String,
    pub author: String,
    pub borrowed_by: Option<i64>,
    pub times_borrowed: i64,
}

/// A book's state folded from its stream.
#[derive(Clone, Copy, Debug, Default)]
struct RawBook {
    borrowed_by: Option<i64>,
    version: i64,
}

impl RawBook {
    fn fold(rows: Vec<(i64, String, Json)>) -> QueryResult<RawBook> {
        let mut book = RawBook::default();
        for (version, event_type, payload) in rows {
            book.version = version;
            book.borrowed_by = match event_type.as_str() {
                "BookBorrowed" => Some(
                    serde_json::from_str::<LoanJson>(&payload.0)
                        .map_err(json_error)?
                        .user_id,
                ),
                "BookRegistered" | "BookReturned" => None,
                other => {
                    return Err(DieselError::DeserializationError(
                        format!("unknown event type {other:?}").into(),
                    ))
                }
            };
        }
        Ok(book)
    }

    /// The event the command produces, and its effect on the read model:
    /// (new `borrowed_by`, increment of `times_borrowed`).
    fn decide(&self, c: Command) -> (NewRow, Option<i64>, i64) {
        let (event, borrowed_by, inc) = match self.borrowed_by {
            None => (
                LogEvent::BookBorrowed {
                    book_id: c.book_id,
                    user_id: c.user_id,
                },
                Some(c.user_id),
                1,
            ),
            Some(borrower) => (
                LogEvent::BookReturned {
                    book_id: c.book_id,
                    user_id: borrower,
                },
                None,
                0,
            ),
        };
        let row = NewRow::from_entry(&LogEntry {
            event,
            version: self.version + 1,
        });
        (row, borrowed_by, inc)
    }
}

fn is_conflict(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
}

/// The Diesel code of one backend; they differ only in the payload's SQL
/// type, the integer type of a `CAST` (`$int`), and the bulk upsert and
/// inline read-model update of phase B (`$extra`).
macro_rules! raw_backend {
    ($name:ident, $conn:ty, $payload:ident, $int:literal, { $($extra:item)* }) => {
        pub(crate) mod $name {
            use super::*;

            diesel::table! {
                use diesel::sql_types::*;
                raw_events (global_position) {
                    global_position -> BigInt,
                    stream_id -> Text,
                    version -> BigInt,
                    event_type -> Text,
                    payload -> $payload,
                }
            }

            diesel::table! {
                raw_book_list (book_id) {
                    book_id -> BigInt,
                    title -> Text,
                    author -> Text,
                    borrowed_by -> Nullable<BigInt>,
                    times_borrowed -> BigInt,
                }
            }

            // Every field a value, never DEFAULT: Diesel then caches the
            // INSERT's prepared statement (with the derive's default, each
            // field may be DEFAULT, and the statement is prepared again on
            // every call: one more round trip per append on a server).
            #[derive(Insertable)]
            #[diesel(table_name = raw_events, treat_none_as_default_value = false)]
            struct Row<'a> {
                stream_id: &'a str,
                version: i64,
                event_type: &'a str,
                payload: &'a Json,
            }

            impl<'a> From<&'a NewRow> for Row<'a> {
                fn from(r: &'a NewRow) -> Self {
                    Row {
                        stream_id: &r.stream_id,
                        version: r.version,
                        event_type: r.event_type,
                        payload: &r.payload,
                    }
                }
            }

            #[derive(Insertable)]
            #[diesel(table_name = raw_book_list)]
            struct Book<'a> {
                book_id: i64,
                title: &'a str,
                author: &'a str,
                borrowed_by: Option<i64>,
                times_borrowed: i64,
            }

            fn load_book(conn: &mut $conn, stream: &str) -> QueryResult<RawBook> {
                let rows = raw_events::table
                    .filter(raw_events::stream_id.eq(stream))
                    .order(raw_events::version)
                    .select((raw_events::version, raw_events::event_type, raw_events::payload))
                    .load::<(i64, String, Json)>(conn)?;
                RawBook::fold(rows)
            }

            /// One autocommit INSERT.
            pub fn insert(conn: &mut $conn, row: &NewRow) -> QueryResult<()> {
                diesel::insert_into(raw_events::table).values(Row::from(row)).execute(conn)?;
                Ok(())
            }

            /// Multi-row INSERTs of `INSERT_BATCH` rows, each its own transaction.
            pub fn insert_batches(conn: &mut $conn, rows: &[NewRow]) -> QueryResult<()> {
                for chunk in rows.chunks(INSERT_BATCH) {
                    let chunk: Vec<Row<'_>> = chunk.iter().map(Row::from).collect();
                    diesel::insert_into(raw_events::table).values(&chunk).execute(conn)?;
                }
                Ok(())
            }

            /// A and C: load + fold, decide, append expecting the loaded version.
            pub fn execute(conn: &mut $conn, c: Command) -> QueryResult<()> {
                let stream = workload::book_stream(c.book_id);
                loop {
                    let book = load_book(conn, &stream)?;
                    let (row, _, _) = book.decide(c);
                    match insert(conn, &row) {
                        Err(e) if is_conflict(&e) => continue,
                        other => return other,
                    }
                }
            }

            /// B: as A, with the read model updated in the same transaction.
            pub fn execute_inline(conn: &mut $conn, c: Command) -> QueryResult<()> {
                let stream = workload::book_stream(c.book_id);
                loop {
                    let book = load_book(conn, &stream)?;
                    let (row, borrowed_by, inc) = book.decide(c);
                    match append_with_read_model(conn, &row, c.book_id, borrowed_by, inc) {
                        Err(e) if is_conflict(&e) => continue,
                        other => return other,
                    }
                }
            }

            pub fn clear_read_model(conn: &mut $conn) -> QueryResult<()> {
                diesel::delete(raw_book_list::table).execute(conn)?;
                Ok(())
            }

            /// D: the whole log in global order (keyset pages, so memory
            /// stays flat), folded in memory, then one bulk upsert.
            /// Returns the number of events read and applied.
            pub fn rebuild(conn: &mut $conn) -> QueryResult<i64> {
                let mut books: HashMap<i64, BookRow> = HashMap::new();
                let mut after = 0;
                let mut applied = 0;
                loop {
                    let page = raw_events::table
                        .filter(raw_events::global_position.gt(after))
                        .order(raw_events::global_position)
                        .limit(READ_PAGE)
                        .select((raw_events::global_position, raw_events::event_type, raw_events::payload))
                        .load::<(i64, String, Json)>(conn)?;
                    for (position, event_type, payload) in &page {
                        after = *position;
                        applied += 1;
                        apply(&mut books, event_type, &payload.0)?;
                    }
                    if (page.len() as i64) < READ_PAGE {
                        break;
                    }
                }
                let mut rows: Vec<BookRow> = books.into_values().collect();
                rows.sort_unstable_by_key(|b| b.book_id);
                insert_books(conn, &rows)?;
                Ok(applied)
            }

            /// E3: the whole log into memory with one SELECT.
            pub fn read_all(conn: &mut $conn) -> QueryResult<Vec<(i64, String, i64, String, Json)>> {
                raw_events::table
                    .order(raw_events::global_position)
                    .select((
                        raw_events::global_position,
                        raw_events::stream_id,
                        raw_events::version,
                        raw_events::event_type,
                        raw_events::payload,
                    ))
                    .load(conn)
            }

            pub fn log_state(conn: &mut $conn) -> QueryResult<(i64, i64)> {
                let all = raw_events::table.count().get_result::<i64>(conn)?;
                let borrowed = raw_events::table
                    .filter(raw_events::event_type.eq("BookBorrowed"))
                    .count()
                    .get_result::<i64>(conn)?;
                Ok((all, borrowed))
            }

            pub fn read_model_state(conn: &mut $conn) -> QueryResult<ReadModelState> {
                diesel::sql_query(concat!(
                    "SELECT COUNT(*) AS books, COUNT(borrowed_by) AS borrowed_now, \
                     CAST(COALESCE(SUM(times_borrowed), 0) AS ", $int, ") AS times_borrowed, \
                     CAST(COALESCE(SUM(book_id * borrowed_by), 0) AS ", $int, ") AS checksum \
                     FROM raw_book_list"
                ))
                .get_result(conn)
            }

            $($extra)*
        }
    };
}

raw_backend!(pg, PgConnection, Jsonb, "BIGINT", {
    /// Multi-row upserts, one transaction.
    pub fn insert_books(conn: &mut PgConnection, rows: &[BookRow]) -> QueryResult<()> {
        use diesel::upsert::excluded;
        use raw_book_list::{author, book_id, borrowed_by, times_borrowed, title};
        conn.transaction(|conn| {
            for chunk in rows.chunks(INSERT_BATCH) {
                let chunk: Vec<Book<'_>> = chunk
                    .iter()
                    .map(|b| Book {
                        book_id: b.book_id,
                        title: &b.title,
                        author: &b.author,
                        borrowed_by: b.borrowed_by,
                        times_borrowed: b.times_borrowed,
                    })
                    .collect();
                diesel::insert_into(raw_book_list::table)
                    .values(&chunk)
                    .on_conflict(book_id)
                    .do_update()
                    .set((
                        title.eq(excluded(title)),
                        author.eq(excluded(author)),
                        borrowed_by.eq(excluded(borrowed_by)),
                        times_borrowed.eq(excluded(times_borrowed)),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
    }
    /// One statement, so one round trip and one (autocommit) transaction:
    /// the event insert and the read-model update commit together.
    pub fn append_with_read_model(
        conn: &mut PgConnection,
        row: &NewRow,
        book_id: i64,
        borrowed_by: Option<i64>,
        inc: i64,
    ) -> QueryResult<()> {
        let n = diesel::sql_query(
            "WITH e AS (INSERT INTO raw_events (stream_id, version, event_type, payload) \
             VALUES ($1, $2, $3, $4) RETURNING 1) \
             UPDATE raw_book_list SET borrowed_by = $5, times_borrowed = times_borrowed + $6 \
             FROM e WHERE book_id = $7",
        )
        .bind::<Text, _>(&row.stream_id)
        .bind::<BigInt, _>(row.version)
        .bind::<Text, _>(row.event_type)
        .bind::<Jsonb, _>(&row.payload)
        .bind::<Nullable<BigInt>, _>(borrowed_by)
        .bind::<BigInt, _>(inc)
        .bind::<BigInt, _>(book_id)
        .execute(conn)?;
        check_one_book(n, book_id)
    }
});

raw_backend!(sqlite, SqliteConnection, Text, "BIGINT", {
    /// SQLite cannot combine a multi-row INSERT with ON CONFLICT in Diesel;
    /// one cached single-row upsert per book inside one transaction is the
    /// fast path there anyway (no round trips).
    pub fn insert_books(conn: &mut SqliteConnection, rows: &[BookRow]) -> QueryResult<()> {
        use diesel::upsert::excluded;
        use raw_book_list::{author, book_id, borrowed_by, times_borrowed, title};
        conn.transaction(|conn| {
            for b in rows {
                diesel::insert_into(raw_book_list::table)
                    .values(Book {
                        book_id: b.book_id,
                        title: &b.title,
                        author: &b.author,
                        borrowed_by: b.borrowed_by,
                        times_borrowed: b.times_borrowed,
                    })
                    .on_conflict(book_id)
                    .do_update()
                    .set((
                        title.eq(excluded(title)),
                        author.eq(excluded(author)),
                        borrowed_by.eq(excluded(borrowed_by)),
                        times_borrowed.eq(excluded(times_borrowed)),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
    }

    /// SQLite has no data-modifying CTE; its statements are in-process
    /// calls, so a write transaction of two statements costs no round trip.
    pub fn append_with_read_model(
        conn: &mut SqliteConnection,
        row: &NewRow,
        id: i64,
        new_borrower: Option<i64>,
        inc: i64,
    ) -> QueryResult<()> {
        use raw_book_list::{borrowed_by, times_borrowed};
        conn.immediate_transaction(|conn| {
            insert(conn, row)?;
            let n = diesel::update(raw_book_list::table.find(id))
                .set((
                    borrowed_by.eq(new_borrower),
                    times_borrowed.eq(times_borrowed + inc),
                ))
                .execute(conn)?;
            check_one_book(n, id)
        })
    }
});

// MySQL's CAST has no BIGINT: SIGNED is its 64-bit integer.
raw_backend!(mysql, MysqlConnection, Text, "SIGNED", {
    /// Multi-row upserts (`INSERT … ON DUPLICATE KEY UPDATE`, the new row's
    /// values read with `VALUES(col)`, which Diesel has no DSL for on
    /// MySQL), one transaction.
    pub fn insert_books(conn: &mut MysqlConnection, rows: &[BookRow]) -> QueryResult<()> {
        use diesel::dsl::{sql, DuplicatedKeys};
        use raw_book_list::{author, borrowed_by, times_borrowed, title};
        conn.transaction(|conn| {
            for chunk in rows.chunks(INSERT_BATCH) {
                let chunk: Vec<Book<'_>> = chunk
                    .iter()
                    .map(|b| Book {
                        book_id: b.book_id,
                        title: &b.title,
                        author: &b.author,
                        borrowed_by: b.borrowed_by,
                        times_borrowed: b.times_borrowed,
                    })
                    .collect();
                diesel::insert_into(raw_book_list::table)
                    .values(&chunk)
                    .on_conflict(DuplicatedKeys)
                    .do_update()
                    .set((
                        title.eq(sql::<Text>("VALUES(`title`)")),
                        author.eq(sql::<Text>("VALUES(`author`)")),
                        borrowed_by.eq(sql::<Nullable<BigInt>>("VALUES(`borrowed_by`)")),
                        times_borrowed.eq(sql::<BigInt>("VALUES(`times_borrowed`)")),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
    }

    /// Phase B runs its connection with autocommit off, as JDBC and the
    /// Python DB-API run MySQL transactions: the first statement (the load)
    /// opens the transaction, COMMIT ends it. Diesel's `transaction` would
    /// send BEGIN and COMMIT through `batch_execute`, which on MySQL turns
    /// multi-statement mode on and off around each: three round trips
    /// apiece instead of none and one.
    pub fn autocommit_off(conn: &mut MysqlConnection) -> QueryResult<()> {
        conn.batch_execute("SET autocommit = 0")
    }

    /// MySQL has neither a data-modifying CTE nor RETURNING: the event
    /// insert and the read-model update in one transaction (opened by the
    /// load, see [`autocommit_off`]), then COMMIT. Four round trips per
    /// command, load included, each a cached prepared statement.
    pub fn append_with_read_model(
        conn: &mut MysqlConnection,
        row: &NewRow,
        book_id: i64,
        borrowed_by: Option<i64>,
        inc: i64,
    ) -> QueryResult<()> {
        let written = insert(conn, row).and_then(|()| {
            // Diesel connects with CLIENT_FOUND_ROWS: this counts the rows
            // matched, not only those changed.
            let n = UpdateBook {
                book_id,
                borrowed_by,
                inc,
            }
            .execute(conn)?;
            check_one_book(n, book_id)
        });
        match written {
            Ok(()) => Commit.execute(conn).map(drop),
            Err(e) => {
                conn.batch_execute("ROLLBACK")?;
                Err(e)
            }
        }
    }

    // Diesel prepares every `diesel::update` and `sql_query` again on each
    // call (one more round trip on a server); these two statements of
    // phase B have a fixed text, so they are written as query fragments
    // with a static id, whose prepared statements Diesel caches.

    /// `UPDATE raw_book_list SET borrowed_by = ?, times_borrowed =
    /// times_borrowed + ? WHERE book_id = ?`.
    struct UpdateBook {
        book_id: i64,
        borrowed_by: Option<i64>,
        inc: i64,
    }

    impl QueryId for UpdateBook {
        type QueryId = UpdateBook;
        const HAS_STATIC_QUERY_ID: bool = true;
    }

    impl QueryFragment<Mysql> for UpdateBook {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
            out.push_sql("UPDATE raw_book_list SET borrowed_by = ");
            out.push_bind_param::<Nullable<BigInt>, _>(&self.borrowed_by)?;
            out.push_sql(", times_borrowed = times_borrowed + ");
            out.push_bind_param::<BigInt, _>(&self.inc)?;
            out.push_sql(" WHERE book_id = ");
            out.push_bind_param::<BigInt, _>(&self.book_id)?;
            Ok(())
        }
    }

    impl RunQueryDsl<MysqlConnection> for UpdateBook {}

    /// `COMMIT` (a statement MySQL prepares).
    struct Commit;

    impl QueryId for Commit {
        type QueryId = Commit;
        const HAS_STATIC_QUERY_ID: bool = true;
    }

    impl QueryFragment<Mysql> for Commit {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
            out.push_sql("COMMIT");
            Ok(())
        }
    }

    impl RunQueryDsl<MysqlConnection> for Commit {}
});

fn check_one_book(updated: usize, book_id: i64) -> QueryResult<()> {
    if updated == 1 {
        Ok(())
    } else {
        Err(DieselError::QueryBuilderError(
            format!("raw_book_list has no row for book {book_id} (updated {updated} rows)").into(),
        ))
    }
}

/// Applies one event to the in-memory read model of phase D.
fn apply(books: &mut HashMap<i64, BookRow>, event_type: &str, payload: &str) -> QueryResult<()> {
    match event_type {
        "BookRegistered" => {
            let e: BookRegisteredJson<'_> = serde_json::from_str(payload).map_err(json_error)?;
            books.insert(
                e.book_id,
                BookRow {
                    book_id: e.book_id,
                    title: e.title.into_owned(),
                    author: e.author.into_owned(),
                    borrowed_by: None,
                    times_borrowed: 0,
                },
            );
        }
        "BookBorrowed" | "BookReturned" => {
            let e: LoanJson = serde_json::from_str(payload).map_err(json_error)?;
            let book = books.get_mut(&e.book_id).ok_or_else(|| {
                DieselError::DeserializationError(
                    format!("{event_type} of unregistered book {}", e.book_id).into(),
                )
            })?;
            if event_type == "BookBorrowed" {
                book.borrowed_by = Some(e.user_id);
                book.times_borrowed += 1;
            } else {
                book.borrowed_by = None;
            }
        }
        _ => {}
    }
    Ok(())
}

#[derive(QueryableByName)]
pub struct ReadModelState {
    #[diesel(sql_type = BigInt)]
    books: i64,
    #[diesel(sql_type = BigInt)]
    borrowed_now: i64,
    #[diesel(sql_type = BigInt)]
    times_borrowed: i64,
    #[diesel(sql_type = BigInt)]
    checksum: i64,
}

const PG_SCHEMA: &str = "
CREATE TABLE raw_events (
    global_position BIGSERIAL PRIMARY KEY,
    stream_id       TEXT   NOT NULL,
    version         BIGINT NOT NULL,
    event_type      TEXT   NOT NULL,
    payload         JSONB  NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE raw_book_list (
    book_id        BIGINT PRIMARY KEY,
    title          TEXT   NOT NULL,
    author         TEXT   NOT NULL,
    borrowed_by    BIGINT,
    times_borrowed BIGINT NOT NULL
);";

// INTEGER PRIMARY KEY is the rowid: ever increasing on an append-only
// table, without AUTOINCREMENT's extra write to sqlite_sequence.
const SQLITE_SCHEMA: &str = "
CREATE TABLE raw_events (
    global_position INTEGER PRIMARY KEY,
    stream_id       TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE raw_book_list (
    book_id        INTEGER PRIMARY KEY,
    title          TEXT    NOT NULL,
    author         TEXT    NOT NULL,
    borrowed_by    INTEGER,
    times_borrowed INTEGER NOT NULL
);";

// InnoDB (durability as the server is configured). Indexed text is
// VARCHAR (MySQL indexes no TEXT without a prefix length), compared
// byte for byte (utf8mb4_bin) like TEXT on the other backends. JSON is
// MySQL's binary JSON, validated on insert (on MariaDB a LONGTEXT with a
// JSON_VALID check), as JSONB is on PostgreSQL.
const MYSQL_SCHEMA: &str = "
CREATE TABLE raw_events (
    global_position BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    stream_id       VARCHAR(255) NOT NULL,
    version         BIGINT       NOT NULL,
    event_type      VARCHAR(255) NOT NULL,
    payload         JSON         NOT NULL,
    UNIQUE KEY raw_events_stream (stream_id, version)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE TABLE raw_book_list (
    book_id        BIGINT       NOT NULL PRIMARY KEY,
    title          VARCHAR(255) NOT NULL,
    author         VARCHAR(255) NOT NULL,
    borrowed_by    BIGINT,
    times_borrowed BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;";

/// A raw connection to any of the backends.
pub enum Conn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
    Mysql(MysqlConnection),
}

/// Runs the same code on whichever connection `conn` holds, with `$m`
/// naming that backend's module.
macro_rules! on {
    ($conn:expr, $m:ident, $c:ident => $body:expr) => {
        match $conn {
            Conn::Pg($c) => {
                use pg as $m;
                $body
            }
            Conn::Sqlite($c) => {
                use sqlite as $m;
                $body
            }
            Conn::Mysql($c) => {
                use mysql as $m;
                $body
            }
        }
    };
}

impl Conn {
    /// Connects; on SQLite with WAL, the given `synchronous` and the
    /// framework's busy timeout, so both run under the same durability.
    pub fn open(url: &str, sync: SqliteSync) -> Result<Conn> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Conn::Pg(PgConnection::establish(url)?));
        }
        // The server's session defaults (isolation, durability) as found.
        if url.starts_with("mysql://") {
            return Ok(Conn::Mysql(MysqlConnection::establish(url)?));
        }
        if let Some(rest) = url.strip_prefix("mariadb://") {
            let url = format!("mysql://{rest}");
            return Ok(Conn::Mysql(MysqlConnection::establish(&url)?));
        }
        let mut conn = SqliteConnection::establish(url)?;
        let sync = match sync {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
            SqliteSync::Off => "OFF",
        };
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = 30000; PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};"
        ))?;
        Ok(Conn::Sqlite(conn))
    }
}

/// Multi-row INSERTs of precomputed log entries, streamed in slices so
/// the preparing process stays small.
fn insert_log(conn: &mut Conn, mut entries: impl Iterator<Item = LogEntry>) -> Result<()> {
    loop {
        let slice: Vec<NewRow> = entries
            .by_ref()
            .take(100 * INSERT_BATCH)
            .map(|e| NewRow::from_entry(&e))
            .collect();
        if slice.is_empty() {
            return Ok(());
        }
        on!(&mut *conn, m, c => m::insert_batches(c, &slice))?;
    }
}

/// Untimed set-up of a fresh database for `phase`: schema, the `preload`
/// events of `--preload-events` (history on books the workload does not
/// touch), registrations, and for D and E3 the log of `replay_events`
/// commands. On PostgreSQL a preloaded log is then vacuumed, analyzed and
/// checkpointed (as the framework's is), so that neither autovacuum's
/// reaction to the bulk load nor the checkpoint writing its pages falls
/// into the timed phase.
pub fn prepare(conn: &mut Conn, phase: Phase, replay_events: u64, preload: u64) -> Result<()> {
    match conn {
        Conn::Pg(c) => c.batch_execute(PG_SCHEMA)?,
        Conn::Sqlite(c) => c.batch_execute(SQLITE_SCHEMA)?,
        Conn::Mysql(c) => c.batch_execute(MYSQL_SCHEMA)?,
    }
    insert_log(conn, workload::preload_events(preload))?;
    let registrations: Vec<NewRow> = workload::registrations()
        .map(|e| NewRow::from_entry(&e))
        .collect();
    match phase {
        Phase::A | Phase::C => on!(conn, m, c => m::insert_batches(c, &registrations))?,
        Phase::B => {
            on!(conn, m, c => m::insert_batches(c, &registrations))?;
            let books: Vec<BookRow> = (1..=workload::BOOKS)
                .map(|book_id| BookRow {
                    book_id,
                    title: workload::book_title(book_id),
                    author: workload::book_author(book_id),
                    borrowed_by: None,
                    times_borrowed: 0,
                })
                .collect();
            on!(conn, m, c => m::insert_books(c, &books))?;
        }
        Phase::D | Phase::E3 => {
            on!(conn, m, c => m::insert_batches(c, &registrations))?;
            insert_log(conn, workload::command_events(replay_events))?;
        }
        Phase::E1 | Phase::E2 => {}
    }
    if let (Conn::Pg(c), true) = (&mut *conn, preload > 0) {
        c.batch_execute("VACUUM ANALYZE raw_events")?;
        crate::checkpoint_after_preload(c);
    }
    Ok(())
}

/// What a timed phase did: its wall time, for A, B and C each command's
/// latency in nanoseconds (in no particular order), and for E3 the state of
/// the rows it read (which exist only in its memory).
pub struct Outcome {
    pub elapsed: Duration,
    pub latencies: Vec<u64>,
    pub read_state: Option<State>,
}

/// The timed part of `phase` (`n` commands, or the log size of D and E
/// without registrations and the `preload` events). Inputs that the
/// workload says are precomputed (E1, E2) are built before the clock
/// starts.
pub fn run(
    conn: &mut Conn,
    url: &str,
    sync: SqliteSync,
    phase: Phase,
    commands: &[Command],
    n: u64,
    preload: u64,
) -> Result<Outcome> {
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<Outcome> {
        let clock = Clock::start();
        f()?;
        Ok(Outcome {
            elapsed: clock.stop(),
            latencies: Vec::new(),
            read_state: None,
        })
    };
    let mut latencies = Vec::with_capacity(commands.len());
    match phase {
        Phase::A => {
            let mut out = timed(&mut || {
                on!(&mut *conn, m, c => latency::each(commands, &mut latencies, |cmd| m::execute(c, cmd)))?;
                Ok(())
            })?;
            out.latencies = latencies;
            Ok(out)
        }
        Phase::B => {
            if let Conn::Mysql(c) = &mut *conn {
                mysql::autocommit_off(c)?;
            }
            let mut out = timed(&mut || {
                on!(&mut *conn, m, c => latency::each(commands, &mut latencies, |cmd| m::execute_inline(c, cmd)))?;
                Ok(())
            })?;
            out.latencies = latencies;
            Ok(out)
        }
        Phase::C => phase_c(url, sync, commands),
        Phase::D => {
            on!(&mut *conn, m, c => m::clear_read_model(c))?;
            let mut applied = 0;
            let out = timed(&mut || {
                applied = on!(&mut *conn, m, c => m::rebuild(c))?;
                Ok(())
            })?;
            let expected = workload::REGISTRATIONS + n as i64 + preload as i64;
            if applied != expected {
                return Err(BenchError::Inconsistent(format!(
                    "rebuild applied {applied} events, the log has {expected}"
                )));
            }
            Ok(out)
        }
        Phase::E1 | Phase::E2 => {
            let rows: Vec<NewRow> = workload::reference_log(n)
                .map(|e| NewRow::from_entry(&e))
                .collect();
            timed(&mut || {
                if phase == Phase::E1 {
                    on!(&mut *conn, m, c => rows.iter().try_for_each(|r| m::insert(c, r)))?;
                } else {
                    on!(&mut *conn, m, c => m::insert_batches(c, &rows))?;
                }
                Ok(())
            })
        }
        Phase::E3 => {
            let clock = Clock::start();
            let rows = on!(&mut *conn, m, c => m::read_all(c))?;
            let elapsed = clock.stop();
            let borrowed = rows.iter().filter(|r| r.3 == "BookBorrowed").count() as i64;
            Ok(Outcome {
                elapsed,
                latencies: Vec::new(),
                read_state: Some(State {
                    log_events: rows.len() as i64,
                    borrowed_events: borrowed,
                    rm_books: None,
                    rm_borrowed_now: None,
                    rm_times_borrowed: None,
                    rm_checksum: None,
                }),
            })
        }
    }
}

/// C: four writers, each on its own connection (opened before the clock)
/// and recording its commands' latencies in its own vector.
fn phase_c(url: &str, sync: SqliteSync, commands: &[Command]) -> Result<Outcome> {
    let mut conns = (0..workload::WRITERS)
        .map(|_| Conn::open(url, sync))
        .collect::<Result<Vec<Conn>>>()?;
    let parts: Vec<Vec<Command>> = (0..workload::WRITERS)
        .map(|w| workload::writer_commands(commands, w))
        .collect();
    let mut latencies: Vec<Vec<u64>> = parts.iter().map(|p| Vec::with_capacity(p.len())).collect();
    let clock = Clock::start();
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .zip(&parts)
            .zip(&mut latencies)
            .map(|((conn, part), out)| {
                s.spawn(
                    move || on!(conn, m, c => latency::each(part, out, |cmd| m::execute(c, cmd))),
                )
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| BenchError::WriterPanicked)?
                .map_err(BenchError::from)
        })
    })?;
    let elapsed = clock.stop();
    Ok(Outcome {
        elapsed,
        latencies: latencies.concat(),
        read_state: None,
    })
}

/// The log, and the read model for the phases that keep one (B, D).
pub fn state(conn: &mut Conn, phase: Phase) -> Result<State> {
    let (log_events, borrowed_events) = on!(conn, m, c => m::log_state(c))?;
    let mut state = State {
        log_events,
        borrowed_events,
        rm_books: None,
        rm_borrowed_now: None,
        rm_times_borrowed: None,
        rm_checksum: None,
    };
    if matches!(phase, Phase::B | Phase::D) {
        let rm = on!(conn, m, c => m::read_model_state(c))?;
        state.rm_books = Some(rm.books);
        state.rm_borrowed_now = Some(rm.borrowed_now);
        state.rm_times_borrowed = Some(rm.times_borrowed);
        state.rm_checksum = Some(rm.checksum);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_diesel::testing::TestDatabase;

    /// A connection to `db` without raw's tables (each phase creates its own).
    fn fresh(db: &TestDatabase) -> Conn {
        let mut conn = Conn::open(db.url(), SqliteSync::Normal).unwrap();
        match &mut conn {
            Conn::Pg(c) => c
                .batch_execute("DROP TABLE IF EXISTS raw_events, raw_book_list")
                .unwrap(),
            Conn::Sqlite(c) => c
                .batch_execute(
                    "DROP TABLE IF EXISTS raw_events; DROP TABLE IF EXISTS raw_book_list",
                )
                .unwrap(),
            Conn::Mysql(c) => c
                .batch_execute("DROP TABLE IF EXISTS raw_events, raw_book_list")
                .unwrap(),
        }
        conn
    }

    #[test]
    fn a_c_d_on_a_preloaded_log_end_in_the_expected_state() {
        let (n, preload) = (200, 1_250);
        for db in TestDatabase::all() {
            for phase in [Phase::A, Phase::C, Phase::D] {
                let mut conn = fresh(&db);
                prepare(&mut conn, phase, n, preload).unwrap();
                let commands: Vec<Command> =
                    workload::commands(if phase == Phase::D { 0 } else { n }).collect();
                let outcome = run(
                    &mut conn,
                    db.url(),
                    SqliteSync::Normal,
                    phase,
                    &commands,
                    n,
                    preload,
                )
                .unwrap();
                assert_eq!(outcome.latencies.len(), commands.len(), "{phase}");
                assert_eq!(
                    state(&mut conn, phase).unwrap(),
                    phase.expected(n, n, preload),
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    #[test]
    fn every_phase_ends_in_the_expected_state() {
        let (n, m) = (300, 2_500);
        let phases = [
            Phase::A,
            Phase::B,
            Phase::C,
            Phase::D,
            Phase::E1,
            Phase::E2,
            Phase::E3,
        ];
        for db in TestDatabase::all() {
            for phase in phases {
                let mut conn = fresh(&db);
                let count = phase.command_count(n, m);
                prepare(&mut conn, phase, count, 0).unwrap();
                let commands: Vec<Command> =
                    workload::commands(if phase.raw_only() || phase == Phase::D {
                        0
                    } else {
                        count
                    })
                    .collect();
                let outcome = run(
                    &mut conn,
                    db.url(),
                    SqliteSync::Normal,
                    phase,
                    &commands,
                    count,
                    0,
                )
                .unwrap();
                assert_eq!(outcome.latencies.len(), commands.len(), "{phase}");
                let state = match outcome.read_state {
                    Some(s) => s,
                    None => state(&mut conn, phase).unwrap(),
                };
                assert_eq!(
                    state,
                    phase.expected(n, m, 0),
                    "{phase} on {}",
                    db.backend()
                );
            }
        }
    }

    #[test]
    fn payloads_are_the_frameworks_json() {
        let entry = LogEntry {
            event: LogEvent::BookRegistered { book_id: 7 },
            version: 1,
        };
        let framework = es_diesel::Event::encode(&crate::framework::BookRegistered {
            book_id: 7,
            title: "Book 7".into(),
            author: "Author 7".into(),
        })
        .unwrap();
        assert_eq!(NewRow::from_entry(&entry).payload.0, framework);
    }
}
