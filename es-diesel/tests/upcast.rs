//! Event versioning: a log written by version 1 of the events is read by
//! code whose structs moved to version 2 (and 3), through upcasters, on every
//! read path.

use es_diesel::serde_json::{json, Value};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    upcaster, Aggregate, DecodeError, Error, Event, EventStore, ExpectedVersion, NewEvent,
    Snapshots, StreamWrite,
};
use serde::{Deserialize, Serialize};

/// The events as the old code wrote them.
mod v1 {
    use super::*;

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false, copy)]
    pub struct BookRegistered {
        pub book_id: String,
        pub title: String,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false, copy)]
    pub struct BookBorrowed {
        pub book_id: String,
        pub user_id: String,
    }

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(view = false, copy)]
    pub struct BookReturned {
        pub book_id: String,
        pub user_id: String,
    }
}

/// The same events after the structs changed.
mod current {
    use super::*;

    /// v2 renamed `title` to `name`; v3 added `isbn`.
    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(version = 3, view = false)]
    pub struct BookRegistered {
        pub book_id: String,
        pub name: String,
        pub isbn: Option<String>,
    }

    /// v2 added the loan period.
    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(version = 2, view = false)]
    pub struct BookBorrowed {
        pub book_id: String,
        pub user_id: String,
        pub due_days: u32,
    }

    #[derive(Event, Debug, Clone, PartialEq)]
    pub enum BookEvent {
        BookRegistered(BookRegistered),
        BookBorrowed(BookBorrowed),
    }

    /// v2 added the book's condition, but nobody wrote its upcaster.
    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(version = 2, view = false)]
    pub struct BookReturned {
        pub book_id: String,
        pub user_id: String,
        pub condition: String,
    }
}

#[upcaster(current::BookBorrowed, from = 1)]
fn borrowed_v1_to_v2(mut payload: Value) -> Result<Value, String> {
    let object = payload
        .as_object_mut()
        .ok_or("BookBorrowed v1 is a JSON object")?;
    object.insert("due_days".into(), json!(14));
    Ok(payload)
}

#[upcaster(current::BookRegistered, from = 1)]
fn registered_v1_to_v2(mut payload: Value) -> Result<Value, String> {
    let object = payload
        .as_object_mut()
        .ok_or("BookRegistered v1 is a JSON object")?;
    let title = object
        .remove("title")
        .ok_or("BookRegistered v1 has no `title`")?;
    object.insert("name".into(), title);
    Ok(payload)
}

#[upcaster(current::BookRegistered, from = 2)]
fn registered_v2_to_v3(mut payload: Value) -> Result<Value, std::io::Error> {
    payload["isbn"] = Value::Null;
    Ok(payload)
}

/// Counts loans; its snapshots hold state folded from upcast events.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Shelf {
    name: String,
    loan_days: u32,
}

impl Aggregate for Shelf {
    const TYPE: &'static str = "book";
    type Event = current::BookEvent;
    type Command = String;
    type Error = std::convert::Infallible;
    const SNAPSHOTS: Option<Snapshots<Self>> = Some(Snapshots::every(2));

    fn apply(&mut self, event: &current::BookEvent) {
        match event {
            current::BookEvent::BookRegistered(e) => self.name = e.name.clone(),
            current::BookEvent::BookBorrowed(e) => self.loan_days += e.due_days,
        }
    }

    fn handle(&self, user_id: String) -> Result<Vec<current::BookEvent>, Self::Error> {
        Ok(vec![current::BookBorrowed {
            book_id: "b1".into(),
            user_id,
            due_days: 7,
        }
        .into()])
    }
}

/// The old code's log: registered, borrowed twice.
fn write_v1_log(store: &EventStore) {
    store
        .append(
            "book-b1",
            ExpectedVersion::NoStream,
            [v1::BookRegistered {
                book_id: "b1".into(),
                title: "Dune".into(),
            }],
        )
        .unwrap();
    store
        .append(
            "book-b1",
            ExpectedVersion::Exact(1),
            [
                v1::BookBorrowed {
                    book_id: "b1".into(),
                    user_id: "ann".into(),
                },
                v1::BookBorrowed {
                    book_id: "b1".into(),
                    user_id: "bob".into(),
                },
            ],
        )
        .unwrap();
}

