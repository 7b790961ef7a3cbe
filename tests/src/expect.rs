//! What the agent should report, computed by the test from what it published.

use std::collections::BTreeMap;

use sensors::record::Summary;

/// One published reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Series key (the topic, with the default template).
    pub series: String,
    /// Payload timestamp, ms since the epoch.
    pub ts_ms: i64,
    /// Payload value.
    pub value: f64,
}

impl Reading {
    /// A reading.
    pub fn new(series: impl Into<String>, ts_ms: i64, value: f64) -> Reading {
        Reading { series: series.into(), ts_ms, value }
    }

    /// The MQTT payload `{"value": v, "ts": ms}`.
    pub fn payload(&self) -> Vec<u8> {
        format!("{{\"value\": {:?}, \"ts\": {}}}", self.value, self.ts_ms).into_bytes()
    }

    /// (topic, payload) for [`crate::Publisher::publish_all`].
    pub fn message(&self) -> (String, Vec<u8>) {
        (self.series.clone(), self.payload())
    }
}

/// Expected statistics of one (series, window).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedSummary {
    /// Number of readings.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Sum of values.
    pub sum: f64,
    /// Sum of squared values.
    pub sum_sq: f64,
    /// (ts, value) of the earliest reading.
    pub first: (i64, f64),
    /// (ts, value) of the latest reading.
    pub last: (i64, f64),
}

impl ExpectedSummary {
    /// Arithmetic mean.
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }

    /// Population standard deviation.
    pub fn stddev(&self) -> f64 {
        let mean = self.mean();
        (self.sum_sq / self.count as f64 - mean * mean).max(0.0).sqrt()
    }

    /// Differences between this expectation and a received summary (empty when they agree;
    /// float statistics within 1e-6 relative).
    pub fn diff(&self, actual: &Summary) -> Vec<String> {
        let mut diffs = Vec::new();
        if actual.count != self.count {
            diffs.push(format!("count {} != expected {}", actual.count, self.count));
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()));
        for (name, got, want) in [
            ("min", actual.min, self.min),
            ("max", actual.max, self.max),
            ("mean", actual.mean, self.mean()),
            ("stddev", actual.stddev, self.stddev()),
            ("first", actual.first, self.first.1),
            ("last", actual.last, self.last.1),
        ] {
            if !close(got, want) {
                diffs.push(format!("{name} {got} != expected {want}"));
            }
        }
        diffs
    }
}

/// Window start of `ts_ms` for tumbling windows of `window_ms` aligned to the epoch.
pub fn window_start(ts_ms: i64, window_ms: i64) -> i64 {
    ts_ms.div_euclid(window_ms) * window_ms
}

/// Expected summaries by (series, window start).
pub fn expected_summaries<'a>(
    readings: impl IntoIterator<Item = &'a Reading>,
    window_ms: i64,
) -> BTreeMap<(String, i64), ExpectedSummary> {
    let mut out: BTreeMap<(String, i64), ExpectedSummary> = BTreeMap::new();
    for r in readings {
        let key = (r.series.clone(), window_start(r.ts_ms, window_ms));
        let e = out.entry(key).or_insert(ExpectedSummary {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            sum_sq: 0.0,
            first: (i64::MAX, 0.0),
            last: (i64::MIN, 0.0),
        });
        e.count += 1;
        e.min = e.min.min(r.value);
        e.max = e.max.max(r.value);
        e.sum += r.value;
        e.sum_sq += r.value * r.value;
        if r.ts_ms < e.first.0 {
            e.first = (r.ts_ms, r.value);
        }
        if r.ts_ms > e.last.0 {
            e.last = (r.ts_ms, r.value);
        }
    }
    out
}

/// Compares received summaries (already de-duplicated) with the expectation: every expected
/// window must be reported once with the right statistics and nothing else may be reported.
pub fn compare_summaries(
    expected: &BTreeMap<(String, i64), ExpectedSummary>,
    received: &[&Summary],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: BTreeMap<(String, i64), u32> = BTreeMap::new();
    for s in received {
        let key = (s.series.clone(), s.start_ms);
        *seen.entry(key.clone()).or_default() += 1;
        match expected.get(&key) {
            Some(e) => {
                for d in e.diff(s) {
                    problems.push(format!("{} @ {}: {d}", s.series, s.start_ms));
                }
            }
            None => problems.push(format!("unexpected summary {s:?}")),
        }
    }
    for (key, n) in &seen {
        if *n > 1 {
            problems.push(format!("{} @ {}: {n} summaries for one window", key.0, key.1));
        }
    }
    for key in expected.keys() {
        if !seen.contains_key(key) {
            problems.push(format!("{} @ {}: no summary", key.0, key.1));
        }
    }
    problems
}

