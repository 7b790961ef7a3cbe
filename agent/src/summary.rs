//! Windowed summaries: per-series tumbling windows aligned to the clock.
//!
//! Like the rules, this is a pure state machine owned by the processor: time comes only from
//! the entries it is given (event timestamps, event receive times and journal ticks), never
//! from a clock read here, so replaying the same journal closes the same windows with the
//! same bytes.
//!
//! # Windows
//!
//! A window of length `w` covers `[start, start + w)` with `start = floor(ts / w) * w`
//! (floored for negative timestamps too), so windows of different series and different
//! gateways line up. Each open window keeps count, min, max, Welford's running mean and sum of
//! squared deviations (for the population standard deviation), and the first and last values
//! by event time (ties keep arrival order: the first arrival stays `first`, the last arrival
//! becomes `last`).
//!
//! # The clock, closing, late and future events
//!
//! The *clock* is the largest gateway time seen: `Tick { now_ms }` entries and the
//! `received_ms` of events. It only moves forward, so a clock stepping back (NTP, a reboot
//! without RTC) cannot reopen anything.
//!
//! - A window closes when the clock reaches `end + allowed_lateness`; it then emits one
//!   [`Summary`] and is forgotten.
//! - An event whose window has closed is **late**: it is not merged (the summary is already on
//!   its way upstream) and is reported as [`Admission::Late`] so the caller counts it.
//! - An event stamped more than `max_future` ahead of the clock is **future**
//!   ([`Admission::Future`]) and is rejected as a whole — a sensor with a broken clock must
//!   not open windows that stay open for days.
//! - A non-finite value (NaN, ±inf) would poison min/max/mean and is refused
//!   ([`Admission::NotFinite`]).
//!
//! Per series at most [`MAX_OPEN_WINDOWS_PER_SERIES`] windows are open; opening one more
//! closes the oldest early. Closed windows of a series therefore always form a prefix in
//! start order, which the per-series watermark `closed_before` records so that an event for
//! an early-closed window is late too. A series whose last window closed is dropped from the
//! state: the clock alone then decides lateness (its windows closed by the clock).
//!
//! Closing order is deterministic: by series (byte order), then by window start.
//!
//! # State
//!
//! [`WindowsState`] (clock + `series → open windows` in a [`SeriesMap`], which encodes sorted
//! like a `BTreeMap`) is serde-serializable and
//! goes into the processor snapshot; open windows survive a restart and close later, exactly
//! as they would have without the restart. Each window remembers its own length, so a change
//! of `summary.window` between runs lets old windows close with their old length.

use sensors::record::Summary;
use serde::{Deserialize, Serialize};

use crate::config::SummaryConfig;
use crate::event::Event;
use crate::series_map::SeriesMap;

/// When a window that opened at `start` closes: its end plus the allowed lateness.
fn close_at(start: i64, window: &Window, lateness_ms: i64) -> i64 {
    start.saturating_add(window.window_ms).saturating_add(lateness_ms)
}

/// Most open windows per series. In-order traffic needs `ceil(allowed_lateness / window) + 1`
/// windows (2 with the defaults of 60 s and 5 s); 4 leaves room for a lateness of up to three
/// windows while bounding the memory a series with scrambled timestamps can take. Beyond it
/// the oldest window is closed early.
pub const MAX_OPEN_WINDOWS_PER_SERIES: usize = 4;

/// Errors of the summary configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SummaryError {
    /// A `[summary]` parameter is invalid.
    #[error("invalid `summary.{name}`: {reason}")]
    InvalidParameter {
        /// The configuration key.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What happened to an event offered to [`Windows::on_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Merged into its window (or accepted without windows when summaries are disabled).
    Accepted,
    /// Its window has already closed; not merged.
    Late,
    /// Stamped more than `max_future` ahead of the clock; rejected.
    Future,
    /// The value is NaN or infinite; rejected.
    NotFinite,
}

/// Running statistics of one open window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Length of this window in ms (the configured length when it opened).
    pub window_ms: i64,
    /// Number of merged events.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Welford's running mean.
    pub mean: f64,
    /// Welford's sum of squared deviations from the mean.
    pub m2: f64,
    /// Timestamp of `first`.
    pub first_ts: i64,
    /// Value with the earliest timestamp.
    pub first: f64,
    /// Timestamp of `last`.
    pub last_ts: i64,
    /// Value with the latest timestamp.
    pub last: f64,
}

impl Window {
    fn new(window_ms: i64, ts: i64, value: f64) -> Window {
        Window {
            window_ms,
            count: 1,
            min: value,
            max: value,
            mean: value,
            m2: 0.0,
            first_ts: ts,
            first: value,
            last_ts: ts,
            last: value,
        }
    }