fn expected_current() -> Vec<current::BookEvent> {
    vec![
        current::BookRegistered {
            book_id: "b1".into(),
            name: "Dune".into(),
            isbn: None,
        }
        .into(),
        current::BookBorrowed {
            book_id: "b1".into(),
            user_id: "ann".into(),
            due_days: 14,
        }
        .into(),
        current::BookBorrowed {
            book_id: "b1".into(),
            user_id: "bob".into(),
            due_days: 14,
        }
        .into(),
    ]
}

#[test]
fn a_v1_log_is_read_as_the_current_structs_on_every_read_path() {
    for db in TestDatabase::all() {
        let store = db.store();
        write_v1_log(&store);
        let expected = expected_current();

        let stream: Vec<_> = store.load_stream::<current::BookEvent>("book-b1").unwrap();
        assert_eq!(
            stream.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
            expected
        );
        // The envelope keeps the stored version.
        assert_eq!(stream[1].event_version, 1);

        let by_type = store.read_events::<current::BookBorrowed>(0, 100).unwrap();
        assert_eq!(
            by_type.iter().map(|r| r.due_days).collect::<Vec<_>>(),
            vec![14, 14]
        );

        let from_log: Vec<current::BookEvent> = store
            .iter_all(0, 2)
            .map(|r| r.unwrap().decode::<current::BookEvent>().unwrap().event)
            .collect();
        assert_eq!(from_log, expected);

        // The new code appends version 2 next to the upcast version 1 events.
        let done = store.execute::<Shelf>("b1", "cat".into()).unwrap();
        assert_eq!(done.version, 4);
        assert_eq!(
            done.state,
            Shelf {
                name: "Dune".into(),
                loan_days: 14 + 14 + 7
            }
        );
        let stored = store.read_stream("book-b1", 4, 1).unwrap();
        assert_eq!(stored[0].event_version, 2);
        assert_eq!(
            es_diesel::serde_json::from_str::<Value>(stored[0].payload()).unwrap(),
            json!({"book_id": "b1", "user_id": "cat", "due_days": 7})
        );

        // The snapshot saved at version 4 holds the upcast state; its tail too.
        store.execute::<Shelf>("b1", "dan".into()).unwrap();
        let loaded = store.load_aggregate::<Shelf>("b1").unwrap();
        assert_eq!((loaded.version, loaded.snapshot_version), (5, Some(4)));
        assert_eq!(loaded.state.loan_days, 14 + 14 + 7 + 7);
        let events = store.load_stream::<current::BookEvent>("book-b1").unwrap();
        assert_eq!(
            es_diesel::fold::<Shelf>(events.iter().map(|r| &r.event)),
            loaded.state
        );
    }
}

#[test]
fn a_stored_version_without_upcaster_names_type_version_and_position() {
    for db in TestDatabase::all() {
        let store = db.store();
        write_v1_log(&store);
        let returned = store
            .append(
                "book-b1",
                ExpectedVersion::Exact(3),
                [v1::BookReturned {
                    book_id: "b1".into(),
                    user_id: "bob".into(),
                }],
            )
            .unwrap();
        let position = returned[0].global_position;
        let err = store
            .read_events::<current::BookReturned>(0, 10)
            .unwrap_err();
        match &err {
            Error::Decode {
                position: at,
                event_type,
                event_version,
                source:
                    DecodeError::NoUpcaster {
                        stored,
                        current,
                        missing,
                        ..
                    },
                ..
            } => {
                assert_eq!(
                    (*at, event_type.as_str(), *event_version),
                    (position, "BookReturned", 1)
                );
                assert_eq!((*stored, *current, *missing), (1, 2, 1));
            }
            other => panic!(
                "{}: expected a missing upcaster, got {other:?}",
                db.backend()
            ),
        }
        let text = err.to_string();
        for part in [
            format!("global position {position}"),
            "`BookReturned` version 1".to_owned(),
            "#[upcaster(BookReturned, from = 1)]".to_owned(),
        ] {
            assert!(text.contains(&part), "{text:?} lacks {part:?}");
        }
    }
}

