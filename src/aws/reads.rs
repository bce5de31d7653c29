//! Group commit for strongly consistent reads by key: callers that need items of one table
//! while the allowed calls are busy share one `BatchGetItem` call.
//!
//! Owns: packing waiting key lists into calls (at most [`MAX_KEYS`] keys a call, never one key
//! twice in a call, which DynamoDB refuses) and giving each caller the items of its own keys.
//!
//! Invariants:
//! - Every read is strongly consistent, as if each caller had made its own call.
//! - A caller's answer holds only items of its own keys, and says whether every one of its keys
//!   was processed (the service may leave keys unprocessed under load; the caller decides what
//!   to do instead of reading them again here).
//! - A call refused as a whole for a reason one caller's keys could cause (a validation error)
//!   is split, each caller sent alone, so one bad list cannot fail the others.
//!
//! Must not: know what the items mean, or retry (errors go back to the caller's retry policy).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};

use super::combine::{self, Combiner, Packing};
use super::{AwsError, Item};

/// Keys per `BatchGetItem` call (the API's limit).
pub const MAX_KEYS: usize = 100;

/// The items found for one caller's keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// The items that exist, in no particular order.
    pub items: Vec<Item>,
    /// Every key was processed: a key without an item has no item stored.
    pub complete: bool,
}

type Answer = Result<Fetched, AwsError>;
type Waiting = combine::Waiting<KeyReads>;

/// Reads items of one table by key, strongly consistently, in shared `BatchGetItem` calls.
/// Cheap to share (`Arc` inside).
#[derive(Debug, Clone)]
pub struct ReadCombiner {
    inner: Arc<Combiner<KeyReads>>,
}

/// How key reads are packed and sent.
struct KeyReads {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// Calls made so far.
    made: AtomicU64,
}

/// One caller's keys, without repeats, each with its text (for matching answers to callers).
struct Keys {
    keys: Vec<Item>,
    texts: Vec<String>,
}

impl ReadCombiner {
    /// At most `max_calls` (at least 1) calls in flight at once.
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>, max_calls: usize) -> Self {
        let packing = KeyReads {
            client,
            table: table.into(),
            made: AtomicU64::new(0),
        };
        Self {
            inner: Arc::new(Combiner::new(packing, max_calls)),
        }
    }

    /// `BatchGetItem` calls made so far.
    pub fn calls_made(&self) -> u64 {
        self.inner.packing().made.load(Ordering::Relaxed)
    }

    /// The stored items of `keys` (each a complete primary key), read strongly consistently in a
    /// call of their own or shared with other callers'. More than [`MAX_KEYS`] keys are read in
    /// several requests.
    pub async fn get(&self, keys: Vec<Item>) -> Answer {
        let keys = Keys::new(keys);
        if keys.keys.len() <= MAX_KEYS {
            return self.inner.submit(keys).await;
        }
        let mut all = Fetched {
            items: Vec::new(),
            complete: true,
        };
        for chunk in keys.keys.chunks(MAX_KEYS) {
            let part = self.inner.submit(Keys::new(chunk.to_vec())).await?;
            all.items.extend(part.items);
            all.complete &= part.complete;
        }
        Ok(all)
    }
}

impl Keys {
    fn new(keys: Vec<Item>) -> Self {
        let mut seen = HashSet::with_capacity(keys.len());
        let (mut kept, mut texts) = (Vec::with_capacity(keys.len()), Vec::with_capacity(keys.len()));
        for key in keys {
            let text = key_text(&key, &key_names(&key));
            if seen.insert(text.clone()) {
                kept.push(key);
                texts.push(text);
            }
        }
        Self { keys: kept, texts }
    }
}

impl Packing for KeyReads {
    type Request = Keys;
    type Answer = Answer;
    const CALL_CAPACITY: usize = MAX_KEYS;

    fn size(keys: &Keys) -> usize {
        keys.keys.len()
    }

    fn take_pack(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
        take_pack(waiting)
    }

    async fn send(&self, pack: Vec<Waiting>) {
        self.send_pack(pack).await;
    }

    fn abandoned() -> Answer {
        Err(AwsError {
            operation: "BatchGetItem",
            code: None,
            message: "the call carrying this read was abandoned".into(),
            retryable: true,
        })
    }
}

