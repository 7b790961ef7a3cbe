//! End-to-end load benchmark: a fresh Mosquitto, the `edgewise` binary with a realistic rule
//! pack and an HTTP receiver, and a publisher sending `--messages` readings over `--series`
//! series as fast as the broker takes them. For comparison the same load goes to a bare
//! subscriber (a minimal rumqttc client that only counts) on the same broker: the ceiling.
//!
//! Reports, per QoS: sustained rate (events/s until the agent journaled the last event),
//! CPU time per event, fsyncs (journal commits), peak and final RSS, whether the summary
//! counts upstream add up to what was published, and the **alert latency** under that load:
//! while the load runs, a second publisher sends [`PROBES`] probe readings (one every
//! [`PROBE_EVERY`], each on its own series, above the `hot-spike` threshold, which raises at
//! once) and a watcher polls the receiver every millisecond; a probe's latency is from just
//! before its publish to the first time its alert is seen upstream (publish, broker, journal
//! commit, rules, outbox, HTTP batch). p50 / p99 / max are printed.
//!
//! ```sh
//! scripts/load.sh            # builds release binaries, runs this 3 times per QoS
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sensors::record::AlertState;

use edgewise_tests::{Agent, Mosquitto, Publisher, QoS, Receiver, wait_until};

/// Probe readings sent during the load for the alert latency.
const PROBES: usize = 100;
/// Time between two probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);

struct Args {
    messages: usize,
    series: usize,
    qos: u8,
    /// Events per second; 0: as fast as the broker takes them.
    rate: u64,
}

const USAGE: &str = "usage: edgewise-load [--messages N (100000)] [--series N (100)] \
    [--qos 0|1 (1)] [--rate EVENTS_PER_S (0: as fast as the broker takes them)]";

