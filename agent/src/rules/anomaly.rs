//! The anomaly detector: an online, per-series score in [0, 1] for "this reading does not look
//! like this series' recent normal", with O(1) memory and no clock of its own.
//!
//! The anomaly rule keeps one [`Detector`] per series, feeds it every event with
//! [`Detector::update`] and raises when the score stays at or above the rule's level for its
//! `for` duration. The detector itself only scores; raise, clear and rate limits belong to the
//! rule engine.
//!
//! # Method
//!
//! A robust baseline predicts the next value; four components measure how surprising the
//! reading is against it; the strongest one becomes the score.
//!
//! ```text
//!  x(ts) ─▶ r = x − (level + trend·dt) ─▶ z = r / σ ─┬─▶ deviation |z| / deviation
//!              ▲                                     ├─▶ shift     CUSUM(z) / shift_limit
//!              │ update with r clipped to ±clip·σ    ├─▶ variance  ln EW(z²) / ln variance_ratio
//!              └── level, trend, σ (slow) ◀──────────┘   stuck     run of |Δx| ≤ tol·σ
//!                                                                  │
//!                             e = max(components) ─▶ score = 1 − 5^(−e²)
//! ```
//!
//! - **Baseline** (Holt's linear smoothing): `level` and `trend` (per second) follow the
//!   signal with gains `level_alpha` and `level_alpha · trend_beta` per sample, so slow drift
//!   and load cycles are tracked without lag. Every update uses the residual *clipped* to
//!   `±clip · σ` (winsorizing): a spike moves the baseline by at most `level_alpha · clip · σ`,
//!   and a level shift of size D is absorbed only after about `D / (level_alpha · clip · σ)`
//!   samples — long enough to be reported, short enough that a new normal is learned.
//! - **Scale** σ is an exponentially weighted mean absolute clipped residual (gain
//!   `scale_alpha`, converted to a standard deviation by √(π/2)), floored at `min_scale`: a
//!   mean absolute deviation is far less moved by outliers than a variance.
//! - **Deviation** (spikes, large shifts): `|z| / deviation`; one sample is enough.
//! - **Shift** (small, persistent level shifts): a two-sided CUSUM of the clipped z with slack
//!   `shift_slack`; `max(S⁺, S⁻) / shift_limit`. Clipping bounds what one spike can add
//!   (`clip − shift_slack`), so only a run of same-signed residuals reaches the limit.
//! - **Variance** (noise bursts, a loose connector): the short EW mean of the clipped z²
//!   (gain `burst_alpha`, about 2/`burst_alpha` samples) against the long-run σ², which is 1
//!   in normal operation; `ln(ratio) / ln(variance_ratio)`. Only increases count: a drop of
//!   the noise to nothing is the stuck component's job.
//! - **Stuck**: the run of consecutive readings that differ from the previous one by at most
//!   `stuck_tolerance · σ`; evidence `min(run / needed, run time / stuck_for)`. `needed` is
//!   `stuck_samples`, raised when the series repeats values often anyway (a coarsely quantized
//!   sensor): with `p` the recent fraction of repeats, a run must be at least as unlikely as
//!   [`STUCK_SURPRISE`] (`p^needed ≤ 10⁻⁶`). A series that almost always repeats (a setpoint)
//!   therefore never reads as stuck.
//!
//! Each component is scaled so that 1 is its detection threshold; `e` is the largest and the
//! score is `1 − 5^(−e²)`: 0 for a perfect fit, 0.33 at half a threshold, **exactly 0.8 at a
//! threshold** — the anomaly rule's default `level` — and 0.97 at 1.5×. The rule's default
//! `clear = 0.5` is `e ≈ 0.66`, a hysteresis of a third; `level = 0.9` asks for 1.2× the
//! thresholds, `level = 0.5` for 0.66×. The squashing is smooth and monotonic, so a score
//! says how far past its threshold the strongest component is.
//!
//! # Lifecycle and state
//!
//! ```text
//!   new ──▶ warming up (n < warmup; score 0) ──▶ scoring ──┐
//!    ▲         least squares line for level/trend,          │ gap > reset_after, or the
//!    │         σ from successive differences                │ end of a reported stuck run
//!    └──────────────────────────────────────────────────────┘ (restart: the baseline is stale)
//! ```
//!
//! - **Warm-up**: the first `warmup` finite readings score 0. Level and trend come from an
//!   ordinary least squares line through them (five running sums), σ from the mean absolute
//!   successive difference (`σ = E|Δx| · √π / 2` for white noise), which a slope does not
//!   inflate. After the warm-up the gains start at `1/n` and fall to their configured values,
//!   so the early estimates settle fast.
//! - **Judged before learned**: each reading is scored against the baseline *before* it is
//!   folded in, so an anomaly is never measured against itself.
//! - **Stuck runs freeze learning**: while a reading repeats the previous one (run ≥ 2), the
//!   baseline only extrapolates; otherwise a stuck sensor would shrink σ and make the
//!   recovery look like an anomaly. When a run that reached the stuck threshold ends, the
//!   detector restarts its warm-up at the first moving reading: the signal moved on while the
//!   baseline was frozen (measured: re-seeding only the level still left a stale trend that
//!   raised "shift" alarms half a minute after recovery). The score drops to 0, which clears
//!   the stuck alarm as the sensor recovers.
//! - **Time**: `ts_ms` is event time, passed in. A reading older than the previous one is
//!   scored with `dt = 0`. A gap longer than `reset_after` restarts the warm-up, because a
//!   baseline that old says little about the present; shorter gaps are bridged by the trend.
//! - **Bad input**: NaN and ±∞ are ignored (score 0, state untouched). Should arithmetic on
//!   extreme finite inputs overflow, the update is rolled back, so the state is always finite
//!   and serializes with any serde format.
//! - **Memory**: [`Detector`] is a fixed set of numbers (about 170 bytes) whatever the series'
//!   length; it derives serde so it lives in the processor snapshot, and a restored detector
//!   continues bit for bit.
//!
//! # Parameters
//!
//! See [`AnomalyParams`]; every key has a default, so `kind = "anomaly"` with a series pattern
//! is a complete rule. The defaults were chosen with the labeled recordings of
//! `agent/tests/anomaly_quality.rs` (figures in `BENCHMARKS.md`).

