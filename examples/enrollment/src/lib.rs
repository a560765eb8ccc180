//! Course enrollment on es-diesel: the canonical rule across streams (a
//! course's capacity, a student's course limit), decided consistently with
//! `EventStore::decide`. See `domain` for the rules and `main.rs` for a run.

pub mod domain;
