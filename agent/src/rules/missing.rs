//! `kind = "missing_data"`: no event from a series for `timeout`, fired by a timer.
//!
//! # Clock and deadlines
//!
//! Silence is measured on the **gateway clock**, not in event time: a device whose clock is
//! wrong still reports on time. An event sets `last_seen` to its receive time; the deadline
//! is `last_seen + timeout` and lives in the snapshotted state, so it survives a restart.
//! The rule set's `on_tick(now)` — called by the processor for journal ticks and with its
//! clock after every event — raises once `now >= deadline`, even if no event ever arrives
//! again. The next event of the series clears.
//!
//! ```text
//!   event ● last_seen          deadline = last_seen + timeout        ● event
//!   ──────┴──────────────────────────┴─────── tick ─── tick ─────────┴──────▶ gateway time
//!                                    Raised (ts = deadline)          Cleared (ts = receive)
//! ```
//!
//! The alert's value is the silence in seconds (at detection for Raised, in total for
//! Cleared) and its threshold the timeout in seconds. A series is tracked from its first
//! event on, for as long as the rule exists: a device that disappears keeps its alert up.
//!
//! # Clock steps
//!
//! The timers run on the processor's clock, the high-water mark of gateway time, which never
//! moves back (see [`crate::summary`]). Three policies keep a stepping gateway clock from
//! turning into alerts (DESIGN: "clock jumps must not create mass alerts"):
//!
//! - **An event is heard of at `max(receive time, clock)`**, not at its receive time alone.
//!   After the gateway clock steps back (or a single tick stamped a year ahead), receive times
//!   stay behind the clock until real time catches up; measured from them, every series would
//!   be overdue again at the next tick — a raise and a clear on every reading (the storm of
//!   issue 7).
//! - **A deadline passed by more than [`CLOCK_STEP_MS`] when first seen is not raised**: the
//!   silence restarts at that time, so a series that stays silent raises `timeout` later. The
//!   clock moves in ticks of `journal.tick_interval` (1 s by default), so a deadline that is
//!   watched is seen within one tick; one passed by minutes in a single move was skipped by a
//!   step of the clock (NTP after a boot in 1970, a wrong `date -s`) or by an agent that was
//!   not running, and says nothing about the series. Without this, every series raises at
//!   once after each such step.
//! - **A deadline beyond `i64` never falls due** (a clock at the end of time).
//!
//! The cost: a device that really fell silent during a step (or while the agent was down) is
//! reported `timeout` after it, not at once; and while the clock holds after a step back,
//! silence is not measured at all until real time catches up with it.

use std::time::Duration;

use sensors::record::AlertState;
use serde::{Deserialize, Serialize};

use super::{Transition, millis};

/// How far past its deadline a silence may be first seen and still be reported: ten minutes,
/// 600 ticks of the default `journal.tick_interval`. A larger gap is a step of the clock (see
/// the module docs) and restarts the silence instead.
pub const CLOCK_STEP_MS: i64 = 10 * 60 * 1000;

rule_config! {
    /// `kind = "missing_data"`: raise when a series sends nothing for `timeout`.
    pub struct MissingRuleConfig {
        /// How long a series may be silent.
        #[serde(with = "humantime_serde")]
        pub timeout: Duration,
    }
}

/// The message template of a missing-data rule that sets none.
pub const DEFAULT_MESSAGE: &str =
    "{rule}: no data from {series} for {value} s ({state}, timeout {threshold} s)";

/// A compiled missing-data rule.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingRule {
    timeout_ms: i64,
}

/// Per-series state: when the series was last heard of (gateway time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MissingState {
    /// When the series was last heard of (the largest `max(receive time, clock)` of its
    /// events), or when a clock step restarted its silence; `None` before the first event.
    last_seen_ms: Option<i64>,
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

impl MissingRule {
    pub(super) fn new(c: &MissingRuleConfig) -> MissingRule {
        MissingRule { timeout_ms: millis(c.timeout) }
    }

