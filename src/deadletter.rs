//! Dead letters: records the worker gave up on, kept with everything needed to replay them.
//!
//! Owns the dead-letter format (one JSON object per letter: shard, sequence number, reason,
//! error, attempts, and the change record itself in DynamoDB JSON, so `redrive` can replay it)
//! and its two destinations: an SQS queue (production) and a JSON-lines file (local runs).
//!
//! Letters fit their destination: a queue's `MaximumMessageSize` (read at start-up, 256 KiB
//! unless the queue says otherwise). A letter too large keeps its record's keys but not its
//! new image (`record_trimmed`: redrive reads the row back from the table by key), and one that
//! covers more folded records than fit is split into several letters, each with the record and
//! a share of the covered records' keys, so every covered message can be replayed.
//!
//! Errors are classified: an unreachable destination (network, throttling, 5xx, a file system
//! error) is retried and the shard waits; a permanent one (too large, access denied, queue
//! missing) is reported as such, for the caller to stop on.
//!
//! Invariants:
//! - [`DeadLetterDestination::write`] returns only once the letter is stored (the file synced
//!   to disk, the queue's SendMessage answered); the caller must not checkpoint past a record
//!   before that.
//! - Redrive never loses a letter: a file is claimed by renaming it under a lock (writers lock
//!   too and follow the rename), and is deleted only after every letter in it was replayed or
//!   written back; a queue message is deleted only after its letter was replayed or written back.
//!
//! Must not: decide what fails (that is dispatch's) or what a record means. Letters hold message
//! text; they are data, never logged.

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::aws::AwsError;
use crate::retry::Retryable;
use crate::stream::{change, Record, RecordKeys, SequenceNumber, ShardId};

/// One record the worker gave up on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub shard: String,
    pub sequence_number: String,
    /// Why it failed for good: a low-cardinality label (the metric's `reason`).
    pub reason: String,
    /// The last error, for people.
    pub error: String,
    /// Attempts made to apply it; 0 when it was rejected without one (it does not decode).
    pub attempts: u32,
    /// RFC 3339, UTC.
    pub failed_at: String,
    pub worker_id: String,
    /// Earlier records of the same key folded into this one (their sequence numbers and keys):
    /// redrive replays them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<Covered>,
    /// The change record, as Kinesis carries DynamoDB change records.
    pub record: serde_json::Value,
    /// The record's new image was left out to fit the destination: only its keys are kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_trimmed: bool,
}

/// A record a letter covers besides its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Covered {
    /// With its keys (DynamoDB JSON), so that redrive can read it back from the table.
    Record {
        sequence_number: String,
        keys: serde_json::Value,
    },
    /// Letters written before keys were kept: a sequence number only.
    Sequence(String),
}

impl Covered {
    pub fn new(record: &RecordKeys) -> Self {
        Covered::Record {
            sequence_number: record.sequence_number.to_string(),
            keys: record.keys_json(),
        }
    }

    pub fn sequence_number(&self) -> &str {
        match self {
            Covered::Record { sequence_number, .. } | Covered::Sequence(sequence_number) => sequence_number,
        }
    }

    /// The covered record as keys only (an INSERT with no image), when its keys were kept.
    pub fn record(&self) -> Option<Record> {
        let Covered::Record { sequence_number, keys } = self else {
            return None;
        };
        let sequence = SequenceNumber::parse(sequence_number)?;
        let change = serde_json::json!({ "eventName": "INSERT", "dynamodb": { "Keys": keys } });
        Some(change::from_json(sequence, &change, None))
    }
}

impl DeadLetter {
    pub fn new(shard: &ShardId, record: &Record, reason: &str, error: String, attempts: u32, worker_id: &str) -> Self {
        Self {
            shard: shard.0.clone(),
            sequence_number: record.sequence_number.to_string(),
            reason: reason.to_owned(),
            error,
            attempts,
            failed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            worker_id: worker_id.to_owned(),
            covers: Vec::new(),
            record: change::to_json(record),
            record_trimmed: false,
        }
    }

