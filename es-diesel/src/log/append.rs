//! Appending to the log: optimistic concurrency per stream, all or nothing.

use crate::backend::{Bind, DbConnection, Stmt};
use crate::error::{check_stream_id, Error, Result};
use crate::query::{check_condition, AppendCondition};
use es_core::{Event, ExpectedVersion, Metadata, NewEvent, Payload, RecordedEvent};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;
use tracing::field::Empty;

pub(crate) use crate::backend::CHUNK;
pub(crate) use crate::error::ACTUAL_UNKNOWN;

/// Events to append to one stream, with what the writer expects of it.
#[derive(Clone, Debug)]
pub struct StreamWrite {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

impl StreamWrite {
    pub fn new(stream_id: impl Into<String>, expected: ExpectedVersion) -> Self {
        StreamWrite {
            stream_id: stream_id.into(),
            expected,
            events: Vec::new(),
        }
    }

    /// Adds an event (encoded now) with no metadata.
    pub fn push<E: Event>(&mut self, event: &E) -> Result<&mut Self> {
        self.events.push(NewEvent::new(event)?);
        Ok(self)
    }

    /// Adds an event (encoded now) with metadata.
    pub fn push_with<E: Event>(&mut self, event: &E, metadata: Metadata) -> Result<&mut Self> {
        self.events
            .push(NewEvent::new(event)?.with_metadata(metadata));
        Ok(self)
    }

    /// Adds an already encoded event.
    pub fn push_new(&mut self, event: NewEvent) -> &mut Self {
        self.events.push(event);
        self
    }
}

/// How many times an append is retried after losing a race it may simply
/// run again (see [`retry_after`]).
pub(crate) const RACE_RETRIES: usize = 16;

/// Whether an append that failed with `err` (and was rolled back) can just
/// be run again: a race lost by a write that expects [`ExpectedVersion::Any`]
/// or [`ExpectedVersion::StreamExists`] (the stream exists, since another
/// writer just wrote the version it wanted), or a transaction the database
/// aborted to break a deadlock or a serialization failure.
pub(crate) fn retry_after(err: &Error, writes: &[StreamWrite]) -> bool {
    match err {
        Error::Conflict { stream, actual, .. } if *actual == ACTUAL_UNKNOWN => {
            writes.iter().any(|w| {
                &w.stream_id == stream
                    && matches!(
                        w.expected,
                        ExpectedVersion::Any | ExpectedVersion::StreamExists
                    )
            })
        }
        other => other.is_transient(),
    }
}

/// Runs an append (`run`, which rolls back what it wrote when it fails)
/// until it succeeds, or fails in a way that running it again would not
/// change (see [`retry_after`]); a conflict's actual version is filled in.
pub(crate) fn retrying<T>(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    mut run: impl FnMut(&mut DbConnection) -> Result<T>,
) -> Result<T> {
    // Inside a caller's transaction a transient error (a deadlock, a
    // serialization failure) goes to the caller, whose transaction must run
    // again whole. MySQL rolls the whole transaction back to break a
    // deadlock: nothing is left to retry in (a retry would run outside any
    // transaction and commit on its own). PostgreSQL rolls back the
    // append's savepoint, but a deadlock there involves locks the
    // transaction took before it (in one append, every writer takes its
    // locks in one order), which a retry would still hold: it would wait in
    // the same cycle again, a second each time, while the other writers
    // of the cycle stay blocked.
    let callers_transaction = crate::backend::in_transaction(conn)?;
    let mut attempt = 0;
    loop {
        match run(conn) {
            Err(e) if callers_transaction && e.is_transient() => return Err(e),
            Err(e) if attempt < RACE_RETRIES && retry_after(&e, writes) => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "append lost a race; retrying");
            }
            Err(e) => return Err(known_actual(conn, e)?),
            ok => return ok,
        }
    }
}

