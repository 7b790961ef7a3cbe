//! Backlog compaction, the pure part: which summaries merge, and the exact statistics of a
//! merge. The outbox does the I/O (see `outbox`, "Compaction").
//!
//! During a long outage the summaries lane grows by one record per series and window. Above
//! the high-water mark (`buffer.compact_above`) the outbox merges the oldest summaries of one
//! series into *coarse windows* of `buffer.compact_to`, aligned to multiples of that length
//! like every window, so that a day of 1-minute windows becomes a day of 5-minute windows
//! instead of half a day of 1-minute windows and a gap. Eviction into gap records stays the
//! last resort at `buffer.max_bytes`.
//!
//! # Which summaries merge
//!
//! A summary belongs to the coarse window `floor(start / c) * c` of its series when the
//! coarse length `c` is a multiple of its own `window_ms` and its start is aligned to that
//! window (true for every summary the agent makes, and for every merged one). Summaries of
//! other lengths (the configured window was changed between runs so that it no longer
//! divides `c`) never merge. A merged summary has `window_ms = c`, `start_ms` = the coarse
//! window's start, and `windows` = the sum of the merged `windows`, so it merges again with
//! later summaries of the same coarse window.
//!
//! # Exact statistics
//!
//! [`merge`] computes the statistics the agent would have reported had the coarse window
//! been its window, from the per-window statistics alone:
//!
//! ```text
//! count  = Σ nᵢ
//! min    = min minᵢ,   max = max maxᵢ
//! mean, M2 combined pairwise (Chan, Golub, LeVeque, "parallel variance"), Mᵢ = nᵢ·stddevᵢ²:
//!   n = nₐ + n_b,  δ = mean_b − meanₐ
//!   mean = meanₐ + δ·n_b / n
//!   M2   = M2ₐ + M2_b + δ²·nₐ·n_b / n
//! stddev = sqrt(M2 / count)              (population, like the windows)
//! first  = first of the earliest window, last = last of the latest window
//! ```
//!
//! The pairwise update never subtracts two large sums (unlike Σx² − n·mean²), so it is as
//! stable as Welford's update inside a window; a property test checks the result against
//! the real window code run over the union of the raw events.
//!
//! "Earliest" and "latest" are by `start_ms`, ties in the order given. The outbox passes the
//! records of a coarse window in lane order, which is the order their windows closed in:
//! windows of one series close in start order, and a merged record sits at the position of
//! the first record it replaced, so it is older than every later record of its coarse window.

use std::collections::BTreeMap;

use sensors::record::Summary;

/// Default coarse window of compaction when `buffer.compact_to` is not set: 5 minutes turns
/// the default 1-minute windows into five times fewer records while keeping a resolution
/// that still shows a daily cycle in detail.
pub const DEFAULT_COMPACT_TO_MS: u64 = 5 * 60 * 1000;

/// The coarse window length summaries of `window_ms` are merged into; `None` when they
/// never merge.
///
/// With `compact_to_ms` set (validated against `summary.window` at load), it must be a
/// multiple of `window_ms` larger than it. Without it, the default is the smallest multiple
/// of `window_ms` that is at least [`DEFAULT_COMPACT_TO_MS`] and at least two windows, so any
/// window length gets a valid coarse window (5 min for every window that divides 5 min).
pub fn coarse_window_ms(compact_to_ms: Option<u64>, window_ms: u64) -> Option<u64> {
    if window_ms == 0 {
        return None;
    }
    match compact_to_ms {
        Some(c) => (c > window_ms && c % window_ms == 0).then_some(c),
        None => {
            let floor = DEFAULT_COMPACT_TO_MS.max(window_ms.checked_mul(2)?);
            floor.div_ceil(window_ms).checked_mul(window_ms)
        }
    }
}

/// Start of the coarse window of length `coarse_ms` that holds the summary's window, if the
/// summary can merge into it (see the module docs).
pub fn coarse_start(summary: &Summary, coarse_ms: u64) -> Option<i64> {
    let window = i64::try_from(summary.window_ms).ok().filter(|w| *w > 0)?;
    let coarse = i64::try_from(coarse_ms).ok()?;
    if coarse % window != 0 || summary.start_ms.rem_euclid(window) != 0 {
        return None;
    }
    summary.start_ms.div_euclid(coarse).checked_mul(coarse)
}

