//! Upstream batch records: what a cloud backend receives from an agent.
//!
//! A [`Batch`] carries the records of one lane in sequence order. Every record has a stable
//! [`Record::id`] that is unique across agents, restarts and store re-creations:
//!
//! ```text
//! <agent>:<store epoch, hex>:<lane>:<seq>
//! ```
//!
//! Receivers de-duplicate by this id; a resent batch carries the same ids. A gap record has
//! the id of the first record it replaced with `:gap` appended ([`gap_id`]).
//!
//! Versioning: [`BATCH_FORMAT_VERSION`] leads every batch. Adding a record kind or a field is
//! a new version; enums are append-only so that postcard discriminants never move.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Version of the batch format. Bump it for any change of a field or record kind.
pub const BATCH_FORMAT_VERSION: u8 = 2;

/// An outbox lane. Lanes are drained in this order: alerts before summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Alert raise and clear records; never evicted before summaries.
    Alerts,
    /// Window summaries; evicted oldest first when the outbox is full.
    Summaries,
}

impl Lane {
    /// All lanes in drain priority order.
    pub const ALL: [Lane; 2] = [Lane::Alerts, Lane::Summaries];

    /// The lane's name on the wire and in record ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Alerts => "alerts",
            Lane::Summaries => "summaries",
        }
    }

    /// A one-byte tag used in storage keys.
    pub fn tag(self) -> u8 {
        match self {
            Lane::Alerts => 0,
            Lane::Summaries => 1,
        }
    }

    /// The lane for a storage tag.
    pub fn from_tag(tag: u8) -> Option<Lane> {
        match tag {
            0 => Some(Lane::Alerts),
            1 => Some(Lane::Summaries),
            _ => None,
        }
    }
}

/// A batch of records of one lane, as sent upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// [`BATCH_FORMAT_VERSION`] of the sender.
    pub version: u8,
    /// The agent's configured id.
    pub agent: String,
    /// The lane all records belong to.
    pub lane: Lane,
    /// Sequence number of the first record.
    pub first_seq: u64,
    /// Sequence number of the last record.
    pub last_seq: u64,
    /// The records in sequence order.
    pub records: Vec<Record>,
}

/// One upstream record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Stable id, the de-duplication key: `<agent>:<epoch hex>:<lane>:<seq>`.
    pub id: String,
    /// Position in the lane, increasing. Not dense: a gap record covers evicted or expired
    /// records, and a summary merged by backlog compaction takes the seq of the first record it
    /// replaces (the others' seqs are never used). Count events, not seqs, to check that
    /// nothing is missing: every event is in a summary's `count` or a gap's `events`.
    pub seq: u64,
    /// What the record says.
    pub body: RecordBody,
}

/// The payload of a record. Append-only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordBody {
    /// An alert was raised or cleared.
    Alert(Alert),
    /// A closed window of one series.
    Summary(Summary),
    /// Records that were lost (evicted, expired); tells upstream what it will never see.
    Gap(Gap),
}

/// The two transitions of an alert episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition started (after its minimum duration).
    Raised,
    /// The condition ended (passed the clear level).
    Cleared,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Needs attention soon.
    #[default]
    Warning,
    /// Needs attention now.
    Critical,
}

/// An alert transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The rule's configured name.
    pub rule: String,
    /// The series the rule fired on.
    pub series: String,
    /// Raised or cleared.
    pub state: AlertState,
    /// Configured severity of the rule.
    pub severity: Severity,
    /// Event time of the transition, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The value that caused the transition.
    pub value: f64,
    /// The level that was crossed (raise level for raised, clear level for cleared).
    pub threshold: f64,
    /// Human-readable message from the rule's template.
    pub message: String,
    /// Labels of the alert, e.g. `device = "pump-1"`, `metric = "temperature"`: by default
    /// the first and last segment of the series, or the rule's templates. Empty in records
    /// of agents that had no labels (JSON without the key decodes).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Statistics of one series over one tumbling window `[start_ms, start_ms + window_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The series key.
    pub series: String,
    /// Window start, ms since the Unix epoch, aligned to a multiple of `window_ms`.
    pub start_ms: i64,
    /// Window length in ms.
    pub window_ms: u64,
    /// Number of events in the window.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Population standard deviation.
    pub stddev: f64,
    /// Value of the event with the earliest timestamp.
    pub first: f64,
    /// Value of the event with the latest timestamp.
    pub last: f64,
    /// How many windows of the configured length this summary merges: 1 for a window as the
    /// agent closed it; more when backlog compaction merged older summaries into one coarser
    /// window (`window_ms` is then the coarse length). Format version 2; JSON without the key
    /// decodes as 1.
    #[serde(default = "one")]
    pub windows: u32,
}

fn one() -> u32 {
    1
}

