//! Alert rules: pure, per-(rule, series) state machines that turn events and clock ticks
//! into alert records.
//!
//! A rule never reads a clock and never does I/O: it sees one [`Event`] at a time, in
//! journal order, and the processor's clock through [`Rules::on_tick`]. The processor owns
//! a [`Rules`] set and is the only caller, which keeps the output a function of (snapshot,
//! journal) — the property that lets a restarted agent replay its journal and produce
//! byte-identical records, and `edgewise replay` reproduce the field on a laptop.
//!
//! # Kinds
//!
//! | kind             | condition (per series unless noted)                      | module        |
//! |------------------|----------------------------------------------------------|---------------|
//! | `threshold`      | value above/below a level, hysteresis, `for`              | [`threshold`] |
//! | `rate_of_change` | change per `per` over `span` above `max_rate`             | [`rate`]      |
//! | `flatline`       | value moves less than `epsilon` for `for`                 | [`flatline`]  |
//! | `missing_data`   | no event for `timeout` (timer, gateway clock)             | [`missing`]   |
//! | `window`         | mean/min/max/count/stddev over a sliding window vs level  | [`window`]    |
//! | `anomaly`        | detector score >= `level` for `for`, clears below `clear` | [`anomaly_rule`] |
//! | `all_of`/`any_of`| named rules active on one device within `within` (device) | [`combine`]   |
//!
//! # Alert lifecycle (every kind)
//!
//! A kind only decides when its **condition** starts and ends (a [`Transition`]). The
//! episode layer, shared by all kinds, turns conditions into records:
//!
//! ```text
//!  condition:   ───┐ raise ┌──────────┐ clear ┌──┐ raise ┌─────┐ clear ┌──────
//!                  └───────┘          └───────┘  └───────┘     └───────┘
//!  records:        Raised             Cleared    (suppressed: within min_interval
//!                                                 of the last Raised, and so is its clear)
//! ```
//!
//! - One `Raised` and one `Cleared` record per episode, never a flood: while a condition
//!   holds nothing is emitted.
//! - `min_interval`: a raise within `min_interval` (event time) of the last *emitted* raise
//!   of the same (rule, series) is suppressed — dropped, not queued — and so is the clear
//!   that ends that episode, so raises and clears always pair up upstream.
//! - Each record carries the rule's severity, its labels (templates over the series'
//!   segments, `device = "{0}"` and `metric = "{-1}"` by default) and a message rendered
//!   from the rule's template ([`template`]): `{rule}`, `{series}`, `{value}`,
//!   `{threshold}`, `{state}`, `{severity}`, `{device}`, `{metric}` and any label name;
//!   numbers with at most three decimals.
//! - A record's `value` is what the rule compared (the reading, the rate, the aggregate, the
//!   score, the seconds of silence, the number of combined conditions that hold) and its
//!   `threshold` the level it was compared with.
//!
//! # Time
//!
//! Event-driven kinds work in event time (`ts_ms`). Timers — `missing_data` deadlines and
//! the expiry of `within` in combined rules — run on the gateway clock: the processor calls
//! [`Rules::on_tick`] with its clock for every journal tick and after every event. A derived
//! lower bound of the next deadline (`next_deadline`, not snapshotted) makes a tick with
//! nothing due cost one comparison; a scan touches only what is due, so a stale bound only
//! costs time, never changes output.
//!
//! # State layout, memory and snapshots
//!
//! ```text
//! RulesState { rules: BTreeMap<rule name, SeriesMap<series (device for combined rules),
//!                                                  SeriesState { episode, machine }>> }
//! ```
//!
//! The per-series map is a hash map ([`SeriesMap`]: one hash per lookup instead of a B-tree
//! walk comparing keys, looked up for every matching rule on every event) that encodes sorted
//! like a `BTreeMap`; where records are emitted while scanning (timers) the series are taken
//! in sorted order, so output order and snapshot bytes never depend on hashing.
//! [`Machine`] is a postcard enum: append new kinds at the end. A threshold series that is
//! idle holds no state; the other kinds keep a small, bounded state per series they have
//! seen ([`rate::RATE_SLOTS`], [`window::WINDOW_MAX_SAMPLES`], O(1) for the rest). At most
//! [`MAX_SERIES_PER_RULE`] series (devices) are tracked per rule; further series are ignored
//! by that rule until some state is released.
//!
//! The compiled rules come from the configuration at every start (and reload); only the
//! state is snapshotted. [`Rules::restore`] drops the state of rules that no longer exist
//! and of rules whose kind changed, and keeps the rest: a rule whose levels changed keeps
//! its episode, so an active alert still gets its `Cleared` record.

use std::collections::BTreeMap;
use std::time::Duration;

use sensors::record::{Alert, AlertState, Severity};
use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::series_map::SeriesMap;

/// Declares a rule kind's configuration struct: the keys every rule has (`name`, `series`,
/// `severity`, `labels`, `message`, `min_interval`) around the kind's own. Written once here
/// because serde cannot `flatten` into a struct that denies unknown fields.
macro_rules! rule_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Unique rule name; part of alert records.
            pub name: String,
            /// Series pattern: segments split by `/`; `+` matches one segment, `#` the rest,
            /// `*` any characters within a segment. Example: `pump-*/temperature`.
            pub series: String,
            $( $(#[$fmeta])* pub $field: $ty, )*
            /// `info`, `warning` or `critical`. Default `warning`.
            #[serde(default)]
            pub severity: sensors::record::Severity,
            /// Label templates over the series' segments (`{0}` first, `{-1}` last,
            /// `{series}`); `device = "{0}"` and `metric = "{-1}"` unless set here.
            #[serde(default)]
            pub labels: std::collections::BTreeMap<String, String>,
            /// Message template (see [`crate::rules`] for the placeholders). Default: a
            /// sentence for the kind.
            pub message: Option<String>,
            /// Shortest time between two raises of the same series; a raise sooner is
            /// suppressed with its clear. Default 0 s.
            #[serde(default, with = "humantime_serde")]
            pub min_interval: std::time::Duration,
        }

        impl $name {
            pub(super) fn common(&self) -> $crate::rules::CommonConfig<'_> {
                $crate::rules::CommonConfig {
                    name: &self.name,
                    series: Some(&self.series),
                    severity: self.severity,
                    labels: &self.labels,
                    message: self.message.as_deref(),
                    min_interval: self.min_interval,
                }
            }
        }
    };
}

pub mod anomaly;
pub mod anomaly_rule;
pub mod combine;
pub mod flatline;
pub mod missing;
pub mod pattern;
pub mod rate;
pub mod template;
pub mod threshold;
pub mod window;

pub use anomaly_rule::AnomalyRuleConfig;
pub use combine::CombineRuleConfig;
pub use flatline::FlatlineRuleConfig;
pub use missing::MissingRuleConfig;
pub use pattern::SeriesPattern;
pub use rate::RateRuleConfig;
pub use threshold::{DEFAULT_MESSAGE, ThresholdRuleConfig};
pub use window::WindowRuleConfig;

use anomaly_rule::{AnomalyRule, AnomalyState};
use combine::{CombineRule, CombineState};
use flatline::{FlatlineRule, FlatlineState};
use missing::{MissingRule, MissingState};
use rate::{RateRule, RateState};
use template::{Labels, format_number, render};
use threshold::{Level, LevelState};
use window::{WindowRule, WindowState};

/// Most series (devices, for combined rules) one rule tracks. A gateway serves tens to
/// hundreds of devices with a handful of metrics each; 2048 leaves room for that while
/// bounding the worst case (a window rule at [`window::WINDOW_MAX_SAMPLES`]) to 16 MiB.
pub const MAX_SERIES_PER_RULE: usize = 2048;

