//! Medians, the table, the JSON lines, and the goals of the issue.

use crate::child::Sample;
use crate::workload::State;
use crate::{Args, BackendArg, Impl, Phase, Result};
use serde::Serialize;
use std::collections::BTreeMap;

enum Entry {
    Samples(Vec<Sample>),
    NotAvailable,
}

/// Everything measured on one backend.
pub struct Results {
    backend: BackendArg,
    /// How the server runs (PostgreSQL), for the table's header.
    pub server: Option<String>,
    order: Vec<Phase>,
    entries: BTreeMap<(Phase, Impl), Entry>,
}

/// A (phase, implementation) summarized over its runs.
struct Summary {
    events: i64,
    events_per_s: f64,
    peak_rss_kib: u64,
    state: State,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    phase: Phase,
    #[serde(rename = "impl")]
    imp: Impl,
    backend: String,
    events: Option<i64>,
    events_per_s: Option<f64>,
    peak_rss_kib: Option<u64>,
    state: Option<State>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

const NOT_AVAILABLE: &str = "not available yet";

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len() % 2 == 0 {
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
        match self
            .entries
            .entry((phase, imp))
            .or_insert_with(|| Entry::Samples(Vec::new()))
        {
            Entry::Samples(v) => v.push(sample),
            Entry::NotAvailable => unreachable!("{phase} {imp} was recorded as not available"),
        }
    }

    pub fn not_available(&mut self, phase: Phase, imp: Impl) {
        self.note_phase(phase);
        self.entries.insert((phase, imp), Entry::NotAvailable);
    }

    /// Median rate and the highest peak RSS over the runs.
    fn summary(&self, phase: Phase, imp: Impl) -> Option<Summary> {
        match self.entries.get(&(phase, imp))? {
            Entry::Samples(v) if !v.is_empty() => Some(Summary {
                events: v[0].events,
                events_per_s: median(v.iter().map(Sample::events_per_s).collect()),
                peak_rss_kib: v.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0),
                state: v[0].state,
            }),
            _ => None,
        }
    }

    fn is_not_available(&self, phase: Phase, imp: Impl) -> bool {
        matches!(self.entries.get(&(phase, imp)), Some(Entry::NotAvailable))
    }

    pub fn print_json(&self) -> Result<()> {
        for &phase in &self.order {
            for imp in [Impl::Es, Impl::Raw] {
                let line = if let Some(s) = self.summary(phase, imp) {
                    JsonLine {
                        phase,
                        imp,
                        backend: self.backend.to_string(),
                        events: Some(s.events),
                        events_per_s: Some(s.events_per_s),
                        peak_rss_kib: Some(s.peak_rss_kib),
                        state: Some(s.state),
                        note: None,
                    }
                } else if self.is_not_available(phase, imp) {
                    JsonLine {
                        phase,
                        imp,
                        backend: self.backend.to_string(),
                        events: None,
                        events_per_s: None,
                        peak_rss_kib: None,
                        state: None,
                        note: Some(NOT_AVAILABLE),
                    }
                } else {
                    continue;
                };
                println!("{}", serde_json::to_string(&line)?);
            }
        }
        Ok(())
    }

    pub fn print_table(&self, args: &Args) {
        let durability = match self.backend {
            BackendArg::Postgres => self
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
            "== {}: --events {} --replay-events {} --runs {} (events/s = median of runs; peak RSS = max ru_maxrss of the run's process)",
            self.backend, args.events, args.replay_events, args.runs
        );
        println!("   durability: {durability}");
        println!("   state per command: load the whole book stream and fold it (no snapshot, no cache), both implementations");
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
            let es_rate = match &es {
                Some(s) => format!("{:.0}", s.events_per_s),
                None if self.is_not_available(phase, Impl::Es) => NOT_AVAILABLE.to_owned(),
                None => "-".to_owned(),
            };
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
        self.print_goals(args);
    }

    fn print_goals(&self, args: &Args) {
        let rate = |p, i| self.summary(p, i).map(|s| s.events_per_s);
        let e1 = rate(Phase::E1, Impl::Raw);
        let mut lines = Vec::new();
        // `goal` None: a direction ("approach E1"), not a threshold.
        let mut versus = |phase: Phase, base: Option<f64>, base_name: &str, goal: Option<f64>| {
            if !self.order.contains(&phase) {
                return;
            }
            let goal_text = goal.map_or_else(|| "approach it".to_owned(), |g| format!(">= {g}"));
            let line = match (rate(phase, Impl::Es), base) {
                (Some(fw), Some(base)) => {
                    let r = fw / base;
                    let verdict = match goal {
                        Some(g) if r >= g => ": met",
                        Some(_) => ": MISSED",
                        None => "",
                    };
                    format!("{phase}: framework/{base_name} = {r:.2} (goal {goal_text}){verdict}")
                }
                (None, _) if self.is_not_available(phase, Impl::Es) => {
                    format!("{phase}: framework {NOT_AVAILABLE} (goal framework/{base_name} {goal_text})")
                }
                _ => format!(
                    "{phase}: {base_name} not measured in this invocation (goal {goal_text})"
                ),
            };
            lines.push(line);
        };
        versus(Phase::A, rate(Phase::A, Impl::Raw), "raw A", Some(0.9));
        versus(Phase::A, e1, "E1", None);
        versus(Phase::B, e1, "E1", Some(0.8));
        versus(Phase::C, rate(Phase::C, Impl::Raw), "raw C", Some(0.9));
        versus(Phase::D, rate(Phase::D, Impl::Raw), "raw D", Some(0.5));
        if let Some(d) = self.summary(Phase::D, Impl::Es) {
            let ok = d.peak_rss_kib < 64 * 1024;
            lines.push(format!(
                "D: framework peak RSS {} (goal < 64 MiB at --replay-events 1000000, measured at {}): {}",
                mib(d.peak_rss_kib),
                args.replay_events,
                if ok { "met" } else { "MISSED" }
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
