//! Management commands an application embeds, like Django's `manage.py`:
//! the projectors it registered live in its own binary, so the commands must
//! run there.
//!
//! ```no_run
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! enum Command {
//!     /// Store administration.
//!     #[command(subcommand)]
//!     Admin(es_diesel::cli::AdminCommand),
//!     // ... the application's own commands
//! }
//!
//! # fn main() -> es_diesel::Result<()> {
//! let store = es_diesel::EventStore::open("library.db")?;
//! match Command::parse() {
//!     Command::Admin(cmd) => es_diesel::cli::run(&store, cmd, &mut std::io::stdout())?,
//! }
//! # Ok(()) }
//! ```

use crate::connection::DbConnection;
use crate::follow::{read_after, Checkpoint};
use crate::runner::{ProjectionMode, RunnerOptions};
use crate::{projection, read, EventStore, Result};
use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::prelude::*;
use es_core::RecordedEvent;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Events per query of `tail`.
const TAIL_PAGE: usize = 500;

/// The store's management commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// Create or upgrade the store's tables, views and read models.
    Migrate,
    /// Each projection's mode, checkpoint, lag and state.
    Status,
    /// The registered read models and the projectors feeding them.
    Projectors,
    /// Rebuild a read model from the log ("performing a full scan").
    Rebuild {
        /// The read model's table name.
        name: String,
        /// Events per batch.
        #[arg(long, default_value_t = 2_000)]
        batch_size: usize,
    },
    /// Print the last events of the log; with --follow, keep printing new
    /// ones, each once, including those that commit after a later position.
    Tail {
        /// How many events to show first.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
        #[arg(short, long)]
        follow: bool,
    },
    /// Print one stream's events.
    Stream { stream_id: String },
    /// Run the asynchronous read models' runners until Ctrl-C or SIGTERM;
    /// then they finish their batch and release their leases.
    Work,
}

/// The first SIGINT or SIGTERM sets `stop`, so that runners finish their
/// batch and release their leases; a second one exits at once.
fn stop_on_signals(stop: &Arc<AtomicBool>) -> Vec<signal_hook::SigId> {
    let mut ids = Vec::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let registered =
            signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
                .and_then(|a| Ok([a, signal_hook::flag::register(signal, stop.clone())?]));
        match registered {
            Ok(pair) => ids.extend(pair),
            Err(e) => {
                tracing::warn!(signal, error = %e, "cannot handle the signal: it will stop the process without releasing the leases")
            }
        }
    }
    ids
}

/// Runs `command` against `store`, writing its report to `out`.
pub fn run(store: &EventStore, command: AdminCommand, out: &mut dyn Write) -> Result<()> {
    let w = |out: &mut dyn Write, line: String| {
        let _ = writeln!(out, "{line}");
    };
    match command {
        AdminCommand::Migrate => {
            store.migrate()?;
            let (latest, applied) = store.schema_versions()?;
            w(
                out,
                format!("store schema: {applied} migrations applied (latest {latest})"),
            );
        }
        AdminCommand::Status => {
            w(out, format!("log head: position {}", store.head()?));
            w(
                out,
                format!(
                    "{:<24} {:<7} {:>12} {:>8}  {:<10} holder / error",
                    "read model", "mode", "checkpoint", "lag", "state"
                ),
            );
            for s in store.projection_status()? {
                let mode = match s.mode {
                    ProjectionMode::Inline => "inline",
                    ProjectionMode::Async => "async",
                };
                let holder = match (&s.holder, s.lease_expires) {
                    (Some(h), Some(at)) if s.lease_expired => format!(
                        "{h} (lease expired at {} UTC)",
                        at.format("%Y-%m-%d %H:%M:%S")
                    ),
                    (Some(h), _) => h.clone(),
                    (None, _) => String::new(),
                };
                let note = match (&s.last_error, s.failed_position) {
                    (Some(e), Some(p)) => format!("stopped at {p}: {e}"),
                    (Some(e), None) => format!("error: {e}"),
                    (None, _) => holder,
                };
                w(
                    out,
                    format!(
                        "{:<24} {:<7} {:>12} {:>8}  {:<10} {note}",
                        s.name, mode, s.checkpoint.position, s.lag, s.state
                    ),
                );
            }
        }
        AdminCommand::Projectors => {
            for m in projection::registered_read_models()? {
                let mode = if m.asynchronous { "async" } else { "inline" };
                w(out, format!("{} ({mode}, {})", m.name, m.rust_type));
                for p in projection::registered_projectors()?
                    .iter()
                    .filter(|p| p.read_model == m.name)
                {
                    w(
                        out,
                        format!(
                            "  {} [{}] on {} at {}",
                            p.name,
                            p.style,
                            p.event_types.join(", "),
                            p.location
                        ),
                    );
                }
            }
        }
        AdminCommand::Rebuild { name, batch_size } => {
            let bar = ProgressBar::new(store.head()?.max(1) as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} positions, {per_sec}, eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("rebuilding {name}"));
            let report = store.rebuild_with(
                &name,
                &crate::RebuildOptions {
                    batch_size,
                    ..Default::default()
                },
                |p| {
                    bar.set_length(p.head.max(p.position).max(1) as u64);
                    bar.set_position(p.position as u64);
                },
            )?;
            bar.finish_and_clear();
            w(
                out,
                format!(
                    "rebuilt {}: {} events replayed, {} rows, in {:.2?}",
                    report.read_model, report.events, report.rows, report.elapsed
                ),
            );
            if report.pending > 0 {
                w(
                    out,
                    format!(
                        "{} committed events wait behind a transaction still writing to the log; the runner of {} applies them when it ends",
                        report.pending, report.read_model
                    ),
                );
            }
        }
        AdminCommand::Tail { count, follow } => {
            // Followed until the process is interrupted.
            let never = AtomicBool::new(false);
            tail(store, count, follow.then_some(&never), out)?;
        }
        AdminCommand::Stream { stream_id } => {
            let mut from = 1;
            loop {
                let page = store.read_stream(&stream_id, from, 500)?;
                for e in &page {
                    from = e.stream_version + 1;
                    w(
                        out,
                        format!(
                            "v{:<4} #{:<6} {:<20} {}",
                            e.stream_version,
                            e.global_position,
                            e.event_type,
                            e.payload()
                        ),
                    );
                }
                if page.len() < 500 {
                    break;
                }
            }
            if from == 1 {
                w(out, format!("stream `{stream_id}` has no events"));
            }
        }
        AdminCommand::Work => {
            let stop = Arc::new(AtomicBool::new(false));
            let signals = stop_on_signals(&stop);
            w(
                out,
                "running the asynchronous read models; stop with Ctrl-C or SIGTERM".to_owned(),
            );
            let _ = out.flush();
            let result = store.run_async_read_models(RunnerOptions::default(), &stop);
            for id in signals {
                signal_hook::low_level::unregister(id);
            }
            result?;
            w(out, "stopped; the read models are released".to_owned());
        }
    }
    Ok(())
}

