//! AWS clients and the classification of their errors.
//!
//! Owns how SDK clients are built (endpoints, region and credentials from aws-config's default
//! chain, or explicit overrides for tests), the one place that decides whether an SDK error
//! is worth retrying, and group commit of independent transactions ([`transact`]) and reads by
//! key ([`reads`]) over one shared core ([`combine`]). The SDK's
//! own retries are turned off: every retry goes through [`crate::retry`], so each is classified
//! the same way, counted and logged.
//!
//! Must not: know any table, stream or record shape.

use std::error::Error as StdError;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::retry::Retryable;

mod combine;
pub mod reads;
pub mod transact;

/// Error codes that mean "try again later" across DynamoDB, DynamoDB Streams, Kinesis and SQS.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Explicit connection settings; `None` falls back to aws-config's default chain
/// (`AWS_ENDPOINT_URL*`, `AWS_REGION`, credentials from the environment, profile or task role).
#[derive(Debug, Clone, Default)]
pub struct AwsOverrides {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<(String, String)>,
}

/// Loads the shared SDK configuration with the worker's timeouts and without SDK retries.
pub async fn load_sdk_config(overrides: AwsOverrides) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        );
    if let Some(url) = overrides.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = overrides.region {
        loader = loader.region(Region::new(region));
    }
    if let Some((key, secret)) = overrides.credentials {
        loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            key, secret, None, None, "explicit",
        ));
    }
    loader.load().await
}

pub fn dynamodb_client(config: &SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(config)
}

pub fn streams_client(config: &SdkConfig) -> aws_sdk_dynamodbstreams::Client {
    aws_sdk_dynamodbstreams::Client::new(config)
}

pub fn kinesis_client(config: &SdkConfig) -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(config)
}

pub fn sqs_client(config: &SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
}

