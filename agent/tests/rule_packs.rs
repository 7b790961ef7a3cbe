//! The rule packs in `config/` on the recordings made for them: the real binary replays each
//! pack (`edgewise replay --format jsonl`) and every alert episode it reports must be one the
//! pack is meant to give — rule, series, raise time within a tolerance, cleared or not (and
//! when) — with nothing more, and the stretches where the pack must stay quiet give nothing.
//!
//! The recordings come from `scripts/gen-recordings.py` (seeded, deterministic); the scenario
//! of each is written in its header and repeated below, where each expectation says how its
//! time follows from the scenario. Tolerances cover the recording's noise, not the rule:
//! timer alerts (missing data) and clean 0/1 signals are expected to the second.
//!
//! # How replay ends a recording
//!
//! Replay inserts a journal tick every `journal.tick_interval` (1 s) of event time, so a
//! `missing_data` rule fires inside a gap of the recording from the ticks alone, at
//! `last reading + timeout`. After the last reading it ticks on for `summary.window +
//! summary.allowed_lateness + 1 ms` so that open summary windows close — and a missing-data
//! timeout shorter than that fires after the end of the recording. The cold chain pack
//! (timeout 10 min, drain 5 min 5 s) is past the end quiet; the patient pack (timeout 30 s,
//! drain 65 s) raises `monitor-offline` 30 s after the last reading, which its expectations
//! list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// 2024-06-10T06:00:00Z, the start of every recording (ms since the Unix epoch).
const T0_MS: i64 = 1_717_999_200_000;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `h:mm:ss` after the start of the recording, in ms since the Unix epoch.
fn at(clock: &str) -> i64 {
    let parts: Vec<i64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
    let [h, m, s] = parts[..] else { panic!("`{clock}` is not h:mm:ss") };
    T0_MS + ((h * 60 + m) * 60 + s) * 1_000
}

