//! Course enrollment, the canonical case of a rule across streams: a course
//! has a capacity, and a student joins at most [`MAX_COURSES`] courses.
//! Neither limit belongs to one stream: the course's seats are counted over
//! the enrollments of every student, a student's courses over every course.
//! Two decision states, one per fact, each built from the events tagged
//! with its id, are checked together and appended to conditionally.

use es_diesel::{tag, DecisionState, Event, ExecuteError, Query};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The most courses one student may be enrolled in at once.
pub const MAX_COURSES: usize = 3;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "course:{course_id}")]
pub struct CourseDefined {
    pub course_id: String,
    pub title: String,
    pub capacity: u32,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "student:{student_id}")]
pub struct StudentRegistered {
    pub student_id: String,
    pub name: String,
}

/// About a course and a student: tagged with both, it counts for both.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "course:{course_id}", tag = "student:{student_id}")]
pub struct StudentEnrolled {
    pub course_id: String,
    pub student_id: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(tag = "course:{course_id}", tag = "student:{student_id}")]
pub struct StudentLeft {
    pub course_id: String,
    pub student_id: String,
}

/// The events a course's state is built from.
#[derive(Event, Debug, Clone, PartialEq)]
pub enum CourseEvent {
    CourseDefined(CourseDefined),
    StudentEnrolled(StudentEnrolled),
    StudentLeft(StudentLeft),
}

/// The events a student's state is built from.
// Variants are named after the event structs they wrap, as the derive expects.
#[allow(clippy::enum_variant_names)]
#[derive(Event, Debug, Clone, PartialEq)]
pub enum StudentEvent {
    StudentRegistered(StudentRegistered),
    StudentEnrolled(StudentEnrolled),
    StudentLeft(StudentLeft),
}

/// One course: whether it exists, its capacity, who is enrolled.
#[derive(Clone, Debug, Default)]
pub struct Course {
    pub course_id: String,
    pub defined: bool,
    pub capacity: u32,
    pub students: BTreeSet<String>,
}

impl Course {
    pub fn new(course_id: &str) -> Self {
        Course {
            course_id: course_id.to_owned(),
            ..Course::default()
        }
    }
}

impl DecisionState for Course {
    type Event = CourseEvent;

    fn query(&self) -> Query {
        Query::of::<CourseEvent>().tagged(tag("course", &self.course_id))
    }

    fn apply(&mut self, event: &CourseEvent) {
        match event {
            CourseEvent::CourseDefined(e) => {
                self.defined = true;
                self.capacity = e.capacity;
            }
            CourseEvent::StudentEnrolled(e) => {
                self.students.insert(e.student_id.clone());
            }
            CourseEvent::StudentLeft(e) => {
                self.students.remove(&e.student_id);
            }
        }
    }
}

/// One student: whether registered, and the courses they are in.
#[derive(Clone, Debug, Default)]
pub struct Student {
    pub student_id: String,
    pub registered: bool,
    pub courses: BTreeSet<String>,
}

impl Student {
    pub fn new(student_id: &str) -> Self {
        Student {
            student_id: student_id.to_owned(),
            ..Student::default()
        }
    }
}

impl DecisionState for Student {
    type Event = StudentEvent;

    fn query(&self) -> Query {
        Query::of::<StudentEvent>().tagged(tag("student", &self.student_id))
    }

    fn apply(&mut self, event: &StudentEvent) {
        match event {
            StudentEvent::StudentRegistered(_) => self.registered = true,
            StudentEvent::StudentEnrolled(e) => {
                self.courses.insert(e.course_id.clone());
            }
            StudentEvent::StudentLeft(e) => {
                self.courses.remove(&e.course_id);
            }
        }
    }
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("there is no course {0}")]
    NoSuchCourse(String),
    #[error("course {0} already exists")]
    CourseExists(String),
    #[error("there is no student {0}")]
    NoSuchStudent(String),
    #[error("student {0} is already registered")]
    StudentExists(String),
    #[error("student {student} is already in course {course}")]
    AlreadyEnrolled { course: String, student: String },
    #[error("student {student} is not in course {course}")]
    NotEnrolled { course: String, student: String },
    #[error("course {course} is full ({capacity} students)")]
    CourseFull { course: String, capacity: u32 },
    #[error("student {student} is already in {MAX_COURSES} courses")]
    TooManyCourses { student: String },
}