/// Series whose matching rules [`Rules`] remembers (as a bit per rule, for rule sets of up to
/// 64 rules); when full it forgets them all and starts over (a cache miss costs one pattern
/// match per rule). 16,384 series take about 1 MB with their keys.
pub const MATCH_CACHE_SERIES: usize = 16_384;

/// The rule kinds, as written in `kind = "..."`, for error messages.
pub const KINDS: &str = "\"threshold\", \"rate_of_change\", \"flatline\", \"missing_data\", \
                         \"window\", \"anomaly\", \"all_of\", \"any_of\"";

/// One `[[rules]]` entry, selected by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleConfig {
    /// Raise when a value stays above (or below) a level, clear past a separate level.
    Threshold(ThresholdRuleConfig),
    /// Raise when the value changes faster than a rate.
    RateOfChange(RateRuleConfig),
    /// Raise when the value stops moving (a stuck sensor).
    Flatline(FlatlineRuleConfig),
    /// Raise when a series sends nothing for a while.
    MissingData(MissingRuleConfig),
    /// Raise when an aggregate over a sliding window passes a level.
    Window(WindowRuleConfig),
    /// Raise when the anomaly detector's score stays high.
    Anomaly(AnomalyRuleConfig),
    /// Raise when all named rules are active on one device.
    AllOf(CombineRuleConfig),
    /// Raise when any named rule is active on a device.
    AnyOf(CombineRuleConfig),
}

impl RuleConfig {
    /// The rule's configured name.
    pub fn name(&self) -> &str {
        self.common().name
    }

    /// The `kind` key's value.
    pub fn kind(&self) -> &'static str {
        match self {
            RuleConfig::Threshold(_) => "threshold",
            RuleConfig::RateOfChange(_) => "rate_of_change",
            RuleConfig::Flatline(_) => "flatline",
            RuleConfig::MissingData(_) => "missing_data",
            RuleConfig::Window(_) => "window",
            RuleConfig::Anomaly(_) => "anomaly",
            RuleConfig::AllOf(_) => "all_of",
            RuleConfig::AnyOf(_) => "any_of",
        }
    }

    /// The keys every kind has.
    pub fn common(&self) -> CommonConfig<'_> {
        match self {
            RuleConfig::Threshold(c) => c.common(),
            RuleConfig::RateOfChange(c) => c.common(),
            RuleConfig::Flatline(c) => c.common(),
            RuleConfig::MissingData(c) => c.common(),
            RuleConfig::Window(c) => c.common(),
            RuleConfig::Anomaly(c) => c.common(),
            RuleConfig::AllOf(c) | RuleConfig::AnyOf(c) => c.common(),
        }
    }

    /// The rules a combined rule names (empty for the other kinds).
    pub fn references(&self) -> &[String] {
        match self {
            RuleConfig::AllOf(c) | RuleConfig::AnyOf(c) => &c.rules,
            _ => &[],
        }
    }
}

/// The keys every rule has, borrowed from its configuration.
#[derive(Debug, Clone, Copy)]
pub struct CommonConfig<'a> {
    /// The rule's name.
    pub name: &'a str,
    /// The series pattern (`None` for combined rules, which work on devices).
    pub series: Option<&'a str>,
    /// The severity of its records.
    pub severity: Severity,
    /// Configured label templates.
    pub labels: &'a BTreeMap<String, String>,
    /// The message template, if set.
    pub message: Option<&'a str>,
    /// Shortest time between two raises.
    pub min_interval: Duration,
}

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

/// A change of a rule's condition, before the episode layer makes it a record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// Raised (the condition started) or Cleared (it ended).
    pub state: AlertState,
    /// When, ms since the Unix epoch.
    pub ts_ms: i64,
    /// What was compared (see the module docs).
    pub value: f64,
    /// The level it was compared with.
    pub threshold: f64,
}

/// One scored event of an anomaly rule, recorded for `edgewise replay --scores`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreSample {
    /// The anomaly rule's name.
    pub rule: String,
    /// The series scored.
    pub series: String,
    /// Event time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The event's value.
    pub value: f64,
    /// The detector's score in [0, 1].
    pub score: f64,
}

/// A duration in ms, saturating: a duration beyond i64 ms (292 million years) never elapses.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Checks one rule and returns every problem as `(config key, message)`, so that
/// `edgewise check` can point at the offending key. Empty when the rule is valid. References
/// between rules are checked by [`validate_references`].
pub fn validate(rule: &RuleConfig) -> Vec<(String, String)> {
    let common = rule.common();
    let mut problems = Vec::new();
    if common.name.trim().is_empty() {
        problems.push((
            "name".to_string(),
            "the rule name must not be empty; it names the rule in alerts".to_string(),
        ));
    }
    if let Some(series) = common.series
        && let Err(reason) = SeriesPattern::parse(series)
    {
        problems.push(("series".into(), reason));
    }
    problems.extend(match rule {
        RuleConfig::Threshold(c) => threshold::validate(c),
        RuleConfig::RateOfChange(c) => rate::validate(c),
        RuleConfig::Flatline(c) => flatline::validate(c),
        RuleConfig::MissingData(c) => missing::validate(c),
        RuleConfig::Window(c) => window::validate(c),
        RuleConfig::Anomaly(c) => anomaly_rule::validate(c),
        RuleConfig::AllOf(c) | RuleConfig::AnyOf(c) => combine::validate(c),
    });
    problems.extend(template::check_labels(common.labels));
    if let Some(message) = common.message {
        let defaults = if common.series.is_some() {
            &Labels::SERIES_DEFAULTS[..]
        } else {
            &Labels::DEVICE_DEFAULTS[..]
        };
        let keys = defaults.iter().map(|(k, _)| *k).chain(common.labels.keys().map(String::as_str));
        for reason in template::check_message(message, keys) {
            problems.push(("message".into(), reason));
        }
    }
    problems
}

