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
//!   first seen beyond that is counted in `dropped_series` and not listed. Each keeps the
//!   statistics of its current summary window (count, min, max, mean: 40 bytes), and the
//!   first [`MAX_SPARKLINE_SERIES`] keep their last [`SPARKLINE_POINTS`] values, one per
//!   second, for the page's sparklines ([`Sparkline`]: 8 bytes a point, ~0.5 KiB each);
//! - rules: the rules the processor runs (published at start and after each reload that
//!   applied), with the last transition of each.
//!
//! The model starts empty and the journal replay at start refills it from the processor's
//! snapshot position on: an alert raised before that snapshot is listed again only at its
//! next transition (the processor's restored rule state is not copied in).

use std::collections::{BTreeMap, VecDeque};
use std::sync::RwLock;

use sensors::record::{Alert, AlertState, Severity};

use crate::config::Config;
use crate::event::Entry;
use serde::{Deserialize, Serialize};

/// Most series listed by `/api/v1/series`: ~100 bytes each, so about 1 MiB. A gateway has
/// tens to a few thousand series; beyond this the API lists the first ones seen.
pub const MAX_SERIES: usize = 10_000;

/// Most active alerts kept (one per rule and series).
pub const MAX_ACTIVE_ALERTS: usize = 10_000;

/// Alert transitions kept for `/api/v1/alerts`.
pub const MAX_TRANSITIONS: usize = 50;

/// Series that keep recent values for a sparkline (the first ones seen); the others show
/// their last value and window statistics only. Bounds that part to about 1 MiB.
pub const MAX_SPARKLINE_SERIES: usize = 1_000;

/// Values kept per sparkline: the last one of each second, for the last minute or so.
pub const SPARKLINE_POINTS: usize = 60;

/// The last value of one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesValue {
    /// The series name.
    pub series: String,
    /// The last value applied.
    pub value: f64,
    /// Its event time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// `[ts_ms, value]` of the last values, one per second, oldest first (empty beyond
    /// [`MAX_SPARKLINE_SERIES`] series). Drawn, not computed with: the values are kept at
    /// `f32` precision (about 7 significant digits); `value` above is exact.
    pub recent: Vec<(i64, f32)>,
    /// The current summary window's statistics so far.
    pub window: Option<WindowStats>,
}

/// Statistics of one series in its current summary window (by event time), as the page
/// shows them; the summary record sent upstream when the window closes is authoritative.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WindowStats {
    /// Window start, ms since the Unix epoch (aligned to the window length).
    pub start_ms: i64,
    /// Values in the window so far.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl WindowStats {
    fn new(start_ms: i64, value: f64) -> WindowStats {
        WindowStats { start_ms, count: 1, min: value, max: value, mean: value }
    }

    fn add(&mut self, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.mean += (value - self.mean) / self.count as f64;
    }
}

/// A loaded rule, as the processor runs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleInfo {
    /// Its name.
    pub name: String,
    /// Its kind (`threshold`, `anomaly`, ...).
    pub kind: &'static str,
    /// The series pattern (`None` for combined rules).
    pub series: Option<String>,
    /// The severity of its alerts.
    pub severity: Severity,
}

/// A rule and its state, as [`ReadModel::rules`] returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleState {
    /// The rule.
    #[serde(flatten)]
    pub rule: RuleInfo,
    /// Its alerts raised and not cleared.
    pub active: usize,
    /// Its last transition since the start, if any.
    pub last: Option<Alert>,
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

/// What is kept of one series.
#[derive(Debug)]
struct Series {
    value: f64,
    ts_ms: i64,
    window: Option<WindowStats>,
    /// `None` beyond [`MAX_SPARKLINE_SERIES`].
    recent: Option<Sparkline>,
}

/// The last values of one series, one per second (the last value of each), oldest first, at
/// most [`SPARKLINE_POINTS`]: 8 bytes a point instead of 16, as a gateway keeps up to
/// [`MAX_SPARKLINE_SERIES`] of them (session 9: 0.96 -> 0.48 MB at 1,000 series).
#[derive(Debug)]
struct Sparkline {
    /// What the offsets count from, ms since the Unix epoch; at most the oldest point's time.
    base_ms: i64,
    /// `(ms after base_ms, value)`: u32 covers 49 days, after which the base moves up.
    points: VecDeque<(u32, f32)>,
}

