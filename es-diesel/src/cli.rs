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

use crate::runner::{ProjectionMode, RunnerOptions};
use crate::{projection, EventStore, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

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
    /// Print the last events of the log; with --follow, keep printing new ones.
    Tail {
        /// How many events to show first.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
        #[arg(short, long)]
        follow: bool,
    },
    /// Print one stream's events.
    Stream { stream_id: String },
    /// Run the asynchronous read models' runners until interrupted.
    Work,
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
                let note = match (&s.last_error, s.failed_position) {
                    (Some(e), Some(p)) => format!("stopped at {p}: {e}"),
                    _ => s.holder.clone().unwrap_or_default(),
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
            let head = store.head()?;
            let mut after = (head - count as i64).max(0);
            loop {
                for e in store.read_all(after, 500)? {
                    after = e.global_position;
                    w(
                        out,
                        format!(
                            "#{:<6} {} {:<16} v{:<4} {:<20} {}",
                            e.global_position,
                            e.created_at.format("%Y-%m-%d %H:%M:%S"),
                            e.stream_id,
                            e.stream_version,
                            e.event_type,
                            e.payload()
                        ),
                    );
                }
                if !follow {
                    break;
                }
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(200));
            }
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
            let stop = AtomicBool::new(false);
            w(
                out,
                "running the asynchronous read models; stop with Ctrl-C".to_owned(),
            );
            store.run_async_read_models(RunnerOptions::default(), &stop)?;
        }
    }
    Ok(())
}