/// Checks what one rule cannot: every rule a combined rule names exists and is not itself a
/// combined rule. Returns `(index of the rule, key, message)`.
pub fn validate_references(rules: &[RuleConfig]) -> Vec<(usize, String, String)> {
    let mut problems = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for (j, name) in rule.references().iter().enumerate() {
            let key = format!("rules[{j}]");
            match rules.iter().find(|r| r.name() == name) {
                None => {
                    let known: Vec<&str> = rules
                        .iter()
                        .filter(|r| r.references().is_empty())
                        .map(RuleConfig::name)
                        .collect();
                    problems.push((
                        i,
                        key,
                        format!(
                            "no rule is named `{name}`; the rules that can be combined are: {}",
                            if known.is_empty() { "(none)".to_string() } else { known.join(", ") }
                        ),
                    ));
                }
                Some(other) if !other.references().is_empty() => problems.push((
                    i,
                    key,
                    format!("`{name}` is itself an all_of/any_of rule; name its rules instead"),
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

/// The compiled keys every rule has.
#[derive(Debug, Clone)]
struct Common {
    name: String,
    pattern: Option<SeriesPattern>,
    severity: Severity,
    labels: Labels,
    message: String,
    min_interval_ms: i64,
}

impl Common {
    fn new(c: CommonConfig<'_>, default_message: String) -> Result<Common, RuleError> {
        let invalid = |name: String, reason: String| RuleError::InvalidParameter {
            rule: c.name.to_string(),
            name,
            reason,
        };
        let pattern = match c.series {
            Some(series) => {
                Some(SeriesPattern::parse(series).map_err(|r| invalid("series".into(), r))?)
            }
            None => None,
        };
        let defaults = if pattern.is_some() {
            &Labels::SERIES_DEFAULTS[..]
        } else {
            &Labels::DEVICE_DEFAULTS[..]
        };
        let labels = Labels::compile(defaults, c.labels)
            .map_err(|(key, reason)| invalid(format!("labels.{key}"), reason))?;
        Ok(Common {
            name: c.name.to_string(),
            pattern,
            severity: c.severity,
            labels,
            message: c.message.map_or(default_message, str::to_string),
            min_interval_ms: millis(c.min_interval),
        })
    }

    fn alert(&self, series: &str, t: &Transition) -> Alert {
        let labels = self.labels.render(series);
        let state = match t.state {
            AlertState::Raised => "raised",
            AlertState::Cleared => "cleared",
        };
        let severity = match self.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        };
        let message = render(&self.message, |name| match name {
            "rule" => Some(self.name.clone()),
            "series" => Some(series.to_string()),
            "value" => Some(format_number(t.value)),
            "threshold" => Some(format_number(t.threshold)),
            "state" => Some(state.to_string()),
            "severity" => Some(severity.to_string()),
            label => labels.get(label).cloned(),
        });
        Alert {
            rule: self.name.clone(),
            series: series.to_string(),
            state: t.state,
            severity: self.severity,
            ts_ms: t.ts_ms,
            value: t.value,
            threshold: t.threshold,
            message,
            labels,
        }
    }

    /// The episode layer: applies `t` to `episode` and returns the record to emit, if any.
    fn emit(&self, episode: &mut Episode, series: &str, t: &Transition) -> Option<Alert> {
        match t.state {
            AlertState::Raised => {
                episode.active = true;
                let too_soon = episode
                    .last_raise_ms
                    .is_some_and(|last| t.ts_ms.saturating_sub(last) < self.min_interval_ms);
                if too_soon {
                    episode.suppressed = true;
                    return None;
                }
                // Remember the raise only when it matters, so idle series stay free.
                if self.min_interval_ms > 0 {
                    episode.last_raise_ms = Some(t.ts_ms);
                }
                Some(self.alert(series, t))
            }
            AlertState::Cleared => {
                episode.active = false;
                if std::mem::take(&mut episode.suppressed) {
                    return None;
                }
                Some(self.alert(series, t))
            }
        }
    }
}

/// The record-level state of one (rule, series).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// The condition holds (whether or not its Raised record was suppressed).
    active: bool,
    /// This episode's Raised record was suppressed by `min_interval`: so is its Cleared.
    suppressed: bool,
    /// Event time of the last emitted Raised record (kept only with a `min_interval`).
    last_raise_ms: Option<i64>,
}

impl Episode {
    /// Whether the episode holds nothing worth keeping at `now_ms`.
    fn is_idle(&self, min_interval_ms: i64, now_ms: i64) -> bool {
        !self.active
            && !self.suppressed
            && self.last_raise_ms.is_none_or(|l| now_ms.saturating_sub(l) >= min_interval_ms)
    }
}

/// The kind-specific state of one (rule, series). Postcard enum: append new kinds at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Machine {
    /// `threshold`
    Threshold(LevelState),
    /// `rate_of_change`
    RateOfChange(RateState),
    /// `flatline`
    Flatline(FlatlineState),
    /// `missing_data`
    MissingData(MissingState),
    /// `window`
    Window(WindowState),
    /// `anomaly`: boxed, as its detector (176 bytes) would size every other kind's state
    /// to it (session 9: (rule, series) state 200 -> 80 bytes; postcard encodes a box as
    /// its content, so snapshots are unchanged).
    Anomaly(Box<AnomalyState>),
    /// `all_of` / `any_of` (per device)
    Combine(CombineState),
}

/// The state of one (rule, series).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesState {
    episode: Episode,
    machine: Machine,
}

impl SeriesState {
    /// Whether the rule's condition holds (an alert is up, or suppressed by `min_interval`).
    pub fn is_active(&self) -> bool {
        self.episode.active
    }

    /// The kind-specific state.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }
}

/// The state of all rules: `rule name → series → state`. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RulesState {
    rules: BTreeMap<String, SeriesMap<SeriesState>>,
}

impl RulesState {
    /// Number of (rule, series) whose condition holds.
    pub fn active_alerts(&self) -> usize {
        self.rules.values().flat_map(|m| m.values()).filter(|s| s.episode.active).count()
    }

    /// The series holding state (devices for combined rules), with repeats across rules.
    pub fn series(&self) -> impl Iterator<Item = &str> {
        self.rules.values().flat_map(|m| m.keys().map(String::as_str))
    }

    /// The state of `rule` for `series`, if it holds any.
    pub fn get(&self, rule: &str, series: &str) -> Option<&SeriesState> {
        self.rules.get(rule).and_then(|m| m.get(series))
    }

    /// Hot reload: takes the kind-specific state of `rule` from `warmed` (the rule run over
    /// the journal's retained history) and keeps this state's alert episodes, so that an
    /// alert that is up still gets its one Cleared record and is not raised twice, while the
    /// rule's baselines (windows, detectors, deadlines) are ready at once. A series that
    /// `warmed` does not know keeps its old state; `Rules::restore` drops it if the rule's kind
    /// changed.
    pub fn adopt_warmed(&mut self, rule: &str, warmed: &RulesState) {
        let mut old = self.rules.remove(rule).unwrap_or_default();
        let mut merged: SeriesMap<SeriesState> = SeriesMap::default();
        if let Some(per_series) = warmed.rules.get(rule) {
            for (series, state) in per_series.iter() {
                let episode = old.remove(series).map(|o| o.episode).unwrap_or_default();
                merged.insert(
                    series.clone(),
                    SeriesState { episode, machine: state.machine.clone() },
                );
            }
        }
        merged.extend(old);
        if !merged.is_empty() {
            self.rules.insert(rule.to_string(), merged);
        }
    }
}

/// The compiled condition of a rule.
#[derive(Debug, Clone)]
enum Kind {
    Threshold(Level),
    RateOfChange(RateRule),
    Flatline(FlatlineRule),
    MissingData(MissingRule),
    Window(WindowRule),
    Anomaly(AnomalyRule),
    Combine(CombineRule),
}

impl Kind {
    fn fresh(&self) -> Machine {
        match self {
            Kind::Threshold(_) => Machine::Threshold(LevelState::default()),
            Kind::RateOfChange(_) => Machine::RateOfChange(RateState::default()),
            Kind::Flatline(_) => Machine::Flatline(FlatlineState::default()),
            Kind::MissingData(_) => Machine::MissingData(MissingState::default()),
            Kind::Window(_) => Machine::Window(WindowState::default()),
            Kind::Anomaly(rule) => Machine::Anomaly(Box::new(rule.fresh())),
            Kind::Combine(_) => Machine::Combine(CombineState::default()),
        }
    }

    /// Whether `machine` is this kind's state (false after a kind change between runs).
    fn fits(&self, machine: &Machine) -> bool {
        matches!(
            (self, machine),
            (Kind::Threshold(_), Machine::Threshold(_))
                | (Kind::RateOfChange(_), Machine::RateOfChange(_))
                | (Kind::Flatline(_), Machine::Flatline(_))
                | (Kind::MissingData(_), Machine::MissingData(_))
                | (Kind::Window(_), Machine::Window(_))
                | (Kind::Anomaly(_), Machine::Anomaly(_))
                | (Kind::Combine(_), Machine::Combine(_))
        )
    }

    fn has_timer(&self) -> bool {
        matches!(self, Kind::MissingData(_) | Kind::Combine(_))
    }

