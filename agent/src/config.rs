//! Configuration: TOML, typed with serde, validated as a whole.
//!
//! Every key has a default except `agent.id` and the upstream's destination; the defaults are
//! sized for a Raspberry Pi (small caches, a bounded outbox, few fsyncs). `config/` holds
//! annotated examples, and `edgewise check --config FILE` reports every problem in a file at
//! once, each with `file:line:column` and a hint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sensors::record::Severity;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and location of this agent.
    pub agent: AgentConfig,
    /// The sled store shared by journal, snapshots and outbox.
    #[serde(default)]
    pub storage: StorageConfig,
    /// The event journal (write-ahead log of accepted events).
    #[serde(default)]
    pub journal: JournalConfig,
    /// Where events come from.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Alert rules.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Windowed summaries.
    #[serde(default)]
    pub summary: SummaryConfig,
    /// The outbox of records waiting for upstream.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Where records go.
    pub upstream: UpstreamConfig,
}

/// `[agent]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable id of this gateway; part of every record id upstream.
    pub id: String,
    /// Directory of the sled store. Default `./edgewise-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How often the one-line status is logged. Default 10 s; `0s` turns it off.
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    /// How long shutdown may take to finish in-flight sends. Default 5 s.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./edgewise-data")
}
fn default_status_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// sled's page cache. sled defaults to 1 GiB, far too much for a Pi. Default 16 MiB.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: ByteSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { cache_capacity: default_cache_capacity() }
    }
}

fn default_cache_capacity() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}

/// `[journal]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Bytes of journal kept behind the last snapshot (for history and replay). Default 32 MiB.
    #[serde(default = "default_journal_max_bytes")]
    pub max_bytes: ByteSize,
    /// Age of journal entries kept behind the last snapshot. Default 1 h.
    #[serde(default = "default_journal_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Minimum time between two group commits (fsyncs): bounds SD-card wear under load while
    /// an idle agent commits at once. Default 10 ms.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Most entries in one group commit. Default 4096.
    #[serde(default = "default_commit_max_entries")]
    pub commit_max_entries: usize,
    /// How often the processor state is snapshotted. Default 30 s.
    #[serde(default = "default_snapshot_interval", with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// How often a clock tick is journaled so that windows close and timers fire when no
    /// event arrives. Default 1 s.
    #[serde(default = "default_tick_interval", with = "humantime_serde")]
    pub tick_interval: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_journal_max_bytes(),
            max_age: default_journal_max_age(),
            commit_interval: default_commit_interval(),
            commit_max_entries: default_commit_max_entries(),
            snapshot_interval: default_snapshot_interval(),
            tick_interval: default_tick_interval(),
        }
    }
}

fn default_journal_max_bytes() -> ByteSize {
    ByteSize(32 * 1024 * 1024)
}
fn default_journal_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(10)
}
fn default_commit_max_entries() -> usize {
    4096
}
fn default_snapshot_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_tick_interval() -> Duration {
    Duration::from_secs(1)
}

/// One `[[sources]]` entry, selected by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Subscribe to topics on an MQTT broker.
    Mqtt(MqttSourceConfig),
    /// Built-in simulated sensors.
    Simulated(SimulatedSourceConfig),
}

impl SourceConfig {
    /// The source's configured name (used in metrics and logs).
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Mqtt(c) => &c.name,
            SourceConfig::Simulated(c) => &c.name,
        }
    }
}

/// `kind = "mqtt"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Name in metrics and logs. Default `mqtt`.
    #[serde(default = "default_mqtt_name")]
    pub name: String,
    /// Broker host. Default `127.0.0.1`.
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    /// Broker port. Default 1883.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id; must be stable so the broker keeps our session. Default
    /// `edgewise-<agent.id>-<name>`.
    pub client_id: Option<String>,
    /// Topic filters to subscribe to (`+` and `#` wildcards).
    pub topics: Vec<String>,
    /// Subscription QoS: 0 or 1. Default 1 (acknowledged after the journal commit).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Series key template over topic segments: `{0}` is the first segment, `{topic}` the
    /// whole topic. Default `{topic}`.
    #[serde(default = "default_series_template")]
    pub series: String,
    /// How payloads are decoded.
    #[serde(default)]
    pub payload: PayloadConfig,
    /// MQTT keep-alive. Default 30 s.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter. Default 200 ms.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default 30 s.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Largest accepted MQTT packet. Default 64 KiB.
    #[serde(default = "default_max_packet")]
    pub max_packet_size: ByteSize,
}