/// One expected alert transition.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedAlert {
    /// Series.
    pub series: String,
    /// Raised or cleared.
    pub state: sensors::record::AlertState,
    /// Event time of the reading that caused it.
    pub ts_ms: i64,
    /// That reading's value.
    pub value: f64,
    /// The crossed level.
    pub threshold: f64,
}

/// Transitions of an `above`/`clear` threshold rule with hysteresis and no minimum duration,
/// per series, in event order: raise when a value is above `above` (strictly), clear when it
/// falls below `clear` (strictly).
pub fn expected_threshold_alerts<'a>(
    readings: impl IntoIterator<Item = &'a Reading>,
    above: f64,
    clear: f64,
) -> Vec<ExpectedAlert> {
    let mut sorted: Vec<&Reading> = readings.into_iter().collect();
    sorted.sort_by_key(|r| r.ts_ms);
    let mut raised: BTreeMap<&str, bool> = BTreeMap::new();
    let mut out = Vec::new();
    for r in sorted {
        let state = raised.entry(&r.series).or_insert(false);
        let transition = if !*state && r.value > above {
            Some((sensors::record::AlertState::Raised, above))
        } else if *state && r.value < clear {
            Some((sensors::record::AlertState::Cleared, clear))
        } else {
            None
        };
        if let Some((new_state, threshold)) = transition {
            *state = new_state == sensors::record::AlertState::Raised;
            out.push(ExpectedAlert {
                series: r.series.clone(),
                state: new_state,
                ts_ms: r.ts_ms,
                value: r.value,
                threshold,
            });
        }
    }
    out
}

/// Compares received alerts of one rule (de-duplicated, in lane order) with the expectation:
/// the same transitions in the same order per series, nothing more.
pub fn compare_alerts(
    expected: &[ExpectedAlert],
    received: &[&sensors::record::Alert],
) -> Vec<String> {
    let mut problems = Vec::new();
    let series: std::collections::BTreeSet<&str> = expected
        .iter()
        .map(|e| e.series.as_str())
        .chain(received.iter().map(|a| a.series.as_str()))
        .collect();
    for s in series {
        let want: Vec<&ExpectedAlert> = expected.iter().filter(|e| e.series == s).collect();
        let got: Vec<&&sensors::record::Alert> =
            received.iter().filter(|a| a.series == s).collect();
        if want.len() != got.len() {
            problems.push(format!(
                "{s}: {} alerts, expected {}: got {:?}",
                got.len(),
                want.len(),
                got.iter().map(|a| (a.state, a.ts_ms, a.value)).collect::<Vec<_>>()
            ));
            continue;
        }
        for (w, g) in want.iter().zip(got) {
            if (w.state, w.ts_ms, w.value, w.threshold) != (g.state, g.ts_ms, g.value, g.threshold)
            {
                problems.push(format!("{s}: expected {w:?}, got {g:?}"));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensors::record::AlertState;

    #[test]
    fn windows_align_to_the_epoch_also_before_it() {
        assert_eq!(window_start(1_999, 1_000), 1_000);
        assert_eq!(window_start(2_000, 1_000), 2_000);
        assert_eq!(window_start(-1, 1_000), -1_000);
    }

    #[test]
    fn expected_summaries_follow_the_definitions() {
        let readings = [
            Reading::new("a", 1_500, 4.0),
            Reading::new("a", 1_100, 2.0),
            Reading::new("a", 2_100, 9.0),
        ];
        let e = expected_summaries(&readings, 1_000);
        let first = &e[&("a".to_string(), 1_000)];
        assert_eq!((first.count, first.min, first.max, first.mean()), (2, 2.0, 4.0, 3.0));
        assert_eq!((first.stddev(), first.first.1, first.last.1), (1.0, 2.0, 4.0));
        assert_eq!(e[&("a".to_string(), 2_000)].count, 1);
    }

    #[test]
    fn hysteresis_raises_once_per_excursion_and_equal_levels_do_not_cross() {
        let values = [20.0, 31.0, 35.0, 25.0, 32.0, 24.0, 30.0, 33.0, 22.0];
        let readings: Vec<Reading> =
            values.iter().enumerate().map(|(i, v)| Reading::new("s", i as i64, *v)).collect();
        let alerts = expected_threshold_alerts(&readings, 30.0, 25.0);
        let got: Vec<(AlertState, f64)> = alerts.iter().map(|a| (a.state, a.value)).collect();
        assert_eq!(
            got,
            [
                (AlertState::Raised, 31.0),
                (AlertState::Cleared, 24.0),
                (AlertState::Raised, 33.0),
                (AlertState::Cleared, 22.0)
            ]
        );
    }
}
