//! The API's read model: what the processor produced, kept for reading by `/api/v1/alerts`
//! and `/api/v1/series`.
//!
//! ```text
//! processor ──publish_applied (one lock per journal batch) / publish_alert──▶ ReadModel (RwLock) ──snapshot──▶ api
//! ```
//!
//! The processor only writes here, never reads, so its output stays a pure function of the
//! journal. Everything is bounded:
//!
//! - active alerts: one per `(rule, series)` raised and not yet cleared, at most
//!   [`MAX_ACTIVE_ALERTS`] (an alert raised beyond that is counted in `dropped_alerts`);
//! - transitions: the last [`MAX_TRANSITIONS`] raised/cleared records, oldest dropped first;
//! - series: the last value and event time of at most [`MAX_SERIES`] series; a series
//!   first seen beyond that is counted in `dropped_series` and not listed.
//!
//! The model starts empty and the journal replay at start refills it from the processor's
//! snapshot position on: an alert raised before that snapshot is listed again only at its
//! next transition (the processor's restored rule state is not copied in).

use std::collections::{BTreeMap, VecDeque};
use std::sync::RwLock;

use sensors::record::{Alert, AlertState};

use crate::event::Entry;
use serde::{Deserialize, Serialize};

/// Most series listed by `/api/v1/series`: ~100 bytes each, so about 1 MiB. A gateway has
/// tens to a few thousand series; beyond this the API lists the first ones seen.
pub const MAX_SERIES: usize = 10_000;

/// Most active alerts kept (one per rule and series).
pub const MAX_ACTIVE_ALERTS: usize = 10_000;

/// Alert transitions kept for `/api/v1/alerts`.
pub const MAX_TRANSITIONS: usize = 50;

/// The last value of one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesValue {
    /// The series name.
    pub series: String,
    /// The last value applied.
    pub value: f64,
    /// Its event time, ms since the Unix epoch.
    pub ts_ms: i64,
}

/// Active alerts and recent transitions, as `/api/v1/alerts` returns them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AlertsView {
    /// Raised and not yet cleared, by rule then series.
    pub active: Vec<Alert>,
    /// The last transitions, oldest first.
    pub transitions: Vec<Alert>,
    /// Alerts raised while [`MAX_ACTIVE_ALERTS`] were active, not listed.
    pub dropped_alerts: u64,
}

/// Series and their last values, as `/api/v1/series` returns them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeriesView {
    /// The series, by name.
    pub series: Vec<SeriesValue>,
    /// Series not listed because [`MAX_SERIES`] were already known.
    pub dropped_series: u64,
    /// The cap, for the reader.
    pub max_series: usize,
}

#[derive(Debug, Default)]
struct Inner {
    active: BTreeMap<(String, String), Alert>,
    transitions: VecDeque<Alert>,
    series: BTreeMap<String, (f64, i64)>,
    dropped_alerts: u64,
    dropped_series: u64,
    /// Journal seq of the last entry applied.
    position: u64,
    /// Events applied by source index (bounded by the configuration).
    events_by_source: BTreeMap<u16, u64>,
}

impl Inner {
    /// Counts an event of source `source` and keeps the last value of `series`.
    fn event(&mut self, source: u16, series: &str, ts_ms: i64, value: f64) {
        *self.events_by_source.entry(source).or_insert(0) += 1;
        if !value.is_finite() {
            return;
        }
        if let Some(last) = self.series.get_mut(series) {
            // A late event does not replace a newer value.
            if ts_ms >= last.1 {
                *last = (value, ts_ms);
            }
        } else if self.series.len() < MAX_SERIES {
            self.series.insert(series.to_string(), (value, ts_ms));
        } else {
            self.dropped_series += 1;
        }
    }
}

/// The read model; share it as `Arc<ReadModel>`.
#[derive(Debug, Default)]
pub struct ReadModel {
    inner: RwLock<Inner>,
}

