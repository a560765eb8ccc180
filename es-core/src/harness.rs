//! Given/when/then tests of an aggregate's decisions, without a database.
//!
//! ```text
//! given::<Book>([BookRegistered { book_id: 1, title: "Dune".into() }.into()])
//!     .when(BookCommand::Borrow { user_id: 7, user_registered: true })
//!     .then([BookBorrowed { book_id: 1, user_id: 7 }.into()]);
//! ```
//!
//! A runnable example is on `es_diesel::EventStore::execute`.
//!
//! The assertions panic with the history, the command and both sides of the
//! comparison, so a failing test says what was decided.

use crate::Aggregate;
use std::fmt::Debug;

/// Starts a scenario: the aggregate's stream already holds `events`.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    Given {
        history: events.into_iter().collect(),
    }
}

/// A history of events; see [`given`].
pub struct Given<A: Aggregate> {
    history: Vec<A::Event>,
}

impl<A: Aggregate> Given<A> {
    /// The state folded from the history.
    pub fn state(&self) -> A {
        crate::aggregate::fold::<A>(&self.history)
    }

    /// Issues `command` against the state folded from the history.
    pub fn when(self, command: A::Command) -> When<A>
    where
        A::Command: Debug,
    {
        let state = self.state();
        let command_text = format!("{command:?}");
        let result = state.handle(command);
        When {
            history: self.history,
            command: command_text,
            state,
            result,
        }
    }
}

/// The outcome of a command; see [`given`].
pub struct When<A: Aggregate> {
    history: Vec<A::Event>,
    command: String,
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> When<A>
where
    A::Event: Debug,
{
    /// Asserts that the command produced exactly `expected`, in order, and
    /// returns the state after applying them.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A
    where
        A::Event: PartialEq,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) if events == expected => {
                let mut state = self.state;
                for e in &events {
                    state.apply(e);
                }
                state
            }
            Ok(events) => panic!(
                "given {:?}\nwhen {}\nexpected events {:?}\nbut got        {:?}",
                self.history, self.command, expected, events
            ),
            Err(err) => panic!(
                "given {:?}\nwhen {}\nexpected events {:?}\nbut the command was refused: {err} ({err:?})",
                self.history, self.command, expected
            ),
        }
    }

    /// Asserts that the command was refused with `expected`.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Err(err) if err == expected => {}
            Err(err) => panic!(
                "given {:?}\nwhen {}\nexpected error {expected:?}\nbut got error  {err:?}",
                self.history, self.command
            ),
            Ok(events) => panic!(
                "given {:?}\nwhen {}\nexpected error {expected:?} ({expected})\nbut the command produced {events:?}",
                self.history, self.command
            ),
        }
    }

    /// Asserts that the command was refused with an error for which `check`
    /// holds (for error types without `PartialEq`).
    #[track_caller]
    pub fn then_error_matches(self, check: impl FnOnce(&A::Error) -> bool) {
        match self.result {
            Err(err) if check(&err) => {}
            Err(err) => panic!(
                "given {:?}\nwhen {}\nthe command was refused with an unexpected error: {err} ({err:?})",
                self.history, self.command
            ),
            Ok(events) => panic!(
                "given {:?}\nwhen {}\nexpected the command to be refused, but it produced {events:?}",
                self.history, self.command
            ),
        }
    }

    /// The raw decision, for assertions the helpers above do not cover.
    pub fn result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

/// Starts a scenario of a decision across streams (see
/// [`crate::decision`]): `states`, keyed and empty, then the events already
/// stored, added with [`GivenStates::event`] in log order. Each event is
/// folded into the states whose queries match its type and tags, as the
/// store does.
///
/// ```text
/// given_states((Seats::new("c1"), Load::new("s7")))
///     .event(CourseDefined { course_id: "c1".into(), capacity: 1 })
///     .event(StudentEnrolled { course_id: "c1".into(), student_id: "s1".into() })
///     .when(|states| enroll(states, "c1", "s7"))
///     .then_error(EnrollError::CourseFull);
/// ```
pub fn given_states<S: crate::decision::DecisionStates>(states: S) -> GivenStates<S> {
    GivenStates {
        states,
        history: Vec::new(),
        failed: None,
    }
}

/// Stored events before a decision; see [`given_states`].
pub struct GivenStates<S> {
    states: S,
    history: Vec<String>,
    /// The first event that could not be folded.
    failed: Option<String>,
}

impl<S: crate::decision::DecisionStates> GivenStates<S> {
    /// Stores `event` (with the tags it declares) and folds it into the
    /// states whose queries match it.
    pub fn event<E: crate::Event + Debug>(mut self, event: E) -> Self {
        let tags = event.tags();
        let event_type = event.event_type();
        self.history.push(format!("{event:?} {tags:?}"));
        let payload = match event.encode() {
            Ok(p) => p,
            Err(e) => {
                self.failed
                    .get_or_insert(format!("{event:?} cannot be encoded: {e}"));
                return self;
            }
        };
        for (index, query) in self.states.queries().iter().enumerate() {
            if query.matches(event_type, &tags) {
                if let Err(e) =
                    self.states
                        .apply_stored(index, event_type, event.event_version(), &payload)
                {
                    self.failed.get_or_insert(format!(
                        "{event:?} cannot be folded into state {index}: {e}"
                    ));
                }
            }
        }
        self
    }

    /// The states folded from the history.
    #[track_caller]
    pub fn states(self) -> S {
        if let Some(failed) = &self.failed {
            panic!("given {:?}: {failed}", self.history);
        }
        self.states
    }

    /// Decides with the folded states.
    #[track_caller]
    pub fn when<E, Err>(
        self,
        decide: impl FnOnce(&S) -> Result<Vec<E>, Err>,
    ) -> DecisionWhen<S, E, Err> {
        let history = self.history.clone();
        let states = self.states();
        let result = decide(&states);
        DecisionWhen {
            history,
            states,
            result,
        }
    }
}

/// The outcome of a decision; see [`given_states`].
pub struct DecisionWhen<S, E, Err> {
    history: Vec<String>,
    states: S,
    result: Result<Vec<E>, Err>,
}

impl<S, E: Debug + PartialEq, Err: Debug + std::fmt::Display> DecisionWhen<S, E, Err> {
    /// Asserts that the decision produced exactly `expected`, in order, and
    /// returns the states it decided on.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = E>) -> S {
        let expected: Vec<E> = expected.into_iter().collect();
        match self.result {
            Ok(events) if events == expected => self.states,
            Ok(events) => panic!(
                "given {:?}\nexpected events {expected:?}\nbut got        {events:?}",
                self.history
            ),
            Err(err) => panic!(
                "given {:?}\nexpected events {expected:?}\nbut the decision refused: {err} ({err:?})",
                self.history
            ),
        }
    }

    /// Asserts that the decision refused with `expected`.
    #[track_caller]
    pub fn then_error(self, expected: Err)
    where
        Err: PartialEq,
    {
        match self.result {
            Err(err) if err == expected => {}
            Err(err) => panic!(
                "given {:?}\nexpected error {expected:?}\nbut got error  {err:?}",
                self.history
            ),
            Ok(events) => panic!(
                "given {:?}\nexpected error {expected:?} ({expected})\nbut the decision produced {events:?}",
                self.history
            ),
        }
    }

    /// The raw decision.
    pub fn result(self) -> Result<Vec<E>, Err> {
        self.result
    }
}