    fn merge(&mut self, ts: i64, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Welford: numerically stable, O(1) memory.
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        if ts < self.first_ts {
            self.first_ts = ts;
            self.first = value;
        }
        if ts >= self.last_ts {
            self.last_ts = ts;
            self.last = value;
        }
    }

    fn summary(&self, series: &str, start_ms: i64) -> Summary {
        Summary {
            series: series.to_string(),
            start_ms,
            window_ms: self.window_ms.unsigned_abs(),
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.mean,
            stddev: (self.m2 / self.count as f64).max(0.0).sqrt(),
            first: self.first,
            last: self.last,
            windows: 1,
        }
    }
}

/// The open windows of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SeriesWindows {
    /// Windows starting before this are closed (the end of the last closed window).
    closed_before: i64,
    /// Open windows, sorted by start (at most [`MAX_OPEN_WINDOWS_PER_SERIES`], usually one
    /// or two). A `Vec`, not a `BTreeMap`: a map's first node has room for 11 entries, about
    /// 1 KB per series for one open window (heaptrack: 11 MB of 59 at 10,000 series). postcard
    /// encodes both as a length and the `(start, window)` pairs: older snapshots still decode.
    open: Vec<(i64, Window)>,
}

/// The snapshotted state of all windows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowsState {
    /// The largest gateway time seen, `None` before the first entry.
    clock: Option<i64>,
    series: SeriesMap<SeriesWindows>,
}

impl WindowsState {
    /// The clock: the largest gateway time seen.
    pub fn clock(&self) -> Option<i64> {
        self.clock
    }

    /// Number of open windows over all series.
    pub fn open_windows(&self) -> usize {
        self.series.values().map(|s| s.open.len()).sum()
    }

    /// The series with at least one open window.
    pub fn series(&self) -> impl Iterator<Item = &str> {
        self.series.keys().map(String::as_str)
    }

    /// The open windows of `series` as `(start, window)`, oldest first.
    pub fn windows(&self, series: &str) -> impl Iterator<Item = (i64, &Window)> {
        self.series.get(series).into_iter().flat_map(|s| s.open.iter().map(|(k, w)| (*k, w)))
    }
}

/// Tumbling windows of all series.
#[derive(Debug, Clone)]
pub struct Windows {
    enabled: bool,
    window_ms: i64,
    lateness_ms: i64,
    max_future_ms: i64,
    state: WindowsState,
    /// Lower bound of the clock at which the next window closes; saves a scan of every
    /// series per event. Derived, not snapshotted; a stale (too low) value only costs a scan.
    next_close: Option<i64>,
}

fn millis(name: &'static str, d: std::time::Duration) -> Result<i64, SummaryError> {
    i64::try_from(d.as_millis())
        .map_err(|_| SummaryError::InvalidParameter { name, reason: format!("{d:?} is too long") })
}

impl Windows {
    /// Empty windows for a configuration; refuses a zero window length.
    pub fn new(config: &SummaryConfig) -> Result<Windows, SummaryError> {
        Self::restore(config, WindowsState::default())
    }

    /// Windows continuing from a snapshotted state.
    pub fn restore(config: &SummaryConfig, state: WindowsState) -> Result<Windows, SummaryError> {
        let window_ms = millis("window", config.window)?;
        if window_ms < 1 {
            return Err(SummaryError::InvalidParameter {
                name: "window",
                reason: "must be at least 1 ms; set `enabled = false` to turn summaries off".into(),
            });
        }
        let mut windows = Windows {
            enabled: config.enabled,
            window_ms,
            lateness_ms: millis("allowed_lateness", config.allowed_lateness)?,
            max_future_ms: millis("max_future", config.max_future)?,
            state,
            next_close: None,
        };
        windows.next_close = windows.earliest_close();
        Ok(windows)
    }

    /// The state, for snapshots and status.
    pub fn state(&self) -> &WindowsState {
        &self.state
    }

    fn earliest_close(&self) -> Option<i64> {
        self.state
            .series
            .values()
            .filter_map(|s| s.open.first().map(|(start, w)| close_at(*start, w, self.lateness_ms)))
            .min()
    }