/// Merges summaries of one series into one summary of `[start_ms, start_ms + window_ms)`
/// with exact statistics (see the module docs). `None` when there is nothing to merge: no
/// summary, summaries of different series, or no event at all.
pub fn merge(summaries: &[Summary], start_ms: i64, window_ms: u64) -> Option<Summary> {
    let series = &summaries.first()?.series;
    if summaries.iter().any(|s| &s.series != series) {
        return None;
    }
    let mut ordered: Vec<&Summary> = summaries.iter().filter(|s| s.count > 0).collect();
    // Stable: equal starts keep the caller's order.
    ordered.sort_by_key(|s| s.start_ms);
    let (first, last) = (*ordered.first()?, *ordered.last()?);
    let mut count = 0u64;
    let (mut mean, mut m2) = (0.0f64, 0.0f64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut windows = 0u32;
    for s in &ordered {
        min = min.min(s.min);
        max = max.max(s.max);
        windows = windows.saturating_add(s.windows);
        let (na, nb) = (count as f64, s.count as f64);
        let n = na + nb;
        let delta = s.mean - mean;
        mean += delta * (nb / n);
        m2 += s.stddev * s.stddev * nb + delta * delta * (na * nb / n);
        count = count.saturating_add(s.count);
    }
    Some(Summary {
        series: series.clone(),
        start_ms,
        window_ms,
        count,
        min,
        max,
        mean,
        stddev: (m2 / count as f64).max(0.0).sqrt(),
        first: first.first,
        last: last.last,
        windows,
    })
}

/// One merge found by a [`Planner`]: the records it replaces, in lane order, and the result.
/// The merged record takes the seq (and so the id) of the first; the others are removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    /// Seqs of the replaced records, ascending; at least two.
    pub seqs: Vec<u64>,
    /// Their bytes in the outbox (keys + values).
    pub bytes: u64,
    /// The merged summary.
    pub summary: Summary,
}

/// Groups the records of one compaction pass by (series, coarse window) and turns every
/// group of two or more into a [`Merge`]. Holds what it is offered, so the caller bounds a
/// pass by the number of records it offers.
#[derive(Debug)]
pub struct Planner {
    compact_to_ms: Option<u64>,
    groups: BTreeMap<(String, i64), Group>,
}

#[derive(Debug)]
struct Group {
    coarse_ms: u64,
    seqs: Vec<u64>,
    bytes: u64,
    summaries: Vec<Summary>,
}

impl Planner {
    /// A planner for `buffer.compact_to` (`None`: the default, see [`coarse_window_ms`]).
    pub fn new(compact_to_ms: Option<u64>) -> Planner {
        Planner { compact_to_ms, groups: BTreeMap::new() }
    }

    /// Offers the summary stored at `seq` (`bytes` in the outbox), in lane order. Returns
    /// whether it may merge (a summary of a length that does not divide the coarse window
    /// is left alone).
    pub fn offer(&mut self, seq: u64, summary: Summary, bytes: u64) -> bool {
        // A merged summary is a coarse window already: it merges with the others of its
        // coarse window, never into a coarser one.
        let coarse_ms = if summary.windows > 1 {
            Some(summary.window_ms).filter(|w| *w > 0)
        } else {
            coarse_window_ms(self.compact_to_ms, summary.window_ms)
        };
        let Some(coarse_ms) = coarse_ms else { return false };
        let Some(start) = coarse_start(&summary, coarse_ms) else { return false };
        let key = (summary.series.clone(), start);
        let group = self.groups.entry(key).or_insert_with(|| Group {
            coarse_ms,
            seqs: Vec::new(),
            bytes: 0,
            summaries: Vec::new(),
        });
        if group.coarse_ms != coarse_ms {
            return false;
        }
        group.seqs.push(seq);
        group.bytes += bytes;
        group.summaries.push(summary);
        true
    }