use std::f64::consts::PI;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The stuck component asks for a run of repeats at least this improbable under the series'
/// own repeat rate, so coarsely quantized sensors need longer runs than smooth ones.
pub const STUCK_SURPRISE: f64 = 1e-6;

/// The score is `1 − SCORE_BASE^(−e²)`, so that `e = 1` (a component at its threshold) scores
/// exactly 0.8, the anomaly rule's default level.
const SCORE_BASE: f64 = 5.0;

/// σ is never below this fraction of the level's magnitude (nor below 1e-12): a perfectly
/// constant series must not divide by zero, and floating point noise must not look like a
/// signal. `min_scale` is the user's floor in the value's units.
const RELATIVE_SCALE_FLOOR: f64 = 1e-9;

/// `E|x| = σ · √(2/π)` for a normal variable, so `σ = E|x| · √(π/2)`.
fn mad_to_sigma() -> f64 {
    (PI / 2.0).sqrt()
}

/// The tuning knobs of the anomaly detector. Every field has a default, so an empty table is
/// a valid configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyParams {
    /// Readings that only train the baseline, scoring 0 (default 30). At least 3.
    #[serde(default = "default_warmup")]
    pub warmup: u32,
    /// Gain of the level per reading (default 0.02): about 1/`level_alpha` readings of
    /// memory. Larger follows faster signals but absorbs level shifts sooner.
    #[serde(default = "default_level_alpha")]
    pub level_alpha: f64,
    /// Gain of the trend relative to the level's, Holt's β (default 0.1); 0 turns the
    /// baseline into a plain exponentially weighted mean (measured: many more false alarms on
    /// signals with load cycles, see `BENCHMARKS.md`).
    #[serde(default = "default_trend_beta")]
    pub trend_beta: f64,
    /// Gain of the long-run scale σ per reading (default 0.005): how fast a new normal noise
    /// level is accepted; larger absorbs noise bursts sooner.
    #[serde(default = "default_scale_alpha")]
    pub scale_alpha: f64,
    /// Gain of the short-run variance per reading (default 0.1): about 2/`burst_alpha`
    /// readings of memory; must be larger than `scale_alpha`.
    #[serde(default = "default_burst_alpha")]
    pub burst_alpha: f64,
    /// Residuals are clipped to ±`clip` σ before they update anything (default 4).
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// A single residual of this many σ reaches the threshold, score 0.8 (default 5).
    #[serde(default = "default_deviation")]
    pub deviation: f64,
    /// CUSUM slack in σ per reading: residuals smaller than this never accumulate
    /// (default 1).
    #[serde(default = "default_shift_slack")]
    pub shift_slack: f64,
    /// CUSUM sum (σ · readings) that reaches the threshold (default 12): a shift of 3 σ takes
    /// about 6 readings, one of 2 σ about 12.
    #[serde(default = "default_shift_limit")]
    pub shift_limit: f64,
    /// Short-run over long-run variance that reaches the threshold (default 4): the noise
    /// doubled.
    #[serde(default = "default_variance_ratio")]
    pub variance_ratio: f64,
    /// Repeated readings that reach the threshold (default 20); 0 disables stuck detection (for
    /// series that legitimately hold values, like setpoints or counters).
    #[serde(default = "default_stuck_samples")]
    pub stuck_samples: u32,
    /// The repeats must also span this much event time (default 15s); "0s" counts readings
    /// only.
    #[serde(default = "default_stuck_for", with = "humantime_serde")]
    pub stuck_for: Duration,
    /// Two readings closer than this many σ count as a repeat (default 0.05).
    #[serde(default = "default_stuck_tolerance")]
    pub stuck_tolerance: f64,
    /// Floor of σ in the value's units (default 0): set it to the sensor's resolution or to the
    /// smallest change that matters, so a very quiet series does not alarm on tiny moves.
    #[serde(default)]
    pub min_scale: f64,
    /// A gap in event time longer than this restarts the warm-up (default 10m).
    #[serde(default = "default_reset_after", with = "humantime_serde")]
    pub reset_after: Duration,
}

