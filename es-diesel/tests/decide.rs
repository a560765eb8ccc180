//! Decisions across streams (dynamic consistency boundaries): tags, queries,
//! conditional appends, and the course-enrollment rules under concurrency,
//! on every backend.

#[path = "../../examples/enrollment/src/domain.rs"]
mod domain;

use diesel::connection::SimpleConnection;
use domain::commands::*;
use domain::*;
use es_diesel::harness::given_states;
use es_diesel::testing::TestDatabase;
use es_diesel::{
    tag, AppendCondition, Backend, EncodeError, Error, Event, ExecuteError, ExpectedVersion,
    NewEvent, Query, StreamWrite, TagError,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn enrolled(course: &str, student: &str) -> StudentEnrolled {
    StudentEnrolled {
        course_id: course.into(),
        student_id: student.into(),
    }
}

fn defined(course: &str, capacity: u32) -> CourseDefined {
    CourseDefined {
        course_id: course.into(),
        title: "Rust".into(),
        capacity,
    }
}

fn registered(student: &str) -> StudentRegistered {
    StudentRegistered {
        student_id: student.into(),
        name: student.to_uppercase(),
    }
}

fn both(course: &str, student: &str) -> (Course, Student) {
    (Course::new(course), Student::new(student))
}

// ---- decisions without a database ----

#[test]
fn derive_writes_the_declared_tags() {
    assert_eq!(enrolled("c1", "s1").tags(), ["course:c1", "student:s1"]);
    assert_eq!(defined("c1", 3).tags(), ["course:c1"]);
    let e: CourseEvent = enrolled("c2", "s2").into();
    assert_eq!(e.tags(), ["course:c2", "student:s2"]);
    let new = NewEvent::new(&enrolled("c1", "s1")).unwrap();
    assert_eq!(new.tags, ["course:c1", "student:s1"]);
}

#[test]
fn a_free_seat_is_taken() {
    given_states(both("c1", "s1"))
        .event(defined("c1", 2))
        .event(registered("s1"))
        .event(enrolled("c1", "s9"))
        .when(enroll)
        .then([enrolled("c1", "s1")]);
}

#[test]
fn a_full_course_refuses() {
    given_states(both("c1", "s1"))
        .event(defined("c1", 1))
        .event(registered("s1"))
        .event(enrolled("c1", "s9"))
        .when(enroll)
        .then_error(EnrollError::CourseFull {
            course: "c1".into(),
            capacity: 1,
        });
}

#[test]
fn a_seat_freed_by_leaving_is_free_again() {
    given_states(both("c1", "s1"))
        .event(defined("c1", 1))
        .event(registered("s1"))
        .event(enrolled("c1", "s9"))
        .event(StudentLeft {
            course_id: "c1".into(),
            student_id: "s9".into(),
        })
        .when(enroll)
        .then([enrolled("c1", "s1")]);
}

#[test]
fn the_student_limit_counts_every_course() {
    let mut given = given_states(both("c9", "s1"))
        .event(defined("c9", 10))
        .event(registered("s1"));
    for c in 0..MAX_COURSES {
        given = given.event(enrolled(&format!("c{c}"), "s1"));
    }
    given.when(enroll).then_error(EnrollError::TooManyCourses {
        student: "s1".into(),
    });
}

#[test]
fn events_of_other_courses_and_students_are_not_folded() {
    let (course, student) = given_states(both("c1", "s1"))
        .event(defined("c1", 5))
        .event(defined("c2", 5))
        .event(registered("s2"))
        .event(enrolled("c2", "s2"))
        .states();
    assert!(course.defined && course.students.is_empty());
    assert!(!student.registered && student.courses.is_empty());
}

// ---- tags and queries on the store ----

#[test]
fn tags_are_stored_and_queried_across_streams() {
    for db in TestDatabase::all() {
        let store = db.store();
        define_course(&store, "c1", "Rust", 2).unwrap();
        define_course(&store, "c2", "SQL", 2).unwrap();
        register_student(&store, "s1", "Ann").unwrap();
        enroll_student(&store, "c1", "s1").unwrap();
        enroll_student(&store, "c2", "s1").unwrap();
        let b = db.backend();

        let course = store
            .read_query(&Query::of::<CourseEvent>().tagged(tag("course", "c1")))
            .unwrap();
        let types: Vec<_> = course
            .events
            .iter()
            .map(|e| e.event.event_type.as_str())
            .collect();
        assert_eq!(types, ["CourseDefined", "StudentEnrolled"], "{b}");
        assert_eq!(
            course.position, course.events[1].event.global_position,
            "{b}"
        );

        // Two tags in one item: both must be there.
        let one = store
            .read_query(&Query::tag("student:s1").tagged("course:c2"))
            .unwrap();
        assert_eq!(one.events.len(), 1, "{b}");
        assert_eq!(one.events[0].event.stream_id, "course-c2", "{b}");

        // Two items: an event matching both is read once, with both items.
        let q = Query::tag("course:c1").or(Query::of::<StudentEvent>().tagged("student:s1"));
        let read = store.read_query(&q).unwrap();
        let seen: Vec<(String, Vec<usize>)> = read
            .events
            .iter()
            .map(|e| (e.event.event_type.clone(), e.items.clone()))
            .collect();
        assert_eq!(
            seen,
            [
                ("CourseDefined".to_owned(), vec![0]),
                ("StudentRegistered".to_owned(), vec![1]),
                ("StudentEnrolled".to_owned(), vec![0, 1]),
                ("StudentEnrolled".to_owned(), vec![1]),
            ],
            "{b}"
        );

        // Types alone, no tags.
        let all_defined = store.read_query(&Query::of::<CourseDefined>()).unwrap();
        assert_eq!(all_defined.events.len(), 2, "{b}");

        // The states a decision folds.
        let (course, student) = store.load_states(both("c1", "s1")).unwrap();
        assert_eq!(course.students, BTreeSet::from(["s1".to_owned()]), "{b}");
        assert_eq!(student.courses.len(), 2, "{b}");
    }
}

#[test]
fn queries_that_cannot_run_are_refused() {
    let db = TestDatabase::sqlite();
    let store = db.store();
    for q in [
        Query::default(),
        Query::types(Vec::<String>::new()),
        Query::tag("a\0b"),
        Query::tag("x".repeat(es_diesel::MAX_TAG_BYTES + 1)),
    ] {
        assert!(
            matches!(store.read_query(&q), Err(Error::InvalidQuery(_))),
            "{q:?}"
        );
    }
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(tag = "label:{label}")]
struct Labelled {
    label: String,
}

#[test]
fn hostile_tags_are_refused_before_anything_is_written_or_stored_intact() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        // Declared tags are checked when the event is encoded.
        let err = store
            .append(
                "s",
                ExpectedVersion::Any,
                [Labelled {
                    label: "x".repeat(es_diesel::MAX_TAG_BYTES),
                }],
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Encode(EncodeError::Tag {
                    source: TagError::TooLong { .. },
                    ..
                })
            ),
            "{b}: {err}"
        );
        // Tags set by hand are checked by the append, with the rest of a
        // write: the valid event before them is not written either.
        let by_hand = |tags: Vec<String>| {
            let mut w = StreamWrite::new("s", ExpectedVersion::Any);
            w.push(&Labelled {
                label: "fine".into(),
            })
            .unwrap();
            w.push_new(
                NewEvent::new(&Labelled { label: "ok".into() })
                    .unwrap()
                    .with_tags(tags),
            );
            store.append_streams(&[w]).unwrap_err()
        };
        let err = by_hand(vec!["a\0b".into()]);
        assert!(
            matches!(
                err,
                Error::Encode(EncodeError::Tag {
                    source: TagError::Nul { .. },
                    ..
                })
            ),
            "{b}: {err}"
        );
        let err = by_hand(vec![String::new()]);
        assert!(
            matches!(
                err,
                Error::Encode(EncodeError::Tag {
                    source: TagError::Empty,
                    ..
                })
            ),
            "{b}: {err}"
        );
        let err = by_hand((0..=es_diesel::MAX_TAGS).map(|i| format!("t{i}")).collect());
        assert!(
            matches!(
                err,
                Error::Encode(EncodeError::Tag {
                    source: TagError::TooMany { .. },
                    ..
                })
            ),
            "{b}: {err}"
        );
        assert_eq!(store.head().unwrap(), 0, "{b}: nothing was written");

        // Quotes, SQL, wildcards, non-ASCII, long: stored and found as given.
        let odd = [
            "it's; DROP TABLE es_events; --",
            "100%_match",
            "ünïcödé 🦀",
            "\"quoted\"",
            "tab\there",
        ];
        for label in odd {
            store
                .append(
                    "odd",
                    ExpectedVersion::Any,
                    [Labelled {
                        label: label.into(),
                    }],
                )
                .unwrap();
        }
        let long = "y".repeat(es_diesel::MAX_TAG_BYTES - "label:".len());
        store
            .append(
                "odd",
                ExpectedVersion::Any,
                [Labelled {
                    label: long.clone(),
                }],
            )
            .unwrap();
        for label in odd.into_iter().chain([long.as_str()]) {
            let read = store.read_query(&Query::tag(tag("label", label))).unwrap();
            assert_eq!(read.events.len(), 1, "{b}: {label:?}");
            let e: Labelled = read.events[0].event.decode::<Labelled>().unwrap().event;
            assert_eq!(e.label, label, "{b}");
        }
        // A wildcard in a tag is a character, not a pattern.
        assert!(store
            .read_query(&Query::tag("label:100%"))
            .unwrap()
            .events
            .is_empty());
    }
}