impl Sparkline {
    fn new() -> Sparkline {
        Sparkline { base_ms: 0, points: VecDeque::with_capacity(SPARKLINE_POINTS) }
    }

    fn time(&self, offset: u32) -> i64 {
        self.base_ms + i64::from(offset)
    }

    /// Keeps `value` as the point of its second; a value older than the newest point's
    /// second is not drawn.
    fn apply(&mut self, ts_ms: i64, value: f64) {
        // A finite f64 beyond f32's range is drawn at the edge rather than as infinity.
        let value = (value as f32).clamp(f32::MIN, f32::MAX);
        let ts_ms = match self.points.back().map(|&(offset, _)| self.time(offset)) {
            Some(last) if last.div_euclid(1000) == ts_ms.div_euclid(1000) => {
                self.points.pop_back();
                ts_ms.max(last)
            }
            Some(last) if last > ts_ms => return,
            _ => {
                if self.points.len() == SPARKLINE_POINTS {
                    self.points.pop_front();
                }
                ts_ms
            }
        };
        let offset = self.offset(ts_ms);
        self.points.push_back((offset, value));
    }

    /// `ts_ms` (not older than any point) as an offset, moving the base up to the oldest
    /// point when it no longer fits, and dropping points older than 49 days before it.
    fn offset(&mut self, ts_ms: i64) -> u32 {
        if self.points.is_empty() {
            self.base_ms = ts_ms;
        }
        if let Ok(offset) = u32::try_from(ts_ms.saturating_sub(self.base_ms)) {
            return offset;
        }
        let base = self.points.front().map_or(ts_ms, |&(offset, _)| self.time(offset));
        let moved = base - self.base_ms;
        self.base_ms = base;
        for point in &mut self.points {
            // Every point is at least as new as the oldest, the new base.
            point.0 = u32::try_from(i64::from(point.0) - moved).unwrap_or(0);
        }
        match u32::try_from(ts_ms.saturating_sub(self.base_ms)) {
            Ok(offset) => offset,
            Err(_) => {
                self.points.clear();
                self.base_ms = ts_ms;
                0
            }
        }
    }

    /// `(ts_ms, value)`, oldest first.
    fn points(&self) -> impl Iterator<Item = (i64, f32)> + '_ {
        self.points.iter().map(|&(offset, value)| (self.time(offset), value))
    }
}

impl Series {
    /// Applies a value stamped `ts_ms` with windows of `window_ms`.
    fn apply(&mut self, ts_ms: i64, value: f64, window_ms: i64) {
        // A late event does not replace a newer value.
        if ts_ms >= self.ts_ms {
            self.value = value;
            self.ts_ms = ts_ms;
        }
        let start = ts_ms.div_euclid(window_ms).saturating_mul(window_ms);
        match &mut self.window {
            Some(w) if w.start_ms == start => w.add(value),
            Some(w) if w.start_ms > start => {} // the window it belongs to is closed here
            _ => self.window = Some(WindowStats::new(start, value)),
        }
        if let Some(recent) = &mut self.recent {
            recent.apply(ts_ms, value);
        }
    }
}

#[derive(Debug)]
struct Inner {
    active: BTreeMap<(String, String), Alert>,
    transitions: VecDeque<Alert>,
    series: BTreeMap<String, Series>,
    /// Series with a sparkline.
    sparklines: usize,
    /// The summary window length, ms.
    window_ms: i64,
    rules: Vec<RuleInfo>,
    /// The last transition of each loaded rule.
    last_by_rule: BTreeMap<String, Alert>,
    dropped_alerts: u64,
    dropped_series: u64,
    /// Journal seq of the last entry applied.
    position: u64,
    /// Events applied by source index (bounded by the configuration).
    events_by_source: BTreeMap<u16, u64>,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            active: BTreeMap::new(),
            transitions: VecDeque::new(),
            series: BTreeMap::new(),
            sparklines: 0,
            window_ms: 60_000,
            rules: Vec::new(),
            last_by_rule: BTreeMap::new(),
            dropped_alerts: 0,
            dropped_series: 0,
            position: 0,
            events_by_source: BTreeMap::new(),
        }
    }
}