#[test]
fn a_failing_upcaster_names_the_event_and_its_position() {
    for db in TestDatabase::all() {
        let store = db.store();
        let mut write = StreamWrite::new("book-b2", ExpectedVersion::NoStream);
        write.push_new(NewEvent {
            event_type: "BookRegistered",
            event_version: 1,
            payload: r#"{"book_id":"b2"}"#.into(),
            ..NewEvent::new(&v1::BookRegistered {
                book_id: "b2".into(),
                title: String::new(),
            })
            .unwrap()
        });
        let recorded = store.append_streams(&[write]).unwrap();
        let err = store
            .load_stream::<current::BookEvent>("book-b2")
            .unwrap_err();
        match &err {
            Error::Decode {
                position,
                source:
                    DecodeError::Upcaster {
                        event_type,
                        from,
                        source,
                    },
                ..
            } => {
                assert_eq!(*position, recorded[0].global_position);
                assert_eq!((event_type.as_str(), *from), ("BookRegistered", 1));
                assert_eq!(source.to_string(), "BookRegistered v1 has no `title`");
            }
            other => panic!(
                "{}: expected an upcaster error, got {other:?}",
                db.backend()
            ),
        }
    }
}

#[test]
fn upcasters_are_registered_once_each() {
    es_diesel::upcast::check_upcasters().unwrap();
    let steps: Vec<_> = es_diesel::upcast::upcasters()
        .iter()
        .map(|u| (u.event_type, u.from_version, u.name))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("BookBorrowed", 1, "upcast::borrowed_v1_to_v2"),
            ("BookRegistered", 1, "upcast::registered_v1_to_v2"),
            ("BookRegistered", 2, "upcast::registered_v2_to_v3"),
        ]
    );
}

/// The loan period of each book's last loan, kept inline.
#[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "loan_periods", primary_key = book_id)]
struct LoanPeriod {
    book_id: String,
    user_id: String,
    due_days: i64,
}

/// The same, kept by a runner.
#[derive(es_diesel::ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "loan_periods_async", primary_key = book_id, mode = async)]
struct LoanPeriodAsync {
    book_id: String,
    user_id: String,
    due_days: i64,
}

#[es_diesel::projector(on = current::BookBorrowed, key = book_id)]
fn loan_period(e: &es_diesel::Recorded<current::BookBorrowed>, row: &mut Option<LoanPeriod>) {
    *row = Some(LoanPeriod {
        book_id: e.book_id.clone(),
        user_id: e.user_id.clone(),
        due_days: e.due_days.into(),
    });
}

#[es_diesel::projector(on = current::BookBorrowed, key = book_id)]
fn loan_period_async(
    e: &es_diesel::Recorded<current::BookBorrowed>,
    row: &mut Option<LoanPeriodAsync>,
) {
    *row = Some(LoanPeriodAsync {
        book_id: e.book_id.clone(),
        user_id: e.user_id.clone(),
        due_days: e.due_days.into(),
    });
}

/// Projections see v1 events upcast too: inline, in a rebuild, and in a runner.
#[test]
fn projections_and_rebuilds_read_upcast_events() {
    use diesel::prelude::*;
    for db in TestDatabase::all() {
        let store = db.store();
        write_v1_log(&store);
        let inline = || -> Vec<(String, String, i64)> {
            loan_periods::table
                .order(loan_periods::book_id)
                .select((
                    loan_periods::book_id,
                    loan_periods::user_id,
                    loan_periods::due_days,
                ))
                .load(&mut *store.connection().unwrap())
                .unwrap()
        };
        let expected = vec![("b1".to_owned(), "bob".to_owned(), 14)];
        assert_eq!(inline(), expected, "{}: inline projector", db.backend());
        store.rebuild("loan_periods").unwrap();
        assert_eq!(inline(), expected, "rebuild");

        let mut runner = es_diesel::runner::Runner::new(
            store.clone(),
            es_diesel::runner::async_read_models().unwrap().remove(0),
            es_diesel::runner::RunnerOptions::default(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let asynchronous = || -> Vec<(String, String, i64)> {
            loan_periods_async::table
                .order(loan_periods_async::book_id)
                .select((
                    loan_periods_async::book_id,
                    loan_periods_async::user_id,
                    loan_periods_async::due_days,
                ))
                .load(&mut *store.connection().unwrap())
                .unwrap()
        };
        while asynchronous() != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "the runner applies upcast events"
            );
            runner.step().unwrap();
        }
        store.rebuild("loan_periods_async").unwrap();
        assert_eq!(asynchronous(), expected, "blue/green rebuild");
    }
}