// ---- the append condition ----

#[test]
fn a_matching_append_since_the_read_fails_the_condition_and_writes_nothing() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        define_course(&store, "c1", "Rust", 5).unwrap();
        let query = Query::of::<CourseEvent>().tagged("course:c1");
        let read = store.read_query(&query).unwrap();
        // Another writer, without any condition, appends a matching event.
        store
            .append("elsewhere", ExpectedVersion::Any, [enrolled("c1", "s7")])
            .unwrap();
        let head = store.head().unwrap();
        let mut write = StreamWrite::new("course-c1", ExpectedVersion::Any);
        write.push(&enrolled("c1", "s1")).unwrap();
        let err = store
            .append_if(&[write.clone()], &read.condition())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::ConditionFailed {
                    seen: 1,
                    now: 2,
                    ..
                }
            ),
            "{b}: {err}"
        );
        assert!(err.is_conflict(), "{b}");
        assert_eq!(store.head().unwrap(), head, "{b}: nothing was written");

        // An event of another course does not touch the condition.
        let read = store.read_query(&query).unwrap();
        store
            .append("elsewhere", ExpectedVersion::Any, [enrolled("c2", "s7")])
            .unwrap();
        store.append_if(&[write], &read.condition()).unwrap();

        // "None may match": a unique name.
        let unique = AppendCondition::none_match(Query::of::<CourseDefined>().tagged("course:c1"));
        let mut again = StreamWrite::new("course-c1", ExpectedVersion::Any);
        again.push(&defined("c1", 1)).unwrap();
        assert!(
            matches!(
                store.append_if(&[again], &unique),
                Err(Error::ConditionFailed {
                    seen: 0,
                    now: 1,
                    ..
                })
            ),
            "{b}"
        );
    }
}