fn default_warmup() -> u32 {
    30
}
fn default_level_alpha() -> f64 {
    0.02
}
fn default_trend_beta() -> f64 {
    0.1
}
fn default_scale_alpha() -> f64 {
    0.005
}
fn default_burst_alpha() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    4.0
}
fn default_deviation() -> f64 {
    5.0
}
fn default_shift_slack() -> f64 {
    1.0
}
fn default_shift_limit() -> f64 {
    12.0
}
fn default_variance_ratio() -> f64 {
    4.0
}
fn default_stuck_samples() -> u32 {
    20
}
fn default_stuck_for() -> Duration {
    Duration::from_secs(15)
}
fn default_stuck_tolerance() -> f64 {
    0.05
}
fn default_reset_after() -> Duration {
    Duration::from_secs(600)
}

impl Default for AnomalyParams {
    fn default() -> Self {
        AnomalyParams {
            warmup: default_warmup(),
            level_alpha: default_level_alpha(),
            trend_beta: default_trend_beta(),
            scale_alpha: default_scale_alpha(),
            burst_alpha: default_burst_alpha(),
            clip: default_clip(),
            deviation: default_deviation(),
            shift_slack: default_shift_slack(),
            shift_limit: default_shift_limit(),
            variance_ratio: default_variance_ratio(),
            stuck_samples: default_stuck_samples(),
            stuck_for: default_stuck_for(),
            stuck_tolerance: default_stuck_tolerance(),
            min_scale: 0.0,
            reset_after: default_reset_after(),
        }
    }
}

/// Checks the parameters and returns every problem as `(key, message)`; empty when valid.
pub fn validate(params: &AnomalyParams) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| problems.push((key.to_string(), message));
    if params.warmup < 3 {
        problem(
            "warmup",
            format!(
                "must be at least 3 readings (a level, a trend and a noise estimate need them); \
                 got {}",
                params.warmup
            ),
        );
    }
    for (key, gain) in [
        ("level_alpha", params.level_alpha),
        ("scale_alpha", params.scale_alpha),
        ("burst_alpha", params.burst_alpha),
    ] {
        if !(gain > 0.0 && gain <= 1.0) {
            problem(key, format!("must be a gain in (0, 1], e.g. 0.02; got {gain}"));
        }
    }
    if !(0.0..=1.0).contains(&params.trend_beta) {
        problem(
            "trend_beta",
            format!("must be in [0, 1] (0 disables the trend); got {}", params.trend_beta),
        );
    }
    if params.burst_alpha <= params.scale_alpha {
        problem(
            "burst_alpha",
            format!(
                "must be larger than `scale_alpha` ({}): the short-run variance has to react \
                 faster than the long-run one it is compared with; got {}",
                params.scale_alpha, params.burst_alpha
            ),
        );
    }
    for (key, value, least) in [
        ("clip", params.clip, 1.0),
        ("deviation", params.deviation, 0.0),
        ("shift_limit", params.shift_limit, 0.0),
        ("variance_ratio", params.variance_ratio, 1.0),
    ] {
        if !(value.is_finite() && value > least) {
            problem(key, format!("must be a finite number above {least}; got {value}"));
        }
    }
    for (key, value) in [
        ("shift_slack", params.shift_slack),
        ("stuck_tolerance", params.stuck_tolerance),
        ("min_scale", params.min_scale),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            problem(key, format!("must be a finite number >= 0; got {value}"));
        }
    }
    if params.stuck_samples == 1 {
        problem(
            "stuck_samples",
            "one repeat is normal noise; use at least 2 (default 20), or 0 to disable".into(),
        );
    }
    if params.reset_after.is_zero() {
        problem("reset_after", "must be longer than 0 s, e.g. \"10m\"".into());
    }
    problems
}

