//! `es-bench`: the `library` workload (`es-bench/WORKLOAD.md`) run
//! through the framework's public API and as hand-written Diesel, on
//! SQLite, PostgreSQL and MySQL/MariaDB, with events/s and peak RSS per
//! phase.
//!
//! Every (backend, phase, implementation, run) gets a fresh database and
//! two child processes of this same binary: one prepares the database
//! (schema, registrations, seed; untimed, its memory not counted), the other
//! runs the timed phase, checks nothing itself and reports its wall time
//! and final state on stdout. The parent reaps that child with `wait4` and
//! takes its `ru_maxrss` as the phase's peak RSS, compares the state with
//! the reference (`workload::expected`, a port of `es-bench/expected.py`) and stops
//! with an error on any mismatch.

mod child;
mod clock;
mod framework;
mod latency;
mod raw;
mod report;
mod workload;

use clap::{Parser, ValueEnum};
use diesel::connection::SimpleConnection;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::process::ExitCode;

/// A phase of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    A,
    B,
    C,
    D,
    E1,
    E2,
    E3,
}

impl Phase {
    /// Commands the phase executes (A, B, C), or the size of the log it
    /// writes (E1, E2) or reads (D, E3) is derived from this count.
    fn command_count(self, events: u64, replay_events: u64) -> u64 {
        match self {
            Phase::A | Phase::B | Phase::C | Phase::E1 | Phase::E2 => events,
            Phase::D | Phase::E3 => replay_events,
        }
    }

    /// The events the rate is computed from: the commands of A, B and C
    /// (registrations and the preloaded log are untimed), every row written
    /// or read otherwise (for D the preloaded events too).
    fn rated_events(self, commands: u64, preload: u64) -> i64 {
        match self {
            Phase::A | Phase::B | Phase::C => commands as i64,
            Phase::D => commands as i64 + workload::REGISTRATIONS + preload as i64,
            Phase::E1 | Phase::E2 | Phase::E3 => commands as i64 + workload::REGISTRATIONS,
        }
    }

    /// Whether `--preload-events` applies: A, C (appends on a large log)
    /// and D (which rebuilds from the whole log).
    fn preloads(self) -> bool {
        matches!(self, Phase::A | Phase::C | Phase::D)
    }

    /// Whether the phase executes commands, whose latencies are recorded.
    fn has_commands(self) -> bool {
        matches!(self, Phase::A | Phase::B | Phase::C)
    }

    /// The state a run of this phase must end in, on a log with `preload`
    /// extra events (ignored by the phases that do not preload).
    fn expected(self, events: u64, replay_events: u64, preload: u64) -> workload::State {
        let full = workload::expected(self.command_count(events, replay_events));
        let state = match self {
            Phase::B | Phase::D => full,
            _ => full.log_only(),
        };
        state.with_preload(self.preload(preload))
    }

    /// The `--preload-events` this phase runs with.
    fn preload(self, preload_events: u64) -> u64 {
        if self.preloads() {
            preload_events
        } else {
            0
        }
    }

    fn raw_only(self) -> bool {
        matches!(self, Phase::E1 | Phase::E2 | Phase::E3)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Parses `A,B,C,D,E` (E = E1,E2,E3), in the order given, without repeats.
fn parse_phases(list: &str) -> Result<Vec<Phase>> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let phases: &[Phase] = match item.to_ascii_uppercase().as_str() {
            "A" => &[Phase::A],
            "B" => &[Phase::B],
            "C" => &[Phase::C],
            "D" => &[Phase::D],
            "E" => &[Phase::E1, Phase::E2, Phase::E3],
            "E1" => &[Phase::E1],
            "E2" => &[Phase::E2],
            "E3" => &[Phase::E3],
            _ => {
                return Err(BenchError::Usage(format!(
                    "unknown phase `{item}` in --phases; use a comma-separated list of A, B, C, D, E (or E1, E2, E3)"
                )))
            }
        };
        for p in phases {
            if !out.contains(p) {
                out.push(*p);
            }
        }
    }
    if out.is_empty() {
        return Err(BenchError::Usage(
            "--phases is empty; give e.g. A,B,C,D,E".into(),
        ));
    }
    Ok(out)
}

/// Which implementation a measurement is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Impl {
    /// The framework's public API.
    #[serde(rename = "es")]
    Es,
    /// Hand-written Diesel.
    #[serde(rename = "raw")]
    Raw,
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impl::Es => "es",
            Impl::Raw => "raw",
        })
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
pub enum BackendArg {
    Sqlite,
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

impl fmt::Display for BackendArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendArg::Sqlite => "sqlite",
            BackendArg::Postgres => "postgres",
            BackendArg::Mysql => "mysql",
        })
    }
}