/// Creates a table unless it exists, then waits until it is ACTIVE. `shape` fills in keys,
/// indexes and stream settings; the table name is set here. Safe to run concurrently with
/// another creator of the same table.
pub async fn create_table_if_missing(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    shape: impl FnOnce(
        aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder,
    ) -> aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder,
) -> Result<bool, AwsError> {
    use aws_sdk_dynamodb::operation::create_table::CreateTableError;
    use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
    use aws_sdk_dynamodb::types::TableStatus;

    // Look before creating: a worker whose role may not create tables (least privilege, the
    // table made by CloudFormation) must still start.
    let exists = match client.describe_table().table_name(table).send().await {
        Ok(_) => true,
        Err(error)
            if matches!(
                error.as_service_error(),
                Some(DescribeTableError::ResourceNotFoundException(_))
            ) =>
        {
            false
        }
        Err(error) => return Err(AwsError::from_sdk("DescribeTable", &error)),
    };
    let created = !exists
        && match shape(client.create_table().table_name(table)).send().await {
            Ok(_) => true,
            // Someone else created it meanwhile.
            Err(error)
                if matches!(
                    error.as_service_error(),
                    Some(CreateTableError::ResourceInUseException(_))
                ) =>
            {
                false
            }
            Err(error) => return Err(AwsError::from_sdk("CreateTable", &error)),
        };
    // Bounded wait: DynamoDB Local is ACTIVE at once, real DynamoDB within seconds.
    for _ in 0..600 {
        match client.describe_table().table_name(table).send().await {
            Ok(output) => {
                if output.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                    return Ok(created);
                }
            }
            Err(error)
                if matches!(
                    error.as_service_error(),
                    Some(DescribeTableError::ResourceNotFoundException(_))
                ) => {}
            Err(error) => return Err(AwsError::from_sdk("DescribeTable", &error)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(AwsError {
        operation: "CreateTable",
        code: None,
        message: format!("table {table} did not become ACTIVE within 120 s"),
        retryable: true,
    })
}

/// A DynamoDB item as the DynamoDB client represents it.
pub type Item = std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>;

/// Follows `LastEvaluatedKey` until the last page; `page` fetches the page after a key and
/// `each` takes its items.
async fn for_each_page<F, Fut>(mut page: F, mut each: impl FnMut(Vec<Item>)) -> Result<(), AwsError>
where
    F: FnMut(Option<Item>) -> Fut,
    Fut: std::future::Future<Output = Result<(Option<Vec<Item>>, Option<Item>), AwsError>>,
{
    let mut start_key = None;
    loop {
        let (page_items, last_key) = page(start_key.take()).await?;
        each(page_items.unwrap_or_default());
        match last_key {
            Some(key) if !key.is_empty() => start_key = Some(key),
            _ => return Ok(()),
        }
    }
}

async fn collect_pages<F, Fut>(page: F) -> Result<Vec<Item>, AwsError>
where
    F: FnMut(Option<Item>) -> Fut,
    Fut: std::future::Future<Output = Result<(Option<Vec<Item>>, Option<Item>), AwsError>>,
{
    let mut items = Vec::new();
    for_each_page(page, |page| items.extend(page)).await?;
    Ok(items)
}

/// Every page of a Scan, handed to `each` as it arrives (for tables too big to hold at once);
/// each page is retried under `policy`.
pub async fn scan_pages(
    scan: aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder,
    policy: &crate::retry::RetryPolicy,
    each: impl FnMut(Vec<Item>),
) -> Result<(), AwsError> {
    for_each_page(
        |start| {
            let request = scan.clone().set_exclusive_start_key(start);
            async move {
                let output = crate::retry::retry(policy, "scan", || async {
                    request
                        .clone()
                        .send()
                        .await
                        .map_err(|error| AwsError::from_sdk("Scan", &error))
                })
                .await?;
                Ok((output.items, output.last_evaluated_key))
            }
        },
        each,
    )
    .await
}

/// Every item a Query returns, all pages.
pub async fn query_all(
    query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
) -> Result<Vec<Item>, AwsError> {
    collect_pages(|start| {
        let request = query.clone().set_exclusive_start_key(start);
        async move {
            let output = request
                .send()
                .await
                .map_err(|error| AwsError::from_sdk("Query", &error))?;
            Ok((output.items, output.last_evaluated_key))
        }
    })
    .await
}

/// Every item a Scan returns, all pages.
pub async fn scan_all(
    scan: aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder,
) -> Result<Vec<Item>, AwsError> {
    collect_pages(|start| {
        let request = scan.clone().set_exclusive_start_key(start);
        async move {
            let output = request
                .send()
                .await
                .map_err(|error| AwsError::from_sdk("Scan", &error))?;
            Ok((output.items, output.last_evaluated_key))
        }
    })
    .await
}

/// A failed AWS call, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} failed{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
pub struct AwsError {
    pub operation: &'static str,
    /// The service's error code, when the service answered.
    pub code: Option<String>,
    pub message: String,
    pub retryable: bool,
}

impl Retryable for AwsError {
    fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl AwsError {
    /// Classifies any SDK error of either client.
    pub fn from_sdk<E>(operation: &'static str, error: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + StdError + 'static,
    {
        let code = error.code().map(str::to_owned);
        let retryable = match error {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
            SdkError::DispatchFailure(failure) => !failure.is_user(),
            SdkError::ServiceError(context) => {
                let status = context.raw().status().as_u16();
                status >= 500 || status == 429 || code.as_deref().is_some_and(|c| RETRYABLE_CODES.contains(&c))
            }
            _ => false,
        };
        Self {
            operation,
            code,
            // The service's own message when it answered (never the raw response: logs carry
            // this); the error chain otherwise (timeouts, connection failures).
            message: match error {
                SdkError::ServiceError(_) => error.message().unwrap_or("(no message)").to_owned(),
                _ => DisplayErrorContext(error).to_string(),
            },
            retryable,
        }
    }

    /// A request this program could not even build (a missing required field): a bug, never
    /// worth retrying.
    pub fn invalid_request(operation: &'static str, error: impl std::fmt::Display) -> Self {
        Self {
            operation,
            code: None,
            message: format!("could not build the request: {error}"),
            retryable: false,
        }
    }

    /// True when the service answered with this error code.
    pub fn is_code(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_conflicts_are_retryable_by_code() {
        for code in [
            "ThrottlingException",
            "TransactionConflictException",
            "LimitExceededException",
        ] {
            assert!(RETRYABLE_CODES.contains(&code));
        }
        assert!(!RETRYABLE_CODES.contains(&"ValidationException"));
        assert!(!RETRYABLE_CODES.contains(&"ConditionalCheckFailedException"));
    }
}