/// Which component drove the last score, for alert messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Cause {
    /// Warming up, ignored input or nothing notable.
    #[default]
    None,
    /// One reading far from the baseline (spike, large step).
    Deviation,
    /// A persistent shift of the level (CUSUM).
    Shift,
    /// The noise grew.
    Variance,
    /// The value stopped changing.
    Stuck,
}

impl Cause {
    /// A lower-case word for messages: `none`, `deviation`, `shift`, `variance`, `stuck`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::None => "none",
            Cause::Deviation => "deviation",
            Cause::Shift => "shift",
            Cause::Variance => "variance",
            Cause::Stuck => "stuck",
        }
    }
}

/// The per-series detector state; see the module docs for the method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detector {
    /// Finite readings since the (re)start, saturating.
    n: u32,
    /// Event time of the newest reading (ms).
    last_ts_ms: i64,
    /// The previous reading, for repeats.
    last_value: f64,
    /// Baseline level at `last_ts_ms`.
    level: f64,
    /// Baseline slope per second.
    trend: f64,
    /// Long-run noise σ (value units).
    sigma: f64,
    /// Short-run mean of clipped z² (1 in normal operation).
    burst: f64,
    /// CUSUM sums (σ · readings).
    cusum_up: f64,
    cusum_down: f64,
    /// Mean time between readings (s), for the trend's gain.
    interval_s: f64,
    /// Recent fraction of readings that repeat the previous one.
    repeat_rate: f64,
    /// Repeats in the current run (0: the last reading moved).
    run: u32,
    /// Event time at which the current run's value first appeared.
    run_start_ms: i64,
    /// Readings a run needs, fixed when the run starts.
    run_needed: f64,
    /// Warm-up least squares sums, over t (s since the first reading) and x − first value.
    first_ts_ms: i64,
    first_value: f64,
    sum_t: f64,
    sum_x: f64,
    sum_tt: f64,
    sum_tx: f64,
    /// Cause of the last score.
    cause: Cause,
}

impl Detector {
    /// A detector that has seen nothing (warming up).
    pub fn new(_params: &AnomalyParams) -> Detector {
        Detector {
            n: 0,
            last_ts_ms: 0,
            last_value: 0.0,
            level: 0.0,
            trend: 0.0,
            sigma: 0.0,
            burst: 1.0,
            cusum_up: 0.0,
            cusum_down: 0.0,
            interval_s: 0.0,
            repeat_rate: 0.0,
            run: 0,
            run_start_ms: 0,
            run_needed: 0.0,
            first_ts_ms: 0,
            first_value: 0.0,
            sum_t: 0.0,
            sum_x: 0.0,
            sum_tt: 0.0,
            sum_tx: 0.0,
            cause: Cause::None,
        }
    }

    /// Feeds one value at event time `ts_ms`; returns the score in [0, 1] (0 while warming up
    /// and for non-finite values, which are otherwise ignored).
    pub fn update(&mut self, params: &AnomalyParams, ts_ms: i64, value: f64) -> f64 {
        if !value.is_finite() {
            return 0.0;
        }
        let before = self.clone();
        let score = self.step(params, ts_ms, value);
        if score.is_finite() && self.is_finite() {
            score
        } else {
            *self = before;
            0.0
        }
    }

    /// Whether the warm-up is over, so scores are meaningful.
    pub fn warmed_up(&self, params: &AnomalyParams) -> bool {
        self.n >= params.warmup
    }

