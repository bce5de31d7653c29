//! DynamoDB change records as JSON, the form Kinesis Data Streams for DynamoDB carries them in
//! (`eventName`, `dynamodb.Keys`, `dynamodb.NewImage`, `dynamodb.ApproximateCreationDateTime`)
//! and the form dead letters keep them in, so that one decoder serves both.
//!
//! `ApproximateCreationDateTime` is an epoch number whose unit Kinesis Data Streams for DynamoDB
//! sets per table (`ApproximateCreationDateTimePrecision`: MICROSECOND by default, or
//! MILLISECOND). The record's own `ApproximateCreationDateTimePrecision` is honoured where it is
//! carried; otherwise the unit is inferred from the magnitude (any date between 1973 and 5138
//! has a different number of digits in seconds, milliseconds and microseconds).
//!
//! Invariant: encoding then decoding a [`Record`] gives back its event, keys, new image and
//! creation time (to the millisecond); attribute values use DynamoDB JSON (`{"S": "..."}`),
//! binary as base64.

use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine as _;
use serde_json::{json, Map, Value as Json};

use super::record::{EventKind, Item, Record, SequenceNumber};

/// The change record of `record`, without its sequence number (the shard names that).
pub fn to_json(record: &Record) -> Json {
    let mut dynamodb = Map::new();
    dynamodb.insert("Keys".into(), item_to_json(&record.keys));
    if let Some(image) = &record.new_image {
        dynamodb.insert("NewImage".into(), item_to_json(image));
    }
    if let Some(millis) = record
        .created_at
        .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
        .and_then(|since| u64::try_from(since.as_millis()).ok())
    {
        dynamodb.insert("ApproximateCreationDateTime".into(), json!(millis));
        dynamodb.insert("ApproximateCreationDateTimePrecision".into(), json!("MILLISECOND"));
    }
    json!({ "eventName": event_name(record.event), "dynamodb": dynamodb })
}

/// The record a change record describes; `created_at` falls back to `arrived` when the change
/// record has no creation time. Parts that do not decode are left out (an unknown event name
/// becomes [`EventKind::Other`]), for the handler to judge.
pub fn from_json(sequence_number: SequenceNumber, change: &Json, arrived: Option<SystemTime>) -> Record {
    let change_record = &change["dynamodb"];
    let created_at = creation_time(change_record).or(arrived);
    Record {
        sequence_number,
        event: change["eventName"]
            .as_str()
            .map_or(EventKind::Other, EventKind::from_name),
        keys: item_from_json(&change_record["Keys"]).unwrap_or_default(),
        new_image: item_from_json(&change_record["NewImage"]),
        created_at,
    }
}

/// A record kept by its sequence number and keys alone: what an update keeps of each record it
/// folds in, for dead letters. The keys are kept as their DynamoDB JSON text, one allocation
/// where a map of attributes takes one per name and value (about half the memory in a backlog
/// of folded records).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordKeys {
    pub sequence_number: SequenceNumber,
    keys: Box<str>,
}

impl RecordKeys {
    /// Its sequence number and keys; the rest of the record is dropped.
    pub fn of(record: Record) -> Self {
        RecordKeys {
            keys: keys_text(&record.keys).into_boxed_str(),
            sequence_number: record.sequence_number,
        }
    }

    /// The keys as DynamoDB JSON, as [`item_to_json`] gives them.
    pub fn keys_json(&self) -> Json {
        // The text was written by `keys_text`: it always parses.
        serde_json::from_str(&self.keys).unwrap_or_default()
    }

    /// About how many bytes of memory it holds.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.sequence_number.heap_bytes() + self.keys.len()
    }
}

/// `keys` as DynamoDB JSON text, written directly: key attributes are strings, numbers or
/// binary, the first two without an intermediate JSON value.
fn keys_text(keys: &Item) -> String {
    let exact: usize = keys
        .iter()
        .map(|(name, value)| name.len() + value_text_len(value) + 4)
        .sum();
    let mut text = String::with_capacity(exact + 1);
    text.push('{');
    for (index, (name, value)) in keys.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        push_json_string(&mut text, name);
        text.push(':');
        match value {
            AttributeValue::S(inner) => push_typed(&mut text, "S", inner),
            AttributeValue::N(inner) => push_typed(&mut text, "N", inner),
            other => text.push_str(&value_to_json(other).to_string()),
        }
    }
    text.push('}');
    text
}