    /// The record to replay.
    pub fn record(&self) -> Result<Record, DeadLetterError> {
        let sequence = SequenceNumber::parse(&self.sequence_number)
            .ok_or_else(|| DeadLetterError::Invalid(format!("sequence number {:?}", self.sequence_number)))?;
        Ok(change::from_json(sequence, &self.record, None))
    }

    /// The same letter after another failed attempt (by `redrive`).
    pub fn failed_again(mut self, reason: &str, error: String, attempts: u32) -> Self {
        self.reason = reason.to_owned();
        self.error = error;
        self.attempts = self.attempts.saturating_add(attempts);
        self.failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self
    }

    fn to_json_line(&self) -> Result<String, DeadLetterError> {
        let mut line = self.to_json()?;
        line.push('\n');
        Ok(line)
    }

    fn to_json(&self) -> Result<String, DeadLetterError> {
        serde_json::to_string(self).map_err(|error| DeadLetterError::Invalid(error.to_string()))
    }

    /// This letter as letters of at most `max_bytes` each (see the module docs): itself when it
    /// fits; else with its record trimmed to its keys and its covered records shared out.
    pub fn fit(mut self, max_bytes: usize) -> Result<Vec<DeadLetter>, DeadLetterError> {
        if self.to_json()?.len() <= max_bytes {
            return Ok(vec![self]);
        }
        if let Some(dynamodb) = self.record.get_mut("dynamodb").and_then(|d| d.as_object_mut()) {
            dynamodb.remove("NewImage");
        }
        self.record_trimmed = true;
        let covers = std::mem::take(&mut self.covers);
        let base = self.to_json()?.len();
        if base > max_bytes {
            return Err(DeadLetterError::TooLarge(format!(
                "{base} bytes with the record's keys alone, over the destination's {max_bytes}"
            )));
        }
        let mut pieces = vec![self.clone()];
        let mut size = base;
        for covered in covers {
            // The entry, a comma, and the `"covers":[]` a first entry brings.
            let entry = serde_json::to_string(&covered)
                .map_err(|e| DeadLetterError::Invalid(e.to_string()))?
                .len()
                + 14;
            if size + entry > max_bytes && pieces.last().is_some_and(|piece| !piece.covers.is_empty()) {
                pieces.push(self.clone());
                size = base;
            }
            size += entry;
            if let Some(piece) = pieces.last_mut() {
                piece.covers.push(covered);
            }
        }
        Ok(pieces)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("not a dead letter: {0}")]
    Invalid(String),
    #[error("could not build the request: {0}")]
    Request(String),
    #[error("a dead letter cannot fit the destination: {0}")]
    TooLarge(String),
}

impl Retryable for DeadLetterError {
    /// File system errors are retried (a full disk, a directory that comes back); an AWS error
    /// as classified (throttling, 5xx and network: yes; too large, access denied, no such
    /// queue: no).
    fn is_retryable(&self) -> bool {
        match self {
            DeadLetterError::Io { .. } => true,
            DeadLetterError::Aws(error) => error.is_retryable(),
            DeadLetterError::Invalid(_) | DeadLetterError::Request(_) | DeadLetterError::TooLarge(_) => false,
        }
    }
}

/// A queue's message size limit when it does not say (256 KiB: SQS's limit until 2025 and the
/// default of queues made before; queues may now allow up to 1 MiB, read at start-up).
pub const DEFAULT_QUEUE_MESSAGE_BYTES: usize = 262_144;

