//! Connections: one Diesel connection type over every backend, chosen at run
//! time from the database URL, and the r2d2 pool that hands them out.

use super::Backend;
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::mysql::MysqlConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, ConnectionError};
use std::time::Duration;

/// A connection to whichever database the store was opened on.
///
/// Projectors receive it inside the append transaction; it supports Diesel's
/// query DSL for every backend (`diesel::MultiConnection`).
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
    Mysql(MysqlConnection),
}

/// How SQLite makes commits durable (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqliteSync {
    /// Every commit is on disk before append returns (the default: nothing
    /// acknowledged is ever lost, even on power failure).
    Full,
    /// WAL commits survive a crash of the process but the last ones may be
    /// lost on power failure; several times faster for small transactions.
    Normal,
    /// No syncing at all. Only for throwaway databases.
    Off,
}

/// Settings of [`EventStore::open_with`](crate::EventStore::open_with).
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Connections in the pool (an in-memory SQLite database always uses 1).
    pub pool_size: u32,
    /// How long a SQLite writer waits for the write lock before failing
    /// (also the bound on setting up a connection to a file another process
    /// is setting up at the same moment). With
    /// [`queue_sqlite_writers`](Self::queue_sqlite_writers), a writer waits
    /// at most this long for its turn in the queue and then at most this
    /// long for SQLite's lock.
    pub busy_timeout: Duration,
    pub sqlite_sync: SqliteSync,
    /// How long `pool.get()` waits for a free connection, and the bound on
    /// opening a PostgreSQL connection (libpq's `connect_timeout`, in whole
    /// seconds, at least 2, unless the URL sets its own): a server that
    /// accepts the connection but never answers makes
    /// [`EventStore::open`](crate::EventStore::open) fail instead of hang.
    pub connection_timeout: Duration,
    /// Run inline projectors on append (the default). Turn it off for a bulk
    /// load into a store whose read models you rebuild afterwards, or for a
    /// process that only writes events while another keeps the read models.
    pub inline_projectors: bool,
    /// Create the SQLite file when it does not exist (the default). Off, a
    /// missing file is [`Error::DatabaseNotFound`](crate::Error::DatabaseNotFound)
    /// instead of a new empty database: a command that only reads or appends
    /// should not conjure up a store because of a mistyped path.
    pub create_if_missing: bool,
    /// Let this process's writers of a SQLite file wait for its write lock
    /// in a queue, in the order they came, each woken when the write before
    /// it ends (the default),
    /// instead of in SQLite's busy handler, which sleeps and retries: there
    /// a writer that tries at the right moment overtakes those asleep, so
    /// under concurrent writers most appends are quick and some wait for
    /// seconds. The queue bounds that wait at the cost of some throughput
    /// when more threads write than the machine has cores; turn it off for
    /// a batch job that only cares about the total.
    pub queue_sqlite_writers: bool,
    /// Keep in memory the states of aggregates that ask for it with
    /// [`Aggregate::CACHE`](crate::Aggregate::CACHE) (the default). Off,
    /// every command loads its stream, whatever the aggregates ask.
    pub cache_aggregates: bool,
    /// On PostgreSQL, let an append that commits by itself, and whose inline
    /// projectors all take a row and not the envelope, read its rows
    /// without locking them and write its events and rows in one statement,
    /// each row only if no other writer changed it since (the default).
    /// When one did, nothing is written and the append runs in a
    /// transaction that locks its rows, as it does off. It saves a BEGIN, a
    /// COMMIT and a round trip per row.
    pub optimistic_rows: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            pool_size: 8,
            busy_timeout: Duration::from_secs(30),
            sqlite_sync: SqliteSync::Full,
            connection_timeout: Duration::from_secs(30),
            inline_projectors: true,
            create_if_missing: true,
            queue_sqlite_writers: true,
            cache_aggregates: true,
            optimistic_rows: true,
        }
    }
}

/// Where a database URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Postgres(String),
    Mysql(String),
    Sqlite { path: String, memory: bool },
}