/// A writer of a matching event holds its transaction open: a conditional
/// append that read before it must wait for it, then fail, on every backend
/// (SQLite and MySQL: the one writer's lock; PostgreSQL: the tag's lock).
#[test]
fn a_conditional_append_waits_for_a_matching_writer_in_flight() {
    for db in TestDatabase::all() {
        for by_tag in [true, false] {
            waits_for_a_writer_in_flight(&db, by_tag);
        }
    }
}

/// `by_tag`: the query names the course's tag; otherwise it matches the
/// event type alone (any course).
fn waits_for_a_writer_in_flight(db: &TestDatabase, by_tag: bool) {
    {
        let store = db.store();
        let b = db.backend();
        let course = if by_tag { "c1" } else { "types" };
        define_course(&store, course, "Rust", 5).unwrap();
        let query = if by_tag {
            Query::of::<CourseEvent>().tagged("course:c1")
        } else {
            Query::of::<StudentEnrolled>()
        };
        let read = store.read_query(&query).unwrap();
        let seen = read.events.len() as u64;

        let mut holder = store.connection().unwrap();
        let (tx_open, tx_go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let writer = {
            let (tx_open, tx_go) = (tx_open.clone(), tx_go.clone());
            let store = store.clone();
            std::thread::spawn(move || {
                es_diesel::write_transaction(&mut holder, |c| {
                    let mut w = StreamWrite::new("course-c1", ExpectedVersion::Any);
                    w.push(&enrolled("c1", "s7"))?;
                    es_diesel::append_in(c, &[w])?;
                    tx_open.wait();
                    tx_go.wait();
                    Ok::<_, Error>(())
                })
                .unwrap();
                drop(store);
            })
        };
        tx_open.wait();
        let started = Instant::now();
        let appender = {
            let store = store.clone();
            let condition = read.condition();
            std::thread::spawn(move || {
                let mut w = StreamWrite::new("course-c1", ExpectedVersion::Any);
                w.push(&enrolled("c1", "s1")).unwrap();
                let result = store.append_if(&[w], &condition);
                (result, Instant::now())
            })
        };
        // It must still be waiting while the writer is open.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !appender.is_finished(),
            "{b} (by tag: {by_tag}): the conditional append did not wait"
        );
        let released = Instant::now();
        tx_go.wait();
        writer.join().unwrap();
        let (result, finished) = appender.join().unwrap();
        assert!(finished >= released, "{b}");
        assert!(
            matches!(result, Err(Error::ConditionFailed { seen: s, now: n, .. }) if s == seen && n == seen + 1),
            "{b} (by tag: {by_tag}): {result:?} after {:?}",
            started.elapsed()
        );
        let course = store.load_states(Course::new("c1")).unwrap();
        assert_eq!(course.students, BTreeSet::from(["s7".to_owned()]), "{b}");
    }
}

