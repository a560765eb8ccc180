//! PostgreSQL: concurrent writers, positions visible out of order (see
//! [`crate::follow`]), idle runners woken by the order-key sequence.

use super::insert::{
    append_text, cached_shape, map_insert_error, metadata_bind, sorted, OneEventTexts,
};
use super::rows::{
    payload_only, Appended, EventSql, EventTuple, Number, PayloadSql, PayloadTuple, StoredTime,
};
mod migrations;

use super::{quote_ident, quote_literal};
use super::{Backend, Bind, Columns, DbConnection, Dialect, ListOf, Stmt};
use crate::error::{Error, Result};
use crate::read_model::GuardedRow;
use diesel::connection::TransactionManager;
use diesel::pg::Pg;
use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName};
use es_core::view::ColumnType;
use es_core::{ExpectedVersion, NewEvent, Query};

/// The key of the append lock of the stream `$stream` (SQL text) in the
/// class ([`STREAM_LOCK_CLASS`]) bound at the `?` before it: the one expression every statement
/// that takes stream locks uses, so that they all take the same locks.
macro_rules! stream_lock {
    ($stream:literal) => {
        concat!(
            "pg_advisory_xact_lock(?, hashtext('es_events'::regclass::oid::text || '/' || ",
            $stream,
            "))"
        )
    };
}

/// Takes the append locks of the streams of a text array (binds: the
/// class, the array), in the order of the stream ids; one row, `n`.
macro_rules! lock_streams_sql {
    () => {
        concat!(
            "SELECT COUNT(",
            stream_lock!("s"),
            ") AS n FROM (SELECT DISTINCT s COLLATE \"C\" AS s FROM unnest(?::text[]) AS s ORDER BY 1) AS streams"
        )
    };
}

pub(crate) struct Postgres;