    /// An event of the series, heard of at `heard_ms`: its receive time, or the clock if that
    /// is ahead (see the module docs).
    pub(super) fn on_event(
        &self,
        state: &mut MissingState,
        active: bool,
        heard_ms: i64,
    ) -> Option<Transition> {
        let last = state.last_seen_ms.unwrap_or(heard_ms);
        state.last_seen_ms = Some(last.max(heard_ms));
        active.then(|| Transition {
            state: AlertState::Cleared,
            ts_ms: heard_ms,
            value: seconds(heard_ms.saturating_sub(last)),
            threshold: seconds(self.timeout_ms),
        })
    }

    /// When the alert is due, if it is not up yet (never, past the end of `i64`).
    pub(super) fn deadline(&self, state: &MissingState, active: bool) -> Option<i64> {
        if active {
            return None;
        }
        state.last_seen_ms.and_then(|last| last.checked_add(self.timeout_ms))
    }

    /// Raises once the clock reached the deadline, unless it got there by a step of more than
    /// [`CLOCK_STEP_MS`]: then the silence restarts at `now_ms` (see the module docs).
    pub(super) fn on_tick(
        &self,
        state: &mut MissingState,
        active: bool,
        now_ms: i64,
    ) -> Option<Transition> {
        let deadline = self.deadline(state, active)?;
        let last = state.last_seen_ms?;
        if now_ms.saturating_sub(deadline) > CLOCK_STEP_MS {
            state.last_seen_ms = Some(now_ms);
            return None;
        }
        (now_ms >= deadline).then(|| Transition {
            state: AlertState::Raised,
            ts_ms: deadline,
            value: seconds(now_ms.saturating_sub(last)),
            threshold: seconds(self.timeout_ms),
        })
    }
}

