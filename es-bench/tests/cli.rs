//! The binary end to end: child processes, state checks, JSON lines.

use std::process::Command;

fn bench(backend: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_es-bench"));
    cmd.args([
        "--backend",
        backend,
        "--events",
        "200",
        "--replay-events",
        "500",
        "--runs",
        "1",
        "--json",
    ])
    .args(extra);
    if let Ok(url) = std::env::var("ES_TEST_POSTGRES_URL") {
        cmd.args(["--database-url", &url]);
    }
    if let Ok(url) = std::env::var("ES_TEST_MYSQL_URL") {
        cmd.args(["--mysql-url", &url]);
    }
    let out = cmd.output().expect("run es-bench");
    assert!(
        out.status.success(),
        "es-bench failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn check(lines: &[serde_json::Value], backend: &str) {
    let key = |l: &serde_json::Value| {
        format!(
            "{}/{}",
            l["phase"].as_str().unwrap(),
            l["impl"].as_str().unwrap()
        )
    };
    let keys: Vec<String> = lines.iter().map(key).collect();
    assert_eq!(
        keys,
        [
            "A/es", "A/raw", "B/es", "B/raw", "C/es", "C/raw", "D/es", "D/raw", "E1/raw", "E2/raw",
            "E3/raw"
        ]
    );
    for l in lines {
        assert_eq!(l["backend"], backend);
        assert!(l["events_per_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["peak_rss_kib"].as_u64().unwrap() > 1024, "{l}");
        let (events, log) = match l["phase"].as_str().unwrap() {
            "A" | "B" | "C" => (200, 1_300),
            "E1" | "E2" => (1_300, 1_300),
            _ => (1_600, 1_600),
        };
        assert_eq!(l["events"], events, "{l}");
        assert_eq!(l["state"]["log_events"], log, "{l}");
        let has_read_model = l["phase"] == "B" || l["phase"] == "D";
        assert_eq!(l["state"]["rm_books"].is_null(), !has_read_model, "{l}");
        if has_read_model {
            assert_eq!(l["state"]["rm_books"], 1_000, "{l}");
        }
        let commands = matches!(l["phase"].as_str().unwrap(), "A" | "B" | "C");
        assert_eq!(
            l["approach"].as_str(),
            commands.then_some("load + fold (no snapshots)"),
            "{l}"
        );
        check_latency(l);
        check_cpu(l);
        assert!(l["framework_sql"].is_null(), "{l}");
        let preloads = matches!(l["phase"].as_str().unwrap(), "A" | "C" | "D");
        assert_eq!(l["preload_events"].as_u64(), preloads.then_some(0), "{l}");
    }
}

/// A, B, C lines carry p50 <= p99 <= max (µs), and the framework's the
/// ratio of its p99 to raw's; other lines neither.
fn check_latency(l: &serde_json::Value) {
    let commands = matches!(l["phase"].as_str().unwrap(), "A" | "B" | "C");
    let lat = &l["latency_us"];
    assert_eq!(lat.is_null(), !commands, "{l}");
    if commands {
        let (mean, p50, p99, p999, max) = (
            lat["mean"].as_f64().unwrap(),
            lat["p50"].as_f64().unwrap(),
            lat["p99"].as_f64().unwrap(),
            lat["p999"].as_f64().unwrap(),
            lat["max"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max, "{l}");
        assert!(0.0 < mean && mean <= max, "{l}");
    }
    let ratio = l["p99_vs_raw"].as_f64();
    assert_eq!(ratio.is_some(), commands && l["impl"] == "es", "{l}");
    assert!(ratio.is_none_or(|r| r > 0.0), "{l}");
}

/// Every line carries the client's CPU per event, its kernel part within
/// it; a sequential phase cannot spend more CPU per event than two cores
/// give in its wall time per event.
fn check_cpu(l: &serde_json::Value) {
    let cpu = l["cpu_us_per_event"].as_f64().unwrap();
    let system = l["cpu_system_us_per_event"].as_f64().unwrap();
    assert!(cpu > 0.0 && (0.0..=cpu).contains(&system), "{l}");
    if matches!(l["phase"].as_str().unwrap(), "A" | "B") {
        let wall_us = 1e6 / l["events_per_s"].as_f64().unwrap();
        assert!(cpu <= 2.0 * wall_us, "{l}");
    }
}

#[test]
fn preloaded_log_counts_in_a_c_d_and_the_checks_hold() {
    // The binary itself stops with an error on a state mismatch.
    let lines = bench(
        "sqlite",
        &[
            "--sqlite-sync",
            "normal",
            "--phases",
            "A,B,C,D",
            "--preload-events",
            "450",
        ],
    );
    assert_eq!(lines.len(), 8);
    for l in &lines {
        let (preload, events, log) = match l["phase"].as_str().unwrap() {
            "A" | "C" => (Some(450), 200, 1_750),
            "B" => (None, 200, 1_300),
            _ => (Some(450), 2_050, 2_050),
        };
        assert_eq!(l["preload_events"].as_u64(), preload, "{l}");
        assert_eq!(l["events"], events, "{l}");
        assert_eq!(l["state"]["log_events"], log, "{l}");
        check_latency(l);
    }
    let d = lines.iter().find(|l| l["phase"] == "D").unwrap();
    // The 1,000 books and the 5 preloaded ones (100, 100, 100, 100, 50 events).
    assert_eq!(d["state"]["rm_books"], 1_005, "{d}");
}

/// The table a SQLite run of `args` prints (after checking it succeeded).
fn sqlite_table(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_es-bench"))
        .args(["--backend", "sqlite", "--sqlite-sync", "normal"])
        .args(["--events", "200", "--runs", "1"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn table_shows_latencies_and_the_p99_goal() {
    let table = sqlite_table(&["--phases", "A,C", "--preload-events", "100"]);
    assert!(table.contains("--preload-events 100"), "{table}");
    assert!(table.contains("latency per command, µs"), "{table}");
    assert!(table.contains("p99.9"), "{table}");
    assert!(table.contains("framework p99 / raw p99: A "), "{table}");
    assert!(
        table.contains("C: framework p99 latency / raw p99 = "),
        "{table}"
    );
    assert!(
        table.contains("the framework's wait in its writer queue"),
        "{table}"
    );
}

/// `--framework-sql` runs on the framework's database before the timed
/// phase (a statement that fails stops the benchmark), says so in the
/// header, and leaves the goals unjudged; the state is still checked.
#[test]
fn framework_sql_changes_the_schema_and_the_goals_are_not_judged() {
    let table = sqlite_table(&[
        "--phases",
        "A,D",
        "--replay-events",
        "500",
        "--framework-sql",
        "DROP INDEX es_events_by_type",
    ]);
    assert!(
        table.contains("(--framework-sql): DROP INDEX es_events_by_type"),
        "{table}"
    );
    let goals: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("goals"))
        .skip(1)
        .collect();
    assert!(goals.len() >= 3, "{table}");
    for goal in goals {
        assert!(
            goal.contains("not judged (--framework-sql") || goal.contains("not measured"),
            "{table}"
        );
    }
    assert!(table.contains("client CPU per event, µs"), "{table}");
    let lines = bench(
        "sqlite",
        &[
            "--phases",
            "A",
            "--framework-sql",
            "DROP INDEX es_events_by_type",
        ],
    );
    for l in &lines {
        assert_eq!(l["framework_sql"], "DROP INDEX es_events_by_type", "{l}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_es-bench"))
        .args(["--backend", "sqlite", "--events", "50", "--runs", "1"])
        .args([
            "--phases",
            "A",
            "--framework-sql",
            "DROP INDEX es_no_such_index",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("es_no_such_index"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_writer_queue_runs_the_framework_with_the_busy_handler() {
    let table = sqlite_table(&["--phases", "C", "--no-writer-queue"]);
    assert!(
        table.contains("the framework's wait in SQLite's busy handler (--no-writer-queue)"),
        "{table}"
    );
}

/// With `--aggregate-cache` the framework decides on cached states, and
/// every run's final state is still checked against the reference (the
/// benchmark fails otherwise), concurrent writers (C) included.
#[test]
fn aggregate_cache_runs_the_framework_on_cached_states() {
    let lines = bench(
        "sqlite",
        &[
            "--sqlite-sync",
            "normal",
            "--phases",
            "A,B,C",
            "--aggregate-cache",
        ],
    );
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let approach = l["approach"].as_str().unwrap();
        if l["impl"] == "es" {
            assert_eq!(
                approach, "state cache (Aggregate::CACHE); load + fold on a miss",
                "{l}"
            );
        } else {
            assert_eq!(approach, "load + fold (no snapshots)", "{l}");
        }
    }
    let table = sqlite_table(&["--phases", "A,C", "--aggregate-cache"]);
    assert!(table.contains("(--aggregate-cache)"), "{table}");
    // Not like for like: no goal of A or C is judged.
    assert!(
        !table.contains(": met") && !table.contains("MISSED"),
        "{table}"
    );
    assert_eq!(
        table.matches(": not judged (--aggregate-cache").count(),
        3,
        "{table}"
    );
}

#[test]
fn sqlite_json_lines() {
    check(&bench("sqlite", &["--sqlite-sync", "normal"]), "sqlite");
}

#[test]
fn postgres_json_lines() {
    if std::env::var("ES_TEST_POSTGRES_URL").is_err() {
        assert!(
            std::env::var("ES_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
            "ES_TEST_REQUIRE_ALL=1 but ES_TEST_POSTGRES_URL is not set"
        );
        eprintln!("SKIPPED: set ES_TEST_POSTGRES_URL to run the PostgreSQL benchmark test");
        return;
    }
    check(&bench("postgres", &[]), "postgres");
}

#[test]
fn mysql_json_lines() {
    if std::env::var("ES_TEST_MYSQL_URL").is_err() {
        assert!(
            std::env::var("ES_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
            "ES_TEST_REQUIRE_ALL=1 but ES_TEST_MYSQL_URL is not set"
        );
        eprintln!("SKIPPED: set ES_TEST_MYSQL_URL to run the MySQL benchmark test");
        return;
    }
    check(&bench("mysql", &[]), "mysql");
}

#[test]
fn unknown_phase_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_es-bench"))
        .args(["--backend", "sqlite", "--phases", "A,Z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown phase `Z`"));
}
