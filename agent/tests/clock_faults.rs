//! Clock faults (issue 7, DESIGN guarantee 6: "time is untrusted"): the processor, through its
//! public API, fed what a gateway sees when clocks misbehave — a boot in 1970 before NTP, a
//! step forward by a year and back, a step back by an hour, a device stamping ten years ahead,
//! timestamps at the ends of `i64`.
//!
//! Two clocks are involved and the tests keep them apart:
//!
//! - the **gateway clock** (`received_ms` of events, `Tick { now_ms }` entries): the processor's
//!   clock is its high-water mark; it closes windows and fires `missing_data` timers;
//! - the **event time** (`ts_ms`, from the device): it picks the window and drives the
//!   event-time rules (threshold `for`, rate, window rule).
//!
//! Every case asserts figures: how many summaries and alerts came out (against a bound derived
//! from the traffic, not from the code), how many readings were counted late or future, and
//! that the open windows and tracked series stay within their caps. The traffic is the live
//! agent's: a tick per second (`journal.tick_interval`) and a reading every 5 s per series.

use std::collections::BTreeSet;

use edgewise::config::Config;
use edgewise::event::{Entry, Event};
use edgewise::metrics::{self, Metrics};
use edgewise::processor::{Output, Processor};
use edgewise::summary::MAX_OPEN_WINDOWS_PER_SERIES;
use sensors::record::{AlertState, RecordBody};

/// A gateway's configuration: one-minute summaries and one rule of each kind the faults can
/// reach through a clock (event time: threshold `for`, rate, window; gateway time:
/// missing data).
const CONFIG: &str = r##"
    [agent]
    id = "gw-clock"

    [upstream]
    kind = "file"
    path = "/dev/null"

    [journal]
    tick_interval = "1s"

    [summary]
    window = "60s"
    allowed_lateness = "5s"
    max_future = "5m"

    [[rules]]
    kind = "threshold"
    name = "hot"
    series = "+/temperature"
    above = 80.0
    clear = 70.0
    for = "10s"

    [[rules]]
    kind = "rate_of_change"
    name = "jump"
    series = "+/temperature"
    max_rate = 20.0
    per = "1m"

    [[rules]]
    kind = "missing_data"
    name = "silent"
    series = "#"
    timeout = "30s"

    [[rules]]
    kind = "window"
    name = "shaky"
    series = "+/vibration"
    window = "5m"
    aggregate = "mean"
    above = 7.0
    clear = 6.0
"##;

/// Summary window length of [`CONFIG`], ms.
const WINDOW_MS: i64 = 60_000;
/// A reading every 5 s per series.
const PERIOD_S: i64 = 5;
/// 2026-03-01T06:00:00Z, the real time when the gateway boots (a multiple of the window).
const REAL_BOOT_MS: i64 = 1_772_344_800_000;
/// 365 days.
const YEAR_MS: i64 = 365 * 24 * 3_600_000;

/// The plant: four series and their steady readings. `pump-2` runs hot (the `hot` threshold is
/// up all along) and `pump-1` vibrates (the `shaky` window mean is up all along): a clock fault
/// must neither clear nor raise these again.
const PLANT: [(&str, f64); 4] = [
    ("pump-1/temperature", 45.0),
    ("pump-2/temperature", 85.0),
    ("fan-1/temperature", 30.0),
    ("pump-1/vibration", 8.0),
];

/// The processor with its metrics, a journal seq counter and every record it produced.
struct Gateway {
    processor: Processor,
    metrics: Metrics,
    seq: u64,
    records: Vec<Output>,
}

impl Gateway {
    fn new() -> Gateway {
        Gateway::with(&Config::from_toml(CONFIG).expect("the test configuration parses"))
    }

    fn with(config: &Config) -> Gateway {
        Gateway {
            processor: Processor::new(config).expect("the test configuration compiles"),
            metrics: Metrics::default(),
            seq: 0,
            records: Vec::new(),
        }
    }

    /// Applies one entry; returns the records it produced (also kept in `records`).
    fn apply(&mut self, entry: &Entry) -> Vec<Output> {
        self.seq += 1;
        let mut out = Vec::new();
        self.processor.apply(self.seq, entry, &self.metrics, &mut out);
        self.records.extend(out.iter().cloned());
        out
    }

    fn tick(&mut self, now_ms: i64) -> Vec<Output> {
        self.apply(&Entry::Tick { now_ms })
    }

    fn event(&mut self, series: &str, ts_ms: i64, value: f64, received_ms: i64) -> Vec<Output> {
        let event = Event { series: series.into(), ts_ms, value, received_ms, source: 0 };
        self.apply(&Entry::Event(event))
    }

