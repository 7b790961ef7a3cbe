//! `kind = "window"`: an aggregate over a sliding time window compared with a level, e.g.
//! "mean vibration over 5 min above 7.1".
//!
//! # Method
//!
//! Per series a ring of `(ts, value)` samples in time order covers `(newest - window,
//! newest]` in event time. Each event is inserted (in order; late events within the window
//! are placed where they belong, older ones are ignored), samples that fell out of the
//! window are dropped, and the aggregate is computed **exactly** by a scan of the ring:
//!
//! | aggregate | value                                              |
//! |-----------|----------------------------------------------------|
//! | `mean`    | arithmetic mean                                    |
//! | `min`     | smallest value                                     |
//! | `max`     | largest value                                      |
//! | `count`   | number of events in the window                     |
//! | `stddev`  | population standard deviation (two-pass: mean, then squared deviations) |
//!
//! The aggregate goes through a [`Level`] (`above`/`below`, `clear`, `for`), as in a
//! threshold rule.
//!
//! # Memory and cost
//!
//! At most [`WINDOW_MAX_SAMPLES`] samples (16 bytes each, 8 KiB) per series: a window that
//! receives more events than that is cut to its newest [`WINDOW_MAX_SAMPLES`] events, so
//! `count` saturates there and the other aggregates cover a shorter, newest part of the
//! window. The scan costs one pass (two for `stddev`) over the ring per event.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::threshold::{Level, LevelState, check_levels};
use super::{Transition, millis};

/// Most samples kept per series: 8 KiB. 512 covers a 5-minute window of a 1 Hz sensor with
/// room to spare; faster sensors get the aggregate of their newest 512 events.
pub const WINDOW_MAX_SAMPLES: usize = 512;

/// What a window rule computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Arithmetic mean.
    Mean,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Number of events.
    Count,
    /// Population standard deviation.
    Stddev,
}

impl Aggregate {
    /// The name in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Mean => "mean",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Count => "count",
            Aggregate::Stddev => "stddev",
        }
    }

    /// The aggregate of `values` (not empty). Each aggregate scans only for what it needs:
    /// `count` is the length, `mean` one sum, `min`/`max` one comparison pass (the scan is the
    /// cost of this rule, so no work is done for an aggregate nobody asked for).
    fn of(self, values: impl ExactSizeIterator<Item = f64> + Clone) -> f64 {
        let n = values.len() as f64;
        let mean = |values: &mut dyn Iterator<Item = f64>| values.sum::<f64>() / n;
        match self {
            Aggregate::Count => n,
            Aggregate::Mean => mean(&mut values.clone()),
            Aggregate::Min => values.fold(f64::INFINITY, |m, v| if v < m { v } else { m }),
            Aggregate::Max => values.fold(f64::NEG_INFINITY, |m, v| if v > m { v } else { m }),
            Aggregate::Stddev => {
                let mean = mean(&mut values.clone());
                let squares: f64 = values.map(|v| (v - mean) * (v - mean)).sum();
                (squares / n).sqrt()
            }
        }
    }
}

rule_config! {
    /// `kind = "window"`: raise when an aggregate over a sliding window passes a level.
    pub struct WindowRuleConfig {
        /// Length of the sliding window, e.g. `"5m"`.
        #[serde(with = "humantime_serde")]
        pub window: Duration,
        /// `mean`, `min`, `max`, `count` or `stddev`.
        pub aggregate: Aggregate,
        /// Raise when the aggregate is above this level.
        pub above: Option<f64>,
        /// Raise when the aggregate is below this level.
        pub below: Option<f64>,
        /// Clear level (hysteresis), as for a threshold rule. Default: the raise level.
        pub clear: Option<f64>,
        /// How long the condition must hold before the alert is raised. Default 0 s.
        #[serde(default, rename = "for", with = "humantime_serde")]
        pub for_duration: Duration,
    }
}

/// A compiled window rule.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRule {
    window_ms: i64,
    aggregate: Aggregate,
    level: Level,
}

/// Per-series state: the samples of the window and the level's pending run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// `(ts_ms, value)` in time order, within the window of the newest.
    samples: VecDeque<(i64, f64)>,
    level: LevelState,
}

impl WindowRule {
    pub(super) fn new(c: &WindowRuleConfig) -> WindowRule {
        WindowRule {
            window_ms: millis(c.window).max(1),
            aggregate: c.aggregate,
            level: Level::from_settings(c.above, c.below, c.clear, c.for_duration),
        }
    }

    /// The default message, naming the aggregate and the window.
    pub(super) fn default_message(c: &WindowRuleConfig) -> String {
        format!(
            "{{rule}}: {} of {{series}} over {} = {{value}} ({{state}}, threshold {{threshold}})",
            c.aggregate.as_str(),
            humantime::format_duration(c.window)
        )
    }

    /// Inserts the sample and drops what left the window; false if it is too old to count.
    fn insert(&self, state: &mut WindowState, ts_ms: i64, value: f64) -> bool {
        let newest = state.samples.back().map_or(ts_ms, |&(t, _)| t.max(ts_ms));
        let start = newest.saturating_sub(self.window_ms);
        if ts_ms <= start {
            return false;
        }
        // Ties keep arrival order: a sample goes after every sample with the same time.
        let at = state.samples.partition_point(|&(t, _)| t <= ts_ms);
        state.samples.insert(at, (ts_ms, value));
        while state.samples.front().is_some_and(|&(t, _)| t <= start) {
            state.samples.pop_front();
        }
        while state.samples.len() > WINDOW_MAX_SAMPLES {
            state.samples.pop_front();
        }
        true
    }

