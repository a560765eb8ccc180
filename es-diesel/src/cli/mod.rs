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
//!     // `cli::stdout()` exits quietly when a pipe's reader goes away.
//!     Command::Admin(cmd) => es_diesel::cli::run(&store, cmd, &mut es_diesel::cli::stdout())?,
//! }
//! # Ok(()) }
//! ```

mod tail;

pub use tail::tail;

use crate::runner::{ProjectionMode, RunnerOptions};
use crate::{projection, EventStore, Result};
use es_core::RecordedEvent;
use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The store's management commands.
///
/// Every command but `migrate` and `projectors` first checks, reading only,
/// that the database is migrated ([`EventStore::check_migrated`]): none of
/// them changes the schema, so they run as a role that may only read and
/// write rows.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// Create or upgrade the store's tables, views and read models.
    Migrate,
    /// Each projection's mode, checkpoint, lag and state.
    Status {
        /// One JSON object: the log head and every projection's status.
        #[arg(long)]
        json: bool,
    },
    /// The registered read models and the projectors feeding them.
    Projectors,
    /// Rebuild a read model from the log ("performing a full scan").
    Rebuild {
        /// The read model's table name (see `projectors`).
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
        /// Keep printing events as they are appended, until interrupted or
        /// until the output is closed.
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line and event.
        #[arg(long)]
        json: bool,
    },
    /// Print one stream's events.
    Stream {
        /// The stream's id, e.g. `book-3`.
        stream_id: String,
        /// One JSON object per line and event.
        #[arg(long)]
        json: bool,
    },
    /// Run the asynchronous read models' runners until Ctrl-C or SIGTERM;
    /// then they finish their batch and release their leases.
    Work,
}

/// Standard output for commands run in a terminal or a pipeline. When its
/// reader goes away (`| head -5`), the process exits at once, quietly and
/// with status 0, as Unix tools do, instead of failing on a broken pipe.
/// Other write errors are returned.
pub fn stdout() -> Stdout {
    Stdout(std::io::stdout())
}

/// See [`stdout`].
pub struct Stdout(std::io::Stdout);

