//! Medians, the table, the JSON lines, and the goals of the issue.

use crate::child::Sample;
use crate::workload::State;
use crate::{Args, BackendArg, Impl, Phase, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything measured on one backend.
pub struct Results {
    backend: BackendArg,
    /// How the server runs (PostgreSQL, MySQL), for the table's header.
    pub server: Option<String>,
    order: Vec<Phase>,
    entries: BTreeMap<(Phase, Impl), Vec<Sample>>,
}

/// A (phase, implementation) summarized over its runs.
struct Summary {
    events: i64,
    events_per_s: f64,
    peak_rss_kib: u64,
    state: State,
    latency: Option<Latency>,
    /// Median over the runs of the client's CPU µs per event, and of its
    /// kernel part.
    cpu_us: Option<f64>,
    cpu_system_us: Option<f64>,
}

/// Per-command latency over the runs, in microseconds: the median of the
/// runs' mean, p50, p99 and p99.9, the highest of their maxima.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latency {
    fn over(runs: &[Sample]) -> Option<Latency> {
        let runs: Vec<&crate::latency::Summary> =
            runs.iter().filter_map(|s| s.latency.as_ref()).collect();
        if runs.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Latency {
            mean: median(runs.iter().map(|l| us(l.mean_ns)).collect()),
            p50: median(runs.iter().map(|l| us(l.p50_ns)).collect()),
            p99: median(runs.iter().map(|l| us(l.p99_ns)).collect()),
            p999: median(runs.iter().map(|l| us(l.p999_ns)).collect()),
            max: runs.iter().map(|l| us(l.max_ns)).fold(0.0, f64::max),
        })
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    phase: Phase,
    #[serde(rename = "impl")]
    imp: Impl,
    backend: String,
    events: i64,
    events_per_s: f64,
    peak_rss_kib: u64,
    state: State,
    /// How a command obtains the book's state (A, B, C).
    #[serde(skip_serializing_if = "Option::is_none")]
    approach: Option<&'a str>,
    /// Events preloaded into the log before the phase (A, C, D).
    #[serde(skip_serializing_if = "Option::is_none")]
    preload_events: Option<u64>,
    /// Per-command latency in µs (A, B, C).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<Latency>,
    /// The framework's p99 over raw's (on the framework's lines of A, B, C).
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_vs_raw: Option<f64>,
    /// The benchmark process's CPU time (user + system, all threads) in
    /// the timed phase, per event, in µs: the client's share of the work.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_event: Option<f64>,
    /// The kernel's part of `cpu_us_per_event`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_system_us_per_event: Option<f64>,
    /// `--framework-sql`: the framework's schema was changed by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    framework_sql: Option<&'a str>,
}

/// How both implementations obtain a book's state per command.
const APPROACH: &str = crate::framework::APPROACH;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len().is_multiple_of(2) {
        (xs[mid - 1] + xs[mid]) / 2.0
    } else {
        xs[mid]
    }
}

impl Results {
    pub fn new(backend: BackendArg) -> Self {
        Results {
            backend,
            server: None,
            order: Vec::new(),
            entries: BTreeMap::new(),
        }
    }

    fn note_phase(&mut self, phase: Phase) {
        if !self.order.contains(&phase) {
            self.order.push(phase);
        }
    }

    pub fn add(&mut self, phase: Phase, imp: Impl, sample: Sample) {
        self.note_phase(phase);
        self.entries.entry((phase, imp)).or_default().push(sample);
    }