impl ReadModel {
    /// Records what the processor applied, under one lock for the whole batch (the processor
    /// calls this once per journal batch, not per event): each event's source and value, and
    /// the position of the last entry.
    pub fn publish_applied<'a>(&self, applied: impl IntoIterator<Item = (u64, &'a Entry)>) {
        let mut inner = self.write();
        for (seq, entry) in applied {
            if let Entry::Event(event) = entry {
                inner.event(event.source, &event.series, event.ts_ms, event.value);
            }
            inner.position = seq;
        }
    }

    /// Journal seq of the last entry the processor applied (0 before the first).
    pub fn position(&self) -> u64 {
        self.read().position
    }

    /// Events applied by source index.
    pub fn events_by_source(&self) -> BTreeMap<u16, u64> {
        self.read().events_by_source.clone()
    }

    /// Records an alert transition.
    pub fn publish_alert(&self, alert: &Alert) {
        let mut inner = self.write();
        let key = (alert.rule.clone(), alert.series.clone());
        match alert.state {
            AlertState::Raised => {
                if inner.active.len() < MAX_ACTIVE_ALERTS || inner.active.contains_key(&key) {
                    inner.active.insert(key, alert.clone());
                } else {
                    inner.dropped_alerts += 1;
                }
            }
            AlertState::Cleared => {
                inner.active.remove(&key);
            }
        }
        if inner.transitions.len() == MAX_TRANSITIONS {
            inner.transitions.pop_front();
        }
        inner.transitions.push_back(alert.clone());
    }

    /// Active alerts and recent transitions.
    pub fn alerts(&self) -> AlertsView {
        let inner = self.read();
        AlertsView {
            active: inner.active.values().cloned().collect(),
            transitions: inner.transitions.iter().cloned().collect(),
            dropped_alerts: inner.dropped_alerts,
        }
    }

    /// Number of active alerts.
    pub fn active_alerts(&self) -> usize {
        self.read().active.len()
    }

    /// Series and their last values.
    pub fn series(&self) -> SeriesView {
        let inner = self.read();
        SeriesView {
            series: inner
                .series
                .iter()
                .map(|(series, (value, ts_ms))| SeriesValue {
                    series: series.clone(),
                    value: *value,
                    ts_ms: *ts_ms,
                })
                .collect(),
            dropped_series: inner.dropped_series,
            max_series: MAX_SERIES,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map: go on.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensors::record::Severity;

    fn alert(rule: &str, series: &str, state: AlertState, ts_ms: i64) -> Alert {
        Alert {
            rule: rule.into(),
            series: series.into(),
            state,
            severity: Severity::Warning,
            ts_ms,
            value: 1.0,
            threshold: 0.5,
            message: String::new(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_cleared_alert_leaves_the_active_list_but_stays_in_the_transitions() {
        let model = ReadModel::default();
        model.publish_alert(&alert("hot", "a", AlertState::Raised, 1));
        model.publish_alert(&alert("hot", "b", AlertState::Raised, 2));
        model.publish_alert(&alert("hot", "a", AlertState::Cleared, 3));
        let view = model.alerts();
        assert_eq!(view.active.len(), 1);
        assert_eq!(view.active[0].series, "b");
        assert_eq!(view.transitions.iter().map(|a| a.ts_ms).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn only_the_last_transitions_are_kept() {
        let model = ReadModel::default();
        for i in 0..(MAX_TRANSITIONS as i64 + 10) {
            model.publish_alert(&alert("hot", "a", AlertState::Raised, i));
        }
        let view = model.alerts();
        assert_eq!(view.transitions.len(), MAX_TRANSITIONS);
        assert_eq!(view.transitions[0].ts_ms, 10);
        assert_eq!(view.active.len(), 1);
    }

    /// Publishes one event entry as the processor would.
    fn event(model: &ReadModel, source: u16, series: &str, ts_ms: i64, value: f64) {
        let event =
            crate::event::Event { series: series.into(), ts_ms, value, received_ms: ts_ms, source };
        model.publish_applied([(model.position() + 1, &Entry::Event(event))]);
    }

    #[test]
    fn series_keep_the_newest_value_and_stop_at_the_cap() {
        let model = ReadModel::default();
        event(&model, 0, "a", 10, 1.0);
        event(&model, 0, "a", 5, 2.0);
        event(&model, 1, "a", 20, 3.0);
        event(&model, 1, "a", 30, f64::NAN);
        assert_eq!(
            model.series().series,
            [SeriesValue { series: "a".into(), value: 3.0, ts_ms: 20 }]
        );
        for i in 0..MAX_SERIES + 5 {
            event(&model, 0, &format!("s{i}"), 1, 0.0);
        }
        assert_eq!(model.events_by_source()[&1], 2, "a non-finite value is counted, not shown");
        let view = model.series();
        assert_eq!(view.series.len(), MAX_SERIES);
        assert_eq!(view.dropped_series, 6, "`a` took one place");
    }
}
