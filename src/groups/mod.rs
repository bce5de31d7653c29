//! The Cruddur side: what a message row and a group row are, how a message moves its
//! conversation's group rows, and the admin commands that write rows the way the app does.
//!
//! Invariants the updater keeps (see [`updater`] and [`plan`]): a group row never moves
//! backwards; replayed and late records change nothing; each participant keeps exactly one row
//! per conversation, and no crash can leave zero or two.

pub mod admin;
pub mod memory;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod timestamp;
pub mod updater;