    /// When the state next needs a tick, if ever.
    fn deadline(&self, state: &SeriesState) -> Option<i64> {
        match (self, &state.machine) {
            (Kind::MissingData(rule), Machine::MissingData(m)) => {
                rule.deadline(m, state.episode.active)
            }
            (Kind::Combine(rule), Machine::Combine(m)) => rule.deadline(m),
            _ => None,
        }
    }

    /// Whether this kind's state can ever be idle (see [`Kind::is_idle`]): the others learn
    /// from every event, so looking for idle state after each event would only cost lookups.
    fn can_idle(&self) -> bool {
        matches!(self, Kind::Threshold(_) | Kind::Combine(_))
    }

    /// Whether a series' state can be dropped at `now_ms` without changing any output.
    fn is_idle(&self, state: &SeriesState, min_interval_ms: i64, now_ms: i64) -> bool {
        let machine_idle = match &state.machine {
            Machine::Threshold(level) => level.pending_since.is_none(),
            Machine::Combine(m) => CombineRule::is_empty(m),
            // The other kinds learn from every event (samples, runs, baselines, deadlines).
            _ => false,
        };
        machine_idle && state.episode.is_idle(min_interval_ms, now_ms)
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    common: Common,
    kind: Kind,
}

impl Rule {
    /// Compiles a rule, refusing it with the first problem [`validate`] finds.
    pub fn new(config: &RuleConfig) -> Result<Rule, RuleError> {
        if let Some((name, reason)) = validate(config).into_iter().next() {
            return Err(RuleError::InvalidParameter {
                rule: config.name().to_string(),
                name,
                reason,
            });
        }
        let (kind, message) = match config {
            RuleConfig::Threshold(c) => {
                (Kind::Threshold(threshold::compile(c)), threshold::DEFAULT_MESSAGE.to_string())
            }
            RuleConfig::RateOfChange(c) => {
                (Kind::RateOfChange(RateRule::new(c)), rate::DEFAULT_MESSAGE.to_string())
            }
            RuleConfig::Flatline(c) => {
                (Kind::Flatline(FlatlineRule::new(c)), flatline::DEFAULT_MESSAGE.to_string())
            }
            RuleConfig::MissingData(c) => {
                (Kind::MissingData(MissingRule::new(c)), missing::DEFAULT_MESSAGE.to_string())
            }
            RuleConfig::Window(c) => {
                (Kind::Window(WindowRule::new(c)), WindowRule::default_message(c))
            }
            RuleConfig::Anomaly(c) => {
                (Kind::Anomaly(AnomalyRule::new(c)), anomaly_rule::DEFAULT_MESSAGE.to_string())
            }
            RuleConfig::AllOf(c) => {
                (Kind::Combine(CombineRule::new(true, c)), combine::DEFAULT_MESSAGE.to_string())
            }
            RuleConfig::AnyOf(c) => {
                (Kind::Combine(CombineRule::new(false, c)), combine::DEFAULT_MESSAGE.to_string())
            }
        };
        Ok(Rule { common: Common::new(config.common(), message)?, kind })
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.common.name
    }

    /// The state of a series this rule has not seen (or has released).
    fn fresh_state(&self) -> SeriesState {
        SeriesState { episode: Episode::default(), machine: self.kind.fresh() }
    }

    /// Whether the rule watches `series` (never true for combined rules: they watch rules).
    pub fn matches(&self, series: &str) -> bool {
        self.common.pattern.as_ref().is_some_and(|p| p.matches(series))
    }

    /// Advances one series' machine with an event.
    fn on_event(
        &self,
        state: &mut SeriesState,
        event: &Event,
        heard_ms: i64,
        scores: Option<&mut Vec<ScoreSample>>,
    ) -> Option<Transition> {
        if !self.kind.fits(&state.machine) {
            state.machine = self.kind.fresh();
        }
        let active = state.episode.active;
        let (ts, v) = (event.ts_ms, event.value);
        match (&self.kind, &mut state.machine) {
            (Kind::Threshold(level), Machine::Threshold(m)) => level.step(m, active, ts, v),
            (Kind::RateOfChange(rule), Machine::RateOfChange(m)) => rule.on_event(m, active, ts, v),
            (Kind::Flatline(rule), Machine::Flatline(m)) => rule.on_event(m, active, ts, v),
            (Kind::MissingData(rule), Machine::MissingData(m)) => {
                rule.on_event(m, active, heard_ms)
            }
            (Kind::Window(rule), Machine::Window(m)) => rule.on_event(m, active, ts, v),
            (Kind::Anomaly(rule), Machine::Anomaly(m)) => {
                rule.on_event(m, active, &self.common.name, &event.series, ts, v, scores)
            }
            // Combined rules see conditions, not events; `fits` made the pair match.
            _ => None,
        }
    }

    /// Advances one series' (device's) machine to `now_ms`.
    fn on_tick(&self, state: &mut SeriesState, now_ms: i64) -> Option<Transition> {
        let active = state.episode.active;
        match (&self.kind, &mut state.machine) {
            (Kind::MissingData(rule), Machine::MissingData(m)) => rule.on_tick(m, active, now_ms),
            (Kind::Combine(rule), Machine::Combine(m)) => rule.on_tick(m, active, now_ms),
            _ => None,
        }
    }
}

/// A condition change of a rule that a combined rule names.
#[derive(Debug)]
struct Change {
    /// Index of the rule in the compiled set.
    rule: usize,
    series: String,
    raised: bool,
    ts_ms: i64,
}

/// A compiled rule set with its per-(rule, series) state.
#[derive(Debug, Clone)]
pub struct Rules {
    compiled: Vec<Rule>,
    /// Per compiled rule: whether some combined rule names it.
    referenced: Vec<bool>,
    state: RulesState,
    /// Lower bound of the earliest timer deadline; derived, not snapshotted.
    next_deadline: Option<i64>,
    /// The largest `now` given to [`Rules::on_tick`], i.e. the processor's clock: when an
    /// event is heard of for `missing_data` (see [`missing`]). Derived, not snapshotted: the
    /// processor calls `on_tick` with its clock before every event, so after a restore it is
    /// set again before an event needs it.
    clock: Option<i64>,
    /// Scores of anomaly rules while recording (`None`: off, and free).
    scores: Option<Vec<ScoreSample>>,
    /// Per series: bit `i` set if compiled rule `i` matches it (rule sets of up to 64 rules),
    /// so that an event costs one lookup instead of a pattern match per rule. Derived from the
    /// patterns alone, not snapshotted; bounded by [`MATCH_CACHE_SERIES`].
    matching: SeriesMap<u64>,
}

/// Finds or creates the state of (rule, series), unless the rule tracks too many series.
fn slot<'a>(state: &'a mut RulesState, rule: &Rule, series: &str) -> Option<&'a mut SeriesState> {
    // Look up before inserting: cloning the keys on every event would allocate.
    if !state.rules.contains_key(&rule.common.name) {
        state.rules.insert(rule.common.name.clone(), SeriesMap::default());
    }
    let per_series = state.rules.get_mut(&rule.common.name)?;
    if !per_series.contains_key(series) {
        if per_series.len() >= MAX_SERIES_PER_RULE {
            return None;
        }
        per_series.insert(series.to_string(), rule.fresh_state());
    }
    per_series.get_mut(series)
}

