//! The store's schema: its migrations, the typed event views, the tables of
//! read models.

pub(crate) mod migrations;
mod read_models;
mod tags;
mod views;