/// The rule: the course exists and has a free seat, the student is
/// registered, not yet in it, and in fewer than [`MAX_COURSES`] courses.
pub fn enroll((course, student): &(Course, Student)) -> Result<Vec<StudentEnrolled>, EnrollError> {
    if !course.defined {
        return Err(EnrollError::NoSuchCourse(course.course_id.clone()));
    }
    if !student.registered {
        return Err(EnrollError::NoSuchStudent(student.student_id.clone()));
    }
    if course.students.contains(&student.student_id) {
        return Err(EnrollError::AlreadyEnrolled {
            course: course.course_id.clone(),
            student: student.student_id.clone(),
        });
    }
    if course.students.len() >= course.capacity as usize {
        return Err(EnrollError::CourseFull {
            course: course.course_id.clone(),
            capacity: course.capacity,
        });
    }
    if student.courses.len() >= MAX_COURSES {
        return Err(EnrollError::TooManyCourses {
            student: student.student_id.clone(),
        });
    }
    Ok(vec![StudentEnrolled {
        course_id: course.course_id.clone(),
        student_id: student.student_id.clone(),
    }])
}

/// Leaving frees the seat and the student's slot.
pub fn leave((course, student): &(Course, Student)) -> Result<Vec<StudentLeft>, EnrollError> {
    if !course.students.contains(&student.student_id) {
        return Err(EnrollError::NotEnrolled {
            course: course.course_id.clone(),
            student: student.student_id.clone(),
        });
    }
    Ok(vec![StudentLeft {
        course_id: course.course_id.clone(),
        student_id: student.student_id.clone(),
    }])
}

/// The course id is unique: no `CourseDefined` may carry its tag yet.
pub fn define(
    course: &Course,
    title: &str,
    capacity: u32,
) -> Result<Vec<CourseDefined>, EnrollError> {
    if course.defined {
        return Err(EnrollError::CourseExists(course.course_id.clone()));
    }
    Ok(vec![CourseDefined {
        course_id: course.course_id.clone(),
        title: title.to_owned(),
        capacity,
    }])
}

/// The student id is unique.
pub fn register(student: &Student, name: &str) -> Result<Vec<StudentRegistered>, EnrollError> {
    if student.registered {
        return Err(EnrollError::StudentExists(student.student_id.clone()));
    }
    Ok(vec![StudentRegistered {
        student_id: student.student_id.clone(),
        name: name.to_owned(),
    }])
}

/// The stream a course's events are appended to.
pub fn course_stream(course_id: &str) -> String {
    format!("course-{course_id}")
}

/// The stream a student's registration is appended to.
pub fn student_stream(student_id: &str) -> String {
    format!("student-{student_id}")
}

/// The commands, each one consistent decision on the store.
pub mod commands {
    use super::*;
    use es_diesel::{Decided, EventStore};

    pub type Outcome<E> = Result<Decided<(Course, Student), E>, ExecuteError<EnrollError>>;

    pub fn define_course(
        store: &EventStore,
        course_id: &str,
        title: &str,
        capacity: u32,
    ) -> Result<(), ExecuteError<EnrollError>> {
        store
            .decide(&course_stream(course_id), Course::new(course_id), |c| {
                define(c, title, capacity)
            })
            .map(drop)
    }

    pub fn register_student(
        store: &EventStore,
        student_id: &str,
        name: &str,
    ) -> Result<(), ExecuteError<EnrollError>> {
        store
            .decide(&student_stream(student_id), Student::new(student_id), |s| {
                register(s, name)
            })
            .map(drop)
    }

    pub fn enroll_student(
        store: &EventStore,
        course_id: &str,
        student_id: &str,
    ) -> Outcome<StudentEnrolled> {
        store.decide(
            &course_stream(course_id),
            (Course::new(course_id), Student::new(student_id)),
            enroll,
        )
    }

    pub fn leave_course(
        store: &EventStore,
        course_id: &str,
        student_id: &str,
    ) -> Outcome<StudentLeft> {
        store.decide(
            &course_stream(course_id),
            (Course::new(course_id), Student::new(student_id)),
            leave,
        )
    }
}