/// Where dead letters go.
#[derive(Debug, Clone)]
pub enum DeadLetterDestination {
    /// JSON lines appended to a file.
    File(PathBuf),
    /// One SQS message per letter, of at most `max_bytes` (the queue's `MaximumMessageSize`,
    /// read by [`DeadLetterDestination::check`]).
    Queue {
        client: aws_sdk_sqs::Client,
        url: String,
        max_bytes: usize,
    },
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveCounts {
    /// Letters replayed successfully, and removed.
    pub replayed: usize,
    /// Letters that failed again and were written back.
    pub kept: usize,
    /// Entries that are not dead letters, left where they were (file) or in the queue.
    pub unreadable: usize,
}

impl DeadLetterDestination {
    /// For logs and errors.
    pub fn describe(&self) -> String {
        match self {
            DeadLetterDestination::File(path) => format!("file {}", path.display()),
            DeadLetterDestination::Queue { url, .. } => format!("queue {url}"),
        }
    }

    /// Checks at start-up that the destination can be written, where that can be checked
    /// without writing a letter: a file's directory exists and the file opens for appending; a
    /// queue exists and answers these credentials (`GetQueueAttributes`), whose
    /// `MaximumMessageSize` letters are then fitted to. A queue that cannot be reached for now
    /// is not an error (a warning: letters wait for it); one that answers no is.
    pub async fn check(&mut self) -> Result<(), DeadLetterError> {
        match self {
            DeadLetterDestination::File(path) => {
                let owned = path.clone();
                blocking(path, move || {
                    OpenOptions::new().create(true).append(true).open(&owned).map(drop)
                })
                .await
            }
            DeadLetterDestination::Queue { client, url, max_bytes } => {
                use aws_sdk_sqs::types::QueueAttributeName;
                let answer = client
                    .get_queue_attributes()
                    .queue_url(url.as_str())
                    .attribute_names(QueueAttributeName::MaximumMessageSize)
                    .send()
                    .await
                    .map_err(|error| AwsError::from_sdk("GetQueueAttributes", &error));
                let output = match answer {
                    Ok(output) => output,
                    // Down for now: letters wait for it (the shard with them), as at any time.
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(queue = %url, error = %error, max_bytes = *max_bytes, "dead-letter queue not reachable at start; letters will wait for it");
                        return Ok(());
                    }
                    Err(error) => return Err(error.into()),
                };
                if let Some(limit) = output
                    .attributes
                    .and_then(|attributes| attributes.get(&QueueAttributeName::MaximumMessageSize).cloned())
                    .and_then(|limit| limit.parse().ok())
                {
                    *max_bytes = limit;
                }
                Ok(())
            }
        }
    }

