//! The lease that makes one runner per projection active across processes:
//! held in the projection's `es_checkpoints` row, by the database clock.

use super::{checkpoints, error_chain, Runner};
use crate::backend::{write_transaction, DbConnection};
use crate::error::Result;
use std::time::Instant;

impl Runner {
    pub(super) fn lease_ms(&self) -> i64 {
        i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes or renews the lease (renewal only once half of it has gone by,
    /// unless `force`). Returns whether this runner holds it.
    pub(super) fn hold_lease(&mut self, conn: &mut DbConnection, force: bool) -> Result<bool> {
        let half = self.options.lease / 2;
        if !force && self.lease_renewed.is_some_and(|t| t.elapsed() < half) {
            return Ok(true);
        }
        let (name, node, lease_ms) = (self.projection.name(), &self.options.node, self.lease_ms());
        // The database clock sets the expiry later than this instant.
        let renewed = Instant::now();
        let taken = write_transaction(conn, |c| -> Result<bool> {
            checkpoints::ensure(c, name)?;
            checkpoints::take_lease(c, name, node, lease_ms)
        })?;
        if taken {
            if self.lease_renewed.is_none() {
                tracing::info!(projection = self.name(), node = %self.options.node, "runner took the projection");
            }
            self.lease_renewed = Some(renewed);
            Ok(true)
        } else {
            if self.lease_renewed.take().is_some() {
                tracing::warn!(projection = self.name(), node = %self.options.node, "runner lost the projection");
            }
            Ok(false)
        }
    }

    /// Gives the lease up so another runner can take over at once. Done by
    /// [`Runner::run`] when it stops, and when a runner is dropped.
    pub fn release(&mut self) {
        if self.lease_renewed.take().is_none() {
            return;
        }
        let released = self.store.connection().and_then(|mut conn| {
            checkpoints::release(&mut conn, self.projection.name(), &self.options.node)
        });
        match released {
            Ok(_) => {
                tracing::info!(projection = self.name(), node = %self.options.node, "runner stopped and released the projection")
            }
            Err(e) => {
                tracing::warn!(projection = self.name(), node = %self.options.node, error = %error_chain(&e), "runner stopped but could not release its lease; another runner takes over when it runs out")
            }
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if std::thread::panicking() && self.lease_renewed.is_some() {
            // Unexpected: projector panics are caught. Status shows the
            // projection stale once the lease runs out, not cleanly stopped.
            tracing::error!(projection = self.name(), node = %self.options.node, "runner panicked; its lease runs out");
            return;
        }
        self.release();
    }
}
