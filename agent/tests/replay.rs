//! `edgewise replay` and `edgewise journal export` as a technician meets them: the real binary
//! on recordings in temp dirs. Expected alerts and summaries are computed here, by a model
//! written from the rules' documentation, not by the agent's code.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

fn edgewise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewise"))
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `edgewise replay` with `args`; asserts it succeeded.
fn replay(args: &[&str]) -> Output {
    let out = edgewise().arg("replay").args(args).output().unwrap();
    assert!(out.status.success(), "replay {args:?} failed:\n{}", text(&out.stderr));
    out
}

/// The number before ` events,` in the closing counts line.
fn events_counted(counts: &str) -> u64 {
    let line = counts.lines().rev().find(|l| l.contains(" events, ")).expect("a counts line");
    let before = line.split(" events, ").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A threshold rule as documented: breach is `value > above`; the breach must hold by event
/// time for `for_ms` (any non-breaching event while pending resets); an active alert clears
/// at the first value below `clear`.
fn threshold_model(
    readings: &[(i64, f64)],
    above: f64,
    clear: f64,
    for_ms: i64,
) -> Vec<(String, i64)> {
    let mut transitions = Vec::new();
    let (mut since, mut active) = (None::<i64>, false);
    for &(ts, v) in readings {
        if active {
            if v < clear {
                active = false;
                transitions.push(("cleared".to_string(), ts));
            }
            continue;
        }
        if v > above {
            let start = *since.get_or_insert(ts);
            if ts - start >= for_ms {
                active = true;
                since = None;
                transitions.push(("raised".to_string(), ts));
            }
        } else {
            since = None;
        }
    }
    transitions
}

/// Tumbling windows: (series, start) → (count, min, max, mean).
fn summary_model(
    readings: &[(String, i64, f64)],
    window_ms: i64,
) -> BTreeMap<(String, i64), (u64, f64, f64, f64)> {
    let mut groups: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
    for (series, ts, v) in readings {
        groups.entry((series.clone(), ts - ts.rem_euclid(window_ms))).or_default().push(*v);
    }
    groups
        .into_iter()
        .map(|(key, values)| {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            (key, (values.len() as u64, min, max, mean))
        })
        .collect()
}

/// The alerts of a JSON-lines replay as (rule, series, state, ts_ms).
fn alerts_of(stdout: &str) -> Vec<(String, String, String, i64)> {
    stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| {
            let a = v.get("alert")?;
            Some((
                a["rule"].as_str()?.to_string(),
                a["series"].as_str()?.to_string(),
                a["state"].as_str()?.to_string(),
                a["ts_ms"].as_i64()?,
            ))
        })
        .collect()
}

fn summaries_of(stdout: &str) -> BTreeMap<(String, i64), (u64, f64, f64, f64)> {
    stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| {
            let s = v.get("summary")?;
            let key = (s["series"].as_str()?.to_string(), s["start_ms"].as_i64()?);
            let stats =
                (s["count"].as_u64()?, s["min"].as_f64()?, s["max"].as_f64()?, s["mean"].as_f64()?);
            Some((key, stats))
        })
        .collect()
}

const T0: i64 = 1_718_000_000_000; // 2024-06-10T06:13:20Z, a multiple of 10 s

/// A replay-only configuration (no source needed): one threshold rule, 10 s summaries.
fn threshold_config(dir: &Path, name: &str, above: f64, for_: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"[agent]
id = "replay-test"
data_dir = "{data}"

[[rules]]
kind = "threshold"
name = "hot"
series = "+/temperature"
above = {above:.1}
clear = 40.0
for = "{for_}"

[summary]
window = "10s"
allowed_lateness = "2s"

[upstream]
kind = "file"
path = "{out}"
"#,
            data = dir.join("data").display(),
            out = dir.join("upstream.jsonl").display(),
        ),
    )
    .unwrap();
    path
}

