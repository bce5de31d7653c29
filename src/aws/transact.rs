//! Group commit for DynamoDB transactions: independent sets of actions that arrive while the
//! allowed calls are busy share one `TransactWriteItems` call.
//!
//! Owns: packing waiting action sets into calls (at most [`MAX_ACTIONS`] actions and about
//! [`MAX_BYTES`] of values a call, never two actions on one item) and telling each set what
//! became of it. The queue, the bound of `max_calls` calls in flight and the rule that nothing
//! waits for a timer are [`super::combine`]'s.
//!
//! Invariants:
//! - Each set commits all or nothing, as if it were sent alone.
//! - A set's outcome is its own. When a packed call is cancelled, the cancellation reasons
//!   (one per action, in order) name the sets whose conditions failed or that were refused;
//!   those sets get that answer, and the others, which the service did not object to, are sent
//!   again without them. A call that fails as a whole for a reason one set could cause (a
//!   validation error) is split, each set sent alone, so one bad set cannot fail the others.
//!
//! Must not: know what the actions mean (tables, rows, conversations), or retry with backoff
//! (errors go back to the caller, whose retry policy decides).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};

use super::combine::{self, Combiner, Packing};
use super::AwsError;
use crate::telemetry::metric;

/// Actions per `TransactWriteItems` call (the API's limit).
pub const MAX_ACTIONS: usize = 100;
/// Approximate bytes of attribute values packed into one call: the API takes 4 MB a request,
/// and names, expressions and JSON framing come on top of the values counted here.
pub const MAX_BYTES: usize = 3 * 1024 * 1024;

/// Reason codes of a cancelled transaction that mean "try again later".
const TRANSIENT_REASONS: &[&str] = &[
    "TransactionConflict",
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
    "RequestLimitExceeded",
];

/// One set of actions that must commit together, with the items it touches.
#[derive(Debug, Clone)]
pub struct ActionSet {
    actions: Vec<TransactWriteItem>,
    /// How many actions the set has, also once they were moved into a call (a set sent
    /// alone gives its actions up; its cancellation reasons are still read by this count).
    count: usize,
    /// One entry per item touched (table and key, in any form unique per item).
    items: Vec<String>,
    bytes: usize,
}