/// On PostgreSQL a writer may draw a lower position and commit after a
/// reader has read past it: the condition must still see that event.
#[test]
fn a_lower_position_committed_after_the_read_still_fails_the_condition() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    define_course(&store, "c1", "Rust", 5).unwrap();
    let (drawn, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let mut holder = store.connection().unwrap();
    let slow = {
        let (drawn, go) = (drawn.clone(), go.clone());
        std::thread::spawn(move || {
            es_diesel::write_transaction(&mut holder, |c| {
                let mut w = StreamWrite::new("slow", ExpectedVersion::Any);
                w.push(&enrolled("c1", "s-slow"))?;
                let rec = es_diesel::append_in(c, &[w])?;
                drawn.wait();
                go.wait();
                Ok::<_, Error>(rec[0].global_position)
            })
            .unwrap()
        })
    };
    drawn.wait();
    // A faster writer of the same tag commits a higher position.
    let fast = store
        .append("fast", ExpectedVersion::Any, [enrolled("c1", "s-fast")])
        .unwrap()[0]
        .global_position;
    let read = store
        .read_query(&Query::of::<CourseEvent>().tagged("course:c1"))
        .unwrap();
    assert_eq!(read.position, fast, "the reader read past the open writer");
    go.wait();
    let slow_position = slow.join().unwrap();
    assert!(slow_position < fast);
    let mut w = StreamWrite::new("course-c1", ExpectedVersion::Any);
    w.push(&enrolled("c1", "s1")).unwrap();
    let err = store.append_if(&[w], &read.condition()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ConditionFailed {
                seen: 2,
                now: 3,
                ..
            }
        ),
        "{err}"
    );
}

// ---- the enrollment rules under concurrency ----