impl Target {
    /// An in-memory database, which lives and dies with its one connection.
    pub(crate) fn is_memory(&self) -> bool {
        matches!(self, Target::Sqlite { memory: true, .. })
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Target::Postgres(_) => Backend::Postgres,
            Target::Mysql(_) => Backend::Mysql,
            Target::Sqlite { .. } => Backend::Sqlite,
        }
    }

    /// Connections in the pool: an in-memory SQLite database lives in its
    /// one connection.
    pub(crate) fn pool_size(&self, options: &StoreOptions) -> u32 {
        match self {
            Target::Sqlite { memory: true, .. } => 1,
            _ => options.pool_size.max(1),
        }
    }

    /// The file a SQLite target opens, if it is one (not `:memory:`).
    pub(crate) fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        let Target::Sqlite {
            path,
            memory: false,
        } = self
        else {
            return None;
        };
        let Some(uri) = path.strip_prefix("file:") else {
            return Some(path.into());
        };
        // A SQLite URI: file:name?query, file:///abs/path, file://localhost/abs/path.
        let uri = uri.split(['?', '#']).next().unwrap_or("");
        let file = match uri.strip_prefix("//") {
            Some(rest) => &rest[rest.find('/').unwrap_or(rest.len())..],
            None => uri,
        };
        Some(percent_decoded(file))
    }
}

/// A SQLite URI's path with its `%HH` escapes decoded, as SQLite decodes it.
fn percent_decoded(path: &str) -> std::path::PathBuf {
    let bytes = path.as_bytes();
    let hex = |b: &u8| (*b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        std::ffi::OsString::from_vec(out).into()
    }
    #[cfg(not(unix))]
    {
        String::from_utf8_lossy(&out).into_owned().into()
    }
}

/// Where the store is, for messages: the SQLite file, or the PostgreSQL or
/// MySQL database and host (never the password).
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sqlite { memory: true, .. } => f.write_str("the in-memory SQLite database"),
            Target::Sqlite { .. } => {
                let file = self.sqlite_file().unwrap_or_default();
                write!(f, "the SQLite database `{}`", file.display())
            }
            Target::Postgres(url) | Target::Mysql(url) => {
                let server = if matches!(self, Target::Mysql(_)) {
                    "MySQL"
                } else {
                    "PostgreSQL"
                };
                let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                let authority = authority.split('?').next().unwrap_or("");
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                let host = if host.is_empty() { "localhost" } else { host };
                let db = path.split('?').next().unwrap_or("");
                if db.is_empty() {
                    write!(f, "the {server} server at {host}")
                } else {
                    write!(f, "the {server} database `{db}` at {host}")
                }
            }
        }
    }
}

pub(crate) fn parse_url(url: &str) -> Result<Target, ConnectionError> {
    let url = url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres(url.to_owned()));
    }
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let rest = url.split_once("://").map_or("", |(_, r)| r);
        return Ok(Target::Mysql(format!("mysql://{rest}")));
    }
    if let Some(scheme) = url.split_once("://").map(|(s, _)| s) {
        if scheme != "sqlite" && scheme != "file" {
            return Err(ConnectionError::InvalidConnectionUrl(format!(
                "unsupported database URL scheme `{scheme}://`; use postgres://user@host/db, mysql://user@host/db, or a SQLite file path such as library.db or sqlite://library.db, or :memory:"
            )));
        }
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if path.is_empty() {
        return Err(ConnectionError::InvalidConnectionUrl(
            "empty database URL; give a SQLite file path such as library.db, :memory:, postgres://user@host/db or mysql://user@host/db".into(),
        ));
    }
    let memory = path == ":memory:" || path.contains("mode=memory");
    Ok(Target::Sqlite {
        path: path.to_owned(),
        memory,
    })
}

/// Opens connections for the pool and prepares each one (SQLite pragmas).
/// Opaque: it appears in [`PooledConnection`](crate::PooledConnection).
#[derive(Clone, Debug)]
pub struct Manager {
    pub(crate) target: Target,
    pub(crate) options: StoreOptions,
}

