//! Asynchronous read models (`#[read_model(mode = async)]`) as runner
//! projections, and the store's methods that start runners.

use super::{AsyncProjection, Runner, RunnerHandle, RunnerOptions};
use crate::backend::DbConnection;
use crate::error::Result;
use crate::EventStore;
use es_core::RecordedEvent;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An asynchronous read model (`#[read_model(mode = async)]`) as a runner
/// sees it: its registered projectors, applied after commit.
struct ReadModelProjection {
    name: &'static str,
    types: Vec<&'static str>,
}

impl AsyncProjection for ReadModelProjection {
    fn name(&self) -> &str {
        self.name
    }

    fn event_types(&self) -> Option<Vec<&'static str>> {
        Some(self.types.clone())
    }

    fn apply(&self, conn: &mut DbConnection, event: &RecordedEvent) -> Result<()> {
        crate::projection::apply_read_model(conn, self.name, event)
    }
}

/// Every registered read model with `mode = async`, as runner projections.
pub fn async_read_models() -> Result<Vec<Arc<dyn AsyncProjection>>> {
    let reg = crate::projection::registry()?;
    Ok(reg
        .read_models
        .iter()
        .filter(|m| m.schema.asynchronous)
        .map(|m| {
            Arc::new(ReadModelProjection {
                name: m.schema.name,
                types: crate::projection::handled_types(reg, m.schema.name),
            }) as Arc<dyn AsyncProjection>
        })
        .collect())
}

impl EventStore {
    /// Starts a background runner for every read model with `mode = async`.
    /// Runners stop when the handles are dropped or stopped. Any number of
    /// processes may do this against one database: one runner per read
    /// model is active at a time.
    #[must_use = "the runners stop when their handles are dropped"]
    pub fn start_async_read_models(&self, options: RunnerOptions) -> Result<Vec<RunnerHandle>> {
        Ok(self.start_runners(async_read_models()?, options))
    }

    /// Runs every `mode = async` read model until `stop` is set (by a signal
    /// handler, for instance), then stops the runners, which release their
    /// leases: the main loop of a dedicated projection worker process.
    pub fn run_async_read_models(&self, options: RunnerOptions, stop: &AtomicBool) -> Result<()> {
        let mut handles = self.start_async_read_models(options)?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // All at once: each finishes its batch while the others do.
        for h in &handles {
            h.stop.store(true, Ordering::Relaxed);
        }
        for h in &mut handles {
            h.shutdown();
        }
        Ok(())
    }

    /// A runner for `projection` with default options.
    pub fn runner(&self, projection: Arc<dyn AsyncProjection>) -> Runner {
        Runner::new(self.clone(), projection, RunnerOptions::default())
    }

    /// Starts one background runner per projection.
    #[must_use = "the runners stop when their handles are dropped"]
    pub fn start_runners(
        &self,
        projections: Vec<Arc<dyn AsyncProjection>>,
        options: RunnerOptions,
    ) -> Vec<RunnerHandle> {
        projections
            .into_iter()
            .map(|p| Runner::new(self.clone(), p, options.clone()).spawn())
            .collect()
    }
}
