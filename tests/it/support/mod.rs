//! Shared test plumbing, by concern:
//! - [`servers`]: the local services `scripts/test` starts (DynamoDB Local, its control port,
//!   moto's SQS) and where the repository is;
//! - [`tables`]: a database of its own per test ([`TestDb`]), the app's writes, and reading
//!   the table and its stream back;
//! - [`workers`]: a worker in this process ([`TestWorker`]) or as its own process
//!   ([`ChildWorker`]), and the binary's commands;
//! - [`observers`]: metrics, HTTP, waiting, the lease-table watch, dead letters;
//! - [`kinesis`]: a Kinesis stream of the test's own on kinesalite ([`TestKinesis`]);
//! - [`queue`]: an SQS queue of the test's own ([`TestQueue`]).

pub mod kinesis;
pub mod observers;
pub mod queue;
pub mod servers;
pub mod tables;
pub mod workers;

pub use kinesis::*;
pub use observers::*;
pub use queue::*;
pub use servers::*;
pub use tables::*;
pub use workers::*;
