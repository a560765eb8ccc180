//! Reading the events that match a [`Query`] of types and tags, across
//! streams, and the condition of an append that depends on such a read
//! (dynamic consistency boundaries).
//!
//! A query item with tags reads the tag index (`es_event_tags`, written
//! with every tagged event), one without tags the index of event types.

use crate::backend::rows::{EventSql, EventTuple};
use crate::backend::{Bind, DbConnection, Dialect, ListOf, Stmt};
use crate::error::{Error, Result};
use diesel::sql_types::BigInt;
use es_core::{Query, RecordedEvent};

/// An event a query read, with the items of the query it matched.
#[derive(Clone, Debug)]
pub struct QueriedEvent {
    pub event: RecordedEvent,
    /// Indexes into [`Query::items`], in increasing order.
    pub items: Vec<usize>,
}

/// What [`EventStore::read_query`](crate::EventStore::read_query) read: the
/// matching events in log order, and what an append that depends on them
/// must find unchanged ([`QueryRead::condition`]).
#[derive(Clone, Debug)]
pub struct QueryRead {
    pub query: Query,
    pub events: Vec<QueriedEvent>,
    /// The highest position among `events` (0 when there are none).
    pub position: i64,
}

impl QueryRead {
    /// The condition "no event matching the query was appended since this
    /// read", for [`EventStore::append_if`](crate::EventStore::append_if).
    pub fn condition(&self) -> AppendCondition {
        AppendCondition {
            query: self.query.clone(),
            seen: self.events.len() as u64,
            position: self.position,
        }
    }
}

/// The condition of an append: the events matching `query` are still the
/// `seen` ones that a read found, the last at `position`. The append is
/// refused ([`Error::ConditionFailed`]) when a matching event above
/// `position` exists, or when the number of matches changed: on
/// PostgreSQL, a writer that drew a lower position may commit after a
/// reader read past it, so "nothing after position P" alone would miss it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendCondition {
    pub query: Query,
    /// How many events matched the query when it was read.
    pub seen: u64,
    /// The highest position among them (for messages).
    pub position: i64,
}

impl AppendCondition {
    /// No event may match `query` at all: e.g. "no `UserRegistered` with
    /// the tag `username:ada`" makes a name unique.
    pub fn none_match(query: Query) -> Self {
        AppendCondition {
            query,
            seen: 0,
            position: 0,
        }
    }
}

/// A query's items as SQL: per item, `SELECT <position> AS pos, <i> AS item`
/// of its matches, each a range of an index. (The item number is computed
/// from the position so that it is a BIGINT on every backend.)
struct ItemSql<'q> {
    sql: String,
    binds: Vec<Bind<'q>>,
}

/// Type names of every item, borrowed as `&str` for [`Dialect::any_of`].
fn type_lists(query: &Query) -> Vec<Vec<&str>> {
    query
        .items()
        .iter()
        .map(|i| i.types.iter().map(String::as_str).collect())
        .collect()
}

fn items_sql<'q>(d: &dyn Dialect, query: &'q Query, types: &'q [Vec<&'q str>]) -> Vec<ItemSql<'q>> {
    query
        .items()
        .iter()
        .zip(types)
        .enumerate()
        .map(|(index, (item, types))| {
            let mut binds = Vec::new();
            let sql = match item.tags.split_first() {
                Some((first, others)) => {
                    // The other tags join on the position; the first one
                    // picks the range of the tag index.
                    let mut sql = format!("SELECT t0.global_position AS pos, t0.global_position * 0 + {index} AS item \
                         FROM es_event_tags t0");
                    for (k, tag) in others.iter().enumerate() {
                        let k = k + 1;
                        sql.push_str(&format!(
                            " JOIN es_event_tags t{k} ON t{k}.tag = ? AND t{k}.global_position = t0.global_position"
                        ));
                        binds.push(Bind::Text(tag));
                    }
                    sql.push_str(" WHERE t0.tag = ?");
                    binds.push(Bind::Text(first));
                    if !types.is_empty() {
                        let (any, type_binds) = d.any_of(types, ListOf::Text);
                        sql.push_str(&format!(" AND t0.event_type {any}"));
                        binds.extend(type_binds);
                    }
                    sql
                }
                None => {
                    let (any, type_binds) = d.any_of(types, ListOf::Text);
                    binds.extend(type_binds);
                    format!(
                        "SELECT global_position AS pos, global_position * 0 + {index} AS item \
                         FROM es_events WHERE event_type {any}"
                    )
                }
            };
            ItemSql { sql, binds }
        })
        .collect()
}