/// The inverse of [`at`], for messages.
fn clock(ts_ms: i64) -> String {
    let s = (ts_ms - T0_MS).div_euclid(1_000);
    let sign = if s < 0 { "-" } else { "" };
    let s = s.abs();
    format!("{sign}{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// One alert record of the replay.
#[derive(Debug, Clone)]
struct Record {
    rule: String,
    series: String,
    raised: bool,
    ts_ms: i64,
    value: f64,
}

/// One alert episode: a raise and its clear, if it cleared.
#[derive(Debug, Clone, PartialEq)]
struct Episode {
    raised_ms: i64,
    cleared_ms: Option<i64>,
}

/// Replays `config` on `recording` with the real binary; returns its alert records in order.
fn replay(config: &str, recording: &str) -> Vec<Record> {
    let (config, recording) = (repo_file(config), repo_file(recording));
    let size = std::fs::metadata(&recording).unwrap().len();
    assert!(size < 300 * 1024, "{} is {size} bytes; keep recordings small", recording.display());
    let out = Command::new(env!("CARGO_BIN_EXE_edgewise"))
        .arg("replay")
        .arg("--config")
        .arg(&config)
        .arg("--input")
        .arg(&recording)
        .args(["--format", "jsonl"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay of {} failed:\n{stderr}", config.display());
    assert!(stderr.contains(" 0 rejected lines"), "every line is a reading:\n{stderr}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let record: Value = serde_json::from_str(line).unwrap();
            let alert = record.get("alert")?;
            Some(Record {
                rule: alert["rule"].as_str().unwrap().to_string(),
                series: alert["series"].as_str().unwrap().to_string(),
                raised: match alert["state"].as_str().unwrap() {
                    "raised" => true,
                    "cleared" => false,
                    other => panic!("unknown alert state `{other}`"),
                },
                ts_ms: alert["ts_ms"].as_i64().unwrap(),
                value: alert["value"].as_f64().unwrap(),
            })
        })
        .collect()
}

/// The episodes of `records` by (rule, series), in raise order. Asserts the lifecycle the
/// rules promise: a raise and a clear alternate, starting with a raise.
fn episodes(records: &[Record]) -> BTreeMap<(String, String), Vec<Episode>> {
    let mut by_key: BTreeMap<(String, String), Vec<Episode>> = BTreeMap::new();
    for r in records {
        let episodes = by_key.entry((r.rule.clone(), r.series.clone())).or_default();
        let open = episodes.last_mut().filter(|e| e.cleared_ms.is_none());
        match (r.raised, open) {
            (true, None) => episodes.push(Episode { raised_ms: r.ts_ms, cleared_ms: None }),
            (false, Some(open)) => open.cleared_ms = Some(r.ts_ms),
            _ => panic!(
                "{} on {} at {}: raise and clear must alternate",
                r.rule,
                r.series,
                clock(r.ts_ms)
            ),
        }
    }
    by_key
}

/// The alerts as a table, for failure messages.
fn table(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| {
            let state = if r.raised { "raised" } else { "cleared" };
            format!(
                "  {}  {:<20} {:<24} {:<8} {}\n",
                clock(r.ts_ms),
                r.rule,
                r.series,
                state,
                r.value
            )
        })
        .collect()
}

/// Whether and when an expected episode clears.
#[derive(Debug, Clone, Copy)]
enum Clear {
    /// Still active at the end of the replay.
    No,
    /// Cleared at `h:mm:ss` within a tolerance in seconds.
    At(&'static str, i64),
}

/// An expected episode: `rule` on `series` raised at `h:mm:ss` within `within` seconds.
#[derive(Debug, Clone, Copy)]
struct Expect {
    rule: &'static str,
    series: &'static str,
    raised: &'static str,
    within: i64,
    cleared: Clear,
}

const fn expect(
    rule: &'static str,
    series: &'static str,
    raised: &'static str,
    within: i64,
    cleared: Clear,
) -> Expect {
    Expect { rule, series, raised, within, cleared }
}

/// A stretch of the recording where a device (and so every series and combined alert of it)
/// must give no alert record at all.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    device: &'static str,
    from: &'static str,
    to: &'static str,
    why: &'static str,
}

const fn quiet(
    device: &'static str,
    from: &'static str,
    to: &'static str,
    why: &'static str,
) -> Quiet {
    Quiet { device, from, to, why }
}

/// Asserts that the replay's episodes are exactly `expected` and that no record falls into a
/// quiet stretch.
fn assert_pack(records: &[Record], expected: &[Expect], quiet: &[Quiet]) {
    let shown = table(records);
    let actual = episodes(records);
    let mut wanted: BTreeMap<(String, String), Vec<&Expect>> = BTreeMap::new();
    for e in expected {
        wanted.entry((e.rule.to_string(), e.series.to_string())).or_default().push(e);
    }
    for key in actual.keys() {
        assert!(wanted.contains_key(key), "unexpected alert {key:?}; the replay gave:\n{shown}");
    }
    for (key, wanted) in &wanted {
        let got = actual.get(key).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            got.len(),
            wanted.len(),
            "{key:?}: {} episodes expected, {} found; the replay gave:\n{shown}",
            wanted.len(),
            got.len()
        );
        for (episode, e) in got.iter().zip(wanted) {
            let off = (episode.raised_ms - at(e.raised)).abs();
            assert!(
                off <= e.within * 1_000,
                "{key:?} raised at {}, expected {} ± {} s; the replay gave:\n{shown}",
                clock(episode.raised_ms),
                e.raised,
                e.within
            );
            match (e.cleared, episode.cleared_ms) {
                (Clear::No, None) => {}
                (Clear::At(when, within), Some(cleared)) => {
                    assert!(
                        (cleared - at(when)).abs() <= within * 1_000,
                        "{key:?} cleared at {}, expected {when} ± {within} s; the replay \
                         gave:\n{shown}",
                        clock(cleared)
                    );
                }
                (cleared, got) => panic!(
                    "{key:?} raised at {}: expected clear {cleared:?}, got {:?}; the replay \
                     gave:\n{shown}",
                    e.raised,
                    got.map(clock)
                ),
            }
        }
    }
    for q in quiet {
        let (from, to) = (at(q.from), at(q.to));
        let noisy: Vec<&Record> = records
            .iter()
            .filter(|r| r.series.split('/').next() == Some(q.device))
            .filter(|r| (from..=to).contains(&r.ts_ms))
            .collect();
        assert!(
            noisy.is_empty(),
            "{} must stay quiet from {} to {} ({}), but gave:\n{}",
            q.device,
            q.from,
            q.to,
            q.why,
            table(&noisy.into_iter().cloned().collect::<Vec<_>>())
        );
    }
}

/// The raise of the only episode of (rule, series).
fn raise_of<'a>(records: &'a [Record], rule: &str, series: &str) -> &'a Record {
    let raises: Vec<&Record> =
        records.iter().filter(|r| r.raised && r.rule == rule && r.series == series).collect();
    assert_eq!(raises.len(), 1, "{rule} on {series}: {raises:?}");
    raises[0]
}