impl KeyReads {
    /// Reads every key of `pack` in one call and answers each caller with its own items.
    async fn send_pack(&self, pack: Vec<Waiting>) {
        let keys: Vec<Item> = pack.iter().flat_map(|w| w.request.keys.iter().cloned()).collect();
        let Some(names) = keys.first().map(key_names) else {
            for waiting in pack {
                let _ = waiting.reply.send(Ok(Fetched {
                    items: Vec::new(),
                    complete: true,
                }));
            }
            return;
        };
        let wanted = match KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true)
            .build()
        {
            Ok(wanted) => wanted,
            Err(error) => return answer_all(pack, Err(AwsError::invalid_request("BatchGetItem", error))),
        };
        self.made.fetch_add(1, Ordering::Relaxed);
        let result = self
            .client
            .batch_get_item()
            .request_items(&self.table, wanted)
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("BatchGetItem", &error));
        match result {
            Ok(output) => {
                let found = output
                    .responses
                    .and_then(|mut tables| tables.remove(&self.table))
                    .unwrap_or_default();
                let unprocessed = output
                    .unprocessed_keys
                    .and_then(|mut tables| tables.remove(&self.table))
                    .map(|left| left.keys)
                    .unwrap_or_default();
                answer_found(pack, &names, found, &unprocessed);
            }
            Err(error) if pack.len() > 1 && !error.retryable => {
                // Refused as a whole: find whose keys, alone.
                for waiting in pack {
                    Box::pin(self.send_pack(vec![waiting])).await;
                }
            }
            Err(error) => answer_all(pack, Err(error)),
        }
    }
}

fn answer_all(pack: Vec<Waiting>, answer: Answer) {
    for waiting in pack {
        let _ = waiting.reply.send(answer.clone());
    }
}

/// Gives each caller the found items of its own keys; a caller with a key left unprocessed
/// gets an incomplete answer.
fn answer_found(pack: Vec<Waiting>, names: &[String], found: Vec<Item>, unprocessed: &[Item]) {
    let mut owner: HashMap<&str, usize> = HashMap::new();
    for (index, waiting) in pack.iter().enumerate() {
        for text in &waiting.request.texts {
            owner.insert(text.as_str(), index);
        }
    }
    let mut answers: Vec<Fetched> = (0..pack.len())
        .map(|_| Fetched {
            items: Vec::new(),
            complete: true,
        })
        .collect();
    for key in unprocessed {
        if let Some(&index) = owner.get(key_text(key, names).as_str()) {
            answers[index].complete = false;
        }
    }
    for item in found {
        if let Some(&index) = owner.get(key_text(&item, names).as_str()) {
            answers[index].items.push(item);
        }
    }
    for (waiting, answer) in pack.into_iter().zip(answers) {
        let _ = waiting.reply.send(Ok(answer));
    }
}

/// Takes, in arrival order, the waiting key lists that fit one call: within [`MAX_KEYS`] and
/// naming no key another taken list names. What does not fit waits for the next call.
fn take_pack(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut pack: Vec<Waiting> = Vec::new();
    let mut keys = 0;
    let mut taken: HashSet<String> = HashSet::new();
    let mut left = VecDeque::with_capacity(waiting.len());
    while let Some(next) = waiting.pop_front() {
        let request = &next.request;
        let fits = pack.is_empty()
            || (keys + request.keys.len() <= MAX_KEYS && request.texts.iter().all(|text| !taken.contains(text)));
        if fits {
            keys += request.keys.len();
            taken.extend(request.texts.iter().cloned());
            pack.push(next);
        } else {
            left.push_back(next);
        }
    }
    *waiting = left;
    pack
}

/// A key's attribute names, sorted (every key of one table has the same).
fn key_names(key: &Item) -> Vec<String> {
    let mut names: Vec<String> = key.keys().cloned().collect();
    names.sort();
    names
}

