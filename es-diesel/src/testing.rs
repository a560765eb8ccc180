//! Throwaway, isolated databases for tests: a temporary SQLite file, a
//! fresh PostgreSQL schema, or a fresh MySQL database, dropped afterwards.
//! Tests using them can run in parallel.
//!
//! PostgreSQL is used when `ES_TEST_POSTGRES_URL` is set (for example
//! `postgres://postgres@127.0.0.1:5432/test`), MySQL or MariaDB when
//! `ES_TEST_MYSQL_URL` is (for example `mysql://root@127.0.0.1:3306/test`).
//! Without one, its tests are skipped with a message on stderr, unless
//! `ES_TEST_REQUIRE_ALL=1`, which turns a missing URL into a failure.

use crate::backend::Backend;
use crate::{EventStore, StoreOptions};
use diesel::connection::SimpleConnection;
use diesel::{Connection, MysqlConnection, PgConnection};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// The environment variable naming the PostgreSQL server for tests.
pub const POSTGRES_URL_VAR: &str = "ES_TEST_POSTGRES_URL";
/// The environment variable naming the MySQL or MariaDB server for tests.
pub const MYSQL_URL_VAR: &str = "ES_TEST_MYSQL_URL";
/// Set to `1` to fail instead of skipping a backend whose URL is missing.
pub const REQUIRE_ALL_VAR: &str = "ES_TEST_REQUIRE_ALL";

/// One isolated database; removed when dropped.
pub struct TestDatabase {
    url: String,
    backend: Backend,
    cleanup: Cleanup,
}

enum Cleanup {
    File(#[allow(dead_code)] tempfile::TempDir),
    PgSchema { admin_url: String, schema: String },
    MysqlDatabase { admin_url: String, database: String },
}

static SKIP_NOTICE: Once = Once::new();
static MYSQL_SKIP_NOTICE: Once = Once::new();

/// The server URL in `var`, or `None` (with a notice on stderr, once).
/// Panics when it is not set and `ES_TEST_REQUIRE_ALL=1`.
fn server_url(var: &str, example: &str, what: &str, notice: &Once) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if std::env::var(REQUIRE_ALL_VAR).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_ALL_VAR}=1 but {var} is not set: set it to {example}");
            }
            notice.call_once(|| {
                // Written past the test harness's output capture, so it is seen.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "SKIPPED: {what} tests (set {var}={example} to run them)"
                );
            });
            None
        }
    }
}

/// A name no other test database has.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "es_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..8)
            .unwrap_or("0")
    )
}

impl TestDatabase {
    /// A new SQLite file in a temporary directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let path = dir.path().join("events.db");
        TestDatabase {
            url: path.to_string_lossy().into_owned(),
            backend: Backend::Sqlite,
            cleanup: Cleanup::File(dir),
        }
    }

    /// A new schema on the server of `ES_TEST_POSTGRES_URL`, or `None` (with
    /// a notice on stderr) when it is not set. Panics when it is not set and
    /// `ES_TEST_REQUIRE_ALL=1`, or when the server cannot be reached.
    pub fn postgres() -> Option<Self> {
        let admin_url = server_url(
            POSTGRES_URL_VAR,
            "postgres://postgres@127.0.0.1:5432/test",
            "PostgreSQL",
            &SKIP_NOTICE,
        )?;
        let schema = unique_name();
        let mut admin = PgConnection::establish(&admin_url)
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}={admin_url}: {e}"));
        admin
            .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .unwrap_or_else(|e| panic!("cannot create test schema {schema}: {e}"));
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{sep}options=-csearch_path%3D{schema}");
        Some(TestDatabase {
            url,
            backend: Backend::Postgres,
            cleanup: Cleanup::PgSchema { admin_url, schema },
        })
    }

    /// A new database on the server of `ES_TEST_MYSQL_URL` (MySQL or
    /// MariaDB; the URL's user must be allowed to create databases), or
    /// `None` as for [`TestDatabase::postgres`].
    pub fn mysql() -> Option<Self> {
        let admin_url = server_url(
            MYSQL_URL_VAR,
            "mysql://root@127.0.0.1:3306/test",
            "MySQL",
            &MYSQL_SKIP_NOTICE,
        )?;
        let database = unique_name();
        let mut admin = MysqlConnection::establish(&admin_url)
            .unwrap_or_else(|e| panic!("cannot connect to {MYSQL_URL_VAR}={admin_url}: {e}"));
        admin
            .batch_execute(&format!(
                "CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            ))
            .unwrap_or_else(|e| panic!("cannot create test database {database}: {e}"));
        let (base, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url.as_str(), String::new()),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let server = match base[scheme_end..].find('/') {
            Some(slash) => &base[..scheme_end + slash],
            None => base,
        };
        let url = format!("{server}/{database}{query}");
        Some(TestDatabase {
            url,
            backend: Backend::Mysql,
            cleanup: Cleanup::MysqlDatabase {
                admin_url,
                database,
            },
        })
    }

    /// SQLite, plus every other backend whose URL is set.
    pub fn all() -> Vec<Self> {
        let mut dbs = vec![Self::sqlite()];
        dbs.extend(Self::postgres());
        dbs.extend(Self::mysql());
        dbs
    }

    /// Every backend with concurrent writers whose URL is set (PostgreSQL,
    /// MySQL), for the tests of interleavings that SQLite's single writer
    /// rules out.
    pub fn servers() -> Vec<Self> {
        let mut dbs: Vec<Self> = Self::postgres().into_iter().collect();
        dbs.extend(Self::mysql());
        dbs
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens a store on this database and migrates it.
    pub fn store(&self) -> EventStore {
        self.store_with(StoreOptions::default())
    }

    pub fn store_with(&self, options: StoreOptions) -> EventStore {
        let store = EventStore::open_with(&self.url, options)
            .unwrap_or_else(|e| panic!("open {} test store: {e}", self.backend));
        store
            .migrate()
            .unwrap_or_else(|e| panic!("migrate {} test store: {e}", self.backend));
        store
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Cleanup::MysqlDatabase {
            admin_url,
            database,
        } = &self.cleanup
        {
            if let Ok(mut admin) = MysqlConnection::establish(admin_url) {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS `{database}`"));
            }
        }
        if let Cleanup::PgSchema { admin_url, schema } = &self.cleanup {
            if let Ok(mut admin) = PgConnection::establish(admin_url) {
                // With the shadow schemas of rebuilds that did not finish.
                let comment = crate::backend::shadow::schema_comment(schema);
                let _ = admin.batch_execute(&format!(
                    "DO $$ DECLARE s text; BEGIN \
                     FOR s IN SELECT nspname FROM pg_namespace WHERE obj_description(oid, 'pg_namespace') = {comment} LOOP \
                     EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; END $$; \
                     DROP SCHEMA IF EXISTS \"{schema}\" CASCADE",
                    comment = crate::backend::quote_literal(&comment),
                ));
            }
        }
    }
}

/// An event written by hand, for the crate's own unit tests (the derive
/// names the crate from outside).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Wrote;

#[cfg(test)]
impl es_core::Event for Wrote {
    const EVENT_TYPES: &'static [&'static str] = &["Wrote"];
    fn event_type(&self) -> &'static str {
        "Wrote"
    }
    fn event_version(&self) -> u16 {
        1
    }
    fn encode(&self) -> Result<String, es_core::EncodeError> {
        Ok("{}".into())
    }
    fn decode(_: &str, _: u16, _: &str) -> Result<Self, es_core::DecodeError> {
        Ok(Wrote)
    }
}