pub(super) fn validate(c: &MissingRuleConfig) -> Vec<(String, String)> {
    if c.timeout.is_zero() {
        return vec![(
            "timeout".into(),
            "must be a duration above 0: how long a series may be silent, e.g. \"2m\"".into(),
        )];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use sensors::record::AlertState;

    use super::super::testing::{event, feed, restart, rules, states};
    use super::CLOCK_STEP_MS;

    const SILENT: &str = r##"
        kind = "missing_data"
        name = "silent"
        series = "+/temperature"
        timeout = "30s"
    "##;

    #[test]
    fn fires_from_ticks_alone_once_and_clears_on_the_next_event() {
        let mut rules = rules(&[SILENT]);
        feed(&mut rules, "pump-1/temperature", &[(0, 20.0), (10_000, 20.0)]);
        let mut out = Vec::new();
        rules.on_tick(39_999, &mut out);
        assert!(out.is_empty(), "not yet: {out:?}");
        for now in [40_000, 41_000, 100_000] {
            rules.on_tick(now, &mut out);
        }
        assert_eq!(states(&out), vec![(AlertState::Raised, 40_000)]);
        assert_eq!((out[0].value, out[0].threshold), (30.0, 30.0));
        assert_eq!(
            out[0].message,
            "silent: no data from pump-1/temperature for 30 s (raised, timeout 30 s)"
        );
        let back = feed(&mut rules, "pump-1/temperature", &[(130_000, 21.0)]);
        assert_eq!(states(&back), vec![(AlertState::Cleared, 130_000)]);
        assert_eq!(back[0].value, 120.0, "silent for 120 s in all");
    }

    #[test]
    fn silence_is_measured_on_the_receive_clock() {
        let mut rules = rules(&[SILENT]);
        let mut stale = event("pump-1/temperature", 0, 20.0);
        stale.received_ms = 50_000; // device clock far behind the gateway
        let mut out = Vec::new();
        rules.on_event(&stale, &mut out);
        rules.on_tick(79_999, &mut out);
        assert!(out.is_empty(), "{out:?}");
        rules.on_tick(80_000, &mut out);
        assert_eq!(states(&out), vec![(AlertState::Raised, 80_000)]);
    }

    #[test]
    fn the_deadline_survives_a_snapshot_and_restart() {
        let mut rules = rules(&[SILENT]);
        feed(&mut rules, "pump-1/temperature", &[(0, 20.0)]);
        feed(&mut rules, "pump-2/temperature", &[(20_000, 20.0)]);
        let mut restarted = restart(&rules, &[SILENT]);
        let mut out = Vec::new();
        restarted.on_tick(35_000, &mut out);
        assert_eq!(
            out.iter().map(|a| (a.series.as_str(), a.ts_ms)).collect::<Vec<_>>(),
            vec![("pump-1/temperature", 30_000)]
        );
        // An active alert survives too: it is cleared, not raised again.
        let mut again = restart(&restarted, &[SILENT]);
        let mut out = Vec::new();
        again.on_tick(60_000, &mut out);
        again.on_event(&event("pump-1/temperature", 61_000, 20.0), &mut out);
        assert_eq!(
            out.iter().map(|a| (a.series.as_str(), a.state)).collect::<Vec<_>>(),
            vec![
                ("pump-2/temperature", AlertState::Raised),
                ("pump-1/temperature", AlertState::Cleared)
            ]
        );
    }

    #[test]
    fn a_clock_step_past_the_deadline_restarts_the_silence_instead_of_raising() {
        let mut rules = rules(&[SILENT]);
        feed(&mut rules, "pump-1/temperature", &[(0, 20.0)]);
        feed(&mut rules, "pump-2/temperature", &[(0, 20.0)]);
        let mut out = Vec::new();
        // Deadline 30 s, first seen 10 min later: still a watched silence.
        let mut slow = rules.clone();
        slow.on_tick(30_000 + CLOCK_STEP_MS, &mut out);
        assert_eq!(states(&out), vec![(AlertState::Raised, 30_000); 2]);
        // A year later in one step: no alert; the silence restarts at the step.
        out.clear();
        let step = 365 * 24 * 3_600_000;
        rules.on_tick(step, &mut out);
        assert!(out.is_empty(), "{out:?}");
        feed(&mut rules, "pump-1/temperature", &[(step + 5_000, 20.0)]);
        rules.on_tick(step + 30_000, &mut out);
        assert_eq!(
            out.iter().map(|a| (a.series.as_str(), a.ts_ms)).collect::<Vec<_>>(),
            vec![("pump-2/temperature", step + 30_000)],
            "the series still silent is reported a timeout after the step"
        );
    }

    #[test]
    fn readings_received_behind_the_clock_do_not_storm() {
        let mut rules = rules(&[SILENT]);
        let mut out = Vec::new();
        rules.on_tick(0, &mut out);
        feed(&mut rules, "pump-1/temperature", &[(0, 20.0)]);
        // The clock is 20 s ahead of the receive times from here on (a gateway clock that
        // stepped back): readings every 5 s are not silence.
        for t in (5_000..300_000).step_by(5_000) {
            rules.on_tick(t + 20_000, &mut out);
            feed(&mut rules, "pump-1/temperature", &[(t, 20.0)]);
        }
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_clock_at_the_end_of_time_raises_nothing_more() {
        let mut rules = rules(&[SILENT]);
        let mut out = Vec::new();
        feed(&mut rules, "pump-1/temperature", &[(0, 20.0)]);
        for _ in 0..3 {
            rules.on_tick(i64::MAX, &mut out);
            feed(&mut rules, "pump-1/temperature", &[(1_000, 20.0)]);
        }
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn min_interval_suppresses_a_flapping_series_in_pairs() {
        let mut rules = rules(&[&format!("{SILENT}\nmin_interval = \"5m\"")]);
        let mut out = Vec::new();
        for (ts, event_too) in
            [(0, true), (31_000, false), (32_000, true), (63_000, false), (64_000, true)]
        {
            if event_too {
                rules.on_event(&event("pump-1/temperature", ts, 1.0), &mut out);
            }
            rules.on_tick(ts, &mut out);
        }
        assert_eq!(states(&out), vec![(AlertState::Raised, 30_000), (AlertState::Cleared, 32_000)]);
    }
}
