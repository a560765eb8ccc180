//! Opening stores: files set up by several processes at once, and servers
//! that never answer.

use es_diesel::testing::TestDatabase;
use es_diesel::{EventStore, SqliteSync, StoreOptions};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Set in the child processes of `two_processes_open_new_files_at_once`:
/// the directory both work in.
const RACE_DIR: &str = "ES_TEST_OPEN_RACE_DIR";
/// The child's number, 0 or 1.
const RACE_CHILD: &str = "ES_TEST_OPEN_RACE_CHILD";
const RACE_FILES: usize = 80;
/// Of these files, every `MIGRATE_EVERY`th is also migrated by both at once.
const MIGRATE_EVERY: usize = 4;
/// Connections each process opens on each file at once.
const OPENS_PER_PROCESS: usize = 3;

/// Two processes open the same new SQLite file at the same moment, 80 times:
/// one of them switches the file to WAL while the other tries to, which
/// SQLite answers with "database is locked" without waiting.
#[test]
fn two_processes_open_new_files_at_once() {
    if let Ok(dir) = std::env::var(RACE_DIR) {
        let me: usize = std::env::var(RACE_CHILD).unwrap().parse().unwrap();
        race_child(Path::new(&dir), me);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..2)
        .map(|me| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "two_processes_open_new_files_at_once",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(RACE_DIR, dir.path())
                .env(RACE_CHILD, me.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut report = String::new();
    let mut failed = false;
    for (me, child) in children.iter_mut().enumerate() {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        failed |= status.is_none_or(|s| !s.success());
        report.push_str(&format!("child {me}: {status:?}\n{err}\n"));
    }
    assert!(!failed, "{report}");
}

fn race_child(dir: &Path, me: usize) {
    let marker = |i: usize, who: usize| dir.join(format!("ready-{i}-{who}"));
    let mut failures = Vec::new();
    for i in 0..RACE_FILES {
        std::fs::write(marker(i, me), b"").unwrap();
        let other = marker(i, 1 - me);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !other.exists() {
            assert!(
                Instant::now() < deadline,
                "the other process never reached file {i}"
            );
            std::thread::yield_now();
        }
        let path: PathBuf = dir.join(format!("events-{i}.db"));
        let opens: Vec<_> = (0..OPENS_PER_PROCESS)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let options = StoreOptions {
                        pool_size: 1,
                        busy_timeout: Duration::from_secs(10),
                        sqlite_sync: SqliteSync::Off,
                        ..StoreOptions::default()
                    };
                    let store = EventStore::open_with(path.to_str().unwrap(), options)?;
                    if i % MIGRATE_EVERY == 0 {
                        store.migrate()?;
                    }
                    Ok::<_, es_diesel::Error>(())
                })
            })
            .collect();
        for open in opens {
            if let Err(e) = open.join().unwrap() {
                failures.push(format!("file {i}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} opens failed:\n{}",
        failures.len(),
        RACE_FILES * OPENS_PER_PROCESS,
        failures.join("\n")
    );
}

/// Accepts connections on 127.0.0.1 and, while `forward` is set, relays them
/// to `upstream`; otherwise holds them open without ever answering.
struct Proxy {
    port: u16,
    forward: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: Option<String>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let forward = Arc::new(AtomicBool::new(upstream.is_some()));
        let relay = forward.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                match &upstream {
                    Some(upstream) if relay.load(Ordering::SeqCst) => {
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    _ => held.push(client),
                }
            }
        });
        Proxy { port, forward }
    }
}

/// Runs `f` on a thread of its own; fails the test if it takes longer than
/// `limit` instead of hanging the suite.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} still blocked after {limit:?}"))
}

#[test]
fn open_gives_up_on_a_server_that_never_answers() {
    let proxy = Proxy::start(None);
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    let started = Instant::now();
    let result = within(
        Duration::from_secs(15),
        "EventStore::open_with",
        move || {
            EventStore::open_with(
                &url,
                StoreOptions {
                    connection_timeout: Duration::from_secs(2),
                    ..StoreOptions::default()
                },
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        },
    );
    let err = result.expect_err("opened a store on a server that never answers");
    assert!(err.contains("timeout"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(1), "{err}");
}

/// A pooled connection opened while the server hangs gives up too, so the
/// pool's connecting threads are not lost and it recovers with the server.
#[test]
fn pool_checkouts_recover_after_the_server_hung() {
    let Some(db) = TestDatabase::postgres() else {
        return;
    };
    let url = db.url().to_owned();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (user, host) = authority.rsplit_once('@').unwrap_or(("", authority));
    let upstream = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let proxy = Proxy::start(Some(upstream));
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    let proxied = format!("{scheme}://{user}127.0.0.1:{}/{path}", proxy.port);
    let store = EventStore::open_with(
        &proxied,
        StoreOptions {
            pool_size: 2,
            connection_timeout: Duration::from_secs(2),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.migrate().unwrap();

    proxy.forward.store(false, Ordering::SeqCst);
    let hung = store.clone();
    within(
        Duration::from_secs(15),
        "checkouts while the server hangs",
        move || {
            let first = hung.connection();
            let second = hung.connection();
            assert!(
                first.is_err() || second.is_err(),
                "two connections while the server hangs"
            );
        },
    );

    proxy.forward.store(true, Ordering::SeqCst);
    let store2 = store.clone();
    within(
        Duration::from_secs(30),
        "checkouts after the server recovered",
        move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let both = store2
                    .connection()
                    .and_then(|a| Ok((a, store2.connection()?)));
                match both {
                    Ok(_) => return,
                    Err(e) if Instant::now() > deadline => {
                        panic!("the pool never recovered: {e}")
                    }
                    Err(_) => {}
                }
            }
        },
    );
}
