//! One measurement = a fresh database and two child processes of this
//! binary: `prepare` (untimed) and `run` (timed). The run child's peak RSS
//! is its `ru_maxrss`, read with `wait4` when the parent reaps it: getrusage
//! maxima are per process and only grow, so a process per measurement is
//! the only way to get a per-phase peak. The child also reports its own
//! `VmHWM` (peak RSS of its address space after exec) as a cross-check.

use crate::workload::{self, State};
use crate::{framework, latency, raw, Args, BackendArg, BenchError, Impl, Phase, Result, SyncArg};
use diesel::connection::SimpleConnection;
use diesel::{Connection, MysqlConnection, PgConnection};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// First argument that turns the binary into a child.
pub const CHILD_ARG: &str = "__child";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Step {
    Prepare,
    Run,
}

/// What a child does, passed as JSON in its second argument.
#[derive(Debug, Serialize, Deserialize)]
struct Task {
    step: Step,
    imp: Impl,
    phase: Phase,
    url: String,
    sqlite_sync: SyncArg,
    events: u64,
    replay_events: u64,
    /// Events preloaded before the phase (0 for the phases without).
    preload_events: u64,
    /// `StoreOptions::queue_sqlite_writers` of the framework's store.
    #[serde(default = "yes")]
    writer_queue: bool,
    /// `StoreOptions::cache_aggregates` of the framework's store.
    #[serde(default)]
    aggregate_cache: bool,
    /// `StoreOptions::optimistic_rows` of the framework's store.
    #[serde(default = "yes")]
    optimistic_rows: bool,
    /// `--framework-sql`: run on the framework's database after its set-up.
    #[serde(default)]
    framework_sql: Option<String>,
}

fn yes() -> bool {
    true
}

/// What the run child prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    elapsed_s: f64,
    events: i64,
    state: State,
    vm_hwm_kib: Option<u64>,
    /// Per-command latency (A, B, C).
    latency: Option<latency::Summary>,
    /// CPU time (user + system, every thread) this process spent in the
    /// timed phase, in seconds.
    #[serde(default)]
    cpu_s: Option<f64>,
    /// The system (kernel) part of `cpu_s`.
    #[serde(default)]
    cpu_system_s: Option<f64>,
}

/// One measured run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub elapsed_s: f64,
    pub events: i64,
    pub state: State,
    pub peak_rss_kib: u64,
    pub vm_hwm_kib: Option<u64>,
    pub latency: Option<latency::Summary>,
    /// The client's CPU time in the timed phase (see `ChildReport`).
    pub cpu_s: Option<f64>,
    pub cpu_system_s: Option<f64>,
}

impl Sample {
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed_s
    }

    /// The client's CPU time per rated event, in µs.
    pub fn cpu_us_per_event(&self) -> Option<f64> {
        Some(self.cpu_s? * 1e6 / self.events as f64)
    }

    /// The kernel's part of [`Sample::cpu_us_per_event`].
    pub fn cpu_system_us_per_event(&self) -> Option<f64> {
        Some(self.cpu_system_s? * 1e6 / self.events as f64)
    }
}

/// Measures one run of `phase` by `imp` on a fresh database.
pub fn measure(args: &Args, backend: BackendArg, phase: Phase, imp: Impl) -> Result<Sample> {
    let db = FreshDb::create(backend, args)?;
    let mut task = Task {
        step: Step::Prepare,
        imp,
        phase,
        url: db.url().to_owned(),
        sqlite_sync: args.sqlite_sync,
        events: args.events,
        replay_events: args.replay_events,
        preload_events: phase.preload(args.preload_events),
        writer_queue: !args.no_writer_queue,
        aggregate_cache: args.aggregate_cache,
        optimistic_rows: !args.no_optimistic_rows,
        framework_sql: args.framework_sql.clone(),
    };
    spawn(&task)?;
    task.step = Step::Run;
    let (stdout, peak_rss_kib) = spawn(&task)?;
    let line = stdout.lines().last().unwrap_or_default();
    let report: ChildReport = serde_json::from_str(line).map_err(|e| BenchError::Child {
        what: format!("{backend} {phase} {imp} run"),
        detail: format!("unreadable report {line:?}: {e}"),
    })?;
    Ok(Sample {
        elapsed_s: report.elapsed_s,
        events: report.events,
        state: report.state,
        peak_rss_kib,
        vm_hwm_kib: report.vm_hwm_kib,
        latency: report.latency,
        cpu_s: report.cpu_s,
        cpu_system_s: report.cpu_system_s,
    })
}