/// The text length of a string or number value when nothing needs escaping.
fn value_text_len(value: &AttributeValue) -> usize {
    match value {
        // `{"S":"` and `"}`
        AttributeValue::S(inner) | AttributeValue::N(inner) => inner.len() + 8,
        _ => 0,
    }
}

fn push_typed(text: &mut String, kind: &str, inner: &str) {
    text.push_str("{\"");
    text.push_str(kind);
    text.push_str("\":");
    push_json_string(text, inner);
    text.push('}');
}

/// `value` as a JSON string literal.
fn push_json_string(text: &mut String, value: &str) {
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        text.push('"');
        text.push_str(value);
        text.push('"');
    } else {
        text.push_str(&Json::String(value.to_owned()).to_string());
    }
}

/// Epoch units an `ApproximateCreationDateTime` comes in.
#[derive(Clone, Copy)]
enum Unit {
    Seconds,
    Millis,
    Micros,
}

impl Unit {
    /// The unit of an epoch number that is not labelled: by magnitude.
    fn inferred(value: f64) -> Self {
        if value >= 1e14 {
            Unit::Micros
        } else if value >= 1e11 {
            Unit::Millis
        } else {
            Unit::Seconds
        }
    }

    fn duration(self, value: &Json) -> Option<Duration> {
        if let Some(whole) = value.as_u64() {
            return Some(match self {
                Unit::Seconds => Duration::from_secs(whole),
                Unit::Millis => Duration::from_millis(whole),
                Unit::Micros => Duration::from_micros(whole),
            });
        }
        let per_second = match self {
            Unit::Seconds => 1.0,
            Unit::Millis => 1e3,
            Unit::Micros => 1e6,
        };
        Duration::try_from_secs_f64(value.as_f64()? / per_second).ok()
    }
}

/// `ApproximateCreationDateTime` in the unit its precision names (or its magnitude tells).
fn creation_time(change_record: &Json) -> Option<SystemTime> {
    let value = &change_record["ApproximateCreationDateTime"];
    let unit = match change_record["ApproximateCreationDateTimePrecision"].as_str() {
        Some("MICROSECOND") => Unit::Micros,
        Some("MILLISECOND") => Unit::Millis,
        _ => Unit::inferred(value.as_f64()?),
    };
    SystemTime::UNIX_EPOCH.checked_add(unit.duration(value)?)
}

fn event_name(event: EventKind) -> &'static str {
    match event {
        EventKind::Insert => "INSERT",
        EventKind::Modify => "MODIFY",
        EventKind::Remove => "REMOVE",
        EventKind::Other => "OTHER",
    }
}

/// Attributes (an item, or a record's keys) in DynamoDB JSON.
pub fn item_to_json<'a>(attributes: impl IntoIterator<Item = (&'a String, &'a AttributeValue)>) -> Json {
    Json::Object(
        attributes
            .into_iter()
            .map(|(name, value)| (name.clone(), value_to_json(value)))
            .collect(),
    )
}

fn value_to_json(value: &AttributeValue) -> Json {
    let base64 = |blob: &Blob| Json::String(base64::engine::general_purpose::STANDARD.encode(blob.as_ref()));
    match value {
        AttributeValue::S(text) => json!({ "S": text }),
        AttributeValue::N(number) => json!({ "N": number }),
        AttributeValue::Bool(flag) => json!({ "BOOL": flag }),
        AttributeValue::Null(flag) => json!({ "NULL": flag }),
        AttributeValue::Ss(texts) => json!({ "SS": texts }),
        AttributeValue::Ns(numbers) => json!({ "NS": numbers }),
        AttributeValue::B(blob) => json!({ "B": base64(blob) }),
        AttributeValue::Bs(blobs) => json!({ "BS": blobs.iter().map(base64).collect::<Vec<_>>() }),
        AttributeValue::L(values) => json!({ "L": values.iter().map(value_to_json).collect::<Vec<_>>() }),
        AttributeValue::M(map) => json!({ "M": item_to_json(map) }),
        // A type newer than this build: kept visible rather than dropped.
        other => json!({ "UNKNOWN": format!("{other:?}") }),
    }
}