fn default_mqtt_name() -> String {
    "mqtt".into()
}
fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_qos() -> u8 {
    1
}
fn default_series_template() -> String {
    "{topic}".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(200)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_max_packet() -> ByteSize {
    ByteSize(64 * 1024)
}

/// `payload = { ... }` of an MQTT source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// `json` or `number`. Default `json`.
    #[serde(default)]
    pub format: PayloadFormat,
    /// Dotted path of the value in a JSON payload. Default `value`.
    #[serde(default = "default_value_path")]
    pub value: String,
    /// Dotted path of the timestamp in a JSON payload; when the payload has no such field the
    /// receive time is used. Numbers are ms or s since the epoch (told apart by magnitude, or
    /// fixed by `timestamp_unit`), strings are RFC 3339. Default `ts`.
    #[serde(default = "default_timestamp_path")]
    pub timestamp: String,
    /// `auto`, `ms` or `s`. Default `auto`.
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        Self {
            format: PayloadFormat::default(),
            value: default_value_path(),
            timestamp: default_timestamp_path(),
            timestamp_unit: TimestampUnit::default(),
        }
    }
}

fn default_value_path() -> String {
    "value".into()
}
fn default_timestamp_path() -> String {
    "ts".into()
}

/// Payload formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object with the value (and optionally the timestamp) at configured paths.
    #[default]
    Json,
    /// A bare number in ASCII, e.g. `21.5`.
    Number,
}

/// How numeric timestamps are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampUnit {
    /// Values above 10^11 are milliseconds, others seconds.
    #[default]
    Auto,
    /// Milliseconds since the Unix epoch.
    Ms,
    /// Seconds since the Unix epoch (fractions allowed).
    S,
}

/// `kind = "simulated"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSourceConfig {
    /// Name in metrics and logs. Default `sim`.
    #[serde(default = "default_sim_name")]
    pub name: String,
    /// Number of simulated devices (`pump-1` ... `pump-N`). Default 3.
    #[serde(default = "default_sim_devices")]
    pub devices: u32,
    /// Metrics per device; each becomes the series `<device>/<metric>`. Known shapes:
    /// `temperature`, `vibration`, `pressure`, `current`, `humidity`; others get a generic
    /// signal. Default `["temperature", "vibration"]`.
    #[serde(default = "default_sim_metrics")]
    pub metrics: Vec<String>,
    /// Time between two readings of one series. Default 1 s.
    #[serde(default = "default_sim_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Inject faults (spikes, drift, stuck values, dropouts). Default true.
    #[serde(default = "default_true")]
    pub faults: bool,
    /// Seed of the random generator, for reproducible runs. Default 1.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_sim_name() -> String {
    "sim".into()
}
fn default_sim_devices() -> u32 {
    3
}
fn default_sim_metrics() -> Vec<String> {
    vec!["temperature".into(), "vibration".into()]
}
fn default_sim_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_seed() -> u64 {
    1
}

/// One `[[rules]]` entry, selected by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleConfig {
    /// Raise when a value stays above (or below) a level, clear past a separate level.
    Threshold(ThresholdRuleConfig),
}

impl RuleConfig {
    /// The rule's configured name.
    pub fn name(&self) -> &str {
        match self {
            RuleConfig::Threshold(c) => &c.name,
        }
    }
}

/// `kind = "threshold"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRuleConfig {
    /// Unique rule name; part of alert records.
    pub name: String,
    /// Series pattern: segments split by `/`; `+` matches one segment, `#` the rest, `*`
    /// any characters within a segment. Example: `pump-*/temperature`.
    pub series: String,
    /// Raise when the value is above this level.
    pub above: Option<f64>,
    /// Raise when the value is below this level.
    pub below: Option<f64>,
    /// Clear level (hysteresis): with `above`, clear when the value falls below `clear`
    /// (must be <= above); with `below`, clear when it rises above `clear`. Default: the raise
    /// level.
    pub clear: Option<f64>,
    /// How long the condition must hold before the alert is raised. Default 0 s.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_duration: Duration,
    /// `info`, `warning` or `critical`. Default `warning`.
    #[serde(default)]
    pub severity: Severity,
    /// Message template; `{rule}`, `{series}`, `{value}`, `{threshold}`, `{state}` are
    /// replaced. Default `{rule}: {series} = {value} ({state}, threshold {threshold})`.
    pub message: Option<String>,
}

/// `[summary]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryConfig {
    /// Emit window summaries. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Tumbling window length, aligned to the clock. Default 60 s.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// How long after its end a window still accepts late events. Default 5 s.
    #[serde(default = "default_lateness", with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Events stamped further than this ahead of the agent's clock are rejected as
    /// `future_timestamp` (time is untrusted). Default 5 min.
    #[serde(default = "default_max_future", with = "humantime_serde")]
    pub max_future: Duration,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: default_window(),
            allowed_lateness: default_lateness(),
            max_future: default_max_future(),
        }
    }
}

fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_lateness() -> Duration {
    Duration::from_secs(5)
}
fn default_max_future() -> Duration {
    Duration::from_secs(300)
}

/// `[buffer]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Byte cap of the outbox (keys + values of all lanes). Default 64 MiB.
    #[serde(default = "default_buffer_max_bytes")]
    pub max_bytes: ByteSize,
    /// What happens at the cap. Only `drop_oldest_summaries`: the oldest summaries are
    /// replaced by a gap record; alerts are evicted only when no summary is left.
    #[serde(default)]
    pub when_full: WhenFull,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self { max_bytes: default_buffer_max_bytes(), when_full: WhenFull::default() }
    }
}

fn default_buffer_max_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

/// Outbox policy at its byte cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Evict the oldest summaries first (reported by a gap record), alerts last.
    #[default]
    DropOldestSummaries,
}

/// `[upstream]`, selected by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum UpstreamConfig {
    /// POST batches to an HTTP(S) endpoint.
    Http(HttpUpstreamConfig),
    /// Append batches as JSON lines to a local file (demos, air-gapped sites, debugging).
    File(FileUpstreamConfig),
}

impl UpstreamConfig {
    /// Batching settings of whichever upstream is configured.
    pub fn batch(&self) -> &BatchConfig {
        match self {
            UpstreamConfig::Http(c) => &c.batch,
            UpstreamConfig::File(c) => &c.batch,
        }
    }
}

/// `kind = "http"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpUpstreamConfig {
    /// Endpoint receiving `POST`ed batches.
    pub url: String,
    /// Body compression: `zstd`, `gzip` or `none`. Default `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// Whole-request timeout. Default 10 s.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay; doubles up to `retry_max`, with jitter. Default 500 ms.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay (also caps `Retry-After`). Default 60 s.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Batching.
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}

/// `kind = "file"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamConfig {
    /// File that batches are appended to, one JSON object per line. `-` is standard output.
    pub path: PathBuf,
    /// Batching.
    #[serde(default)]
    pub batch: BatchConfig,
}

/// `[upstream.batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records in one batch. Default 500.
    #[serde(default = "default_batch_records")]
    pub max_records: usize,
    /// Most (uncompressed) bytes in one batch. Default 256 KiB.
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: ByteSize,
    /// How long a summary may wait for more records to fill a batch; alerts never wait.
    /// Default 1 s.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_batch_records(),
            max_bytes: default_batch_bytes(),
            max_age: default_batch_age(),
        }
    }
}

fn default_batch_records() -> usize {
    500
}
fn default_batch_bytes() -> ByteSize {
    ByteSize(256 * 1024)
}
fn default_batch_age() -> Duration {
    Duration::from_secs(1)
}

/// Request body compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// `Content-Encoding: zstd`, level 3.
    #[default]
    Zstd,
    /// `Content-Encoding: gzip`.
    Gzip,
    /// No compression.
    None,
}

/// A size in bytes, written as an integer or a string with a unit: `"16 MiB"`, `"512KiB"`,
/// `"1 GB"`, `"4096"` (B, KB/KiB, MB/MiB, GB/GiB; KB = 1000, KiB = 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"16 MiB"` and friends.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size; write e.g. \"16 MiB\" or \"512 KiB\""))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}`; use B, KB, KiB, MB, MiB, GB or GiB"
                ));
            }
        };
        Ok(ByteSize((number * factor as f64).round() as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        if b >= (1u64 << 30) as f64 {
            write!(f, "{:.1} GiB", b / (1u64 << 30) as f64)
        } else if b >= (1u64 << 20) as f64 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else if b >= 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl Config {
    /// Parses a configuration from text without semantic validation (see [`load`]).
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The MQTT client id of a source, with its default applied.
    pub fn mqtt_client_id(&self, source: &MqttSourceConfig) -> String {
        source
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgewise-{}-{}", self.agent.id, source.name))
    }
}

/// Loads and validates a configuration file; every problem is reported.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        problems: vec![Problem {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the file: {e}"),
            hint: None,
        }],
    })?;
    load_str(&path.display().to_string(), &text)
}

/// Parses and validates configuration text; `file` names it in error messages.
pub fn load_str(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    match Config::from_toml(text) {
        Ok(config) => Ok(config),
        Err(e) => {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            Err(ConfigErrors {
                problems: vec![Problem {
                    file: file.to_string(),
                    line,
                    column,
                    message: e.message().to_string(),
                    hint: None,
                }],
            })
        }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The file's path as given.
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: error: {}", self.file, self.line, self.column, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors {
    /// The problems in file order.
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        write!(f, "{} problem(s) found", self.problems.len())
    }
}

impl std::error::Error for ConfigErrors {}
