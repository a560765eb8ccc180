//! Decisions across streams at their edges: writers that do not compute
//! tags, `migrate` re-tagging between a read and an append, a caller's
//! transaction appending twice, sessions with another search path, raw
//! identifiers, and old events the new declaration cannot tag.

#[path = "../../examples/enrollment/src/domain.rs"]
#[allow(dead_code)]
mod domain;

use diesel::connection::SimpleConnection;
use domain::commands::*;
use domain::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{Error, Event, ExecuteError, ExpectedVersion, NewEvent, Query, StreamWrite};
use serde::{Deserialize, Serialize};

mod old {
    use super::*;
    /// `StudentEnrolled` as a writer that does not know its tag declaration
    /// sees it: a `#[event(copy)]` type (allowed to append: "an old version
    /// kept to write test logs"), or the same struct in a binary built
    /// before the declaration, still running during a rolling deploy.
    #[derive(Event, Serialize, Deserialize, Debug, Clone)]
    #[event(name = "StudentEnrolled", copy)]
    pub struct OldEnrollment {
        pub course_id: String,
        pub student_id: String,
    }

    /// `CouponIssued` before it declared a tag.
    #[derive(Event, Serialize, Deserialize, Debug, Clone)]
    #[event(name = "CouponIssued", copy)]
    pub struct OldCoupon {
        pub code: String,
    }
}

/// An event of a tagged type appended by a writer that does not compute its
/// tags (an `#[event(copy)]` type, a `NewEvent` built by hand) gets the
/// declared tags from the store: decisions see it, and the course does not
/// take a second student over its capacity of 1.
#[test]
fn an_untagged_write_of_a_tagged_type_is_never_seen_by_decisions() {
    let mut broken = Vec::new();
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        define_course(&store, "c1", "Rust", 1).unwrap();
        register_student(&store, "s1", "Ann").unwrap();
        store
            .append(
                "course-c1",
                ExpectedVersion::Any,
                [old::OldEnrollment {
                    course_id: "c1".into(),
                    student_id: "s9".into(),
                }],
            )
            .unwrap();
        // Nothing reports the untagged event, and migrate does not repair it.
        store.check_migrated().unwrap();
        store.migrate().unwrap();
        let outcome = enroll_student(&store, "c1", "s1");
        if !matches!(
            outcome,
            Err(ExecuteError::Domain(EnrollError::CourseFull { .. }))
        ) {
            broken.push(format!(
                "{b}: course c1 (capacity 1, s9 enrolled) accepted s1 too: {:?}",
                outcome.map(|d| d.events.len())
            ));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

/// A type that declares a tag from a free-text field.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(tag = "{code}")]
pub struct CouponIssued {
    pub code: String,
}

/// An old event that the new declaration cannot tag (here a tag over 512
/// bytes) stops `migrate` with an error naming the event and the remedy,
/// and changes nothing: a decision must never miss an event silently.
#[test]
fn an_untaggable_old_event_stops_migrate_with_its_position() {
    let db = TestDatabase::sqlite();
    let store = db.store();
    let mut w = StreamWrite::new("coupons", ExpectedVersion::Any);
    // Stored with a tag set by hand, as if by an older declaration.
    w.push_new(
        NewEvent::new(&old::OldCoupon {
            code: "x".repeat(600),
        })
        .unwrap()
        .with_tags(["coupon"]),
    );
    let position = store.append_streams(&[w]).unwrap()[0].global_position;
    store
        .connection()
        .unwrap()
        .batch_execute("DELETE FROM es_tag_declarations WHERE event_type = 'CouponIssued'")
        .unwrap();
    let err = store.migrate().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Malformed { position: p, .. } if p == position)
            && text.contains("512")
            && text.contains("tags = "),
        "{text}"
    );
    // Nothing changed: the event keeps its old tag, and migrate still reports it.
    assert_eq!(
        store
            .read_query(&Query::tag("coupon"))
            .unwrap()
            .events
            .len(),
        1
    );
    assert!(store.check_migrated().is_err());
}

/// Declares one tag; events may carry more, set by hand.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(tag = "note:{id}")]
pub struct Noted {
    pub id: String,
}

/// Declares none; its events carry the tags set by hand.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub struct Memo {
    pub id: String,
}

