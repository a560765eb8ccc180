//! Decisions across streams (dynamic consistency boundaries): states folded
//! from the events that a [`Query`] of types and tags matches, wherever
//! they are stored, and checked together before new events are appended.
//!
//! An [`Aggregate`](crate::Aggregate) is the state of one stream. A rule
//! such as "a course takes at most 30 students, and a student joins at most
//! 5 courses" depends on the events of many streams: a [`DecisionState`]
//! per fact (the course's seats, the student's courses), each naming the
//! events it is built from. The store reads them all in one query, folds
//! each event into the states whose queries it matches, lets the command
//! decide, and appends on the condition that no event matching any of those
//! queries was appended meanwhile (`EventStore::decide` in es-diesel).
//!
//! ```
//! use es_core::decision::DecisionState;
//! use es_core::{tag, Query};
//! # use es_core::Event;
//! # #[derive(Debug)] enum CourseEvent { Defined(u32), Enrolled }
//! # impl Event for CourseEvent {
//! #     const EVENT_TYPES: &'static [&'static str] = &["CourseDefined", "StudentEnrolled"];
//! #     fn event_type(&self) -> &'static str { "CourseDefined" }
//! #     fn event_version(&self) -> u16 { 1 }
//! #     fn encode(&self) -> Result<String, es_core::EncodeError> { Ok("{}".into()) }
//! #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, es_core::DecodeError> { Ok(CourseEvent::Enrolled) }
//! # }
//!
//! /// How many seats course `course_id` has, and how many are taken.
//! #[derive(Clone)]
//! struct Seats { course_id: String, capacity: u32, taken: u32 }
//!
//! impl DecisionState for Seats {
//!     type Event = CourseEvent;
//!
//!     fn query(&self) -> Query {
//!         Query::of::<CourseEvent>().tagged(tag("course", &self.course_id))
//!     }
//!
//!     fn apply(&mut self, event: &CourseEvent) {
//!         match event {
//!             CourseEvent::Defined(capacity) => self.capacity = *capacity,
//!             CourseEvent::Enrolled => self.taken += 1,
//!         }
//!     }
//! }
//! ```

use crate::{DecodeError, Event, Query};

/// A state folded from the events a query matches, across streams: one
/// fact a decision depends on. Build it keyed (e.g. with the course's id,
/// which its [`query`](DecisionState::query) uses as a tag) and empty; the
/// store folds the matching events into it, oldest first.
pub trait DecisionState: Send + 'static {
    /// The events it folds: an event enum (or struct). Events the query
    /// matches but this type does not decode are skipped.
    type Event: Event;

    /// The events this state is built from; usually
    /// `Query::of::<Self::Event>().tagged(..)`. An append decided from this
    /// state is refused if an event matching it was appended meanwhile, so
    /// the narrower the query, the fewer commands conflict.
    fn query(&self) -> Query;

    /// Folds one event into the state. It already happened: do not fail.
    fn apply(&mut self, event: &Self::Event);
}

/// One [`DecisionState`], or a tuple of up to six: what a decision reads,
/// folded from one query (the items of their queries, in order).
pub trait DecisionStates: Send + 'static {
    /// Each state's query, in order.
    fn queries(&self) -> Vec<Query>;

    /// Folds a stored event into the state at `index` (in the order of
    /// [`DecisionStates::queries`]), if that state's event type decodes it.
    fn apply_stored(
        &mut self,
        index: usize,
        event_type: &str,
        event_version: u16,
        payload: &str,
    ) -> Result<(), DecodeError>;
}

fn apply_one<S: DecisionState>(
    state: &mut S,
    event_type: &str,
    event_version: u16,
    payload: &str,
) -> Result<(), DecodeError> {
    if S::Event::handles(event_type) {
        let event = S::Event::decode(event_type, event_version, payload)?;
        state.apply(&event);
    }
    Ok(())
}

impl<S: DecisionState> DecisionStates for S {
    fn queries(&self) -> Vec<Query> {
        vec![self.query()]
    }

    fn apply_stored(
        &mut self,
        _index: usize,
        event_type: &str,
        event_version: u16,
        payload: &str,
    ) -> Result<(), DecodeError> {
        apply_one(self, event_type, event_version, payload)
    }
}

macro_rules! tuple_states {
    ($($name:ident $index:tt),+) => {
        impl<$($name: DecisionState),+> DecisionStates for ($($name,)+) {
            fn queries(&self) -> Vec<Query> {
                vec![$(self.$index.query()),+]
            }

            fn apply_stored(
                &mut self,
                index: usize,
                event_type: &str,
                event_version: u16,
                payload: &str,
            ) -> Result<(), DecodeError> {
                match index {
                    $($index => apply_one(&mut self.$index, event_type, event_version, payload),)+
                    _ => Ok(()),
                }
            }
        }
    };
}

tuple_states!(A 0);
tuple_states!(A 0, B 1);
tuple_states!(A 0, B 1, C 2);
tuple_states!(A 0, B 1, C 2, D 3);
tuple_states!(A 0, B 1, C 2, D 3, E 4);
tuple_states!(A 0, B 1, C 2, D 3, E 4, F 5);

/// The one query of several states, and for each item of it the state it
/// came from.
pub fn combined_query(queries: Vec<Query>) -> (Query, Vec<usize>) {
    let mut owner = Vec::new();
    let mut all = Query::default();
    for (state, query) in queries.into_iter().enumerate() {
        owner.extend(std::iter::repeat_n(state, query.items().len()));
        all = all.or(query);
    }
    (all, owner)
}