/// Records that upstream will never receive, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    /// The lane the lost records belonged to.
    pub lane: Lane,
    /// First lost sequence number.
    pub first_seq: u64,
    /// Last lost sequence number.
    pub last_seq: u64,
    /// How many records were lost.
    pub records: u64,
    /// Earliest event time covered by the lost records (ms), if known.
    pub from_ms: Option<i64>,
    /// Latest event time covered by the lost records (ms), if known.
    pub to_ms: Option<i64>,
    /// Why they were lost: `outbox_full` (evicted at the byte cap), `expired` (older than
    /// the lane's TTL), `store_lost` (the agent's store could not be opened and was set
    /// aside: what it held is unknown, so `records`, `events` and the seqs are 0 and `to_ms`
    /// is when), `store_rolled_back` (sled opened the store at an older state: seqs
    /// `first_seq..=last_seq` are skipped because upstream already holds them, and what the
    /// store held after that state is lost in unknown amounts), or `late` / `future`: no
    /// records were lost (`records` and the seqs are 0),
    /// but `events` valid readings are in no summary because they arrived after their window
    /// closed or were stamped too far ahead (`from_ms`/`to_ms` are their timestamps). A
    /// free-form string, so new reasons need no new format version.
    pub reason: String,
    /// Events covered by the lost records: the sum of the lost summaries' counts (0 for lost
    /// alerts), so that a backend can account for every event in a summary or a gap. Format
    /// version 2; JSON without the key decodes as 0.
    #[serde(default)]
    pub events: u64,
}

/// The stable id of a record: `<agent>:<epoch hex>:<lane>:<seq>`.
pub fn record_id(agent: &str, epoch: u64, lane: Lane, seq: u64) -> String {
    alloc::format!("{agent}:{epoch:x}:{}:{seq}", lane.as_str())
}

/// The id of a gap record that took the place of record `seq`: `<record id>:gap`.
///
/// A gap has an id of its own so that a receiver which already got record `seq` (its
/// acknowledgement lost in a crash, so the record was still in the outbox when it was
/// evicted) does not discard the gap as a duplicate of that record.
pub fn gap_id(agent: &str, epoch: u64, lane: Lane, seq: u64) -> String {
    alloc::format!("{}:gap", record_id(agent, epoch, lane, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_name_agent_epoch_lane_and_seq() {
        assert_eq!(record_id("gw-1", 0xbeef, Lane::Alerts, 7), "gw-1:beef:alerts:7");
        assert_eq!(gap_id("gw-1", 0xbeef, Lane::Summaries, 7), "gw-1:beef:summaries:7:gap");
    }

    #[test]
    fn lane_tags_round_trip() {
        for lane in Lane::ALL {
            assert_eq!(Lane::from_tag(lane.tag()), Some(lane));
        }
        assert_eq!(Lane::from_tag(9), None);
    }

    #[test]
    fn alerts_carry_labels_and_json_without_them_still_decodes() {
        let mut labels = BTreeMap::new();
        labels.insert(String::from("device"), String::from("pump-1"));
        let alert = Alert {
            rule: "hot".into(),
            series: "pump-1/temp".into(),
            state: AlertState::Raised,
            severity: Severity::Critical,
            ts_ms: 1_000,
            value: 91.5,
            threshold: 90.0,
            message: "hot".into(),
            labels,
        };
        let json = serde_json::to_string(&alert).unwrap();
        assert!(json.ends_with(r#""labels":{"device":"pump-1"}}"#), "{json}");
        assert_eq!(serde_json::from_str::<Alert>(&json).unwrap(), alert);
        let bytes = postcard::to_stdvec(&alert).unwrap();
        assert_eq!(postcard::from_bytes::<Alert>(&bytes).unwrap(), alert);
        let old = json.replace(r#","labels":{"device":"pump-1"}"#, "");
        let decoded: Alert = serde_json::from_str(&old).unwrap();
        assert!(decoded.labels.is_empty());
    }

    #[test]
    fn a_record_round_trips_through_json_and_postcard() {
        let record = Record {
            id: record_id("gw", 1, Lane::Summaries, 3),
            seq: 3,
            body: RecordBody::Summary(Summary {
                series: "pump-1/temp".into(),
                start_ms: 1_000,
                window_ms: 10_000,
                count: 2,
                min: 1.0,
                max: 2.0,
                mean: 1.5,
                stddev: 0.5,
                first: 1.0,
                last: 2.0,
                windows: 1,
            }),
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains("\"summary\""), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), record);
        let bytes = postcard::to_stdvec(&record).unwrap();
        assert_eq!(postcard::from_bytes::<Record>(&bytes).unwrap(), record);
        // Version 1 JSON (no `windows`) decodes as one window.
        let v1 = json.replace(",\"windows\":1", "");
        assert_ne!(v1, json);
        assert_eq!(serde_json::from_str::<Record>(&v1).unwrap(), record);
    }

    #[test]
    fn a_version_1_gap_decodes_with_no_events() {
        let json = r#"{"lane":"summaries","first_seq":1,"last_seq":2,"records":2,"from_ms":null,"to_ms":null,"reason":"outbox_full"}"#;
        let gap: Gap = serde_json::from_str(json).unwrap();
        assert_eq!((gap.records, gap.events), (2, 0));
    }
}