/// Fills in the actual version of a conflict that happened in a statement
/// (the transaction that failed must be rolled back first).
pub(crate) fn known_actual(conn: &mut DbConnection, err: Error) -> Result<Error> {
    match err {
        Error::Conflict {
            stream,
            expected,
            actual,
        } if actual == ACTUAL_UNKNOWN => {
            let actual = crate::read::stream_version(conn, &stream)?;
            Ok(Error::Conflict {
                stream,
                expected,
                actual,
            })
        }
        other => Ok(other),
    }
}

/// The events a projector applies inside the append transaction, in log
/// order.
pub(crate) type Project<'a> = &'a dyn Fn(&mut DbConnection, &[RecordedEvent]) -> Result<()>;

/// Appends `writes` (see [`append_in`](crate::append_in)): after checking
/// them, runs `check` before the first insert, and `project`, if given, on
/// the recorded events in log order after the last. Returns the events in
/// the order of `writes`.
pub(crate) fn insert_writes(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    condition: Option<&AppendCondition>,
    check: impl FnOnce() -> Result<()>,
    project: Option<Project<'_>>,
) -> Result<Vec<RecordedEvent>> {
    traced_append(writes, || {
        insert_traced(conn, writes, condition, check, project).map(Some)
    })
    .map(|events| events.unwrap_or_default())
}

