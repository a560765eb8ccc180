//! Rows of one column, for statements that select a single value.

use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;

/// `SELECT .. AS n` of a whole number (a count, a version, a position).
#[derive(QueryableByName)]
pub(crate) struct Number {
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// `SELECT .. AS name` of a text.
#[derive(QueryableByName)]
pub(crate) struct Name {
    #[diesel(sql_type = Text)]
    pub name: String,
}

/// `SELECT .. AS name` of a text that may be NULL.
#[derive(QueryableByName)]
pub(crate) struct MaybeName {
    #[diesel(sql_type = Nullable<Text>)]
    pub name: Option<String>,
}

/// The SQL types of the event columns, in [`super::Dialect::event_columns`] order.
pub(crate) type EventSql = (
    BigInt,
    Text,
    Text,
    BigInt,
    Text,
    diesel::sql_types::SmallInt,
    Text,
    Text,
    diesel::sql_types::Timestamp,
);

/// An event row, loaded by position.
pub(crate) type EventTuple = (
    i64,
    String,
    String,
    i64,
    String,
    i16,
    String,
    String,
    chrono::NaiveDateTime,
);

/// What an append statement returns per inserted event.
#[derive(QueryableByName)]
pub(crate) struct Appended {
    #[diesel(sql_type = BigInt)]
    pub global_position: i64,
    #[diesel(sql_type = BigInt)]
    pub stream_version: i64,
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    pub created_at: chrono::NaiveDateTime,
}