/// Two pumps, one reading a second for two minutes: pump-1 has a plateau at 60–61 and a
/// short bump to 55; pump-2 one excursion to 70.
fn two_pumps() -> Vec<(String, i64, f64)> {
    let mut readings = Vec::new();
    for i in 0..120i64 {
        let ts = T0 + i * 1_000;
        let p1 = match i {
            20..=22 => 45.0 + (i - 19) as f64 * 5.0, // 50, 55, 60: crosses 50 at 55
            23..=40 => 60.0 + (i % 2) as f64,
            41 => 45.0, // hysteresis band: stays active
            70..=73 => 55.0,
            _ => 30.0 + (i % 5) as f64 * 0.5,
        };
        let p2 = if (90..100).contains(&i) { 70.0 } else { 20.0 };
        readings.push(("pump-1/temperature".to_string(), ts, p1));
        readings.push(("pump-2/temperature".to_string(), ts, p2));
    }
    readings
}

fn model_alerts(
    readings: &[(String, i64, f64)],
    above: f64,
    for_ms: i64,
) -> Vec<(String, String, String, i64)> {
    let mut expected = Vec::new();
    for series in ["pump-1/temperature", "pump-2/temperature"] {
        let own: Vec<(i64, f64)> =
            readings.iter().filter(|r| r.0 == series).map(|r| (r.1, r.2)).collect();
        for (state, ts) in threshold_model(&own, above, 40.0, for_ms) {
            expected.push(("hot".to_string(), series.to_string(), state, ts));
        }
    }
    expected.sort_by_key(|a| (a.3, a.1.clone()));
    expected
}