    /// Stores one letter (as several when it must be split to fit); returns once it is durable.
    pub async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        match self {
            DeadLetterDestination::File(path) => {
                let line = letter.to_json_line()?;
                let owned = path.clone();
                blocking(path, move || append_line(&owned, line.as_bytes())).await
            }
            DeadLetterDestination::Queue { client, url, max_bytes } => {
                for piece in letter.clone().fit(*max_bytes)? {
                    client
                        .send_message()
                        .queue_url(url)
                        .message_body(piece.to_json()?)
                        .send()
                        .await
                        .map_err(|error| AwsError::from_sdk("SendMessage", &error))?;
                }
                Ok(())
            }
        }
    }

    /// Takes every stored letter and hands it to `replay`: `Ok` removes it, `Err` hands back
    /// the letter to store again (after another failure).
    pub async fn redrive<F, Fut>(&self, mut replay: F) -> Result<RedriveCounts, DeadLetterError>
    where
        F: FnMut(DeadLetter) -> Fut,
        Fut: Future<Output = Result<(), DeadLetter>>,
    {
        let mut counts = RedriveCounts::default();
        match self {
            DeadLetterDestination::File(path) => {
                let owned = path.clone();
                let claimed = blocking(path, move || claim(&owned)).await?;
                for file in claimed {
                    let text = fs::read_to_string(&file).map_err(|source| DeadLetterError::Io {
                        path: file.clone(),
                        source,
                    })?;
                    for line in text.lines().filter(|line| !line.trim().is_empty()) {
                        let Ok(letter) = serde_json::from_str::<DeadLetter>(line) else {
                            counts.unreadable += 1;
                            let (owned, raw) = (path.clone(), format!("{line}\n"));
                            blocking(path, move || append_line(&owned, raw.as_bytes())).await?;
                            continue;
                        };
                        match replay(letter).await {
                            Ok(()) => counts.replayed += 1,
                            Err(again) => {
                                counts.kept += 1;
                                self.write(&again).await?;
                            }
                        }
                    }
                    fs::remove_file(&file).map_err(|source| DeadLetterError::Io { path: file, source })?;
                }
            }
            DeadLetterDestination::Queue { client, url, .. } => {
                let mut seen = std::collections::HashSet::new();
                // Messages this run leaves in the queue (unreadable ones, letters it wrote back):
                // hidden while it runs so that they do not crowd out the rest, visible again
                // when it ends so that the next redrive (or a person) sees them at once.
                let mut left = Vec::new();
                loop {
                    let output = client
                        .receive_message()
                        .queue_url(url)
                        .max_number_of_messages(10)
                        .visibility_timeout(120)
                        .wait_time_seconds(1)
                        .send()
                        .await
                        .map_err(|error| AwsError::from_sdk("ReceiveMessage", &error))?;
                    let mut fresh = 0;
                    for message in output.messages.unwrap_or_default() {
                        let (Some(body), Some(receipt)) = (message.body(), message.receipt_handle()) else {
                            continue;
                        };
                        let Ok(letter) = serde_json::from_str::<DeadLetter>(body) else {
                            // Left in the queue (it turns visible again): someone should look at it.
                            if seen.insert(message.message_id().unwrap_or(receipt).to_owned()) {
                                counts.unreadable += 1;
                            }
                            left.push(receipt.to_owned());
                            continue;
                        };
                        // A letter written back by this run comes round again: leave it for the next.
                        if !seen.insert(format!("{}/{}", letter.shard, letter.sequence_number)) {
                            left.push(receipt.to_owned());
                            continue;
                        }
                        fresh += 1;
                        match replay(letter).await {
                            Ok(()) => counts.replayed += 1,
                            Err(again) => {
                                counts.kept += 1;
                                self.write(&again).await?;
                            }
                        }
                        client
                            .delete_message()
                            .queue_url(url)
                            .receipt_handle(receipt)
                            .send()
                            .await
                            .map_err(|error| AwsError::from_sdk("DeleteMessage", &error))?;
                    }
                    if fresh == 0 {
                        break;
                    }
                }
                show_again(client, url, &left).await?;
            }
        }
        Ok(counts)
    }
}

/// Makes received messages visible again at once (instead of after the visibility timeout).
async fn show_again(client: &aws_sdk_sqs::Client, url: &str, receipts: &[String]) -> Result<(), DeadLetterError> {
    use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry as Entry;
    for chunk in receipts.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(index, receipt)| {
                Entry::builder()
                    .id(index.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(0)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| DeadLetterError::Request(error.to_string()))?;
        let output = client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("ChangeMessageVisibilityBatch", &error))?;
        for failed in output.failed() {
            // It turns visible after the visibility timeout anyway: worth a warning, not a failure.
            tracing::warn!(code = failed.code(), message = ?failed.message(), "a dead letter stays hidden until its visibility timeout");
        }
    }
    Ok(())
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, DeadLetterError> {
    let io_error = |source| DeadLetterError::Io {
        path: path.to_owned(),
        source,
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join| io_error(io::Error::other(join.to_string())))?
        .map_err(io_error)
}

/// Appends one line under the file's lock, following a redrive that renamed the file away
/// between our open and our lock, then syncs it to disk.
fn append_line(path: &Path, line: &[u8]) -> io::Result<()> {
    for _ in 0..10 {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        file.lock()?;
        if !is_still_at(&file, path)? {
            continue;
        }
        (&file).write_all(line)?;
        file.sync_data()?;
        return Ok(());
    }
    Err(io::Error::other("the file kept being renamed away while writing"))
}