    /// Moves the clock forward to `now_ms` (never back) and closes every window whose end
    /// plus the allowed lateness it reached, pushing their summaries in (series, start) order.
    pub fn advance(&mut self, now_ms: i64, out: &mut Vec<Summary>) {
        let clock = self.state.clock.map_or(now_ms, |c| c.max(now_ms));
        self.state.clock = Some(clock);
        match self.next_close {
            Some(at) if clock >= at => {}
            _ => return,
        }
        let lateness = self.lateness_ms;
        let due = |start: &i64, w: &Window| clock >= close_at(*start, w, lateness);
        // The series with a window to close, in key order: replay must number the summaries
        // as the live run did, whatever the map's history.
        let closing = self
            .state
            .series
            .sorted_keys(|s| s.open.first().is_none_or(|(start, w)| due(start, w)));
        for series in closing {
            let Some(windows) = self.state.series.get_mut(&series) else { continue };
            let n = windows.open.iter().take_while(|(start, w)| due(start, w)).count();
            for (start, window) in windows.open.drain(..n) {
                out.push(window.summary(&series, start));
                let end = start.saturating_add(window.window_ms);
                windows.closed_before = windows.closed_before.max(end);
            }
            if windows.open.is_empty() {
                self.state.series.remove(&series);
            }
        }
        self.next_close = self.earliest_close();
    }

    /// Offers one event: advances the clock to its receive time, then merges it into its
    /// window, opening the window if needed. Summaries of windows closed on the way (by the
    /// clock or early, to respect [`MAX_OPEN_WINDOWS_PER_SERIES`]) are pushed to `out`.
    pub fn on_event(&mut self, event: &Event, out: &mut Vec<Summary>) -> Admission {
        self.advance(event.received_ms, out);
        let clock = self.state.clock.unwrap_or(event.received_ms);
        if !event.value.is_finite() {
            return Admission::NotFinite;
        }
        if event.ts_ms > clock.saturating_add(self.max_future_ms) {
            return Admission::Future;
        }
        if !self.enabled {
            return Admission::Accepted;
        }
        let w = self.window_ms;
        // `None` only for timestamps within one window of i64::MIN: late by any measure.
        let Some(start) = event.ts_ms.div_euclid(w).checked_mul(w) else {
            return Admission::Late;
        };
        if clock >= start.saturating_add(w).saturating_add(self.lateness_ms) {
            return Admission::Late;
        }
        // Look up before inserting: cloning the key on every event would allocate.
        if !self.state.series.contains_key(&event.series) {
            let fresh = SeriesWindows { closed_before: i64::MIN, open: Vec::with_capacity(1) };
            self.state.series.insert(event.series.clone(), fresh);
        }
        let Some(windows) = self.state.series.get_mut(&event.series) else {
            return Admission::Late; // unreachable: inserted above
        };
        if start < windows.closed_before {
            return Admission::Late;
        }
        if let Ok(i) = windows.open.binary_search_by_key(&start, |(s, _)| *s) {
            let window = &mut windows.open[i].1;
            if window.window_ms == w {
                window.merge(event.ts_ms, event.value);
                return Admission::Accepted;
            }
            // A window of another length at the same start: opened before `summary.window`
            // was changed. Close it now rather than mixing two lengths in one summary.
            let (_, old) = windows.open.remove(i);
            out.push(old.summary(&event.series, start));
        }
        if windows.open.len() >= MAX_OPEN_WINDOWS_PER_SERIES {
            let oldest = windows.open.first().map_or(start, |(s, _)| *s);
            if start < oldest {
                // It would be the oldest and be closed at once: count it as late instead of
                // emitting a one-event summary.
                return Admission::Late;
            }
            let (old_start, old) = windows.open.remove(0);
            out.push(old.summary(&event.series, old_start));
            windows.closed_before =
                windows.closed_before.max(old_start.saturating_add(old.window_ms));
        }
        let at = windows.open.partition_point(|(s, _)| *s < start);
        windows.open.insert(at, (start, Window::new(w, event.ts_ms, event.value)));
        let close_at = start.saturating_add(w).saturating_add(self.lateness_ms);
        self.next_close = Some(self.next_close.map_or(close_at, |c| c.min(close_at)));
        Admission::Accepted
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    #[test]
    fn open_windows_encode_as_the_map_older_snapshots_hold() {
        /// `SeriesWindows` as builds before 0.2 declared it.
        #[derive(Serialize)]
        struct OldSeriesWindows {
            closed_before: i64,
            open: BTreeMap<i64, Window>,
        }
        let window = |start: i64| Window::new(60_000, start + 5, 1.5);
        let old = OldSeriesWindows {
            closed_before: -7,
            open: [(0, window(0)), (60_000, window(60_000))].into_iter().collect(),
        };
        let new = SeriesWindows {
            closed_before: -7,
            open: vec![(0, window(0)), (60_000, window(60_000))],
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&new).unwrap(), bytes);
        assert_eq!(postcard::from_bytes::<SeriesWindows>(&bytes).unwrap(), new);
    }

