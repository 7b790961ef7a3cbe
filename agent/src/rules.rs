//! Alert rules: pure, per-series state machines that turn events into alert transitions.
//!
//! A rule never reads a clock and never does I/O: it sees one [`Event`] at a time, in journal
//! order, and answers with at most one [`Alert`]. The processor owns a [`Rules`] set and is the
//! only caller, which keeps the output a function of (snapshot, journal) — the property that
//! lets a restarted agent replay its journal and produce byte-identical records.
//!
//! # Threshold rule lifecycle
//!
//! Per `(rule, series)` a threshold rule is in one of three states:
//!
//! ```text
//!            breach                      held for `for`
//!   idle ───────────────▶ pending(since) ───────────────▶ active ──┐
//!    ▲  ◀─────────────────  │ no breach                            │ value passes `clear`
//!    │                                                             │ (Cleared record)
//!    └─────────────────────────────────────────────────────────────┘
//!                  (Raised record on entering active)
//! ```
//!
//! - *Breach* is `value > above` (or `value < below`).
//! - The condition must hold **continuously by event time**: any non-breaching event while
//!   pending resets to idle. The raise happens on the first breaching event whose timestamp is
//!   at least `for` after the first breaching event of the run; there is no timer — a rule only
//!   acts on events, so its output depends on event time alone.
//! - While active nothing is emitted (no flood) until the value passes the clear level
//!   (`value < clear` for `above`, `value > clear` for `below`); values between the raise
//!   and clear levels (the hysteresis band) keep the alert active.
//! - Exactly one `Raised` and one `Cleared` record per episode.
//!
//! # State layout and memory
//!
//! The state is [`RulesState`]: `rule name → series → SeriesState`, in `BTreeMap`s so that
//! iteration (and the snapshot's bytes) never depend on hash order. Only non-idle entries are
//! stored — an idle series costs nothing — so memory is bounded by the series that are
//! pending or alerting, not by every series ever seen.
//!
//! The compiled rules are rebuilt from the configuration at every start; only the state is
//! snapshotted. On restore, state of rules that no longer exist is dropped, and state of a
//! rule whose levels changed is kept so an active alert still gets its `Cleared` record.

use std::collections::BTreeMap;

use sensors::record::{Alert, AlertState, Severity};
use serde::{Deserialize, Serialize};

use crate::config::{RuleConfig, ThresholdRuleConfig};
use crate::event::Event;

/// The message template used when a rule sets none.
pub const DEFAULT_MESSAGE: &str = "{rule}: {series} = {value} ({state}, threshold {threshold})";

/// The placeholders a message template may use.
const PLACEHOLDERS: [&str; 5] = ["rule", "series", "value", "threshold", "state"];

/// Errors of rule compilation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A rule parameter is invalid; `name` is the config key to point at.
    #[error("rule `{rule}`: invalid `{name}`: {reason}")]
    InvalidParameter {
        /// The rule's name (may be empty when the name itself is the problem).
        rule: String,
        /// The configuration key.
        name: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// A series pattern: segments split by `/`; `+` matches exactly one segment, `#` (last
/// segment only) matches the rest of the series — zero or more segments, as in MQTT topic
/// filters — and `*` inside a segment matches any run of characters within that segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesPattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matches this exact text.
    Literal(String),
    /// Text with at least one `*`.
    Glob(String),
    /// `+`
    One,
    /// `#`
    Rest,
}

impl SeriesPattern {
    /// Parses a pattern such as `pump-*/temperature` or `site/+/#`.
    pub fn parse(pattern: &str) -> Result<SeriesPattern, String> {
        if pattern.is_empty() {
            return Err("the pattern is empty; write e.g. `pump-*/temperature` or `#`".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "+" => Segment::One,
                "#" if i == last => Segment::Rest,
                "#" => {
                    return Err(format!(
                        "`#` matches the rest of the series and must be the last segment \
                         (in `{pattern}`)"
                    ));
                }
                p if p.contains('+') || p.contains('#') => {
                    return Err(format!(
                        "`+` and `#` must stand alone as a whole segment, found `{p}` in \
                         `{pattern}`; use `*` to match characters within a segment"
                    ));
                }
                p if p.contains('*') => Segment::Glob(p.to_string()),
                p => Segment::Literal(p.to_string()),
            };
            segments.push(segment);
        }
        Ok(SeriesPattern { segments })
    }