#[test]
fn pump_pack_catches_a_failing_bearing_an_overload_and_a_dry_run() {
    let records =
        replay("config/pump-maintenance.toml", "config/recordings/pump-maintenance.jsonl");
    use Clear::{At, No};
    let expected = [
        // pump-1's bearing. At 0:40 the vibration steps from 1.6 to 2.2 mm/s, inside ISO zone
        // B: only the detector sees it, after the 30 s of `for`. It takes the new level as
        // normal about 20 minutes later (the winsorized baseline moves a bounded step per
        // reading) and clears. The growth from 1:00 lifts the score again (held >= 0.9 from
        // about 1:05 to 1:12, before the baseline's trend catches the ramp): that episode
        // starts within `min_interval = "30m"` of this raise, so it is suppressed with its
        // clear — one alert for one developing fault (`--scores` shows it).
        expect("vibration-anomaly", "pump-1/vibration", "0:40:45", 45, At("1:02:00", 300)),
        // The growth: +0.06 mm/s per minute from 2.12 mm/s (the demand cycle is at its
        // trough) passes 2.8 mm/s at about 1:11:20; the 5-minute mean lags 2.5 minutes.
        expect("vibration-high", "pump-1/vibration", "1:13:50", 60, No),
        // The bearing heats from 1:15 by 30 °C with a 12 min time constant: 2.5 °C/min at
        // first, so the rise against the reading up to 10 min old passes 0.5 °C/min when
        // 5 °C are reached, 2.2 min in. It slows below 0.25 °C/min near the plateau.
        expect("bearing-temp-rising", "pump-1/bearing_temp", "1:17:10", 60, At("1:45:00", 300)),
        // 58 + 22 = 80 °C after 15.9 min (1:30:54), then 2 min of `for`.
        expect("bearing-temp-high", "pump-1/bearing_temp", "1:32:54", 60, No),
        // Hot and in zone C: raised with the later of the two, the temperature.
        expect("bearing-failing", "pump-1", "1:32:54", 60, No),
        // pump-2's motor. The overload ramps to +16 A over 1:00-1:02; the 5-minute mean of
        // 31 A passes 44 A about 3 minutes later, and falls below 42 A about 2.5 minutes
        // into the ramp down of 1:23-1:25.
        expect("motor-overload", "pump-2/motor_current", "1:05:00", 60, At("1:25:30", 60)),
        // Dry run from 1:50:00 to 1:58:00 on the 30 s grid: 1 min of `for`, then the first
        // reading back at 31 A clears.
        expect("motor-dry-run", "pump-2/motor_current", "1:51:00", 0, At("1:58:00", 0)),
        // The rough vibration of the dry run is an anomaly from its first reading (+30 s of
        // `for`). Its end is a change too: the detector's baseline moved during the dry run
        // and needs about 20 minutes to accept 1.3 mm/s again.
        expect("vibration-anomaly", "pump-2/vibration", "1:50:30", 30, At("2:17:00", 300)),
    ];
    let quiet = [
        quiet("pump-1", "0:00:00", "0:40:00", "healthy, with the 40-minute demand cycle"),
        quiet("pump-2", "0:00:00", "1:04:00", "healthy; a surge of 56 A and 52 A at 0:25"),
        quiet("pump-2", "1:26:00", "1:50:00", "healthy again after the overload"),
    ];
    assert_pack(&records, &expected, &quiet);
    let hot = raise_of(&records, "bearing-temp-high", "pump-1/bearing_temp");
    let failing = raise_of(&records, "bearing-failing", "pump-1");
    assert_eq!(failing.ts_ms, hot.ts_ms, "all_of raises when its last member does");
    assert_eq!(failing.value, 2.0, "both conditions hold");
}