    fn config(window_ms: u64, lateness_ms: u64) -> SummaryConfig {
        SummaryConfig {
            enabled: true,
            window: Duration::from_millis(window_ms),
            allowed_lateness: Duration::from_millis(lateness_ms),
            max_future: Duration::from_millis(60_000),
        }
    }

    fn event(series: &str, ts_ms: i64, value: f64, received_ms: i64) -> Event {
        Event { series: series.into(), ts_ms, value, received_ms, source: 0 }
    }

    #[test]
    fn a_window_reports_count_min_max_mean_stddev_first_and_last() {
        let mut windows = Windows::new(&config(10_000, 0)).unwrap();
        let mut out = Vec::new();
        // The textbook set with mean 5 and population stddev 2, out of time order.
        let values = [(3_000, 4.0), (1_000, 2.0), (2_000, 4.0), (4_000, 4.0)];
        let more = [(5_000, 5.0), (6_000, 5.0), (8_000, 9.0), (7_000, 7.0)];
        for (ts, v) in values.into_iter().chain(more) {
            assert_eq!(windows.on_event(&event("s", ts, v, ts), &mut out), Admission::Accepted);
        }
        assert!(out.is_empty());
        windows.advance(10_000, &mut out);
        assert_eq!(
            out,
            vec![Summary {
                series: "s".into(),
                start_ms: 0,
                window_ms: 10_000,
                count: 8,
                min: 2.0,
                max: 9.0,
                mean: 5.0,
                stddev: 2.0,
                first: 2.0,
                last: 9.0,
                windows: 1,
            }]
        );
    }

    #[test]
    fn equal_timestamps_keep_arrival_order_for_first_and_last() {
        let mut windows = Windows::new(&config(1_000, 0)).unwrap();
        let mut out = Vec::new();
        for v in [1.0, 2.0, 3.0] {
            windows.on_event(&event("s", 500, v, 500), &mut out);
        }
        windows.advance(1_000, &mut out);
        assert_eq!((out[0].first, out[0].last), (1.0, 3.0));
        assert_eq!(out[0].stddev, (2.0f64 / 3.0).sqrt());
    }

    #[test]
    fn windows_align_to_multiples_of_the_length_even_before_1970() {
        let mut windows = Windows::new(&config(1_000, 0)).unwrap();
        let mut out = Vec::new();
        windows.on_event(&event("s", -1, 1.0, -1), &mut out);
        windows.on_event(&event("s", 2_500, 1.0, 2_500), &mut out);
        let starts: Vec<_> = windows.state().windows("s").map(|(s, _)| s).collect();
        // Receiving at 2500 closed [-1000, 0) before the second event merged.
        assert_eq!(out.iter().map(|s| s.start_ms).collect::<Vec<_>>(), vec![-1_000]);
        assert_eq!(starts, vec![2_000]);
    }

