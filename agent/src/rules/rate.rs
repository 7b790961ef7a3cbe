//! `kind = "rate_of_change"`: a value that changes faster than `max_rate` per `per`.
//!
//! # Method
//!
//! The rate at an event is the change from the **oldest sample inside the trailing `span`**
//! to the event, scaled to the unit `per`:
//!
//! ```text
//!   rate = (value - oldest.value) / (ts - oldest.ts) * per
//!
//!   span ◀──────────────────────────────▶
//!   ──●─────●─────●─────●─────●─────●────●  events
//!         oldest inside span ▲          ▲ now
//! ```
//!
//! With `direction = "rise"` only increases count, with `"fall"` only decreases (their
//! magnitude is compared), with `"either"` (the default) the absolute rate. The comparison
//! is a [`Level`] above `max_rate` that clears below `clear` (default `max_rate`).
//!
//! # Memory
//!
//! The ring keeps samples at least `span / RATE_SLOTS` apart (events closer to the last kept
//! sample are evaluated but not stored), so it never holds more than `RATE_SLOTS + 1`
//! samples whatever the event rate: 16 bytes each. The price is resolution: the reference
//! sample is at most `span / RATE_SLOTS` younger than the exact start of the span. Samples
//! older than the span are dropped; events older than the newest sample are evaluated
//! against the ring but not stored (the ring stays in time order).

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::threshold::{Direction, Level, LevelState};
use super::{Transition, millis};

/// Most samples per span (plus one): 17 samples of 16 bytes per series.
pub const RATE_SLOTS: i64 = 16;

/// Which changes count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateDirection {
    /// Increases only.
    Rise,
    /// Decreases only.
    Fall,
    /// Both (the absolute rate).
    #[default]
    Either,
}

rule_config! {
    /// `kind = "rate_of_change"`: raise when the value changes by more than `max_rate` per
    /// `per` over the trailing `span`.
    pub struct RateRuleConfig {
        /// Largest allowed change per `per`, e.g. `5.0` (°C per minute with `per = "1m"`).
        pub max_rate: f64,
        /// The unit of time of `max_rate`. Default `1m`.
        #[serde(default = "default_per", with = "humantime_serde")]
        pub per: Duration,
        /// How far back the reference value is taken. Default: `per`.
        #[serde(default, with = "humantime_serde::option")]
        pub span: Option<Duration>,
        /// Clear when the rate falls below this (hysteresis). Default: `max_rate`.
        pub clear: Option<f64>,
        /// `rise`, `fall` or `either`. Default `either`.
        #[serde(default)]
        pub direction: RateDirection,
    }
}

fn default_per() -> Duration {
    Duration::from_secs(60)
}

/// The message template of a rate rule that sets none.
pub const DEFAULT_MESSAGE: &str =
    "{rule}: {series} changes at {value} per unit ({state}, limit {threshold})";

/// A compiled rate rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRule {
    level: Level,
    per_ms: f64,
    span_ms: i64,
    spacing_ms: i64,
    direction: RateDirection,
}

/// Per-series state: the sample ring and the level's pending run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateState {
    /// `(ts_ms, value)` in time order, at least `span / RATE_SLOTS` apart.
    samples: VecDeque<(i64, f64)>,
    level: LevelState,
}

impl RateRule {
    pub(super) fn new(c: &RateRuleConfig) -> RateRule {
        let span_ms = millis(c.span.unwrap_or(c.per)).max(1);
        RateRule {
            level: Level::new(Direction::Above, c.max_rate, c.clear, Duration::ZERO),
            per_ms: millis(c.per) as f64,
            span_ms,
            spacing_ms: span_ms / RATE_SLOTS,
            direction: c.direction,
        }
    }

    /// The rate in units per `per` from the oldest sample inside the span to `(ts, value)`.
    fn rate(&self, state: &mut RateState, ts_ms: i64, value: f64) -> Option<f64> {
        let start = ts_ms.saturating_sub(self.span_ms);
        while state.samples.front().is_some_and(|&(t, _)| t < start) {
            state.samples.pop_front();
        }
        let rate = match state.samples.front() {
            Some(&(t, v)) if ts_ms > t => Some((value - v) / (ts_ms - t) as f64 * self.per_ms),
            _ => None,
        };
        let keep = match state.samples.back() {
            Some(&(t, _)) => ts_ms.saturating_sub(t) >= self.spacing_ms.max(1),
            None => true,
        };
        if keep {
            state.samples.push_back((ts_ms, value));
        }
        rate
    }

    pub(super) fn on_event(
        &self,
        state: &mut RateState,
        active: bool,
        ts_ms: i64,
        value: f64,
    ) -> Option<Transition> {
        let rate = self.rate(state, ts_ms, value)?;
        let compared = match self.direction {
            RateDirection::Rise => rate,
            RateDirection::Fall => -rate,
            RateDirection::Either => rate.abs(),
        };
        let mut transition = self.level.step(&mut state.level, active, ts_ms, compared)?;
        transition.value = rate;
        Some(transition)
    }
}

