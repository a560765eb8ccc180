//! The timed phase's clock: its wall time, and the process's CPU time over
//! exactly the same window, which the run child reports.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// CPU time of this process (every thread), in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub total: f64,
    /// The kernel's part of `total`.
    pub system: f64,
}

/// The CPU time of the last window a [`Clock`] measured.
static TIMED_CPU: Mutex<Option<Cpu>> = Mutex::new(None);

/// Started where a phase's timing starts, stopped where it stops.
pub struct Clock {
    wall: Instant,
    cpu: Option<Cpu>,
}

impl Clock {
    pub fn start() -> Clock {
        let cpu = cpu_time();
        Clock {
            wall: Instant::now(),
            cpu,
        }
    }

    /// The wall time since [`Clock::start`]; records the CPU time too.
    pub fn stop(self) -> Duration {
        let elapsed = self.wall.elapsed();
        let cpu = match (cpu_time(), self.cpu) {
            (Some(now), Some(before)) => Some(Cpu {
                total: now.total - before.total,
                system: now.system - before.system,
            }),
            _ => None,
        };
        *TIMED_CPU.lock().unwrap_or_else(|e| e.into_inner()) = cpu;
        elapsed
    }
}

/// The CPU time of the window the last stopped [`Clock`] measured.
pub fn timed_cpu() -> Option<Cpu> {
    *TIMED_CPU.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's CPU time so far.
fn cpu_time() -> Option<Cpu> {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let system = secs(usage.ru_stime);
    Some(Cpu {
        total: secs(usage.ru_utime) + system,
        system,
    })
}