/// 8 threads, hundreds of attempts each, on few courses and students: no
/// course ever over its capacity, no student ever over the limit, at any
/// point of the log; every refusal typed; nothing written by a refusal.
#[test]
fn enrollment_limits_hold_under_eight_concurrent_threads() {
    const THREADS: usize = 8;
    const ATTEMPTS: usize = 150;
    const COURSES: usize = 6;
    const STUDENTS: usize = 10;
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        let capacity = |c: usize| 2 + (c % 3) as u32;
        for c in 0..COURSES {
            define_course(&store, &format!("c{c}"), "Course", capacity(c)).unwrap();
        }
        for s in 0..STUDENTS {
            register_student(&store, &format!("s{s}"), "Student").unwrap();
        }
        let start = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, start) = (store.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut counts = BTreeMap::<&'static str, usize>::new();
                    let mut seed = 0x9E37_79B9_u64.wrapping_mul(t as u64 + 1);
                    for _ in 0..ATTEMPTS {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let course = format!("c{}", seed % COURSES as u64);
                        let student = format!("s{}", (seed >> 8) % STUDENTS as u64);
                        let leave = (seed >> 16).is_multiple_of(3);
                        let outcome = if leave {
                            leave_course(&store, &course, &student).map(|d| d.attempts)
                        } else {
                            enroll_student(&store, &course, &student).map(|d| d.attempts)
                        };
                        if let Ok(attempts) = outcome {
                            *counts.entry("retries").or_default() += attempts as usize - 1;
                        }
                        let key = match outcome {
                            Ok(_) if leave => "left",
                            Ok(_) => "enrolled",
                            Err(ExecuteError::Domain(EnrollError::CourseFull { .. })) => "full",
                            Err(ExecuteError::Domain(EnrollError::TooManyCourses { .. })) => {
                                "limit"
                            }
                            Err(ExecuteError::Domain(_)) => "refused",
                            Err(ExecuteError::Store(e)) if e.is_conflict() => "conflict",
                            Err(ExecuteError::Store(e)) => panic!("store error: {e}"),
                        };
                        *counts.entry(key).or_default() += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut totals = BTreeMap::<&str, usize>::new();
        for t in threads {
            for (k, v) in t.join().unwrap() {
                *totals.entry(k).or_default() += v;
            }
        }
        eprintln!("{b}: {totals:?}");
        // Replay the whole log in order: the limits hold after every event.
        let mut seats: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut courses_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let (mut enrolls, mut leaves) = (0, 0);
        for ev in store.read_all(0, usize::MAX).unwrap() {
            match ev.event_type.as_str() {
                "StudentEnrolled" => {
                    let e = ev.decode::<StudentEnrolled>().unwrap().event;
                    enrolls += 1;
                    let c: usize = e.course_id[1..].parse().unwrap();
                    let seat = seats.entry(e.course_id.clone()).or_default();
                    assert!(seat.insert(e.student_id.clone()), "{b}: enrolled twice");
                    assert!(
                        seat.len() <= capacity(c) as usize,
                        "{b}: {} over capacity",
                        e.course_id
                    );
                    let mine = courses_of.entry(e.student_id).or_default();
                    mine.insert(e.course_id);
                    assert!(mine.len() <= MAX_COURSES, "{b}: a student over the limit");
                }
                "StudentLeft" => {
                    let e = ev.decode::<StudentLeft>().unwrap().event;
                    leaves += 1;
                    assert!(
                        seats.get_mut(&e.course_id).unwrap().remove(&e.student_id),
                        "{b}"
                    );
                    courses_of
                        .get_mut(&e.student_id)
                        .unwrap()
                        .remove(&e.course_id);
                }
                _ => {}
            }
        }
        assert_eq!(
            enrolls,
            totals.get("enrolled").copied().unwrap_or(0),
            "{b}: one event per success"
        );
        assert_eq!(leaves, totals.get("left").copied().unwrap_or(0), "{b}");
        assert!(
            enrolls > 10,
            "{b}: the test exercised enrollments ({totals:?})"
        );
        assert!(
            totals.get("full").copied().unwrap_or(0) + totals.get("limit").copied().unwrap_or(0)
                > 0,
            "{b}: the limits were reached ({totals:?})"
        );
    }
}

// ---- tags of events stored before the declaration ----

mod before {
    use super::*;
    /// The same event type as a reader copy without the tag declaration
    /// (appending through it still stores the declared tags).
    #[derive(Event, Serialize, Deserialize, Debug, Clone)]
    #[event(name = "StudentEnrolled", copy)]
    pub struct UntaggedEnrollment {
        pub course_id: String,
        pub student_id: String,
    }
}

#[test]
fn migrate_tags_events_stored_before_the_declaration() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        for s in 0..3 {
            store
                .append(
                    "old",
                    ExpectedVersion::Any,
                    [before::UntaggedEnrollment {
                        course_id: "c1".into(),
                        student_id: format!("s{s}"),
                    }],
                )
                .unwrap();
        }
        let query = Query::of::<StudentEnrolled>().tagged("course:c1");
        // Appended through a copy type, they got the declared tags anyway.
        assert_eq!(store.read_query(&query).unwrap().events.len(), 3, "{b}");
        // As if these events were stored by a version without the tags.
        let mut conn = store.connection().unwrap();
        conn.batch_execute("DELETE FROM es_event_tags").unwrap();
        conn.batch_execute("DELETE FROM es_tag_declarations")
            .unwrap();
        drop(conn);
        assert!(store.read_query(&query).unwrap().events.is_empty(), "{b}");
        assert!(
            store.check_migrated().is_err(),
            "{b}: the missing tags are reported"
        );
        store.migrate().unwrap();
        store.check_migrated().unwrap();
        assert_eq!(store.read_query(&query).unwrap().events.len(), 3, "{b}");
        assert_eq!(
            store
                .read_query(&Query::tag("student:s2"))
                .unwrap()
                .events
                .len(),
            1,
            "{b}"
        );
        // Twice is the same.
        store.migrate().unwrap();
        assert_eq!(store.read_query(&query).unwrap().events.len(), 3, "{b}");
    }
}