/// A rule's condition changed for `series`: the change for the combined rules that name the
/// rule (`referenced`), and the record the episode lets through.
#[allow(clippy::too_many_arguments)]
fn transition(
    rule: &Rule,
    index: usize,
    referenced: bool,
    state: &mut SeriesState,
    series: &str,
    t: &Transition,
    changes: &mut Vec<Change>,
    out: &mut Vec<Alert>,
) {
    if referenced {
        changes.push(Change {
            rule: index,
            series: series.to_string(),
            raised: t.state == AlertState::Raised,
            ts_ms: t.ts_ms,
        });
    }
    out.extend(rule.common.emit(&mut state.episode, series, t));
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Rules {
    /// Compiles the configured rules; rule names must be unique (they key the state).
    pub fn new(configs: &[RuleConfig]) -> Result<Rules, RuleError> {
        Self::restore(configs, RulesState::default())
    }

    /// Compiles the configured rules and adopts `state` from a snapshot, dropping the state
    /// of rules that are no longer configured or changed kind.
    pub fn restore(configs: &[RuleConfig], mut state: RulesState) -> Result<Rules, RuleError> {
        let mut compiled: Vec<Rule> = Vec::with_capacity(configs.len());
        for config in configs {
            let rule = Rule::new(config)?;
            if compiled.iter().any(|r| r.common.name == rule.common.name) {
                return Err(RuleError::InvalidParameter {
                    rule: rule.common.name.clone(),
                    name: "name".into(),
                    reason: "another rule has the same name; names must be unique because \
                             alerts are identified by rule and series"
                        .into(),
                });
            }
            compiled.push(rule);
        }
        if let Some((i, key, reason)) = validate_references(configs).into_iter().next() {
            return Err(RuleError::InvalidParameter {
                rule: configs[i].name().to_string(),
                name: key,
                reason,
            });
        }
        let referenced = compiled
            .iter()
            .map(|r| {
                compiled
                    .iter()
                    .any(|c| matches!(&c.kind, Kind::Combine(k) if k.names(&r.common.name)))
            })
            .collect();
        state.rules.retain(|name, per_series| {
            let Some(rule) = compiled.iter().find(|r| &r.common.name == name) else {
                return false;
            };
            per_series.retain_unordered(|_, s| rule.kind.fits(&s.machine));
            !per_series.is_empty()
        });
        let mut rules = Rules {
            compiled,
            referenced,
            state,
            next_deadline: None,
            clock: None,
            scores: None,
            matching: SeriesMap::default(),
        };
        rules.next_deadline = rules.earliest_deadline();
        Ok(rules)
    }

    fn earliest_deadline(&self) -> Option<i64> {
        let mut next = None;
        for rule in self.compiled.iter().filter(|r| r.kind.has_timer()) {
            if let Some(per_series) = self.state.rules.get(&rule.common.name) {
                for s in per_series.values() {
                    next = earliest(next, rule.kind.deadline(s));
                }
            }
        }
        next
    }

    /// Applies one event to every matching rule, in configuration order, then feeds the
    /// condition changes to the combined rules; pushes the records to `out`.
    pub fn on_event(&mut self, event: &Event, out: &mut Vec<Alert>) {
        if self.compiled.is_empty() {
            return;
        }
        let mut changes = Vec::new();
        // Never behind the clock the timers run on: see `missing` on clock steps.
        let heard_ms = self.clock.map_or(event.received_ms, |c| c.max(event.received_ms));
        let series = event.series.as_str();
        // Bit i: rule i matches. More than 64 rules: matched per event, not cached.
        let cached = self.compiled.len() <= 64;
        let mask = match self.matching.get(series) {
            Some(&mask) => mask,
            None if cached => {
                if self.matching.len() >= MATCH_CACHE_SERIES {
                    self.matching = SeriesMap::default();
                }
                let mask = (self.compiled.iter().enumerate())
                    .filter(|(_, rule)| rule.matches(series))
                    .fold(0u64, |mask, (i, _)| mask | 1 << i);
                self.matching.insert(series.to_string(), mask);
                mask
            }
            None => u64::MAX,
        };
        for (index, rule) in self.compiled.iter().enumerate() {
            let matches = if cached { mask & (1 << index) != 0 } else { rule.matches(series) };
            if !matches {
                continue;
            }
            // One lookup of the rule's map and one of the series in it per event. A series
            // without state starts from a fresh state on the stack that is kept only if the
            // event leaves it busy: a threshold over normal readings allocates nothing.
            let mut step = |state: &mut SeriesState| {
                if let Some(t) = rule.on_event(state, event, heard_ms, self.scores.as_mut()) {
                    let referenced = self.referenced[index];
                    transition(rule, index, referenced, state, series, &t, &mut changes, out);
                }
                self.next_deadline = earliest(self.next_deadline, rule.kind.deadline(state));
                rule.kind.can_idle()
                    && rule.kind.is_idle(state, rule.common.min_interval_ms, event.ts_ms)
            };
            let name = &rule.common.name;
            match self.state.rules.get_mut(name) {
                Some(per_series) => {
                    if let Some(state) = per_series.get_mut(series) {
                        if step(state) {
                            per_series.remove(series);
                            if per_series.is_empty() {
                                self.state.rules.remove(name);
                            }
                        }
                    } else if per_series.len() < MAX_SERIES_PER_RULE {
                        let mut fresh = rule.fresh_state();
                        if !step(&mut fresh) {
                            per_series.insert(series.to_string(), fresh);
                        }
                    }
                }
                None => {
                    let mut fresh = rule.fresh_state();
                    if !step(&mut fresh) {
                        let mut per_series = SeriesMap::default();
                        per_series.insert(series.to_string(), fresh);
                        self.state.rules.insert(name.clone(), per_series);
                    }
                }
            }
        }
        self.apply_changes(&changes, out);
    }

    /// Moves the rules' clock to `now_ms` (gateway time): fires due timers (missing data,
    /// the end of `within` of combined rules) and pushes their records to `out`.
    pub fn on_tick(&mut self, now_ms: i64, out: &mut Vec<Alert>) {
        self.clock = Some(self.clock.map_or(now_ms, |c| c.max(now_ms)));
        match self.next_deadline {
            Some(due) if now_ms >= due => {}
            _ => return,
        }
        let mut changes = Vec::new();
        let mut next = None;
        for (index, rule) in self.compiled.iter().enumerate() {
            if !rule.kind.has_timer() {
                continue;
            }
            let Some(per_series) = self.state.rules.get_mut(&rule.common.name) else { continue };
            // The due series in sorted order: their records must come out in the same order
            // live and after a restore (a hash map's order depends on its history).
            let due = per_series.sorted_keys(|state| {
                let deadline = rule.kind.deadline(state);
                let due = deadline.is_some_and(|d| now_ms >= d);
                if !due {
                    next = earliest(next, deadline);
                }
                due
            });
            for series in due {
                let Some(state) = per_series.get_mut(&series) else { continue };
                if let Some(t) = rule.on_tick(state, now_ms) {
                    let referenced = self.referenced[index];
                    transition(rule, index, referenced, state, &series, &t, &mut changes, out);
                }
                // Only what was due may go: dropping by time alone would make the state
                // depend on when ticks happen to scan.
                if rule.kind.is_idle(state, rule.common.min_interval_ms, now_ms) {
                    per_series.remove(&series);
                } else {
                    next = earliest(next, rule.kind.deadline(state));
                }
            }
            if per_series.is_empty() {
                self.state.rules.remove(&rule.common.name);
            }
        }
        self.next_deadline = next;
        self.apply_changes(&changes, out);
    }

    /// Feeds condition changes to the combined rules that name their rules.
    fn apply_changes(&mut self, changes: &[Change], out: &mut Vec<Alert>) {
        if changes.is_empty() {
            return;
        }
        for rule in &self.compiled {
            let Kind::Combine(combine) = &rule.kind else { continue };
            for change in changes {
                let source = &self.compiled[change.rule];
                if !combine.names(&source.common.name) {
                    continue;
                }
                let device = source.common.labels.get("device", &change.series).unwrap_or_default();
                let Some(state) = slot(&mut self.state, rule, &device) else { continue };
                if !rule.kind.fits(&state.machine) {
                    state.machine = rule.kind.fresh();
                }
                let Machine::Combine(machine) = &mut state.machine else { continue };
                let t = combine.on_change(
                    machine,
                    state.episode.active,
                    &source.common.name,
                    &change.series,
                    change.raised,
                    change.ts_ms,
                );
                if let Some(t) = t {
                    out.extend(rule.common.emit(&mut state.episode, &device, &t));
                }
                self.next_deadline = earliest(self.next_deadline, rule.kind.deadline(state));
            }
        }
    }

    /// Starts (or stops, dropping what was recorded) recording anomaly scores.
    pub fn record_scores(&mut self, on: bool) {
        match (on, self.scores.is_some()) {
            (true, false) => self.scores = Some(Vec::new()),
            (false, _) => self.scores = None,
            (true, true) => {}
        }
    }

    /// Whether scores are being recorded.
    pub fn is_recording(&self) -> bool {
        self.scores.is_some()
    }

    /// The scores recorded since the last call (empty when not recording).
    pub fn take_scores(&mut self) -> Vec<ScoreSample> {
        self.scores.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The state, for snapshots and status.
    pub fn state(&self) -> &RulesState {
        &self.state
    }

    /// The compiled rules in configuration order.
    pub fn rules(&self) -> &[Rule] {
        &self.compiled
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the rule tests.

    use sensors::record::{Alert, AlertState};

    use super::{RuleConfig, Rules};
    use crate::event::Event;

    /// A rule from the body of a `[[rules]]` table.
    pub fn rule(toml: &str) -> RuleConfig {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
    }

    /// A rule set from `[[rules]]` bodies.
    pub fn rules(tomls: &[&str]) -> Rules {
        let configs: Vec<RuleConfig> = tomls.iter().map(|t| rule(t)).collect();
        Rules::new(&configs).unwrap()
    }

    /// An event received when it happened.
    pub fn event(series: &str, ts_ms: i64, value: f64) -> Event {
        Event { series: series.into(), ts_ms, value, received_ms: ts_ms, source: 0 }
    }

    /// Feeds `(ts, value)` pairs of `series` and returns the records.
    pub fn feed(rules: &mut Rules, series: &str, points: &[(i64, f64)]) -> Vec<Alert> {
        let mut out = Vec::new();
        for &(ts, v) in points {
            rules.on_event(&event(series, ts, v), &mut out);
        }
        out
    }

    /// The records as `(state, ts)`.
    pub fn states(alerts: &[Alert]) -> Vec<(AlertState, i64)> {
        alerts.iter().map(|a| (a.state, a.ts_ms)).collect()
    }

    /// A snapshot round trip of the state through postcard, into a freshly compiled set.
    pub fn restart(rules: &Rules, tomls: &[&str]) -> Rules {
        let bytes = postcard::to_stdvec(rules.state()).unwrap();
        let state = postcard::from_bytes(&bytes).unwrap();
        let configs: Vec<RuleConfig> = tomls.iter().map(|t| rule(t)).collect();
        Rules::restore(&configs, state).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use sensors::record::{AlertState, Severity};

    use super::testing::{event, feed, restart, rule, rules, states};
    use super::*;

    const HOT: &str = r#"
        kind = "threshold"
        name = "hot"
        series = "pump-*/temperature"
        above = 80.0
        clear = 75.0
    "#;

    fn hot(extra: &str) -> String {
        format!("{HOT}\n{extra}")
    }

    #[test]
    fn the_match_cache_stays_bounded_and_forgets_nothing_that_matters() {
        let mut rules = rules(&[HOT]);
        // Series the rule does not watch fill the cache past its bound...
        for i in 0..MATCH_CACHE_SERIES + 10 {
            feed(&mut rules, &format!("fan-{i}/speed"), &[(1, 90.0)]);
            assert!(rules.matching.len() <= MATCH_CACHE_SERIES);
        }
        assert!(rules.matching.len() < 20, "full: forgotten and started over");
        // ...and the series it watches still raise and clear, cached or not.
        let out = feed(&mut rules, "pump-1/temperature", &[(2, 81.0), (3, 74.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 2), (AlertState::Cleared, 3)]);
        assert_eq!(rules.matching.get("pump-1/temperature"), Some(&1));
        assert_eq!(rules.matching.get("fan-0/speed"), None);
    }

    #[test]
    fn rule_sets_beyond_the_match_cache_still_match_every_rule() {
        // 70 rules: more than the cache's 64 bits; only the last two watch temperatures.
        let mut tomls: Vec<String> = (0..68)
            .map(|i| {
                HOT.replace("\"hot\"", &format!("\"fan-{i}\""))
                    .replace("pump-*/temperature", "fan-*/speed")
            })
            .collect();
        tomls.push(HOT.replace("\"hot\"", "\"hot-a\""));
        tomls.push(HOT.replace("\"hot\"", "\"hot-b\""));
        let mut rules = rules(&tomls.iter().map(String::as_str).collect::<Vec<_>>());
        let out = feed(&mut rules, "pump-1/temperature", &[(1, 81.0), (2, 74.0)]);
        let names: Vec<_> = out.iter().map(|a| (a.rule.as_str(), a.state)).collect();
        assert_eq!(
            names,
            vec![
                ("hot-a", AlertState::Raised),
                ("hot-b", AlertState::Raised),
                ("hot-a", AlertState::Cleared),
                ("hot-b", AlertState::Cleared)
            ]
        );
        assert!(rules.matching.is_empty(), "not cached beyond 64 rules");
    }

    #[test]
    fn raises_once_per_excursion_and_clears_once() {
        let mut rules = rules(&[HOT]);
        let out = feed(
            &mut rules,
            "pump-1/temperature",
            &[(1, 70.0), (2, 81.0), (3, 90.0), (4, 79.0), (5, 85.0), (6, 74.0), (7, 73.0)],
        );
        assert_eq!(states(&out), vec![(AlertState::Raised, 2), (AlertState::Cleared, 6)]);
        assert_eq!((out[0].threshold, out[1].threshold, out[1].value), (80.0, 75.0, 74.0));
        // A second excursion is a second episode.
        let again = feed(&mut rules, "pump-1/temperature", &[(8, 99.0), (9, 70.0)]);
        assert_eq!(states(&again), vec![(AlertState::Raised, 8), (AlertState::Cleared, 9)]);
    }

    #[test]
    fn clears_only_below_the_clear_threshold() {
        let mut rules = rules(&[HOT]);
        let out = feed(
            &mut rules,
            "pump-1/temperature",
            &[(1, 81.0), (2, 76.0), (3, 75.0), (4, 80.0), (5, 100.0)],
        );
        assert_eq!(states(&out), vec![(AlertState::Raised, 1)], "75 is not below 75");
        assert_eq!(rules.state().active_alerts(), 1);
    }

    #[test]
    fn clear_defaults_to_the_raise_level() {
        let mut rules = rules(&[&HOT.replace("clear = 75.0", "")]);
        let out = feed(&mut rules, "pump-1/temperature", &[(1, 81.0), (2, 80.0), (3, 79.9)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 1), (AlertState::Cleared, 3)]);
        assert_eq!(out[1].threshold, 80.0);
    }

    #[test]
    fn below_rules_raise_under_the_level_and_clear_above_clear() {
        let mut rules = rules(&[r#"
            kind = "threshold"
            name = "cold"
            series = "pump-*/temperature"
            below = 2.0
            clear = 3.0
        "#]);
        let out = feed(
            &mut rules,
            "pump-1/temperature",
            &[(1, 2.5), (2, 1.0), (3, 2.9), (4, 3.0), (5, 3.1)],
        );
        assert_eq!(states(&out), vec![(AlertState::Raised, 2), (AlertState::Cleared, 5)]);
    }

    #[test]
    fn raises_only_after_the_condition_held_for_the_minimum_duration() {
        let mut rules = rules(&[&hot("for = \"10s\"")]);
        let out =
            feed(&mut rules, "pump-1/temperature", &[(1_000, 81.0), (5_000, 82.0), (10_999, 83.0)]);
        assert!(out.is_empty(), "9.999 s is not 10 s: {out:?}");
        let state = rules.state().get("hot", "pump-1/temperature").unwrap();
        assert_eq!(state.machine(), &Machine::Threshold(LevelState { pending_since: Some(1_000) }));
        let out = feed(&mut rules, "pump-1/temperature", &[(11_000, 84.0), (12_000, 85.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 11_000)]);
    }

    #[test]
    fn a_dip_during_the_minimum_duration_restarts_the_wait() {
        let mut rules = rules(&[&hot("for = \"10s\"").replace("75.0", "70.0")]);
        // 75 is inside the hysteresis band but not a breach: the wait starts over.
        let points = [(0, 81.0), (6_000, 75.0), (7_000, 81.0), (16_000, 81.0)];
        assert!(feed(&mut rules, "pump-1/temperature", &points).is_empty());
        let out = feed(&mut rules, "pump-1/temperature", &[(17_000, 81.0)]);
        assert_eq!(states(&out), vec![(AlertState::Raised, 17_000)]);
    }

    #[test]
    fn series_are_tracked_independently_and_unmatched_series_are_ignored() {
        let mut rules = rules(&[HOT]);
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
    fn idle_threshold_series_hold_no_state() {
        let mut rules = rules(&[HOT]);
        feed(&mut rules, "pump-1/temperature", &[(1, 10.0), (2, 90.0), (3, 10.0)]);
        assert_eq!(rules.state(), &RulesState::default());
    }

    #[test]
    fn messages_fill_every_placeholder_once_with_numbers_for_people() {
        let mut rules = rules(&[r##"
            kind = "threshold"
            name = "hot"
            series = "#"
            above = 80.0
            severity = "critical"
            message = "{rule}|{series}|{value}|{threshold}|{state}|{severity}|{device}|{metric}"
        "##]);
        let out = feed(&mut rules, "odd/{value}", &[(1, 81.123_456)]);
        assert_eq!(out[0].message, "hot|odd/{value}|81.123|80|raised|critical|odd|{value}");
        assert_eq!(out[0].severity, Severity::Critical);
        let mut plain = super::testing::rules(&[HOT]);
        let out = feed(&mut plain, "pump-1/temperature", &[(1, 81.5)]);
        assert_eq!(out[0].message, "hot: pump-1/temperature = 81.5 (raised, threshold 80)");
    }

    #[test]
    fn labels_default_to_the_first_and_last_segment_and_follow_templates() {
        let mut rules = rules(&[
            HOT,
            r#"
            kind = "threshold"
            name = "site-hot"
            series = "+/+/temperature"
            above = 80.0
            labels = { device = "{1}", site = "{0}" }
            message = "{device} at {site}: {value}"
            "#,
        ]);
        let out = feed(&mut rules, "pump-1/temperature", &[(1, 90.0)]);
        assert_eq!(
            format!("{:?}", out[0].labels),
            r#"{"device": "pump-1", "metric": "temperature"}"#
        );
        let out = feed(&mut rules, "plant-a/pump-7/temperature", &[(2, 90.0)]);
        assert_eq!(out[0].message, "pump-7 at plant-a: 90");
        assert_eq!(
            format!("{:?}", out[0].labels),
            r#"{"device": "pump-7", "metric": "temperature", "site": "plant-a"}"#
        );
    }

    #[test]
    fn a_raise_within_min_interval_is_suppressed_together_with_its_clear() {
        let mut rules = rules(&[&hot("min_interval = \"10s\"")]);
        let out = feed(
            &mut rules,
            "pump-1/temperature",
            &[
                (0, 90.0),      // raised
                (1_000, 70.0),  // cleared
                (5_000, 90.0),  // 5 s after the raise: suppressed
                (6_000, 95.0),  // still the suppressed episode: nothing
                (7_000, 70.0),  // its clear: suppressed too
                (10_000, 90.0), // 10 s after the last emitted raise: raised
                (11_000, 70.0), // cleared
            ],
        );
        assert_eq!(
            states(&out),
            vec![
                (AlertState::Raised, 0),
                (AlertState::Cleared, 1_000),
                (AlertState::Raised, 10_000),
                (AlertState::Cleared, 11_000),
            ]
        );
        // A suppressed episode that is still up when min_interval ends stays one episode.
        let out = feed(
            &mut rules,
            "pump-1/temperature",
            &[(12_000, 90.0), (30_000, 91.0), (31_000, 70.0)],
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn validation_points_at_the_offending_key() {
        let keys = |toml: &str| -> Vec<String> {
            validate(&rule(toml)).into_iter().map(|(k, _)| k).collect()
        };
        let t =
            |extra: &str| format!("kind = \"threshold\"\nname = \"x\"\nseries = \"a\"\n{extra}");
        assert_eq!(keys(&t("")), vec!["above"], "neither above nor below");
        assert_eq!(keys(&t("above = 1.0\nbelow = 0.0")), vec!["below"]);
        assert_eq!(keys(&t("above = 1.0\nclear = 2.0")), vec!["clear"]);
        assert_eq!(keys(&t("below = 1.0\nclear = 0.5")), vec!["clear"]);
        assert_eq!(keys(&t("above = nan")), vec!["above"]);
        assert_eq!(keys(&t("above = 1.0\nmessage = \"{valeu}\"")), vec!["message"]);
        assert_eq!(keys(&t("above = 1.0\nlabels = { site = \"{x}\" }")), vec!["labels.site"]);
        assert!(
            keys(&t("above = 1.0\nlabels = { site = \"{0}\" }\nmessage = \"{site}\"")).is_empty()
        );
        assert!(keys(&t("below = 1.0\nclear = 1.0")).is_empty());
        assert_eq!(
            keys("kind = \"threshold\"\nname = \" \"\nseries = \"a/#/b\"\nabove = 1.0"),
            vec!["name", "series"]
        );
        let message = &validate(&rule(&t("above = 1.0\nmessage = \"{valeu}\"")))[0].1;
        assert!(message.contains("`{valeu}`") && message.contains("{value}"), "{message}");
    }

    #[test]
    fn validation_of_every_kind_names_key_and_fix() {
        let problems = |toml: &str| -> Vec<(String, String)> { validate(&rule(toml)) };
        let cases = [
            (
                "kind = \"rate_of_change\"\nname = \"r\"\nseries = \"#\"\nmax_rate = -1.0\nper = \"0s\"\nclear = 9.0",
                vec!["max_rate", "per", "clear"],
            ),
            (
                "kind = \"rate_of_change\"\nname = \"r\"\nseries = \"#\"\nmax_rate = 5.0\nspan = \"0s\"",
                vec!["span"],
            ),
            (
                "kind = \"flatline\"\nname = \"f\"\nseries = \"#\"\nepsilon = 0.0\nfor = \"0s\"",
                vec!["epsilon", "for"],
            ),
            (
                "kind = \"missing_data\"\nname = \"m\"\nseries = \"#\"\ntimeout = \"0s\"",
                vec!["timeout"],
            ),
            (
                "kind = \"window\"\nname = \"w\"\nseries = \"#\"\nwindow = \"0s\"\naggregate = \"mean\"",
                vec!["above", "window"],
            ),
            ("kind = \"anomaly\"\nname = \"a\"\nseries = \"#\"\nlevel = 1.5", vec!["level"]),
            ("kind = \"anomaly\"\nname = \"a\"\nseries = \"#\"\nclear = 0.9", vec!["clear"]),
            ("kind = \"all_of\"\nname = \"c\"\nrules = []", vec!["rules"]),
            (
                "kind = \"any_of\"\nname = \"c\"\nrules = [\"a\", \"a\", \"c\"]",
                vec!["rules[1]", "rules[2]"],
            ),
        ];
        for (toml, expected) in cases {
            let got = problems(toml);
            let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, expected, "{toml}\n{got:?}");
            assert!(got.iter().all(|(_, m)| m.len() > 20), "messages explain: {got:?}");
        }
        let rate = problems(
            "kind = \"rate_of_change\"\nname = \"r\"\nseries = \"#\"\nmax_rate = 5.0\nper = \"0s\"",
        );
        assert!(rate[0].1.contains("\"1m\""), "{rate:?}");
    }

    #[test]
    fn wrong_units_and_unknown_kinds_are_reported_by_the_config_loader() {
        let file = |rule: &str| {
            format!(
                "[agent]\nid = \"gw\"\n[[sources]]\nkind = \"simulated\"\n[upstream]\nkind = \"file\"\npath = \"x\"\n[[rules]]\n{rule}\n"
            )
        };
        let errors = crate::config::load_str("r.toml", &file("kind = \"treshold\"\nname = \"x\""))
            .unwrap_err();
        let shown = errors.to_string();
        assert!(shown.contains("unknown kind `treshold`"), "{shown}");
        assert!(shown.contains("\"rate_of_change\"") && shown.contains("\"any_of\""), "{shown}");
        let errors = crate::config::load_str(
            "r.toml",
            &file("kind = \"missing_data\"\nname = \"m\"\nseries = \"#\"\ntimeout = \"5 parsecs\""),
        )
        .unwrap_err();
        assert!(errors.to_string().contains("r.toml:12:"), "{errors}");
    }

    #[test]
    fn combining_an_unknown_or_combined_rule_is_an_error() {
        let configs = vec![
            rule(HOT),
            rule("kind = \"all_of\"\nname = \"both\"\nrules = [\"hot\", \"shaky\"]"),
            rule("kind = \"any_of\"\nname = \"meta\"\nrules = [\"both\"]"),
        ];
        let problems = validate_references(&configs);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!((problems[0].0, problems[0].1.as_str()), (1, "rules[1]"));
        assert!(problems[0].2.contains("`shaky`") && problems[0].2.contains("hot"), "{problems:?}");
        assert_eq!((problems[1].0, problems[1].1.as_str()), (2, "rules[0]"));
        let err = Rules::new(&configs).unwrap_err();
        assert!(err.to_string().contains("shaky"), "{err}");
        let file = format!(
            "[agent]\nid = \"gw\"\n[[sources]]\nkind = \"simulated\"\n[upstream]\nkind = \"file\"\npath = \"x\"\n[[rules]]\n{HOT}\n[[rules]]\nkind = \"all_of\"\nname = \"both\"\nrules = [\"hot\", \"shaky\"]\n"
        );
        let errors = crate::config::load_str("c.toml", &file).unwrap_err();
        assert!(
            errors.to_string().contains("rules[1].rules[1]: no rule is named `shaky`"),
            "{errors}"
        );
    }

    #[test]
    fn rule_sets_refuse_invalid_and_duplicate_rules() {
        let err =
            Rules::new(&[rule("kind = \"threshold\"\nname = \"x\"\nseries = \"a\"")]).unwrap_err();
        assert!(
            matches!(&err, RuleError::InvalidParameter { rule, name, .. } if rule == "x" && name == "above"),
            "{err}"
        );
        let err = Rules::new(&[rule(HOT), rule(HOT)]).unwrap_err();
        assert!(
            matches!(&err, RuleError::InvalidParameter { name, reason, .. } if name == "name" && reason.contains("same name")),
            "{err}"
        );
    }

    #[test]
    fn restoring_keeps_state_of_configured_rules_of_the_same_kind_only() {
        let mut rules = rules(&[HOT]);
        feed(&mut rules, "pump-1/temperature", &[(1, 90.0)]);
        // Changed levels keep the episode, so the alert still clears.
        let mut restored = restart(&rules, &[&HOT.replace("80.0", "85.0")]);
        let out = feed(&mut restored, "pump-1/temperature", &[(2, 90.0), (3, 1.0)]);
        assert_eq!(states(&out), [(AlertState::Cleared, 3)]);
        let renamed = HOT.replace("\"hot\"", "\"renamed\"");
        assert_eq!(restart(&rules, &[&renamed]).state().active_alerts(), 0);
        let other_kind =
            "kind = \"flatline\"\nname = \"hot\"\nseries = \"#\"\nepsilon = 1.0\nfor = \"1s\"";
        assert_eq!(restart(&rules, &[other_kind]).state(), &RulesState::default());
    }

    #[test]
    fn scores_are_not_recorded_unless_asked() {
        let anomaly = "kind = \"anomaly\"\nname = \"odd\"\nseries = \"#\"";
        let mut rules = rules(&[anomaly]);
        feed(&mut rules, "a/b", &[(1, 1.0), (2, 2.0)]);
        assert!(rules.take_scores().is_empty());
        rules.record_scores(true);
        feed(&mut rules, "a/b", &[(3, 1.0), (4, 2.0)]);
        let scores = rules.take_scores();
        assert_eq!(
            scores
                .iter()
                .map(|s| (s.rule.as_str(), s.series.as_str(), s.ts_ms, s.value))
                .collect::<Vec<_>>(),
            vec![("odd", "a/b", 3, 1.0), ("odd", "a/b", 4, 2.0)]
        );
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(&s.score)));
        assert!(rules.take_scores().is_empty(), "taken");
        rules.record_scores(false);
        feed(&mut rules, "a/b", &[(5, 1.0)]);
        assert!(rules.take_scores().is_empty());
    }
    #[test]
    fn adopting_warmed_state_keeps_the_alert_episode_that_is_up() {
        let config = |above: f64| {
            crate::config::Config::from_toml(&format!(
                "[agent]\nid = \"a\"\n[[sources]]\nkind = \"simulated\"\n[upstream]\nkind = \"file\"\n\
                 path = \"x\"\n[[rules]]\nkind = \"threshold\"\nname = \"hot\"\nseries = \"#\"\n\
                 above = {above:?}\n"
            ))
            .unwrap()
            .rules
        };
        let event = |ts: i64, value: f64| Event {
            series: "p/t".into(),
            ts_ms: ts,
            value,
            received_ms: ts,
            source: 0,
        };
        let mut live = Rules::new(&config(50.0)).unwrap();
        let mut out = Vec::new();
        live.on_event(&event(1, 60.0), &mut out);
        assert_eq!(out.len(), 1, "raised");
        // The reloaded rule (a higher level) never saw 60 as a breach: its warmed state is idle,
        // yet 75 breaches it too: the episode that is up goes on, without a second raise.
        let warmed = Rules::new(&config(70.0)).unwrap();
        let mut state = live.state().clone();
        state.adopt_warmed("hot", warmed.state());
        let mut reloaded = Rules::restore(&config(70.0), state).unwrap();
        out.clear();
        reloaded.on_event(&event(2, 75.0), &mut out);
        assert!(out.is_empty(), "no second raise for the episode that is up: {out:?}");
        reloaded.on_event(&event(3, 10.0), &mut out);
        assert_eq!(out.len(), 1, "the episode still gets its one clear: {out:?}");
        assert_eq!(out[0].state, AlertState::Cleared);
    }
}