    /// The component that drove the last score ([`Cause::None`] below the threshold's half).
    pub fn cause(&self) -> Cause {
        self.cause
    }

    fn step(&mut self, params: &AnomalyParams, ts_ms: i64, x: f64) -> f64 {
        let gap_ms = ts_ms.saturating_sub(self.last_ts_ms);
        let reset_ms = i64::try_from(params.reset_after.as_millis()).unwrap_or(i64::MAX);
        if self.n > 0 && gap_ms > reset_ms {
            *self = Detector::new(params);
        }
        self.cause = Cause::None;
        if self.n == 0 {
            self.start(ts_ms, x);
            return 0.0;
        }
        let dt_s = gap_ms.max(0) as f64 / 1000.0;
        let moved = (x - self.last_value).abs();
        let sigma = self.sigma_floored(params);
        let repeat = moved <= params.stuck_tolerance * sigma;

        // The run is tracked from the first reading so that a sensor stuck since start-up is
        // reported as soon as the warm-up ends.
        let n = f64::from(self.n.saturating_add(1));
        let gain = |alpha: f64| alpha.max(1.0 / n);
        // A run is judged against the repeat rate from before it, so that its own repeats do
        // not excuse it; but a run that began in the warm-up has no "before", and a series
        // that has repeated since it started is taken to be one that holds values.
        let rate_before = self.repeat_rate;
        let differences = n - 1.0;
        if !repeat && self.n >= params.warmup && self.stuck_evidence(params, self.last_ts_ms) >= 1.0
        {
            // The end of a stuck episode. The signal moved on while the baseline was frozen
            // (level, trend and phase of any cycle are stale), so it is learned afresh; the
            // score drops to 0, which clears the alarm as the sensor recovers.
            *self = Detector::new(params);
            self.start(ts_ms, x);
            return 0.0;
        }
        self.repeat_rate += params.scale_alpha.max(1.0 / differences)
            * (f64::from(u8::from(repeat)) - self.repeat_rate);
        if repeat {
            if self.run == 0 {
                self.run_start_ms = self.last_ts_ms;
                self.run_needed = stuck_needed(params, rate_before);
            }
            if self.n < params.warmup {
                self.run_needed = stuck_needed(params, self.repeat_rate);
            }
            self.run = self.run.saturating_add(1);
        } else {
            self.run = 0;
        }
        if dt_s > 0.0 {
            self.interval_s += gain(params.scale_alpha) * (dt_s - self.interval_s);
        }

        let score = if self.n < params.warmup {
            self.warm(ts_ms, x, moved, n);
            0.0
        } else {
            self.score_and_learn(params, ts_ms, x, dt_s, n)
        };
        self.n = self.n.saturating_add(1);
        self.last_ts_ms = self.last_ts_ms.max(ts_ms);
        self.last_value = x;
        score
    }

    fn start(&mut self, ts_ms: i64, x: f64) {
        self.n = 1;
        self.last_ts_ms = ts_ms;
        self.last_value = x;
        self.level = x;
        self.first_ts_ms = ts_ms;
        self.first_value = x;
    }

    /// One warm-up reading: least squares line for level and trend, σ from successive
    /// differences (clipped once a few are known, so one early spike cannot dominate).
    fn warm(&mut self, ts_ms: i64, x: f64, moved: f64, n: f64) {
        let t = (ts_ms - self.first_ts_ms) as f64 / 1000.0;
        let y = x - self.first_value;
        // The first reading is (0, 0) and adds nothing to the sums; `n` counts it.
        self.sum_t += t;
        self.sum_x += y;
        self.sum_tt += t * t;
        self.sum_tx += t * y;
        let (mean_t, mean_x) = (self.sum_t / n, self.sum_x / n);
        let var_t = self.sum_tt / n - mean_t * mean_t;
        self.trend = if var_t > 1e-12 { (self.sum_tx / n - mean_t * mean_x) / var_t } else { 0.0 };
        self.level = self.first_value + mean_x + self.trend * (t - mean_t);
        // σ = E|Δx| · √π / 2 for white noise; `sigma` holds the running estimate.
        let estimate = moved * PI.sqrt() / 2.0;
        let differences = n - 1.0;
        let clipped = if differences > 4.0 { estimate.min(4.0 * self.sigma) } else { estimate };
        self.sigma += (clipped - self.sigma) / differences;
    }

