//! `kind = "all_of"` / `kind = "any_of"`: combine other rules over the series of **one
//! device**, e.g. bearing temperature high AND vibration high on the same pump.
//!
//! # Method
//!
//! The rule listens to the *conditions* of the rules it names (their raise and clear as
//! they happen, before `min_interval` suppression). A condition belongs to the device named
//! by the `device` label of the rule that raised it (by default the first segment of the
//! series). Per device and per named rule the state keeps the series on which that rule is
//! active now and the last time it was active:
//!
//! ```text
//!   member "on" at t  ⇔  active on a series of the device now
//!                        or active until l with t - l < within
//!   all_of holds      ⇔  every named rule is on     (value: how many are on)
//!   any_of holds      ⇔  at least one is on         (threshold: how many are needed)
//! ```
//!
//! The combined alert is raised when the condition starts to hold and cleared when it stops:
//! at a member's clear (with `within = 0`), or by the timer when a member's `within` runs
//! out. Its series is the device. `t` is the time of the transition that changed a member
//! (event time) or of the tick (gateway time).
//!
//! # State
//!
//! `device → member rule → { active series, last active }`, in `BTreeMap`s. A member that
//! is off and past its `within` is forgotten at its deadline; a device with no member left
//! and no alert up is dropped, so memory follows the devices with recent conditions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sensors::record::{AlertState, Severity};
use serde::{Deserialize, Serialize};

use super::{CommonConfig, Transition, millis};

/// `kind = "all_of"` / `kind = "any_of"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CombineRuleConfig {
    /// Unique rule name; part of alert records.
    pub name: String,
    /// The names of the rules to combine (not themselves `all_of`/`any_of`).
    pub rules: Vec<String>,
    /// How long a named rule still counts after it cleared. Default 0 s: only while active.
    #[serde(default, with = "humantime_serde")]
    pub within: Duration,
    /// `info`, `warning` or `critical`. Default `warning`.
    #[serde(default)]
    pub severity: Severity,
    /// Label templates over the device (`{0}`); `device = "{0}"` is always there.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Message template; see the module docs of `rules` for the placeholders.
    pub message: Option<String>,
    /// Shortest time between two raises for the same device. Default 0 s.
    #[serde(default, with = "humantime_serde")]
    pub min_interval: Duration,
}

impl CombineRuleConfig {
    pub(super) fn common(&self) -> CommonConfig<'_> {
        CommonConfig {
            name: &self.name,
            series: None,
            severity: self.severity,
            labels: &self.labels,
            message: self.message.as_deref(),
            min_interval: self.min_interval,
        }
    }
}

/// The message template of a combining rule that sets none.
pub const DEFAULT_MESSAGE: &str = "{rule}: {value} of {threshold} conditions on {device} ({state})";

/// A compiled combining rule.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineRule {
    all: bool,
    members: Vec<String>,
    within_ms: i64,
}

/// One named rule on one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Series of the device on which the named rule is active now.
    active: BTreeSet<String>,
    /// The last time the named rule was active on the device.
    last_active_ms: Option<i64>,
}

/// Per-device state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CombineState {
    members: BTreeMap<String, Member>,
}

impl CombineRule {
    pub(super) fn new(all: bool, c: &CombineRuleConfig) -> CombineRule {
        CombineRule { all, members: c.rules.clone(), within_ms: millis(c.within) }
    }

    /// Whether `rule` is one of the combined rules.
    pub(super) fn names(&self, rule: &str) -> bool {
        self.members.iter().any(|m| m == rule)
    }

    fn is_on(&self, member: &Member, t: i64) -> bool {
        !member.active.is_empty()
            || member.last_active_ms.is_some_and(|l| t.saturating_sub(l) < self.within_ms)
    }

    fn evaluate(&self, state: &CombineState, active: bool, t: i64) -> Option<Transition> {
        let on = self
            .members
            .iter()
            .filter(|name| state.members.get(*name).is_some_and(|m| self.is_on(m, t)))
            .count();
        let needed = if self.all { self.members.len() } else { 1 };
        let holds = on >= needed;
        let state = match (holds, active) {
            (true, false) => AlertState::Raised,
            (false, true) => AlertState::Cleared,
            _ => return None,
        };
        Some(Transition { state, ts_ms: t, value: on as f64, threshold: needed as f64 })
    }