pub(super) fn validate(c: &RateRuleConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if !(c.max_rate.is_finite() && c.max_rate > 0.0) {
        problems.push((
            "max_rate".into(),
            format!("must be a positive number (a change per `per`), got {}", c.max_rate),
        ));
    }
    if c.per.is_zero() {
        problems.push(("per".into(), "must be a duration above 0, e.g. \"1m\" or \"1s\"".into()));
    }
    if c.span.is_some_and(|s| s.is_zero()) {
        problems.push(("span".into(), "must be a duration above 0, e.g. \"5m\"".into()));
    }
    if let Some(clear) = c.clear
        && !(clear.is_finite() && clear >= 0.0 && clear <= c.max_rate)
    {
        problems.push((
            "clear".into(),
            format!(
                "the alert clears when the rate falls below `clear`, so it must be between 0 \
                 and max_rate = {}; got {clear}",
                c.max_rate
            ),
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use sensors::record::AlertState;

    use super::super::testing::{feed, rules, states};
    use super::*;

    const RATE: &str = r##"
        kind = "rate_of_change"
        name = "heating"
        series = "+/temperature"
        max_rate = 5.0
        per = "1m"
    "##;

    #[test]
    fn the_rate_is_per_unit_against_the_oldest_sample_inside_the_span() {
        let mut rules = rules(&[RATE]);
        let out = feed(
            &mut rules,
            "pump-1/temperature",
            &[
                (0, 20.0),
                (30_000, 22.0),  // 2 in 30 s = 4 per minute
                (60_000, 26.0),  // 6 in 60 s against (0, 20): 6 per minute, raised
                (90_000, 28.0),  // against (30 s, 22): 6 per minute, still up
                (150_000, 28.0), // against (90 s, 28): 0, cleared
            ],
        );
        assert_eq!(
            states(&out),
            vec![(AlertState::Raised, 60_000), (AlertState::Cleared, 150_000)]
        );
        assert_eq!((out[0].value, out[0].threshold), (6.0, 5.0));
        assert_eq!(out[1].value, 0.0);
    }

    #[test]
    fn per_changes_the_unit_and_span_the_reference() {
        // 5 per second over 10 s: 2 s of a 12-per-second climb is enough.
        let mut rules = rules(&[&RATE
            .replace("per = \"1m\"", "per = \"1s\"\nspan = \"10s\"")
            .replace("\"heating\"", "\"fast\"")]);
        let out = feed(&mut rules, "a/temperature", &[(0, 0.0), (1_000, 4.0), (2_000, 24.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 2_000)]);
        assert_eq!(out[0].value, 12.0);
    }

    #[test]
    fn direction_rise_ignores_falls_and_fall_reports_the_signed_rate() {
        let mut rise = rules(&[&format!("{RATE}\ndirection = \"rise\"")]);
        assert!(feed(&mut rise, "a/temperature", &[(0, 50.0), (60_000, 20.0)]).is_empty());
        let mut fall = rules(&[&format!("{RATE}\ndirection = \"fall\"")]);
        let out = feed(&mut fall, "a/temperature", &[(0, 50.0), (60_000, 20.0)]);
        assert_eq!(out[0].value, -30.0);
    }

    #[test]
    fn hysteresis_keeps_the_alert_until_the_rate_is_below_clear() {
        let mut rules = rules(&[&format!("{RATE}\nclear = 2.0\nspan = \"10m\"")]);
        let out = feed(
            &mut rules,
            "a/temperature",
            &[(0, 0.0), (60_000, 10.0), (120_000, 16.0), (180_000, 17.0)],
        );
        // 10/min raised; 16 in 2 min = 8; 17 in 3 min = 5.67: above clear, still up.
        assert_eq!(states(&out), vec![(AlertState::Raised, 60_000)]);
        let out = feed(&mut rules, "a/temperature", &[(600_000, 17.0)]);
        assert_eq!(states(&out), vec![(AlertState::Cleared, 600_000)], "17 in 10 min = 1.7");
    }

    #[test]
    fn the_sample_ring_stays_bounded_whatever_the_event_rate() {
        let mut rules = rules(&[RATE]);
        let points: Vec<(i64, f64)> = (0..10_000).map(|i| (i * 10, 20.0)).collect();
        feed(&mut rules, "a/temperature", &points);
        let state = rules.state().get("heating", "a/temperature").unwrap();
        let super::super::Machine::RateOfChange(ring) = state.machine() else { panic!() };
        assert!(ring.samples.len() as i64 <= RATE_SLOTS + 1, "{}", ring.samples.len());
        let span = ring.samples.back().unwrap().0 - ring.samples.front().unwrap().0;
        assert!((60_000 - 60_000 / RATE_SLOTS..=60_000).contains(&span), "{span}");
    }
}