/// SQLite's `PRAGMA synchronous`, the same for the framework and raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum SyncArg {
    /// Durable like PostgreSQL with fsync on: a commit is on disk when it returns.
    Full,
    /// WAL commits survive a process crash but not a power failure.
    Normal,
}

impl SyncArg {
    fn sqlite_sync(self) -> es_diesel::SqliteSync {
        match self {
            SyncArg::Full => es_diesel::SqliteSync::Full,
            SyncArg::Normal => es_diesel::SqliteSync::Normal,
        }
    }
}

impl fmt::Display for SyncArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncArg::Full => "FULL",
            SyncArg::Normal => "NORMAL",
        })
    }
}

/// Benchmark of the `library` workload: the framework against hand-written Diesel.
#[derive(Parser, Debug)]
#[command(name = "es-bench", version)]
pub struct Args {
    /// Backends to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "postgres")]
    backend: Vec<BackendArg>,
    /// PostgreSQL server; every run creates and drops its own schema in it.
    #[arg(
        long,
        env = "ES_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// MySQL or MariaDB server; every run creates and drops its own database
    /// in it (the user must be allowed to).
    #[arg(
        long,
        env = "ES_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    mysql_url: String,
    /// Commands of phases A, B, C (and log size of E1, E2, minus registrations).
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Commands whose log phases D and E3 read (plus 1,100 registrations).
    #[arg(long, default_value_t = 1_000_000)]
    replay_events: u64,
    /// Phases, comma-separated: A, B, C, D, E (= E1, E2, E3).
    #[arg(long, default_value = "A,B,C,D,E")]
    phases: String,
    /// Runs per phase and implementation; the rate reported is the median.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Events bulk-loaded (untimed) into the log before phases A, C and D,
    /// on streams the workload does not touch (books 1000001..).
    #[arg(long, default_value_t = 0)]
    preload_events: u64,
    /// SQLite `PRAGMA synchronous` (journal mode is always WAL).
    #[arg(long, value_enum, default_value_t = SyncArg::Full)]
    sqlite_sync: SyncArg,
    /// The framework's SQLite writers wait in SQLite's busy handler instead
    /// of its writer queue (`StoreOptions::queue_sqlite_writers` off).
    #[arg(long)]
    no_writer_queue: bool,
    /// The framework keeps the books' states in memory between commands
    /// (`Aggregate::CACHE`, `StoreOptions::cache_aggregates`), so that a
    /// command on a book seen before reads no stream; raw still reads the
    /// book's stream at every command. Off by default: both sides then do
    /// the same reads.
    #[arg(long)]
    aggregate_cache: bool,
    /// On PostgreSQL, the framework's appends in B lock their read-model
    /// rows in a transaction (BEGIN, insert, SELECT … FOR UPDATE, UPDATE,
    /// COMMIT) instead of writing events and rows in one statement that
    /// checks each row's version (`StoreOptions::optimistic_rows` off).
    #[arg(long)]
    no_optimistic_rows: bool,
    /// SQL run on the framework's database after its untimed set-up and
    /// before the timed phase, e.g. `DROP INDEX es_events_by_type`: prices
    /// a part of the store's schema by measuring without it. The final
    /// state is still checked; the goals are not judged.
    #[arg(long, value_name = "SQL")]
    framework_sql: Option<String>,
    /// One JSON object per (phase, implementation) on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("framework: {0}")]
    Framework(#[from] es_diesel::Error),
    #[error("database: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("cannot connect: {0}")]
    Connection(#[from] diesel::ConnectionError),
    #[error("the book aggregate refused a command: {0}")]
    Refused(framework::Refused),
    #[error("phase {0} measures the database's limit and has no framework implementation")]
    RawOnly(Phase),
    #[error("a writer thread panicked")]
    WriterPanicked,
    #[error("{0}")]
    Inconsistent(String),
    #[error(
        "STATE MISMATCH on {backend}, phase {phase}, {imp}, run {run}:\n  expected {expected}\n  actual   {actual}"
    )]
    Mismatch {
        backend: BackendArg,
        phase: Phase,
        imp: Impl,
        run: u32,
        expected: Box<workload::State>,
        actual: Box<workload::State>,
    },
    #[error("child process ({what}) failed: {detail}")]
    Child { what: String, detail: String },
    #[error("{0}")]
    Usage(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let result = if argv.get(1).map(String::as_str) == Some(child::CHILD_ARG) {
        child::child_main(argv.get(2).map(String::as_str).unwrap_or_default())
    } else {
        let args = Args::parse();
        run(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("es-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let phases = parse_phases(&args.phases)?;
    if args.runs == 0 {
        return Err(BenchError::Usage("--runs must be at least 1".into()));
    }
    let mut backends = args.backend.clone();
    backends.dedup();
    for &backend in &backends {
        let mut results = report::Results::new(backend);
        let server = match backend {
            BackendArg::Postgres => Some(child::postgres_settings(&args.database_url)?),
            BackendArg::Mysql => Some(child::mysql_settings(&args.mysql_url)?),
            BackendArg::Sqlite => None,
        };
        if let Some(server) = server {
            eprintln!("{server}");
            results.server = Some(server);
        }
        for &phase in &phases {
            let impls: &[Impl] = if phase.raw_only() {
                &[Impl::Raw]
            } else {
                &[Impl::Es, Impl::Raw]
            };
            let expected = phase.expected(args.events, args.replay_events, args.preload_events);
            for run in 1..=args.runs {
                // Alternate the order so that drift (WAL growth, caches) does not favour one side.
                let mut order = impls.to_vec();
                if run % 2 == 0 {
                    order.reverse();
                }
                for imp in order {
                    let sample = child::measure(args, backend, phase, imp)?;
                    if sample.state != expected {
                        return Err(BenchError::Mismatch {
                            backend,
                            phase,
                            imp,
                            run,
                            expected: Box::new(expected),
                            actual: Box::new(sample.state),
                        });
                    }
                    let latency = sample.latency.map_or_else(String::new, |l| {
                        format!(
                            ", latency mean {:.1} / p50 {:.1} / p99 {:.1} / p99.9 {:.1} / max {:.1} µs",
                            l.mean_ns as f64 / 1e3,
                            l.p50_ns as f64 / 1e3,
                            l.p99_ns as f64 / 1e3,
                            l.p999_ns as f64 / 1e3,
                            l.max_ns as f64 / 1e3
                        )
                    });
                    let cpu = match (sample.cpu_us_per_event(), sample.cpu_system_us_per_event()) {
                        (Some(c), Some(s)) => {
                            format!(", client CPU {c:.1} µs/event ({s:.1} in the kernel)")
                        }
                        _ => String::new(),
                    };
                    eprintln!(
                        "{backend} {phase} {imp} run {run}/{}: {:.0} events/s ({} events in {:.3} s){latency}{cpu}, peak RSS {} KiB (VmHWM {} KiB), state ok",
                        args.runs,
                        sample.events_per_s(),
                        sample.events,
                        sample.elapsed_s,
                        sample.peak_rss_kib,
                        sample.vm_hwm_kib.map_or_else(|| "?".to_owned(), |v| v.to_string()),
                    );
                    results.add(phase, imp, sample);
                }
            }
        }
        if args.json {
            results.print_json(args)?;
        } else {
            results.print_table(args);
        }
    }
    Ok(())
}

/// After a PostgreSQL preload (untimed, both sides): its pages are written
/// now, not by a checkpoint during the timed phase. Without the privilege
/// (a superuser or `pg_checkpoint`) a note says so and the run goes on.
fn checkpoint_after_preload(conn: &mut impl SimpleConnection) {
    if let Err(e) = conn.batch_execute("CHECKPOINT") {
        eprintln!("note: CHECKPOINT after the preload failed ({e}); the timed phase may share the disk with it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_with_e_expanded() {
        assert_eq!(
            parse_phases("A,b, E").unwrap(),
            [Phase::A, Phase::B, Phase::E1, Phase::E2, Phase::E3]
        );
        assert_eq!(parse_phases("E2,E2,D").unwrap(), [Phase::E2, Phase::D]);
        assert!(parse_phases("A,F").is_err());
        assert!(parse_phases(",").is_err());
    }

    #[test]
    fn rated_events_follow_the_workload() {
        assert_eq!(Phase::A.rated_events(20_000, 500), 20_000);
        assert_eq!(Phase::E1.rated_events(20_000, 0), 21_100);
        assert_eq!(Phase::D.rated_events(1_000_000, 0), 1_001_100);
        assert_eq!(Phase::D.rated_events(1_000_000, 200_000), 1_201_100);
        assert_eq!(Phase::D.command_count(5, 7), 7);
        assert_eq!(Phase::C.command_count(5, 7), 5);
    }

    #[test]
    fn preload_applies_to_a_c_d_only() {
        let plain = |p: Phase| p.expected(300, 400, 0);
        for p in [Phase::A, Phase::C, Phase::D] {
            assert_eq!(p.expected(300, 400, 250), plain(p).with_preload(250), "{p}");
            assert_eq!(
                p.expected(300, 400, 250).log_events,
                plain(p).log_events + 250
            );
        }
        for p in [Phase::B, Phase::E1, Phase::E2, Phase::E3] {
            assert_eq!(p.expected(300, 400, 250), plain(p), "{p}");
            assert_eq!(p.preload(250), 0);
        }
    }
}