impl Manager {
    /// A new connection; errors name the database they are about.
    pub(crate) fn establish(&self) -> Result<DbConnection, ConnectionError> {
        self.connect_to_target()
            .map_err(|e| ConnectionError::BadConnection(format!("{}: {e}", self.target)))
    }

    fn connect_to_target(&self) -> Result<DbConnection, ConnectionError> {
        match &self.target {
            Target::Postgres(url) => {
                let url = with_connect_timeout(url, self.options.connection_timeout);
                let mut conn = PgConnection::establish(&url)?;
                conn.batch_execute("SET client_min_messages = warning")
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Postgres(conn))
            }
            Target::Mysql(url) => {
                let mut conn = MysqlConnection::establish(url)?;
                conn.batch_execute(super::mysql::SESSION_SETUP)
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Mysql(conn))
            }
            Target::Sqlite { path, memory } => {
                let mut conn = SqliteConnection::establish(path)?;
                let sync = match self.options.sqlite_sync {
                    SqliteSync::Full => "FULL",
                    SqliteSync::Normal => "NORMAL",
                    SqliteSync::Off => "OFF",
                };
                let journal = if *memory { "MEMORY" } else { "WAL" };
                // `recursive_triggers` makes the row deletions of `INSERT OR
                // REPLACE` fire the log's delete trigger.
                let setup = format!(
                    "PRAGMA busy_timeout = {}; PRAGMA journal_mode = {journal}; PRAGMA synchronous = {sync}; \
                     PRAGMA foreign_keys = ON; PRAGMA recursive_triggers = ON;",
                    self.options.busy_timeout.as_millis()
                );
                retry_while_busy(self.options.busy_timeout, || conn.batch_execute(&setup))
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                retry_while_busy(self.options.busy_timeout, || {
                    super::sqlite::guard_unmigrated_versions(&mut conn)
                })
                .map_err(ConnectionError::CouldntSetupConfiguration)?;
                let queued = self.options.queue_sqlite_writers && !*memory;
                if let (true, Some(file)) = (queued, self.target.sqlite_file()) {
                    super::writer_queue::install(
                        &mut conn,
                        super::writer_queue::WriterQueue::of_file(&file),
                        self.options.busy_timeout,
                    );
                }
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }
}

impl Manager {
    /// A connection of its own on which a runner waits for appends, where
    /// the backend lets it watch the log cheaply (PostgreSQL); `None`
    /// otherwise or when it cannot be opened.
    pub(crate) fn listen(&self) -> Option<Listener> {
        match self.establish().ok()? {
            DbConnection::Postgres(mut c) => {
                // Only a hint since migration 10: the store no longer
                // NOTIFYs, but an application may.
                diesel::RunQueryDsl::execute(diesel::sql_query("LISTEN es_events"), &mut c).ok()?;
                Some(Listener(c))
            }
            DbConnection::Sqlite(_) | DbConnection::Mysql(_) => None,
        }
    }
}

/// Where the log stood when a runner last read it: the follow horizon and
/// the next order key (see [`crate::follow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogMark {
    horizon: i64,
    next_key: i64,
}

/// A connection that watches the log for appends.
///
/// A NOTIFY in the append transaction would take PostgreSQL's global
/// notify lock at commit and hold it through the commit's flush, so that
/// appending transactions, even to different streams, would commit one
/// at a time. Instead a waiting runner looks at the order-key sequence (a
/// read of one row, no lock): no key drawn since its last read means no
/// new event. Once a key was drawn it waits for the horizon to pass the
/// one it read below, which is when a read can return more.
pub(crate) struct Listener(PgConnection);

#[derive(diesel::QueryableByName)]
struct MarkRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    horizon: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    next_key: i64,
}

#[derive(diesel::QueryableByName)]
struct NextKey {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    next_key: i64,
}

const NEXT_KEY: &str =
    "SELECT last_value + CASE WHEN is_called THEN 1 ELSE 0 END AS next_key FROM es_order_keys";