    /// The merges of every group of two or more records, in order of their first seq.
    pub fn merges(self) -> Vec<Merge> {
        let mut merges: Vec<Merge> = self
            .groups
            .into_iter()
            .filter(|(_, group)| group.seqs.len() >= 2)
            .filter_map(|((_, start), group)| {
                let summary = merge(&group.summaries, start, group.coarse_ms)?;
                Some(Merge { seqs: group.seqs, bytes: group.bytes, summary })
            })
            .collect();
        merges.sort_by_key(|m| m.seqs[0]);
        merges
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::SummaryConfig;
    use crate::event::Event;
    use crate::summary::Windows;

    fn summary(series: &str, start_ms: i64, window_ms: u64, values: &[f64]) -> Summary {
        let windows = Windows::new(&SummaryConfig {
            enabled: true,
            window: std::time::Duration::from_millis(window_ms),
            allowed_lateness: std::time::Duration::ZERO,
            max_future: std::time::Duration::from_secs(3600),
        });
        let mut windows = windows.unwrap();
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let ts = start_ms + i as i64;
            let event =
                Event { series: series.into(), ts_ms: ts, value: *v, received_ms: ts, source: 0 };
            windows.on_event(&event, &mut out);
        }
        windows.advance(start_ms + window_ms as i64, &mut out);
        out.pop().unwrap()
    }

    #[test]
    fn the_default_coarse_window_is_five_minutes_or_the_next_multiple_of_the_window() {
        assert_eq!(coarse_window_ms(None, 60_000), Some(300_000));
        assert_eq!(coarse_window_ms(None, 1_000), Some(300_000));
        assert_eq!(coarse_window_ms(None, 7_000), Some(301_000));
        assert_eq!(coarse_window_ms(None, 300_000), Some(600_000), "at least two windows");
        assert_eq!(coarse_window_ms(None, 0), None);
        assert_eq!(coarse_window_ms(Some(10_000), 1_000), Some(10_000));
        assert_eq!(coarse_window_ms(Some(10_000), 3_000), None, "not a multiple");
        assert_eq!(coarse_window_ms(Some(10_000), 10_000), None, "not coarser");
    }

    #[test]
    fn summaries_fall_into_aligned_coarse_windows_also_before_1970() {
        let s = |start_ms| Summary { start_ms, ..summary("s", 0, 1_000, &[1.0]) };
        assert_eq!(coarse_start(&s(12_000), 10_000), Some(10_000));
        assert_eq!(coarse_start(&s(-1_000), 10_000), Some(-10_000));
        assert_eq!(coarse_start(&s(12_500), 10_000), None, "not aligned to its window");
        assert_eq!(coarse_start(&s(12_000), 2_500), None, "the coarse window is no multiple");
    }

    #[test]
    fn a_merge_reports_the_statistics_of_the_union() {
        // 2, 4, 4, 4 | 5, 5, 7, 9: the textbook set with mean 5 and population stddev 2.
        let a = summary("s", 0, 1_000, &[2.0, 4.0, 4.0, 4.0]);
        let b = summary("s", 1_000, 1_000, &[5.0, 5.0, 7.0, 9.0]);
        let m = merge(&[b.clone(), a.clone()], 0, 10_000).unwrap();
        // sqrt of the combined M2 may be one ulp off the exact 2.
        assert!((m.stddev - 2.0).abs() < 1e-12, "{}", m.stddev);
        assert_eq!(
            Summary { stddev: 2.0, ..m.clone() },
            Summary {
                series: "s".into(),
                start_ms: 0,
                window_ms: 10_000,
                count: 8,
                min: 2.0,
                max: 9.0,
                mean: 5.0,
                stddev: 2.0,
                first: 2.0,
                last: 9.0,
                windows: 2,
            }
        );
        // Merging a merged summary again adds up its windows.
        let c = summary("s", 2_000, 1_000, &[5.0]);
        assert_eq!(merge(&[m, c], 0, 10_000).unwrap().windows, 3);
    }

