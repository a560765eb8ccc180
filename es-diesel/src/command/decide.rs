//! Decisions across streams: read the events a query of types and tags
//! matches, fold them into [`DecisionStates`], decide, and append on the
//! condition that nothing matching the query was appended meanwhile,
//! retrying on conflict (see [`es_core::decision`]).

use crate::append::{micros, StreamWrite};
use crate::backend::write_transaction;
use crate::command::execute::{ExecuteError, ExecuteOptions};
use crate::error::{check_stream_id, Error, Result};
use crate::projection::append_events_if;
use crate::query::{AppendCondition, QueryRead};
use crate::store::EventStore;
use es_core::decision::{combined_query, DecisionStates};
use es_core::{Event, ExpectedVersion, NewEvent, Query, Recorded, RecordedEvent};
use std::time::Instant;
use tracing::field::Empty;

/// What [`EventStore::decide`] did.
#[derive(Debug, Clone)]
pub struct Decided<S, E> {
    /// The states the decision was taken on (before its events).
    pub states: S,
    /// The appended events; empty when the decision produced none, in
    /// which case nothing was written.
    pub events: Vec<Recorded<E>>,
    /// Read-and-decide rounds: 1, plus one per lost race.
    pub attempts: u32,
}

/// Folds each event of `read` into the states whose items it matched
/// (`owners`: the state of each item), once per state.
fn fold_read<S: DecisionStates>(states: &mut S, read: &QueryRead, owners: &[usize]) -> Result<()> {
    for queried in &read.events {
        let ev = &queried.event;
        let mut last = None;
        for &item in &queried.items {
            let state = owners[item];
            // Items come in order, so a state's items are adjacent.
            if last == Some(state) {
                continue;
            }
            last = Some(state);
            states
                .apply_stored(state, &ev.event_type, ev.event_version, &ev.event.0)
                .map_err(|e| Error::decode(ev, e))?;
        }
    }
    Ok(())
}

impl EventStore {
    /// `states` (keyed and empty) folded from the events their queries
    /// match now: what [`decide`](Self::decide) would decide on, for pages
    /// and checks that decide nothing.
    pub fn load_states<S: DecisionStates>(&self, mut states: S) -> Result<S> {
        let (query, owners) = combined_query(states.queries());
        let read = crate::query::read_query(&mut *self.connection()?, &query)?;
        fold_read(&mut states, &read, &owners)?;
        Ok(states)
    }

    /// The events matching `query` (types and tags, across streams), in
    /// log order, each with the query items it matched. Pass
    /// [`QueryRead::condition`] to [`append_if`](Self::append_if) to append
    /// only if nothing matching was appended since.
    pub fn read_query(&self, query: &Query) -> Result<QueryRead> {
        crate::query::read_query(&mut *self.connection()?, query)
    }

    /// Appends `writes` atomically (as [`append_streams`](Self::append_streams))
    /// if the events matching `condition`'s query are still the ones it
    /// saw; otherwise nothing is written and the error is
    /// [`Error::ConditionFailed`] (an [`Error::is_conflict`]).
    ///
    /// Race-free on every backend: SQLite and MySQL have one appender at a
    /// time (the check runs under that lock); on PostgreSQL the append takes
    /// an exclusive lock per tag of the query, which every writer of an
    /// event with that tag shares (and for items without tags, the lock
    /// every append shares), before it checks.
    pub fn append_if(
        &self,
        writes: &[StreamWrite],
        condition: &AppendCondition,
    ) -> Result<Vec<RecordedEvent>> {
        let mut conn = self.connection()?;
        let project = self.projects(writes)?;
        // A deadlock or serialization failure wrote nothing: the condition
        // is checked again. A failed condition is returned.
        let appended = crate::append::retrying(&mut conn, writes, |conn| {
            write_transaction(conn, |c| {
                append_events_if(c, writes, Some(condition), project)
            })
        })?;
        self.forget_cached_states(writes);
        Ok(appended)
    }

