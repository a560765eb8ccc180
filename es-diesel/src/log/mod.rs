//! The event log: appending, reading, following.

pub(crate) mod append;
pub mod follow;
pub(crate) mod query;
pub(crate) mod read;
