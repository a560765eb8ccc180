//! Commands against aggregates, and the snapshots that shorten their loads.

pub(crate) mod decide;
pub(crate) mod execute;
mod snapshot;