    /// Reads what `states` are built from, folds it, lets `decide` choose
    /// the events, and appends them to `stream` if no event matching the
    /// states' queries was appended meanwhile; on such a conflict it reads
    /// and decides again (at most 16 times). `states` are given keyed and
    /// empty (a [`DecisionState`](es_core::DecisionState) or a tuple of
    /// them), and cloned for each attempt.
    ///
    /// The events still belong to `stream` (appended at its end, whatever
    /// its version), so aggregates, projectors and runners see them as any
    /// other.
    pub fn decide<S, E, Err>(
        &self,
        stream: &str,
        states: S,
        decide: impl Fn(&S) -> std::result::Result<Vec<E>, Err>,
    ) -> Result<Decided<S, E>, ExecuteError<Err>>
    where
        S: DecisionStates + Clone,
        E: Event,
    {
        self.decide_with(stream, states, decide, &ExecuteOptions::default())
    }

    /// [`decide`](Self::decide) with options: retries, metadata.
    pub fn decide_with<S, E, Err>(
        &self,
        stream: &str,
        states: S,
        decide: impl Fn(&S) -> std::result::Result<Vec<E>, Err>,
        options: &ExecuteOptions,
    ) -> Result<Decided<S, E>, ExecuteError<Err>>
    where
        S: DecisionStates + Clone,
        E: Event,
    {
        let span = tracing::debug_span!(
            "es.decide",
            stream,
            attempts = Empty,
            outcome = Empty,
            events = Empty,
            duration_us = Empty,
        );
        let _entered = span.enter();
        let started = Instant::now();
        let result = self.decide_traced(stream, states, decide, options);
        if !span.is_disabled() {
            let outcome = match &result {
                Ok(decided) => {
                    span.record("attempts", decided.attempts);
                    span.record("events", decided.events.len());
                    if decided.events.is_empty() {
                        "unchanged"
                    } else {
                        "appended"
                    }
                }
                Err(ExecuteError::Domain(_)) => "refused",
                Err(ExecuteError::Store(e)) if e.is_conflict() => "conflict",
                Err(ExecuteError::Store(_)) => "error",
            };
            span.record("outcome", outcome);
            span.record("duration_us", micros(started));
        }
        result
    }

    fn decide_traced<S, E, Err>(
        &self,
        stream: &str,
        states: S,
        decide: impl Fn(&S) -> std::result::Result<Vec<E>, Err>,
        options: &ExecuteOptions,
    ) -> Result<Decided<S, E>, ExecuteError<Err>>
    where
        S: DecisionStates + Clone,
        E: Event,
    {
        check_stream_id(stream)?;
        let (query, owners) = combined_query(states.queries());
        query.validate().map_err(Error::from)?;
        let mut conn = self.connection()?;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let read = crate::query::read_query(&mut conn, &query)?;
            let mut folded = states.clone();
            fold_read(&mut folded, &read, &owners)?;
            let events = decide(&folded).map_err(ExecuteError::Domain)?;
            if events.is_empty() {
                return Ok(Decided {
                    states: folded,
                    events: Vec::new(),
                    attempts,
                });
            }
            let mut write = StreamWrite::new(stream, ExpectedVersion::Any);
            for event in &events {
                write.push_new(
                    NewEvent::new(event)
                        .map_err(Error::from)?
                        .with_metadata(options.metadata.clone()),
                );
            }
            let writes = std::slice::from_ref(&write);
            let project = self.projects(writes)?;
            let condition = read.condition();
            let appended = write_transaction(&mut conn, |c| {
                append_events_if(c, writes, Some(&condition), project)
            });
            match appended {
                Ok(recorded) => {
                    self.forget_cached_states(writes);
                    return Ok(Decided {
                        states: folded,
                        events: recorded
                            .into_iter()
                            .zip(events)
                            .map(|(r, e)| r.map(|_| e))
                            .collect(),
                        attempts,
                    });
                }
                Err(e)
                    if attempts <= options.max_retries
                        && (e.is_retryable() || crate::append::retry_after(&e, writes)) =>
                {
                    tracing::debug!(%stream, attempts, error = %e, "a decision lost a race; reading again");
                }
                Err(e) => return Err(ExecuteError::Store(e)),
            }
        }
    }
}