/// `migrate` re-tagging a type removes matches (here the hand-set tag
/// `watch` of a `Noted` event, wiped when the type's declaration changes):
/// one removed match plus one new one leaves the count unchanged, so the
/// condition also refuses a match above the read's last position.
#[test]
fn a_retag_between_read_and_append_hides_a_new_matching_event() {
    let mut broken = Vec::new();
    for db in TestDatabase::all() {
        let store = db.store();
        let b = db.backend();
        let mut w = StreamWrite::new("notes", ExpectedVersion::Any);
        w.push_new(
            NewEvent::new(&Noted { id: "1".into() })
                .unwrap()
                .with_tags(["note:1", "watch"]),
        );
        store.append_streams(&[w]).unwrap();
        let query = Query::tag("watch");
        let read = store.read_query(&query).unwrap();
        assert_eq!(read.events.len(), 1, "{b}");

        // Since the read: a matching event is appended ...
        let mut w = StreamWrite::new("memos", ExpectedVersion::Any);
        w.push_new(
            NewEvent::new(&Memo { id: "2".into() })
                .unwrap()
                .with_tags(["watch"]),
        );
        store.append_streams(&[w]).unwrap();
        // ... and a deploy changes `Noted`'s declaration: migrate re-tags it.
        store
            .connection()
            .unwrap()
            .batch_execute("DELETE FROM es_tag_declarations WHERE event_type = 'Noted'")
            .unwrap();
        store.migrate().unwrap();

        let mut w = StreamWrite::new("decided", ExpectedVersion::Any);
        w.push(&Memo { id: "3".into() }).unwrap();
        let result = store.append_if(&[w], &read.condition());
        if !matches!(result, Err(Error::ConditionFailed { .. })) {
            broken.push(format!(
                "{b}: an event matching the query was appended since the read, yet the \
                 conditional append went through: {:?}",
                result.map(|r| r.len())
            ));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

/// A raw identifier field names its tag without the `r#`.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(tag = r#type)]
pub struct Typed {
    pub r#type: String,
}

#[test]
fn a_raw_identifier_field_tags_without_its_prefix() {
    let e = Typed { r#type: "a".into() };
    assert_eq!(e.tags(), ["type:a"]);
}

#[derive(diesel::QueryableByName)]
struct Hash {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    h: i32,
}

/// PostgreSQL: a caller's transaction that appends
/// twice with `append_in` (the documented way to append with other writes)
/// takes its tags' shared locks in two steps, not in the canonical order;
/// a conditional append covering both tags, which takes them exclusively
/// in key order, deadlocks with it. If PostgreSQL breaks a deadlock
/// between them, the conditional append runs again: the writer commits,
/// then the conditional append fails its condition.
#[test]
fn a_two_step_writer_and_a_conditional_append_do_not_deadlock() {
    use diesel::RunQueryDsl;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let mut conn = store.connection().unwrap();
    let mut key = |t: &str| {
        diesel::sql_query(format!(
            "SELECT hashtext(current_schema() || '/' || '{t}') AS h"
        ))
        .get_result::<Hash>(&mut *conn)
        .unwrap()
        .h
    };
    let (mut lo, mut hi) = ("dl:a", "dl:b");
    if key(lo) > key(hi) {
        std::mem::swap(&mut lo, &mut hi);
    }
    drop(conn);
    let memo = |tag: &str| {
        let mut w = StreamWrite::new("memos", ExpectedVersion::Any);
        w.push_new(
            NewEvent::new(&Memo { id: tag.into() })
                .unwrap()
                .with_tags([tag]),
        );
        w
    };
    let holds = Arc::new(Barrier::new(2));
    let mut holder = store.connection().unwrap();
    let writer = {
        let holds = holds.clone();
        let (first, second) = (memo(hi), memo(lo));
        std::thread::spawn(move || {
            es_diesel::write_transaction(&mut holder, |c| {
                es_diesel::append_in(c, &[first])?;
                holds.wait();
                std::thread::sleep(Duration::from_millis(300));
                es_diesel::append_in(c, &[second])?;
                Ok::<_, Error>(())
            })
        })
    };
    holds.wait();
    let condition = es_diesel::AppendCondition::none_match(Query::tag(lo).or(Query::tag(hi)));
    let mut w = StreamWrite::new("decided", ExpectedVersion::Any);
    w.push(&Memo { id: "c".into() }).unwrap();
    let conditional = store.append_if(&[w], &condition);
    let written = writer.join().unwrap();
    assert!(
        written.is_ok() && matches!(conditional, Err(Error::ConditionFailed { .. })),
        "writer: {written:?}\nconditional append: {:?}",
        conditional.map(|r| r.len())
    );
}

/// PostgreSQL: sessions that reach one log through different search paths
/// take the same tag locks (keyed by the tag table's OID): a conditional
/// append waits for a writer of its tag in flight in the other session.
#[test]
fn sessions_with_another_search_path_share_the_tag_locks() {
    use std::sync::{Arc, Barrier};
    use std::time::Duration;
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let store = db.store();
    let schema = db.url().rsplit("search_path%3D").next().unwrap().to_owned();
    let extra = format!("{schema}_x");
    store
        .connection()
        .unwrap()
        .batch_execute(&format!("CREATE SCHEMA \"{extra}\""))
        .unwrap();
    let other_url = db.url().replace(
        &format!("search_path%3D{schema}"),
        &format!("search_path%3D{extra},{schema}"),
    );
    let other = es_diesel::EventStore::open(&other_url).unwrap();
    define_course(&store, "c1", "Rust", 5).unwrap();
    let read = store
        .read_query(&Query::of::<CourseEvent>().tagged("course:c1"))
        .unwrap();

    let (open, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let mut holder = other.connection().unwrap();
    let writer = {
        let (open, go) = (open.clone(), go.clone());
        std::thread::spawn(move || {
            es_diesel::write_transaction(&mut holder, |c| {
                let mut w = StreamWrite::new("elsewhere", ExpectedVersion::Any);
                w.push(&domain::StudentEnrolled {
                    course_id: "c1".into(),
                    student_id: "s7".into(),
                })?;
                es_diesel::append_in(c, &[w])?;
                open.wait();
                go.wait();
                Ok::<_, Error>(())
            })
        })
    };
    open.wait();
    let appender = {
        let store = store.clone();
        let condition = read.condition();
        std::thread::spawn(move || {
            let mut w = StreamWrite::new("course-c1", ExpectedVersion::Any);
            w.push(&domain::StudentEnrolled {
                course_id: "c1".into(),
                student_id: "s1".into(),
            })
            .unwrap();
            store.append_if(&[w], &condition)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let waited = !appender.is_finished();
    go.wait();
    writer.join().unwrap().unwrap();
    let result = appender.join().unwrap();
    let _ = store
        .connection()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA \"{extra}\" CASCADE"));
    assert!(
        waited && matches!(result, Err(Error::ConditionFailed { .. })),
        "the conditional append waited: {waited}; it returned {:?}; both enrollments \
         were decided on a read that saw neither",
        result.map(|r| r.len())
    );
}
