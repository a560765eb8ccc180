//! `cargo run -p enrollment` defines courses, registers students and lets
//! them enroll from several threads at once on a SQLite file (or
//! `--database-url postgres://..` / `mysql://..`), then shows that neither
//! limit was ever exceeded.

use clap::Parser;
use enrollment::domain::commands::*;
use enrollment::domain::*;
use es_diesel::{EventStore, ExecuteError, StoreOptions};
use std::collections::BTreeMap;

#[derive(Parser)]
#[command(about = "Course enrollment: two limits across streams, never exceeded")]
struct Cli {
    /// SQLite file, :memory:, postgres://user@host/db or mysql://user@host/db
    #[arg(long, env = "DATABASE_URL", default_value = "enrollment.db")]
    database_url: String,
    /// Concurrent students' threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let options = StoreOptions {
        create_if_missing: true,
        ..StoreOptions::default()
    };
    let store = EventStore::open_with(&cli.database_url, options)?;
    store.migrate()?;
    let run = std::process::id();
    // Fewer seats than students, and more courses than a student may take.
    let courses: Vec<(String, u32)> = (0..5)
        .map(|c| (format!("{run}-c{c}"), 3 + c as u32))
        .collect();
    for (course, capacity) in &courses {
        define_course(&store, course, &format!("Course {course}"), *capacity)?;
    }
    // Defining a course twice is refused, typed, and writes nothing.
    match define_course(&store, &courses[0].0, "Again", 99) {
        Err(ExecuteError::Domain(e)) => println!("refused as expected: {e}"),
        other => println!("unexpected: {other:?}"),
    }
    let students: Vec<String> = (0..cli.threads).map(|s| format!("{run}-s{s}")).collect();
    for s in &students {
        register_student(&store, s, &format!("Student {s}"))?;
    }
    let threads: Vec<_> = students
        .iter()
        .cloned()
        .map(|student| {
            let (store, courses) = (store.clone(), courses.clone());
            std::thread::spawn(move || {
                let mut outcomes = BTreeMap::<String, usize>::new();
                for (course, _) in &courses {
                    let outcome = match enroll_student(&store, course, &student) {
                        Ok(done) if done.attempts > 1 => {
                            "enrolled, after reading again (another enrollment came first)"
                                .to_owned()
                        }
                        Ok(_) => "enrolled".to_owned(),
                        Err(ExecuteError::Domain(EnrollError::CourseFull { .. })) => {
                            "refused: the course is full".to_owned()
                        }
                        Err(ExecuteError::Domain(EnrollError::TooManyCourses { .. })) => {
                            format!("refused: already in {MAX_COURSES} courses")
                        }
                        Err(ExecuteError::Domain(e)) => format!("refused: {e}"),
                        Err(ExecuteError::Store(e)) => format!("store error: {e}"),
                    };
                    *outcomes.entry(outcome).or_default() += 1;
                }
                outcomes
            })
        })
        .collect();
    let mut totals = BTreeMap::<String, usize>::new();
    for t in threads {
        for (k, v) in t.join().expect("a student's thread panicked") {
            *totals.entry(k).or_default() += v;
        }
    }
    println!("\n{} students tried every course at once:", students.len());
    for (outcome, n) in &totals {
        println!("  {n:>3}  {outcome}");
    }
    println!("\ncourse    capacity  enrolled");
    for (course, capacity) in &courses {
        let state = store.load_states(Course::new(course))?;
        println!("{course:<9} {capacity:>8}  {:>8}", state.students.len());
        assert!(state.students.len() <= *capacity as usize);
    }
    for s in &students {
        let state = store.load_states(Student::new(s))?;
        assert!(state.courses.len() <= MAX_COURSES);
    }
    println!("\nno course over its capacity, no student in more than {MAX_COURSES} courses");
    Ok(())
}
