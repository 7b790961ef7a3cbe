//! `kind = "threshold"`: a value above (or below) a level, with hysteresis and a minimum
//! duration; and [`Level`], the same comparison reused by the kinds that compare a derived
//! quantity (a rate, a window aggregate, an anomaly score) with a level.
//!
//! # Lifecycle
//!
//! ```text
//!            breach                      held for `for`
//!   idle ───────────────▶ pending(since) ───────────────▶ active ──┐
//!    ▲  ◀─────────────────  │ no breach                            │ value passes `clear`
//!    │                                                             │ (Cleared)
//!    └─────────────────────────────────────────────────────────────┘
//!                  (Raised on entering active)
//! ```
//!
//! - *Breach* is `x > above` (or `x < below`).
//! - The condition must hold **continuously by event time**: any non-breaching input while
//!   pending resets to idle. The raise happens on the first breaching input whose timestamp
//!   is at least `for` after the first breaching input of the run; there is no timer, so the
//!   output depends on event time alone.
//! - While active nothing happens until `x` passes the clear level (`x < clear` for `above`,
//!   `x > clear` for `below`); values in the hysteresis band keep the alert active.
//!
//! State per series: [`LevelState`], only `pending_since`; whether the alert is active is
//! kept by the rule set's episode (see [`super`]). An idle threshold series holds no state.

use std::time::Duration;

use sensors::record::AlertState;
use serde::{Deserialize, Serialize};

use super::{Transition, millis};

rule_config! {
    /// `kind = "threshold"`: raise when a value stays above (or below) a level, clear past a
    /// separate level.
    pub struct ThresholdRuleConfig {
        /// Raise when the value is above this level.
        pub above: Option<f64>,
        /// Raise when the value is below this level.
        pub below: Option<f64>,
        /// Clear level (hysteresis): with `above`, clear when the value falls below `clear`
        /// (must be <= above); with `below`, clear when it rises above `clear`. Default: the
        /// raise level.
        pub clear: Option<f64>,
        /// How long the condition must hold before the alert is raised. Default 0 s.
        #[serde(default, rename = "for", with = "humantime_serde")]
        pub for_duration: Duration,
    }
}

/// The message template of a threshold rule that sets none.
pub const DEFAULT_MESSAGE: &str = "{rule}: {series} = {value} ({state}, threshold {threshold})";

/// Which side of the raise level breaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Breach when the input is higher than the level.
    Above,
    /// Breach when the input is lower than the level.
    Below,
}

/// A level with hysteresis and a minimum duration (configuration only).
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    direction: Direction,
    raise: f64,
    clear: f64,
    for_ms: i64,
}

/// Per-series state of a [`Level`]. Idle when `pending_since` is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelState {
    /// Event time of the first breaching input of the current run, while not yet raised.
    pub pending_since: Option<i64>,
}

impl Level {
    /// A level; `clear` defaults to `raise`.
    pub fn new(
        direction: Direction,
        raise: f64,
        clear: Option<f64>,
        for_duration: Duration,
    ) -> Level {
        Level { direction, raise, clear: clear.unwrap_or(raise), for_ms: millis(for_duration) }
    }

    /// The level of `above`/`below` settings that [`check_levels`] accepted.
    pub fn from_settings(
        above: Option<f64>,
        below: Option<f64>,
        clear: Option<f64>,
        for_duration: Duration,
    ) -> Level {
        match (above, below) {
            (None, Some(level)) => Level::new(Direction::Below, level, clear, for_duration),
            // Validation refused "neither" and "both"; `above` wins if it was bypassed.
            (above, _) => {
                Level::new(Direction::Above, above.unwrap_or(f64::INFINITY), clear, for_duration)
            }
        }
    }

    fn breaches(&self, x: f64) -> bool {
        match self.direction {
            Direction::Above => x > self.raise,
            Direction::Below => x < self.raise,
        }
    }

    fn clears(&self, x: f64) -> bool {
        match self.direction {
            Direction::Above => x < self.clear,
            Direction::Below => x > self.clear,
        }
    }

    /// Advances `state` with input `x` at `ts_ms`; `active` tells whether the alert is up.
    pub fn step(
        &self,
        state: &mut LevelState,
        active: bool,
        ts_ms: i64,
        x: f64,
    ) -> Option<Transition> {
        if active {
            state.pending_since = None;
            return self.clears(x).then_some(Transition {
                state: AlertState::Cleared,
                ts_ms,
                value: x,
                threshold: self.clear,
            });
        }
        if !self.breaches(x) {
            state.pending_since = None;
            return None;
        }
        let since = *state.pending_since.get_or_insert(ts_ms);
        if ts_ms.saturating_sub(since) >= self.for_ms {
            state.pending_since = None;
            return Some(Transition {
                state: AlertState::Raised,
                ts_ms,
                value: x,
                threshold: self.raise,
            });
        }
        None
    }
}

/// Problems of `above`/`below`/`clear`, shared by every kind that compares with a level.
pub fn check_levels(
    above: Option<f64>,
    below: Option<f64>,
    clear: Option<f64>,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| problems.push((key.to_string(), message));
    for (key, level) in [("above", above), ("below", below), ("clear", clear)] {
        if let Some(v) = level
            && !v.is_finite()
        {
            problem(key, format!("must be a finite number, got {v}"));
        }
    }
    match (above, below) {
        (Some(_), Some(_)) => problem(
            "below",
            "set either `above` or `below`, not both; write two rules for a band".into(),
        ),
        (None, None) => problem(
            "above",
            "set `above` (raise when the value is higher) or `below` (raise when lower)".into(),
        ),
        (Some(above), None) => {
            if let Some(clear) = clear
                && clear > above
            {
                problem(
                    "clear",
                    format!(
                        "with `above = {above}` the alert clears when the value falls below \
                         `clear`, so `clear` must be <= {above}; got {clear}"
                    ),
                );
            }
        }
        (None, Some(below)) => {
            if let Some(clear) = clear
                && clear < below
            {
                problem(
                    "clear",
                    format!(
                        "with `below = {below}` the alert clears when the value rises above \
                         `clear`, so `clear` must be >= {below}; got {clear}"
                    ),
                );
            }
        }
    }
    problems
}

/// Kind-specific problems of a threshold rule.
pub(super) fn validate(c: &ThresholdRuleConfig) -> Vec<(String, String)> {
    check_levels(c.above, c.below, c.clear)
}

/// The compiled level of a validated threshold rule.
pub(super) fn compile(c: &ThresholdRuleConfig) -> Level {
    Level::from_settings(c.above, c.below, c.clear, c.for_duration)
}