    fn score_and_learn(&mut self, p: &AnomalyParams, ts_ms: i64, x: f64, dt_s: f64, n: f64) -> f64 {
        let gain = |alpha: f64| alpha.max(1.0 / n);
        let sigma = self.sigma_floored(p);
        let predicted = self.level + self.trend * dt_s;
        let z = (x - predicted) / sigma;
        let zc = z.clamp(-p.clip, p.clip);

        let deviation = z.abs() / p.deviation;
        self.cusum_up = (self.cusum_up + zc - p.shift_slack).max(0.0);
        self.cusum_down = (self.cusum_down - zc - p.shift_slack).max(0.0);
        let shift = self.cusum_up.max(self.cusum_down) / p.shift_limit;
        let stuck = self.stuck_evidence(p, ts_ms);

        if self.run >= 2 {
            // A repeating value carries no information about the signal: extrapolate only.
            self.level = predicted;
        } else {
            self.burst += p.burst_alpha * (zc * zc - self.burst);
            let level = predicted + gain(p.level_alpha) * zc * sigma;
            if self.interval_s > 0.0 {
                let slope_error = (level - predicted) / self.interval_s;
                self.trend += p.trend_beta * slope_error;
            }
            self.level = level;
            let absolute = (zc * sigma).abs() * mad_to_sigma();
            self.sigma += gain(p.scale_alpha) * (absolute - self.sigma);
        }
        let variance = self.burst.max(1.0).ln() / p.variance_ratio.ln();

        let evidence = [
            (deviation, Cause::Deviation),
            (shift, Cause::Shift),
            (variance, Cause::Variance),
            (stuck, Cause::Stuck),
        ];
        let (e, cause) = evidence
            .into_iter()
            .fold((0.0, Cause::None), |best, c| if c.0 > best.0 { c } else { best });
        self.cause = if e >= 0.5 { cause } else { Cause::None };
        1.0 - SCORE_BASE.powf(-(e * e))
    }

    /// `min(run / needed, run time / stuck_for)`; 0 when disabled or not repeating.
    fn stuck_evidence(&self, p: &AnomalyParams, ts_ms: i64) -> f64 {
        if p.stuck_samples == 0 || self.run == 0 {
            return 0.0;
        }
        let by_count = f64::from(self.run) / self.run_needed;
        let for_ms = p.stuck_for.as_millis() as f64;
        if for_ms == 0.0 {
            return by_count;
        }
        let by_time = (ts_ms - self.run_start_ms).max(0) as f64 / for_ms;
        by_count.min(by_time)
    }

    fn sigma_floored(&self, p: &AnomalyParams) -> f64 {
        self.sigma.max(p.min_scale).max(RELATIVE_SCALE_FLOOR * self.level.abs()).max(1e-12)
    }

    fn is_finite(&self) -> bool {
        [
            self.last_value,
            self.level,
            self.trend,
            self.sigma,
            self.burst,
            self.cusum_up,
            self.cusum_down,
            self.interval_s,
            self.repeat_rate,
            self.run_needed,
            self.first_value,
            self.sum_t,
            self.sum_x,
            self.sum_tt,
            self.sum_tx,
        ]
        .iter()
        .all(|v| v.is_finite())
    }
}