impl ActionSet {
    /// `items` names every item the actions touch, one string per item (table and key): two
    /// sets that share one are never packed into one call (DynamoDB refuses that).
    pub fn new(actions: Vec<TransactWriteItem>, items: Vec<String>) -> Self {
        let bytes = actions.iter().map(action_bytes).sum();
        Self {
            count: actions.len(),
            actions,
            items,
            bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// What became of a set that the service answered for.
#[derive(Debug, Clone, PartialEq)]
pub enum Commit {
    Committed,
    /// A condition of the set failed: someone changed its items first. Nothing was written.
    /// One entry per action of the set: the item as stored, for an action whose condition
    /// failed and that asked for it (`ReturnValuesOnConditionCheckFailure = ALL_OLD`).
    ConditionFailed(Vec<Option<super::Item>>),
}

/// One action's cancellation reason: its code and, when asked for, the item as stored.
#[derive(Debug, Clone, Default)]
struct Reason {
    code: Option<String>,
    item: Option<super::Item>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// The service refused the set's actions for good (cancellation reason codes).
    #[error("transaction rejected: {0}")]
    Rejected(String),
}

impl crate::retry::Retryable for CommitError {
    fn is_retryable(&self) -> bool {
        match self {
            CommitError::Aws(error) => error.retryable,
            CommitError::Rejected(_) => false,
        }
    }
}

type Answer = Result<Commit, CommitError>;

type Waiting = combine::Waiting<Transactions>;

/// Packs action sets into shared `TransactWriteItems` calls. Cheap to share (`Arc` inside).
#[derive(Debug, Clone)]
pub struct TransactionCombiner {
    inner: Arc<Combiner<Transactions>>,
}

/// How transactions are packed and sent.
struct Transactions {
    client: aws_sdk_dynamodb::Client,
    /// Calls made so far.
    made: AtomicU64,
}

impl TransactionCombiner {
    /// At most `max_calls` (at least 1) calls in flight at once.
    pub fn new(client: aws_sdk_dynamodb::Client, max_calls: usize) -> Self {
        let packing = Transactions {
            client,
            made: AtomicU64::new(0),
        };
        Self {
            inner: Arc::new(Combiner::new(packing, max_calls)),
        }
    }

    /// `TransactWriteItems` calls made so far (also counted in
    /// `stream_worker_write_transactions_total`).
    pub fn calls_made(&self) -> u64 {
        self.inner.packing().made.load(Ordering::Relaxed)
    }

    /// Commits `set` in a call of its own or shared with other waiting sets.
    pub async fn commit(&self, set: ActionSet) -> Answer {
        self.inner.submit(set).await
    }
}

impl Packing for Transactions {
    type Request = ActionSet;
    type Answer = Answer;
    const CALL_CAPACITY: usize = MAX_ACTIONS;

    fn size(set: &ActionSet) -> usize {
        set.len()
    }

    fn take_pack(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
        take_pack(waiting)
    }

    async fn send(&self, pack: Vec<Waiting>) {
        self.send_pack(pack).await;
    }

    fn abandoned() -> Answer {
        Err(abandoned())
    }
}

impl Transactions {
    /// Sends `pack`, answering each of its sets; resends the sets the service did not object
    /// to when others made it cancel the call.
    async fn send_pack(&self, mut pack: Vec<Waiting>) {
        while !pack.is_empty() {
            // Alone, a set is never sent again (see `answer_cancelled`): its actions move.
            let actions: Vec<TransactWriteItem> = if pack.len() == 1 {
                std::mem::take(&mut pack[0].request.actions)
            } else {
                pack.iter()
                    .flat_map(|waiting| waiting.request.actions.iter().cloned())
                    .collect()
            };
            let total = actions.len();
            metrics::counter!(metric::WRITE_TRANSACTIONS).increment(1);
            self.made.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(actions))
                .send()
                .await;
            tracing::debug!(
                sets = pack.len(),
                actions = total,
                seconds = started.elapsed().as_secs_f64(),
                committed = result.is_ok(),
                "transaction sent"
            );
            let error = match result {
                Ok(_) => {
                    for waiting in pack {
                        let _ = waiting.reply.send(Ok(Commit::Committed));
                    }
                    return;
                }
                Err(error) => error,
            };
            let reasons: Option<Vec<Reason>> = match error.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => Some(
                    cancelled
                        .cancellation_reasons()
                        .iter()
                        .map(|reason| Reason {
                            code: reason.code().map(str::to_owned),
                            item: reason.item().cloned(),
                        })
                        .collect(),
                ),
                _ => None,
            };
            let classified = AwsError::from_sdk("TransactWriteItems", &error);
            match reasons {
                Some(reasons) if reasons.len() == total => {
                    pack = answer_cancelled(pack, &reasons, &classified);
                }
                _ if pack.len() > 1 && !classified.retryable => {
                    // Something in the request was refused as a whole: find whose, alone.
                    for waiting in pack {
                        Box::pin(self.send_pack(vec![waiting])).await;
                    }
                    return;
                }
                _ => {
                    let answer = match reasons {
                        // Reasons that do not line up with the actions: judge by their codes.
                        Some(reasons) => judge(&reasons, &classified).unwrap_or_else(|| Err(classified.clone().into())),
                        None => Err(classified.into()),
                    };
                    for waiting in pack {
                        let _ = waiting.reply.send(answer.clone());
                    }
                    return;
                }
            }
        }
    }
}

/// Answers the sets of a cancelled call from their own reasons; returns the sets the service
/// did not object to, to be sent again. When no set can be blamed, every set gets the error
/// (nothing to leave out, so sending again would only repeat it).
fn answer_cancelled(pack: Vec<Waiting>, reasons: &[Reason], error: &AwsError) -> Vec<Waiting> {
    let mut offset = 0;
    let mut verdicts = Vec::with_capacity(pack.len());
    for waiting in &pack {
        let own = &reasons[offset..offset + waiting.request.len()];
        offset += waiting.request.len();
        verdicts.push(judge(own, error));
    }
    if verdicts.iter().all(Option::is_none) {
        let answer: Answer = Err(error.clone().into());
        for waiting in pack {
            let _ = waiting.reply.send(answer.clone());
        }
        return Vec::new();
    }
    let mut again = Vec::new();
    for (waiting, verdict) in pack.into_iter().zip(verdicts) {
        match verdict {
            Some(answer) => {
                let _ = waiting.reply.send(answer);
            }
            None => again.push(waiting),
        }
    }
    again
}

/// What a set's cancellation reasons say: `None` when the service did not object to any of
/// its actions ("None" or no code), else the set's answer.
fn judge(reasons: &[Reason], error: &AwsError) -> Option<Answer> {
    let objections: Vec<&str> = reasons
        .iter()
        .filter_map(|reason| reason.code.as_deref())
        .filter(|code| *code != "None")
        .collect();
    if objections.is_empty() {
        return None;
    }
    if objections.contains(&"ConditionalCheckFailed") {
        let failed = |reason: &Reason| reason.code.as_deref() == Some("ConditionalCheckFailed");
        let items = reasons
            .iter()
            .map(|reason| reason.item.clone().filter(|_| failed(reason)))
            .collect();
        return Some(Ok(Commit::ConditionFailed(items)));
    }
    if objections.iter().any(|code| TRANSIENT_REASONS.contains(code)) {
        let mut transient = error.clone();
        transient.retryable = true;
        return Some(Err(transient.into()));
    }
    Some(Err(CommitError::Rejected(objections.join(", "))))
}

/// Takes, in arrival order, the waiting sets that fit one call: within the action and byte
/// budgets, and touching no item another taken set touches. A set too large for the byte
/// budget goes alone. What does not fit waits for the next call.
fn take_pack(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut pack: Vec<Waiting> = Vec::new();
    let (mut actions, mut bytes) = (0, 0);
    let mut touched: HashSet<String> = HashSet::new();
    let mut left = VecDeque::with_capacity(waiting.len());
    while let Some(next) = waiting.pop_front() {
        let set = &next.request;
        let fits = pack.is_empty()
            || (actions + set.len() <= MAX_ACTIONS
                && bytes + set.bytes <= MAX_BYTES
                && set.items.iter().all(|item| !touched.contains(item)));
        if fits {
            actions += set.len();
            bytes += set.bytes;
            touched.extend(set.items.iter().cloned());
            pack.push(next);
        } else {
            left.push_back(next);
        }
    }
    *waiting = left;
    pack
}

fn abandoned() -> CommitError {
    CommitError::Aws(AwsError {
        operation: "TransactWriteItems",
        code: None,
        message: "the call carrying this transaction was abandoned".into(),
        retryable: true,
    })
}

/// Approximate bytes of the attribute values in one action.
fn action_bytes(action: &TransactWriteItem) -> usize {
    let item_bytes = |item: &std::collections::HashMap<String, AttributeValue>| -> usize {
        item.iter().map(|(name, value)| name.len() + value_bytes(value)).sum()
    };
    let values = |values: Option<&std::collections::HashMap<String, AttributeValue>>| values.map_or(0, item_bytes);
    if let Some(put) = action.put() {
        item_bytes(put.item()) + values(put.expression_attribute_values())
    } else if let Some(delete) = action.delete() {
        item_bytes(delete.key()) + values(delete.expression_attribute_values())
    } else if let Some(update) = action.update() {
        item_bytes(update.key()) + values(update.expression_attribute_values())
    } else if let Some(check) = action.condition_check() {
        item_bytes(check.key()) + values(check.expression_attribute_values())
    } else {
        0
    }
}

fn value_bytes(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) | AttributeValue::N(text) => text.len(),
        AttributeValue::B(blob) => blob.as_ref().len(),
        AttributeValue::Ss(texts) | AttributeValue::Ns(texts) => texts.iter().map(String::len).sum(),
        AttributeValue::Bs(blobs) => blobs.iter().map(|blob| blob.as_ref().len()).sum(),
        AttributeValue::L(values) => values.iter().map(value_bytes).sum::<usize>() + values.len(),
        AttributeValue::M(map) => map.iter().map(|(name, value)| name.len() + value_bytes(value)).sum(),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::types::Put;
    use tokio::sync::oneshot;