/// The values of `names` in `item` as one string, unique per key (key attributes are strings,
/// numbers or binary).
fn key_text(item: &Item, names: &[String]) -> String {
    let mut text = String::new();
    for name in names {
        text.push_str(name);
        match item.get(name) {
            Some(AttributeValue::S(value)) => {
                text.push_str("\u{0}S");
                text.push_str(value);
            }
            Some(AttributeValue::N(value)) => {
                text.push_str("\u{0}N");
                text.push_str(value);
            }
            Some(AttributeValue::B(blob)) => {
                text.push_str("\u{0}B");
                for byte in blob.as_ref() {
                    let _ = write!(text, "{byte:02x}");
                }
            }
            _ => text.push_str("\u{0}-"),
        }
        text.push('\u{1}');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn key(pk: &str, sk: &str) -> Item {
        [
            ("pk".to_owned(), AttributeValue::S(pk.into())),
            ("sk".to_owned(), AttributeValue::S(sk.into())),
        ]
        .into()
    }

    fn queue(lists: Vec<Vec<Item>>) -> (VecDeque<Waiting>, Vec<oneshot::Receiver<Answer>>) {
        let mut queue = VecDeque::new();
        let mut answers = Vec::new();
        for keys in lists {
            let (reply, answer) = oneshot::channel();
            queue.push_back(Waiting {
                request: Keys::new(keys),
                reply,
            });
            answers.push(answer);
        }
        (queue, answers)
    }

    fn pks(pack: &[Waiting]) -> Vec<String> {
        pack.iter()
            .map(|w| match w.request.keys[0].get("pk") {
                Some(AttributeValue::S(pk)) => pk.clone(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn a_pack_stays_within_the_key_limit_in_arrival_order() {
        let lists = (0..60)
            .map(|n| vec![key(&format!("a{n}"), "1"), key(&format!("b{n}"), "1")])
            .collect();
        let (mut waiting, _answers) = queue(lists);
        let pack = take_pack(&mut waiting);
        assert_eq!(pack.len(), 50, "100 keys");
        assert_eq!(pks(&pack)[..3], ["a0", "a1", "a2"]);
        assert_eq!(waiting.len(), 10);
        assert_eq!(pks(&take_pack(&mut waiting)).len(), 10);
    }

    #[test]
    fn one_key_is_never_asked_for_twice_in_a_call() {
        let (mut waiting, _answers) = queue(vec![
            vec![key("x", "1"), key("y", "1")],
            vec![key("y", "1"), key("z", "1")],
            vec![key("w", "1")],
            // Repeats within one caller's keys are read once.
            vec![key("v", "1"), key("v", "1")],
        ]);
        let pack = take_pack(&mut waiting);
        assert_eq!(pks(&pack), ["x", "w", "v"]);
        assert_eq!(pack[2].request.keys.len(), 1);
        assert_eq!(pks(&take_pack(&mut waiting)), ["y"]);
    }

    #[test]
    fn each_caller_gets_its_own_items_and_an_unprocessed_key_makes_its_answer_incomplete() {
        let (mut waiting, answers) = queue(vec![
            vec![key("a", "1"), key("b", "1")],
            vec![key("c", "1"), key("d", "1")],
            vec![key("e", "1")],
        ]);
        let pack = take_pack(&mut waiting);
        let mut stored = key("b", "1");
        stored.insert("message".into(), AttributeValue::S("hi".into()));
        let found = vec![key("d", "1"), stored.clone(), key("c", "1")];
        answer_found(pack, &["pk".into(), "sk".into()], found, &[key("e", "1")]);
        let answers: Vec<Fetched> = answers
            .into_iter()
            .map(|mut answer| answer.try_recv().expect("answered").expect("found"))
            .collect();
        assert_eq!(answers[0].items, [stored], "a's item is not stored");
        assert!(answers[0].complete);
        assert_eq!(answers[1].items.len(), 2);
        assert!(answers[1].complete);
        assert!(answers[2].items.is_empty());
        assert!(!answers[2].complete, "e was left unprocessed");
    }

    #[test]
    fn keys_of_every_type_have_distinct_texts() {
        let names = ["pk".to_owned()];
        let of = |value: AttributeValue| key_text(&[("pk".to_owned(), value)].into(), &names);
        let texts: HashSet<String> = [
            of(AttributeValue::S("1".into())),
            of(AttributeValue::N("1".into())),
            of(AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(vec![1]))),
            of(AttributeValue::S("01".into())),
        ]
        .into();
        assert_eq!(texts.len(), 4);
    }
}
