//! Group commit against the real DynamoDB Local: transactions waiting together share one call,
//! and each still gets its own outcome from the call's cancellation reasons.

use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use cruddur_stream_worker::aws::transact::{ActionSet, Commit, TransactionCombiner};

use crate::support::TestDb;

/// A put of `pk` that succeeds only while `pk` is absent, as one set.
fn put_if_absent(table: &str, pk: &str, text: &str) -> ActionSet {
    let put = Put::builder()
        .table_name(table)
        .item("pk", AttributeValue::S(pk.into()))
        .item("sk", AttributeValue::S("x".into()))
        .item("message", AttributeValue::S(text.into()))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .expect("put builds");
    ActionSet::new(vec![TransactWriteItem::builder().put(put).build()], vec![pk.to_owned()])
}

async fn message_of(db: &TestDb, pk: &str) -> Option<String> {
    let item = db
        .client
        .get_item()
        .table_name(&db.table)
        .key("pk", AttributeValue::S(pk.into()))
        .key("sk", AttributeValue::S("x".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item?;
    item.get("message").and_then(|v| v.as_s().ok()).cloned()
}

#[tokio::test]
async fn sets_waiting_together_share_a_call_and_keep_their_own_outcomes() {
    let db = TestDb::new().await;
    // Already there: the set that puts it must fail its condition, alone.
    db.client
        .put_item()
        .table_name(&db.table)
        .item("pk", AttributeValue::S("T#taken".into()))
        .item("sk", AttributeValue::S("x".into()))
        .item("message", AttributeValue::S("first".into()))
        .send()
        .await
        .expect("seed");
    let combiner = TransactionCombiner::new(db.client.clone(), 1);
    let mut sets = Vec::new();
    for n in 0..8 {
        sets.push((format!("T#{n}"), format!("text {n}")));
    }
    sets.insert(3, ("T#taken".into(), "second".into()));
    // Two sets on one item: DynamoDB refuses them in one call, so they must go in two.
    sets.insert(5, ("T#twice".into(), "once".into()));
    sets.push(("T#twice".into(), "again".into()));
    let tasks: Vec<_> = sets
        .iter()
        .map(|(pk, text)| {
            let (combiner, set) = (combiner.clone(), put_if_absent(&db.table, pk, text));
            tokio::spawn(async move { combiner.commit(set).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("answered without error"));
    }
    for ((pk, _), outcome) in sets.iter().zip(&outcomes) {
        if pk != "T#twice" {
            let failed = matches!(outcome, Commit::ConditionFailed(_));
            assert_eq!(failed, pk == "T#taken", "{pk}: {outcome:?}");
        }
    }
    let twice: Vec<_> = sets
        .iter()
        .zip(&outcomes)
        .filter(|((pk, _), _)| pk == "T#twice")
        .map(|(_, o)| matches!(o, Commit::ConditionFailed(_)))
        .collect();
    assert_eq!(twice, [false, true], "the first to be sent wins");
    for n in 0..8 {
        assert_eq!(
            message_of(&db, &format!("T#{n}")).await.as_deref(),
            Some(format!("text {n}").as_str())
        );
    }
    assert_eq!(
        message_of(&db, "T#taken").await.as_deref(),
        Some("first"),
        "a failed set writes nothing"
    );
    assert_eq!(message_of(&db, "T#twice").await.as_deref(), Some("once"));
    // One call for the ten sets that could share it (cancelled by T#taken), one for the nine
    // it did not blame, one for the second set on T#twice.
    assert_eq!(combiner.calls_made(), 3);
}

/// Reads by key waiting together share one `BatchGetItem` call: each caller gets the items of
/// its own keys (none for a key with no item), a key two callers want goes in two calls
/// (DynamoDB refuses a repeated key), and a caller with over 100 keys is read in pieces.
#[tokio::test]
async fn reads_waiting_together_share_a_call_and_each_gets_its_own_items() {
    use cruddur_stream_worker::aws::reads::ReadCombiner;
    use cruddur_stream_worker::aws::Item;
    let db = TestDb::new().await;
    let seeding = TransactionCombiner::new(db.client.clone(), 4);
    for n in 0..130 {
        let set = put_if_absent(&db.table, &format!("R#{n}"), &format!("text {n}"));
        assert_eq!(seeding.commit(set).await.expect("seeded"), Commit::Committed);
    }
    let key = |pk: &str| -> Item {
        [
            ("pk".to_owned(), AttributeValue::S(pk.into())),
            ("sk".to_owned(), AttributeValue::S("x".into())),
        ]
        .into()
    };
    let reads = ReadCombiner::new(db.client.clone(), &db.table, 1);
    // Ten callers of two keys each; the last also wants R#0, which the first wants.
    let mut wanted: Vec<Vec<String>> = (0..10)
        .map(|n| vec![format!("R#{}", 2 * n), format!("R#{}", 2 * n + 1)])
        .collect();
    wanted[9].push("R#0".into());
    wanted.push(vec!["R#missing".into(), "R#7".into()]);
    let tasks: Vec<_> = wanted
        .iter()
        .map(|pks| {
            let (reads, keys) = (reads.clone(), pks.iter().map(|pk| key(pk)).collect());
            tokio::spawn(async move { reads.get(keys).await })
        })
        .collect();
    let texts = |items: &[Item]| -> Vec<String> {
        let mut texts: Vec<String> = items
            .iter()
            .filter_map(|item| item.get("message").and_then(|v| v.as_s().ok()).cloned())
            .collect();
        texts.sort();
        texts
    };
    for (pks, task) in wanted.iter().zip(tasks) {
        let fetched = task.await.expect("task").expect("read");
        assert!(fetched.complete, "{pks:?}");
        let mut expected: Vec<String> = pks
            .iter()
            .filter(|pk| *pk != "R#missing")
            .map(|pk| format!("text {}", &pk[2..]))
            .collect();
        expected.sort();
        assert_eq!(texts(&fetched.items), expected, "{pks:?}");
    }
    // One call for the callers that could share it, one for the caller that repeats R#0.
    assert_eq!(reads.calls_made(), 2);
    let many = reads
        .get((0..130).map(|n| key(&format!("R#{n}"))).collect())
        .await
        .expect("read");
    assert!(many.complete);
    assert_eq!(many.items.len(), 130);
    assert_eq!(reads.calls_made(), 4, "130 keys in two calls");
}
