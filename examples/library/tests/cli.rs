//! The app as a Unix tool: exit statuses, refusals on stderr, quiet on a
//! closed pipe, no implicit migration, errors that name the database, JSON.

use es_diesel::serde_json::{self, Value};
use es_diesel::testing::TestDatabase;
use es_diesel::{Backend, EventStore};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn library(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_library"));
    cmd.args(args).arg("--database-url").arg(url);
    // Diagnostics are asked for explicitly, never inherited.
    cmd.env_remove("RUST_LOG");
    cmd
}

fn output(url: &str, args: &[&str]) -> Output {
    library(url, args).output().expect("run the library binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
fn ok(url: &str, args: &[&str]) -> String {
    let out = output(url, args);
    assert!(
        out.status.success(),
        "{args:?}: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a command that must fail with `code`; returns its stderr.
fn fails(url: &str, args: &[&str], code: i32) -> String {
    let out = output(url, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn migrated() -> Vec<TestDatabase> {
    let dbs = TestDatabase::all();
    for db in &dbs {
        ok(db.url(), &["admin", "migrate"]);
        ok(db.url(), &["register-book", "1", "Dune", "Frank Herbert"]);
        ok(db.url(), &["register-user", "8", "Grace"]);
        ok(db.url(), &["borrow", "1", "8"]);
    }
    dbs
}

#[test]
fn rust_log_shows_the_stores_spans_on_stderr_and_nothing_without_it() {
    for db in migrated() {
        let url = db.url();
        let quiet = output(url, &["return", "1", "8"]);
        assert!(quiet.status.success(), "{}", text(&quiet.stderr));
        assert_eq!(text(&quiet.stderr), "");
        assert!(text(&quiet.stdout).contains("returned book 1"));

        let traced = library(url, &["borrow", "1", "8"])
            .env("RUST_LOG", "es_diesel=debug")
            .output()
            .unwrap();
        assert!(traced.status.success(), "{}", text(&traced.stderr));
        assert!(text(&traced.stdout).contains("borrowed book 1"));
        let stderr = text(&traced.stderr);
        let line = |span: &str| {
            stderr
                .lines()
                .filter(|l| l.contains(" close "))
                .find(|l| {
                    // The closing span is the last of the chain before the target.
                    let chain = l.split(": es_diesel::").next().unwrap_or_default();
                    let last = chain.rsplit("}:").next().unwrap_or_default();
                    last.contains(&format!("{span}{{"))
                })
                .unwrap_or_else(|| panic!("no closed {span} span on stderr:\n{stderr}"))
                .to_owned()
        };
        // Borrowing is one decision across the book's and the reader's events.
        let decide = line("es.decide");
        assert!(
            decide.contains(r#"stream="book-1""#)
                && decide.contains(r#"outcome="appended""#)
                && decide.contains("attempts=1"),
            "{decide}"
        );
        let append = line("es.append");
        assert!(
            append.contains("events=1") && append.contains("last_position="),
            "{append}"
        );
        assert!(line("es.projector").contains(r#"event_type="BookBorrowed""#));
        assert!(
            !stderr.contains('\u{1b}'),
            "no colours off a terminal: {stderr:?}"
        );

        let rebuilt = library(url, &["admin", "rebuild", "book_list"])
            .env("RUST_LOG", "es_diesel=debug")
            .output()
            .unwrap();
        assert!(rebuilt.status.success(), "{}", text(&rebuilt.stderr));
        let stderr = text(&rebuilt.stderr);
        assert!(
            stderr.contains(r#"es.rebuild{read_model="book_list""#)
                && stderr.contains(r#"outcome="rebuilt""#),
            "{stderr}"
        );

        let refused = library(url, &["borrow", "1", "8"])
            .env("RUST_LOG", "es_diesel=debug")
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(1));
        assert!(text(&refused.stderr).contains(r#"outcome="refused""#));
        assert!(text(&refused.stderr).contains("refused: book 1 is already borrowed by user 8"));
    }
}

#[test]
fn refusals_exit_1_on_stderr_usage_errors_2_store_errors_3() {
    for db in migrated() {
        let url = db.url();
        for (args, reason) in [
            (
                &["borrow", "1", "8"][..],
                "refused: book 1 is already borrowed by user 8",
            ),
            (
                &["borrow", "9", "8"],
                "refused: book 9 is not in the catalogue",
            ),
            (
                &["borrow", "1", "42"],
                "refused: user 42 has no library card",
            ),
            (
                &["return", "1", "42"],
                "refused: book 1 is not borrowed by user 42",
            ),
            (&["login", "42"], "refused: user 42 has no library card"),
            (
                &["register-user", "8", "Ann"],
                "refused: user 8 already has a library card",
            ),
            (&["view", "9"], "book 9 is not in the catalogue"),
        ] {
            let out = output(url, args);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{args:?}: {}",
                text(&out.stderr)
            );
            assert_eq!(text(&out.stderr).trim(), reason, "{args:?}");
            assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        }
        assert!(fails(url, &["borrow", "1"], 2).contains("Usage"));
        assert!(fails(url, &["borrow", "one", "8"], 2).contains("invalid value"));
        assert!(fails(url, &["lend"], 2).contains("unrecognized subcommand"));
        assert!(ok(url, &["return", "1", "8"]).contains("user 8 returned book 1"));
    }
    let err = fails("postgres://nobody@127.0.0.1:1/nothing", &["list"], 3);
    assert!(
        err.starts_with("error: ") && err.contains("`nothing` at 127.0.0.1:1"),
        "{err}"
    );
    let help = ok("library.db", &["--help"]);
    assert!(
        help.contains("Exit status:") && help.contains("  3  "),
        "{help}"
    );
    assert!(ok("library.db", &["--version"]).starts_with("library 0."));
}

/// A child whose stdout pipe we close before it writes: writing must end it
/// quietly with status 0, not a panic.
fn closed_stdout(url: &str, args: &[&str]) -> Output {
    let mut child = library(url, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    for db in migrated() {
        for args in [
            &["list"][..],
            &["list", "--json"],
            &["view", "1"],
            &["register-book", "2", "Kindred", "Octavia E. Butler"],
            &["admin", "status"],
            &["admin", "status", "--json"],
            &["admin", "projectors"],
            &["admin", "tail"],
            &["admin", "stream", "book-1"],
            &["admin", "rebuild", "book_list"],
            &["admin", "migrate"],
        ] {
            let out = closed_stdout(db.url(), args);
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{} {args:?}: {:?}\n{}",
                db.backend(),
                out.status,
                text(&out.stderr)
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("demo.db");
    let out = closed_stdout(fresh.to_str().unwrap(), &["demo"]);
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        text(&out.stderr)
    );
}

struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `admin tail -f | head -1`: once the reader is gone, the next event the
/// follower writes ends it.
#[test]
fn tail_follow_stops_when_its_reader_goes_away() {
    for db in migrated() {
        let mut tail = Reaper(
            library(db.url(), &["admin", "tail", "-f", "-n", "1"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut first = String::new();
        BufReader::new(tail.0.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("BookBorrowed"), "{first}");
        // The reader is dropped: the pipe is closed.
        let store = EventStore::open(db.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut book = 100;
        let status = loop {
            if let Some(status) = tail.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: tail -f still running with its output closed",
                db.backend()
            );
            book += 1;
            store
                .append(
                    &format!("other-{book}"),
                    es_diesel::ExpectedVersion::NoStream,
                    [Ping { n: book }],
                )
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut tail.0.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            status.success() && stderr.is_empty(),
            "{status:?}\n{stderr}"
        );
    }
}

#[derive(es_diesel::Event, serde::Serialize, serde::Deserialize)]
#[event(view = false)]
struct Ping {
    n: i64,
}

#[test]
fn only_demo_and_admin_migrate_create_or_migrate_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo.db");
    let url = missing.to_str().unwrap();
    for args in [
        &["list"][..],
        &["view", "1"],
        &["borrow", "1", "7"],
        &["import-legacy"],
        &["admin", "status"],
        &["admin", "tail"],
    ] {
        let err = fails(url, args, 3);
        assert!(
            err.contains(&format!("`{url}` does not exist")) && err.contains("admin migrate"),
            "{args:?}: {err}"
        );
        assert!(!missing.exists(), "{args:?} created {url}");
    }
    ok(url, &["admin", "migrate"]);
    assert!(missing.exists());
    ok(url, &["list"]);

    // An existing database that was never migrated: the same, on every backend.
    for db in TestDatabase::all() {
        if db.backend() == Backend::Sqlite {
            EventStore::open(db.url()).unwrap(); // an empty file
        }
        for args in [
            &["list"][..],
            &["register-user", "1", "Ann"],
            &["admin", "status"],
        ] {
            let err = fails(db.url(), args, 3);
            assert!(
                err.contains("is not migrated")
                    && err.contains("the store's tables")
                    && err.contains("run `admin migrate`"),
                "{args:?}: {err}"
            );
        }
        assert!(EventStore::open(db.url())
            .unwrap()
            .check_migrated()
            .is_err());
        ok(db.url(), &["admin", "migrate"]);
        ok(db.url(), &["register-user", "1", "Ann"]);
    }
}

/// A role that may only read runs the pages: nothing tries to migrate.
#[test]
fn a_read_only_postgres_role_can_list_and_view() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    ok(db.url(), &["admin", "migrate"]);
    ok(db.url(), &["register-book", "1", "Dune", "Frank Herbert"]);
    let mut admin = diesel::PgConnection::establish(db.url()).unwrap();
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let schema = diesel::RunQueryDsl::get_result::<Name>(
        diesel::sql_query("SELECT current_schema() AS name"),
        &mut admin,
    )
    .unwrap()
    .name;
    let role = format!("{schema}_reader");
    struct DropRole(diesel::PgConnection, String, String);
    impl Drop for DropRole {
        fn drop(&mut self) {
            let (role, schema) = (&self.1, &self.2);
            let _ = self.0.batch_execute(&format!(
                "REVOKE ALL ON ALL TABLES IN SCHEMA \"{schema}\" FROM \"{role}\"; \
                 REVOKE ALL ON SCHEMA \"{schema}\" FROM \"{role}\"; DROP ROLE IF EXISTS \"{role}\""
            ));
        }
    }
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\"; \
             GRANT SELECT ON ALL TABLES IN SCHEMA \"{schema}\" TO \"{role}\""
        ))
        .unwrap();
    let _cleanup = DropRole(admin, role.clone(), schema);
    let (scheme, rest) = db.url().split_once("://").unwrap();
    let Some((_, host)) = rest.split_once('@') else {
        return;
    };
    let reader_url = format!("{scheme}://{role}@{host}");
    assert!(ok(&reader_url, &["list"]).contains("Dune"));
    assert!(ok(&reader_url, &["view", "1", "--json"]).contains("\"Dune\""));
    assert!(ok(&reader_url, &["admin", "status"]).contains("book_list"));
    let err = fails(
        &reader_url,
        &["register-book", "2", "Kindred", "Octavia E. Butler"],
        3,
    );
    assert!(err.contains("permission denied"), "{err}");
    let err = fails(&reader_url, &["admin", "migrate"], 3);
    assert!(
        err.contains("permission denied") || err.contains("must be owner"),
        "{err}"
    );
}

/// Every read model after an import and a run of commands, against what a
/// person computes by hand; again after rebuilding each from the log.
#[test]
fn read_models_match_the_hand_computed_state_before_and_after_rebuilds() {
    for db in TestDatabase::all() {
        let url = db.url();
        ok(url, &["admin", "migrate"]);
        ok(url, &["import-legacy"]); // 102 comes in lent to reader 7, who has no card yet
        ok(url, &["register-book", "1", "Dune", "Frank Herbert"]);
        ok(url, &["register-book", "2", "Kindred", "Octavia E. Butler"]);
        ok(
            url,
            &[
                "register-book",
                "3",
                "Parable of the Sower",
                "Octavia E. Butler",
            ],
        );
        ok(url, &["register-user", "7", "Ada"]);
        ok(url, &["register-user", "8", "Grace"]);
        ok(url, &["login", "8"]);
        for (verb, book, user) in [
            ("borrow", "1", "8"),
            ("return", "102", "7"),
            ("borrow", "102", "8"),
            ("borrow", "2", "7"),
            ("return", "2", "7"),
            ("borrow", "2", "7"),
        ] {
            ok(url, &[verb, book, user]);
        }
        fails(url, &["borrow", "1", "7"], 1);
        fails(url, &["return", "3", "7"], 1);

        let expected_books = serde_json::json!([
            {"book_id": 1, "title": "Dune", "author": "Frank Herbert", "borrowed_by": 8, "times_borrowed": 1},
            {"book_id": 2, "title": "Kindred", "author": "Octavia E. Butler", "borrowed_by": 7, "times_borrowed": 2},
            {"book_id": 3, "title": "Parable of the Sower", "author": "Octavia E. Butler", "borrowed_by": null, "times_borrowed": 0},
            {"book_id": 101, "title": "Middlemarch", "author": "George Eliot", "borrowed_by": null, "times_borrowed": 0},
            {"book_id": 102, "title": "Invisible Cities", "author": "Italo Calvino", "borrowed_by": 8, "times_borrowed": 2},
            {"book_id": 103, "title": "Beloved", "author": "Toni Morrison", "borrowed_by": null, "times_borrowed": 0},
        ]);
        // (user, name, books out, logged in)
        let expected_readers = [(7, "Ada", 1, false), (8, "Grace", 2, true)];
        let expected_stats = vec![
            ("Frank Herbert".to_owned(), 1, 1),
            ("George Eliot".to_owned(), 1, 0),
            ("Italo Calvino".to_owned(), 1, 2),
            ("Octavia E. Butler".to_owned(), 2, 2),
            ("Toni Morrison".to_owned(), 1, 0),
        ];
        let check = |when: &str| {
            let list: Value = serde_json::from_str(&ok(url, &["list", "--json"])).unwrap();
            assert_eq!(
                list["books"],
                expected_books,
                "{}: book_list {when}",
                db.backend()
            );
            let readers: Vec<(i64, &str, i64, bool)> = list["readers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["user_id"].as_i64().unwrap(),
                        r["name"].as_str().unwrap(),
                        r["books_out"].as_i64().unwrap(),
                        !r["last_login"].is_null(),
                    )
                })
                .collect();
            assert_eq!(
                readers,
                expected_readers,
                "{}: readers {when}",
                db.backend()
            );
            let view: Value = serde_json::from_str(&ok(url, &["view", "102", "--json"])).unwrap();
            let loans: Vec<(i64, bool)> = view["loans"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["user_id"].as_i64().unwrap(),
                        l["imported"].as_bool().unwrap(),
                    )
                })
                .collect();
            assert_eq!(loans, [(7, true), (8, false)], "{when}: {view}");
            assert_eq!(view["book"]["times_borrowed"], 2);
            assert_eq!(view["stream"].as_array().unwrap().len(), 3, "{view}");
            assert!(ok(url, &["view", "102"]).contains("borrowed 2 time(s)"));
        };
        check("as projected inline");
        for name in ["book_list", "readers", "author_stats"] {
            ok(url, &["admin", "rebuild", name]);
        }
        check("after rebuilds");
        assert_eq!(author_stats(url), expected_stats, "{}", db.backend());

        // Returning the imported book's successor loans leaves nobody below zero.
        ok(url, &["return", "102", "8"]);
        ok(url, &["return", "1", "8"]);
        let list: Value = serde_json::from_str(&ok(url, &["list", "--json"])).unwrap();
        let grace = &list["readers"][1];
        assert_eq!(grace["books_out"], 0, "{list}");
    }
}

fn author_stats(url: &str) -> Vec<(String, i64, i64)> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        author: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        books: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        loans: i64,
    }
    let store = EventStore::open(url).unwrap();
    diesel::sql_query("SELECT author, books, loans FROM author_stats ORDER BY author")
        .load::<Row>(&mut *store.connection().unwrap())
        .unwrap()
        .into_iter()
        .map(|r| (r.author, r.books, r.loans))
        .collect()
}

#[test]
fn json_of_admin_status_stream_and_tail_from_the_app() {
    for db in migrated() {
        let status: Value =
            serde_json::from_str(&ok(db.url(), &["admin", "status", "--json"])).unwrap();
        assert!(status["head"].as_i64().unwrap() >= 3, "{status}");
        let names: Vec<&str> = status["projections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["author_stats", "book_list", "readers"]);
        for (args, lines) in [
            (&["admin", "stream", "book-1", "--json"][..], 2),
            (&["admin", "tail", "-n", "3", "--json"], 3),
        ] {
            let out = ok(db.url(), args);
            let events: Vec<Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
                .collect();
            assert_eq!(events.len(), lines, "{args:?}: {out}");
            assert!(events.iter().all(|e| e["payload"].is_object()), "{out}");
        }
    }
}