    /// A named rule raised or cleared on `series` of the device at `ts_ms`.
    pub(super) fn on_change(
        &self,
        state: &mut CombineState,
        active: bool,
        rule: &str,
        series: &str,
        raised: bool,
        ts_ms: i64,
    ) -> Option<Transition> {
        let member = state.members.entry(rule.to_string()).or_default();
        if raised {
            member.active.insert(series.to_string());
        } else {
            member.active.remove(series);
        }
        member.last_active_ms = Some(member.last_active_ms.map_or(ts_ms, |l| l.max(ts_ms)));
        self.evaluate(state, active, ts_ms)
    }

    /// The earliest time a member stops counting (nothing to do before it).
    pub(super) fn deadline(&self, state: &CombineState) -> Option<i64> {
        state
            .members
            .values()
            .filter(|m| m.active.is_empty())
            .filter_map(|m| m.last_active_ms.map(|l| l.saturating_add(self.within_ms)))
            .min()
    }

    /// Forgets members whose `within` ran out and re-evaluates at `now_ms`.
    pub(super) fn on_tick(
        &self,
        state: &mut CombineState,
        active: bool,
        now_ms: i64,
    ) -> Option<Transition> {
        let within = self.within_ms;
        state.members.retain(|_, m| {
            !m.active.is_empty()
                || m.last_active_ms.is_some_and(|l| now_ms.saturating_sub(l) < within)
        });
        self.evaluate(state, active, now_ms)
    }

    /// Whether the device holds nothing worth keeping.
    pub(super) fn is_empty(state: &CombineState) -> bool {
        state.members.is_empty()
    }
}