/// Prints the last `count` events of the log; with `follow`, then keeps
/// printing new events until the flag is set.
///
/// Following goes through [`read_after`], not [`EventStore::read_all`]: on
/// PostgreSQL an event may commit after one with a higher position, and a
/// position-based tail would skip it. Each event is printed once.
pub fn tail(
    store: &EventStore,
    count: usize,
    follow: Option<&AtomicBool>,
    out: &mut dyn Write,
) -> Result<()> {
    let mut conn = store.connection()?;
    let Some(stop) = follow else {
        for e in last_events(&mut conn, count)? {
            let _ = writeln!(out, "{}", tail_line(&e));
        }
        return Ok(());
    };
    let TailStart {
        events,
        mut checkpoint,
        mut shown,
    } = tail_start(&mut conn, count)?;
    for e in &events {
        let _ = writeln!(out, "{}", tail_line(e));
    }
    while !stop.load(Ordering::Relaxed) {
        let page = read_after(&mut conn, checkpoint, None, TAIL_PAGE)?;
        for f in &page {
            checkpoint = f.checkpoint;
            if !shown.remove(&f.event.global_position) {
                let _ = writeln!(out, "{}", tail_line(&f.event));
            }
        }
        let _ = out.flush();
        if page.len() < TAIL_PAGE {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// The last `count` events of the log, by position.
fn last_events(conn: &mut DbConnection, count: usize) -> Result<Vec<RecordedEvent>> {
    let mut after = (read::head(conn)? - i64::try_from(count).unwrap_or(i64::MAX)).max(0);
    let mut events = Vec::new();
    loop {
        let page = read::read_all(conn, after, TAIL_PAGE)?;
        let full = page.len() == TAIL_PAGE;
        after = page.last().map_or(after, |e| e.global_position);
        events.extend(page);
        if !full {
            return Ok(events);
        }
    }
}

struct TailStart {
    /// The last events, by position.
    events: Vec<RecordedEvent>,
    /// Where following starts.
    checkpoint: Checkpoint,
    /// Events after `checkpoint` that were committed already, so are not new.
    shown: HashSet<i64>,
}

#[derive(QueryableByName)]
struct Position {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    p: i64,
}

/// The last `count` events, and where a follower must start so that it
/// returns every event committed later, whatever its position.
///
/// On PostgreSQL: first the follow horizon `h`; every event that is not
/// visible to a later snapshot has an order key of at least `h`. Then, in
/// one such snapshot, the last events and the events with a key of at least
/// `h` that are visible already. The follower starts just below `h` and
/// skips those.
fn tail_start(conn: &mut DbConnection, count: usize) -> Result<TailStart> {
    type Tm = <DbConnection as Connection>::TransactionManager;
    let horizon = match conn {
        DbConnection::Sqlite(_) => {
            let events = last_events(conn, count)?;
            let position = events
                .last()
                .map_or(read::head(conn)?, |e| e.global_position);
            return Ok(TailStart {
                events,
                checkpoint: Checkpoint {
                    transaction: 0,
                    position,
                },
                shown: HashSet::new(),
            });
        }
        DbConnection::Postgres(c) => loop {
            if let Some(h) = crate::follow::horizon(c)? {
                break h;
            }
            std::thread::sleep(Duration::from_millis(10));
        },
    };
    if let DbConnection::Postgres(c) = conn {
        AnsiTransactionManager::begin_transaction_sql(
            c,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )?;
    }
    let result = (|| {
        let shown =
            diesel::sql_query("SELECT global_position AS p FROM es_events WHERE order_key >= $1")
                .bind::<diesel::sql_types::BigInt, _>(horizon)
                .load::<Position>(conn)?
                .into_iter()
                .map(|r| r.p)
                .collect();
        Ok(TailStart {
            events: last_events(conn, count)?,
            checkpoint: Checkpoint {
                transaction: horizon - 1,
                position: i64::MAX,
            },
            shown,
        })
    })();
    match &result {
        Ok(_) => Tm::commit_transaction(conn)?,
        Err(_) => {
            let _ = Tm::rollback_transaction(conn);
        }
    }
    result
}

fn tail_line(e: &RecordedEvent) -> String {
    format!(
        "#{:<6} {} {:<16} v{:<4} {:<20} {}",
        e.global_position,
        e.created_at.format("%Y-%m-%d %H:%M:%S"),
        e.stream_id,
        e.stream_version,
        e.event_type,
        e.payload()
    )
}
