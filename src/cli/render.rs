//! What the commands print: every line of command output is made here, as a string, so that
//! output is tested without running a command. Commands write the lines; nothing here does I/O
//! but [`Progress`], reconcile's observer (changes to stdout, progress to stderr).

use aws_sdk_dynamodb::types::AttributeValue;

use crate::aws::Item;
use crate::deadletter::RedriveCounts;
use crate::groups::admin::{Seeded, Sent};
use crate::groups::reconcile::{self, Repair, Totals};
use crate::stream::Lease;

/// `<table>: created` or `<table>: exists`.
pub fn table_ready(table: &str, created: bool) -> String {
    format!("{table}: {}", if created { "created" } else { "exists" })
}

pub fn seeded(seeded: &Seeded) -> String {
    format!(
        "seeded {} conversations ({} messages); {} already there",
        seeded.conversations_created, seeded.messages, seeded.conversations_skipped
    )
}

pub fn sent(sent: &Sent) -> String {
    let kind = if sent.new_conversation {
        "new conversation"
    } else {
        "conversation"
    };
    format!("sent to {kind} {} at {}", sent.group_uuid, sent.created_at)
}

/// One conversation of a user's list: sk, group, the other user, the last message.
pub fn group_row(row: &Item) -> String {
    format!(
        "{}  {}  @{} ({})  {}",
        field(row, "sk"),
        field(row, "message_group_uuid"),
        field(row, "user_handle"),
        field(row, "user_display_name"),
        field(row, "message")
    )
}

/// One message of a conversation.
pub fn message_row(row: &Item) -> String {
    format!(
        "{}  @{}  {}",
        field(row, "sk"),
        field(row, "user_handle"),
        field(row, "message")
    )
}

/// The lease table, a header and a line per shard in shard order.
pub fn lease_table(leases: &mut [Lease]) -> Vec<String> {
    leases.sort_by(|a, b| a.shard.cmp(&b.shard));
    let header = format!(
        "{:<40}  {:<24}  {:>7}  {:<5}  {:<26}  parents",
        "shard", "owner", "counter", "ended", "checkpoint"
    );
    let rows = leases.iter().map(|lease| {
        let parents: Vec<&str> = lease.parents.iter().map(|p| p.0.as_str()).collect();
        format!(
            "{:<40}  {:<24}  {:>7}  {:<5}  {:<26}  {}",
            lease.shard.0,
            lease.owner.as_deref().unwrap_or("-"),
            lease.counter,
            lease.shard_end,
            lease.checkpoint.encode(),
            if parents.is_empty() {
                "-".to_owned()
            } else {
                parents.join(",")
            }
        )
    });
    std::iter::once(header).chain(rows).collect()
}

pub fn reconcile_totals(totals: &Totals, dry_run: bool) -> String {
    let verb = if dry_run { "would be " } else { "" };
    format!(
        "reconcile{}: {} items, {} conversations; {} {verb}repaired ({} stale rows moved, {} missing rows created, \
         {} duplicate rows deleted, {} rows normalized); {} not repairable",
        if dry_run { " (dry run, nothing written)" } else { "" },
        totals.items,
        totals.conversations,
        totals.repaired,
        totals.moved,
        totals.created,
        totals.duplicates,
        totals.normalized,
        totals.problems
    )
}

/// One replayed letter: `<shard> <sequence>: <outcome>`, or kept with why.
pub fn redriven(shard: &str, sequence: &str, outcome: Result<&str, (&str, &str)>) -> String {
    match outcome {
        Ok(outcome) => format!("{shard} {sequence}: {outcome}"),
        Err((reason, error)) => format!("{shard} {sequence}: failed again, kept ({reason}: {error})"),
    }
}

pub fn redrive_counts(counts: &RedriveCounts) -> String {
    format!(
        "redrive: {} replayed, {} failed again and kept, {} unreadable entries left in place",
        counts.replayed, counts.kept, counts.unreadable
    )
}

fn field<'a>(item: &'a Item, name: &str) -> &'a str {
    crate::groups::model::text(item, name).unwrap_or("-")
}

/// An item as plain JSON: strings, numbers, booleans, lists, maps; binary as its size.
pub fn item_to_json(item: &Item) -> serde_json::Value {
    let mut names: Vec<&String> = item.keys().collect();
    names.sort();
    serde_json::Value::Object(
        names
            .into_iter()
            .map(|name| (name.clone(), value_to_json(&item[name])))
            .collect(),
    )
}

