//! The served app in a real browser: headless Chromium driven through
//! WebDriver (chromedriver). Registers a reader and a book, borrows it,
//! sees the list change, a refusal with its reason, `BookBorrowed` in the
//! event browser with its payload, a rebuild started from the browser and
//! its report, and a new event arriving in the live tail. Screenshots of the
//! main pages go to `target/screenshots/`.
//!
//! Runs on SQLite, and on PostgreSQL when `ES_TEST_POSTGRES_URL` is set.
//! Skipped, with a message, when `chromium` or `chromedriver` is missing,
//! unless `ES_TEST_REQUIRE_ALL=1`, which makes that a failure.

use es_diesel::testing::TestDatabase;
use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Kills the child when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `library serve` on `url`, and the address it serves.
fn serve(url: &str) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_library"))
        .args(["--database-url", url, "serve", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start library serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("its first line");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (Running(child), format!("http://{addr}"))
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).expect("create target/screenshots");
    dir
}

struct Browser {
    client: Client,
    base: String,
    shots: PathBuf,
    prefix: String,
}

impl Browser {
    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until the element's text contains `want`.
    async fn wait_text(&self, css: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text(css).await;
            if text.contains(want) {
                return text;
            }
            if Instant::now() > deadline {
                let page = self.client.source().await.unwrap_or_default();
                panic!("{css} never showed {want:?}; it shows {text:?}\npage:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the page's address contains `want`: after a form
    /// submit, the old page still matches the elements looked for next.
    async fn wait_url(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = self.client.current_url().await.map(|u| u.to_string());
            if url.as_deref().is_ok_and(|u| u.contains(want)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the address never showed {want:?}: {url:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn fill(&self, css: &str, value: &str) {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        let path = self.shots.join(format!("{}{name}.png", self.prefix));
        std::fs::write(&path, png).expect("save the screenshot");
    }
}

async fn drive(db: &TestDatabase, driver: &str) {
    let (_server, base) = serve(db.url());
    let caps: es_diesel::serde_json::Map<String, es_diesel::serde_json::Value> = es_diesel::serde_json::from_value(es_diesel::serde_json::json!({
        "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars", "--lang=en-US"]
        }
    }))
    .unwrap();
    let client = ClientBuilder::native()
        .capabilities(caps)
        .connect(driver)
        .await
        .expect("a WebDriver session");
    let b = Browser {
        client,
        base,
        shots: screenshots(),
        prefix: match db.backend() {
            es_diesel::Backend::Sqlite => String::new(),
            other => format!("{other}-").to_lowercase(),
        },
    };

    // Register a reader and a book.
    b.goto("/").await;
    b.wait_text("h1", "Catalogue").await;
    b.fill("#register-reader input[name=user_id]", "8").await;
    b.fill("#register-reader input[name=name]", "Grace").await;
    b.click("#register-reader button").await;
    b.wait_text("#flash", "Grace (reader 8) has a library card")
        .await;
    b.fill("#register-book input[name=book_id]", "1").await;
    b.fill("#register-book input[name=title]", "Dune").await;
    b.fill("#register-book input[name=author]", "Frank Herbert")
        .await;
    b.click("#register-book button").await;
    b.wait_text("#flash", "Registered book 1").await;
    b.wait_text("#book-1", "on the shelf").await;
    b.click("#import button").await;
    b.wait_text("#flash", "Imported legacy_books: 3 new event(s)")
        .await;

    // Log in and borrow: the list changes.
    b.fill("#login input[name=user_id]", "8").await;
    b.click("#login button").await;
    b.wait_text("#me", "Grace").await;
    b.click("#borrow-1").await;
    b.wait_text("#flash", "Reader 8 borrowed book 1").await;
    let row = b.wait_text("#book-1", "borrowed").await;
    assert!(row.contains("by Grace"), "{row}");
    b.shot("catalogue").await;

    // Another reader's borrow of the same book is refused, with its reason.
    b.fill("#register-reader input[name=user_id]", "9").await;
    b.fill("#register-reader input[name=name]", "Ada").await;
    b.click("#register-reader button").await;
    b.wait_text("#flash", "Ada (reader 9)").await;
    b.click("header form[action='/logout'] button").await;
    b.wait_text("#flash", "Logged out").await;
    b.fill("#login input[name=user_id]", "9").await;
    b.click("#login button").await;
    b.wait_text("#me", "Ada").await;
    b.click("#borrow-1").await;
    let refusal = b
        .wait_text("#flash", "Refused: book 1 is already borrowed by user 8")
        .await;
    assert!(refusal.contains("Nothing was written"), "{refusal}");
    b.shot("refused").await;

    // The book's page: its history from the log.
    b.goto("/books/1").await;
    b.wait_text("h1", "Dune").await;
    let history = b.wait_text("#history", "BookBorrowed").await;
    assert!(
        history.contains("BookRegistered") && history.contains("user-8"),
        "{history}"
    );
    b.shot("book").await;

    // The event browser: BookBorrowed with its payload.
    b.click("nav a[href='/admin/events']").await;
    b.wait_text("h1", "Log").await;
    b.fill("input[name=type]", "BookBorrowed").await;
    b.click("form.filters button[type=submit]").await;
    b.wait_url("type=BookBorrowed").await;
    let log = b.wait_text("table.events", "BookBorrowed").await;
    assert!(
        log.contains("\"user_id\": 8") && log.contains("\"book_id\": 1"),
        "{log}"
    );
    assert!(!log.contains("BookRegistered"), "filtered by type: {log}");
    b.goto("/admin/events").await;
    b.wait_text("table.events", "BookImported").await;
    b.shot("events-log").await;
    b.click("table.events td.pos a").await;
    b.wait_text("h1", "Event #").await;
    b.shot("events-event").await;
    b.goto("/admin/events/types").await;
    b.wait_text("table.types", "book_borrowed").await;
    b.shot("events-types").await;

    // A rebuild from the browser, and its report.
    b.goto("/admin/events/read-models").await;
    b.wait_text("#rm-book_list", "book_list").await;
    b.click("#rm-book_list form[action$='/rebuild'] button")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = b.text("table.models").await;
        if text.contains("rebuilt") {
            assert!(text.contains("4 rows"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no rebuild report: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.goto("/admin/events/read-models").await;
    }
    b.wait_text("#rm-author_stats", "author_stats").await;
    b.shot("events-read-models").await;

    // The live tail: an event committed now appears without a reload.
    b.goto("/admin/events/tail").await;
    b.wait_text("#tail-status", "live").await;
    let out = Command::new(env!("CARGO_BIN_EXE_library"))
        .args(["--database-url", db.url(), "return", "1", "8"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run library return");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait_text("#tail", "BookReturned").await;
    b.shot("events-tail").await;

    b.client.close().await.expect("end the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_and_its_event_browser_in_chromium() {
    let chromium = find(&["chromium", "chromium-browser", "google-chrome"]);
    let driver = find(&["chromedriver"]);
    if chromium.is_none() || driver.is_none() {
        let why = "chromium or chromedriver is missing (Debian: apt-get install chromium chromium-driver)";
        if std::env::var("ES_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
            panic!("ES_TEST_REQUIRE_ALL=1 but {why}");
        }
        eprintln!("SKIPPED: browser test: {why}");
        return;
    }
    let port = free_port();
    let _driver = Running(
        Command::new(driver.unwrap())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dbs = vec![TestDatabase::sqlite()];
    dbs.extend(TestDatabase::postgres());
    for db in &dbs {
        drive(db, &url).await;
    }
}
