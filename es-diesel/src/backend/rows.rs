//! Rows of one column, for statements that select a single value.

use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;
use es_core::Metadata;

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

/// An event row, loaded by position. The envelope columns that need parsing
/// are parsed straight from the driver's buffer, without a `String` each.
pub(crate) type EventTuple = (
    i64,
    StoredId,
    String,
    i64,
    String,
    i16,
    String,
    StoredMetadata,
    StoredTime,
);

/// The SQL types of [`super::Dialect::payload_columns`].
pub(crate) type PayloadSql = (BigInt, Text, diesel::sql_types::SmallInt, Text);

/// A row of [`super::Columns::Payload`]: position, type, type version,
/// payload.
pub(crate) type PayloadTuple = (i64, String, i16, String);

/// A [`PayloadTuple`] as an [`EventTuple`] whose envelope is left empty
/// (see [`super::Columns::Payload`]); nothing is allocated for it.
pub(crate) fn payload_only(
    (position, event_type, event_version, payload): PayloadTuple,
) -> EventTuple {
    (
        position,
        StoredId(Ok(uuid::Uuid::nil())),
        String::new(),
        0,
        event_type,
        event_version,
        payload,
        StoredMetadata(Ok(Metadata::default())),
        StoredTime(chrono::DateTime::UNIX_EPOCH.naive_utc()),
    )
}

/// `event_id` parsed from its text, or why it is not a UUID.
pub(crate) struct StoredId(pub std::result::Result<uuid::Uuid, String>);

impl StoredId {
    fn parse(text: &[u8]) -> Self {
        StoredId(uuid::Uuid::try_parse_ascii(text).map_err(|e| {
            format!(
                "event_id {:?} is not a UUID: {e}",
                String::from_utf8_lossy(text)
            )
        }))
    }
}

/// `metadata` parsed from its JSON text, or why it is not a JSON object.
pub(crate) struct StoredMetadata(pub std::result::Result<Metadata, String>);

impl StoredMetadata {
    fn parse(text: &[u8]) -> Self {
        if text == b"{}" {
            return StoredMetadata(Ok(Metadata::default()));
        }
        StoredMetadata(
            serde_json::from_slice::<Metadata>(text)
                .map_err(|e| format!("metadata is not a JSON object: {e}")),
        )
    }
}

/// `created_at` (UTC).
pub(crate) struct StoredTime(pub chrono::NaiveDateTime);

/// Parses `YYYY-MM-DD HH:MM:SS[.f…]`, the form the store writes on SQLite,
/// without chrono's format machinery (which tries each of Diesel's formats in
/// turn, a few thousand instructions per row); `None` for any other form.
fn parse_sqlite_time(s: &[u8]) -> Option<chrono::NaiveDateTime> {
    fn num(s: &[u8]) -> Option<u32> {
        s.iter().try_fold(0u32, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    }
    if s.len() < 19
        || s[4] != b'-'
        || s[7] != b'-'
        || s[10] != b' '
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let nanos = match &s[19..] {
        [] => 0,
        [b'.', frac @ ..] if !frac.is_empty() && frac.len() <= 9 => {
            num(frac)? * 10u32.pow(9 - frac.len() as u32)
        }
        _ => return None,
    };
    let date =
        chrono::NaiveDate::from_ymd_opt(num(&s[0..4])? as i32, num(&s[5..7])?, num(&s[8..10])?)?;
    let time = chrono::NaiveTime::from_hms_nano_opt(
        num(&s[11..13])?,
        num(&s[14..16])?,
        num(&s[17..19])?,
        nanos,
    )?;
    Some(date.and_time(time))
}

/// Writes `t` as Diesel writes a `Timestamp` on SQLite (chrono's
/// `%F %T%.f`: no fraction for a whole second, else 3, 6 or 9 digits,
/// whichever holds it), without chrono's format machinery (about 3,000
/// instructions per call).
pub(crate) fn format_sqlite_time(t: chrono::NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    fn push(s: &mut String, n: u32, width: u32) {
        for k in (0..width).rev() {
            s.push(char::from(b'0' + (n / 10u32.pow(k) % 10) as u8));
        }
    }
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t.format("%F %T%.f").to_string();
    }
    // A leap second's nanoseconds run past 999,999,999.
    let nanos = t.nanosecond();
    let (second, nanos) = (t.second() + nanos / 1_000_000_000, nanos % 1_000_000_000);
    let mut s = String::with_capacity(29);
    push(&mut s, year as u32, 4);
    s.push('-');
    push(&mut s, t.month(), 2);
    s.push('-');
    push(&mut s, t.day(), 2);
    s.push(' ');
    push(&mut s, t.hour(), 2);
    s.push(':');
    push(&mut s, t.minute(), 2);
    s.push(':');
    push(&mut s, second, 2);
    if nanos != 0 {
        s.push('.');
        if nanos % 1_000_000 == 0 {
            push(&mut s, nanos / 1_000_000, 3);
        } else if nanos % 1_000 == 0 {
            push(&mut s, nanos / 1_000, 6);
        } else {
            push(&mut s, nanos, 9);
        }
    }
    s
}

mod from_sql {
    use super::{parse_sqlite_time, StoredId, StoredMetadata, StoredTime};
    use chrono::NaiveDateTime;
    use diesel::deserialize::{FromSql, Result};
    use diesel::mysql::{Mysql, MysqlValue};
    use diesel::pg::{Pg, PgValue};
    use diesel::sql_types::{Text, Timestamp};
    use diesel::sqlite::{Sqlite, SqliteValue};