fn is_still_at(file: &fs::File, path: &Path) -> io::Result<bool> {
    let opened = file.metadata()?;
    match fs::metadata(path) {
        Ok(current) => Ok(current.ino() == opened.ino() && current.dev() == opened.dev()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Files a redrive must process: those an interrupted redrive left (`<name>.redrive-*`), then
/// the live file, renamed under its lock so that writers move on to a fresh one.
fn claim(path: &Path) -> io::Result<Vec<PathBuf>> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::other("the dead-letter path names no file"))?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{name}.redrive-");
    let mut claimed: Vec<PathBuf> = fs::read_dir(&directory)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect();
    claimed.sort();
    match fs::File::open(path) {
        Ok(file) => {
            file.lock()?;
            // Never onto a file already claimed (two claims within one millisecond): that would
            // lose its letters.
            let target = loop {
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
                let candidate = directory.join(format!(
                    "{prefix}{stamp}-{}-{:08x}",
                    std::process::id(),
                    fastrand::u32(..)
                ));
                if !candidate.exists() {
                    break candidate;
                }
            };
            fs::rename(path, &target)?;
            claimed.push(target);
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{EventKind, Item};
    use aws_sdk_dynamodb::types::AttributeValue;

    fn record(sequence: &str) -> Record {
        let keys = Item::from([("pk".to_owned(), AttributeValue::S("MSG#g".into()))]);
        Record {
            sequence_number: SequenceNumber::parse(sequence).expect("digits"),
            event: EventKind::Insert,
            keys: keys.clone(),
            new_image: Some(keys),
            created_at: None,
        }
    }

    fn letter(sequence: &str) -> DeadLetter {
        DeadLetter::new(&ShardId("s".into()), &record(sequence), "test", "boom".into(), 3, "w")
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("deadletter-{name}-{}", fastrand::u64(..)));
        fs::create_dir_all(&dir).expect("temp dir");
        dir.join("letters.jsonl")
    }

    #[test]
    fn a_letter_keeps_its_record() {
        let letter = letter("0007");
        let line = letter.to_json_line().expect("serializes");
        let back: DeadLetter = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, letter);
        let record = back.record().expect("record");
        assert_eq!(record.sequence_number.text(), "0007");
        assert_eq!(record.keys.get("pk"), Some(&AttributeValue::S("MSG#g".into())));
    }

    /// A letter whose record has a 300 KB text and that covers 5 000 folded records: pieces of
    /// at most the queue's size, the record's keys in each, every covered record in one.
    #[test]
    fn a_letter_too_large_is_trimmed_to_keys_and_split() {
        let mut big = record("0042");
        big.new_image
            .as_mut()
            .expect("image")
            .insert("message".into(), AttributeValue::S("x".repeat(300_000)));
        let mut letter = DeadLetter::new(&ShardId("s".into()), &big, "test", "boom".into(), 3, "w");
        letter.covers = (0..5_000)
            .map(|n| {
                let mut folded = record(&format!("{n:021}"));
                folded
                    .keys
                    .insert("sk".into(), AttributeValue::S(format!("2024-01-01T00:00:{n:06}")));
                Covered::new(&RecordKeys::of(folded))
            })
            .collect();
        let all = letter.covers.clone();
        let pieces = letter.clone().fit(DEFAULT_QUEUE_MESSAGE_BYTES).expect("fits");
        assert!(pieces.len() > 1, "5 000 keys do not fit one message");
        let mut covered = Vec::new();
        for piece in &pieces {
            assert!(piece.to_json().expect("json").len() <= DEFAULT_QUEUE_MESSAGE_BYTES);
            assert!(piece.record_trimmed);
            let record = piece.record().expect("record");
            assert_eq!(record.keys, big.keys, "each piece names the record by its keys");
            assert!(record.new_image.is_none());
            covered.extend(piece.covers.iter().cloned());
        }
        assert_eq!(covered, all, "every covered record, once, in order");
        let replayable = all[7].record().expect("keys kept");
        assert_eq!(
            replayable.keys.get("sk"),
            Some(&AttributeValue::S("2024-01-01T00:00:000007".into()))
        );
        // A letter that fits is left alone.
        let small = DeadLetter::new(&ShardId("s".into()), &record("1"), "test", "boom".into(), 1, "w");
        assert_eq!(
            small.clone().fit(DEFAULT_QUEUE_MESSAGE_BYTES).expect("fits"),
            vec![small]
        );
        // Keys alone too large for a tiny queue: a permanent error, not a retry.
        let error = letter.fit(50).expect_err("cannot fit");
        assert!(!error.is_retryable());
    }

    #[test]
    fn letters_written_before_covered_keys_still_read() {
        let line = r#"{"shard":"s","sequence_number":"9","reason":"r","error":"e","attempts":1,
            "failed_at":"2026-01-01T00:00:00.000Z","worker_id":"w","covers":["7","8"],
            "record":{"eventName":"INSERT","dynamodb":{"Keys":{"pk":{"S":"MSG#g"}}}}}"#;
        let letter: DeadLetter = serde_json::from_str(line).expect("an old letter");
        assert_eq!(
            letter.covers,
            vec![Covered::Sequence("7".into()), Covered::Sequence("8".into())]
        );
        assert!(letter.covers.iter().all(|covered| covered.record().is_none()));
        assert!(!letter.record_trimmed);
    }

    #[tokio::test]
    async fn a_redrive_replays_and_writes_back_what_fails_again() {
        let path = scratch("redrive");
        let destination = DeadLetterDestination::File(path.clone());
        for sequence in ["1", "2", "3"] {
            destination.write(&letter(sequence)).await.expect("written");
        }
        append_line(&path, b"not a letter\n").expect("raw line");
        let counts = destination
            .redrive(|letter| async move {
                if letter.sequence_number == "2" {
                    Err(letter.failed_again("again", "still broken".into(), 1))
                } else {
                    Ok(())
                }
            })
            .await
            .expect("redrive");
        assert_eq!(
            counts,
            RedriveCounts {
                replayed: 2,
                kept: 1,
                unreadable: 1
            }
        );
        let left = fs::read_to_string(&path).expect("live file");
        let lines: Vec<&str> = left.lines().collect();
        assert_eq!(lines.len(), 2, "{left}");
        assert!(lines.contains(&"not a letter"));
        let kept: DeadLetter =
            serde_json::from_str(lines.iter().find(|l| l.starts_with('{')).expect("letter")).expect("parses");
        assert_eq!((kept.sequence_number.as_str(), kept.attempts), ("2", 4));
        let directory = path.parent().expect("dir");
        assert_eq!(fs::read_dir(directory).expect("dir").count(), 1, "claimed file removed");
    }

    #[tokio::test]
    async fn an_interrupted_redrive_is_picked_up_again() {
        let path = scratch("leftover");
        let destination = DeadLetterDestination::File(path.clone());
        destination.write(&letter("1")).await.expect("written");
        let claimed = claim(&path).expect("claimed");
        assert_eq!(claimed.len(), 1);
        assert!(!path.exists(), "writers start a fresh file");
        destination.write(&letter("2")).await.expect("written");
        let mut seen = Vec::new();
        let counts = destination
            .redrive(|letter| {
                seen.push(letter.sequence_number.clone());
                async { Ok(()) }
            })
            .await
            .expect("redrive");
        assert_eq!(counts.replayed, 2);
        assert_eq!(seen, vec!["1", "2"], "the leftover first, then the live file");
    }

    #[test]
    fn a_writer_follows_a_rename_between_open_and_lock() {
        let path = scratch("follow");
        fs::write(&path, "").expect("file");
        let stale = OpenOptions::new().append(true).open(&path).expect("open");
        fs::rename(&path, path.with_extension("moved")).expect("rename");
        assert!(!is_still_at(&stale, &path).expect("stat"));
        append_line(&path, b"x\n").expect("append");
        assert_eq!(fs::read_to_string(&path).expect("new file"), "x\n");
    }
}
