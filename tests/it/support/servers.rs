//! The local services `scripts/test` starts, found through its environment variables: DynamoDB
//! Local (and its control port, which rolls streams over), moto's SQS; and the repository root.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::observers::http_get;
use super::tables::TestDb;
use aws_config::SdkConfig;
use cruddur_stream_worker::aws::{self, AwsOverrides};

pub const REGION: &str = "us-east-1";

/// The DynamoDB Local endpoint `scripts/test` started.
pub fn endpoint() -> String {
    std::env::var("CRUDDUR_TEST_DYNAMODB").unwrap_or_else(|_| {
        panic!("CRUDDUR_TEST_DYNAMODB is not set: run the suite with scripts/test (it starts DynamoDB Local)")
    })
}

/// SDK configuration for `endpoint` with an access key of its own.
pub(super) async fn sdk_for(endpoint: &str, access_key: &str) -> SdkConfig {
    aws::load_sdk_config(AwsOverrides {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some(REGION.to_owned()),
        credentials: Some((access_key.to_owned(), "secret".to_owned())),
    })
    .await
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The moto server `scripts/test` started (a real local SQS).
pub fn sqs_endpoint() -> String {
    std::env::var("CRUDDUR_TEST_SQS")
        .unwrap_or_else(|_| panic!("CRUDDUR_TEST_SQS is not set: run the suite with scripts/test (it starts moto)"))
}

impl TestDb {
    /// through the launcher `scripts/test` starts DynamoDB Local with.
    pub async fn rollover(&self) {
        let control = std::env::var("CRUDDUR_TEST_DYNAMODB_CONTROL")
            .unwrap_or_else(|_| panic!("CRUDDUR_TEST_DYNAMODB_CONTROL is not set: run the suite with scripts/test"));
        let addr: SocketAddr = control.trim_start_matches("http://").parse().expect("control address");
        let (status, body) = http_get(addr, &format!("/rollover?key={}", self.access_key)).await;
        assert_eq!((status, body.as_str()), (200, "1"), "one database rolled over");
    }
}