impl Listener {
    /// Takes every announcement that arrived: whether there was any, and
    /// the error if the connection broke.
    pub(crate) fn drain(&mut self) -> (bool, Option<diesel::result::Error>) {
        let mut woken = false;
        let mut broken = None;
        for n in self.0.notifications_iter() {
            match n {
                Ok(_) => woken = true,
                Err(e) => broken = Some(e),
            }
        }
        (woken, broken)
    }

    /// The log's mark now, to be taken before a read; `None` while an
    /// append is between announcing itself and publishing its key.
    pub(crate) fn mark(&mut self) -> diesel::QueryResult<Option<LogMark>> {
        // The horizon first: the sequence read after it is at least the
        // bound the horizon was computed from.
        let row: MarkRow = diesel::RunQueryDsl::get_result(
            diesel::sql_query(format!(
                "SELECT es_follow_horizon() AS horizon, ({NEXT_KEY}) AS next_key"
            )),
            &mut self.0,
        )?;
        Ok(row.horizon.map(|horizon| LogMark {
            horizon,
            next_key: row.next_key,
        }))
    }

    /// Whether a read now may return events that a read after `mark` did
    /// not: the horizon moved past it. While nothing was in flight at the
    /// mark and no key has been drawn since, one read of the sequence says
    /// no.
    pub(crate) fn moved_since(&mut self, mark: Option<LogMark>) -> diesel::QueryResult<bool> {
        if let Some(m) = mark {
            if m.horizon == m.next_key {
                let now: NextKey =
                    diesel::RunQueryDsl::get_result(diesel::sql_query(NEXT_KEY), &mut self.0)?;
                if now.next_key == m.next_key {
                    return Ok(false);
                }
            }
        }
        Ok(match (self.mark()?, mark) {
            (Some(now), Some(then)) => now.horizon > then.horizon,
            (Some(_), None) => true,
            (None, _) => false,
        })
    }
}

/// Runs `f` again, after short sleeps, while SQLite answers "database is
/// locked", for up to `timeout`. Switching a new file to WAL needs an
/// exclusive lock and fails at once, without calling the busy handler, when
/// another connection is setting up the same file.
fn retry_while_busy(
    timeout: Duration,
    mut f: impl FnMut() -> diesel::QueryResult<()>,
) -> diesel::QueryResult<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match f() {
            Err(diesel::result::Error::DatabaseError(_, info))
                if is_busy(info.message()) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn is_busy(message: &str) -> bool {
    message.contains("database is locked") || message.contains("is busy")
}

/// `url` with libpq's `connect_timeout` set from `timeout`, unless the URL
/// sets one. Without it, a server that accepts the TCP connection but never
/// answers blocks the connecting thread for ever. libpq counts whole seconds
/// and treats anything below 2 as 2 (and 0 as no limit).
pub(crate) fn with_connect_timeout(url: &str, timeout: Duration) -> String {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if query
        .split('&')
        .any(|pair| pair.split('=').next() == Some("connect_timeout"))
    {
        return url.to_owned();
    }
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    let sep = if !url.contains('?') {
        "?"
    } else if url.ends_with('?') || url.ends_with('&') {
        ""
    } else {
        "&"
    };
    format!("{url}{sep}connect_timeout={}", secs.max(2))
}

impl r2d2::ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = ConnectionError;

    fn connect(&self) -> Result<DbConnection, ConnectionError> {
        self.establish()
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), ConnectionError> {
        conn.ping()
            .map_err(ConnectionError::CouldntSetupConfiguration)
    }

    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        // Diesel knows a broken transaction, not a closed socket: a
        // connection whose server went away (restarted, `wait_timeout`, a
        // KILL) would go back to the pool and fail every checkout after.
        let lost = CONNECTION_LOST.with(|lost| lost.replace(false));
        lost || conn.is_broken()
    }
}