    /// `seconds` of live operation from gateway time `from_ms`: a tick every second and, every
    /// [`PERIOD_S`], one reading per series of `plant` stamped `stamp(series, gateway time)`.
    /// Returns the records and the number of readings fed.
    fn run(
        &mut self,
        plant: &[(&str, f64)],
        from_ms: i64,
        seconds: i64,
        stamp: impl Fn(&str, i64) -> i64,
    ) -> (Vec<Output>, u64) {
        let mut out = Vec::new();
        let mut readings = 0;
        for s in 0..seconds {
            let now = from_ms + s * 1_000;
            out.extend(self.tick(now));
            if s % PERIOD_S == 0 {
                for (i, &(series, value)) in plant.iter().enumerate() {
                    // A little noise, well inside every level's band.
                    let value = value + ((s / PERIOD_S + i as i64) % 3) as f64 * 0.1;
                    out.extend(self.event(series, stamp(series, now), value, now));
                    readings += 1;
                }
            }
        }
        (out, readings)
    }

    fn late(&self) -> u64 {
        metrics::get(&self.metrics.late_events)
    }

    fn future(&self) -> u64 {
        metrics::get(&self.metrics.future_events)
    }

    /// Checks the caps that hold whatever the clocks do: at most
    /// [`MAX_OPEN_WINDOWS_PER_SERIES`] open windows per series, no more tracked series than
    /// the plant has, and the snapshot round-trips (the state stays encodable).
    fn assert_bounded(&self, series: usize) {
        let stats = self.processor.stats();
        assert!(stats.open_windows <= series * MAX_OPEN_WINDOWS_PER_SERIES, "{stats:?}");
        assert!(stats.series <= series, "{stats:?}");
        let config = Config::from_toml(CONFIG).unwrap();
        let bytes = self.processor.snapshot();
        let restored = Processor::restore(&config, &bytes).expect("the snapshot restores");
        assert_eq!(restored.snapshot(), bytes);
    }
}

/// The number of summary records in `out`.
fn summaries(out: &[Output]) -> usize {
    out.iter().filter(|o| matches!(o.body, RecordBody::Summary(_))).count()
}

/// `(rule, series)` of the alert records of `out` in `state`, in order.
fn alerts(out: &[Output], state: AlertState) -> Vec<(String, String)> {
    out.iter()
        .filter_map(|o| match &o.body {
            RecordBody::Alert(a) if a.state == state => Some((a.rule.clone(), a.series.clone())),
            _ => None,
        })
        .collect()
}

fn raised(out: &[Output]) -> Vec<(String, String)> {
    alerts(out, AlertState::Raised)
}

fn cleared(out: &[Output]) -> Vec<(String, String)> {
    alerts(out, AlertState::Cleared)
}

fn pair(rule: &str, series: &str) -> (String, String) {
    (rule.to_string(), series.to_string())
}

/// The two alerts the plant raises once in its first minute and keeps up: `hot` on pump-2
/// (after its `for` of 10 s) and `shaky` on pump-1's vibration.
fn plant_alerts() -> Vec<(String, String)> {
    vec![pair("shaky", "pump-1/vibration"), pair("hot", "pump-2/temperature")]
}

/// At most how many summaries `series` series of in-order traffic produce over `seconds`:
/// one per window they touch, i.e. `seconds / 60 + 2` per series (a partial window at each
/// end). A clock fault must not add per-empty-window records on top of that.
fn summary_bound(series: usize, seconds: i64) -> usize {
    series * (seconds / (WINDOW_MS / 1_000) + 2) as usize
}

/// Stamps every reading with the gateway time (devices without a clock of their own).
fn gateway_time(_: &str, now: i64) -> i64 {
    now
}