fn parse_args() -> Args {
    let mut args = Args { messages: 100_000, series: 100, qos: 1, rate: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--messages" => args.messages = value().parse().expect("--messages N"),
            "--series" => args.series = value().parse().expect("--series N"),
            "--qos" => args.qos = value().parse().expect("--qos 0|1"),
            "--rate" => args.rate = value().parse().expect("--rate EVENTS_PER_S"),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("edgewise-load: unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    args
}

fn messages(args: &Args) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    (0..args.messages).map(|i| {
        let series = i % args.series;
        let value = 20.0 + (i % 97) as f64 * 0.5;
        (format!("load/dev-{series}/temperature"), format!("{{\"value\":{value}}}").into_bytes())
    })
}

/// Publishes the load: as fast as possible, or at `args.rate` in slices of 10 ms. Returns
/// how many were published.
fn publish_load(publisher: &Publisher, args: &Args) -> usize {
    if args.rate == 0 {
        return publisher.publish_all(qos_of(args.qos), messages(args));
    }
    let per_slice = (args.rate as usize / 100).max(1);
    let start = Instant::now();
    let mut all = messages(args).peekable();
    let mut published = 0;
    let mut slice = 0u32;
    while all.peek().is_some() {
        let chunk: Vec<_> = all.by_ref().take(per_slice).collect();
        published += publisher.publish_all(qos_of(args.qos), chunk);
        slice += 1;
        let due = start + Duration::from_millis(10) * slice;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    published
}

fn qos_of(n: u8) -> QoS {
    if n == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// CPU seconds (user + system) of a process from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A field of /proc/PID/status in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The last value of `key=N` in the agent's status lines.
fn last_status_value(logs: &str, key: &str) -> u64 {
    let needle = format!(" {key}=");
    logs.lines()
        .rev()
        .filter(|l| l.contains(" status "))
        .find_map(|l| {
            let at = l.find(&needle)? + needle.len();
            l[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .unwrap_or(0)
}

fn agent_config(dir: &std::path::Path, port: u16, url: &str, qos: u8) -> String {
    format!(
        r#"[agent]
id = "load"
data_dir = "{data}"
status_interval = "100ms"

[journal]
commit_interval = "10ms"

[[sources]]
kind = "mqtt"
port = {port}
topics = ["load/#"]
qos = {qos}
series = "{{1}}/{{2}}"

[[rules]]
kind = "threshold"
name = "overheat"
series = "+/temperature"
above = 65.0
clear = 60.0
for = "1s"

[[rules]]
kind = "threshold"
name = "freezing"
series = "+/temperature"
below = 0.0
clear = 2.0

[[rules]]
kind = "threshold"
name = "hot-spike"
series = "dev-1*/temperature"
above = 66.0
severity = "critical"

[summary]
window = "1s"
allowed_lateness = "0s"

[upstream]
kind = "http"
url = "{url}"
retry_initial = "20ms"
retry_max = "200ms"

[upstream.batch]
max_age = "100ms"
"#,
        data = dir.join("data").display(),
    )
}

fn run_agent(args: &Args) {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = Agent::start(
        &agent_config(dir.path(), broker.port(), &receiver.url(), args.qos),
        dir.path(),
    );
    let pid = agent.pid().expect("agent pid");
    broker.wait_subscribed("edgewise-load-mqtt", Duration::from_secs(30));
    let publisher = Publisher::connect(broker.port(), "load-publisher");
    let prober = Publisher::connect(broker.port(), "load-prober");
    let sent_at: Mutex<BTreeMap<String, Instant>> = Mutex::new(BTreeMap::new());
    let seen_at: Mutex<BTreeMap<String, Instant>> = Mutex::new(BTreeMap::new());
    let load_done = AtomicBool::new(false);
    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let (published, publish_done) = std::thread::scope(|scope| {
        // Probes: each on its own series, so that each raises exactly one alert.
        scope.spawn(|| {
            for i in 0..PROBES {
                if load_done.load(Ordering::SeqCst) {
                    break;
                }
                let series = format!("dev-1probe{i}/temperature");
                let topic = format!("load/{series}");
                sent_at.lock().unwrap().insert(series, Instant::now());
                prober.publish_all(qos_of(args.qos), [(topic, b"{\"value\":99}".to_vec())]);
                std::thread::sleep(PROBE_EVERY);
            }
        });
        // The watcher: the first sighting of each probe's alert upstream.
        scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut done_since: Option<Instant> = None;
            while Instant::now() < deadline {
                let now = Instant::now();
                let raised: Vec<String> = receiver.with(|r| {
                    r.alerts()
                        .into_iter()
                        .filter(|a| {
                            a.state == AlertState::Raised && a.series.starts_with("dev-1probe")
                        })
                        .map(|a| a.series.clone())
                        .collect()
                });
                let mut seen = seen_at.lock().unwrap();
                for series in raised {
                    seen.entry(series).or_insert(now);
                }
                if load_done.load(Ordering::SeqCst) {
                    done_since.get_or_insert(now);
                }
                // All seen, or 30 s after the load without the rest.
                if seen.len() == sent_at.lock().unwrap().len() && load_done.load(Ordering::SeqCst)
                    || done_since.is_some_and(|at| at.elapsed() > Duration::from_secs(30))
                {
                    break;
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let published = publish_load(&publisher, args);
        let publish_done = start.elapsed();
        load_done.store(true, Ordering::SeqCst);
        (published, publish_done)
    });
    let latencies = {
        let sent = sent_at.lock().unwrap();
        let seen = seen_at.lock().unwrap();
        let mut ms: Vec<f64> = seen
            .iter()
            .filter_map(|(series, at)| {
                Some(at.duration_since(*sent.get(series)?).as_secs_f64() * 1e3)
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let probes = sent_at.lock().unwrap().len();
    let published = published + probes;
    let mut peak_rss = 0;
    let journaled = wait_until(Duration::from_secs(600), || {
        peak_rss = peak_rss.max(status_kb(pid, "VmRSS:"));
        last_status_value(&agent.logs(), "events_in") >= published as u64
    });
    let elapsed = start.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    let commits = last_status_value(&agent.logs(), "commits");
    // Every event is accounted for upstream: in a summary's count, or (arrived after its
    // window closed, as happens when the agent runs far behind a flat-out publisher) in a
    // `late` gap record's events.
    let complete = wait_until(Duration::from_secs(60), || {
        receiver.with(|r| r.summary_count_total() + r.gap_event_total()) >= published as u64
    });
    let (counted, in_gaps) = receiver.with(|r| (r.summary_count_total(), r.gap_event_total()));
    println!(
        "agent qos={} messages={} series={} publish_s={:.2} rate_eps={:.0} cpu_us_per_event={:.2} \
         commits={} commits_per_s={:.0} peak_rss_mb={:.1} hwm_rss_mb={:.1} summaries_counted={} in_gaps={} complete={} \
         alert_latency_ms_p50={:.1} p99={:.1} max={:.1} probes_seen={}/{}",
        args.qos,
        published,
        args.series,
        publish_done.as_secs_f64(),
        published as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / published as f64,
        commits,
        commits as f64 / elapsed.as_secs_f64(),
        peak_rss as f64 / 1024.0,
        status_kb(pid, "VmHWM:") as f64 / 1024.0,
        counted,
        in_gaps,
        journaled && complete && counted + in_gaps == published as u64,
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len(),
        probes,
    );
}

fn run_bare(args: &Args) {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions};
    let broker = Mosquitto::start();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let mut options = MqttOptions::new("bare-subscriber", "127.0.0.1", broker.port());
        options.set_clean_session(false).set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (count, subscribed) = (count.clone(), subscribed.clone());
        let qos = qos_of(args.qos);
        rt.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = client.try_subscribe("load/#", qos);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        subscribed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Incoming::Publish(_))) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    assert!(wait_until(Duration::from_secs(10), || subscribed
        .load(std::sync::atomic::Ordering::SeqCst)));
    let publisher = Publisher::connect(broker.port(), "load-publisher");
    let cpu_before = cpu_seconds(std::process::id());
    let start = Instant::now();
    let published = publish_load(&publisher, args);
    let done = wait_until(Duration::from_secs(600), || {
        count.load(std::sync::atomic::Ordering::Relaxed) >= published as u64
    });
    let elapsed = start.elapsed();
    println!(
        "bare  qos={} messages={} series={} rate_eps={:.0} received={} complete={} (process cpu incl. publisher: {:.2} us/event)",
        args.qos,
        published,
        args.series,
        published as f64 / elapsed.as_secs_f64(),
        count.load(std::sync::atomic::Ordering::Relaxed),
        done,
        (cpu_seconds(std::process::id()) - cpu_before) * 1e6 / published as f64,
    );
}

fn main() {
    let args = parse_args();
    run_bare(&args);
    run_agent(&args);
}