/// Every item's matches, `(pos, item)` rows joined by UNION ALL, and the
/// values they bind, in order.
fn union_of<'q>(
    d: &dyn Dialect,
    query: &'q Query,
    types: &'q [Vec<&'q str>],
) -> (String, Vec<Bind<'q>>) {
    let items = items_sql(d, query, types);
    let union = items
        .iter()
        .map(|i| i.sql.as_str())
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    (union, items.into_iter().flat_map(|i| i.binds).collect())
}

/// The events matching `query`, in log order, each with the items it
/// matched.
pub(crate) fn read_query(conn: &mut DbConnection, query: &Query) -> Result<QueryRead> {
    query.validate()?;
    let d = conn.dialect();
    let types = type_lists(query);
    let (union, binds) = union_of(d, query, &types);
    let sql = format!(
        "SELECT {}, x.item FROM es_events JOIN ({union}) x ON x.pos = es_events.global_position \
         ORDER BY es_events.global_position, x.item",
        d.event_columns()
    );
    let mut q = Stmt::new(sql).rows::<(EventSql, BigInt)>();
    binds.into_iter().for_each(|b| q.push(b));
    let rows: Vec<(EventTuple, i64)> = q.load(conn)?;
    let mut events: Vec<QueriedEvent> = Vec::new();
    for (row, item) in rows {
        let item = usize::try_from(item).unwrap_or_default();
        match events.last_mut() {
            Some(last) if last.event.global_position == row.0 => last.items.push(item),
            _ => events.push(QueriedEvent {
                event: crate::read::recorded(row)?,
                items: vec![item],
            }),
        }
    }
    let position = events.last().map_or(0, |e| e.event.global_position);
    Ok(QueryRead {
        query: query.clone(),
        events,
        position,
    })
}

#[derive(diesel::QueryableByName)]
struct Matching {
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = BigInt)]
    last: i64,
}

/// How many events match `query` now, and the highest position among them.
pub(crate) fn count_matching(conn: &mut DbConnection, query: &Query) -> Result<(u64, i64)> {
    let d = conn.dialect();
    let types = type_lists(query);
    let (union, binds) = union_of(d, query, &types);
    let mut q = Stmt::new(format!(
        "SELECT COUNT(DISTINCT pos) AS n, COALESCE(MAX(pos), 0) AS last FROM ({union}) x"
    ));
    binds.into_iter().for_each(|b| q.push(b));
    let m = q.get_result::<Matching>(conn)?;
    Ok((u64::try_from(m.n).unwrap_or(0), m.last))
}

/// Refuses the append unless the events matching the condition's query are
/// still the ones it saw. Runs inside the append, after the locks that
/// keep matching writers out until it commits
/// ([`Dialect::lock_for_condition`]).
pub(crate) fn check_condition(conn: &mut DbConnection, condition: &AppendCondition) -> Result<()> {
    let (now, last) = count_matching(conn, &condition.query)?;
    // Both: a match above the read's last one is new (wherever the count
    // went), and a new match below it (a lower position committed after
    // the read, on PostgreSQL) changes the count.
    if now == condition.seen && last <= condition.position {
        return Ok(());
    }
    Err(Error::ConditionFailed {
        seen: condition.seen,
        now,
        position: condition.position,
    })
}