/// (a) A gateway without RTC boots in 1970 (its clock is its uptime) and runs 10 minutes;
/// then NTP sets the clock to 2026 and it runs 10 more minutes. Readings are stamped with the
/// gateway clock, except `cabinet-1`, which has an RTC of its own and stamps real time all
/// along; one reading stamped before the step arrives after it.
#[test]
fn a_boot_in_1970_then_ntp_closes_the_1970_windows_once_and_raises_nothing() {
    let mut gw = Gateway::new();
    let cabinet = ("cabinet-1/temperature", 20.0);
    let plant: Vec<(&str, f64)> = PLANT.iter().copied().chain([cabinet]).collect();
    let stamp = |series: &str, now: i64| {
        if series == cabinet.0 {
            // Its RTC knows the real time: boot time + uptime, however the gateway is set.
            if now < REAL_BOOT_MS { REAL_BOOT_MS + now } else { now }
        } else {
            now
        }
    };

    // Before NTP: uptime 25 s to 625 s. 120 rounds of 5 readings.
    let boot_ms = 25_000;
    let (before, fed) = gw.run(&plant, boot_ms, 600, stamp);
    assert_eq!(fed, 600);
    // cabinet-1's readings are 56 years ahead of a clock in 1970: all future, none windowed.
    assert_eq!(gw.future(), 120);
    // Windows [0, 60 s) ... [540 s, 600 s) closed by the 1970 clock (last tick 624 s): 10
    // per gateway-stamped series.
    assert_eq!(summaries(&before), 4 * 10);
    assert_eq!(raised(&before), plant_alerts());
    let open_before_step = gw.processor.stats().open_windows;
    assert_eq!(open_before_step, 4, "[600 s, 660 s) of each 1970 series");

    // NTP: the gateway clock steps from 1970 + 625 s to 2026 + 625 s in one tick.
    let step = gw.tick(REAL_BOOT_MS + 625_000);
    // The 1970 windows close, once each: not one record per empty minute of the 56 years
    // (29 million windows).
    assert_eq!(summaries(&step), open_before_step);
    assert!(raised(&step).is_empty(), "the step is not silence: {:?}", raised(&step));
    assert_eq!(gw.processor.stats().open_windows, 0);
    // A reading a device stamped just before the step and delivered just after: late.
    let in_flight = gw.event("pump-1/temperature", 620_000, 45.0, REAL_BOOT_MS + 626_000);
    assert!(in_flight.is_empty(), "{in_flight:?}");
    assert_eq!(gw.late(), 1);

    // After NTP: 10 minutes in 2026 from 627 s on; every series windows normally.
    let (after, fed) = gw.run(&plant, REAL_BOOT_MS + 627_000, 600, stamp);
    assert_eq!(fed, 600);
    let n = summaries(&after);
    assert!(n >= 5 * 9 && n <= summary_bound(5, 600), "{n} summaries");
    assert!(raised(&after).is_empty(), "{:?}", raised(&after));
    assert!(cleared(&after).is_empty(), "{:?}", cleared(&after));
    assert_eq!((gw.future(), gw.late()), (120, 1));

    assert_eq!(raised(&gw.records), plant_alerts(), "each raised once in all");
    assert_eq!(gw.processor.stats().active_alerts, 2);
    gw.assert_bounded(5);
}

/// (b) The gateway clock steps a year forward for two minutes (a bad RTC read, a wrong manual
/// `date -s`), then NTP steps it back.
#[test]
fn a_year_forward_and_back_closes_windows_once_and_raises_nothing() {
    let mut gw = Gateway::new();
    let (first, _) = gw.run(&PLANT, REAL_BOOT_MS, 300, gateway_time);
    assert_eq!(summaries(&first), 4 * 4, "[0, 4 min) closed by 305 s: 4 per series");
    assert_eq!(raised(&first), plant_alerts());
    let open = gw.processor.stats().open_windows;

    // A year ahead for two minutes.
    let ahead = REAL_BOOT_MS + YEAR_MS + 300_000;
    let step = gw.tick(ahead);
    assert_eq!(summaries(&step), open, "the open windows close once each");
    assert!(raised(&step).is_empty(), "the step is not silence: {:?}", raised(&step));
    let (year_ahead, fed) = gw.run(&PLANT, ahead + 1_000, 120, gateway_time);
    assert_eq!(fed, 4 * 24);
    assert!(summaries(&year_ahead) <= summary_bound(4, 120));

    // NTP steps back to the real time (real time went on by 2 min 1 s meanwhile). The clock
    // holds its high-water mark (a year ahead): the next ten minutes of readings are late —
    // counted, passed to the rules, but reopening no window — and the timers do not fire.
    let late_before = gw.late();
    let summaries_before = summaries(&gw.records);
    let (back, fed) = gw.run(&PLANT, REAL_BOOT_MS + 421_000, 600, gateway_time);
    assert_eq!(fed, 4 * 120);
    assert_eq!(gw.late() - late_before, fed, "every reading after the step back is late");
    assert_eq!(summaries(&back), 0);
    assert_eq!(summaries(&gw.records), summaries_before);
    assert!(raised(&back).is_empty() && cleared(&back).is_empty(), "{back:?}");

    // In all: the plant's two alerts, raised once, never cleared or raised again.
    assert_eq!(raised(&gw.records), plant_alerts());
    assert!(cleared(&gw.records).is_empty());
    let total = summaries(&gw.records);
    assert!(total <= summary_bound(4, 300) + summary_bound(4, 120), "{total} summaries");
    gw.assert_bounded(4);
}