impl Dialect for Postgres {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    /// The event id and the time in their binary forms (16 bytes, and
    /// microseconds since 2000 in UTC): formatting them as text cost the
    /// server about a fifth of a page of a rebuild.
    fn event_columns(&self) -> &'static str {
        "global_position, event_id, stream_id, stream_version, event_type, \
         event_version, payload::text AS payload, metadata::text AS metadata, created_at"
    }

    fn fold_columns(&self) -> &'static str {
        "global_position, stream_version, event_type, event_version, payload::text AS payload"
    }

    fn payload_columns(&self) -> &'static str {
        "global_position, event_type, event_version, payload::text AS payload"
    }

    /// Stream ids may be kilobytes long, beyond what a btree entry holds, so
    /// the unique index is on the md5 of the id.
    fn stream_is(&self) -> &'static str {
        "md5(stream_id) = md5(?) AND stream_id = ?"
    }

    fn stream_binds(&self) -> usize {
        2
    }

    fn any_of<'a>(&self, values: &'a [&'a str], of: ListOf) -> (String, Vec<Bind<'a>>) {
        let any = match of {
            ListOf::Text => "= ANY(?)",
            ListOf::Uuid => "= ANY(?::text[]::uuid[])",
        };
        (any.to_owned(), vec![Bind::TextArray(values)])
    }

    fn name(&self) -> &'static str {
        "postgres"
    }

    fn now_ms(&self) -> &'static str {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    }

    fn migrations(&self) -> &'static [(i32, &'static str)] {
        migrations::MIGRATIONS
    }

    fn lock_migrations(&self, conn: &mut DbConnection) -> Result<()> {
        use diesel::connection::SimpleConnection;
        conn.batch_execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('es_diesel.migrate.' || current_schema(), 0))",
        )?;
        Ok(())
    }

    fn relation_exists(&self, name: &str) -> Stmt<'static> {
        Stmt::new("SELECT CASE WHEN to_regclass(?) IS NULL THEN 0 ELSE 1 END::bigint AS n")
            .bind(Bind::Owned(quote_ident(name)))
    }

    fn utc_timestamp(&self, column: &str) -> String {
        format!("({column} AT TIME ZONE 'UTC')")
    }

    fn json_field(&self, json: &str, key: &str, ty: ColumnType) -> String {
        let key = quote_literal(key);
        match ty {
            ColumnType::Text => format!("({json}->>{key})"),
            ColumnType::Json => format!("({json}->{key})::text"),
            ty => format!("({json}->>{key})::{}", pg_type(ty)),
        }
    }

    fn as_text(&self, column: &str) -> String {
        format!("{column}::text")
    }

    fn save_snapshot<'a>(
        &self,
        aggregate_type: &'a str,
        stream: &'a str,
        shape: i64,
        stream_version: i64,
        state: &'a str,
    ) -> Stmt<'a> {
        // The stream_id condition keeps an md5 collision from overwriting
        // another stream's snapshot.
        Stmt::new(
            "INSERT INTO es_snapshots (aggregate_type, stream_id, shape, stream_version, state) \
             VALUES (?, ?, ?, ?, ?::jsonb) \
             ON CONFLICT (aggregate_type, md5(stream_id)) DO UPDATE SET \
             shape = EXCLUDED.shape, stream_version = EXCLUDED.stream_version, \
             state = EXCLUDED.state, created_at = now() \
             WHERE es_snapshots.stream_id = EXCLUDED.stream_id \
             AND (es_snapshots.stream_version < EXCLUDED.stream_version OR es_snapshots.shape <> EXCLUDED.shape)",
        )
        .bind(Bind::Text(aggregate_type))
        .bind(Bind::Text(stream))
        .bind(Bind::BigInt(shape))
        .bind(Bind::BigInt(stream_version))
        .bind(Bind::Text(state))
    }

    fn one_statement_append(&self) -> bool {
        true
    }

    fn watches_appends(&self) -> bool {
        true
    }

    fn locks_each_stream(&self) -> bool {
        true
    }

    fn lock_streams(&self, conn: &mut DbConnection, streams: &[&str]) -> Result<()> {
        if streams.is_empty() {
            return Ok(());
        }
        lock_streams(conn, streams)
    }

    /// Writers run concurrently here. A writer takes a shared advisory lock
    /// per tag it writes; a conditional append takes an exclusive one per
    /// tag of each item of its query, which waits for the writers of those
    /// tags in flight to finish and holds off new ones until it commits.
    /// An item without tags matches by type alone: for those, the lock
    /// every append announces itself with, exclusively. The stream locks
    /// and then the tag locks are one statement, keys in increasing order.
    fn lock_tags(
        &self,
        conn: &mut DbConnection,
        streams: &[&str],
        tags: &[&str],
        condition: Option<&Query>,
    ) -> Result<()> {
        let mut exclusive: Vec<&str> = Vec::new();
        let mut by_type = false;
        for item in condition.map_or(&[][..], Query::items) {
            by_type |= item.tags.is_empty();
            exclusive.extend(item.tags.iter().map(String::as_str));
        }
        if tags.is_empty() && exclusive.is_empty() {
            if !streams.is_empty() {
                lock_streams(conn, streams)?;
            }
        } else {
            // The stream locks (`s`, empty or not, one row) are a condition
            // of the tag locks' only row source, so they come first.
            Stmt::new(concat!(
            "WITH s AS MATERIALIZED (", lock_streams_sql!(), ") \
             SELECT COUNT(CASE WHEN x THEN pg_advisory_xact_lock(?, k) \
                              ELSE pg_advisory_xact_lock_shared(?, k) END) AS n \
             FROM (SELECT k, bool_or(x) AS x FROM ( \
                     SELECT hashtext('es_event_tags'::regclass::oid::text || '/' || t) AS k, false AS x FROM unnest(?::text[]) AS t \
                     UNION ALL \
                     SELECT hashtext('es_event_tags'::regclass::oid::text || '/' || t), true FROM unnest(?::text[]) AS t) AS u \
                   WHERE (SELECT n FROM s) >= 0 \
                   GROUP BY k ORDER BY k) AS keys",
        ))
        .bind(Bind::Int(STREAM_LOCK_CLASS))
        .bind(Bind::TextArray(streams))
        .bind(Bind::Int(TAG_LOCK_CLASS))
        .bind(Bind::Int(TAG_LOCK_CLASS))
        .bind(Bind::TextArray(tags))
        .bind(Bind::TextArray(&exclusive))
        .get_result::<Number>(conn)?;
        }
        if by_type {
            // Every append holds this lock, shared, from its insert to its
            // commit (`es_append_key`, migration 6): taken exclusively, it
            // waits for the appends in flight and holds off new ones.
            Stmt::new(
                "SELECT COUNT(pg_advisory_xact_lock(1163067394, 'es_order_keys'::regclass::oid::integer)) AS n",
            )
            .get_result::<Number>(conn)?;
        }
        Ok(())
    }

    fn insert_events(
        &self,
        conn: &mut DbConnection,
        stream: &str,
        expected: ExpectedVersion,
        chunk: &[NewEvent],
    ) -> Result<Vec<Appended>> {
        insert(conn, stream, expected, chunk)
    }

    fn insert_events_guarded(
        &self,
        conn: &mut DbConnection,
        stream: &str,
        expected: ExpectedVersion,
        chunk: &[NewEvent],
        rows: &[GuardedRow],
    ) -> Result<Option<Vec<Appended>>> {
        insert_guarded(conn, stream, expected, chunk, rows)
    }

    fn guards_rows(&self) -> bool {
        true
    }

    fn read_after(
        &self,
        conn: &mut DbConnection,
        after_key: i64,
        after_position: i64,
        types: Option<&[&str]>,
        limit: i64,
        columns: Columns,
    ) -> Result<Vec<(EventTuple, i64)>> {
        let Some(horizon) = horizon(conn)? else {
            return Ok(Vec::new());
        };
        follow(
            conn,
            after_key,
            after_position,
            types,
            Some(horizon),
            limit,
            columns,
        )
    }

    fn read_visible_after(
        &self,
        conn: &mut DbConnection,
        after_key: i64,
        after_position: i64,
        types: &[&str],
        limit: i64,
        columns: Columns,
    ) -> Result<Vec<(EventTuple, i64)>> {
        follow(
            conn,
            after_key,
            after_position,
            Some(types),
            None,
            limit,
            columns,
        )
    }

    fn count_visible_after(
        &self,
        conn: &mut DbConnection,
        after_key: i64,
        after_position: i64,
        types: &[&str],
    ) -> Result<u64> {
        let n = Stmt::new(
            "SELECT COUNT(*) AS n FROM es_events \
             WHERE (order_key, global_position) > (?, ?) AND event_type = ANY(?)",
        )
        .bind(Bind::BigInt(after_key))
        .bind(Bind::BigInt(after_position))
        .bind(Bind::TextArray(types))
        .get_result::<Number>(conn)?
        .n;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Without statistics (a log just bulk-loaded or imported, before
    /// autovacuum's analyze), PostgreSQL plans a page of several event types
    /// as a bitmap scan of every later match and a sort: each batch of a
    /// rebuild would read the rest of the log. An ANALYZE of the columns the
    /// page's plan depends on gives it the ordered index scan.
    ///
    /// Missing statistics are sampled small (statistics target 10: 3,000
    /// rows, 13 ms on 100,000 events where the default target's 30,000 rows
    /// take about 50 ms, and the whole table, payloads and metadata
    /// included, several times longer): enough to tell an ordered scan from
    /// a sort. Autovacuum's analyze replaces them with full statistics
    /// later; stale ones (by autovacuum's measure) are sampled at the
    /// default target, at most every ten minutes (a sample of some columns
    /// leaves the counts of changes, and autovacuum's analyze, due).
    /// Missing ones are seen at once (the counts of changes reach the
    /// statistics views up to a second after a commit). The target is set
    /// for the sample's own transaction only, and the sample never waits
    /// for a lock (`SKIP_LOCKED`: behind a vacuum or an index build it does
    /// not run).
    fn prepare_full_scan(&self, conn: &mut DbConnection) {
        let wanted = Stmt::new(
            "SELECT CASE \
               WHEN NOT EXISTS (SELECT 1 FROM es_events) THEN 0 \
               WHEN (SELECT COUNT(*) FROM pg_stats s \
                     WHERE s.schemaname = t.schemaname AND s.tablename = t.relname \
                       AND s.attname IN ('event_type', 'order_key')) < 2 THEN 2 \
               WHEN t.n_mod_since_analyze > GREATEST(1000, t.n_live_tup / 10) \
                    AND COALESCE(t.last_analyze < now() - interval '10 minutes', true) THEN 1 \
               ELSE 0 END::bigint AS n \
             FROM pg_stat_user_tables t WHERE t.relid = 'es_events'::regclass",
        )
        .get_result::<Number>(conn);
        let sample = match wanted {
            // One simple query is one transaction: the target ends with it.
            Ok(Number { n: 2 }) => {
                "SELECT set_config('default_statistics_target', '10', true); \
                 ANALYZE (SKIP_LOCKED) es_events (event_type, order_key, global_position)"
            }
            Ok(Number { n: 1 }) => {
                "ANALYZE (SKIP_LOCKED) es_events (event_type, order_key, global_position)"
            }
            _ => return,
        };
        use diesel::connection::SimpleConnection;
        if let Err(e) = conn.batch_execute(sample) {
            tracing::debug!(error = %e, "could not analyze es_events before a rebuild");
        }
    }

    fn settled_horizon(&self, conn: &mut DbConnection) -> Result<Option<i64>> {
        loop {
            if let Some(h) = horizon(conn)? {
                return Ok(Some(h));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Events after the checkpoint in follow order, below `horizon` if given.
fn follow(
    conn: &mut DbConnection,
    after_key: i64,
    after_position: i64,
    types: Option<&[&str]>,
    horizon: Option<i64>,
    limit: i64,
    columns: Columns,
) -> Result<Vec<(EventTuple, i64)>> {
    let below = if horizon.is_some() {
        "AND order_key < ?"
    } else {
        ""
    };
    let filter = if types.is_some() {
        "AND event_type = ANY(?)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {}, order_key FROM es_events \
         WHERE (order_key, global_position) > (?, ?) {below} {filter} \
         ORDER BY order_key, global_position LIMIT ?",
        columns.of(&Postgres)
    );
    let mut q = Stmt::with_capacity(sql, 5)
        .bind(Bind::BigInt(after_key))
        .bind(Bind::BigInt(after_position));
    if let Some(h) = horizon {
        q.push(Bind::BigInt(h));
    }
    if let Some(types) = types {
        q.push(Bind::TextArray(types));
    }
    q.push(Bind::BigInt(limit));
    Ok(match columns {
        Columns::Envelope => q.rows::<(EventSql, BigInt)>().load(conn)?,
        Columns::Payload => q
            .rows::<(PayloadSql, BigInt)>()
            .load::<(PayloadTuple, i64)>(conn)?
            .into_iter()
            .map(|(row, key)| (payload_only(row), key))
            .collect(),
    })
}

/// The order key below which no append in flight can still write (see
/// [`crate::follow`]), or `None` when an append kept announcing itself
/// without a published key for a while (then nothing is safe to read yet).
fn horizon(conn: &mut DbConnection) -> Result<Option<i64>> {
    #[derive(QueryableByName)]
    struct Horizon {
        #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
        h: Option<i64>,
        #[diesel(sql_type = diesel::sql_types::Text)]
        isolation: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        later_statement: bool,
    }
    type Tm = <DbConnection as Connection>::TransactionManager;
    let in_transaction = Tm::transaction_manager_status_mut(conn)
        .transaction_depth()?
        .is_some();
    // An append is between its announcement and its published key for
    // microseconds; a few short looks almost always find it done.
    for attempt in 0..50u32 {
        let row = Stmt::new(
            "SELECT es_follow_horizon() AS h, current_setting('transaction_isolation') AS isolation, \
             now() <> statement_timestamp() AS later_statement",
        )
        .get_result::<Horizon>(conn)?;
        // Under REPEATABLE READ or SERIALIZABLE the read that follows would
        // see the snapshot of the transaction's first statement, older than
        // this look at the appends in flight.
        if (in_transaction || row.later_statement) && row.isolation != "read committed" {
            return Err(Error::Follow {
                reason: format!(
                    "the log is followed inside a {} transaction; followers must read in READ COMMITTED \
                     (open the transaction with `write_transaction`, or outside any transaction)",
                    row.isolation.to_uppercase()
                ),
            });
        }
        if row.h.is_some() {
            return Ok(row.h);
        }
        std::thread::sleep(std::time::Duration::from_micros(
            200 * u64::from(attempt.min(10) + 1),
        ));
    }
    tracing::debug!("appends in flight have not published their order keys yet");
    Ok(None)
}

/// Advisory-lock namespace of per-stream append locks ("ES" + 1).
const STREAM_LOCK_CLASS: i32 = 0x4553_0001;
/// The advisory lock class of tags (see [`Postgres::lock_tags`]); keys
/// are hashed with the OID of the tag table, so that sessions reaching one
/// log through different search paths take the same locks. (0x4553_0002 is
/// the class of the appends' announce lock, `es_append_key`.)
const TAG_LOCK_CLASS: i32 = 0x4553_0003;

/// Appends with `ExpectedVersion::Any` read the stream's version and write
/// the next one; serializing them per stream keeps them from colliding with
/// each other. The locks must be held before the insert statement takes its
/// snapshot, hence a statement of their own; they are keyed by schema and
/// stream and taken in the order of the stream ids (bytewise, as appends
/// write streams). Every insert inside a transaction takes its stream's
/// lock too (see [`insert`]): a writer never waits for an uncommitted event
/// of another transaction, only for these locks, which every write takes
/// in one order, so two writers never wait for each other in a cycle.
fn lock_streams(conn: &mut DbConnection, streams: &[&str]) -> Result<()> {
    Stmt::new(lock_streams_sql!())
        .bind(Bind::Int(STREAM_LOCK_CLASS))
        .bind(Bind::TextArray(streams))
        .execute(conn)?;
    Ok(())
}

/// One statement: takes the stream's append lock inside a transaction
/// block, draws the append's order key, reads the stream's last version and
/// key, checks the expectation and inserts the chunk, so an append costs
/// one round trip. A concurrent writer of the same version loses on the
/// unique index.
///
/// The lock, held to the commit, makes every writer of the stream wait for
/// it before it can wait for an uncommitted event of this transaction, so
/// that writers only ever wait for stream locks, taken in one order (see
/// [`lock_streams`]), never in a cycle. An append that commits by itself
/// (outside a transaction that Diesel opened) waits for nothing once it has
/// inserted, so it takes none: only transactions hold these locks, one per
/// stream they append to, until they commit.
///
/// The order key (see [`crate::follow`]) is the larger of a key drawn now
/// and the key of the stream's previous event, so that followers, which
/// read in key order, see every stream's versions in increasing order.
fn insert(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
) -> Result<Vec<Appended>> {
    static ONE: OneEventTexts = [const { std::sync::OnceLock::new() }; 4];
    static ONE_LOCKED: OneEventTexts = [const { std::sync::OnceLock::new() }; 4];
    let locked = super::in_transaction(conn)?;
    let texts = if locked { &ONE_LOCKED } else { &ONE };
    let sql = append_text(texts, chunk.len(), expected, || {
        insert_sql(chunk.len(), expected, locked, false)
    });
    let q = insert_binds(sql, stream, expected, chunk, locked);
    /// The texts of one-event appends that expect a version or no stream,
    /// committing by themselves or (`…Locked`) in a transaction.
    struct OneAtVersion;
    struct OneNew;
    struct OneAtVersionLocked;
    struct OneNewLocked;
    let inserted = match (chunk.len(), expected, locked) {
        (1, ExpectedVersion::Exact(_), false) => q.named::<OneAtVersion>().load::<Appended>(conn),
        (1, ExpectedVersion::NoStream, false) => q.named::<OneNew>().load::<Appended>(conn),
        (1, ExpectedVersion::Exact(_), true) => {
            q.named::<OneAtVersionLocked>().load::<Appended>(conn)
        }
        (1, ExpectedVersion::NoStream, true) => q.named::<OneNewLocked>().load::<Appended>(conn),
        _ => q.load::<Appended>(conn),
    };
    inserted
        .map(sorted)
        .map_err(|e| map_insert_error(e, stream, expected, chunk))
}

/// The text of [`insert`]: in a transaction (`locked`) it takes the
/// stream's lock first. `guarded`: the insert is a `WITH` query `ins`,
/// followed by `n`, the count of its rows, for [`insert_guarded`] to go on.
fn insert_sql(events: usize, expected: ExpectedVersion, locked: bool, guarded: bool) -> String {
    let mut sql = String::with_capacity(1000 + events * 70);
    sql.push_str(if locked {
        concat!(
            "WITH l AS MATERIALIZED (SELECT COUNT(",
            stream_lock!("?"),
            ") AS n), k AS MATERIALIZED (SELECT es_append_key() AS k FROM l), "
        )
    } else {
        "WITH k AS MATERIALIZED (SELECT es_append_key() AS k), "
    });
    sql.push_str(
        "last AS (SELECT stream_version, order_key FROM es_events \
         WHERE md5(stream_id) = md5(?) AND stream_id = ? ORDER BY stream_version DESC LIMIT 1), \
         cur AS (SELECT COALESCE((SELECT stream_version FROM last), 0) AS v, \
         GREATEST((SELECT k FROM k), (SELECT order_key FROM last)) AS key) ",
    );
    if guarded {
        sql.push_str(", ins AS (");
    }
    sql.push_str(
        "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, event_version, payload, metadata, order_key) \
         SELECT e.event_id, ?, cur.v + e.k, e.event_type, e.event_version, e.payload, e.metadata, cur.key \
         FROM cur, (VALUES ",
    );
    for k in 1..=events {
        if k > 1 {
            sql.push_str(", ");
        }
        use std::fmt::Write;
        let _ = write!(
            sql,
            "(?::uuid, {k}::bigint, ?::text, ?::smallint, ?::jsonb, ?::jsonb)"
        );
    }
    sql.push_str(") AS e(event_id, k, event_type, event_version, payload, metadata)");
    match expected {
        ExpectedVersion::Any => {}
        ExpectedVersion::NoStream => sql.push_str(" WHERE cur.v = 0"),
        ExpectedVersion::StreamExists => sql.push_str(" WHERE cur.v > 0"),
        ExpectedVersion::Exact(_) => sql.push_str(" WHERE cur.v = ?"),
    }
    sql.push_str(
        " ORDER BY e.k RETURNING global_position, stream_version, (created_at AT TIME ZONE 'UTC') AS created_at",
    );
    if guarded {
        sql.push_str("), n AS MATERIALIZED (SELECT COUNT(*) AS n FROM ins)");
    }
    sql
}

/// [`insert_sql`]'s values.
fn insert_binds<'a>(
    sql: impl Into<super::stmt::SqlText<'a>>,
    stream: &'a str,
    expected: ExpectedVersion,
    chunk: &'a [NewEvent],
    locked: bool,
) -> Stmt<'a> {
    let mut q = Stmt::with_capacity(sql, 6 + chunk.len() * 5);
    if !cached_shape(chunk.len()) {
        q.dont_cache();
    }
    if locked {
        q.push(Bind::Int(STREAM_LOCK_CLASS));
        q.push(Bind::Text(stream));
    }
    q.push(Bind::Text(stream));
    q.push(Bind::Text(stream));
    q.push(Bind::Text(stream));
    for ev in chunk {
        q.push(Bind::Uuid(ev.event_id));
        q.push(Bind::Text(ev.event_type));
        q.push(Bind::SmallInt(ev.event_version as i16));
        q.push(Bind::Text(&ev.payload));
        q.push(metadata_bind(&ev.metadata));
    }
    if let ExpectedVersion::Exact(v) = expected {
        q.push(Bind::BigInt(v));
    }
    q
}

/// One statement, committing by itself: inserts `chunk` as [`insert`]
/// does and writes the read-model `rows`, each only if it is still at the
/// version it was read at (an update or a delete) or still missing (an
/// insert). Either everything is written or nothing: when a row moved on,
/// `es_rows_unchanged` (migration 12) fails the statement. No rows when
/// the expectation did not hold; `Ok(None)` when the server refused the
/// statement (nothing was written either way).
///
/// The events are inserted first: an update or a delete waits for `n`,
/// the count of inserted events, before it looks at its row, so a writer
/// of the stream that holds a row lock in its transaction is waited for on
/// the stream, as by every other append, not on its row.
fn insert_guarded(
    conn: &mut DbConnection,
    stream: &str,
    expected: ExpectedVersion,
    chunk: &[NewEvent],
    rows: &[GuardedRow],
) -> Result<Option<Vec<Appended>>> {
    let DbConnection::Postgres(pg) = conn else {
        return Ok(None);
    };
    let head = insert_sql(chunk.len(), expected, false, true);
    let query = GuardedAppend {
        head: insert_binds(head, stream, expected, chunk, false).on_pg(),
        rows,
        // A connection keeps every statement it prepared: only the shapes
        // a command's append takes (one event, a row or two, whose tables
        // and writes its projectors fix) stay prepared.
        cache: chunk.len() == 1 && rows.len() <= 2,
    };
    let (ok, positions, versions, created) = match diesel::RunQueryDsl::get_result::<GuardedResult>(
        query, pg,
    ) {
        Ok(result) => result,
        Err(e) if refused(&e) => {
            tracing::debug!(stream, error = %e, "an append with its rows was refused; appending in a transaction");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    debug_assert!(ok);
    let (Some(positions), Some(versions), Some(created)) = (positions, versions, created) else {
        return Ok(Some(Vec::new()));
    };
    Ok(Some(
        positions
            .into_iter()
            .zip(versions)
            .zip(created)
            .map(|((global_position, stream_version), created_at)| Appended {
                global_position,
                stream_version,
                created_at: StoredTime(created_at),
            })
            .collect(),
    ))
}

type GuardedResult = (
    bool,
    Option<Vec<i64>>,
    Option<Vec<i64>>,
    Option<Vec<chrono::NaiveDateTime>>,
);

/// Whether `err` is a refusal of a statement that commits by itself:
/// nothing was written, and the append in a transaction reports what is
/// wrong (a row moved on, a duplicate, a read model's constraint, a value
/// that cannot be bound). A connection that broke may have committed it,
/// and a cancelled statement (a timeout, an administrator) is not run
/// again: those errors are the caller's.
pub(crate) fn refused(err: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as E};
    match err {
        E::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => false,
        E::DatabaseError(_, info) => {
            let message = info.message();
            !message.starts_with("canceling statement")
                && !message.starts_with("terminating connection")
        }
        E::SerializationError(_) | E::QueryBuilderError(_) => true,
        _ => false,
    }
}

/// The statement of [`insert_guarded`]: `head`, the insert's `WITH`
/// queries, then one `WITH` query per row, then the check.
struct GuardedAppend<'a> {
    head: super::stmt::On<'a, Pg, diesel::sql_types::Untyped>,
    rows: &'a [GuardedRow],
    cache: bool,
}

impl diesel::query_builder::QueryId for GuardedAppend<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for GuardedAppend<'_> {
    type SqlType = (
        diesel::sql_types::Bool,
        diesel::sql_types::Nullable<diesel::sql_types::Array<BigInt>>,
        diesel::sql_types::Nullable<diesel::sql_types::Array<BigInt>>,
        diesel::sql_types::Nullable<diesel::sql_types::Array<diesel::sql_types::Timestamp>>,
    );
}

impl<Conn> diesel::RunQueryDsl<Conn> for GuardedAppend<'_> {}

impl diesel::query_builder::QueryFragment<Pg> for GuardedAppend<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        if !self.cache {
            out.unsafe_to_cache_prepared();
        }
        self.head.walk_ast(out.reborrow())?;
        for (i, row) in self.rows.iter().enumerate() {
            out.push_sql(", w");
            out.push_sql(&i.to_string());
            out.push_sql(" AS (");
            row.statement.walk_ast(out.reborrow())?;
            match &row.version {
                Some(version) => {
                    out.push_sql(" AND xmin::text::bigint = ");
                    out.push_bind_param::<BigInt, _>(version)?;
                    out.push_sql(" AND (SELECT n FROM n) > 0 RETURNING 1)");
                }
                None => out.push_sql(" ON CONFLICT DO NOTHING RETURNING 1)"),
            }
        }
        // Every row written, or (the expectation failed) none.
        out.push_sql(" SELECT es_rows_unchanged(");
        if self.rows.is_empty() {
            out.push_sql("0");
        }
        for i in 0..self.rows.len() {
            if i > 0 {
                out.push_sql(" + ");
            }
            out.push_sql("(SELECT COUNT(*) FROM w");
            out.push_sql(&i.to_string());
            out.push_sql(")");
        }
        out.push_sql(" = CASE WHEN (SELECT n FROM n) = 0 THEN 0 ELSE ");
        out.push_sql(&self.rows.len().to_string());
        out.push_sql(" END)");
        out.push_sql(
            ", array_agg(global_position ORDER BY stream_version), \
             array_agg(stream_version ORDER BY stream_version), \
             array_agg(created_at ORDER BY stream_version) FROM ins",
        );
        Ok(())
    }
}