/// A DynamoDB-JSON map (`{"name": {"S": "..."}, ...}`); `None` when it is not a map.
fn item_from_json(value: &Json) -> Option<Item> {
    let map = value.as_object()?;
    let mut item = Item::with_capacity(map.len());
    item.extend(
        map.iter()
            .filter_map(|(name, value)| Some((name.clone(), value_from_json(value)?))),
    );
    Some(item)
}

/// One DynamoDB-JSON value; `None` for a shape that is not one.
fn value_from_json(value: &Json) -> Option<AttributeValue> {
    let (kind, inner) = value.as_object()?.iter().next()?;
    let strings = |inner: &Json| -> Option<Vec<String>> {
        inner
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let blob = |inner: &Json| -> Option<Blob> {
        base64::engine::general_purpose::STANDARD
            .decode(inner.as_str()?)
            .ok()
            .map(Blob::new)
    };
    Some(match kind.as_str() {
        "S" => AttributeValue::S(inner.as_str()?.to_owned()),
        "N" => AttributeValue::N(inner.as_str()?.to_owned()),
        "BOOL" => AttributeValue::Bool(inner.as_bool()?),
        "NULL" => AttributeValue::Null(inner.as_bool()?),
        "SS" => AttributeValue::Ss(strings(inner)?),
        "NS" => AttributeValue::Ns(strings(inner)?),
        "B" => AttributeValue::B(blob(inner)?),
        "BS" => AttributeValue::Bs(inner.as_array()?.iter().map(blob).collect::<Option<_>>()?),
        "L" => AttributeValue::L(inner.as_array()?.iter().map(value_from_json).collect::<Option<_>>()?),
        "M" => AttributeValue::M(item_from_json(inner)?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq() -> SequenceNumber {
        SequenceNumber::parse("42").expect("digits")
    }

    #[test]
    fn change_records_decode_from_dynamodb_json() {
        let change: Json = serde_json::from_str(
            r#"{"eventName":"INSERT","tableName":"cruddur-messages","dynamodb":{
            "ApproximateCreationDateTime":1700000000000,
            "Keys":{"pk":{"S":"MSG#g"},"sk":{"S":"2023-01-01T00:00:00"}},
            "NewImage":{"pk":{"S":"MSG#g"},"n":{"N":"4"},"ok":{"BOOL":true},"tags":{"SS":["a"]},
                        "raw":{"B":"aGk="},"list":{"L":[{"NULL":true},{"M":{"x":{"S":"y"}}}]}}}}"#,
        )
        .expect("json");
        let record = from_json(seq(), &change, None);
        assert_eq!(record.event, EventKind::Insert);
        assert_eq!(record.keys.get("pk"), Some(&AttributeValue::S("MSG#g".into())));
        let image = record.new_image.as_ref().expect("image");
        assert_eq!(image.get("n"), Some(&AttributeValue::N("4".into())));
        assert_eq!(image.get("ok"), Some(&AttributeValue::Bool(true)));
        assert_eq!(image.get("tags"), Some(&AttributeValue::Ss(vec!["a".into()])));
        assert_eq!(image.get("raw"), Some(&AttributeValue::B(Blob::new("hi"))));
        let nested = AttributeValue::M(Item::from([("x".to_owned(), AttributeValue::S("y".into()))]));
        assert_eq!(
            image.get("list"),
            Some(&AttributeValue::L(vec![AttributeValue::Null(true), nested]))
        );
        assert_eq!(
            record.created_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000))
        );

        let again = from_json(seq(), &to_json(&record), None);
        assert_eq!(again.event, record.event);
        assert_eq!(again.keys, record.keys);
        assert_eq!(again.new_image, record.new_image);
        assert_eq!(again.created_at, record.created_at);
    }

    #[test]
    fn creation_times_honour_the_precision_or_infer_it() {
        let at = |created: Json, precision: Option<&str>| {
            let mut change = json!({"eventName": "INSERT", "dynamodb": {"ApproximateCreationDateTime": created}});
            if let Some(precision) = precision {
                change["dynamodb"]["ApproximateCreationDateTimePrecision"] = json!(precision);
            }
            from_json(seq(), &change, None).created_at
        };
        let expected = Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_860_387_558_988));
        assert_eq!(at(json!(1_764_860_387_558_988u64), Some("MICROSECOND")), expected);
        assert_eq!(
            at(json!(1_764_860_387_558_988u64), None),
            expected,
            "microseconds inferred"
        );
        let millis = Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_860_387_558));
        assert_eq!(at(json!(1_764_860_387_558u64), Some("MILLISECOND")), millis);
        assert_eq!(at(json!(1_764_860_387_558u64), None), millis, "milliseconds inferred");
        // DynamoDB Streams' own JSON (a Lambda event) gives seconds, with a fraction.
        let seconds = at(json!(1_764_860_387.5), None).expect("seconds");
        assert_eq!(
            seconds,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_860_387_500)
        );
        assert_eq!(at(json!(-5), None), None);
        assert_eq!(at(json!("soon"), None), None);
    }

    #[test]
    fn missing_parts_stay_missing() {
        let change: Json =
            serde_json::from_str(r#"{"eventName":"REMOVE","dynamodb":{"Keys":{"pk":{"S":"MSG#g"}}}}"#).expect("json");
        let arrived = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        let record = from_json(seq(), &change, Some(arrived));
        assert_eq!(record.event, EventKind::Remove);
        assert!(record.new_image.is_none());
        assert_eq!(record.created_at, Some(arrived), "falls back to the arrival time");
        assert_eq!(from_json(seq(), &json!({}), None).event, EventKind::Other);
    }

    fn message(n: usize) -> Record {
        let text = |value: String| AttributeValue::S(value);
        let keys = Item::from([
            ("pk".to_owned(), text("MSG#5ae290ed-55d1-47a0-bc6d-fe2bc2700399".into())),
            (
                "sk".to_owned(),
                text(format!("2026-12-07T16:{:02}:{:02}.123456+00:00", n / 60 % 60, n % 60)),
            ),
        ]);
        let mut image = keys.clone();
        image.insert("message".into(), text("x".repeat(200)));
        image.insert("user_handle".into(), text("andrewbrown".into()));
        Record {
            sequence_number: SequenceNumber::parse(&format!("{:021}", 4_000_000 + n)).expect("digits"),
            event: EventKind::Insert,
            keys,
            new_image: Some(image),
            created_at: None,
        }
    }

    #[test]
    fn kept_keys_read_back_as_the_records_keys() {
        let mut record = message(1);
        record
            .keys
            .insert("quoted".into(), AttributeValue::S("a \"b\"\\ c\nd é".into()));
        record.keys.insert("n".into(), AttributeValue::N("-1.5e3".into()));
        record.keys.insert("raw".into(), AttributeValue::B(Blob::new("hi")));
        let expected = item_to_json(&record.keys);
        let kept = RecordKeys::of(record.clone());
        assert_eq!(kept.keys_json(), expected);
        let plain = message(2);
        assert_eq!(
            keys_text(&plain.keys).capacity(),
            keys_text(&plain.keys).len(),
            "sized exactly, so that boxing it does not reallocate"
        );
        assert_eq!(kept.sequence_number, record.sequence_number);
        let back = from_json(
            kept.sequence_number.clone(),
            &json!({"dynamodb": {"Keys": kept.keys_json()}}),
            None,
        );
        assert_eq!(back.keys, record.keys);
    }

    #[test]
    fn a_folded_record_keeps_a_few_hundred_bytes_at_most() {
        let count = 1_000;
        let before = crate::heap_probe::live_bytes();
        let records: Vec<Record> = (0..count).map(message).collect();
        let with_images = crate::heap_probe::live_bytes() - before;
        let mut kept = Vec::with_capacity(count);
        for record in records {
            kept.push(RecordKeys::of(record));
        }
        let per_record = (crate::heap_probe::live_bytes() - before) / count as isize;
        assert!(with_images / count as isize > 1_000, "{with_images}");
        // The slot, the sequence number and the keys' text: 154 bytes measured; as the keys' own
        // names and values (a boxed slice of pairs), 297.
        assert!(per_record <= 200, "{per_record} bytes per folded record");
        assert_eq!(kept.len(), count);
    }
}