pub(super) fn validate(c: &CombineRuleConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if c.rules.is_empty() {
        problems.push((
            "rules".into(),
            "name at least one rule to combine, e.g. rules = [\"bearing-hot\", \"vibration-high\"]"
                .into(),
        ));
    }
    for (i, name) in c.rules.iter().enumerate() {
        if c.rules[..i].contains(name) {
            problems.push((
                format!("rules[{i}]"),
                format!("`{name}` is named twice; name each rule once"),
            ));
        }
        if *name == c.name {
            problems.push((format!("rules[{i}]"), "a rule cannot combine itself".into()));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use sensors::record::AlertState;

    use super::super::Rules;
    use super::super::testing::{event, restart, rules};

    const HOT: &str = r#"
        kind = "threshold"
        name = "hot"
        series = "+/temperature"
        above = 80.0
        clear = 70.0
    "#;
    const SHAKY: &str = r#"
        kind = "threshold"
        name = "shaky"
        series = "+/vibration"
        above = 7.0
        clear = 6.0
    "#;

    fn both(within: &str) -> String {
        format!(
            "kind = \"all_of\"\nname = \"both\"\nrules = [\"hot\", \"shaky\"]\nwithin = \"{within}\"\nseverity = \"critical\""
        )
    }

    /// Feeds `(series, ts, value)` events and returns only the combined rule's records.
    fn run(rules: &mut Rules, events: &[(&str, i64, f64)]) -> Vec<(String, AlertState, i64)> {
        let mut out = Vec::new();
        for &(series, ts, v) in events {
            rules.on_event(&event(series, ts, v), &mut out);
        }
        out.into_iter()
            .filter(|a| a.rule == "both" || a.rule == "either")
            .map(|a| (a.series, a.state, a.ts_ms))
            .collect()
    }

    #[test]
    fn all_of_raises_when_every_rule_is_active_on_the_same_device() {
        let mut rules = rules(&[HOT, SHAKY, &both("0s")]);
        let got = run(
            &mut rules,
            &[
                ("pump-1/temperature", 1_000, 90.0),
                ("pump-2/vibration", 2_000, 9.0), // another pump: nothing
                ("pump-1/vibration", 3_000, 9.0), // same pump: raised
                ("pump-1/vibration", 4_000, 9.5),
                ("pump-1/temperature", 5_000, 60.0), // hot cleared: combined cleared
            ],
        );
        assert_eq!(
            got,
            vec![
                ("pump-1".to_string(), AlertState::Raised, 3_000),
                ("pump-1".to_string(), AlertState::Cleared, 5_000),
            ]
        );
    }

    #[test]
    fn the_combined_alert_names_the_device_and_counts_the_conditions() {
        let mut rules = rules(&[HOT, SHAKY, &both("0s")]);
        let mut out = Vec::new();
        rules.on_event(&event("pump-1/temperature", 1_000, 90.0), &mut out);
        rules.on_event(&event("pump-1/vibration", 2_000, 9.0), &mut out);
        let alert = out.iter().find(|a| a.rule == "both").unwrap();
        assert_eq!((alert.series.as_str(), alert.value, alert.threshold), ("pump-1", 2.0, 2.0));
        assert_eq!(alert.message, "both: 2 of 2 conditions on pump-1 (raised)");
        assert_eq!(alert.severity, sensors::record::Severity::Critical);
    }

    #[test]
    fn within_lets_a_recent_condition_count_and_the_timer_clears() {
        let mut rules = rules(&[HOT, SHAKY, &both("10s")]);
        let got = run(
            &mut rules,
            &[
                ("pump-1/temperature", 0, 90.0),
                ("pump-1/temperature", 5_000, 60.0), // hot until 5 s
                ("pump-1/vibration", 14_000, 9.0),   // 9 s later: still within, raised
            ],
        );
        assert_eq!(got, vec![("pump-1".to_string(), AlertState::Raised, 14_000)]);
        let mut out = Vec::new();
        rules.on_tick(14_999, &mut out);
        assert!(out.is_empty(), "{out:?}");
        rules.on_tick(15_000, &mut out);
        let got: Vec<_> = out.iter().map(|a| (a.rule.as_str(), a.state, a.ts_ms)).collect();
        assert_eq!(got, vec![("both", AlertState::Cleared, 15_000)], "hot's 10 s ran out");
        // Too late: 10 s or more after hot cleared does not combine.
        let mut late = super::super::testing::rules(&[HOT, SHAKY, &both("10s")]);
        let got = run(
            &mut late,
            &[
                ("pump-1/temperature", 0, 90.0),
                ("pump-1/temperature", 5_000, 60.0),
                ("pump-1/vibration", 15_000, 9.0),
            ],
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn any_of_raises_on_the_first_condition_and_clears_after_the_last() {
        let either = "kind = \"any_of\"\nname = \"either\"\nrules = [\"hot\", \"shaky\"]";
        let mut rules = rules(&[HOT, SHAKY, either]);
        let got = run(
            &mut rules,
            &[
                ("pump-1/temperature", 1_000, 90.0),
                ("pump-1/vibration", 2_000, 9.0),
                ("pump-1/temperature", 3_000, 60.0),
                ("pump-1/vibration", 4_000, 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![
                ("pump-1".to_string(), AlertState::Raised, 1_000),
                ("pump-1".to_string(), AlertState::Cleared, 4_000),
            ]
        );
    }

    #[test]
    fn a_custom_device_label_groups_the_series() {
        let hot = "kind = \"threshold\"\nname = \"hot\"\nseries = \"+/+/temperature\"\nabove = 80.0\nlabels = { device = \"{1}\" }";
        let shaky = "kind = \"threshold\"\nname = \"shaky\"\nseries = \"+/+/vibration\"\nabove = 7.0\nlabels = { device = \"{1}\" }";
        let mut rules = rules(&[hot, shaky, &both("0s")]);
        let got = run(
            &mut rules,
            &[("site-a/pump-1/temperature", 1_000, 90.0), ("site-a/pump-1/vibration", 2_000, 9.0)],
        );
        assert_eq!(got, vec![("pump-1".to_string(), AlertState::Raised, 2_000)]);
    }

    #[test]
    fn combined_state_survives_a_restart() {
        let configs = [HOT, SHAKY, &both("10s")];
        let mut rules = rules(&configs);
        run(&mut rules, &[("pump-1/temperature", 0, 90.0), ("pump-1/temperature", 5_000, 60.0)]);
        let mut restarted = restart(&rules, &configs);
        let got = run(&mut restarted, &[("pump-1/vibration", 14_000, 9.0)]);
        assert_eq!(got, vec![("pump-1".to_string(), AlertState::Raised, 14_000)]);
        let mut out = Vec::new();
        restart(&restarted, &configs).on_tick(15_000, &mut out);
        assert_eq!(out.iter().map(|a| a.state).collect::<Vec<_>>(), vec![AlertState::Cleared]);
    }

    #[test]
    fn devices_without_recent_conditions_are_forgotten() {
        let mut rules = rules(&[HOT, SHAKY, &both("1s")]);
        run(&mut rules, &[("pump-1/temperature", 0, 90.0), ("pump-1/temperature", 1_000, 60.0)]);
        assert!(rules.state().get("both", "pump-1").is_some());
        rules.on_tick(2_000, &mut Vec::new());
        assert!(rules.state().get("both", "pump-1").is_none(), "{:?}", rules.state());
    }
}
