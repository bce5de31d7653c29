pub mod aws;
pub mod dispatch;
pub mod retry;
pub mod stream;
pub mod telemetry;
