//! Commands against aggregates, and the snapshots that shorten their loads.

pub(crate) mod cache;
pub(crate) mod decide;
pub(crate) mod execute;
mod snapshot;