/// (b') The same year, but for a single tick (a glitch): the series are heard of at the real
/// time again right after, while the processor's clock stays a year ahead. Before the fix this
/// raised and cleared `missing_data` on every reading of every series (2 alerts per reading).
#[test]
fn a_one_tick_glitch_a_year_ahead_raises_no_alert_storm() {
    let mut gw = Gateway::new();
    gw.run(&PLANT, REAL_BOOT_MS, 300, gateway_time);
    let alerts_before = gw.records.len() - summaries(&gw.records);
    assert_eq!(alerts_before, 2, "the plant's two alerts");

    let glitch = gw.tick(REAL_BOOT_MS + YEAR_MS);
    assert!(raised(&glitch).is_empty(), "{:?}", raised(&glitch));
    let (after, fed) = gw.run(&PLANT, REAL_BOOT_MS + 301_000, 600, gateway_time);
    assert_eq!(fed, 480);
    let storm = raised(&after).len() + cleared(&after).len();
    assert_eq!(storm, 0, "alerts after the glitch: {:?}", raised(&after));
    assert_eq!(gw.late(), fed, "the clock holds a year ahead: every reading is late");
    gw.assert_bounded(4);
}

/// (c) NTP steps the gateway clock back by one hour (a wrong time zone fixed); the gateway
/// runs 70 minutes, past the point where its clock catches up with the old high-water mark.
#[test]
fn an_hour_back_holds_the_clock_until_real_time_catches_up() {
    let mut gw = Gateway::new();
    let (first, _) = gw.run(&PLANT, REAL_BOOT_MS, 600, gateway_time);
    assert_eq!(summaries(&first), 4 * 9, "[0, 9 min) closed by 605 s");
    assert_eq!(gw.processor.stats().open_windows, 4);

    let back = REAL_BOOT_MS + 600_000 - 3_600_000;
    let mut late_at_catch_up = 0;
    let mut hour = Vec::new();
    let mut rest = Vec::new();
    let mut fed = 0;
    for minute in 0..70 {
        let from = back + minute * 60_000;
        let (out, n) = gw.run(&PLANT, from, 60, gateway_time);
        fed += n;
        if minute < 60 {
            hour.extend(out);
            late_at_catch_up = gw.late();
        } else {
            rest.extend(out);
        }
    }
    assert_eq!(fed, 70 * 48);
    // The hour behind the high-water mark: readings before [9 min, 10 min) are late (its
    // window is still open, it takes the last minute's); nothing closes, nothing fires.
    assert_eq!(late_at_catch_up, 59 * 48);
    assert_eq!(summaries(&hour), 0);
    assert!(raised(&hour).is_empty() && cleared(&hour).is_empty(), "{hour:?}");
    assert_eq!(gw.processor.stats().open_windows, 4, "never more than before the step");
    // Caught up: windowing goes on from the old high-water mark, 10 windows per series in
    // the last 10 minutes (the held one [9 min, 10 min) included), no late reading.
    assert_eq!(summaries(&rest), 4 * 10);
    assert_eq!(gw.late(), late_at_catch_up);
    assert!(raised(&rest).is_empty() && cleared(&rest).is_empty(), "{rest:?}");
    assert_eq!(raised(&gw.records), plant_alerts());
    gw.assert_bounded(4);
}