#[test]
fn cold_chain_pack_tolerates_door_openings_and_catches_warming_power_loss_and_a_stuck_probe() {
    let records = replay("config/cold-chain.toml", "config/recordings/cold-chain.jsonl");
    use Clear::At;
    let expected = [
        // freezer-2's power cut: the last reading is at 1:29:30, the next at 2:15:00. The
        // ticks alone raise the alert at last reading + 10 min, to the second; the first
        // reading after the gap clears it.
        expect("power-loss", "freezer-2/temperature", "1:39:30", 0, At("2:15:00", 0)),
        // freezer-1's door is left ajar from 2:30:00 to 3:00:00: 5 min of `for`.
        expect("door-left-open", "freezer-1/door", "2:35:00", 0, At("3:00:00", 0)),
        // The open door drives the air towards -5 °C. The 30-minute mean passes -17 °C about
        // 12 minutes in; after the door closes it takes most of a window to fall below
        // -18 °C again.
        expect("freezer-warming", "freezer-1/temperature", "2:42:30", 120, At("3:27:00", 180)),
        // Above -15 °C from about 2:32:30; 20 min of `for`. The air is back below -18 °C
        // about 5 minutes after the door closes.
        expect("freezer-too-warm", "freezer-1/temperature", "2:52:30", 60, At("3:05:00", 60)),
        // freezer-2's compressor fails at 3:30 (+0.2 °C/min from about -21.5 °C): the mean
        // passes -17 °C after about 40 minutes, the air passes -15 °C after about 35
        // minutes, + 20 min of `for`. After the repair at 4:45 the compressor pulls the air
        // down at 0.4 °C/min: below -18 °C near 5:12; the mean follows 15 minutes later.
        expect("freezer-warming", "freezer-2/temperature", "4:10:30", 180, At("5:27:30", 180)),
        expect("freezer-too-warm", "freezer-2/temperature", "4:26:30", 120, At("5:12:00", 120)),
        // freezer-1's probe sticks at 4:30:00 and is freed at 5:15:00: 30 min of `for` from
        // the first stuck reading (one reading earlier if the last real one read the same).
        expect("sensor-stuck", "freezer-1/temperature", "5:00:00", 30, At("5:15:00", 0)),
    ];
    let quiet = [
        quiet(
            "freezer-1",
            "0:00:00",
            "2:34:59",
            "door openings of 2 and 3 minutes at 0:40, 1:30, 1:40",
        ),
        quiet("freezer-1", "3:27:01", "4:59:59", "recovered; the stuck probe not yet 30 minutes"),
        quiet("freezer-1", "5:15:01", "6:10:00", "healthy to the end of the replay"),
        quiet("freezer-2", "0:00:00", "1:39:29", "healthy"),
        quiet("freezer-2", "2:15:01", "4:07:00", "power back at -19 °C; door open 2.5 min at 3:10"),
        // The replay ticks on for 5 min 5 s after the last reading (1 s before 6:00:00) to
        // close the 5-minute summaries: less than the 10-minute timeout, so `power-loss`
        // stays quiet past the end.
        quiet(
            "freezer-2",
            "5:27:31",
            "6:10:00",
            "recovered; the end of the recording is not a power cut",
        ),
    ];
    assert_pack(&records, &expected, &quiet);
    let lost = raise_of(&records, "power-loss", "freezer-2/temperature");
    assert_eq!(lost.value, 600.0, "the silence at detection, in seconds");
}