/// Runs an append of `writes` in its `es.append` span; `Ok(None)` is an
/// append that wrote nothing and is left to another way of appending.
pub(crate) fn traced_append(
    writes: &[StreamWrite],
    append: impl FnOnce() -> Result<Option<Vec<RecordedEvent>>>,
) -> Result<Option<Vec<RecordedEvent>>> {
    let span = tracing::debug_span!(
        "es.append",
        stream = Empty,
        streams = writes.len(),
        events = Empty,
        first_position = Empty,
        last_position = Empty,
        outcome = Empty,
        duration_us = Empty,
    );
    let _entered = span.enter();
    if span.is_disabled() {
        return append();
    }
    let started = Instant::now();
    match writes {
        [one] => span.record("stream", one.stream_id.as_str()),
        _ => span.record(
            "stream",
            tracing::field::display(
                writes
                    .iter()
                    .map(|w| w.stream_id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ),
    };
    span.record(
        "events",
        writes.iter().map(|w| w.events.len()).sum::<usize>(),
    );
    let result = append();
    match &result {
        Ok(Some(events)) => {
            let positions = events.iter().map(|e| e.global_position);
            if let (Some(first), Some(last)) = (positions.clone().min(), positions.max()) {
                span.record("first_position", first);
                span.record("last_position", last);
            }
            span.record("outcome", "appended");
        }
        Ok(None) => {
            span.record("outcome", "deferred");
        }
        Err(Error::Conflict { .. } | Error::ConditionFailed { .. }) => {
            span.record("outcome", "conflict");
        }
        Err(_) => {
            span.record("outcome", "error");
        }
    }
    span.record("duration_us", micros(started));
    result
}

/// Microseconds since `started`, for a span's `duration_us`.
pub(crate) fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn insert_traced(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    condition: Option<&AppendCondition>,
    check: impl FnOnce() -> Result<()>,
    project: Option<Project<'_>>,
) -> Result<Vec<RecordedEvent>> {
    for w in writes {
        check_stream_id(&w.stream_id)?;
        for ev in &w.events {
            ev.check()?;
        }
    }
    if let Some(condition) = condition {
        condition.query.validate()?;
    }
    check()?;
    // One canonical order of streams for every writer: no lock cycles.
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by(|&a, &b| writes[a].stream_id.cmp(&writes[b].stream_id));
    let reordered = order.iter().enumerate().any(|(k, &i)| k != i);
    // Per write and event: its tags, computed from the payload where an
    // event of a type that declares tags came without them.
    // Empty (nothing allocated) when no event has tags, the usual append.
    let tagged = writes
        .iter()
        .flat_map(|w| &w.events)
        .any(|e| !e.tags.is_empty() || declares_tags(e.event_type));
    let event_tags: Vec<Vec<Cow<'_, [String]>>> = if tagged {
        writes
            .iter()
            .map(|w| w.events.iter().map(tags_of).collect::<Result<_>>())
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let mut tags: Vec<&str> = event_tags
        .iter()
        .flatten()
        .flat_map(|t| t.iter().map(String::as_str))
        .collect();
    // First the streams' append locks (`Dialect::lock_streams`), in the
    // order of the stream ids. Appends with `Any` read the stream's version
    // and write the next one: they take it before their insert statement
    // takes its snapshot. Where each stream has a lock of its own
    // (PostgreSQL), every insert takes its stream's lock before it writes,
    // so no writer ever waits for another's uncommitted event, only for
    // locks taken in one order; a write of several streams, or one that
    // then takes tag locks, takes all of its streams' locks here, so that
    // it never waits for a stream while holding a later one or a tag.
    // Where one lock covers every stream (MySQL), a write of several
    // streams takes it here, before its first insert.
    let dialect = conn.dialect();
    let tag_locks = condition.is_some() || !tags.is_empty();
    // Where each stream has a lock of its own, `lock_tags` takes them.
    let with_tags = tag_locks && dialect.locks_each_stream();
    let nonempty = writes.iter().filter(|w| !w.events.is_empty());
    let all = nonempty.clone().count() > 1 || with_tags;
    let locked: Vec<&str> = order
        .iter()
        .map(|&i| &writes[i])
        .filter(|w| !w.events.is_empty() && (all || w.expected == ExpectedVersion::Any))
        .map(|w| w.stream_id.as_str())
        .collect();
    if !with_tags {
        dialect.lock_streams(conn, &locked)?;
    }
    // Then the tags: the ones this append writes, and what its condition
    // covers, so that no writer of an event matching the condition's query
    // commits between the check and this append's commit.
    if tag_locks {
        tags.sort_unstable();
        tags.dedup();
        let streams: &[&str] = if with_tags { &locked } else { &[] };
        dialect.lock_tags(conn, streams, &tags, condition.map(|c| &c.query))?;
    }
    if let Some(condition) = condition {
        check_condition(conn, condition)?;
    }
    let total = writes.iter().map(|w| w.events.len()).sum();
    // In log order: the order of `order`.
    let mut out = Vec::with_capacity(total);
    for &i in &order {
        let w = &writes[i];
        if w.events.is_empty() {
            if w.expected != ExpectedVersion::Any {
                let actual = crate::read::stream_version(conn, &w.stream_id)?;
                if !w.expected.is_satisfied_by(actual) {
                    return Err(Error::Conflict {
                        stream: w.stream_id.clone(),
                        expected: w.expected,
                        actual,
                    });
                }
            }
            continue;
        }
        let mut expected = w.expected;
        for chunk in w.events.chunks(CHUNK) {
            let mut tries = 0;
            let rows = loop {
                let rows = dialect.insert_events(conn, &w.stream_id, expected, chunk)?;
                if rows.len() == chunk.len() {
                    break rows;
                }
                let actual = crate::read::stream_version(conn, &w.stream_id)?;
                // The statement's snapshot predates a commit that satisfies
                // the expectation (PostgreSQL): nothing was written, so the
                // statement can run again on a newer snapshot.
                if expected.is_satisfied_by(actual) && tries < RACE_RETRIES {
                    tries += 1;
                    continue;
                }
                return Err(Error::Conflict {
                    stream: w.stream_id.clone(),
                    expected: w.expected,
                    actual,
                });
            };
            let last = rows.iter().map(|r| r.stream_version).max().unwrap_or(0);
            expected = ExpectedVersion::Exact(last);
            out.extend(chunk.iter().zip(rows).map(|(ev, row)| RecordedEvent {
                global_position: row.global_position,
                event_id: ev.event_id,
                stream_id: w.stream_id.clone(),
                stream_version: row.stream_version,
                event_type: ev.event_type.to_owned(),
                event_version: ev.event_version,
                metadata: ev.metadata.clone(),
                created_at: row.created_at.0.and_utc(),
                event: Payload(ev.payload.clone()),
            }));
        }
    }
    insert_tags(conn, writes, &event_tags, &order, &out)?;
    if let Some(project) = project {
        project(conn, &out)?;
    }
    if !reordered {
        return Ok(out);
    }
    // Back to the caller's order of writes.
    let mut per_write: Vec<Vec<RecordedEvent>> = writes
        .iter()
        .map(|w| Vec::with_capacity(w.events.len()))
        .collect();
    let mut events = out.into_iter();
    for &i in &order {
        per_write[i].extend(events.by_ref().take(writes[i].events.len()));
    }
    Ok(per_write.into_iter().flatten().collect())
}

/// Tag rows per INSERT: three values each, far below every bind limit.
const TAG_ROWS: usize = 300;

/// Writes the tags of the appended events (`out`, in the order of `order`)
/// to the tag index.
fn insert_tags(
    conn: &mut DbConnection,
    writes: &[StreamWrite],
    event_tags: &[Vec<Cow<'_, [String]>>],
    order: &[usize],
    out: &[RecordedEvent],
) -> Result<()> {
    if event_tags.is_empty() {
        return Ok(());
    }
    let rows: Vec<(&str, i64, &str)> = order
        .iter()
        .flat_map(|&i| writes[i].events.iter().zip(&event_tags[i]))
        .zip(out)
        .flat_map(|((new, tags), rec)| {
            tags.iter()
                .map(move |t| (t.as_str(), rec.global_position, new.event_type))
        })
        .collect();
    for chunk in rows.chunks(TAG_ROWS) {
        let marks = vec!["(?, ?, ?)"; chunk.len()].join(", ");
        let mut q = Stmt::with_capacity(
            format!("INSERT INTO es_event_tags (tag, global_position, event_type) VALUES {marks}"),
            chunk.len() * 3,
        );
        if !crate::backend::cached_shape(chunk.len()) {
            q.dont_cache();
        }
        for &(tag, position, event_type) in chunk {
            q.push(Bind::Text(tag));
            q.push(Bind::BigInt(position));
            q.push(Bind::Text(event_type));
        }
        q.execute(conn)?;
    }
    Ok(())
}

/// The event types of this program that declare tags (not `copy` ones),
/// with the function computing them from a stored payload.
fn declared_tags() -> &'static HashMap<&'static str, es_core::TagsOf> {
    static DECLARED: OnceLock<HashMap<&'static str, es_core::TagsOf>> = OnceLock::new();
    DECLARED.get_or_init(|| {
        es_core::registered_event_types()
            .into_iter()
            .filter(|r| !r.copy)
            .filter_map(|r| Some((r.name, r.tags?)))
            .collect()
    })
}

/// Whether events of `event_type` carry tags even when appended without
/// them (see [`tags_of`]).
pub(crate) fn declares_tags(event_type: &str) -> bool {
    declared_tags().contains_key(event_type)
}

/// The tags an appended event is stored with: its own, or, when it has
/// none and its type declares tags (it was written through an
/// `#[event(copy)]` type, or built by hand), the declared ones computed
/// from its payload, so that no decision misses it.
pub(crate) fn tags_of(event: &NewEvent) -> Result<Cow<'_, [String]>> {
    if !event.tags.is_empty() {
        return Ok(Cow::Borrowed(&event.tags));
    }
    let Some(compute) = declared_tags().get(event.event_type) else {
        return Ok(Cow::Borrowed(&[]));
    };
    let refuse = |source| {
        Error::from(es_core::EncodeError::Tag {
            event_type: event.event_type,
            source,
        })
    };
    let mut tags = compute(event.event_version, &event.payload).map_err(|e| {
        refuse(es_core::TagError::Undecodable {
            reason: e.to_string(),
        })
    })?;
    tags.sort_unstable();
    tags.dedup();
    if tags.len() > es_core::MAX_TAGS {
        return Err(refuse(es_core::TagError::TooMany { count: tags.len() }));
    }
    for t in &tags {
        es_core::validate_tag(t).map_err(refuse)?;
    }
    Ok(Cow::Owned(tags))
}