/// (d) Among normal devices, `cabinet-9` stamps every reading ten years ahead, `fan-1`'s
/// flaky RTC stamps every third one ten years ahead, and `pump-3` runs four minutes fast
/// (inside `max_future`).
#[test]
fn devices_stamping_the_future_are_rejected_or_bounded_without_moving_the_clock() {
    let mut gw = Gateway::new();
    let plant: Vec<(&str, f64)> = PLANT
        .iter()
        .copied()
        .chain([("cabinet-9/temperature", 20.0), ("pump-3/temperature", 50.0)])
        .collect();
    let flaky = std::cell::Cell::new(0u32);
    let stamp = |series: &str, now: i64| match series {
        "cabinet-9/temperature" => now + 10 * YEAR_MS,
        "pump-3/temperature" => now + 4 * 60_000,
        "fan-1/temperature" => {
            flaky.set(flaky.get() + 1);
            if flaky.get().is_multiple_of(3) { now + 10 * YEAR_MS } else { now }
        }
        _ => now,
    };
    let seconds = 900;
    let (out, fed) = gw.run(&plant, REAL_BOOT_MS, seconds, stamp);
    assert_eq!(fed, 6 * 180);
    assert_eq!(gw.future(), 180 + 60, "all of cabinet-9's, a third of fan-1's");
    assert_eq!(gw.late(), 0, "far-future stamps did not move the clock");

    let starts: BTreeSet<(String, i64)> = out
        .iter()
        .filter_map(|o| match &o.body {
            RecordBody::Summary(s) => Some((s.series.clone(), s.start_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), summaries(&out), "one summary per (series, window)");
    assert!(starts.iter().all(|(series, _)| series != "cabinet-9/temperature"));
    let last_start = REAL_BOOT_MS + seconds * 1_000 + 4 * 60_000;
    assert!(starts.iter().all(|&(_, start)| start <= last_start), "{starts:?}");
    // pump-3's windows are 4 min ahead: 5 would be open at once, the cap closes the oldest
    // early, one summary each still.
    let pump3 = starts.iter().filter(|(s, _)| s == "pump-3/temperature").count();
    assert!((11..=16).contains(&pump3), "{pump3} summaries of pump-3");
    assert!(summaries(&out) <= summary_bound(5, seconds + 240), "{}", summaries(&out));

    // cabinet-9 never reached the rules, so it is not "silent" either; fan-1 is heard of
    // every 15 s, inside the 30 s timeout. No alert but the plant's.
    assert_eq!(raised(&out), plant_alerts());
    assert!(cleared(&out).is_empty());
    let stats = gw.processor.stats();
    assert!(stats.open_windows <= 4 * 2 + MAX_OPEN_WINDOWS_PER_SERIES, "{stats:?}");
    gw.assert_bounded(5);
}

/// (e) Timestamps at the ends of `i64`, negative ones, and a gateway clock set to either end:
/// nothing panics (the test profile checks overflow), and nothing storms.
#[test]
fn timestamps_at_the_ends_of_i64_neither_panic_nor_storm() {
    let extremes =
        [i64::MIN, i64::MIN + 1, -REAL_BOOT_MS, -1, 0, 1, i64::MAX - 1, i64::MAX, REAL_BOOT_MS];

    // A fresh processor whose first entries sit at the ends of time.
    for first in extremes {
        let mut gw = Gateway::new();
        gw.tick(first);
        gw.event("pump-1/temperature", first, 45.0, first);
        gw.event("pump-2/temperature", i64::MAX - first.max(0), 85.0, first);
        gw.tick(first.saturating_add(1));
        gw.run(&PLANT, REAL_BOOT_MS, 60, gateway_time);
        assert!(gw.records.len() <= summary_bound(4, 60) + 2 + 4, "{:?}", gw.records);
        gw.assert_bounded(4);
    }

    // Devices stamping the ends of time while the gateway clock is right.
    let mut gw = Gateway::new();
    gw.run(&PLANT, REAL_BOOT_MS, 120, gateway_time);
    let (late, future) = (gw.late(), gw.future());
    let mut fed = 0;
    for (k, ts) in extremes.into_iter().enumerate() {
        let now = REAL_BOOT_MS + 120_000 + k as i64;
        // The right time for the right one.
        let ts = if ts == REAL_BOOT_MS { now } else { ts };
        for (series, value) in PLANT {
            gw.event(series, ts, value, now);
            fed += 1;
        }
    }
    // Per series: 6 stamps before [1 min, 2 min) are late, i64::MAX - 1 and i64::MAX are
    // future, the right time is merged.
    assert_eq!((gw.late() - late, gw.future() - future), (4 * 6, 4 * 2));
    assert_eq!(fed, 4 * extremes.len() as u64);
    gw.assert_bounded(4);

    // The gateway clock jumps to the end of time, and comes back.
    let open = gw.processor.stats().open_windows;
    let end = gw.tick(i64::MAX);
    assert_eq!(summaries(&end), open, "every open window closes, once");
    assert!(raised(&end).is_empty(), "{:?}", raised(&end));
    gw.tick(i64::MIN);
    let (after, fed) = gw.run(&PLANT, REAL_BOOT_MS + 200_000, 300, gateway_time);
    assert_eq!(fed, 240);
    assert_eq!(summaries(&after), 0, "a clock at i64::MAX closes nothing more");
    let storm = raised(&after).len() + cleared(&after).len();
    assert_eq!(storm, 0, "{:?}", raised(&after));
    assert_eq!(raised(&gw.records), plant_alerts());
    gw.assert_bounded(4);
}
