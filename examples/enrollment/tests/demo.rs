//! The example runs end to end on a fresh SQLite file and reports that
//! neither limit was exceeded.

use std::process::Command;

#[test]
fn the_demo_runs_and_keeps_both_limits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("enrollment.db");
    let out = Command::new(env!("CARGO_BIN_EXE_enrollment"))
        .arg("--database-url")
        .arg(&db)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("refused as expected: course"), "{stdout}");
    assert!(stdout.contains("refused: the course is full"), "{stdout}");
    assert!(
        stdout.contains("no course over its capacity, no student in more than 3 courses"),
        "{stdout}"
    );
}
