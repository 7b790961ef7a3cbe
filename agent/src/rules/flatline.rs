//! `kind = "flatline"`: a stuck sensor, whose value moves less than `epsilon` for `for`.
//!
//! # Method
//!
//! O(1) per series: the current *run* is the stretch of events since `since` whose values
//! all lie within `[min, max]` with `max - min < epsilon`. An event that keeps the spread
//! under `epsilon` extends the run; one that does not starts a new run at itself (and
//! clears an active alert: the value changed). The alert is raised on the first event at
//! least `for` after the start of its run.
//!
//! ```text
//!   value ─────●──●─●──●───●──●──●───●──────╮●
//!              ◀── spread < epsilon ──────▶  │ moved: run restarts, Cleared
//!              since           since + for ▲ Raised
//! ```
//!
//! A run restarts at the value that broke it, not at the longest flat suffix before it, so
//! a slow drift that is flat only in pieces is raised a little later than the exact
//! "trailing `for` within epsilon" definition would: the price of constant memory.
//! Silence is not flatness: with no events nothing is raised (use `missing_data`).

use std::time::Duration;

use sensors::record::AlertState;
use serde::{Deserialize, Serialize};

use super::{Transition, millis};

rule_config! {
    /// `kind = "flatline"`: raise when the value moves less than `epsilon` for `for`.
    pub struct FlatlineRuleConfig {
        /// The spread (max - min) below which the value counts as not moving.
        pub epsilon: f64,
        /// How long the value must stay flat before the alert is raised.
        #[serde(rename = "for", with = "humantime_serde")]
        pub for_duration: Duration,
    }
}

/// The message template of a flatline rule that sets none.
pub const DEFAULT_MESSAGE: &str =
    "{rule}: {series} stuck at {value} (moved less than {threshold}; {state})";

/// A compiled flatline rule.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatlineRule {
    epsilon: f64,
    for_ms: i64,
}

/// Per-series state: the current flat run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlatlineState {
    /// Event time of the first event of the run; `None` before the first event.
    since: Option<i64>,
    min: f64,
    max: f64,
}

impl FlatlineRule {
    pub(super) fn new(c: &FlatlineRuleConfig) -> FlatlineRule {
        FlatlineRule { epsilon: c.epsilon, for_ms: millis(c.for_duration) }
    }

    pub(super) fn on_event(
        &self,
        state: &mut FlatlineState,
        active: bool,
        ts_ms: i64,
        value: f64,
    ) -> Option<Transition> {
        let (min, max) = (state.min.min(value), state.max.max(value));
        match state.since {
            Some(since) if max - min < self.epsilon => {
                (state.min, state.max) = (min, max);
                let held = ts_ms.saturating_sub(since) >= self.for_ms;
                (!active && held).then_some(Transition {
                    state: AlertState::Raised,
                    ts_ms,
                    value,
                    threshold: self.epsilon,
                })
            }
            _ => {
                *state = FlatlineState { since: Some(ts_ms), min: value, max: value };
                active.then_some(Transition {
                    state: AlertState::Cleared,
                    ts_ms,
                    value,
                    threshold: self.epsilon,
                })
            }
        }
    }
}

pub(super) fn validate(c: &FlatlineRuleConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if !(c.epsilon.is_finite() && c.epsilon > 0.0) {
        problems.push((
            "epsilon".into(),
            format!(
                "must be a positive number: the smallest change that counts as movement, e.g. \
                 0.01; got {}",
                c.epsilon
            ),
        ));
    }
    if c.for_duration.is_zero() {
        problems.push((
            "for".into(),
            "must be a duration above 0: how long the value must stay flat, e.g. \"10m\"".into(),
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use sensors::record::AlertState;

    use super::super::testing::{feed, rules, states};

    const STUCK: &str = r##"
        kind = "flatline"
        name = "stuck"
        series = "#"
        epsilon = 0.5
        for = "10s"
    "##;

    #[test]
    fn raises_once_after_for_of_flatness_and_clears_on_change() {
        let mut rules = rules(&[STUCK]);
        let out = feed(
            &mut rules,
            "pump-1/pressure",
            &[
                (0, 3.0),
                (5_000, 3.2),
                (9_999, 3.1),
                (10_000, 3.3), // spread 0.3 < 0.5 for 10 s: raised
                (15_000, 3.0),
                (20_000, 3.4), // spread 0.4: still flat, nothing more
                (21_000, 3.6), // spread 0.6: moved, cleared
            ],
        );
        assert_eq!(states(&out), vec![(AlertState::Raised, 10_000), (AlertState::Cleared, 21_000)]);
        assert_eq!((out[0].value, out[0].threshold), (3.3, 0.5));
    }

    #[test]
    fn a_move_restarts_the_run() {
        let mut rules = rules(&[STUCK]);
        let out = feed(
            &mut rules,
            "pump-1/pressure",
            &[(0, 1.0), (8_000, 1.0), (9_000, 5.0), (18_999, 5.1)],
        );
        assert!(out.is_empty(), "the run restarted at 9 s: {out:?}");
        let out = feed(&mut rules, "pump-1/pressure", &[(19_000, 5.1)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 19_000)]);
    }

    #[test]
    fn without_events_nothing_is_raised() {
        let mut rules = rules(&[STUCK]);
        feed(&mut rules, "pump-1/pressure", &[(0, 1.0)]);
        let mut out = Vec::new();
        rules.on_tick(1_000_000, &mut out);
        assert!(out.is_empty(), "silence is missing data, not a flatline: {out:?}");
    }
}