thread_local! {
    /// Set when a statement on this thread failed because the connection
    /// to the server was lost; read when the thread's pooled connection
    /// goes back to the pool (another connection of the thread may have
    /// failed instead: then a healthy one is replaced, which costs a
    /// reconnect, nothing else).
    static CONNECTION_LOST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Notes a lost connection, so that the pool drops it instead of handing
/// it out again. Called for every database error the store converts.
pub(crate) fn note_if_connection_lost(e: &diesel::result::Error) {
    use diesel::result::{DatabaseErrorKind, Error as E};
    let lost = match e {
        E::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => true,
        E::DatabaseError(_, info) => {
            let m = info.message().to_ascii_lowercase();
            // MySQL's CR_SERVER_GONE_ERROR and CR_SERVER_LOST; libpq's.
            m.contains("server has gone away")
                || m.contains("lost connection to")
                // MySQL closes the connection after refusing a statement
                // larger than `max_allowed_packet`.
                || m.contains("max_allowed_packet")
                || m.contains("server closed the connection")
                || m.contains("no connection to the server")
                || m.contains("terminating connection")
        }
        _ => false,
    };
    if lost {
        CONNECTION_LOST.with(|flag| flag.set(true));
    }
}

/// The turn to write on a SQLite connection outside a transaction (a
/// statement that commits by itself), for as long as it is held: see
/// `writer_queue`. `None` elsewhere, and inside a transaction, whose own
/// turn was taken when it began (by [`write_transaction`]) or is left to
/// SQLite's busy handler (a transaction of the application's).
pub(crate) fn statement_turn(conn: &mut DbConnection) -> Option<super::Turn> {
    // A broken transaction manager counts as inside a transaction: no
    // turn, and the statement fails as it would have.
    if in_transaction(conn).unwrap_or(true) {
        return None;
    }
    match conn {
        DbConnection::Sqlite(c) => super::writer_queue::turn(c),
        _ => None,
    }
}

/// Whether `conn` is inside a transaction.
pub(crate) fn in_transaction(conn: &mut DbConnection) -> diesel::QueryResult<bool> {
    type Tm = <DbConnection as Connection>::TransactionManager;
    Ok(Tm::transaction_manager_status_mut(conn)
        .transaction_depth()?
        .is_some())
}

/// Runs `f` in a write transaction: `BEGIN IMMEDIATE` on SQLite, so that
/// concurrent writers queue for the lock (honouring the busy timeout)
/// instead of failing with "database is locked" at their first write. Inside
/// an open transaction it nests as a savepoint.
pub fn write_transaction<T, E>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    type Tm = <DbConnection as Connection>::TransactionManager;
    let nested = in_transaction(conn)?;
    // Held until the transaction has ended (see `writer_queue`).
    let _turn;
    match conn {
        DbConnection::Sqlite(c) if !nested => {
            _turn = super::writer_queue::turn(c);
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?
        }
        // The store's reasoning (appends, followers) assumes each statement
        // sees what committed before it, whatever the server's default.
        DbConnection::Postgres(c) if !nested => AnsiTransactionManager::begin_transaction_sql(
            c,
            "BEGIN ISOLATION LEVEL READ COMMITTED",
        )?,
        // Every MySQL session reads committed (see `mysql::SESSION_SETUP`).
        DbConnection::Mysql(_) if !nested => mysql_transaction_statement(conn, MysqlTx::Begin)?,
        _ => Tm::begin_transaction(conn)?,
    }
    // A failed commit is rolled back here: Diesel's own `commit_transaction`
    // rolls back what it failed to commit (a transaction or a savepoint)
    // itself, so rolling back again would end the level above.
    let commit = |conn: &mut DbConnection| {
        if mysql_top_level(conn)? {
            let committed = mysql_transaction_statement(conn, MysqlTx::Commit);
            if committed.is_err() {
                let _ = mysql_transaction_statement(conn, MysqlTx::Rollback);
            }
            committed
        } else {
            Tm::commit_transaction(conn)
        }
    };
    match f(conn) {
        Ok(value) => commit(conn).map(|()| value).map_err(Into::into),
        Err(err) => {
            let rolled_back = if mysql_top_level(conn)? {
                mysql_transaction_statement(conn, MysqlTx::Rollback)
            } else {
                Tm::rollback_transaction(conn)
            };
            match rolled_back {
                Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => {}
                Err(rollback_err) => return Err(rollback_err.into()),
            }
            Err(err)
        }
    }
}