    macro_rules! queryable {
        ($($t:ty),*) => {$(
            impl<ST, DB> diesel::deserialize::Queryable<ST, DB> for $t
            where
                DB: diesel::backend::Backend,
                ST: diesel::sql_types::SingleValue,
                $t: FromSql<ST, DB>,
            {
                type Row = Self;
                fn build(row: Self) -> Result<Self> {
                    Ok(row)
                }
            }
        )*};
    }
    queryable!(StoredId, StoredMetadata, StoredTime);

    impl FromSql<Text, Sqlite> for StoredId {
        fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> Result<Self> {
            Ok(StoredId::parse(value.read_text().as_bytes()))
        }
    }

    /// PostgreSQL's `uuid`, in its binary form.
    const PG_UUID: u32 = 2950;

    /// The column itself (binary) or its text.
    impl FromSql<Text, Pg> for StoredId {
        fn from_sql(value: PgValue<'_>) -> Result<Self> {
            if value.get_oid().get() == PG_UUID {
                return Ok(StoredId(
                    uuid::Uuid::from_slice(value.as_bytes()).map_err(|e| e.to_string()),
                ));
            }
            Ok(StoredId::parse(value.as_bytes()))
        }
    }

    impl FromSql<Text, Mysql> for StoredId {
        fn from_sql(value: MysqlValue<'_>) -> Result<Self> {
            Ok(StoredId::parse(value.as_bytes()))
        }
    }

    impl FromSql<Text, Sqlite> for StoredMetadata {
        fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> Result<Self> {
            Ok(StoredMetadata::parse(value.read_text().as_bytes()))
        }
    }

    impl FromSql<Text, Pg> for StoredMetadata {
        fn from_sql(value: PgValue<'_>) -> Result<Self> {
            Ok(StoredMetadata::parse(value.as_bytes()))
        }
    }

    impl FromSql<Text, Mysql> for StoredMetadata {
        fn from_sql(value: MysqlValue<'_>) -> Result<Self> {
            Ok(StoredMetadata::parse(value.as_bytes()))
        }
    }

    impl FromSql<Timestamp, Sqlite> for StoredTime {
        fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> Result<Self> {
            if value.value_type() == Some(diesel::sqlite::SqliteType::Text) {
                if let Some(t) = parse_sqlite_time(value.read_text().as_bytes()) {
                    return Ok(StoredTime(t));
                }
            }
            <NaiveDateTime as FromSql<Timestamp, Sqlite>>::from_sql(value).map(StoredTime)
        }
    }

    /// A `timestamptz` or a `timestamp` in UTC: both are microseconds
    /// since 2000-01-01 in their binary form.
    impl FromSql<Timestamp, Pg> for StoredTime {
        fn from_sql(value: PgValue<'_>) -> Result<Self> {
            <NaiveDateTime as FromSql<Timestamp, Pg>>::from_sql(value).map(StoredTime)
        }
    }

    impl FromSql<Timestamp, Mysql> for StoredTime {
        fn from_sql(value: MysqlValue<'_>) -> Result<Self> {
            <NaiveDateTime as FromSql<Timestamp, Mysql>>::from_sql(value).map(StoredTime)
        }
    }
}

/// What an append statement returns per inserted event.
#[derive(QueryableByName)]
pub(crate) struct Appended {
    #[diesel(sql_type = BigInt)]
    pub global_position: i64,
    #[diesel(sql_type = BigInt)]
    pub stream_version: i64,
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    pub created_at: StoredTime,
}

#[cfg(test)]
mod tests {
    use super::{format_sqlite_time, parse_sqlite_time};
    use chrono::{NaiveDate, NaiveDateTime};

    fn at(y: i32, nanos: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, 12, 5)
            .unwrap()
            .and_hms_nano_opt(20, 3, 56, nanos)
            .unwrap()
    }

    /// The text is Diesel's own (`%F %T%.f`), so rows written either way
    /// compare and sort alike, and it reads back to the same time.
    #[test]
    fn sqlite_times_are_written_as_diesel_writes_them() {
        let mut times = vec![
            at(2026, 0),
            at(2026, 1),
            at(2026, 10),
            at(2026, 1_000),
            at(2026, 120_000),
            at(2026, 123_456_000),
            at(2026, 999_999_999),
            at(2026, 100_000_000),
            at(2026, 7_000_000),
            // A leap second.
            NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap(),
            at(0, 5),
            at(9999, 999_000),
            at(10000, 5),
            at(-1, 5),
            NaiveDateTime::MIN,
            NaiveDateTime::MAX,
        ];
        let mut n = 1u32;
        for _ in 0..200 {
            n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            times.push(at(1970 + (n % 100) as i32, n % 1_000_000_000));
        }
        for t in times {
            let text = format_sqlite_time(t);
            assert_eq!(text, t.format("%F %T%.f").to_string(), "{t:?}");
            let leap = chrono::Timelike::nanosecond(&t) >= 1_000_000_000;
            if (0..=9999).contains(&chrono::Datelike::year(&t)) && !leap {
                assert_eq!(parse_sqlite_time(text.as_bytes()), Some(t), "{text}");
            }
        }
    }
}