    #[test]
    fn windows_close_only_after_the_allowed_lateness_and_accept_late_events_until_then() {
        let mut windows = Windows::new(&config(10_000, 2_000)).unwrap();
        let mut out = Vec::new();
        windows.on_event(&event("s", 9_000, 1.0, 9_000), &mut out);
        windows.advance(11_999, &mut out);
        assert!(out.is_empty());
        assert_eq!(
            windows.on_event(&event("s", 9_500, 3.0, 11_999), &mut out),
            Admission::Accepted
        );
        windows.advance(12_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].count, out[0].mean), (2, 2.0));
        assert_eq!(windows.state().open_windows(), 0);
        assert_eq!(windows.state().series().count(), 0, "closed series leave no state");
    }

    #[test]
    fn events_for_closed_windows_are_late_and_not_merged() {
        let mut windows = Windows::new(&config(10_000, 0)).unwrap();
        let mut out = Vec::new();
        windows.on_event(&event("s", 1_000, 1.0, 1_000), &mut out);
        windows.advance(10_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(windows.on_event(&event("s", 9_999, 5.0, 10_001), &mut out), Admission::Late);
        // A window that never existed but whose time has passed is late as well.
        assert_eq!(windows.on_event(&event("t", 5_000, 5.0, 10_002), &mut out), Admission::Late);
        assert_eq!(out.len(), 1);
        assert_eq!(windows.state().open_windows(), 0);
    }

    #[test]
    fn events_too_far_ahead_of_the_clock_are_rejected_as_future() {
        let mut windows = Windows::new(&config(10_000, 0)).unwrap();
        let mut out = Vec::new();
        let ahead = event("s", 1_000 + 60_001, 1.0, 1_000);
        assert_eq!(windows.on_event(&ahead, &mut out), Admission::Future);
        let edge = event("s", 1_000 + 60_000, 1.0, 1_000);
        assert_eq!(windows.on_event(&edge, &mut out), Admission::Accepted);
        assert_eq!(windows.state().open_windows(), 1);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let mut windows = Windows::new(&config(10_000, 0)).unwrap();
        let mut out = Vec::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(windows.on_event(&event("s", 1, v, 1), &mut out), Admission::NotFinite);
        }
        assert_eq!(windows.state().open_windows(), 0);
    }

    #[test]
    fn the_clock_never_moves_back() {
        let mut windows = Windows::new(&config(10_000, 0)).unwrap();
        let mut out = Vec::new();
        windows.advance(50_000, &mut out);
        windows.advance(0, &mut out);
        assert_eq!(windows.state().clock(), Some(50_000));
        assert_eq!(windows.on_event(&event("s", 1_000, 1.0, 1_000), &mut out), Admission::Late);
    }

    #[test]
    fn open_windows_per_series_are_bounded_and_the_oldest_close_early() {
        let mut windows = Windows::new(&config(1_000, 100_000)).unwrap();
        let mut out = Vec::new();
        for i in 0..6 {
            windows.on_event(&event("s", i * 1_000, i as f64, 0), &mut out);
        }
        assert_eq!(windows.state().open_windows(), MAX_OPEN_WINDOWS_PER_SERIES);
        assert_eq!(out.iter().map(|s| s.start_ms).collect::<Vec<_>>(), vec![0, 1_000]);
        // The early-closed windows are closed for good, and an older one is not opened.
        assert_eq!(windows.on_event(&event("s", 1_500, 9.0, 0), &mut out), Admission::Late);
        assert_eq!(windows.on_event(&event("s", 500, 9.0, 0), &mut out), Admission::Late);
        assert_eq!(windows.on_event(&event("s", 2_500, 9.0, 0), &mut out), Admission::Accepted);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn windows_close_in_series_then_start_order() {
        let mut windows = Windows::new(&config(1_000, 0)).unwrap();
        let mut out = Vec::new();
        for (series, ts) in [("b", 1_500), ("a", 1_200), ("b", 500), ("a", 100)] {
            windows.on_event(&event(series, ts, 1.0, 0), &mut out);
        }
        windows.advance(5_000, &mut out);
        let order: Vec<_> = out.iter().map(|s| (s.series.as_str(), s.start_ms)).collect();
        assert_eq!(order, vec![("a", 0), ("a", 1_000), ("b", 0), ("b", 1_000)]);
    }

    #[test]
    fn disabled_summaries_open_no_windows_but_still_reject_future_events() {
        let mut windows =
            Windows::new(&SummaryConfig { enabled: false, ..config(1_000, 0) }).unwrap();
        let mut out = Vec::new();
        assert_eq!(windows.on_event(&event("s", 1, 1.0, 1), &mut out), Admission::Accepted);
        assert_eq!(windows.on_event(&event("s", 10_000_000, 1.0, 1), &mut out), Admission::Future);
        assert_eq!(windows.state().open_windows(), 0);
    }

    #[test]
    fn a_zero_window_is_refused() {
        let err = Windows::new(&config(0, 0)).unwrap_err();
        assert!(matches!(err, SummaryError::InvalidParameter { name: "window", .. }), "{err}");
    }

    #[test]
    fn restored_windows_continue_and_a_changed_length_closes_old_windows_with_theirs() {
        let mut windows = Windows::new(&config(10_000, 0)).unwrap();
        let mut out = Vec::new();
        windows.on_event(&event("s", 1_000, 1.0, 1_000), &mut out);
        let bytes = postcard::to_stdvec(windows.state()).unwrap();
        let state: WindowsState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&state, windows.state());
        let mut same = Windows::restore(&config(10_000, 0), state.clone()).unwrap();
        same.on_event(&event("s", 2_000, 3.0, 2_000), &mut out);
        same.advance(10_000, &mut out);
        assert_eq!((out[0].count, out[0].mean), (2, 2.0));

        out.clear();
        let mut changed = Windows::restore(&config(5_000, 0), state).unwrap();
        changed.on_event(&event("s", 2_000, 3.0, 2_000), &mut out);
        assert_eq!(out.len(), 1, "the 10 s window at the same start closed early");
        assert_eq!((out[0].window_ms, out[0].count), (10_000, 1));
        changed.advance(5_000, &mut out);
        assert_eq!((out[1].window_ms, out[1].count, out[1].first), (5_000, 1, 3.0));
    }
}