/// Whether `conn` is a MySQL connection in a transaction without
/// savepoints, which [`mysql_transaction_statement`] ends. Asked when the
/// transaction ends, not when it began: Diesel's handling of a failed
/// savepoint (MySQL rolls the whole transaction back on a deadlock) may
/// leave another depth.
fn mysql_top_level(conn: &mut DbConnection) -> diesel::QueryResult<bool> {
    type Tm = <DbConnection as Connection>::TransactionManager;
    Ok(matches!(conn, DbConnection::Mysql(_))
        && Tm::transaction_manager_status_mut(conn)
            .transaction_depth()?
            .is_some_and(|d| d.get() == 1))
}

/// A top-level transaction statement on MySQL.
#[derive(Clone, Copy)]
enum MysqlTx {
    Begin,
    Commit,
    Rollback,
}

/// Runs `BEGIN`, `COMMIT` or `ROLLBACK` on a MySQL connection outside any
/// savepoint, as a prepared statement, and keeps Diesel's transaction
/// depth in step. Diesel sends them with `batch_execute`, which on MySQL
/// switches the session's multi-statement mode on before the statement and
/// off after it: three round trips each where one does (a command with an
/// inline projector spent six of its eleven round trips there).
///
/// A statement that fails leaves the depth as it was, as Diesel does: a
/// failed `COMMIT` is followed by a rollback, and a failed `ROLLBACK`
/// (the connection is gone) is Diesel's broken-transaction case, which
/// the pool discards.
fn mysql_transaction_statement(conn: &mut DbConnection, tx: MysqlTx) -> diesel::QueryResult<()> {
    use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
    struct Begin;
    struct Commit;
    struct Rollback;
    let (ran, change) = match tx {
        MysqlTx::Begin => (
            super::Stmt::new("BEGIN").named::<Begin>().execute(conn),
            TransactionDepthChange::IncreaseDepth,
        ),
        MysqlTx::Commit => (
            super::Stmt::new("COMMIT").named::<Commit>().execute(conn),
            TransactionDepthChange::DecreaseDepth,
        ),
        MysqlTx::Rollback => (
            super::Stmt::new("ROLLBACK")
                .named::<Rollback>()
                .execute(conn),
            TransactionDepthChange::DecreaseDepth,
        ),
    };
    let DbConnection::Mysql(c) = conn else {
        unreachable!("a MySQL transaction statement on another backend")
    };
    match ran {
        Ok(_) => match AnsiTransactionManager::transaction_manager_status_mut(c) {
            TransactionManagerStatus::Valid(status) => {
                match status.change_transaction_depth(change) {
                    // The transaction is over either way (Diesel tolerates the
                    // same after a top-level COMMIT or ROLLBACK).
                    Err(diesel::result::Error::NotInTransaction)
                        if !matches!(tx, MysqlTx::Begin) =>
                    {
                        Ok(())
                    }
                    other => other,
                }
            }
            TransactionManagerStatus::InError => {
                Err(diesel::result::Error::BrokenTransactionManager)
            }
        },
        Err(e) => {
            if let MysqlTx::Rollback = tx {
                AnsiTransactionManager::transaction_manager_status_mut(c).set_in_error();
            }
            Err(e)
        }
    }
}

/// Runs `f` in a read-only transaction that sees one snapshot of the
/// database throughout (REPEATABLE READ on PostgreSQL; any SQLite
/// transaction reads one snapshot).
pub(crate) fn read_only_snapshot<T, E>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    type Tm = <DbConnection as Connection>::TransactionManager;
    match conn {
        DbConnection::Postgres(c) => AnsiTransactionManager::begin_transaction_sql(
            c,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )?,
        DbConnection::Mysql(c) => AnsiTransactionManager::begin_transaction_sql(
            c,
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; START TRANSACTION WITH CONSISTENT SNAPSHOT",
        )?,
        DbConnection::Sqlite(_) => Tm::begin_transaction(conn)?,
    }
    let result = f(conn);
    match &result {
        Ok(_) => Tm::commit_transaction(conn)?,
        Err(_) => {
            let _ = Tm::rollback_transaction(conn);
        }
    }
    result
}