fn value_to_json(value: &AttributeValue) -> serde_json::Value {
    use serde_json::Value as Json;
    let number = |text: &String| {
        text.parse::<serde_json::Number>()
            .map_or_else(|_| Json::String(text.clone()), Json::Number)
    };
    match value {
        AttributeValue::S(text) => Json::String(text.clone()),
        AttributeValue::N(text) => number(text),
        AttributeValue::Bool(flag) => Json::Bool(*flag),
        AttributeValue::Null(_) => Json::Null,
        AttributeValue::Ss(texts) => Json::Array(texts.iter().cloned().map(Json::String).collect()),
        AttributeValue::Ns(numbers) => Json::Array(numbers.iter().map(number).collect()),
        AttributeValue::L(values) => Json::Array(values.iter().map(value_to_json).collect()),
        AttributeValue::M(map) => item_to_json(map),
        AttributeValue::B(blob) => Json::String(format!("<{} bytes>", blob.as_ref().len())),
        AttributeValue::Bs(blobs) => Json::Array(
            blobs
                .iter()
                .map(|b| Json::String(format!("<{} bytes>", b.as_ref().len())))
                .collect(),
        ),
        _ => Json::Null,
    }
}

/// Reconcile's progress on stderr (at most every 2 s) and its changes on stdout.
pub struct Progress {
    dry_run: bool,
    last: std::time::Instant,
}

impl Progress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(2);

    pub fn new(dry_run: bool) -> Self {
        Self {
            dry_run,
            last: std::time::Instant::now(),
        }
    }

    fn due(&mut self) -> bool {
        let due = self.last.elapsed() >= Self::EVERY;
        if due {
            self.last = std::time::Instant::now();
        }
        due
    }
}

impl reconcile::Observer for Progress {
    fn scanned(&mut self, items: u64) {
        if self.due() {
            eprintln!("reconcile: scanned {items} items");
        }
    }

    fn repaired(&mut self, group_uuid: &str, repair: &Repair) {
        let verb = if self.dry_run { "would " } else { "" };
        if repair.moved + repair.created + repair.duplicates + repair.normalized > 0 {
            println!(
                "{group_uuid}: {verb}move {} stale, {verb}create {} missing, {verb}delete {} duplicate, \
                 {verb}normalize {} row(s)",
                repair.moved, repair.created, repair.duplicates, repair.normalized
            );
        }
        if let Some(problem) = &repair.problem {
            println!("{group_uuid}: not repaired: {problem}");
        }
    }

    fn checked(&mut self, done: usize, total: usize) {
        if done == total || self.due() {
            eprintln!("reconcile: checked {done}/{total} conversations");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Position, SequenceNumber, ShardId};

    #[test]
    fn items_render_as_plain_json() {
        let item = Item::from([
            ("pk".to_owned(), AttributeValue::S("MSG#g".into())),
            ("n".to_owned(), AttributeValue::N("42".into())),
            ("l".to_owned(), AttributeValue::L(vec![AttributeValue::Bool(true)])),
        ]);
        assert_eq!(item_to_json(&item).to_string(), r#"{"l":[true],"n":42,"pk":"MSG#g"}"#);
    }

    #[test]
    fn the_lease_table_lists_shards_in_order_with_their_lineage() {
        let lease = |id: &str, owner: Option<&str>, parents: &[&str]| Lease {
            shard: ShardId(id.into()),
            checkpoint: Position::After(SequenceNumber::parse("0042").expect("sequence")),
            owner: owner.map(str::to_owned),
            parents: parents.iter().map(|p| ShardId((*p).into())).collect(),
            shard_end: false,
            stream_id: None,
            counter: 7,
        };
        let mut leases = vec![lease("shard-b", None, &["shard-a"]), lease("shard-a", Some("w1"), &[])];
        let lines = lease_table(&mut leases);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("shard "), "a header first: {:?}", lines[0]);
        let words = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(words(&lines[1]), ["shard-a", "w1", "7", "false", "0042", "-"]);
        assert_eq!(words(&lines[2]), ["shard-b", "-", "7", "false", "0042", "shard-a"]);
    }

    #[test]
    fn a_dry_run_says_nothing_was_written() {
        let totals = Totals {
            items: 10,
            conversations: 2,
            repaired: 1,
            moved: 1,
            ..Totals::default()
        };
        let dry = reconcile_totals(&totals, true);
        assert!(dry.starts_with("reconcile (dry run, nothing written): 10 items, 2 conversations; 1 would be repaired"));
        let real = reconcile_totals(&totals, false);
        assert!(real.starts_with("reconcile: 10 items, 2 conversations; 1 repaired (1 stale rows moved"));
    }
}
