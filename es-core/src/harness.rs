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