/// Runs a child to completion; returns its stdout and its `ru_maxrss` (KiB).
fn spawn(task: &Task) -> Result<(String, u64)> {
    let what = format!("{:?} {} {}", task.step, task.phase, task.imp);
    let mut child = Command::new(std::env::current_exe()?)
        .arg(CHILD_ARG)
        .arg(serde_json::to_string(task)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        pipe.read_to_string(&mut stdout)?;
    }
    // Reaped here, not by `Child::wait`, to get its resource usage.
    let (status, usage) = wait4(child.id())?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(BenchError::Child {
            what,
            detail: format!("exit status {status:#x} (its error is printed above)"),
        });
    }
    // Linux reports ru_maxrss in KiB.
    Ok((stdout, usage.ru_maxrss.max(0) as u64))
}

fn wait4(pid: u32) -> std::io::Result<(libc::c_int, libc::rusage)> {
    let pid = pid as libc::pid_t;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain data; all-zero is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals; `pid` is our own unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((status, usage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The child side: `es-bench __child '<task JSON>'`.
pub fn child_main(task: &str) -> Result<()> {
    let task: Task = serde_json::from_str(task)?;
    let sync = task.sqlite_sync.sqlite_sync();
    let n = task.phase.command_count(task.events, task.replay_events);
    let preload = task.preload_events;
    match task.step {
        Step::Prepare => match task.imp {
            Impl::Es => framework::prepare(
                &framework::open(
                    &task.url,
                    sync,
                    task.writer_queue,
                    task.aggregate_cache,
                    task.optimistic_rows,
                    task.phase,
                )?,
                task.phase,
                n,
                preload,
                task.framework_sql.as_deref(),
            ),
            Impl::Raw => raw::prepare(
                &mut raw::Conn::open(&task.url, sync)?,
                task.phase,
                n,
                preload,
            ),
        },
        Step::Run => {
            let commands: Vec<workload::Command> = match task.phase {
                Phase::A | Phase::B | Phase::C => workload::commands(n).collect(),
                _ => Vec::new(),
            };
            let (elapsed, mut latencies, cpu, state) = match task.imp {
                Impl::Es => {
                    let store = framework::open(
                        &task.url,
                        sync,
                        task.writer_queue,
                        task.aggregate_cache,
                        task.optimistic_rows,
                        task.phase,
                    )?;
                    let (elapsed, latencies) = framework::run(&store, task.phase, &commands)?;
                    let cpu = crate::clock::timed_cpu();
                    (
                        elapsed,
                        latencies,
                        cpu,
                        framework::state(&store, task.phase)?,
                    )
                }
                Impl::Raw => {
                    let mut conn = raw::Conn::open(&task.url, sync)?;
                    let outcome = raw::run(
                        &mut conn, &task.url, sync, task.phase, &commands, n, preload,
                    )?;
                    let cpu = crate::clock::timed_cpu();
                    let state = match outcome.read_state {
                        Some(s) => s,
                        None => raw::state(&mut conn, task.phase)?,
                    };
                    (outcome.elapsed, outcome.latencies, cpu, state)
                }
            };
            let report = ChildReport {
                elapsed_s: elapsed.as_secs_f64(),
                events: task.phase.rated_events(n, preload),
                state,
                vm_hwm_kib: vm_hwm_kib(),
                latency: latency::Summary::of(&mut latencies),
                cpu_s: cpu.map(|c| c.total),
                cpu_system_s: cpu.map(|c| c.system),
            };
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

/// This process's peak RSS since exec, from /proc (Linux only).
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(diesel::QueryableByName)]
struct Settings {
    #[diesel(sql_type = diesel::sql_types::Text)]
    fsync: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    synchronous_commit: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ssl: bool,
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}

/// The server's durability settings and whether connections use TLS, as
/// the runs see them (nothing is changed).
pub fn postgres_settings(url: &str) -> Result<String> {
    use diesel::RunQueryDsl;
    let mut conn = PgConnection::establish(url)?;
    let s: Settings = diesel::sql_query(
        "SELECT current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS synchronous_commit, \
         COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS ssl, \
         current_setting('server_version') AS version",
    )
    .get_result(&mut conn)?;
    Ok(format!(
        "PostgreSQL {}, fsync = {}, synchronous_commit = {} (server settings, not changed); connections {}",
        s.version,
        s.fsync,
        s.synchronous_commit,
        if s.ssl { "use TLS" } else { "without TLS" }
    ))
}

#[derive(diesel::QueryableByName)]
struct MysqlSettings {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    flush_log: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    log_bin: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    sync_binlog: String,
}

#[derive(diesel::QueryableByName)]
struct SslCipher {
    #[diesel(sql_type = diesel::sql_types::Text)]
    cipher: String,
}

/// As [`postgres_settings`]: the durability settings of the MySQL or
/// MariaDB server (InnoDB's log flush at commit, the binary log) and
/// whether connections use TLS.
pub fn mysql_settings(url: &str) -> Result<String> {
    use diesel::RunQueryDsl;
    let mut conn = MysqlConnection::establish(&mysql_scheme(url))?;
    let s: MysqlSettings = diesel::sql_query(
        "SELECT VERSION() AS version, \
         CAST(@@innodb_flush_log_at_trx_commit AS CHAR) AS flush_log, \
         IF(@@log_bin, 'ON', 'OFF') AS log_bin, CAST(@@sync_binlog AS CHAR) AS sync_binlog",
    )
    .get_result(&mut conn)?;
    // The session status table is in performance_schema on MySQL, in
    // information_schema on MariaDB.
    let tls = [
        "performance_schema.session_status",
        "information_schema.SESSION_STATUS",
    ]
    .iter()
    .find_map(|table| {
        diesel::sql_query(format!(
            "SELECT CAST(VARIABLE_VALUE AS CHAR) AS cipher FROM {table} WHERE VARIABLE_NAME = 'Ssl_cipher'"
        ))
        .get_result::<SslCipher>(&mut conn)
        .ok()
    })
    .map_or("TLS unknown", |c| {
        if c.cipher.is_empty() {
            "without TLS"
        } else {
            "use TLS"
        }
    });
    let server = if s.version.contains("MariaDB") {
        "MariaDB"
    } else {
        "MySQL"
    };
    Ok(format!(
        "{server} {}, InnoDB, innodb_flush_log_at_trx_commit = {}, log_bin = {}, sync_binlog = {} (server settings, not changed); connections {tls}",
        s.version, s.flush_log, s.log_bin, s.sync_binlog
    ))
}

/// Diesel knows the `mysql://` scheme only; the framework also takes `mariadb://`.
fn mysql_scheme(url: &str) -> String {
    match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    }
}

/// A database nobody else uses, removed when dropped: a new SQLite file
/// (in the system temporary directory, on disk), a new PostgreSQL schema,
/// or a new MySQL database.
enum FreshDb {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        admin_url: String,
        schema: String,
        url: String,
    },
    Mysql {
        admin_url: String,
        database: String,
        url: String,
    },
}

/// A name no other run uses.
fn scratch_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "es_bench_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl FreshDb {
    fn create(backend: BackendArg, args: &Args) -> Result<FreshDb> {
        match backend {
            BackendArg::Sqlite => {
                let dir = tempfile::Builder::new().prefix("es-bench-").tempdir()?;
                let url = dir.path().join("bench.db").to_string_lossy().into_owned();
                Ok(FreshDb::Sqlite { _dir: dir, url })
            }
            BackendArg::Postgres => {
                let postgres_url = &args.database_url;
                let schema = scratch_name();
                let mut admin = PgConnection::establish(postgres_url)?;
                admin.batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
                ))?;
                let sep = if postgres_url.contains('?') { '&' } else { '?' };
                let url = format!("{postgres_url}{sep}options=-csearch_path%3D{schema}");
                Ok(FreshDb::Postgres {
                    admin_url: postgres_url.to_owned(),
                    schema,
                    url,
                })
            }
            BackendArg::Mysql => {
                let admin_url = mysql_scheme(&args.mysql_url);
                let database = scratch_name();
                let mut admin = MysqlConnection::establish(&admin_url)?;
                admin.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS `{database}`; \
                     CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                ))?;
                // The server's URL with the new database as its path.
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
                Ok(FreshDb::Mysql {
                    admin_url,
                    database,
                    url,
                })
            }
        }
    }

    fn url(&self) -> &str {
        match self {
            FreshDb::Sqlite { url, .. }
            | FreshDb::Postgres { url, .. }
            | FreshDb::Mysql { url, .. } => url,
        }
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        if let FreshDb::Postgres {
            admin_url, schema, ..
        } = self
        {
            let dropped = PgConnection::establish(admin_url)
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = dropped {
                eprintln!("es-bench: warning: could not drop schema {schema}: {e}");
            }
        }
        if let FreshDb::Mysql {
            admin_url,
            database,
            ..
        } = self
        {
            let dropped = MysqlConnection::establish(admin_url)
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS `{database}`"))
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = dropped {
                eprintln!("es-bench: warning: could not drop database {database}: {e}");
            }
        }
    }
}
