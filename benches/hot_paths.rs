//! Micro-benchmarks of the pure hot paths: decoding a change record, routing it, deciding a
//! group update (coalescing's core), and the checkpoint watermark. `cargo bench --bench
//! hot_paths`; `cargo test --benches` runs each once (the CI smoke run).

use std::hint::black_box;

use aws_sdk_dynamodb::types::AttributeValue;
use criterion::{criterion_group, criterion_main, Criterion};
use cruddur_stream_worker::aws::Item;
use cruddur_stream_worker::dispatch::{Route, Watermark};
use cruddur_stream_worker::groups::model::{self, GroupRow};
use cruddur_stream_worker::groups::plan;
use cruddur_stream_worker::stream::{change, SequenceNumber};

fn change_record() -> serde_json::Value {
    serde_json::json!({
        "eventName": "INSERT",
        "dynamodb": {
            "ApproximateCreationDateTime": 1_700_000_000_000u64,
            "Keys": {"pk": {"S": "MSG#5ae290ed-55d1-47a0-bc6d-fe2bc2700399"}, "sk": {"S": "2023-03-20T22:52:11.123456+00:00"}},
            "NewImage": {
                "pk": {"S": "MSG#5ae290ed-55d1-47a0-bc6d-fe2bc2700399"},
                "sk": {"S": "2023-03-20T22:52:11.123456+00:00"},
                "message_uuid": {"S": "0c1f5f6a-9f0b-4b7e-8f43-3c1c1c5e3c11"},
                "message": {"S": "Have you watched Babylon 5? Season one is slow, stick with it."},
                "user_uuid": {"S": "90b3c0a4-4d2b-5d49-9d3e-07e2c53a1a43"},
                "user_display_name": {"S": "Andrew Brown"},
                "user_handle": {"S": "andrewbrown"}
            }
        }
    })
}

fn row(owner: &str) -> GroupRow {
    let item: Item = Item::from([
        ("pk".to_owned(), AttributeValue::S(format!("GRP#{owner}"))),
        ("sk".to_owned(), AttributeValue::S("2023-03-20T10:00:00+00:00".into())),
        ("message_group_uuid".to_owned(), AttributeValue::S("g".into())),
        ("message".to_owned(), AttributeValue::S("earlier".into())),
        ("user_uuid".to_owned(), AttributeValue::S("other".into())),
    ]);
    GroupRow::from_item(item).expect("a group row")
}

fn hot_paths(c: &mut Criterion) {
    let json = change_record();
    let sequence = SequenceNumber::parse("000000000000000012345").expect("digits");
    c.bench_function("decode_change_record", |b| {
        b.iter(|| change::from_json(black_box(sequence.clone()), black_box(&json), None))
    });

    let record = change::from_json(sequence.clone(), &json, None);
    c.bench_function("route_message_insert", |b| {
        b.iter(|| match model::route(black_box(&record)) {
            Route::Apply { key, .. } => key.len(),
            _ => 0,
        })
    });

    let Route::Apply { event, .. } = model::route(&record) else {
        panic!("a message insert applies");
    };
    let rows = [row("a"), row("b")];
    c.bench_function("decide_group_update", |b| {
        b.iter(|| plan::decide(black_box(&rows), black_box(&event)))
    });

    let sequences: Vec<SequenceNumber> = (0..1000u32)
        .map(|n| SequenceNumber::parse(&format!("{n:021}")).expect("digits"))
        .collect();
    c.bench_function("watermark_1000_records_out_of_order", |b| {
        b.iter(|| {
            let mut watermark = Watermark::default();
            let tickets: Vec<_> = sequences.iter().map(|s| watermark.push(s.clone(), None)).collect();
            // Odd tickets first, then even: the watermark jumps once the gaps fill.
            for ticket in tickets.iter().skip(1).step_by(2).chain(tickets.iter().step_by(2)) {
                watermark.complete(*ticket);
            }
            watermark.handled_through().cloned()
        })
    });
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
