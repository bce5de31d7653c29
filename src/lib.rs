//! cruddur-stream-worker: keeps Cruddur's conversation list current from the
//! `cruddur-messages` table's DynamoDB stream.
//!
//! # Layout
//!
//! Data flows one way — source → dispatch → handler → checkpoint — and imports point down:
//!
//! ```text
//! cli ──► app ──► config ──► each layer's settings struct
//!           │
//!           └──► stream ◄── dispatch ◄── groups
//!                  │           │           │
//!                  └───────────┴───────────┴──► aws, retry, telemetry, http, lock
//! ```
//!
//! - [`cli`]: the binary's commands, exit codes, signals.
//! - [`app`]: wires settings, clients, source, dispatcher, updater, HTTP; nothing else knows all.
//! - [`config`]: layered settings, validated once; builds each layer's settings struct.
//! - [`aws`]: SDK clients, paging helpers, the one place that classifies AWS errors, and group
//!   commit of independent transactions into shared calls ([`aws::transact`]).
//! - [`stream`]: generic stream reading — sources, shard lineage, readers, the lease round,
//!   leases (DynamoDB and an in-memory twin behind one trait), checkpoints.
//!   Defines the [`stream::Consumer`] trait; knows nothing of Cruddur.
//! - [`dispatch`]: per-key ordered fan-out with bounded in-flight work and the per-shard
//!   checkpoint watermark; implements `stream::Consumer` for any [`dispatch::Handler`].
//! - [`groups`]: the Cruddur data model, the group-summary updater (a `dispatch::Handler`),
//!   and the admin commands (setup, seed, send, listings).
//! - [`deadletter`]: records that failed for good, stored (SQS queue or JSON-lines file) with
//!   what replays them, fitted to the destination; `redrive` reads them back.
//! - [`retry`]: capped exponential backoff with full jitter.
//! - [`telemetry`]: metric names and descriptions, logging.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`lock`]: the one mutex helper.
//!
//! docs/ARCHITECTURE.md draws the layers and says where each coordination rule lives.

pub mod app;
pub mod aws;
pub mod cli;
pub mod config;
pub mod deadletter;
pub mod dispatch;
pub mod groups;
#[cfg(test)]
mod heap_probe;
pub mod http;
pub mod lock;
pub mod retry;
pub mod stream;
pub mod telemetry;