impl Inner {
    /// Counts an event of source `source` and keeps the last value of `series`.
    fn event(&mut self, source: u16, series: &str, ts_ms: i64, value: f64) {
        *self.events_by_source.entry(source).or_insert(0) += 1;
        if !value.is_finite() {
            return;
        }
        let window_ms = self.window_ms;
        if let Some(last) = self.series.get_mut(series) {
            last.apply(ts_ms, value, window_ms);
        } else if self.series.len() < MAX_SERIES {
            let sparkline = self.sparklines < MAX_SPARKLINE_SERIES;
            self.sparklines += usize::from(sparkline);
            let mut state = Series {
                value,
                ts_ms: i64::MIN,
                window: None,
                recent: sparkline.then(Sparkline::new),
            };
            state.apply(ts_ms, value, window_ms);
            self.series.insert(series.to_string(), state);
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

    /// Records the rules and summary window the processor runs (at start and after each
    /// reload it applied). Transitions of rules no longer loaded are forgotten.
    pub fn publish_config(&self, config: &Config) {
        let mut inner = self.write();
        inner.window_ms =
            i64::try_from(config.summary.window.as_millis()).unwrap_or(i64::MAX).max(1);
        inner.rules = config
            .rules
            .iter()
            .map(|rule| {
                let common = rule.common();
                RuleInfo {
                    name: common.name.to_string(),
                    kind: rule.kind(),
                    series: common.series.map(str::to_string),
                    severity: common.severity,
                }
            })
            .collect();
        let Inner { rules, last_by_rule, .. } = &mut *inner;
        last_by_rule.retain(|name, _| rules.iter().any(|r| &r.name == name));
    }

    /// The loaded rules with their active alerts and last transition.
    pub fn rules(&self) -> Vec<RuleState> {
        let inner = self.read();
        inner
            .rules
            .iter()
            .map(|rule| RuleState {
                rule: rule.clone(),
                active: inner.active.keys().filter(|(name, _)| *name == rule.name).count(),
                last: inner.last_by_rule.get(&rule.name).cloned(),
            })
            .collect()
    }

    /// Records an alert transition.
    pub fn publish_alert(&self, alert: &Alert) {
        let mut inner = self.write();
        if inner.rules.iter().any(|r| r.name == alert.rule) {
            inner.last_by_rule.insert(alert.rule.clone(), alert.clone());
        }
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
                .map(|(series, state)| SeriesValue {
                    series: series.clone(),
                    value: state.value,
                    ts_ms: state.ts_ms,
                    recent: state.recent.iter().flat_map(Sparkline::points).collect(),
                    window: state.window,
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
        let view = model.series();
        assert_eq!(view.series.len(), 1);
        assert_eq!((view.series[0].value, view.series[0].ts_ms), (3.0, 20));
        for i in 0..MAX_SERIES + 5 {
            event(&model, 0, &format!("s{i}"), 1, 0.0);
        }
        assert_eq!(model.events_by_source()[&1], 2, "a non-finite value is counted, not shown");
        let view = model.series();
        assert_eq!(view.series.len(), MAX_SERIES);
        assert_eq!(view.dropped_series, 6, "`a` took one place");
        let with_sparkline = view.series.iter().filter(|s| !s.recent.is_empty()).count();
        assert_eq!(with_sparkline, MAX_SPARKLINE_SERIES);
    }

    #[test]
    fn window_statistics_restart_with_each_window_and_ignore_closed_ones() {
        let model = ReadModel::default(); // 60 s windows
        for (ts, value) in [(60_000, 4.0), (61_000, 2.0), (119_999, 6.0)] {
            event(&model, 0, "a", ts, value);
        }
        let window = model.series().series[0].window.unwrap();
        assert_eq!(
            window,
            WindowStats { start_ms: 60_000, count: 3, min: 2.0, max: 6.0, mean: 4.0 }
        );
        event(&model, 0, "a", 120_000, 10.0);
        event(&model, 0, "a", 59_000, -100.0); // late, for a window already past
        let series = &model.series().series[0];
        assert_eq!(series.window.unwrap(), WindowStats::new(120_000, 10.0));
        assert_eq!((series.value, series.ts_ms), (10.0, 120_000), "late values do not replace");
    }

    #[test]
    fn the_sparkline_keeps_the_last_value_of_each_second_up_to_its_length() {
        let model = ReadModel::default();
        event(&model, 0, "a", 1_000, 1.0);
        event(&model, 0, "a", 1_500, 2.0);
        event(&model, 0, "a", 2_100, 3.0);
        event(&model, 0, "a", 900, 9.0); // older than the last point: not drawn
        assert_eq!(model.series().series[0].recent, [(1_500, 2.0), (2_100, 3.0)]);
        for second in 3..(SPARKLINE_POINTS as i64 + 10) {
            event(&model, 0, "a", second * 1_000, second as f64);
        }
        let recent = &model.series().series[0].recent;
        assert_eq!(recent.len(), SPARKLINE_POINTS);
        assert_eq!(recent.last().unwrap().1, (SPARKLINE_POINTS + 9) as f32);
    }

    #[test]
    fn the_sparkline_keeps_exact_times_and_f32_values_across_its_49_day_offset_range() {
        let day = 86_400_000_i64;
        let mut line = Sparkline::new();
        let start = 1_764_000_000_123_i64; // late 2025
        line.apply(start, 21.3);
        line.apply(start + 1_000, 1e300); // finite beyond f32: drawn at the edge
        // 48 days of one point an hour: the base stays, the oldest points go.
        let mut ts = start;
        for hour in 1..=48 * 24 {
            ts = start + hour * 3_600_000;
            line.apply(ts, hour as f64);
        }
        assert_eq!(line.base_ms, start);
        // Past 2^32 ms (49.7 days) after the base: the base moves up to the oldest point.
        let late = start + 50 * day;
        line.apply(late, 0.5);
        let points: Vec<_> = line.points().collect();
        assert_eq!(points.len(), SPARKLINE_POINTS);
        assert!(line.base_ms > start && line.base_ms == points[0].0);
        assert_eq!(points[SPARKLINE_POINTS - 2], (ts, (48 * 24) as f32));
        assert_eq!(points[SPARKLINE_POINTS - 1], (late, 0.5));
        assert!(points.windows(2).all(|w| w[0].0 < w[1].0));
        // A jump of more than 49 days past every point starts the line over.
        let later = late + 100 * day;
        line.apply(later, 2.0);
        assert_eq!(line.points().collect::<Vec<_>>(), [(later, 2.0)]);

        let mut edge = Sparkline::new();
        edge.apply(0, 1e300);
        edge.apply(1_000, -1e300);
        edge.apply(2_000, 21.3);
        let values: Vec<f32> = edge.points().map(|p| p.1).collect();
        assert_eq!(values, [f32::MAX, f32::MIN, 21.3]);
        // f32 values serialize in their shortest form: the page gets 21.3, not 21.299999.
        let json = serde_json::to_string(&edge.points().last().unwrap()).unwrap();
        assert_eq!(json, "[2000,21.3]");
    }

    #[test]
    fn rules_show_their_active_alerts_and_last_transition_until_unloaded() {
        let text = r##"
            [agent]
            id = "gw"
            [upstream]
            kind = "file"
            path = "out.jsonl"
            [[sources]]
            kind = "simulated"
            [[rules]]
            name = "hot"
            kind = "threshold"
            series = "+/temp"
            above = 80.0
            [[rules]]
            name = "quiet"
            kind = "missing_data"
            series = "#"
            timeout = "1m"
        "##;
        let config: Config = crate::config::load_str("rules.toml", text).expect("config");
        let model = ReadModel::default();
        model.publish_config(&config);
        model.publish_alert(&alert("hot", "a/temp", AlertState::Raised, 1));
        model.publish_alert(&alert("hot", "b/temp", AlertState::Raised, 2));
        let rules = model.rules();
        assert_eq!(rules.len(), 2);
        assert_eq!((rules[0].rule.kind, rules[0].active), ("threshold", 2));
        assert_eq!(rules[0].last.as_ref().map(|a| a.ts_ms), Some(2));
        assert_eq!((rules[1].rule.name.as_str(), rules[1].active), ("quiet", 0));
        assert!(rules[1].last.is_none());
        let mut fewer = config.clone();
        fewer.rules.remove(0);
        model.publish_config(&fewer);
        model.publish_config(&config);
        assert!(model.rules()[0].last.is_none(), "an unloaded rule's state is forgotten");
    }
}