#[test]
fn a_json_lines_recording_gives_the_modelled_alerts_and_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let config = threshold_config(dir.path(), "c.toml", 50.0, "2s");
    let readings = two_pumps();
    let input = dir.path().join("two-pumps.jsonl");
    let lines: Vec<String> = readings
        .iter()
        .enumerate()
        .map(|(i, (series, ts, v))| match i % 3 {
            // All three timestamp spellings.
            0 => format!(r#"{{"ts": {ts}, "series": "{series}", "value": {v}}}"#),
            1 => format!(r#"{{"ts_ms": {ts}, "series": "{series}", "value": "{v}"}}"#),
            _ => format!(r#"{{"timestamp": {}, "series": "{series}", "value": {v}}}"#, ts / 1000),
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();

    let out = replay(&[
        "-c",
        config.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "--format",
        "jsonl",
    ]);
    let stdout = text(&out.stdout);

    let mut alerts = alerts_of(&stdout);
    alerts.sort_by_key(|a| (a.3, a.1.clone()));
    let expected = model_alerts(&readings, 50.0, 2_000);
    assert_eq!(expected.len(), 6, "the model sees three episodes: {expected:?}");
    assert_eq!(alerts, expected);

    let summaries = summaries_of(&stdout);
    let model = summary_model(&readings, 10_000);
    assert_eq!(summaries.keys().collect::<Vec<_>>(), model.keys().collect::<Vec<_>>());
    for (key, (count, min, max, mean)) in &model {
        let got = summaries[key];
        assert_eq!((got.0, got.1, got.2), (*count, *min, *max), "{key:?}");
        assert!((got.3 - mean).abs() < 1e-9, "{key:?}: mean {} vs {mean}", got.3);
    }
    let stderr = text(&out.stderr);
    assert_eq!(events_counted(&stderr), readings.len() as u64, "{stderr}");
    assert!(stderr.contains("0 rejected lines, 3 alerts raised, 3 cleared"), "{stderr}");
    assert!(stderr.contains(&format!("{} summaries", model.len())), "{stderr}");
}

/// Reads the shipped CSV recording with a parser of its own: RFC 3339 UTC seconds only.
fn read_shipped_csv(path: &Path) -> Vec<(String, i64, f64)> {
    fn epoch_ms(t: &str) -> i64 {
        // 2024-06-10T06:MM:SSZ: the recording lies within one hour of one day.
        assert!(t.starts_with("2024-06-10T06:") && t.ends_with('Z'), "{t}");
        let minutes: i64 = t[14..16].parse().unwrap();
        let seconds: i64 = t[17..19].parse().unwrap();
        1_717_999_200_000 + (minutes * 60 + seconds) * 1_000 // 2024-06-10T06:00:00Z
    }
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), epoch_ms(f[0]), f[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn the_shipped_csv_recording_replays_against_the_demo_rules_as_modelled() {
    let recording = repo_file("config/recordings/pump-1.csv");
    let config = repo_file("config/demo.toml");
    let readings = read_shipped_csv(&recording);
    let of = |series: &str| -> Vec<(i64, f64)> {
        readings.iter().filter(|r| r.0 == series).map(|r| (r.1, r.2)).collect()
    };
    // The demo's rules: bearing-overheat above 80 / clear 75 for 2 s, high-vibration above
    // 7.1 / clear 6 for 3 s.
    let mut expected: Vec<(String, String, String, i64)> = Vec::new();
    for (rule, series, above, clear, for_ms) in [
        ("bearing-overheat", "pump-1/temperature", 80.0, 75.0, 2_000),
        ("high-vibration", "pump-1/vibration", 7.1, 6.0, 3_000),
    ] {
        for (state, ts) in threshold_model(&of(series), above, clear, for_ms) {
            expected.push((rule.into(), series.into(), state, ts));
        }
    }
    expected.sort_by_key(|a| a.3);
    assert_eq!(expected.len(), 4, "an overheat and a vibration episode; the spike is ignored");

    let args = ["-c", config.to_str().unwrap(), "-i", recording.to_str().unwrap()];
    let jsonl = replay(&[&args[..], &["--format", "jsonl"]].concat());
    assert_eq!(alerts_of(&text(&jsonl.stdout)), expected);
    assert_eq!(summaries_of(&text(&jsonl.stdout)).len(), summary_model(&readings, 10_000).len());

    // The table shows the same alerts with RFC 3339 times, and the counts at the end.
    let table = text(&replay(&args).stdout);
    let header = table.lines().next().unwrap();
    for column in ["TIME", "RECORD", "RULE", "SERIES", "STATE", "VALUE"] {
        assert!(header.contains(column), "{header}");
    }
    let raised: Vec<&str> = table.lines().filter(|l| l.contains(" raised ")).collect();
    assert_eq!(raised.len(), 2, "{table}");
    assert!(raised[0].starts_with("2024-06-10T06:04:08.000Z  alert"), "{table}");
    assert!(raised[0].contains("bearing-overheat"), "{table}");
    // Aligned: the RULE column starts at the same place on every row.
    let at = header.find("RULE").unwrap();
    assert!(raised.iter().all(|l| l[at..].starts_with(|c: char| c.is_alphabetic())), "{table}");
    let last = table.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("{} events, 0 rejected lines, 2 alerts raised", readings.len())),
        "{last}"
    );
}

#[test]
fn a_two_column_csv_takes_its_series_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = threshold_config(dir.path(), "c.toml", 50.0, "0s");
    let input = dir.path().join("one.csv");
    // No header; seconds; 55 raises, 35 clears.
    std::fs::write(
        &input,
        format!("{},30\n{},55\n{},35\n", T0 / 1000, T0 / 1000 + 1, T0 / 1000 + 2),
    )
    .unwrap();
    let args = ["-c", config.to_str().unwrap(), "-i", input.to_str().unwrap(), "--format", "jsonl"];
    let without = edgewise().arg("replay").args(args).output().unwrap();
    assert_eq!(without.status.code(), Some(2));
    assert!(text(&without.stderr).contains("--series"), "{}", text(&without.stderr));

    let out = replay(&[&args[..], &["--series", "tank/temperature"]].concat());
    let alerts = alerts_of(&text(&out.stdout));
    assert_eq!(
        alerts,
        [
            ("hot".into(), "tank/temperature".into(), "raised".into(), T0 + 1_000),
            ("hot".into(), "tank/temperature".into(), "cleared".into(), T0 + 2_000)
        ]
    );
}

#[test]
fn bad_lines_are_counted_the_first_ones_shown_and_the_replay_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = threshold_config(dir.path(), "c.toml", 50.0, "0s");
    let input = dir.path().join("bad.jsonl");
    let good = |i: i64, v: f64| {
        format!(r#"{{"ts": {}, "series": "a/temperature", "value": {v}}}"#, T0 + i * 1000)
    };
    let lines = [
        good(0, 30.0),
        "{not json".to_string(),                                  // 2
        r#"{"series": "a/temperature", "value": 1}"#.to_string(), // 3: no timestamp
        r#"{"ts": 1, "value": 1}"#.to_string(),                   // 4: no series
        good(1, 60.0),
        r#"{"ts": "yesterday", "series": "a/temperature", "value": 1}"#.to_string(), // 6
        r#"{"ts": 1, "series": "a/temperature", "value": "hot"}"#.to_string(),       // 7
        r#"{"ts": 1, "series": "a/temperature"}"#.to_string(),                       // 8
        "[1, 2]".to_string(),                                                        // 9
        good(2, 30.0),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = replay(&["-c", config.to_str().unwrap(), "-i", input.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    let name = input.display().to_string();
    for line in [2, 3, 4, 6, 7] {
        assert!(stderr.contains(&format!("{name}:{line}: rejected: ")), "line {line}:\n{stderr}");
    }
    assert!(!stderr.contains(&format!("{name}:8:")), "only the first five are shown:\n{stderr}");
    assert!(stderr.contains("2 more rejected lines not shown"), "{stderr}");
    assert!(stderr.contains(":3: rejected: no timestamp"), "{stderr}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("3 events, 7 rejected lines, 1 alerts raised, 1 cleared"), "{stdout}");
}

#[test]
fn against_shows_alerts_that_move_and_disappear_when_the_threshold_changes() {
    let dir = tempfile::tempdir().unwrap();
    let base = threshold_config(dir.path(), "base.toml", 50.0, "0s");
    let other = threshold_config(dir.path(), "raised.toml", 57.0, "0s");
    let readings = two_pumps();
    let input = dir.path().join("two-pumps.csv");
    let csv: String = readings.iter().map(|(s, ts, v)| format!("{ts},{s},{v}\n")).collect();
    std::fs::write(&input, format!("ts_ms,series,value\n{csv}")).unwrap();

    // The model: pump-1's plateau raises at 55 (i = 21) with 50, at 60 (i = 22) with 57;
    // its bump to 55 (i = 70) disappears; pump-2's excursion to 70 is unchanged.
    let base_alerts = model_alerts(&readings, 50.0, 0);
    let other_alerts = model_alerts(&readings, 57.0, 0);
    let raised = |alerts: &[(String, String, String, i64)], series: &str| -> Vec<i64> {
        alerts.iter().filter(|a| a.1 == series && a.2 == "raised").map(|a| a.3).collect()
    };
    assert_eq!(raised(&base_alerts, "pump-1/temperature"), [T0 + 21_000, T0 + 70_000]);
    assert_eq!(raised(&other_alerts, "pump-1/temperature"), [T0 + 22_000]);

    let args = [
        "-c",
        base.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "--against",
        other.to_str().unwrap(),
    ];
    let out = replay(&[&args[..], &["--format", "jsonl"]].concat());
    let changes: Vec<Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["change"], "moved");
    assert_eq!(changes[0]["series"], "pump-1/temperature");
    assert_eq!(changes[0]["shift_ms"], 1_000);
    assert_eq!(changes[0]["base"]["raised_ms"], T0 + 21_000);
    assert_eq!(changes[1]["change"], "disappears");
    assert_eq!(changes[1]["base"]["raised_ms"], T0 + 70_000);
    assert!(text(&out.stderr).contains("1 unchanged, 1 moved, 1 disappear, 0 appear"));

    let table = text(&replay(&args).stdout);
    let moved = table.lines().find(|l| l.starts_with("moved")).expect(&table);
    assert!(moved.contains("pump-1/temperature") && moved.contains("+1s"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("disappears")), "{table}");
    assert!(table.contains("RAISED (") && table.contains("raised.toml)"), "{table}");
}

#[test]
fn usage_and_input_errors_exit_with_status_2_and_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = threshold_config(dir.path(), "c.toml", 50.0, "0s");
    let config = config.to_str().unwrap();
    let missing =
        edgewise().args(["replay", "-c", config, "-i", "/nonexistent/r.jsonl"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("cannot open the recording /nonexistent/r.jsonl"));

    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "[agent]\nid = 1\n").unwrap();
    let input = dir.path().join("r.jsonl");
    std::fs::write(&input, "").unwrap();
    let out = edgewise()
        .args(["replay", "-c", bad_config.to_str().unwrap(), "-i", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("bad.toml:2:"), "{}", text(&out.stderr));

    let out = edgewise()
        .args(["journal", "export", "-c", config, "--out", "x.jsonl", "--from", "last tuesday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`last tuesday` is not a time"), "{}", text(&out.stderr));

    let out =
        edgewise().args(["journal", "export", "-c", config, "--out", "x.jsonl"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("there is no data directory"), "{}", text(&out.stderr));
}

/// An agent configuration with a fast simulated source, its store and upstream in `dir`.
fn agent_config(dir: &Path) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"[agent]
id = "export-test"
data_dir = "{data}"
status_interval = "0s"

[[sources]]
kind = "simulated"
name = "sim"
devices = 2
metrics = ["temperature", "vibration"]
interval = "50ms"

[upstream]
kind = "file"
path = "{out}"
"#,
            data = dir.join("data").display(),
            out = dir.join("upstream.jsonl").display(),
        ),
    )
    .unwrap();
    path
}

/// Events in the journal of the stopped agent's store, read through the library.
fn journal_events(data_dir: &Path) -> u64 {
    let (store, _) = edgewise::store::Store::open(data_dir, 1 << 20).unwrap();
    let journal = edgewise::journal::Journal::open(&store).unwrap();
    let reader = journal.reader();
    reader.read_after(0).filter(|e| matches!(e, Ok((_, edgewise::event::Entry::Event(_))))).count()
        as u64
}

#[test]
fn an_exported_journal_replays_every_event_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path());
    let run = edgewise()
        .args(["run", "--config", config.to_str().unwrap(), "--exit-after", "3s"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run.stderr));
    let held = journal_events(&dir.path().join("data"));
    assert!(held > 50, "the simulator should journal ~240 events in 3 s, found {held}");

    let recording = dir.path().join("capture.jsonl");
    let export = edgewise()
        .args(["journal", "export", "-c", config.to_str().unwrap(), "--out"])
        .arg(&recording)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", text(&export.stderr));
    assert!(text(&export.stderr).contains(&format!("exported {held} of {held} journal events")));
    let lines = std::fs::read_to_string(&recording).unwrap().lines().count() as u64;
    assert_eq!(lines, held);

    let out = replay(&[
        "-c",
        config.to_str().unwrap(),
        "-i",
        recording.to_str().unwrap(),
        "--format",
        "jsonl",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(events_counted(&stderr), held, "{stderr}");
    assert!(stderr.contains(" 0 rejected lines"), "{stderr}");

    // A series filter keeps only the matching series.
    let filtered = dir.path().join("temperature.jsonl");
    let export = edgewise()
        .args([
            "journal",
            "export",
            "-c",
            config.to_str().unwrap(),
            "--series",
            "+/temperature",
            "--out",
        ])
        .arg(&filtered)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", text(&export.stderr));
    let kept = std::fs::read_to_string(&filtered).unwrap();
    assert!(kept.lines().count() > 0 && (kept.lines().count() as u64) < held);
    assert!(kept.lines().all(|l| l.contains("/temperature\"")), "{kept}");
}

#[test]
fn exporting_while_the_agent_runs_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path());
    let mut agent = edgewise()
        .args(["run", "--config", config.to_str().unwrap(), "--exit-after", "60s"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (with a deadline) until the agent holds its store: it logs "starting" after opening.
    let (tx, rx) = mpsc::channel();
    let stderr = agent.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("starting") {
                let _ = tx.send(());
            }
        }
    });
    let started = rx.recv_timeout(Duration::from_secs(30));
    let export = started.is_ok().then(|| {
        edgewise()
            .args(["journal", "export", "-c", config.to_str().unwrap(), "--out"])
            .arg(dir.path().join("x.jsonl"))
            .output()
            .unwrap()
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(started.is_ok(), "the agent did not start within 30 s");
    let export = export.unwrap();
    assert_eq!(export.status.code(), Some(1));
    let stderr = text(&export.stderr);
    assert!(stderr.contains("locked by a running agent"), "{stderr}");
    assert!(stderr.contains("stop the agent or copy the data dir"), "{stderr}");
    assert!(!dir.path().join("x.jsonl").exists(), "no output file is left behind");
}

#[test]
fn scores_are_written_one_row_per_scored_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("anomaly.toml");
    std::fs::write(
        &config,
        r#"[agent]
id = "scores-test"

[[rules]]
kind = "anomaly"
name = "odd-temperature"
series = "+/temperature"

[upstream]
kind = "file"
path = "upstream.jsonl"
"#,
    )
    .unwrap();
    // A quiet, slightly noisy temperature with one spike, and a vibration series that the
    // rule does not match (so it is not scored).
    let mut readings = Vec::new();
    for i in 0..200i64 {
        let noise = ((i * 7919) % 13) as f64 / 13.0 - 0.5;
        let temperature = if i == 150 { 70.0 } else { 50.0 + noise };
        readings.push(("pump-1/temperature", T0 + i * 1_000, temperature));
        readings.push(("pump-1/vibration", T0 + i * 1_000, 2.0 + noise / 10.0));
    }
    let input = dir.path().join("r.csv");
    let csv: String = readings.iter().map(|(s, ts, v)| format!("{ts},{s},{v}\n")).collect();
    std::fs::write(&input, csv).unwrap();
    let scores = dir.path().join("scores.csv");
    replay(&[
        "-c",
        config.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "--scores",
        scores.to_str().unwrap(),
    ]);

    let written = std::fs::read_to_string(&scores).unwrap();
    let mut lines = written.lines();
    assert_eq!(lines.next(), Some("timestamp,value,anomaly_score"), "one scored series: 3 columns");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let scored: Vec<_> = readings.iter().filter(|r| r.0.ends_with("/temperature")).collect();
    assert_eq!(rows.len(), scored.len());
    for (row, (_, ts, value)) in rows.iter().zip(&scored) {
        let seconds = (ts - T0) / 1_000;
        let expected_time = format!(
            "2024-06-10T06:{:02}:{:02}.000Z",
            13 + (20 + seconds) / 60,
            (20 + seconds) % 60
        );
        assert_eq!(row[0], expected_time);
        assert_eq!(row[1].parse::<f64>().unwrap(), *value);
        let score: f64 = row[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&score), "{row:?}");
    }
    let spike = rows.iter().position(|r| r[1] == "70").unwrap();
    let best = rows.iter().map(|r| r[2].parse::<f64>().unwrap()).fold(0.0, f64::max);
    assert_eq!(rows[spike][2].parse::<f64>().unwrap(), best, "the spike scores highest");
    assert!(!dir.path().join("scores.csv.partial").exists());
    assert!(!dir.path().join("scores.csv.rows.partial").exists());

    // Matching both series: the rows name their rule and series.
    let both = std::fs::read_to_string(&config).unwrap().replace("+/temperature", "pump-1/#");
    std::fs::write(&config, both).unwrap();
    replay(&[
        "-c",
        config.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "--scores",
        scores.to_str().unwrap(),
    ]);
    let written = std::fs::read_to_string(&scores).unwrap();
    assert_eq!(written.lines().next(), Some("timestamp,value,anomaly_score,rule,series"));
    assert_eq!(written.lines().count(), readings.len() + 1);
    assert!(
        written.lines().nth(2).unwrap().ends_with(",odd-temperature,pump-1/vibration"),
        "{written}"
    );
}