    fn set(items: &[&str], actions: usize, text_bytes: usize) -> ActionSet {
        let put = |n: usize| {
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name("t")
                        .item("pk", AttributeValue::S(format!("k{n}")))
                        .item("message", AttributeValue::S("x".repeat(text_bytes)))
                        .build()
                        .expect("put builds"),
                )
                .build()
        };
        ActionSet::new(
            (0..actions).map(put).collect(),
            items.iter().map(|s| s.to_string()).collect(),
        )
    }

    fn queue(sets: Vec<ActionSet>) -> (VecDeque<Waiting>, Vec<oneshot::Receiver<Answer>>) {
        let mut queue = VecDeque::new();
        let mut answers = Vec::new();
        for set in sets {
            let (reply, answer) = oneshot::channel();
            queue.push_back(Waiting { request: set, reply });
            answers.push(answer);
        }
        (queue, answers)
    }

    fn items_of(pack: &[Waiting]) -> Vec<String> {
        pack.iter().map(|waiting| waiting.request.items.join("+")).collect()
    }

    #[test]
    fn a_pack_stays_within_the_action_limit_in_arrival_order() {
        let sets = (0..30).map(|n| set(&[&format!("i{n}")], 4, 10)).collect();
        let (mut waiting, _answers) = queue(sets);
        let pack = take_pack(&mut waiting);
        assert_eq!(pack.len(), 25, "25 sets of 4 actions make 100");
        assert_eq!(items_of(&pack)[0], "i0");
        assert_eq!(waiting.len(), 5);
        assert_eq!(waiting[0].request.items, ["i25"]);
    }

    #[test]
    fn sets_touching_one_item_never_share_a_call() {
        let sets = vec![set(&["a", "b"], 2, 1), set(&["b", "c"], 2, 1), set(&["d"], 1, 1)];
        let (mut waiting, _answers) = queue(sets);
        let pack = take_pack(&mut waiting);
        assert_eq!(items_of(&pack), ["a+b", "d"]);
        assert_eq!(items_of(&take_pack(&mut waiting)), ["b+c"]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn large_sets_are_packed_by_bytes_and_one_too_large_goes_alone() {
        let mb = 1024 * 1024;
        let sets = vec![
            set(&["a"], 2, mb),
            set(&["b"], 2, mb),
            set(&["c"], 1, 4 * mb),
            set(&["d"], 1, 1),
        ];
        let (mut waiting, _answers) = queue(sets);
        assert_eq!(
            items_of(&take_pack(&mut waiting)),
            ["a", "d"],
            "a and b together pass 3 MB"
        );
        assert_eq!(items_of(&take_pack(&mut waiting)), ["b"]);
        assert_eq!(items_of(&take_pack(&mut waiting)), ["c"]);
    }

    fn error() -> AwsError {
        AwsError {
            operation: "TransactWriteItems",
            code: Some("TransactionCanceledException".into()),
            message: "cancelled".into(),
            retryable: false,
        }
    }

    fn codes(codes: &[&str]) -> Vec<Reason> {
        codes
            .iter()
            .map(|code| Reason {
                code: Some(code.to_string()),
                item: None,
            })
            .collect()
    }

    #[test]
    fn a_cancelled_call_answers_the_sets_it_blames_and_sends_the_rest_again() {
        let sets = vec![
            set(&["a"], 2, 1),
            set(&["b"], 2, 1),
            set(&["c"], 1, 1),
            set(&["d"], 1, 1),
        ];
        let (waiting, mut answers) = queue(sets);
        let reasons = codes(&[
            "None",
            "None",
            "None",
            "ConditionalCheckFailed",
            "ValidationError",
            "None",
        ]);
        let again = answer_cancelled(waiting.into(), &reasons, &error());
        assert_eq!(items_of(&again), ["a", "d"]);
        assert!(answers[0].try_recv().is_err(), "a is sent again, not answered");
        assert!(matches!(answers[1].try_recv(), Ok(Ok(Commit::ConditionFailed(_)))));
        assert!(matches!(answers[2].try_recv(), Ok(Err(CommitError::Rejected(reason))) if reason == "ValidationError"));
    }

    #[test]
    fn a_set_sent_alone_is_judged_by_its_own_reasons_after_its_actions_moved() {
        let (mut waiting, mut answers) = queue(vec![set(&["a"], 4, 1)]);
        let moved = std::mem::take(&mut waiting[0].request.actions);
        assert_eq!(moved.len(), 4);
        let reasons = codes(&["ConditionalCheckFailed", "ConditionalCheckFailed", "None", "None"]);
        let again = answer_cancelled(waiting.into(), &reasons, &error());
        assert!(again.is_empty());
        assert!(matches!(answers[0].try_recv(), Ok(Ok(Commit::ConditionFailed(_)))));
    }

    #[test]
    fn transient_reasons_are_retryable_and_blameless_cancellations_fail_every_set() {
        let sets = vec![set(&["a"], 1, 1), set(&["b"], 1, 1)];
        let (waiting, mut answers) = queue(sets);
        let again = answer_cancelled(waiting.into(), &codes(&["TransactionConflict", "None"]), &error());
        assert_eq!(items_of(&again), ["b"]);
        let answer = answers[0].try_recv().expect("answered");
        assert!(matches!(answer, Err(CommitError::Aws(ref e)) if e.retryable));

        let (waiting, mut answers) = queue(vec![set(&["a"], 1, 1), set(&["b"], 1, 1)]);
        let blameless = [
            Reason::default(),
            Reason {
                code: Some("None".into()),
                item: None,
            },
        ];
        let again = answer_cancelled(waiting.into(), &blameless, &error());
        assert!(again.is_empty(), "nothing to leave out: no endless resend");
        for answer in &mut answers {
            assert!(matches!(answer.try_recv(), Ok(Err(CommitError::Aws(_)))));
        }
    }
}
