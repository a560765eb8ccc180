//! The right to rebuild one read model: one rebuild at a time across
//! processes, held in its `es_read_models` row.

use crate::backend::rows::{MaybeName, Number};
use crate::backend::{per_backend, write_transaction, Bind, DbConnection, Stmt};
use crate::error::{Error, Result};
use diesel::prelude::*;
use std::time::{Duration, Instant};

pub(super) fn needs_build(conn: &mut DbConnection, name: &str) -> Result<bool> {
    Ok(
        Stmt::new("SELECT COUNT(*) AS n FROM es_read_models WHERE name = ? AND rebuilt_at IS NULL")
            .bind(Bind::Text(name))
            .get_result::<Number>(conn)?
            .n
            > 0,
    )
}

/// How long a rebuild's claim lasts without renewal: a rebuild whose
/// process died blocks others this long at most.
const CLAIM_LEASE: Duration = Duration::from_secs(60);

/// The right to rebuild one read model, held in its `es_read_models` row
/// (holder and expiry by the database clock), so it works across processes
/// on every backend. Renewed between batches; checked in the final
/// transaction, so a rebuild that lost it (it stalled past the lease and
/// another took over) cannot swap.
pub(crate) struct Claim {
    name: &'static str,
    pub(super) holder: String,
    renewed: Instant,
}

impl Claim {
    /// Takes the claim, or fails with [`Error::RebuildInProgress`]; with
    /// `wait`, polls until the holder releases it or its lease runs out.
    pub(crate) fn acquire(conn: &mut DbConnection, name: &'static str, wait: bool) -> Result<Self> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "node".to_owned());
        let holder = format!(
            "rebuild {} on {host}:{}",
            uuid::Uuid::new_v4().simple(),
            std::process::id()
        );
        let lease = lease_ms();
        let mut told = false;
        loop {
            // Looked at before trying: a rebuild that is swapping holds the
            // row locked, and an UPDATE would wait for it to finish.
            match current_holder(conn, name)? {
                None => {
                    return Err(Error::ReadModelNotMigrated {
                        read_model: name.to_owned(),
                    })
                }
                Some(Some(other)) if wait => {
                    if !told {
                        tracing::info!(read_model = name, holder = %other, "waiting for another rebuild of the read model");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Some(Some(other)) => {
                    return Err(Error::RebuildInProgress {
                        read_model: name.to_owned(),
                        holder: other,
                    })
                }
                Some(None) => {}
            }
            let d = conn.dialect();
            let sql = per_backend!(d => format!(
                "UPDATE es_read_models SET rebuild_holder = ?, rebuild_expires_ms = {now} + ? \
                 WHERE name = ? AND (rebuild_holder IS NULL OR rebuild_expires_ms < {now})",
                now = d.now_ms()
            ));
            let taken = write_transaction(conn, |c| -> Result<usize> {
                Ok(Stmt::new(sql)
                    .bind(Bind::Text(&holder))
                    .bind(Bind::BigInt(lease))
                    .bind(Bind::Text(name))
                    .execute(c)?)
            })?;
            if taken == 1 {
                return Ok(Claim {
                    name,
                    holder,
                    renewed: Instant::now(),
                });
            }
        }
    }

    /// Unique to this rebuild.
    pub(super) fn token(&self) -> &str {
        self.holder
            .split_whitespace()
            .nth(1)
            .unwrap_or(&self.holder)
    }

    /// Extends the lease when a quarter of it has passed, outside any
    /// transaction.
    pub(super) fn renew(&mut self, conn: &mut DbConnection) -> Result<()> {
        if self.renewed.elapsed() < CLAIM_LEASE / 4 {
            return Ok(());
        }
        write_transaction(conn, |c| self.extend(c))?;
        self.renewed = Instant::now();
        Ok(())
    }

    /// Extends the lease now, failing if another rebuild holds the claim.
    pub(super) fn extend(&self, conn: &mut DbConnection) -> Result<()> {
        let d = conn.dialect();
        let sql = per_backend!(d => format!(
            "UPDATE es_read_models SET rebuild_expires_ms = {} + ? WHERE name = ? AND rebuild_holder = ?",
            d.now_ms()
        ));
        let kept = Stmt::new(sql)
            .bind(Bind::BigInt(lease_ms()))
            .bind(Bind::Text(self.name))
            .bind(Bind::Text(&self.holder))
            .execute(conn)?;
        if kept == 1 {
            Ok(())
        } else {
            Err(self.lost(conn))
        }
    }

    /// In the final transaction: gives the claim up and records the rebuild.
    pub(super) fn finish(&self, conn: &mut DbConnection) -> Result<()> {
        let done = Stmt::new(
            "UPDATE es_read_models SET rebuild_holder = NULL, rebuild_expires_ms = NULL, \
             rebuilt_at = CURRENT_TIMESTAMP WHERE name = ? AND rebuild_holder = ?",
        )
        .bind(Bind::Text(self.name))
        .bind(Bind::Text(&self.holder))
        .execute(conn)?;
        if done == 1 {
            Ok(())
        } else {
            Err(self.lost(conn))
        }
    }

    /// Gives the claim up after a failure, outside any transaction.
    pub(super) fn release(&self, conn: &mut DbConnection) {
        let released = Stmt::new(
            "UPDATE es_read_models SET rebuild_holder = NULL, rebuild_expires_ms = NULL \
             WHERE name = ? AND rebuild_holder = ?",
        )
        .bind(Bind::Text(self.name))
        .bind(Bind::Text(&self.holder))
        .execute(conn);
        if let Err(e) = released {
            tracing::warn!(read_model = self.name, error = %e, "could not release the claim of a failed rebuild; it expires by itself");
        }
    }

    pub(super) fn lost(&self, conn: &mut DbConnection) -> Error {
        let holder = match current_holder(conn, self.name) {
            Ok(Some(Some(h))) => h,
            _ => "another rebuild".to_owned(),
        };
        tracing::warn!(read_model = self.name, holder = %holder, "a rebuild lost its claim to another one and stops");
        Error::RebuildInProgress {
            read_model: self.name.to_owned(),
            holder,
        }
    }
}

fn lease_ms() -> i64 {
    i64::try_from(CLAIM_LEASE.as_millis()).unwrap_or(i64::MAX)
}

/// `None`: no such row; `Some(None)`: nobody holds the claim (or its lease
/// ran out).
fn current_holder(conn: &mut DbConnection, name: &str) -> Result<Option<Option<String>>> {
    let d = conn.dialect();
    let sql = per_backend!(d => format!(
        "SELECT CASE WHEN rebuild_expires_ms < {} THEN NULL ELSE rebuild_holder END AS name \
         FROM es_read_models WHERE name = ?",
        d.now_ms()
    ));
    Ok(Stmt::new(sql)
        .bind(Bind::Text(name))
        .get_result::<MaybeName>(conn)
        .optional()?
        .map(|h| h.name))
}