#[test]
fn decide_keeps_streams_and_versions() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        define_course(&store, "c1", "Rust", 3).unwrap();
        register_student(&store, "s1", "Ann").unwrap();
        let done = enroll_student(&store, "c1", "s1").unwrap();
        assert_eq!(done.attempts, 1, "{b}");
        assert_eq!(done.events[0].stream_id, "course-c1", "{b}");
        assert_eq!(done.events[0].stream_version, 2, "{b}");
        assert_eq!(store.stream_version("course-c1").unwrap(), 2, "{b}");
        // Refused: typed, nothing written.
        let head = store.head().unwrap();
        let err = enroll_student(&store, "c1", "s1").unwrap_err();
        assert!(
            matches!(
                err,
                ExecuteError::Domain(EnrollError::AlreadyEnrolled { .. })
            ),
            "{b}"
        );
        assert_eq!(store.head().unwrap(), head, "{b}");
        if b == Backend::Sqlite {
            // A decision that decides nothing writes nothing.
            let none = store
                .decide("course-c1", Course::new("c1"), |_| {
                    Ok::<Vec<CourseDefined>, EnrollError>(vec![])
                })
                .unwrap();
            assert!(none.events.is_empty());
            assert_eq!(store.head().unwrap(), head);
        }
    }
}

/// Tags from a function: one per line of an order, and none for an
/// optional field left empty.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(tag = order_id, tag = "coupon:{coupon}", tags = Self::product_tags)]
struct OrderPlaced {
    order_id: u32,
    coupon: Option<String>,
    #[event(json)]
    products: Vec<String>,
}

impl OrderPlaced {
    fn product_tags(&self) -> Vec<String> {
        self.products.iter().map(|p| tag("product", p)).collect()
    }
}

#[test]
fn tags_from_fields_options_and_functions() {
    let with = OrderPlaced {
        order_id: 7,
        coupon: Some("XMAS".into()),
        products: vec!["tea".into(), "cup".into(), "tea".into()],
    };
    let mut tags = with.tags();
    tags.sort();
    assert_eq!(
        tags,
        [
            "coupon:XMAS",
            "order_id:7",
            "product:cup",
            "product:tea",
            "product:tea"
        ]
    );
    // Stored sorted and once each.
    assert_eq!(
        NewEvent::new(&with).unwrap().tags,
        ["coupon:XMAS", "order_id:7", "product:cup", "product:tea"]
    );
    let without = OrderPlaced {
        coupon: None,
        ..with
    };
    assert!(!without.tags().iter().any(|t| t.starts_with("coupon:")));
    let db = TestDatabase::sqlite();
    let store = db.store();
    store
        .append("order-7", ExpectedVersion::NoStream, [without])
        .unwrap();
    let read = store
        .read_query(&Query::tag("product:tea").tagged("order_id:7"))
        .unwrap();
    assert_eq!(read.events.len(), 1);
}

/// Two `migrate`s at once, both finding events to tag: one waits for the
/// other, and every tag is stored once.
#[test]
fn two_migrates_tagging_at_once() {
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        let mut writes = Vec::new();
        for s in 0..200 {
            let mut w = StreamWrite::new(format!("old-{s}"), ExpectedVersion::NoStream);
            w.push(&before::UntaggedEnrollment {
                course_id: format!("c{}", s % 7),
                student_id: format!("s{s}"),
            })
            .unwrap();
            writes.push(w);
        }
        store.append_streams(&writes).unwrap();
        let mut conn = store.connection().unwrap();
        conn.batch_execute("DELETE FROM es_event_tags").unwrap();
        conn.batch_execute("DELETE FROM es_tag_declarations")
            .unwrap();
        drop(conn);
        let start = Arc::new(Barrier::new(2));
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let (url, start) = (db.url().to_owned(), start.clone());
                std::thread::spawn(move || {
                    let store = es_diesel::EventStore::open(&url).unwrap();
                    start.wait();
                    store.migrate()
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap().unwrap_or_else(|e| panic!("{b}: {e}"));
        }
        let all = store
            .read_query(&Query::of::<StudentEnrolled>().tagged("course:c3"))
            .unwrap();
        assert_eq!(all.events.len(), 200 / 7 + usize::from(200 % 7 > 3), "{b}");
        let by_student = store.read_query(&Query::tag("student:s42")).unwrap();
        assert_eq!(by_student.events.len(), 1, "{b}");
        store.check_migrated().unwrap();
    }
}
