//! The lease table: one row per shard, holding who reads it and how far it is handled.
//!
//! - [`table`]: the row and the conditional operations every lease table keeps;
//! - [`dynamodb`]: the table in DynamoDB; [`memory`]: its in-memory twin (same conditions);
//! - [`store`]: one worker's hands on a table, and the leases it holds.

pub mod dynamodb;
pub mod memory;
pub mod store;
pub mod table;

pub use dynamodb::DynamoDbLeaseTable;
pub use memory::MemoryLeaseTable;
pub use store::{HeldLease, LeaseStore};
pub use table::{
    is_coordination_key, Assignment, BeatRefused, Fleet, Lease, LeaseTable, OwnedWrite, ASSIGNMENT_PREFIX, FLEET_ROW,
    LEASE_TABLE_KEY,
};