    /// Median rate and the highest peak RSS over the runs.
    fn summary(&self, phase: Phase, imp: Impl) -> Option<Summary> {
        let v = self.entries.get(&(phase, imp)).filter(|v| !v.is_empty())?;
        Some(Summary {
            events: v[0].events,
            events_per_s: median(v.iter().map(Sample::events_per_s).collect()),
            peak_rss_kib: v.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0),
            state: v[0].state,
            latency: Latency::over(v),
            cpu_us: v
                .iter()
                .map(Sample::cpu_us_per_event)
                .collect::<Option<Vec<f64>>>()
                .map(median),
            cpu_system_us: v
                .iter()
                .map(Sample::cpu_system_us_per_event)
                .collect::<Option<Vec<f64>>>()
                .map(median),
        })
    }

    /// The framework's p99 latency over raw's, if both were measured.
    fn p99_ratio(&self, phase: Phase) -> Option<f64> {
        let p99 = |imp| self.summary(phase, imp)?.latency.map(|l| l.p99);
        Some(p99(Impl::Es)? / p99(Impl::Raw)?)
    }

    pub fn print_json(&self, args: &Args) -> Result<()> {
        for &phase in &self.order {
            for imp in [Impl::Es, Impl::Raw] {
                let Some(s) = self.summary(phase, imp) else {
                    continue;
                };
                let line = JsonLine {
                    phase,
                    imp,
                    backend: self.backend.to_string(),
                    events: s.events,
                    events_per_s: s.events_per_s,
                    peak_rss_kib: s.peak_rss_kib,
                    state: s.state,
                    approach: phase.has_commands().then_some(
                        if imp == Impl::Es && args.aggregate_cache {
                            crate::framework::APPROACH_CACHED
                        } else {
                            APPROACH
                        },
                    ),
                    preload_events: phase
                        .preloads()
                        .then_some(phase.preload(args.preload_events)),
                    latency_us: s.latency,
                    p99_vs_raw: if imp == Impl::Es {
                        self.p99_ratio(phase)
                    } else {
                        None
                    },
                    cpu_us_per_event: s.cpu_us,
                    cpu_system_us_per_event: s.cpu_system_us,
                    framework_sql: args.framework_sql.as_deref(),
                };
                println!("{}", serde_json::to_string(&line)?);
            }
        }
        Ok(())
    }

    pub fn print_table(&self, args: &Args) {
        let durability = match self.backend {
            BackendArg::Postgres | BackendArg::Mysql => self
                .server
                .clone()
                .unwrap_or_else(|| "server settings not read".to_owned()),
            BackendArg::Sqlite => format!(
                "WAL, synchronous = {} for framework and raw{}",
                args.sqlite_sync,
                if args.sqlite_sync == crate::SyncArg::Full {
                    " (durable commits, like PostgreSQL with fsync on)"
                } else {
                    " (commits may be lost on power failure, unlike PostgreSQL with fsync on)"
                }
            ),
        };
        println!();
        println!(
            "== {}: --events {} --replay-events {} --preload-events {} --runs {} (events/s = median of runs; peak RSS = max ru_maxrss of the run's process)",
            self.backend, args.events, args.replay_events, args.preload_events, args.runs
        );
        println!("   durability: {durability}");
        if self.backend == BackendArg::Sqlite {
            println!(
                "   concurrent writers (C): {}; raw's wait in SQLite's busy handler",
                if args.no_writer_queue {
                    "the framework's wait in SQLite's busy handler (--no-writer-queue)"
                } else {
                    "the framework's wait in its writer queue (StoreOptions::queue_sqlite_writers)"
                }
            );
        }
        if self.backend == BackendArg::Postgres {
            println!(
                "   inline read model (B): {}",
                if args.no_optimistic_rows {
                    "the framework locks its rows in a transaction (--no-optimistic-rows)"
                } else {
                    "the framework writes events and rows in one statement that checks each row's version (StoreOptions::optimistic_rows)"
                }
            );
        }
        if let Some(sql) = &args.framework_sql {
            println!("   the framework's schema was changed before each timed phase (--framework-sql): {sql}");
        }
        if args.aggregate_cache {
            println!("   state per command (A, B, C): {APPROACH}: raw reads and folds the whole book stream; the framework keeps each book's state in memory after its first command (--aggregate-cache), so its later commands read no stream");
        } else {
            println!("   state per command (A, B, C): {APPROACH}: the whole book stream is read and folded, no cache, both implementations");
        }
        if args.preload_events > 0 {
            println!(
                "   preloaded log (A, C, D): {} events on books {}.. ({} per stream) written untimed before the registrations; D replays them too",
                args.preload_events,
                crate::workload::PRELOAD_FIRST_BOOK,
                crate::workload::PRELOAD_STREAM_EVENTS
            );
        }
        println!(
            "{:<5} {:>9} {:>17} {:>12} {:>8} {:>13} {:>13}",
            "phase",
            "events",
            "framework ev/s",
            "raw ev/s",
            "fw/raw",
            "fw peak RSS",
            "raw peak RSS"
        );
        for &phase in &self.order {
            let es = self.summary(phase, Impl::Es);
            let raw = self.summary(phase, Impl::Raw);
            let events = es.as_ref().or(raw.as_ref()).map_or(0, |s| s.events);
            let es_rate = es
                .as_ref()
                .map_or_else(|| "-".to_owned(), |s| format!("{:.0}", s.events_per_s));
            let raw_rate = raw
                .as_ref()
                .map_or_else(|| "-".to_owned(), |s| format!("{:.0}", s.events_per_s));
            let ratio = match (&es, &raw) {
                (Some(e), Some(r)) => format!("{:.2}", e.events_per_s / r.events_per_s),
                _ => "-".to_owned(),
            };
            let rss = |s: &Option<Summary>| {
                s.as_ref()
                    .map_or_else(|| "-".to_owned(), |s| mib(s.peak_rss_kib))
            };
            println!(
                "{:<5} {:>9} {:>17} {:>12} {:>8} {:>13} {:>13}",
                phase.to_string(),
                events,
                es_rate,
                raw_rate,
                ratio,
                rss(&es),
                rss(&raw)
            );
        }
        self.print_latency();
        self.print_cpu();
        self.print_goals(args);
    }

    /// The per-command latency of the phases that execute commands.
    fn print_latency(&self) {
        let phases: Vec<Phase> = self
            .order
            .iter()
            .copied()
            .filter(|&p| p.has_commands())
            .collect();
        if phases.is_empty() {
            return;
        }
        println!("latency per command, µs (load + fold + decide + append, retries included; mean, p50, p99, p99.9: median of runs; max: highest of runs)");
        for (side, imp) in [("framework", Impl::Es), ("raw", Impl::Raw)] {
            println!(
                "{:<5} {:<9} {:>9} {:>9} {:>9} {:>9} {:>10}",
                "phase", side, "mean", "p50", "p99", "p99.9", "max"
            );
            for &phase in &phases {
                let Some(l) = self.summary(phase, imp).and_then(|s| s.latency) else {
                    continue;
                };
                println!(
                    "{:<5} {:<9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
                    phase.to_string(),
                    "",
                    l.mean,
                    l.p50,
                    l.p99,
                    l.p999,
                    l.max
                );
            }
        }
        let ratios: Vec<String> = phases
            .iter()
            .filter_map(|&p| Some(format!("{p} {:.2}", self.p99_ratio(p)?)))
            .collect();
        if !ratios.is_empty() {
            println!("framework p99 / raw p99: {}", ratios.join(", "));
        }
    }

    /// The client's CPU per event, where it was measured.
    fn print_cpu(&self) {
        let cpu: Vec<String> = self
            .order
            .iter()
            .filter_map(|&p| {
                let cpu = |imp| self.summary(p, imp)?.cpu_us;
                Some(format!(
                    "{p} {:.1} / {:.1}",
                    cpu(Impl::Es)?,
                    cpu(Impl::Raw)?
                ))
            })
            .collect();
        if !cpu.is_empty() {
            println!(
                "client CPU per event, µs, framework / raw (user + system of the benchmark process in the timed phase, median of runs): {}",
                cpu.join(", ")
            );
        }
    }

    fn print_goals(&self, args: &Args) {
        let rate = |p, i| self.summary(p, i).map(|s| s.events_per_s);
        let e1 = rate(Phase::E1, Impl::Raw);
        let mut lines = Vec::new();
        // With the framework's state cache, raw reads every stream and the
        // framework does not; with --framework-sql the framework ran on
        // another schema: the rates are shown, not judged.
        let unlike = |phase: Phase| {
            if args.framework_sql.is_some() {
                Some(": not judged (--framework-sql changed the framework's schema)")
            } else if args.aggregate_cache && phase.has_commands() {
                Some(": not judged (--aggregate-cache: raw reads every book's stream, the framework does not)")
            } else {
                None
            }
        };
        // `goal` None: a direction ("approach E1"), not a threshold.
        let versus = |phase: Phase, base: Option<f64>, base_name: &str, goal: Option<f64>| {
            if !self.order.contains(&phase) {
                return None;
            }
            let goal_text = goal.map_or_else(|| "approach it".to_owned(), |g| format!(">= {g}"));
            let line = match (rate(phase, Impl::Es), base) {
                (Some(fw), Some(base)) => {
                    let r = fw / base;
                    let verdict = match (unlike(phase), goal) {
                        (Some(reason), _) => reason,
                        (None, Some(g)) if r >= g => ": met",
                        (None, Some(_)) => ": MISSED",
                        (None, None) => "",
                    };
                    format!("{phase}: framework/{base_name} = {r:.2} (goal {goal_text}){verdict}")
                }
                _ => format!(
                    "{phase}: {base_name} not measured in this invocation (goal {goal_text})"
                ),
            };
            Some(line)
        };
        lines.extend(versus(
            Phase::A,
            rate(Phase::A, Impl::Raw),
            "raw A",
            Some(0.9),
        ));
        lines.extend(versus(Phase::A, e1, "E1", None));
        lines.extend(versus(Phase::B, e1, "E1", Some(0.8)));
        lines.extend(versus(
            Phase::C,
            rate(Phase::C, Impl::Raw),
            "raw C",
            Some(0.9),
        ));
        if self.order.contains(&Phase::C) {
            const P99_GOAL: f64 = 1.5;
            lines.push(match self.p99_ratio(Phase::C) {
                Some(r) => format!(
                    "C: framework p99 latency / raw p99 = {r:.2} (goal <= {P99_GOAL}){}",
                    if let Some(reason) = unlike(Phase::C) {
                        reason
                    } else if r <= P99_GOAL {
                        ": met"
                    } else {
                        ": MISSED"
                    }
                ),
                None => format!(
                    "C: p99 latency of framework or raw not measured in this invocation (goal <= {P99_GOAL})"
                ),
            });
        }
        lines.extend(versus(
            Phase::D,
            rate(Phase::D, Impl::Raw),
            "raw D",
            Some(0.5),
        ));
        if let Some(d) = self.summary(Phase::D, Impl::Es) {
            let ok = d.peak_rss_kib < 64 * 1024;
            lines.push(format!(
                "D: framework peak RSS {} (goal < 64 MiB at --replay-events 1000000, measured at {}){}",
                mib(d.peak_rss_kib),
                args.replay_events,
                unlike(Phase::D).map_or(if ok { ": met" } else { ": MISSED" }, |r| r)
            ));
        }
        if !lines.is_empty() {
            println!("goals (same invocation):");
            for l in lines {
                println!("  {l}");
            }
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
    }
}