fn pg_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::SmallInt => "smallint",
        ColumnType::Integer => "integer",
        ColumnType::BigInt => "bigint",
        ColumnType::Float => "real",
        ColumnType::Double => "double precision",
        ColumnType::Bool => "boolean",
        ColumnType::Text | ColumnType::Json => "text",
    }
}

#[cfg(test)]
mod refused_tests {
    use super::refused;
    use diesel::result::{DatabaseErrorKind, Error};

    fn server(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn refusals_go_to_the_transaction_and_the_rest_to_the_caller() {
        assert!(refused(&server(
            DatabaseErrorKind::SerializationFailure,
            "a read-model row changed between its read and the append that writes it"
        )));
        assert!(refused(&server(
            DatabaseErrorKind::UniqueViolation,
            "duplicate key"
        )));
        assert!(refused(&server(
            DatabaseErrorKind::Unknown,
            "function es_rows_unchanged(boolean) does not exist"
        )));
        assert!(refused(&Error::SerializationError("bind".into())));
        assert!(!refused(&server(
            DatabaseErrorKind::ClosedConnection,
            "server closed the connection"
        )));
        assert!(!refused(&server(
            DatabaseErrorKind::Unknown,
            "canceling statement due to statement timeout"
        )));
        assert!(!refused(&server(
            DatabaseErrorKind::Unknown,
            "terminating connection due to administrator command"
        )));
        // The statement may have committed before its result failed to decode.
        assert!(!refused(&Error::DeserializationError("row".into())));
        assert!(!refused(&Error::NotFound));
    }
}
