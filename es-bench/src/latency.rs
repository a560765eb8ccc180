//! Per-command latency of phases A, B and C: the wall time of one command
//! (load + fold + decide + append, its retries included), recorded with one
//! `Instant::now()` per command into a vector allocated before the clock
//! starts (one per writer in C, merged after the clock stops).

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Runs `f` on every command in order, pushing each one's wall time (ns)
/// onto `out`. The clock is read once per command: a command's time runs
/// from the end of the previous one (or the start) to its own end, so it
/// also holds the loop's few nanoseconds of bookkeeping.
pub fn each<C: Copy, E>(
    commands: &[C],
    out: &mut Vec<u64>,
    mut f: impl FnMut(C) -> Result<(), E>,
) -> Result<(), E> {
    let mut last = Instant::now();
    for &c in commands {
        f(c)?;
        let now = Instant::now();
        out.push(u64::try_from((now - last).as_nanos()).unwrap_or(u64::MAX));
        last = now;
    }
    Ok(())
}

/// Latency percentiles of one run (nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub commands: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
}

impl Summary {
    /// Nearest-rank percentiles of `ns` (reordered); `None` if empty.
    pub fn of(ns: &mut [u64]) -> Option<Summary> {
        ns.sort_unstable();
        let max_ns = *ns.last()?;
        let rank = |p: f64| ns[((p * ns.len() as f64).ceil() as usize).clamp(1, ns.len()) - 1];
        Some(Summary {
            commands: ns.len() as u64,
            p50_ns: rank(0.50),
            p99_ns: rank(0.99),
            p999_ns: rank(0.999),
            mean_ns: (ns.iter().map(|&n| u128::from(n)).sum::<u128>() / ns.len() as u128) as u64,
            max_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut ns: Vec<u64> = (1..=200).rev().collect();
        let s = Summary::of(&mut ns).unwrap();
        assert_eq!(
            (s.commands, s.p50_ns, s.p99_ns, s.p999_ns, s.max_ns),
            (200, 100, 198, 200, 200)
        );
        // (1 + … + 200) / 200, rounded down.
        assert_eq!(s.mean_ns, 100);
        let mut ns: Vec<u64> = (1..=2000).collect();
        let s = Summary::of(&mut ns).unwrap();
        assert_eq!((s.p99_ns, s.p999_ns, s.mean_ns), (1980, 1998, 1000));
        assert_eq!(Summary::of(&mut [7]).unwrap().p99_ns, 7);
        assert_eq!(Summary::of(&mut []), None);
    }

    #[test]
    fn each_records_one_time_per_command_and_stops_at_an_error() {
        let mut out = Vec::with_capacity(4);
        each(&[1, 2, 3], &mut out, |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(out.len(), 3);
        out.clear();
        let r = each(
            &[1, 2, 3],
            &mut out,
            |c| if c == 2 { Err(c) } else { Ok(()) },
        );
        assert_eq!((r, out.len()), (Err(2), 1));
    }
}
