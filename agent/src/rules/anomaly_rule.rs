//! `kind = "anomaly"`: the online detector of [`super::anomaly`] scores every event in
//! [0, 1]; the alert is raised when the score stays at or above `level` for `for` and
//! cleared when it falls below `clear`.
//!
//! Per series the state is the detector's (O(1), serializable) plus the level's pending run.
//! The alert's value is the score, its threshold `level` (raised) or `clear` (cleared).
//! While the processor records scores ([`super::Rules::record_scores`]), every scored event
//! adds one [`ScoreSample`].

use std::time::Duration;

use sensors::record::AlertState;
use serde::{Deserialize, Serialize};

use super::anomaly::{self, AnomalyParams, Detector};
use super::threshold::LevelState;
use super::{ScoreSample, Transition, millis};

rule_config! {
    /// `kind = "anomaly"`: raise when the detector's score stays high.
    pub struct AnomalyRuleConfig {
        /// Raise when the score is at least this. Default 0.8.
        #[serde(default = "default_level")]
        pub level: f64,
        /// Clear when the score falls below this. Default 0.5.
        #[serde(default = "default_clear")]
        pub clear: f64,
        /// How long the score must stay at or above `level`. Default 0 s.
        #[serde(default, rename = "for", with = "humantime_serde")]
        pub for_duration: Duration,
        /// The detector's knobs: `detector = { ... }`.
        #[serde(default)]
        pub detector: AnomalyParams,
    }
}

fn default_level() -> f64 {
    0.8
}
fn default_clear() -> f64 {
    0.5
}

/// The message template of an anomaly rule that sets none.
pub const DEFAULT_MESSAGE: &str = "{rule}: {series} looks anomalous (score {value}, {state})";

/// A compiled anomaly rule.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyRule {
    level: f64,
    clear: f64,
    for_ms: i64,
    params: AnomalyParams,
}

/// Per-series state: the detector and the pending run above `level`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyState {
    detector: Detector,
    level: LevelState,
}

impl AnomalyRule {
    pub(super) fn new(c: &AnomalyRuleConfig) -> AnomalyRule {
        AnomalyRule {
            level: c.level,
            clear: c.clear,
            for_ms: millis(c.for_duration),
            params: c.detector.clone(),
        }
    }

    pub(super) fn fresh(&self) -> AnomalyState {
        AnomalyState { detector: Detector::new(&self.params), level: LevelState::default() }
    }

    /// Scores the event and advances the level. `scores` collects a sample when recording.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_event(
        &self,
        state: &mut AnomalyState,
        active: bool,
        rule: &str,
        series: &str,
        ts_ms: i64,
        value: f64,
        scores: Option<&mut Vec<ScoreSample>>,
    ) -> Option<Transition> {
        let score = state.detector.update(&self.params, ts_ms, value);
        if let Some(scores) = scores {
            scores.push(ScoreSample {
                rule: rule.to_string(),
                series: series.to_string(),
                ts_ms,
                value,
                score,
            });
        }
        // "At or above" the level: the score is bounded by 1, so `level = 1` must be reachable.
        let pending = &mut state.level.pending_since;
        if active {
            *pending = None;
            return (score < self.clear).then_some(Transition {
                state: AlertState::Cleared,
                ts_ms,
                value: score,
                threshold: self.clear,
            });
        }
        if score < self.level {
            *pending = None;
            return None;
        }
        let since = *pending.get_or_insert(ts_ms);
        if ts_ms.saturating_sub(since) < self.for_ms {
            return None;
        }
        *pending = None;
        Some(Transition { state: AlertState::Raised, ts_ms, value: score, threshold: self.level })
    }
}

pub(super) fn validate(c: &AnomalyRuleConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if !(c.level > 0.0 && c.level <= 1.0) {
        problems.push((
            "level".into(),
            format!("scores lie in [0, 1]: `level` must be in (0, 1], got {}", c.level),
        ));
    }
    if !(c.clear >= 0.0 && c.clear <= c.level) {
        problems.push((
            "clear".into(),
            format!(
                "the alert clears when the score falls below `clear`, so it must be between 0 \
                 and level = {}; got {}",
                c.level, c.clear
            ),
        ));
    }
    for (key, message) in anomaly::validate(&c.detector) {
        problems.push((format!("detector.{key}"), message));
    }
    problems
}

#[cfg(test)]
mod tests {
    use sensors::record::AlertState;

    use super::super::testing::{feed, rules};

    /// A steady signal with small deterministic noise.
    fn calm(from: i64, n: i64) -> Vec<(i64, f64)> {
        (from..from + n)
            .map(|i| (i * 1_000, 20.0 + ((i * 7919) % 13) as f64 / 13.0 - 0.5))
            .collect()
    }

    #[test]
    fn a_spike_after_warm_up_raises_once_and_the_calm_clears_it() {
        let mut rules = rules(&["kind = \"anomaly\"\nname = \"odd\"\nseries = \"#\""]);
        rules.record_scores(true);
        assert!(feed(&mut rules, "pump-1/temperature", &calm(0, 600)).is_empty(), "calm is normal");
        let out = feed(&mut rules, "pump-1/temperature", &[(600_000, 80.0)]);
        assert_eq!(out.iter().map(|a| a.state).collect::<Vec<_>>(), vec![AlertState::Raised]);
        assert!(out[0].value >= 0.8 && out[0].threshold == 0.8, "{:?}", out[0]);
        let out = feed(&mut rules, "pump-1/temperature", &calm(601, 600));
        assert_eq!(out.iter().map(|a| a.state).collect::<Vec<_>>(), vec![AlertState::Cleared]);
        assert!(out[0].value < 0.5 && out[0].threshold == 0.5, "{:?}", out[0]);
        let scores = rules.take_scores();
        assert_eq!(scores.len(), 1_201, "one score per event");
        assert!(scores[..10].iter().all(|s| s.score == 0.0), "warming up");
    }

    #[test]
    fn the_score_must_stay_high_for_for() {
        let mut rules =
            rules(&["kind = \"anomaly\"\nname = \"odd\"\nseries = \"#\"\nfor = \"1h\""]);
        feed(&mut rules, "a/b", &calm(0, 600));
        assert!(feed(&mut rules, "a/b", &[(600_000, 80.0)]).is_empty(), "one spike is not an hour");
    }
}
