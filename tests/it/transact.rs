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
