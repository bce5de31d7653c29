//! An SQS queue of the test's own on moto's server ([`TestQueue`]), as a dead-letter destination.

use super::servers::{sqs_endpoint, REGION};
use cruddur_stream_worker::aws::{self, AwsOverrides};

/// A queue of this test's own on the local SQS.
pub struct TestQueue {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
}

impl TestQueue {
    pub async fn create() -> Self {
        let sdk = aws::load_sdk_config(AwsOverrides {
            endpoint_url: Some(sqs_endpoint()),
            region: Some(REGION.to_owned()),
            credentials: Some(("test".to_owned(), "secret".to_owned())),
        })
        .await;
        let client = aws::sqs_client(&sdk);
        let name = format!("dead-letters-{}", uuid::Uuid::new_v4().simple());
        let created = client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .expect("create queue");
        Self {
            client,
            url: created.queue_url.expect("queue url"),
        }
    }

    /// A worker's environment for dead letters to this queue on `sqs` (the local SQS).
    pub fn worker_env<'a>(&'a self, sqs: &'a str) -> [(&'static str, &'a str); 3] {
        [
            ("AWS_ENDPOINT_URL_SQS", sqs),
            ("WORKER_DEAD_LETTER_FILE", ""),
            ("WORKER_DEAD_LETTER_QUEUE_URL", self.url.as_str()),
        ]
    }

    /// Sets the queue's `MaximumMessageSize` (local SQS makes queues of 1 MiB; older queues,
    /// and many templates, have 256 KiB).
    pub async fn limit_messages_to(&self, bytes: usize) {
        self.client
            .set_queue_attributes()
            .queue_url(&self.url)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize,
                bytes.to_string(),
            )
            .send()
            .await
            .expect("set the message size limit");
    }

    /// Every message body in the queue, leaving them there (invisible for a while).
    pub async fn bodies(&self) -> Vec<String> {
        self.bodies_hidden_for(30).await
    }

    /// Every message body in the queue, hidden for `seconds` after (0: visible again at once).
    pub async fn bodies_hidden_for(&self, seconds: i32) -> Vec<String> {
        let mut bodies = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let received = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .visibility_timeout(seconds)
                .send()
                .await
                .expect("receive");
            let messages: Vec<_> = received
                .messages
                .unwrap_or_default()
                .into_iter()
                .filter(|m| seen.insert(m.message_id.clone()))
                .collect();
            if messages.is_empty() {
                return bodies;
            }
            bodies.extend(messages.into_iter().filter_map(|m| m.body));
        }
    }
}
