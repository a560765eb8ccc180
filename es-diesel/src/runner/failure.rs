//! A runner's failures: a projector's error or panic stops the projection
//! at its event, a store error is recorded, both show in the status.

use super::{checkpoints, Runner};
use crate::backend::{write_transaction, DbConnection};
use crate::error::{Error, Result};
use crate::follow::{read_after, Checkpoint, Followed};

impl Runner {
    /// Logs a store error and records it in the status, if this runner
    /// still holds the projection and the database answers.
    pub(super) fn store_failed(&self, conn: &mut DbConnection, error: &Error) {
        tracing::error!(projection = self.name(), node = %self.options.node, error = %error_chain(error), "runner failed on a store error");
        if let Err(e) = self.record_failure(conn, error_position(error), error) {
            tracing::warn!(projection = self.name(), error = %error_chain(&e), "cannot record the runner's error in the projection's status");
        }
    }

    pub(super) fn record_failure(
        &self,
        conn: &mut DbConnection,
        position: Option<i64>,
        error: &Error,
    ) -> Result<()> {
        let message = error_chain(error);
        write_transaction(conn, |c| {
            checkpoints::record_failure(
                c,
                self.projection.name(),
                &self.options.node,
                &message,
                position,
            )
        })
    }

    pub(super) fn clear_failure(&self, conn: &mut DbConnection) -> Result<()> {
        checkpoints::clear_failure(conn, self.projection.name(), &self.options.node)
    }
}

/// The events before an unreadable row, so that they are applied and the
/// projection stops exactly at that row; the error when the row comes first.
pub(super) fn readable_prefix(
    conn: &mut DbConnection,
    after: Checkpoint,
    types: Option<&[&str]>,
    limit: usize,
    error: Error,
) -> Result<Vec<Followed>> {
    // Decoding fails in Rust, not in SQL, so the transaction is still usable.
    let (mut readable, mut unreadable) = (0, limit);
    while unreadable - readable > 1 {
        let mid = readable + (unreadable - readable) / 2;
        match read_after(conn, after, types, mid) {
            Ok(_) => readable = mid,
            Err(_) => unreadable = mid,
        }
    }
    if readable == 0 {
        return Err(error);
    }
    read_after(conn, after, types, readable)
}

/// The event a store error is about, if it names one.
pub(super) fn error_position(error: &Error) -> Option<i64> {
    match error {
        Error::Malformed { position, .. }
        | Error::Decode { position, .. }
        | Error::Projector { position, .. } => Some(*position),
        _ => None,
    }
}

pub(super) fn error_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