fn quiet_on_broken_pipe<T>(result: std::io::Result<T>) -> std::io::Result<T> {
    if let Err(e) = &result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
    result
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        quiet_on_broken_pipe(self.0.write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        quiet_on_broken_pipe(self.0.lock().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        quiet_on_broken_pipe(self.0.flush())
    }
}

/// An event as one JSON object (its payload and metadata as JSON values).
fn event_json(e: &RecordedEvent) -> serde_json::Value {
    let payload = serde_json::from_str::<serde_json::Value>(e.payload())
        .unwrap_or_else(|_| serde_json::Value::String(e.payload().to_owned()));
    serde_json::json!({
        "global_position": e.global_position,
        "stream_id": e.stream_id,
        "stream_version": e.stream_version,
        "event_type": e.event_type,
        "event_version": e.event_version,
        "event_id": e.event_id,
        "created_at": e.created_at,
        "metadata": e.metadata,
        "payload": payload,
    })
}

/// An event as one line of `tail` output.
fn event_line(e: &RecordedEvent, json: bool) -> String {
    if json {
        return event_json(e).to_string();
    }
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

/// The rebuild's progress bar: one line that fits the terminal (80 columns
/// and fewer), with a whole-number rate and the time left. Drawn only when
/// `target` is a terminal; [`ProgressDrawTarget::stderr`] hides itself
/// otherwise.
fn rebuild_bar(name: &str, len: u64, target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{wide_bar}] {human_pos}/{human_len} {rate} eta {eta}")
            .expect("a valid template")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}/s", HumanCount(s.per_sec().round() as u64));
            })
            .progress_chars("=> "),
    );
    let mut label: String = name.chars().take(24).collect();
    if label.len() < name.len() {
        label.push('…');
    }
    bar.set_message(label);
    bar
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
    if !matches!(command, AdminCommand::Migrate | AdminCommand::Projectors) {
        store.check_migrated()?;
    }
    match command {
        AdminCommand::Migrate => {
            store.migrate()?;
            let (latest, applied) = store.schema_versions()?;
            w(
                out,
                format!("store schema: {applied} migrations applied (latest {latest})"),
            );
        }
        AdminCommand::Status { json: true } => {
            let head = store.head()?;
            let projections: Vec<serde_json::Value> = store
                .projection_status()?
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "mode": match s.mode {
                            ProjectionMode::Inline => "inline",
                            ProjectionMode::Async => "async",
                        },
                        "position": s.checkpoint.position,
                        "order_key": s.checkpoint.order_key,
                        "lag": s.lag,
                        "state": s.state,
                        "holder": s.holder,
                        "lease_expires": s.lease_expires,
                        "lease_expired": s.lease_expired,
                        "last_error": s.last_error,
                        "failed_position": s.failed_position,
                    })
                })
                .collect();
            w(
                out,
                serde_json::json!({ "head": head, "projections": projections }).to_string(),
            );
        }
        AdminCommand::Status { json: false } => {
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
            let bar = rebuild_bar(
                &name,
                store.head()?.max(1) as u64,
                ProgressDrawTarget::stderr(),
            );
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
            let rate = report.events as f64 / report.elapsed.as_secs_f64().max(1e-9);
            w(
                out,
                format!(
                    "rebuilt {}: {} events replayed, {} rows, in {:.2?} ({} events/s)",
                    report.read_model,
                    report.events,
                    report.rows,
                    report.elapsed,
                    HumanCount(rate.round() as u64)
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
        AdminCommand::Tail {
            count,
            follow,
            json,
        } => {
            // Followed until the process is interrupted or its reader goes away.
            let never = AtomicBool::new(false);
            tail(store, count, json, follow.then_some(&never), out)?;
        }
        AdminCommand::Stream { stream_id, json } => {
            let mut from = 1;
            loop {
                let page = store.read_stream(&stream_id, from, 500)?;
                for e in &page {
                    from = e.stream_version + 1;
                    if json {
                        w(out, event_json(e).to_string());
                        continue;
                    }
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
            if from == 1 && !json {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// An 80-column terminal that records what is drawn.
    #[derive(Debug, Default, Clone)]
    struct Term80(Arc<Mutex<String>>);

    impl indicatif::TermLike for Term80 {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            let mut all = self.0.lock().unwrap();
            all.push_str(s);
            all.push('\n');
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.0.lock().unwrap().push('\n');
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_rebuild_bar_fits_80_columns_with_a_whole_rate_and_an_eta() {
        for name in [
            "book_list",
            "a_read_model_with_a_very_long_table_name_indeed",
        ] {
            let term = Term80::default();
            let bar = rebuild_bar(
                name,
                1_001_100,
                ProgressDrawTarget::term_like(Box::new(term.clone())),
            );
            for pos in [1, 250_000, 500_000] {
                std::thread::sleep(Duration::from_millis(60));
                bar.set_position(pos);
                bar.tick();
            }
            bar.abandon();
            let drawn = term.0.lock().unwrap().clone();
            let lines: Vec<&str> = drawn.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!(!lines.is_empty(), "nothing drawn");
            for line in &lines {
                assert!(
                    line.chars().count() <= 80,
                    "{} columns: {line:?}",
                    line.chars().count()
                );
                assert!(
                    line.contains("/1,001,100 ") && line.contains(" eta "),
                    "{line:?}"
                );
                let rate = line.split_whitespace().find(|w| w.ends_with("/s")).unwrap();
                assert!(
                    !rate.contains('.')
                        && rate
                            .trim_end_matches("/s")
                            .replace(',', "")
                            .parse::<u64>()
                            .is_ok(),
                    "rate {rate:?} in {line:?}"
                );
            }
        }
    }
}
