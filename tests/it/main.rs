//! End-to-end tests against the real DynamoDB Local (started by `scripts/test`), one binary.
//! Every test works in its own database (its own access key), so they run in parallel.

mod deploy;
mod failures;
mod faults;
mod kinesis;
mod leases;
mod lineage;
mod observability;
mod operations;
mod proxy;
mod sharing;
mod support;
mod transact;
mod updates;