#[test]
fn patient_pack_waits_out_artefacts_and_calls_once_per_bed_episode() {
    let records =
        replay("config/patient-monitoring.toml", "config/recordings/patient-monitoring.csv");
    use Clear::{At, No};
    let expected = [
        // bed-12, desaturation A: SpO2 96.6 falls by 10 over 8:00-8:30 and is below 90 from
        // about 8:21; + 15 s of `for`. Back above 92 near 10:16 on the way up (10:00-10:30).
        expect("spo2-low", "bed-12/spo2", "0:08:36", 10, At("0:10:17", 10)),
        // Episode B: the heart rate climbs 80 -> 138 over 14:00-15:00 and passes 120 near
        // 14:41 (+ 30 s); SpO2 falls 9 over 15:00-15:30, below 90 near 15:22 (+ 15 s).
        // Down again over 18:00-19:00 (below 110 near 18:29) and 17:00-17:30 (above 92
        // near 17:15).
        expect("tachycardia", "bed-12/heart_rate", "0:15:12", 10, At("0:18:30", 10)),
        expect("spo2-low", "bed-12/spo2", "0:15:37", 10, At("0:17:15", 10)),
        // The probe slips off at 23:00 and the monitor holds the reading of 22:59, so the
        // flat run starts at 22:59: + 1 min. The first reading with the probe back (25:00)
        // always differs.
        expect("probe-off", "bed-12/heart_rate", "0:23:59", 1, At("0:25:00", 0)),
        // One nurse call per episode: A alone; B from the tachycardia's raise to its clear
        // (the desaturation inside it adds no call); the probe.
        expect("needs-attention", "bed-12", "0:08:36", 10, At("0:10:17", 10)),
        expect("needs-attention", "bed-12", "0:15:12", 10, At("0:18:30", 10)),
        expect("needs-attention", "bed-12", "0:23:59", 1, At("0:25:00", 0)),
        // The end of the recording: the last readings are at 29:59 and the replay ticks on
        // for 65 s, so `monitor-offline` raises 30 s after them and stays up.
        expect("monitor-offline", "bed-12/heart_rate", "0:30:29", 0, No),
        expect("monitor-offline", "bed-12/spo2", "0:30:29", 0, No),
        // bed-14, bradycardia: 64 -> 36 over 11:00-11:20, below 40 near 11:17 (+ 10 s); back
        // over 12:00-12:20, above 45 near 12:06.
        expect("heart-rate-low", "bed-14/heart_rate", "0:11:27", 10, At("0:12:07", 10)),
        expect("needs-attention", "bed-14", "0:11:27", 10, At("0:12:07", 10)),
        // The monitor is off the network after its reading at 20:00 until 21:31: raised at
        // 20:30 on the ticks alone, cleared by the first reading back (91 s of silence).
        // Its silence at the end of the recording would raise again at 30:29, 9 min 59 s
        // after this raise: inside `min_interval = "10m"`, so suppressed with its clear.
        expect("monitor-offline", "bed-14/heart_rate", "0:20:30", 0, At("0:21:31", 0)),
        expect("monitor-offline", "bed-14/spo2", "0:20:30", 0, At("0:21:31", 0)),
    ];
    let quiet = [
        quiet(
            "bed-12",
            "0:00:00",
            "0:08:20",
            "breath hold at 3:00 (SpO2 88 for 8 s), cough at 5:00 (126 bpm for 15 s)",
        ),
        quiet("bed-12", "0:18:41", "0:23:50", "recovered"),
        quiet("bed-12", "0:25:01", "0:30:28", "probe back on"),
        quiet("bed-14", "0:00:00", "0:11:15", "probe moved at 6:00 (SpO2 89 for 10 s)"),
        quiet("bed-14", "0:12:20", "0:20:29", "recovered"),
        quiet(
            "bed-14",
            "0:21:32",
            "0:32:00",
            "back on the network; the end is within min_interval",
        ),
    ];
    assert_pack(&records, &expected, &quiet);
    let offline = raise_of(&records, "monitor-offline", "bed-14/spo2");
    assert_eq!(offline.value, 30.0, "the silence at detection, in seconds");
}
