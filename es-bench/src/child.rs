//! One measurement = a fresh database and two child processes of this
//! binary: `prepare` (untimed) and `run` (timed). The run child's peak RSS
//! is its `ru_maxrss`, read with `wait4` when the parent reaps it: getrusage
//! maxima are per process and only grow, so a process per measurement is
//! the only way to get a per-phase peak. The child also reports its own
//! `VmHWM` (peak RSS of its address space after exec) as a cross-check.

use crate::workload::{self, State};
use crate::{framework, raw, Args, BackendArg, BenchError, Impl, Phase, Result, SyncArg};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
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
}

/// What the run child prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    elapsed_s: f64,
    events: i64,
    state: State,
    vm_hwm_kib: Option<u64>,
}

/// One measured run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub elapsed_s: f64,
    pub events: i64,
    pub state: State,
    pub peak_rss_kib: u64,
    pub vm_hwm_kib: Option<u64>,
}

impl Sample {
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed_s
    }
}

/// Measures one run of `phase` by `imp` on a fresh database.
pub fn measure(args: &Args, backend: BackendArg, phase: Phase, imp: Impl) -> Result<Sample> {
    let db = FreshDb::create(backend, &args.database_url)?;
    let mut task = Task {
        step: Step::Prepare,
        imp,
        phase,
        url: db.url().to_owned(),
        sqlite_sync: args.sqlite_sync,
        events: args.events,
        replay_events: args.replay_events,
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
    match task.step {
        Step::Prepare => match task.imp {
            Impl::Es => framework::prepare(
                &framework::open(&task.url, sync, task.phase)?,
                task.phase,
                n,
            ),
            Impl::Raw => raw::prepare(&mut raw::Conn::open(&task.url, sync)?, task.phase, n),
        },
        Step::Run => {
            let commands: Vec<workload::Command> = match task.phase {
                Phase::A | Phase::B | Phase::C => workload::commands(n).collect(),
                _ => Vec::new(),
            };
            let (elapsed, state) = match task.imp {
                Impl::Es => {
                    let store = framework::open(&task.url, sync, task.phase)?;
                    let elapsed = framework::run(&store, task.phase, &commands)?;
                    (elapsed, framework::state(&store, task.phase)?)
                }
                Impl::Raw => {
                    let mut conn = raw::Conn::open(&task.url, sync)?;
                    let outcome = raw::run(&mut conn, &task.url, sync, task.phase, &commands, n)?;
                    let state = match outcome.read_state {
                        Some(s) => s,
                        None => raw::state(&mut conn, task.phase)?,
                    };
                    (outcome.elapsed, state)
                }
            };
            let report = ChildReport {
                elapsed_s: elapsed.as_secs_f64(),
                events: task.phase.rated_events(n),
                state,
                vm_hwm_kib: vm_hwm_kib(),
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

/// A database nobody else uses, removed when dropped: a new SQLite file
/// (in the system temporary directory, on disk) or a new PostgreSQL schema.
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
}

impl FreshDb {
    fn create(backend: BackendArg, postgres_url: &str) -> Result<FreshDb> {
        match backend {
            BackendArg::Sqlite => {
                let dir = tempfile::Builder::new().prefix("es-bench-").tempdir()?;
                let url = dir.path().join("bench.db").to_string_lossy().into_owned();
                Ok(FreshDb::Sqlite { _dir: dir, url })
            }
            BackendArg::Postgres => {
                static COUNTER: AtomicU64 = AtomicU64::new(0);
                let schema = format!(
                    "es_bench_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                );
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
        }
    }

    fn url(&self) -> &str {
        match self {
            FreshDb::Sqlite { url, .. } | FreshDb::Postgres { url, .. } => url,
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
    }
}
