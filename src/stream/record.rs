//! Source-neutral stream records: what every source (DynamoDB Streams today, Kinesis next)
//! turns its change records into before anything downstream sees them.
//!
//! Invariant: a [`SequenceNumber`] orders records within a shard numerically. Sources hand
//! out decimal strings of varying length (up to 40 digits on DynamoDB Streams, 56 on Kinesis),
//! so ordering compares length first and never by plain string order.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;

use aws_sdk_dynamodb::types::AttributeValue;

/// A DynamoDB item image (keys or new image) in the DynamoDB client's attribute type, so that
/// handlers can write what they read without another conversion.
pub type Item = HashMap<String, AttributeValue>;

/// A shard's identifier as the source names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub String);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A record's position in its shard: a decimal string compared as a number. The text is kept
/// exactly as the source gave it, because the source expects it back verbatim (DynamoDB Local
/// pads with leading zeros).
///
/// Kept compactly, since one is held for every record read and not yet checkpointed: up to 38
/// significant digits (every DynamoDB Streams sequence number) as a number and the text's width,
/// without an allocation; longer ones (Kinesis) as text.
#[derive(Clone)]
pub struct SequenceNumber(Digits);

/// Significant digits that always fit a `u128`.
const PACKED_DIGITS: usize = 38;

#[derive(Clone)]
enum Digits {
    /// At most [`PACKED_DIGITS`] significant digits: the value (high and low halves, so that the
    /// whole stays 24 bytes) and the text's length with its leading zeros.
    Packed { high: u64, low: u64, width: u16 },
    /// More significant digits: the text as given.
    Text(Box<str>),
}

impl SequenceNumber {
    /// Accepts a non-empty string of ASCII digits (at most 65,535 of them; the APIs' are at most
    /// 129); anything else is not a sequence number.
    pub fn parse(text: &str) -> Option<Self> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let width = u16::try_from(text.len()).ok()?;
        if significant(text).len() > PACKED_DIGITS {
            return Some(Self(Digits::Text(text.into())));
        }
        let value: u128 = significant(text).parse().ok()?;
        Some(Self(Digits::Packed {
            high: (value >> 64) as u64,
            low: value as u64,
            width,
        }))
    }

    /// The text as the source gave it.
    pub fn text(&self) -> Cow<'_, str> {
        match &self.0 {
            Digits::Packed { .. } => Cow::Owned(self.to_string()),
            Digits::Text(text) => Cow::Borrowed(text),
        }
    }

    /// Bytes of memory it holds besides itself.
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Digits::Packed { .. } => 0,
            Digits::Text(text) => text.len(),
        }
    }

    /// The packed value (0 for text, which is never packed).
    fn value(&self) -> u128 {
        match self.0 {
            Digits::Packed { high, low, .. } => (u128::from(high) << 64) | u128::from(low),
            Digits::Text(_) => 0,
        }
    }
}

/// The digits without leading zeros, the form ordering and equality use.
fn significant(text: &str) -> &str {
    let trimmed = text.trim_start_matches('0');
    if trimmed.is_empty() {
        "0"
    } else {
        trimmed
    }
}

impl Ord for SequenceNumber {
    /// Packed numbers have fewer significant digits than any kept as text.
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.0, &other.0) {
            (Digits::Packed { .. }, Digits::Packed { .. }) => self.value().cmp(&other.value()),
            (Digits::Packed { .. }, Digits::Text(_)) => Ordering::Less,
            (Digits::Text(_), Digits::Packed { .. }) => Ordering::Greater,
            (Digits::Text(a), Digits::Text(b)) => {
                let (a, b) = (significant(a), significant(b));
                a.len().cmp(&b.len()).then_with(|| a.cmp(b))
            }
        }
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for SequenceNumber {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for SequenceNumber {}

impl std::hash::Hash for SequenceNumber {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match &self.0 {
            Digits::Packed { .. } => self.value().hash(state),
            Digits::Text(text) => significant(text).hash(state),
        }
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Digits::Packed { width, .. } => write!(f, "{:0width$}", self.value(), width = usize::from(*width)),
            Digits::Text(text) => f.write_str(text),
        }
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SequenceNumber").field(&self.text()).finish()
    }
}

/// What happened to the item, as DynamoDB change records name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Insert,
    Modify,
    Remove,
    /// An event name this worker does not know; counted and ignored downstream.
    Other,
}

impl EventKind {
    /// Low-cardinality metric label.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Insert => "insert",
            EventKind::Modify => "modify",
            EventKind::Remove => "remove",
            EventKind::Other => "other",
        }
    }

    pub fn from_name(name: &str) -> Self {
        match name {
            "INSERT" => EventKind::Insert,
            "MODIFY" => EventKind::Modify,
            "REMOVE" => EventKind::Remove,
            _ => EventKind::Other,
        }
    }
}