    /// The aggregate over the current window (for tests and status).
    pub fn aggregate(&self, state: &WindowState) -> Option<f64> {
        (!state.samples.is_empty()).then(|| self.aggregate.of(state.samples.iter().map(|s| s.1)))
    }

    pub(super) fn on_event(
        &self,
        state: &mut WindowState,
        active: bool,
        ts_ms: i64,
        value: f64,
    ) -> Option<Transition> {
        if !self.insert(state, ts_ms, value) {
            return None;
        }
        let x = self.aggregate(state)?;
        let newest = state.samples.back().map_or(ts_ms, |s| s.0);
        self.level.step(&mut state.level, active, newest, x)
    }
}

pub(super) fn validate(c: &WindowRuleConfig) -> Vec<(String, String)> {
    let mut problems = check_levels(c.above, c.below, c.clear);
    if c.window.is_zero() {
        problems.push(("window".into(), "must be a duration above 0, e.g. \"5m\"".into()));
    }
    problems
}

#[cfg(test)]
mod tests {
    use sensors::record::AlertState;

    use super::super::testing::{feed, rule, rules, states};
    use super::super::{Machine, Rule};
    use super::*;

    fn window_rule(aggregate: &str) -> String {
        format!(
            "kind = \"window\"\nname = \"w\"\nseries = \"#\"\nwindow = \"10s\"\n\
             aggregate = \"{aggregate}\"\nabove = 1000.0"
        )
    }

    /// The aggregate after feeding `points`.
    fn aggregate_after(aggregate: &str, points: &[(i64, f64)]) -> f64 {
        let text = window_rule(aggregate);
        let mut rules = rules(&[&text]);
        feed(&mut rules, "a/b", points);
        let super::super::RuleConfig::Window(config) = rule(&text) else { panic!() };
        let state = rules.state().get("w", "a/b").unwrap();
        let Machine::Window(state) = state.machine() else { panic!() };
        WindowRule::new(&config).aggregate(state).unwrap()
    }

    #[test]
    fn aggregates_are_exact_over_the_sliding_window() {
        // 1 and 100 fall out of the window (10 s] of the newest, 12 s.
        let points =
            [(0, 100.0), (2_000, 1.0), (3_000, 2.0), (5_000, 4.0), (8_000, 4.0), (12_000, 5.0)];
        assert_eq!(aggregate_after("count", &points), 4.0);
        assert_eq!(aggregate_after("mean", &points), 3.75);
        assert_eq!(aggregate_after("min", &points), 2.0);
        assert_eq!(aggregate_after("max", &points), 5.0);
        // deviations -1.75, 0.25, 0.25, 1.25: squares sum 4.75, / 4.
        assert_eq!(aggregate_after("stddev", &points), (4.75f64 / 4.0).sqrt());
    }

    #[test]
    fn late_samples_inside_the_window_count_and_older_ones_do_not() {
        let points = [(10_000, 1.0), (20_000, 3.0), (15_000, 5.0), (9_000, 100.0)];
        assert_eq!(aggregate_after("mean", &points), 4.0, "10 s and 9 s are out");
        assert_eq!(aggregate_after("count", &points), 2.0);
    }

    #[test]
    fn the_mean_raises_and_clears_with_hysteresis() {
        let mut rules = rules(&[r##"
            kind = "window"
            name = "shaky"
            series = "+/vibration"
            window = "5m"
            aggregate = "mean"
            above = 7.0
            clear = 6.0
        "##]);
        let out = feed(
            &mut rules,
            "pump-1/vibration",
            &[
                (0, 6.0),
                (60_000, 8.0),
                (120_000, 8.0),
                (180_000, 5.0),
                (240_000, 5.0),
                (300_000, 5.0),
            ],
        );
        // means: 6, 7, 7.333 (raised), 6.75, 6.4, 6.2 (one-minute steps, nothing drops out
        // until 300 s: the window is (0, 300 s]) -> 6.2 is still above clear.
        assert_eq!(states(&out), vec![(AlertState::Raised, 120_000)]);
        assert_eq!(
            out[0].message,
            "shaky: mean of pump-1/vibration over 5m = 7.333 (raised, threshold 7)"
        );
        let out = feed(&mut rules, "pump-1/vibration", &[(360_000, 5.0)]);
        assert_eq!(states(&out), vec![(AlertState::Cleared, 360_000)], "mean 5.6");
    }

    #[test]
    fn the_ring_is_capped() {
        let text = window_rule("count");
        let mut rules = rules(&[&text]);
        let points: Vec<(i64, f64)> = (0..2_000).map(|i| (i, 1.0)).collect();
        feed(&mut rules, "a/b", &points);
        let state = rules.state().get("w", "a/b").unwrap();
        let Machine::Window(state) = state.machine() else { panic!() };
        assert_eq!(state.samples.len(), WINDOW_MAX_SAMPLES);
        assert!(Rule::new(&rule(&text)).is_ok());
    }
}