/// Runs `f` in a transaction that writes only tables private to the
/// connection (a rebuild's shadow): on SQLite a deferred one, a read
/// snapshot that takes no write lock (a TEMP table needs none), so appends
/// go on; elsewhere a [`write_transaction`] (MySQL's TEMPORARY tables take
/// no lock that appends wait for).
pub(crate) fn private_write_transaction<T, E>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    match conn {
        DbConnection::Sqlite(_) => conn.transaction(f),
        DbConnection::Postgres(_) | DbConnection::Mysql(_) => write_transaction(conn, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("postgres://u@h/db").unwrap(),
            Target::Postgres("postgres://u@h/db".into())
        );
        assert_eq!(
            parse_url("library.db").unwrap(),
            Target::Sqlite {
                path: "library.db".into(),
                memory: false
            }
        );
        assert_eq!(
            parse_url("sqlite://x.db").unwrap(),
            Target::Sqlite {
                path: "x.db".into(),
                memory: false
            }
        );
        assert!(matches!(
            parse_url(":memory:").unwrap(),
            Target::Sqlite { memory: true, .. }
        ));
        assert!(parse_url("redis://h").is_err());
        assert_eq!(
            parse_url("mariadb://root@127.0.0.1:3306/test").unwrap(),
            Target::Mysql("mysql://root@127.0.0.1:3306/test".into())
        );
        assert_eq!(
            parse_url("mysql://root:pw@db:3306/books")
                .unwrap()
                .to_string(),
            "the MySQL database `books` at db:3306"
        );
        assert_eq!(
            parse_url("sqlite://file:///tmp/x.db?mode=rwc")
                .unwrap()
                .sqlite_file(),
            Some("/tmp/x.db".into())
        );
        assert_eq!(parse_url(":memory:").unwrap().sqlite_file(), None);
        // SQLite decodes a URI's %HH escapes; an incomplete one stays.
        assert_eq!(
            parse_url("file:data/my%20library%2Edb?mode=rwc")
                .unwrap()
                .sqlite_file(),
            Some("data/my library.db".into())
        );
        assert_eq!(
            parse_url("file:100%.db").unwrap().sqlite_file(),
            Some("100%.db".into())
        );
        assert_eq!(
            parse_url("postgres://ann:secret@db.example:5433/books?sslmode=require")
                .unwrap()
                .to_string(),
            "the PostgreSQL database `books` at db.example:5433"
        );
        assert_eq!(
            parse_url("data/library.db").unwrap().to_string(),
            "the SQLite database `data/library.db`"
        );
        assert!(parse_url("").is_err());
    }

    #[test]
    fn connect_timeouts() {
        let t = with_connect_timeout;
        assert_eq!(
            t("postgres://u@h/db", Duration::from_secs(30)),
            "postgres://u@h/db?connect_timeout=30"
        );
        assert_eq!(
            t(
                "postgres://u@h/db?sslmode=disable",
                Duration::from_millis(2500)
            ),
            "postgres://u@h/db?sslmode=disable&connect_timeout=3"
        );
        assert_eq!(
            t("postgres://u@h/db?", Duration::from_millis(100)),
            "postgres://u@h/db?connect_timeout=2"
        );
        assert_eq!(
            t(
                "postgres://u@h/db?connect_timeout=7",
                Duration::from_secs(30)
            ),
            "postgres://u@h/db?connect_timeout=7"
        );
        assert_eq!(
            t("postgres://u@h/db?a=1&connect_timeout=7", Duration::ZERO),
            "postgres://u@h/db?a=1&connect_timeout=7"
        );
        assert_eq!(
            t("postgres://u@h/db", Duration::ZERO),
            "postgres://u@h/db?connect_timeout=2"
        );
    }
}