/// One change record.
#[derive(Debug, Clone)]
pub struct Record {
    pub sequence_number: SequenceNumber,
    pub event: EventKind,
    pub keys: Item,
    /// Present when the stream view includes new images and the event has one.
    pub new_image: Option<Item>,
    /// When the change was made, as the source reports it (DynamoDB Local truncates it to the
    /// minute, real DynamoDB to the second).
    pub created_at: Option<SystemTime>,
}

/// Bytes of memory one attribute's entry takes beyond its name and value (the map slot, the
/// strings' and the enum's own headers), as an estimate.
const ENTRY_OVERHEAD: usize = 64;
/// Bytes of a record beyond its attributes: the sequence number, the maps' headers.
const RECORD_OVERHEAD: usize = 160;

impl Record {
    /// About how many bytes of memory the record holds: what read-ahead budgets count.
    pub fn approx_bytes(&self) -> usize {
        RECORD_OVERHEAD
            + self.sequence_number.heap_bytes()
            + item_bytes(&self.keys)
            + self.new_image.as_ref().map_or(0, item_bytes)
    }
}

fn item_bytes(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| ENTRY_OVERHEAD + name.len() + value_bytes(value))
        .sum()
}

fn value_bytes(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) | AttributeValue::N(text) => text.len(),
        AttributeValue::B(blob) => blob.as_ref().len(),
        AttributeValue::Ss(texts) | AttributeValue::Ns(texts) => texts.iter().map(|t| t.len() + 24).sum(),
        AttributeValue::Bs(blobs) => blobs.iter().map(|b| b.as_ref().len() + 24).sum(),
        AttributeValue::L(values) => values.iter().map(|v| ENTRY_OVERHEAD + value_bytes(v)).sum(),
        AttributeValue::M(item) => item_bytes(item),
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_sized_by_what_it_holds() {
        let small = Record {
            sequence_number: seq("1"),
            event: EventKind::Insert,
            keys: [("pk".to_owned(), AttributeValue::S("MSG#g".into()))].into(),
            new_image: None,
            created_at: None,
        };
        let mut large = small.clone();
        large.new_image = Some([("message".to_owned(), AttributeValue::S("x".repeat(10_000)))].into());
        assert!(small.approx_bytes() < 400, "{}", small.approx_bytes());
        assert!(large.approx_bytes() > 10_000);
        large.new_image = None;
        assert_eq!(large.approx_bytes(), small.approx_bytes());
    }

    fn seq(text: &str) -> SequenceNumber {
        SequenceNumber::parse(text).expect("valid sequence number")
    }

    #[test]
    fn sequence_numbers_order_numerically_not_as_strings() {
        assert!(seq("9") < seq("10"));
        assert!(seq("000000000000000000024") < seq("100000000000000000025"));
        assert!(seq("49590338271490256608559692538361571095921575989136588898") > seq("99"));
        assert_eq!(seq("007"), seq("7"));
        assert_eq!(seq("0"), seq("000"));
        // Either side of the 38 significant digits kept as a number.
        let most_packed = seq("99999999999999999999999999999999999999");
        let least_text = seq("100000000000000000000000000000000000000");
        assert!(most_packed < least_text);
        assert_eq!(least_text.cmp(&most_packed), Ordering::Greater);
        assert!(seq("0000000100000000000000000000000000000000000000") == least_text);
        assert!(seq("100000000000000000000000000000000000001") > least_text);
    }

    #[test]
    fn sequence_number_keeps_the_text_the_source_gave() {
        for text in [
            "000000000000000000024",
            "0",
            "000",
            "99999999999999999999999999999999999999",
            "0000099999999999999999999999999999999999999",
            "100000000000000000000000000000000000000",
            "49590338271490256608559692538361571095921575989136588898",
        ] {
            assert_eq!(seq(text).text(), text);
            assert_eq!(seq(text).to_string(), text);
        }
    }

    #[test]
    fn sequence_number_rejects_non_digits() {
        assert!(SequenceNumber::parse("").is_none());
        assert!(SequenceNumber::parse("12a").is_none());
        assert!(SequenceNumber::parse("-1").is_none());
    }

    #[test]
    fn event_names_map_to_kinds() {
        assert_eq!(EventKind::from_name("INSERT"), EventKind::Insert);
        assert_eq!(EventKind::from_name("MODIFY"), EventKind::Modify);
        assert_eq!(EventKind::from_name("REMOVE"), EventKind::Remove);
        assert_eq!(EventKind::from_name("insert"), EventKind::Other);
    }
}
