//! The GetRecords fast path: the SDK sends the call (signing, endpoint, timeouts, error
//! classification stay its own) and this module decodes a successful answer's body with
//! [`page::decode`] instead of the SDK's decoder.
//!
//! How: an interceptor on the one call swaps the operation's response decoder, just before the
//! answer is decoded, for [`FastDecoder`]; it decodes a success into the call's [`Slot`] and
//! gives the SDK an output holding only the next iterator. An error answer, or a page the fast
//! decoder declines, goes to the SDK's own GetRecords decoder, unchanged.
//!
//! Invariant: a page is in the slot only if the SDK's output carries no records, so the caller
//! reads records from exactly one of the two.
//!
//! Must not: decode anything but GetRecords answers (the interceptor is attached per call).

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodbstreams::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_dynamodbstreams::config::{ConfigBag, FrozenLayer, Intercept, RuntimeComponents, RuntimePlugin};
use aws_sdk_dynamodbstreams::operation::get_records::{GetRecords, GetRecordsOutput};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{Error, Output};
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, OrchestratorError};
use aws_smithy_runtime_api::client::ser_de::{DeserializeResponse, SharedResponseDeserializer};

use super::page::{self, Page};
use crate::lock::lock;

/// Where one call's fast-decoded page waits for its caller.
pub type Slot = Arc<Mutex<Option<Page>>>;

/// The SDK's GetRecords configuration, which holds its own decoder: what the fast path falls
/// back on. `None` if this SDK version does not configure one there (the fast path is then off).
#[derive(Debug, Clone)]
pub struct SdkDecoder(Option<FrozenLayer>);

impl SdkDecoder {
    pub fn new() -> Self {
        let layer = GetRecords::new().config();
        let has_decoder = layer
            .as_ref()
            .is_some_and(|layer| layer.load::<SharedResponseDeserializer>().is_some());
        Self(layer.filter(|_| has_decoder))
    }

    /// The interceptor for one call and the slot its page will wait in; `None` when the fast
    /// path is off.
    pub fn interceptor(&self) -> Option<(FastPath, Slot)> {
        let sdk = self.0.clone()?;
        let slot = Slot::default();
        Some((
            FastPath {
                sdk,
                slot: slot.clone(),
            },
            slot,
        ))
    }
}

/// The per-call interceptor that installs [`FastDecoder`].
#[derive(Debug)]
pub struct FastPath {
    sdk: FrozenLayer,
    slot: Slot,
}

impl Intercept for FastPath {
    fn name(&self) -> &'static str {
        "GetRecordsFastPath"
    }

    fn modify_before_deserialization(
        &self,
        _: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(SharedResponseDeserializer::new(FastDecoder {
                sdk: self.sdk.clone(),
                slot: self.slot.clone(),
            }));
        Ok(())
    }
}

/// Decodes a successful answer into the slot; hands everything else to the SDK's decoder.
#[derive(Debug)]
struct FastDecoder {
    sdk: FrozenLayer,
    slot: Slot,
}

impl DeserializeResponse for FastDecoder {
    fn deserialize_nonstreaming_with_config(
        &self,
        response: &HttpResponse,
        cfg: &ConfigBag,
    ) -> Result<Output, OrchestratorError<Error>> {
        if response.status().is_success() {
            match response.body().bytes().map(page::decode) {
                Some(Ok(page)) => {
                    *lock(&self.slot) = Some(page);
                    return Ok(Output::erase(GetRecordsOutput::builder().build()));
                }
                Some(Err(error)) => tracing::debug!(%error, "GetRecords page left to the SDK's decoder"),
                None => {}
            }
        }
        match self.sdk.load::<SharedResponseDeserializer>() {
            Some(sdk) => sdk.deserialize_nonstreaming_with_config(response, cfg),
            None => Err(OrchestratorError::other("no GetRecords decoder")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_runtime_api::client::http::{
        HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
    };
    use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
    use aws_smithy_runtime_api::http::StatusCode;

    use crate::stream::error::StreamError;
    use crate::stream::source::StreamSource;
    use crate::stream::DynamoDbStreamsSource;

    /// Answers every call with one status and body, without a network.
    #[derive(Debug, Clone)]
    struct Canned(u16, &'static str);

    impl HttpConnector for Canned {
        fn call(&self, _: HttpRequest) -> HttpConnectorFuture {
            let status = StatusCode::try_from(self.0).expect("status");
            HttpConnectorFuture::ready(Ok(HttpResponse::new(status, self.1.into())))
        }
    }

    impl HttpClient for Canned {
        fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
            SharedHttpConnector::new(self.clone())
        }
    }

    fn streams(answer: Canned) -> aws_sdk_dynamodbstreams::Client {
        let config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "test"))
            .endpoint_url("http://127.0.0.1:9")
            .http_client(answer)
            .build();
        aws_sdk_dynamodbstreams::Client::from_conf(config)
    }

    fn source(answer: Canned) -> DynamoDbStreamsSource {
        let tables = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                .build(),
        );
        DynamoDbStreamsSource::new(tables, streams(answer), "t")
    }

    const PAGE: &str = r#"{"NextShardIterator":"next","Records":[
        {"eventName":"INSERT","dynamodb":{"SequenceNumber":"7","Keys":{"pk":{"S":"a"}},"NewImage":{"pk":{"S":"a"}}}}]}"#;
    /// A page the fast decoder declines (a null member inside a value), which the SDK reads.
    const DECLINED: &str = r#"{"NextShardIterator":"next","Records":[
        {"eventName":"INSERT","dynamodb":{"SequenceNumber":"7","Keys":{"pk":{"S":"a","N":null}}}}]}"#;

    /// One GetRecords call answered with `body`, through the fast path's interceptor.
    async fn with_fast_path(body: &'static str) -> (GetRecordsOutput, Slot) {
        let (interceptor, slot) = SdkDecoder::new().interceptor().expect("the SDK configures its decoder");
        let output = streams(Canned(200, body))
            .get_records()
            .shard_iterator("it")
            .customize()
            .interceptor(interceptor)
            .send()
            .await
            .expect("answered");
        (output, slot)
    }

    #[tokio::test]
    async fn a_successful_page_is_decoded_into_the_slot_and_not_by_the_sdk() {
        let (output, slot) = with_fast_path(PAGE).await;
        assert!(output.records.is_none(), "the SDK decoded the page as well");
        let page = lock(&slot).take().expect("the fast path decoded the page");
        assert_eq!(page.records.len(), 1);
        assert_eq!(page.next_iterator.as_deref(), Some("next"));
    }

    #[tokio::test]
    async fn a_page_the_fast_path_declines_is_read_by_the_sdk() {
        let (output, slot) = with_fast_path(DECLINED).await;
        assert!(lock(&slot).is_none());
        assert_eq!(output.records.map(|records| records.len()), Some(1));
        let batch = source(Canned(200, DECLINED)).read("it", 100).await.expect("read");
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.records[0].sequence_number.text(), "7");
        assert_eq!(batch.next_iterator.as_deref(), Some("next"));
    }

    #[tokio::test]
    async fn the_source_reads_fast_pages_and_keeps_the_sdks_errors() {
        let batch = source(Canned(200, PAGE)).read("it", 100).await.expect("read");
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.next_iterator.as_deref(), Some("next"));
        let expired = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ExpiredIteratorException","message":"expired"}"#;
        let error = source(Canned(400, expired))
            .read("it", 100)
            .await
            .expect_err("an error");
        assert!(matches!(error, StreamError::ExpiredIterator), "{error:?}");
    }
}