/// Readings a stuck run needs given the series' repeat rate (see [`STUCK_SURPRISE`]);
/// infinite when the series practically always repeats.
fn stuck_needed(p: &AnomalyParams, repeat_rate: f64) -> f64 {
    let base = f64::from(p.stuck_samples);
    if repeat_rate <= 0.0 {
        return base;
    }
    if repeat_rate >= 0.99 {
        return f64::INFINITY;
    }
    base.max((STUCK_SURPRISE.ln() / repeat_rate.ln()).ceil())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;
    /// The anomaly rule's default level: a component at its threshold.
    const LEVEL: f64 = 0.8;

    /// Deterministic white noise with σ ≈ 1 (sum of uniforms), seeded.
    struct Noise(fastrand::Rng);

    impl Noise {
        fn new(seed: u64) -> Noise {
            Noise(fastrand::Rng::with_seed(seed))
        }
        fn next(&mut self) -> f64 {
            // Irwin–Hall: 12 uniforms minus 6 has mean 0 and variance 1.
            (0..12).map(|_| self.0.f64()).sum::<f64>() - 6.0
        }
    }

    /// Feeds `values` at 1 s intervals from `T0 + start_s`; returns the scores.
    fn feed(d: &mut Detector, p: &AnomalyParams, start_s: i64, values: &[f64]) -> Vec<f64> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| d.update(p, T0 + (start_s + i as i64) * 1000, v))
            .collect()
    }

    fn noisy(seed: u64, len: usize, f: impl Fn(usize) -> f64) -> Vec<f64> {
        let mut noise = Noise::new(seed);
        (0..len).map(|i| f(i) + noise.next()).collect()
    }

    #[test]
    fn scores_zero_until_the_warm_up_is_over() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        // Wild values during the warm-up are learned, not scored.
        for i in 0..30 {
            let v = if i % 7 == 0 { 100.0 } else { 10.0 };
            assert_eq!(d.update(&p, T0 + i * 1000, v), 0.0, "reading {i} scored");
            assert_eq!(d.warmed_up(&p), i + 1 >= 30, "after reading {i}");
        }
        assert!(d.warmed_up(&p));
    }

    #[test]
    fn the_score_stays_within_zero_and_one_for_any_input() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        let mut rng = fastrand::Rng::with_seed(9);
        for i in 0..5_000 {
            let v = match rng.u32(0..10) {
                0 => rng.f64() * 1e12,
                1 => -1e300,
                2 => 42.0,
                _ => rng.f64(),
            };
            let s = d.update(&p, T0 + i * 1000, v);
            assert!((0.0..=1.0).contains(&s), "score {s} for {v}");
        }
        assert!(d.is_finite());
    }

    #[test]
    fn a_slow_drift_is_followed_without_alarm() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        // 20 σ over two hours, on top of a ±4 σ half-hour cycle.
        let values = noisy(1, 7_200, |i| {
            let t = i as f64;
            20.0 * t / 7_200.0 + 4.0 * (t * std::f64::consts::TAU / 1_800.0).sin()
        });
        let scores = feed(&mut d, &p, 0, &values);
        let above = scores.iter().filter(|&&s| s >= LEVEL).count();
        let worst = scores.iter().cloned().fold(0.0, f64::max);
        assert!(above <= 2, "{above} readings scored >= LEVEL on a drift (worst {worst})");
    }

    #[test]
    fn a_spike_is_detected_on_the_reading_itself() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(2, 300, |_| 20.0));
        let spike = d.update(&p, T0 + 300_000, 20.0 + 8.0);
        assert!(spike >= 0.95, "an 8 σ spike scored {spike}");
        assert_eq!(d.cause(), Cause::Deviation);
        // The baseline was not dragged along: the next normal readings are quiet again.
        let after = feed(&mut d, &p, 301, &noisy(3, 20, |_| 20.0));
        assert!(after.iter().skip(5).all(|&s| s < LEVEL), "after the spike: {after:?}");
    }

    #[test]
    fn a_small_level_shift_is_detected_within_a_few_dozen_readings() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(4, 600, |_| 0.0));
        let scores = feed(&mut d, &p, 600, &noisy(5, 60, |_| 3.0));
        let first = scores.iter().position(|&s| s >= LEVEL);
        assert!(first.is_some_and(|i| i <= 12), "3 σ shift first >= LEVEL at {first:?}");
    }

    #[test]
    fn a_noise_burst_is_detected() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(6, 600, |_| 0.0));
        let mut noise = Noise::new(7);
        let burst: Vec<f64> = (0..60).map(|_| 4.0 * noise.next()).collect();
        let scores = feed(&mut d, &p, 600, &burst);
        let late = scores[20..].iter().filter(|&&s| s >= LEVEL).count();
        assert!(late >= 30, "only {late} of the last 40 burst readings scored >= LEVEL");
    }

    #[test]
    fn a_stuck_value_is_detected_after_the_configured_run() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(8, 600, |_| 5.0));
        let scores = feed(&mut d, &p, 600, &[5.3; 40]);
        let first = scores.iter().position(|&s| s >= LEVEL).unwrap();
        // The first of the 40 equal readings starts the run; 20 repeats reach the threshold.
        assert_eq!(first, 20, "{scores:?}");
        assert_eq!(d.cause(), Cause::Stuck);
        assert!(scores[39] > 0.8);
        // Recovery: the frozen baseline makes normal readings look normal again.
        let after = feed(&mut d, &p, 640, &noisy(9, 30, |_| 5.0));
        assert!(after.iter().skip(3).all(|&s| s < LEVEL), "after recovery: {after:?}");
    }

    #[test]
    fn a_series_that_always_repeats_is_never_stuck() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        for i in 0..2_000 {
            // A setpoint: it holds for minutes, then moves.
            let v = if i % 500 < 250 { 1.0 } else { 2.0 };
            d.update(&p, T0 + i * 1000, v);
            assert_ne!(d.cause(), Cause::Stuck, "reading {i}");
        }
    }

    #[test]
    fn nan_and_infinity_are_ignored_and_leave_the_state_untouched() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(10, 100, |_| 1.0));
        let before = d.clone();
        for (i, v) in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY].into_iter().enumerate() {
            assert_eq!(d.update(&p, T0 + (100 + i as i64) * 1000, v), 0.0);
        }
        assert_eq!(d, before);
    }

    #[test]
    fn an_overflowing_input_is_rolled_back() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(11, 10, |_| 1.0));
        // Squaring the largest finite value in the warm-up sums overflows.
        let before = d.clone();
        assert_eq!(d.update(&p, T0 + 10_000, f64::MAX), 0.0);
        assert_eq!(d, before);
        // Once scoring, the same value is simply an extreme deviation.
        feed(&mut d, &p, 10, &noisy(12, 90, |_| 1.0));
        assert_eq!(d.update(&p, T0 + 100_000, f64::MAX), 1.0);
        assert!(d.is_finite());
        assert!(d.update(&p, T0 + 101_000, 1.0) < 1.0);
    }

    #[test]
    fn a_long_gap_restarts_the_warm_up() {
        let p = AnomalyParams::default();
        let mut d = Detector::new(&p);
        feed(&mut d, &p, 0, &noisy(12, 100, |_| 1.0));
        assert!(d.warmed_up(&p));
        // Eleven minutes later, at a very different level: no alarm, a new baseline.
        assert_eq!(d.update(&p, T0 + 760_000, 50.0), 0.0);
        assert!(!d.warmed_up(&p));
        feed(&mut d, &p, 761, &noisy(13, 29, |_| 50.0));
        assert!(d.warmed_up(&p));
    }

    #[test]
    fn a_restored_detector_continues_exactly_like_the_original() {
        let p = AnomalyParams::default();
        let mut original = Detector::new(&p);
        feed(&mut original, &p, 0, &noisy(14, 500, |i| (i as f64 / 50.0).sin() * 3.0));
        // postcard is the snapshot's format and keeps every bit of an f64.
        let bytes = postcard::to_allocvec(&original).unwrap();
        let mut from_postcard: Detector = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(from_postcard, original);
        let rest = noisy(15, 500, |i| if (200..260).contains(&i) { 30.0 } else { 0.0 });
        let expected = feed(&mut original, &p, 500, &rest);
        assert_eq!(feed(&mut from_postcard, &p, 500, &rest), expected);
        assert_eq!(from_postcard, original);
    }

    #[test]
    fn defaults_validate_and_every_bad_knob_is_reported() {
        assert!(validate(&AnomalyParams::default()).is_empty());
        let p: AnomalyParams = toml::from_str("").unwrap();
        assert_eq!(p, AnomalyParams::default());
        let bad = AnomalyParams {
            warmup: 1,
            level_alpha: 0.0,
            trend_beta: 2.0,
            burst_alpha: 0.005,
            deviation: f64::NAN,
            variance_ratio: 1.0,
            stuck_samples: 1,
            min_scale: -1.0,
            reset_after: Duration::ZERO,
            ..AnomalyParams::default()
        };
        let keys: Vec<String> = validate(&bad).into_iter().map(|(k, _)| k).collect();
        for key in [
            "warmup",
            "level_alpha",
            "trend_beta",
            "burst_alpha",
            "deviation",
            "variance_ratio",
            "stuck_samples",
            "min_scale",
            "reset_after",
        ] {
            assert!(keys.iter().any(|k| k == key), "`{key}` not reported: {keys:?}");
        }
    }

    #[test]
    fn params_read_from_toml_with_humantime_durations_and_reject_unknown_keys() {
        let p: AnomalyParams =
            toml::from_str("warmup = 60\nstuck_for = \"1m\"\nreset_after = \"2h\"").unwrap();
        assert_eq!(p.warmup, 60);
        assert_eq!(p.stuck_for, Duration::from_secs(60));
        assert_eq!(p.reset_after, Duration::from_secs(7_200));
        assert!(toml::from_str::<AnomalyParams>("treshold = 3").is_err());
    }
}