    #[test]
    fn nothing_or_mixed_series_do_not_merge() {
        assert_eq!(merge(&[], 0, 10_000), None);
        let a = summary("a", 0, 1_000, &[1.0]);
        let b = summary("b", 1_000, 1_000, &[1.0]);
        assert_eq!(merge(&[a, b], 0, 10_000), None);
    }

    #[test]
    fn the_planner_merges_each_series_per_coarse_window_in_lane_order() {
        let mut planner = Planner::new(Some(10_000));
        let records = [
            summary("a", 8_000, 1_000, &[1.0]),
            summary("b", 8_000, 1_000, &[2.0]),
            summary("a", 9_000, 1_000, &[3.0]),
            summary("a", 10_000, 1_000, &[4.0]),
            summary("b", 9_000, 1_000, &[5.0]),
            summary("c", 9_000, 1_000, &[6.0]),
            summary("a", 11_000, 1_000, &[7.0]),
            Summary { window_ms: 3_000, ..summary("a", 9_000, 1_000, &[8.0]) },
        ];
        for (seq, s) in records.into_iter().enumerate() {
            planner.offer(seq as u64 + 10, s, 100);
        }
        let merges = planner.merges();
        let got: Vec<_> = merges
            .iter()
            .map(|m| {
                (m.seqs.clone(), m.summary.series.as_str(), m.summary.start_ms, m.summary.count)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![10, 12], "a", 0, 2),
                (vec![11, 14], "b", 0, 2),
                (vec![13, 16], "a", 10_000, 2),
            ]
        );
        assert_eq!(merges[0].bytes, 200);
        assert_eq!((merges[0].summary.first, merges[0].summary.last), (1.0, 3.0));
    }

    /// Relative closeness for statistics of values up to 1e3 in magnitude.
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Events split into 1 s windows, summarised by the real window code, merged (in
        /// random groupings, merged again) give the statistics of one 10 s window over the
        /// union, computed by the same window code.
        #[test]
        fn merged_statistics_equal_those_of_the_union_of_the_events(
            mut events in proptest::collection::vec((0i64..10_000, -1e3f64..1e3), 1..200),
            split in 1usize..4,
        ) {
            // In time order, as a live gateway receives them (ties keep their order).
            events.sort_by_key(|(ts, _)| *ts);
            let mut config = SummaryConfig {
                enabled: true,
                window: std::time::Duration::from_secs(1),
                allowed_lateness: std::time::Duration::ZERO,
                max_future: std::time::Duration::from_secs(3600),
            };
            let run = |config: &SummaryConfig| {
                let mut windows = Windows::new(config).unwrap();
                let mut out = Vec::new();
                for (ts, value) in &events {
                    let event = Event {
                        series: "s".into(),
                        ts_ms: *ts,
                        value: *value,
                        received_ms: *ts,
                        source: 0,
                    };
                    windows.on_event(&event, &mut out);
                }
                windows.advance(100_000, &mut out);
                out
            };
            let mut fine = run(&config);
            config.window = std::time::Duration::from_secs(10);
            let whole = run(&config);
            prop_assert_eq!(whole.len(), 1);
            let whole = &whole[0];
            // Merge in `split` contiguous groups first, then the group results.
            fine.sort_by_key(|s| s.start_ms);
            let size = fine.len().div_ceil(split);
            let partial: Vec<Summary> =
                fine.chunks(size).map(|c| merge(c, 0, 10_000).unwrap()).collect();
            let merged = merge(&partial, 0, 10_000).unwrap();
            prop_assert_eq!(merged.count, whole.count);
            prop_assert_eq!(merged.windows as usize, fine.len());
            prop_assert_eq!((merged.start_ms, merged.window_ms), (0, 10_000));
            prop_assert_eq!((merged.min, merged.max), (whole.min, whole.max));
            prop_assert_eq!((merged.first, merged.last), (whole.first, whole.last));
            prop_assert!(close(merged.mean, whole.mean), "mean {} != {}", merged.mean, whole.mean);
            prop_assert!(
                close(merged.stddev, whole.stddev),
                "stddev {} != {}", merged.stddev, whole.stddev
            );
        }
    }
}