    /// Whether `series` matches the pattern.
    pub fn matches(&self, series: &str) -> bool {
        let mut parts = series.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(text) => {
                    if parts.next() != Some(text.as_str()) {
                        return false;
                    }
                }
                Segment::Glob(glob) => match parts.next() {
                    Some(part) if glob_matches(glob, part) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
/// Greedy with backtracking to the last star: linear in practice, no recursion.
fn glob_matches(glob: &str, text: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut gi, mut ti) = (0, 0);
    // Position of the last `*` seen and the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            // Let the star swallow one more character and retry.
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

/// Checks one rule and returns every problem as `(config key, message)`, so that
/// `edgewise check` can point at the offending key. Empty when the rule is valid.
pub fn validate(rule: &RuleConfig) -> Vec<(String, String)> {
    match rule {
        RuleConfig::Threshold(c) => validate_threshold(c),
    }
}

fn validate_threshold(c: &ThresholdRuleConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| problems.push((key.to_string(), message));
    if c.name.trim().is_empty() {
        problem("name", "the rule name must not be empty; it names the rule in alerts".into());
    }
    if let Err(reason) = SeriesPattern::parse(&c.series) {
        problem("series", reason);
    }
    for (key, level) in [("above", c.above), ("below", c.below), ("clear", c.clear)] {
        if let Some(v) = level
            && !v.is_finite()
        {
            problem(key, format!("must be a finite number, got {v}"));
        }
    }
    match (c.above, c.below) {
        (Some(_), Some(_)) => problem(
            "below",
            "set either `above` or `below`, not both; write two rules for a band".into(),
        ),
        (None, None) => problem(
            "above",
            "set `above` (raise when the value is higher) or `below` (raise when lower)".into(),
        ),
        (Some(above), None) => {
            if let Some(clear) = c.clear
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
            if let Some(clear) = c.clear
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
    if let Some(template) = &c.message {
        for name in placeholders(template) {
            if !PLACEHOLDERS.contains(&name) {
                problem(
                    "message",
                    format!(
                        "unknown placeholder `{{{name}}}`; use {{rule}}, {{series}}, {{value}}, \
                         {{threshold}} or {{state}}"
                    ),
                );
            }
        }
    }
    problems
}

/// The `{name}` placeholders of a template, in order.
fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                names.push(&after[..close]);
                rest = &after[close + 1..];
            }
            None => break,
        }
    }
    names
}

/// Replaces the known placeholders of `template` in one pass (so a series containing
/// `{value}` is not substituted twice); unknown ones are kept as written.
fn render(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match lookup(name) {
                    Some(value) => out.push_str(&value),
                    None => {
                        out.push('{');
                        out.push_str(name);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Which side of the raise level breaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Above,
    Below,
}

/// State of one threshold rule for one series. The idle state (`default()`) is never stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesState {
    /// Event time of the first breaching event of the current run, while not yet raised.
    pub pending_since: Option<i64>,
    /// Whether the alert is raised and not yet cleared.
    pub active: bool,
}

impl SeriesState {
    fn is_idle(&self) -> bool {
        self.pending_since.is_none() && !self.active
    }
}

/// A compiled threshold rule (configuration only; state lives in [`RulesState`]).
#[derive(Debug, Clone)]
pub struct ThresholdRule {
    name: String,
    pattern: SeriesPattern,
    direction: Direction,
    raise: f64,
    clear: f64,
    for_ms: i64,
    severity: Severity,
    message: String,
}

impl ThresholdRule {
    /// Compiles a rule, refusing it with the first problem [`validate`] finds.
    pub fn new(c: &ThresholdRuleConfig) -> Result<ThresholdRule, RuleError> {
        if let Some((name, reason)) = validate_threshold(c).into_iter().next() {
            return Err(RuleError::InvalidParameter { rule: c.name.clone(), name, reason });
        }
        let pattern = SeriesPattern::parse(&c.series).map_err(|reason| {
            RuleError::InvalidParameter { rule: c.name.clone(), name: "series".into(), reason }
        })?;
        let (direction, raise) = match (c.above, c.below) {
            (Some(level), None) => (Direction::Above, level),
            (None, Some(level)) => (Direction::Below, level),
            // validate_threshold refused both other cases above.
            _ => {
                return Err(RuleError::InvalidParameter {
                    rule: c.name.clone(),
                    name: "above".into(),
                    reason: "set exactly one of `above` and `below`".into(),
                });
            }
        };
        Ok(ThresholdRule {
            name: c.name.clone(),
            pattern,
            direction,
            raise,
            clear: c.clear.unwrap_or(raise),
            // Saturate: a `for` beyond i64 milliseconds (292 million years) never elapses.
            for_ms: i64::try_from(c.for_duration.as_millis()).unwrap_or(i64::MAX),
            severity: c.severity,
            message: c.message.clone().unwrap_or_else(|| DEFAULT_MESSAGE.to_string()),
        })
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the rule applies to `series`.
    pub fn matches(&self, series: &str) -> bool {
        self.pattern.matches(series)
    }

    fn breaches(&self, value: f64) -> bool {
        match self.direction {
            Direction::Above => value > self.raise,
            Direction::Below => value < self.raise,
        }
    }

    fn clears(&self, value: f64) -> bool {
        match self.direction {
            Direction::Above => value < self.clear,
            Direction::Below => value > self.clear,
        }
    }

    /// Advances `state` with one event of a matching series; returns the transition, if any.
    pub fn on_event(&self, state: &mut SeriesState, event: &Event) -> Option<Alert> {
        if state.active {
            if self.clears(event.value) {
                state.active = false;
                return Some(self.alert(event, AlertState::Cleared, self.clear));
            }
            return None;
        }
        if !self.breaches(event.value) {
            // The condition must hold continuously: any non-breaching value restarts the wait.
            state.pending_since = None;
            return None;
        }
        let since = *state.pending_since.get_or_insert(event.ts_ms);
        // An out-of-order event older than `since` gives a negative span: keep waiting.
        if event.ts_ms.saturating_sub(since) >= self.for_ms {
            state.pending_since = None;
            state.active = true;
            return Some(self.alert(event, AlertState::Raised, self.raise));
        }
        None
    }

    fn alert(&self, event: &Event, state: AlertState, threshold: f64) -> Alert {
        let state_name = match state {
            AlertState::Raised => "raised",
            AlertState::Cleared => "cleared",
        };
        let message = render(&self.message, |name| match name {
            "rule" => Some(self.name.clone()),
            "series" => Some(event.series.clone()),
            "value" => Some(event.value.to_string()),
            "threshold" => Some(threshold.to_string()),
            "state" => Some(state_name.to_string()),
            _ => None,
        });
        Alert {
            rule: self.name.clone(),
            series: event.series.clone(),
            state,
            severity: self.severity,
            ts_ms: event.ts_ms,
            value: event.value,
            threshold,
            message,
        }
    }
}

/// The snapshotted state of a rule set: rule name → series → non-idle state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RulesState {
    rules: BTreeMap<String, BTreeMap<String, SeriesState>>,
}

impl RulesState {
    /// Number of raised, not yet cleared alerts.
    pub fn active_alerts(&self) -> usize {
        self.rules.values().flat_map(|m| m.values()).filter(|s| s.active).count()
    }

    /// The series that hold rule state (pending or active).
    pub fn series(&self) -> impl Iterator<Item = &str> {
        self.rules.values().flat_map(|m| m.keys().map(String::as_str))
    }

    /// The state of `rule` for `series` (idle when absent).
    pub fn get(&self, rule: &str, series: &str) -> SeriesState {
        self.rules.get(rule).and_then(|m| m.get(series)).cloned().unwrap_or_default()
    }
}

/// A compiled rule set with its per-(rule, series) state.
#[derive(Debug, Clone)]
pub struct Rules {
    compiled: Vec<ThresholdRule>,
    state: RulesState,
}

impl Rules {
    /// Compiles the configured rules; rule names must be unique (they key the state).
    pub fn new(configs: &[RuleConfig]) -> Result<Rules, RuleError> {
        Self::restore(configs, RulesState::default())
    }

    /// Compiles the configured rules and adopts `state` from a snapshot, dropping the state
    /// of rules that are no longer configured.
    pub fn restore(configs: &[RuleConfig], mut state: RulesState) -> Result<Rules, RuleError> {
        let mut compiled: Vec<ThresholdRule> = Vec::with_capacity(configs.len());
        for config in configs {
            let rule = match config {
                RuleConfig::Threshold(c) => ThresholdRule::new(c)?,
            };
            if compiled.iter().any(|r| r.name == rule.name) {
                return Err(RuleError::InvalidParameter {
                    rule: rule.name.clone(),
                    name: "name".into(),
                    reason: "another rule has the same name; names must be unique because \
                             alerts are identified by rule and series"
                        .into(),
                });
            }
            compiled.push(rule);
        }
        state.rules.retain(|name, _| compiled.iter().any(|r| &r.name == name));
        Ok(Rules { compiled, state })
    }

    /// Applies one event to every matching rule, in configuration order, pushing the
    /// resulting transitions to `out`.
    pub fn on_event(&mut self, event: &Event, out: &mut Vec<Alert>) {
        for rule in &self.compiled {
            if !rule.matches(&event.series) {
                continue;
            }
            let series = event.series.as_str();
            let stored = self.state.rules.get(&rule.name).and_then(|m| m.get(series));
            let mut state = stored.cloned().unwrap_or_default();
            if let Some(alert) = rule.on_event(&mut state, event) {
                out.push(alert);
            }
            // Keep only non-idle state: idle series cost no memory. Look up before inserting
            // so that the common case (an idle series staying idle) allocates nothing.
            if state.is_idle() {
                if let Some(per_series) = self.state.rules.get_mut(&rule.name) {
                    per_series.remove(series);
                    if per_series.is_empty() {
                        self.state.rules.remove(&rule.name);
                    }
                }
            } else {
                match self.state.rules.get_mut(&rule.name) {
                    Some(per_series) => match per_series.get_mut(series) {
                        Some(slot) => *slot = state,
                        None => {
                            per_series.insert(series.to_string(), state);
                        }
                    },
                    None => {
                        let per_series = BTreeMap::from([(series.to_string(), state)]);
                        self.state.rules.insert(rule.name.clone(), per_series);
                    }
                }
            }
        }
    }

    /// The state, for snapshots and status.
    pub fn state(&self) -> &RulesState {
        &self.state
    }

    /// The compiled rules in configuration order.
    pub fn rules(&self) -> &[ThresholdRule] {
        &self.compiled
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn threshold(name: &str, series: &str) -> ThresholdRuleConfig {
        ThresholdRuleConfig {
            name: name.into(),
            series: series.into(),
            above: None,
            below: None,
            clear: None,
            for_duration: Duration::ZERO,
            severity: Severity::Warning,
            message: None,
        }
    }

    fn above(level: f64, clear: Option<f64>, for_ms: u64) -> RuleConfig {
        RuleConfig::Threshold(ThresholdRuleConfig {
            above: Some(level),
            clear,
            for_duration: Duration::from_millis(for_ms),
            ..threshold("hot", "pump-*/temperature")
        })
    }

    fn event(series: &str, ts_ms: i64, value: f64) -> Event {
        Event { series: series.into(), ts_ms, value, received_ms: ts_ms, source: 0 }
    }

    /// Feeds `(ts, value)` pairs of `pump-1/temperature` and returns the transitions.
    fn run(rules: &mut Rules, points: &[(i64, f64)]) -> Vec<Alert> {
        let mut out = Vec::new();
        for &(ts, v) in points {
            rules.on_event(&event("pump-1/temperature", ts, v), &mut out);
        }
        out
    }

    fn states(alerts: &[Alert]) -> Vec<(AlertState, i64)> {
        alerts.iter().map(|a| (a.state, a.ts_ms)).collect()
    }

    #[test]
    fn patterns_match_literal_plus_hash_and_star_segments() {
        let p = |s: &str| SeriesPattern::parse(s).unwrap();
        assert!(p("pump-1/temperature").matches("pump-1/temperature"));
        assert!(!p("pump-1/temperature").matches("pump-1/temperature/x"));
        assert!(!p("pump-1/temperature").matches("pump-1"));
        assert!(p("+/temperature").matches("pump-7/temperature"));
        assert!(!p("+/temperature").matches("site/pump-7/temperature"));
        assert!(p("site/#").matches("site/a/b/c"));
        assert!(p("site/#").matches("site"));
        assert!(!p("site/#").matches("other/a"));
        assert!(p("#").matches("anything/at/all"));
        assert!(p("pump-*/temperature").matches("pump-12/temperature"));
        assert!(p("pump-*/temperature").matches("pump-/temperature"));
        assert!(!p("pump-*/temperature").matches("fan-1/temperature"));
        assert!(!p("pump-*").matches("pump-1/temperature"), "* stays within a segment");
        assert!(p("*-*-x").matches("a-b-c-x"));
        assert!(!p("*-*-x").matches("a-x"));
        assert!(p("t*e*p").matches("temp"));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        assert!(SeriesPattern::parse("").unwrap_err().contains("empty"));
        assert!(SeriesPattern::parse("a/#/b").unwrap_err().contains("last segment"));
        assert!(SeriesPattern::parse("a/b+/c").unwrap_err().contains("whole segment"));
        assert!(SeriesPattern::parse("a/x#").unwrap_err().contains("whole segment"));
    }

    #[test]
    fn raises_once_per_excursion_and_clears_once() {
        let mut rules = Rules::new(&[above(80.0, Some(75.0), 0)]).unwrap();
        let out = run(
            &mut rules,
            &[(1, 70.0), (2, 81.0), (3, 90.0), (4, 79.0), (5, 85.0), (6, 74.0), (7, 73.0)],
        );
        assert_eq!(states(&out), vec![(AlertState::Raised, 2), (AlertState::Cleared, 6)]);
        assert_eq!(out[0].threshold, 80.0);
        assert_eq!(out[1].threshold, 75.0);
        assert_eq!(out[1].value, 74.0);
        // A second excursion is a second episode.
        let again = run(&mut rules, &[(8, 99.0), (9, 70.0)]);
        assert_eq!(states(&again), vec![(AlertState::Raised, 8), (AlertState::Cleared, 9)]);
    }

    #[test]
    fn clears_only_below_the_clear_threshold() {
        let mut rules = Rules::new(&[above(80.0, Some(75.0), 0)]).unwrap();
        let out = run(&mut rules, &[(1, 81.0), (2, 76.0), (3, 75.0), (4, 80.0), (5, 100.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 1)], "75 is not below 75");
        assert_eq!(rules.state().active_alerts(), 1);
    }

    #[test]
    fn clear_defaults_to_the_raise_level() {
        let mut rules = Rules::new(&[above(80.0, None, 0)]).unwrap();
        let out = run(&mut rules, &[(1, 81.0), (2, 80.0), (3, 79.9)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 1), (AlertState::Cleared, 3)]);
        assert_eq!(out[1].threshold, 80.0);
    }

    #[test]
    fn below_rules_raise_under_the_level_and_clear_above_clear() {
        let rule = RuleConfig::Threshold(ThresholdRuleConfig {
            below: Some(2.0),
            clear: Some(3.0),
            ..threshold("cold", "pump-*/temperature")
        });
        let mut rules = Rules::new(&[rule]).unwrap();
        let out = run(&mut rules, &[(1, 2.5), (2, 1.0), (3, 2.9), (4, 3.0), (5, 3.1)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 2), (AlertState::Cleared, 5)]);
    }

    #[test]
    fn raises_only_after_the_condition_held_for_the_minimum_duration() {
        let mut rules = Rules::new(&[above(80.0, None, 10_000)]).unwrap();
        let out = run(&mut rules, &[(1_000, 81.0), (5_000, 82.0), (10_999, 83.0)]);
        assert!(out.is_empty(), "9.999 s is not 10 s: {out:?}");
        assert_eq!(rules.state().get("hot", "pump-1/temperature").pending_since, Some(1_000));
        let out = run(&mut rules, &[(11_000, 84.0), (12_000, 85.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 11_000)]);
    }

    #[test]
    fn a_dip_during_the_minimum_duration_restarts_the_wait() {
        let mut rules = Rules::new(&[above(80.0, Some(70.0), 10_000)]).unwrap();
        // 75 is inside the hysteresis band but not a breach: the wait starts over.
        let out = run(&mut rules, &[(0, 81.0), (6_000, 75.0), (7_000, 81.0), (16_000, 81.0)]);
        assert!(out.is_empty(), "{out:?}");
        let out = run(&mut rules, &[(17_000, 81.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 17_000)]);
    }

    #[test]
    fn series_are_tracked_independently_and_unmatched_series_are_ignored() {
        let mut rules = Rules::new(&[above(80.0, None, 0)]).unwrap();
        let mut out = Vec::new();
        rules.on_event(&event("pump-1/temperature", 1, 90.0), &mut out);
        rules.on_event(&event("pump-2/temperature", 2, 90.0), &mut out);
        rules.on_event(&event("fan-1/temperature", 3, 90.0), &mut out);
        rules.on_event(&event("pump-1/temperature", 4, 10.0), &mut out);
        let got: Vec<_> = out.iter().map(|a| (a.series.as_str(), a.state)).collect();
        assert_eq!(
            got,
            vec![
                ("pump-1/temperature", AlertState::Raised),
                ("pump-2/temperature", AlertState::Raised),
                ("pump-1/temperature", AlertState::Cleared),
            ]
        );
        assert_eq!(rules.state().active_alerts(), 1);
        assert_eq!(rules.state().series().collect::<Vec<_>>(), vec!["pump-2/temperature"]);
    }

    #[test]
    fn idle_series_hold_no_state() {
        let mut rules = Rules::new(&[above(80.0, None, 0)]).unwrap();
        run(&mut rules, &[(1, 10.0), (2, 90.0), (3, 10.0)]);
        assert_eq!(rules.state(), &RulesState::default());
    }

    #[test]
    fn messages_fill_every_placeholder_once() {
        let rule = RuleConfig::Threshold(ThresholdRuleConfig {
            above: Some(80.0),
            severity: Severity::Critical,
            message: Some("{rule}|{series}|{value}|{threshold}|{state}".into()),
            ..threshold("hot", "#")
        });
        let mut rules = Rules::new(&[rule]).unwrap();
        let mut out = Vec::new();
        rules.on_event(&event("odd/{value}", 1, 81.5), &mut out);
        assert_eq!(out[0].message, "hot|odd/{value}|81.5|80|raised");
        assert_eq!(out[0].severity, Severity::Critical);
        let default = Rules::new(&[above(80.0, None, 0)]).unwrap().rules()[0].clone();
        let mut state = SeriesState::default();
        let alert = default.on_event(&mut state, &event("pump-1/temperature", 1, 81.5)).unwrap();
        assert_eq!(alert.message, "hot: pump-1/temperature = 81.5 (raised, threshold 80)");
    }

    #[test]
    fn rendering_keeps_unknown_and_unclosed_braces_as_written() {
        let lookup = |name: &str| (name == "a").then(|| "1".to_string());
        assert_eq!(render("{a}{b} {a", lookup), "1{b} {a");
    }

    #[test]
    fn validation_points_at_the_offending_key() {
        let keys = |c: ThresholdRuleConfig| -> Vec<String> {
            validate(&RuleConfig::Threshold(c)).into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys(threshold("x", "a/b")), vec!["above"], "neither above nor below");
        assert_eq!(
            keys(ThresholdRuleConfig { above: Some(1.0), below: Some(0.0), ..threshold("x", "a") }),
            vec!["below"]
        );
        assert_eq!(
            keys(ThresholdRuleConfig { above: Some(1.0), clear: Some(2.0), ..threshold("x", "a") }),
            vec!["clear"]
        );
        assert_eq!(
            keys(ThresholdRuleConfig { below: Some(1.0), clear: Some(0.5), ..threshold("x", "a") }),
            vec!["clear"]
        );
        assert_eq!(
            keys(ThresholdRuleConfig { above: Some(1.0), ..threshold(" ", "a/#/b") }),
            vec!["name", "series"]
        );
        assert_eq!(
            keys(ThresholdRuleConfig { above: Some(f64::NAN), ..threshold("x", "a") }),
            vec!["above"]
        );
        assert_eq!(
            keys(ThresholdRuleConfig {
                above: Some(1.0),
                message: Some("{valeu}".into()),
                ..threshold("x", "a")
            }),
            vec!["message"]
        );
        assert!(
            validate(&RuleConfig::Threshold(ThresholdRuleConfig {
                below: Some(1.0),
                clear: Some(1.0),
                ..threshold("x", "a")
            }))
            .is_empty()
        );
    }

    #[test]
    fn rule_sets_refuse_invalid_and_duplicate_rules() {
        let err = Rules::new(&[RuleConfig::Threshold(threshold("x", "a"))]).unwrap_err();
        assert!(
            matches!(&err, RuleError::InvalidParameter { rule, name, .. } if rule == "x" && name == "above"),
            "{err}"
        );
        let err = Rules::new(&[above(1.0, None, 0), above(2.0, None, 0)]).unwrap_err();
        assert!(
            matches!(&err, RuleError::InvalidParameter { name, reason, .. } if name == "name" && reason.contains("same name")),
            "{err}"
        );
    }

    #[test]
    fn restoring_keeps_state_of_configured_rules_only() {
        let mut rules = Rules::new(&[above(80.0, None, 0)]).unwrap();
        run(&mut rules, &[(1, 90.0)]);
        let state = rules.state().clone();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let state: RulesState = postcard::from_bytes(&bytes).unwrap();
        let mut restored = Rules::restore(&[above(80.0, None, 0)], state.clone()).unwrap();
        assert_eq!(states(&run(&mut restored, &[(2, 90.0), (3, 1.0)])), [(AlertState::Cleared, 3)]);
        let other = RuleConfig::Threshold(ThresholdRuleConfig {
            above: Some(1.0),
            ..threshold("renamed", "#")
        });
        assert_eq!(Rules::restore(&[other], state).unwrap().state().active_alerts(), 0);
    }
}
