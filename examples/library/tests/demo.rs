//! The demo end to end, as a user runs it, on every backend.

use es_diesel::testing::TestDatabase;
use std::process::Command;

fn run(url: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_library"))
        .args(args)
        .arg("--database-url")
        .arg(url)
        .output()
        .expect("run the library binary");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_demo_runs_twice_and_the_pages_follow_the_events() {
    for db in TestDatabase::all() {
        let first = run(db.url(), &[]);
        assert!(
            first.contains("imported legacy_books: 3 new event(s)"),
            "{first}"
        );
        assert!(first.contains("user 7 borrowed book 1"), "{first}");
        assert!(
            first.contains("refused: user 99 has no library card"),
            "{first}"
        );
        assert!(
            first.contains("refused: book 102 is already borrowed by user 7"),
            "{first}"
        );
        assert!(
            first.contains("Italo Calvino          1 book(s), 1 loan(s)"),
            "{}: async read model\n{first}",
            db.backend()
        );

        let second = run(db.url(), &[]);
        assert!(
            second.contains("imported legacy_books: 0 new event(s), 3 already there"),
            "{second}"
        );
        assert!(second.contains("user 7 returned book 1"), "{second}");
        // Book 102 came over from the old app as lent to reader 7.
        assert!(first.contains("reader 7 Ada: 3 book(s) out"), "{first}");
        assert!(second.contains("reader 7 Ada: 1 book(s) out"), "{second}");

        assert!(
            first.contains("Try next:") && first.contains("admin status"),
            "{first}"
        );
        run(db.url(), &["register-user", "42", "Grace"]);
        assert!(run(db.url(), &["borrow", "3", "42"]).contains("user 42 borrowed book 3"));
        let list = run(db.url(), &["list"]);
        assert!(
            list.lines()
                .any(|l| l.contains("Kindred") && l.contains("with user 42")),
            "{list}"
        );
        let view = run(db.url(), &["view", "3"]);
        assert!(
            view.contains("borrowed 1 time(s)") && view.contains("by user-42"),
            "{view}"
        );
        let status = run(db.url(), &["admin", "status"]);
        assert!(
            status.contains("book_list") && status.contains("author_stats"),
            "{status}"
        );
        let rebuilt = Command::new(env!("CARGO_BIN_EXE_library"))
            .args(["admin", "rebuild", "book_list", "--database-url", db.url()])
            .output()
            .unwrap();
        assert!(rebuilt.status.success());
        let summary = String::from_utf8_lossy(&rebuilt.stdout);
        assert!(
            summary.contains("rebuilt book_list") && summary.contains("events/s)"),
            "{summary}"
        );
        // Off a terminal there is no progress bar, only the summary.
        assert!(
            rebuilt.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&rebuilt.stderr)
        );
        assert_eq!(
            run(db.url(), &["list"]),
            list,
            "a rebuilt read model equals the inline one"
        );
    }
}

/// `admin work` stops on SIGTERM and SIGINT: the runners finish their batch,
/// release their leases and the process exits with success, so another
/// worker can take over at once.
#[cfg(unix)]
#[test]
fn admin_work_stops_cleanly_on_sigterm_and_sigint() {
    use es_diesel::EventStore;
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    for db in TestDatabase::all() {
        run(db.url(), &["admin", "migrate"]);
        run(db.url(), &["register-book", "1", "Dune", "Frank Herbert"]);
        let store = EventStore::open(db.url()).unwrap();
        let author_stats = || {
            store
                .projection_status()
                .unwrap()
                .into_iter()
                .find(|s| s.name == "author_stats")
        };
        for signal in ["TERM", "INT"] {
            let mut worker = Command::new(env!("CARGO_BIN_EXE_library"))
                .args(["admin", "work", "--database-url", db.url()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the worker");
            let mut stdout = BufReader::new(worker.stdout.take().unwrap());
            let mut first = String::new();
            stdout.read_line(&mut first).unwrap();
            assert!(
                first.contains("running the asynchronous read models"),
                "{first}"
            );
            let pid = worker.id();
            wait_until("the worker to hold author_stats", || {
                author_stats().is_some_and(|s| {
                    s.state == "running"
                        && s.holder.is_some_and(|h| h.contains(&format!(":{pid}:")))
                })
            });
            let sent = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
            let mut exit = None;
            wait_until("the worker to exit", || {
                exit = worker.try_wait().unwrap();
                exit.is_some()
            });
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut stderr).unwrap();
            assert!(
                exit.unwrap().success(),
                "{}: SIG{signal}: {:?}\n{rest}\n{stderr}",
                db.backend(),
                exit
            );
            assert!(
                rest.contains("stopped; the read models are released"),
                "{rest}"
            );
            let s = author_stats().unwrap();
            assert_eq!(
                (s.state.as_str(), s.holder, s.lease_expired),
                ("stopped", None, false),
                "{}: SIG{signal}",
                db.backend()
            );
        }
    }
}
