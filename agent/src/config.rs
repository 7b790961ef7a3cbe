//! Configuration: TOML, typed with serde, validated as a whole.
//!
//! Every key has a default except `agent.id` and the upstream's destination; the defaults are
//! sized for a Raspberry Pi (small caches, a bounded outbox, few fsyncs). `config/` holds
//! annotated examples, and `edgewise check --config FILE` reports every problem in a file at
//! once, each with `file:line:column` and a hint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::rules::{
    AnomalyRuleConfig, CombineRuleConfig, FlatlineRuleConfig, MissingRuleConfig, RateRuleConfig,
    RuleConfig, ThresholdRuleConfig, WindowRuleConfig,
};

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
    /// The local HTTP API (health, readiness, metrics, status).
    #[serde(default)]
    pub api: ApiConfig,
}

/// `[api]`: the local HTTP API (`/healthz`, `/readyz`, `/metrics`, `/api/v1/...`).
///
/// `listen` defaults to [`DEFAULT_API_LISTEN`]; `"off"` disables the API. When the default
/// address is in use (another agent on the same host), the agent logs one warning and runs
/// without the API; an address set explicitly that is in use stops the agent at start. A
/// listener on a non-loopback address needs `token_env` or `token_file`: requests then need
/// `Authorization: Bearer <token>` (except `/healthz`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port` to listen on, or `"off"`; unset means [`DEFAULT_API_LISTEN`].
    pub listen: Option<String>,
    /// Environment variable holding the bearer token.
    pub token_env: Option<String>,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
}

/// Where the API listens when `[api] listen` is not set: loopback only, no token needed.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9898";

impl ApiConfig {
    /// The address to listen on; `Ok(None)` when the API is `"off"`.
    pub fn address(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let text = self.listen.as_deref().unwrap_or(DEFAULT_API_LISTEN).trim();
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            format!("`{text}` is not an address: use host:port, e.g. 127.0.0.1:9898, or \"off\"")
        })
    }

    /// Whether `listen` was left unset (see the type's docs for what that changes).
    pub fn is_default_listen(&self) -> bool {
        self.listen.is_none()
    }

    /// Where the bearer token comes from, if set.
    pub fn token_source(&self) -> Result<Option<SecretSource>, String> {
        SecretSource::from_keys("token", self.token_env.as_deref(), self.token_file.as_deref())
    }
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
    /// How often the one-line status is logged. Default 10 s; `0s` turns the periodic line off
    /// (a `final status` line is still logged at shutdown).
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
    /// sled's page cache (only the outbox lives in sled). sled defaults to 1 GiB, far too much
    /// for a Pi. Default 1 MiB: the agent reads little back (the outbox head), and sled fills
    /// whatever it is given with the outbox's churn: after 10 minutes at 1,000 series the RSS
    /// was 24.3 MB with 4 MiB and 20.1 MB with 1 MiB (BENCHMARKS.md, "Memory, session 7").
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: ByteSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { cache_capacity: default_cache_capacity() }
    }
}

fn default_cache_capacity() -> ByteSize {
    ByteSize(1024 * 1024)
}

/// `[journal]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Bytes of journal kept behind the last snapshot, for the history API and the warm-up of
    /// changed rules on reload (entries after the snapshot are always kept: they are the
    /// replay after a crash). Default 8 MiB: about 3 minutes at 1,000 events/s, an hour at 50;
    /// raise it to keep longer recordings (memory and SD writes grow with it).
    #[serde(default = "default_journal_max_bytes")]
    pub max_bytes: ByteSize,
    /// Age of journal entries kept behind the last snapshot. Default 1 h (`edgewise journal
    /// export` cuts recordings from it; `max_bytes` usually binds first above ~100 series).
    #[serde(default = "default_journal_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Minimum time between two group commits (fsyncs): bounds SD-card wear under load while
    /// an idle agent commits at once. Default 10 ms.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Longest time an entry that nobody waits for (QoS 0, serial and simulated events, clock
    /// ticks) stays uncommitted. Entries whose source waits for an acknowledgement (QoS 1)
    /// are committed after `commit_interval`; without them the writer gathers up to this long
    /// into one chunk and one fsync, so a QoS 0 or serial load costs at most 1 / this fsyncs
    /// per second (SD-card wear), and its events reach the rules at most this late.
    /// Default 100 ms.
    #[serde(default = "default_commit_max_delay", with = "humantime_serde")]
    pub commit_max_delay: Duration,
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
            commit_max_delay: default_commit_max_delay(),
            commit_max_entries: default_commit_max_entries(),
            snapshot_interval: default_snapshot_interval(),
            tick_interval: default_tick_interval(),
        }
    }
}

fn default_journal_max_bytes() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}
fn default_journal_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(10)
}
fn default_commit_max_delay() -> Duration {
    Duration::from_millis(100)
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
    /// A serial device (USB or UART): our firmware's frames, or JSON / CSV lines.
    Serial(SerialSourceConfig),
}

impl SourceConfig {
    /// The source's configured name (used in metrics and logs).
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Mqtt(c) => &c.name,
            SourceConfig::Simulated(c) => &c.name,
            SourceConfig::Serial(c) => &c.name,
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
    /// User name sent in CONNECT.
    pub username: Option<String>,
    /// Password read from this environment variable (needs `username`).
    pub password_env: Option<String>,
    /// Password read from this file (needs `username`; a trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// `[sources.tls]`: connect with TLS (set `port`, usually 8883). An empty table means
    /// TLS with the system's trusted roots and no client certificate.
    pub tls: Option<TlsConfig>,
}

impl MqttSourceConfig {
    /// Where the password comes from; `Ok(None)` without one.
    pub fn password_source(&self) -> Result<Option<SecretSource>, String> {
        SecretSource::from_keys(
            "password",
            self.password_env.as_deref(),
            self.password_file.as_deref(),
        )
    }
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

/// `kind = "serial"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSourceConfig {
    /// Name in metrics and logs. Default `serial`.
    #[serde(default = "default_serial_name")]
    pub name: String,
    /// The device, e.g. `/dev/serial/by-id/usb-...` (stable across replugs) or `/dev/ttyUSB0`.
    pub path: PathBuf,
    /// Baud rate. Default 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Parity bit: `"none"`, `"even"` or `"odd"`. Default `"none"` (our firmware sends 8N1;
    /// RS-485 field adapters, Modbus RTU style, often want `"even"`, i.e. 8E1).
    #[serde(default)]
    pub parity: SerialParity,
    /// Data bits per character: 5, 6, 7 or 8. Default 8.
    #[serde(default)]
    pub data_bits: SerialDataBits,
    /// Stop bits: 1 or 2. Default 1.
    #[serde(default)]
    pub stop_bits: SerialStopBits,
    /// `frames` (our firmware: postcard + CRC + COBS), `json_lines` or `csv_lines`.
    /// Default `frames`.
    #[serde(default)]
    pub framing: SerialFraming,
    /// Series template. For `frames`: `{device}` (device id), `{channel}` and `{unit}`;
    /// default `dev-{device}/{channel}`. For lines: the series comes from the line, and this
    /// is the default for lines without one.
    #[serde(default = "default_serial_series")]
    pub series: String,
    /// First reopen delay after the device disappeared; doubles up to `reconnect_max`.
    /// Default 200 ms.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reopen delay. Default 5 s.
    #[serde(default = "default_serial_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

fn default_serial_name() -> String {
    "serial".into()
}
fn default_baud() -> u32 {
    115_200
}
fn default_serial_series() -> String {
    "dev-{device}/{channel}".into()
}
fn default_serial_reconnect_max() -> Duration {
    Duration::from_secs(5)
}

/// The parity bit of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SerialParity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Data bits per character of a serial line. Written as a number (5 to 8) in the file; any
/// other number is an error at its position that names the valid values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "i64")]
pub enum SerialDataBits {
    /// 5 bits.
    Five,
    /// 6 bits.
    Six,
    /// 7 bits.
    Seven,
    /// 8 bits.
    #[default]
    Eight,
}

impl TryFrom<i64> for SerialDataBits {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, String> {
        match n {
            5 => Ok(SerialDataBits::Five),
            6 => Ok(SerialDataBits::Six),
            7 => Ok(SerialDataBits::Seven),
            8 => Ok(SerialDataBits::Eight),
            other => Err(format!("data_bits must be 5, 6, 7 or 8, not {other}")),
        }
    }
}

/// Stop bits of a serial line. Written as a number (1 or 2) in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "i64")]
pub enum SerialStopBits {
    /// One stop bit.
    #[default]
    One,
    /// Two stop bits.
    Two,
}

impl TryFrom<i64> for SerialStopBits {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, String> {
        match n {
            1 => Ok(SerialStopBits::One),
            2 => Ok(SerialStopBits::Two),
            other => Err(format!("stop_bits must be 1 or 2, not {other}")),
        }
    }
}

/// How bytes on a serial line are split into readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SerialFraming {
    /// `sensors::frame`: COBS frames delimited by 0x00, each with a CRC-32C.
    #[default]
    Frames,
    /// One JSON object per line: `{"series": "...", "value": 1.5, "ts": ...}` (`ts` optional).
    JsonLines,
    /// One CSV record per line: `series,value` or `timestamp,series,value`.
    CsvLines,
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

/// `[buffer]`: the outbox and its policies for long outages (see `outbox`): per-lane TTLs,
/// compaction of the summary backlog above a high-water mark, eviction at the cap.
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
    /// Alerts whose event time is older than this (by the agent's clock) are dropped into
    /// an `expired` gap record instead of being sent. A duration or `"off"`. Default `"off"`:
    /// an alarm is worth delivering however late, and alerts are few.
    #[serde(default, deserialize_with = "duration_or_off")]
    pub alerts_ttl: Option<Duration>,
    /// The same for summaries (a summary's event time is the end of its window). Default
    /// 7 days: a backend rarely accepts data older than its week-long hot storage, and the
    /// outbox is better spent on the recent past.
    #[serde(default = "default_summaries_ttl", deserialize_with = "duration_or_off")]
    pub summaries_ttl: Option<Duration>,
    /// High-water mark, as a share of `max_bytes`, above which the oldest summaries are
    /// merged into coarser windows (`compact_to`) before anything is evicted. `"NN%"` or
    /// `"off"`. Default `"50%"`: compaction starts early enough that an outage of days is
    /// bridged at a coarser resolution before the first gap.
    #[serde(default = "default_compact_above", deserialize_with = "percent_or_off")]
    pub compact_above: Option<Percent>,
    /// Length of the coarse windows of compaction; a multiple of `summary.window` larger
    /// than it. Default: the smallest such multiple that is at least 5 min (5 min for the
    /// default 1 min windows).
    #[serde(default, deserialize_with = "duration_or_off")]
    pub compact_to: Option<Duration>,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_buffer_max_bytes(),
            when_full: WhenFull::default(),
            alerts_ttl: None,
            summaries_ttl: default_summaries_ttl(),
            compact_above: default_compact_above(),
            compact_to: None,
        }
    }
}

impl BufferConfig {
    /// The configuration with every long-outage policy off (no TTL, no compaction): the
    /// outbox only evicts at the cap.
    pub fn without_policies(max_bytes: ByteSize) -> BufferConfig {
        BufferConfig {
            max_bytes,
            alerts_ttl: None,
            summaries_ttl: None,
            compact_above: None,
            ..BufferConfig::default()
        }
    }
}

fn default_buffer_max_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_summaries_ttl() -> Option<Duration> {
    Some(Duration::from_secs(7 * 24 * 3600))
}
fn default_compact_above() -> Option<Percent> {
    Some(Percent(50.0))
}

/// A share of a whole, written `"50%"` (more than 0, at most 100).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Percent {
    /// Parses `"50%"`, `"12.5 %"`.
    pub fn parse(text: &str) -> Result<Percent, String> {
        let number = text.trim().strip_suffix('%').ok_or_else(|| {
            format!("`{text}` is not a percentage; write e.g. \"50%\" (or \"off\")")
        })?;
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a percentage; write e.g. \"50%\""))?;
        if !(value > 0.0 && value <= 100.0) {
            return Err(format!("`{text}` must be more than 0% and at most 100%"));
        }
        Ok(Percent(value))
    }

    /// `part` of `whole`, rounded down.
    pub fn of(self, whole: u64) -> u64 {
        (whole as f64 * self.0 / 100.0) as u64
    }
}

/// A humantime duration or `"off"` (`None`).
fn duration_or_off<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    if text.trim() == "off" {
        return Ok(None);
    }
    humantime::parse_duration(text.trim()).map(Some).map_err(|e| {
        let message = format!("`{text}` is not a duration ({e}); write e.g. \"7d\" or \"off\"");
        serde::de::Error::custom(message)
    })
}

/// `"NN%"` or `"off"` (`None`).
fn percent_or_off<'de, D>(d: D) -> Result<Option<Percent>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    if text.trim() == "off" {
        return Ok(None);
    }
    Percent::parse(&text).map(Some).map_err(serde::de::Error::custom)
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
    /// Publish batches to an MQTT broker at QoS 1, one PUBACK per batch.
    Mqtt(MqttUpstreamConfig),
}

impl UpstreamConfig {
    /// Batching settings of whichever upstream is configured.
    pub fn batch(&self) -> &BatchConfig {
        match self {
            UpstreamConfig::Http(c) => &c.batch,
            UpstreamConfig::File(c) => &c.batch,
            UpstreamConfig::Mqtt(c) => &c.batch,
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
    /// Body format: `json` (`application/json`) or `postcard` (the compact binary layout,
    /// `application/x-edgewise-batch`; see `sensors::wire`). Default `json`.
    #[serde(default)]
    pub format: sensors::wire::Format,
    /// Whole-request timeout. Default 10 s.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay; doubles up to `retry_max`, with jitter. Default 500 ms.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay (also caps `Retry-After`). Default 60 s.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// `Authorization: Bearer` token read from this environment variable.
    pub token_env: Option<String>,
    /// `Authorization: Bearer` token read from this file (a trailing newline is dropped).
    pub token_file: Option<PathBuf>,
    /// `Authorization: Basic`: `basic = { username = "...", password_env = "..." }`.
    pub basic: Option<BasicAuthConfig>,
    /// `[upstream.tls]`: trust and client certificate for `https://` URLs. Default: the
    /// system's trusted roots, no client certificate.
    pub tls: Option<TlsConfig>,
    /// Batching.
    #[serde(default)]
    pub batch: BatchConfig,
}

impl HttpUpstreamConfig {
    /// Where the bearer token comes from; `Ok(None)` without one, `Err` when both keys are set.
    pub fn token_source(&self) -> Result<Option<SecretSource>, String> {
        SecretSource::from_keys("token", self.token_env.as_deref(), self.token_file.as_deref())
    }
}

/// `basic = { ... }` of an HTTP upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// User name (sent as is; it must not contain `:`).
    pub username: String,
    /// Password read from this environment variable.
    pub password_env: Option<String>,
    /// Password read from this file (a trailing newline is dropped).
    pub password_file: Option<PathBuf>,
}

impl BasicAuthConfig {
    /// Where the password comes from; exactly one of the two keys must be set.
    pub fn password_source(&self) -> Result<SecretSource, String> {
        SecretSource::from_keys(
            "password",
            self.password_env.as_deref(),
            self.password_file.as_deref(),
        )?
        .ok_or_else(|| "set password_env or password_file".to_string())
    }
}

/// `kind = "mqtt"` upstream: batches are published to `topic` at QoS 1 on a connection of
/// their own (never the ingest source's), one batch in flight, each removed from the outbox
/// only after its PUBACK.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttUpstreamConfig {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port. Default 1883, or 8883 when `[upstream.tls]` is present.
    pub port: Option<u16>,
    /// Client id; stable, never random (brokers and their ACLs know a gateway by it).
    /// Default `edgewise-<agent.id>-up`.
    pub client_id: Option<String>,
    /// Topic template; `{agent}` and `{lane}` (`alerts`, `summaries`) are filled in.
    /// Default `edgewise/{agent}/{lane}`.
    #[serde(default = "default_upstream_topic")]
    pub topic: String,
    /// Body format: `json` or `postcard` (the compact binary layout; see `sensors::wire`).
    /// Default `json`.
    #[serde(default)]
    pub format: sensors::wire::Format,
    /// Body compression: `zstd`, `gzip` or `none`. Default `zstd`. MQTT 3.1.1 has no headers
    /// to name either: receivers tell them from the bytes (`sensors::wire::decode_sniffed`).
    #[serde(default)]
    pub compression: Compression,
    /// MQTT keep-alive. Default 30 s.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long a connection attempt, and a batch from publish to PUBACK, may take (the
    /// upload included: raise it on slow uplinks). Default 10 s.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry / reconnect delay; doubles up to `retry_max`, with jitter. Default 500 ms.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry / reconnect delay. Default 60 s.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// User name sent in CONNECT.
    pub username: Option<String>,
    /// Password read from this environment variable (needs `username`).
    pub password_env: Option<String>,
    /// Password read from this file (needs `username`; a trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// `[upstream.tls]`: connect with TLS. An empty table means TLS with the system's
    /// trusted roots and no client certificate.
    pub tls: Option<TlsConfig>,
    /// Batching.
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_upstream_topic() -> String {
    "edgewise/{agent}/{lane}".into()
}

impl MqttUpstreamConfig {
    /// The broker port with its default applied (8883 with TLS, else 1883).
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls.is_some() { 8883 } else { 1883 })
    }

    /// The client id with its default applied.
    pub fn client_id(&self, agent: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("edgewise-{agent}-up"))
    }

    /// Where the password comes from; `Ok(None)` without one.
    pub fn password_source(&self) -> Result<Option<SecretSource>, String> {
        SecretSource::from_keys(
            "password",
            self.password_env.as_deref(),
            self.password_file.as_deref(),
        )
    }
}

/// `[upstream.tls]`: how the agent verifies the upstream and proves who it is.
///
/// There is deliberately no way to turn verification off (`insecure_skip_verify`): a
/// gateway that trusts any certificate sends its data and credentials to whoever sits on
/// the path, and such a setting tends to outlive the test it was meant for. To trust a
/// private or self-signed CA, give its certificate in `ca_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM file of our client certificate (chain), for mutual TLS; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the host we connect
    /// to (an IP address, a tunnel, a load balancer). Default: the host of the URL or
    /// `upstream.host`.
    pub server_name: Option<String>,
}

/// Largest secret file read: a password or a bearer token (even a JWT) is far smaller; a
/// bigger file is the wrong file.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where a secret (password, token) comes from. Never the configuration file itself, so
/// that the file can be shown, diffed, shared and printed by `edgewise check` safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the agent's process (systemd: `Environment=` or
    /// `EnvironmentFile=`).
    Env(String),
    /// A file whose contents, without a trailing newline, are the secret (systemd
    /// credentials, Docker/Kubernetes secrets).
    File(PathBuf),
}

impl SecretSource {
    /// The source named by a `<name>_env` / `<name>_file` pair; `Ok(None)` when neither is
    /// set, `Err` when both are.
    pub fn from_keys(
        name: &str,
        env: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<SecretSource>, String> {
        match (env, file) {
            (Some(_), Some(_)) => Err(format!("set {name}_env or {name}_file, not both")),
            (Some(var), None) => Ok(Some(SecretSource::Env(var.to_string()))),
            (None, Some(path)) => Ok(Some(SecretSource::File(path.to_path_buf()))),
            (None, None) => Ok(None),
        }
    }

    /// Reads the secret now. The error names the variable or file, never the value.
    pub fn resolve(&self) -> Result<Secret, String> {
        let value = match self {
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(value) => value,
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!("environment variable `{var}` is not set"));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("environment variable `{var}` is not valid UTF-8"));
                }
            },
            SecretSource::File(path) => {
                use std::io::Read as _;
                let shown = path.display();
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
                let mut bytes = Vec::new();
                file.take(MAX_SECRET_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
                if bytes.len() as u64 > MAX_SECRET_BYTES {
                    return Err(format!(
                        "secret file {shown} is larger than {MAX_SECRET_BYTES} bytes"
                    ));
                }
                let mut text = String::from_utf8(bytes)
                    .map_err(|_| format!("secret file {shown} is not valid UTF-8"))?;
                // Editors and `echo` end files with a newline that is not part of the secret.
                while text.ends_with('\n') || text.ends_with('\r') {
                    text.pop();
                }
                text
            }
        };
        if value.is_empty() {
            return Err(match self {
                SecretSource::Env(var) => format!("environment variable `{var}` is empty"),
                SecretSource::File(path) => format!("secret file {} is empty", path.display()),
            });
        }
        Ok(Secret(value))
    }
}

/// A secret value: `Debug` prints `Secret(<redacted>)`, there is no `Display`, and the only
/// way to the text is [`Secret::expose`], called where it goes onto the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for the header or CONNECT packet that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
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
    /// Most bytes in one batch, counted as stored in the outbox (postcard); the JSON body is
    /// about 2-3x larger before compression. Default 256 KiB.
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: ByteSize,
    /// How long a summary may wait for more records to fill a batch; alerts never wait.
    /// Default 1 s.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Most summary records per second sent upstream (a number), so that draining a backlog
    /// after an outage neither saturates a thin uplink nor hammers the backend when a fleet
    /// reconnects at once; batches then hold at most one second's worth. Alerts are never
    /// paced. Default: unpaced; one batch in flight already adapts the drain to what the
    /// receiver acknowledges, and `Retry-After` slows it further.
    #[serde(default)]
    pub drain_rate: Option<f64>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_batch_records(),
            max_bytes: default_batch_bytes(),
            max_age: default_batch_age(),
            drain_rate: None,
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

/// What a configuration is loaded for: only running the agent needs a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `edgewise run`: every check.
    Run,
    /// `replay`, `journal export`: a file written to try rules on a recording needs no source.
    Offline,
}

/// Loads and validates a configuration file for running the agent; every problem is reported.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_for(path, Purpose::Run)
}

/// Loads and validates a configuration file for `purpose`; every problem is reported.
pub fn load_for(path: &Path, purpose: Purpose) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        problems: vec![Problem {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the file: {e}"),
            hint: None,
        }],
    })?;
    load_str_for(&path.display().to_string(), &text, purpose)
}

/// Parses and validates configuration text; `file` names it in error messages.
///
/// Every section (and every `[[sources]]` / `[[rules]]` element) is deserialized on its own so
/// that one typo does not hide the next; then the whole file is checked for meaning (names,
/// ranges, patterns, URLs). All problems come back at once, in file order.
pub fn load_str(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    load_str_for(file, text, Purpose::Run)
}

/// [`load_str`] for `purpose`.
pub fn load_str_for(file: &str, text: &str, purpose: Purpose) -> Result<Config, ConfigErrors> {
    let mut problems = Vec::new();
    let (root, syntax) = toml::de::DeTable::parse_recoverable(text);
    for e in syntax {
        problems.push(Problem::from_toml(file, text, &e, None));
    }
    if problems.is_empty() {
        check_sections(file, text, &root, &mut problems);
    }
    if problems.is_empty() {
        match toml::from_str::<Config>(text) {
            Ok(config) => {
                for issue in config.validate_for(purpose) {
                    let span = issue.path.locate(&root);
                    let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                    problems.push(Problem {
                        file: file.to_string(),
                        line,
                        column,
                        message: format!("{}: {}", issue.path, issue.message),
                        hint: issue.hint,
                    });
                }
                if problems.is_empty() {
                    return Ok(config);
                }
            }
            Err(e) => problems.push(Problem::from_toml(file, text, &e, None)),
        }
    }
    problems.sort_by_key(|p| (p.line, p.column));
    Err(ConfigErrors { problems })
}

/// Deserializes each section separately, collecting every serde error with its position.
fn check_sections(
    file: &str,
    text: &str,
    root: &toml::Spanned<toml::de::DeTable<'_>>,
    problems: &mut Vec<Problem>,
) {
    use serde::de::IntoDeserializer;

    fn one<'de, T: Deserialize<'de>>(
        value: &toml::Spanned<toml::de::DeValue<'de>>,
        file: &str,
        text: &str,
        section: &str,
        problems: &mut Vec<Problem>,
    ) {
        if let Err(e) = T::deserialize(value.clone().into_deserializer()) {
            problems.push(Problem::from_toml(file, text, &e, Some(section)));
        }
    }
    type Variant<'a> = dyn Fn(&str, toml::Spanned<toml::de::DeValue<'_>>) -> Option<Result<(), toml::de::Error>>
        + 'a;

    /// A `kind`-tagged table: serde buffers internally tagged enums and loses positions, so
    /// the variant's struct is deserialized directly from the table without its `kind`.
    fn tagged(
        value: &toml::Spanned<toml::de::DeValue<'_>>,
        file: &str,
        text: &str,
        section: &str,
        problems: &mut Vec<Problem>,
        variant: &Variant<'_>,
        kinds: &str,
    ) {
        let mut value = value.clone();
        let span = value.span();
        let kind = match value.get_mut() {
            toml::de::DeValue::Table(table) => table.remove("kind"),
            _ => None,
        };
        let Some(kind) = kind else {
            let (line, column) = line_col(text, span.start);
            problems.push(Problem {
                file: file.to_string(),
                line,
                column,
                message: format!("{section}: missing `kind`"),
                hint: Some(format!("set kind to one of {kinds}")),
            });
            return;
        };
        let kind_name = kind.get_ref().as_str().unwrap_or("").to_string();
        match variant(&kind_name, value) {
            Some(Ok(())) => {}
            Some(Err(e)) => problems.push(Problem::from_toml(file, text, &e, Some(section))),
            None => {
                let (line, column) = line_col(text, kind.span().start);
                problems.push(Problem {
                    file: file.to_string(),
                    line,
                    column,
                    message: format!("{section}: unknown kind `{kind_name}`"),
                    hint: Some(format!("use one of {kinds}")),
                });
            }
        }
    }
    fn check<'de, T: Deserialize<'de>>(
        v: toml::Spanned<toml::de::DeValue<'de>>,
    ) -> Option<Result<(), toml::de::Error>> {
        Some(T::deserialize(v.into_deserializer()).map(|_| ()))
    }
    let source = |kind: &str, v: toml::Spanned<toml::de::DeValue<'_>>| match kind {
        "mqtt" => check::<MqttSourceConfig>(v),
        "simulated" => check::<SimulatedSourceConfig>(v),
        "serial" => check::<SerialSourceConfig>(v),
        _ => None,
    };
    let rule = |kind: &str, v: toml::Spanned<toml::de::DeValue<'_>>| match kind {
        "threshold" => check::<ThresholdRuleConfig>(v),
        "rate_of_change" => check::<RateRuleConfig>(v),
        "flatline" => check::<FlatlineRuleConfig>(v),
        "missing_data" => check::<MissingRuleConfig>(v),
        "window" => check::<WindowRuleConfig>(v),
        "anomaly" => check::<AnomalyRuleConfig>(v),
        "all_of" | "any_of" => check::<CombineRuleConfig>(v),
        _ => None,
    };
    let upstream = |kind: &str, v: toml::Spanned<toml::de::DeValue<'_>>| match kind {
        "http" => check::<HttpUpstreamConfig>(v),
        "file" => check::<FileUpstreamConfig>(v),
        "mqtt" => check::<MqttUpstreamConfig>(v),
        _ => None,
    };
    let tagged_list = |value: &toml::Spanned<toml::de::DeValue<'_>>,
                       section: &str,
                       problems: &mut Vec<Problem>,
                       variant: &Variant<'_>,
                       kinds: &str| {
        match value.get_ref().as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    tagged(item, file, text, &format!("{section}[{i}]"), problems, variant, kinds);
                }
            }
            None => {
                let (line, column) = line_col(text, value.span().start);
                problems.push(Problem {
                    file: file.to_string(),
                    line,
                    column,
                    message: format!("{section}: expected a list of tables"),
                    hint: Some(format!("write each entry as a [[{section}]] table")),
                });
            }
        }
    };

    let mut seen = Vec::new();
    for (key, value) in root.get_ref().iter() {
        let name: &str = key.get_ref();
        seen.push(name.to_string());
        match name {
            "agent" => one::<AgentConfig>(value, file, text, name, problems),
            "storage" => one::<StorageConfig>(value, file, text, name, problems),
            "journal" => one::<JournalConfig>(value, file, text, name, problems),
            "sources" => {
                tagged_list(value, name, problems, &source, "\"mqtt\", \"simulated\", \"serial\"")
            }
            "rules" => tagged_list(value, name, problems, &rule, crate::rules::KINDS),
            "summary" => one::<SummaryConfig>(value, file, text, name, problems),
            "buffer" => one::<BufferConfig>(value, file, text, name, problems),
            "api" => one::<ApiConfig>(value, file, text, name, problems),
            "upstream" => {
                let kinds = "\"http\", \"mqtt\", \"file\"";
                tagged(value, file, text, name, problems, &upstream, kinds)
            }
            other => {
                let (line, column) = line_col(text, key.span().start);
                problems.push(Problem {
                    file: file.to_string(),
                    line,
                    column,
                    message: format!("unknown section `{other}`"),
                    hint: Some(
                        "sections are agent, storage, journal, sources, rules, summary, \
                         buffer, upstream, api"
                            .into(),
                    ),
                });
            }
        }
    }
    for required in ["agent", "upstream"] {
        if !seen.iter().any(|s| s == required) {
            problems.push(Problem {
                file: file.to_string(),
                line: 1,
                column: 1,
                message: format!("missing section `[{required}]`"),
                hint: Some(match required {
                    "agent" => "add `[agent]` with at least `id = \"my-gateway\"`".into(),
                    _ => "add `[upstream]` with `kind = \"http\"` and `url = ...`, \
                          `kind = \"mqtt\"` and `host = ...`, or `kind = \"file\"` and \
                          `path = ...`"
                        .into(),
                }),
            });
        }
    }
}

impl Problem {
    fn from_toml(file: &str, text: &str, e: &toml::de::Error, section: Option<&str>) -> Problem {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        let message = e.message().trim().to_string();
        let hint = hint_for(&message);
        Problem {
            file: file.to_string(),
            line,
            column,
            message: match section {
                Some(section) => format!("{section}: {message}"),
                None => message,
            },
            hint,
        }
    }
}

/// A hint for the common serde messages a technician meets.
fn hint_for(message: &str) -> Option<String> {
    if ["`password`", "`token`", "`bearer_token`"]
        .iter()
        .any(|key| message.contains(&format!("unknown field {key}")))
    {
        Some(
            "secrets are never written into the config file: use password_env / password_file \
             (token_env / token_file for a bearer token)"
                .into(),
        )
    } else if message.contains("unknown field `insecure_skip_verify`") {
        Some(
            "certificate verification cannot be turned off; to trust a private CA, give its \
             certificate in ca_file"
                .into(),
        )
    } else if message.contains("unknown field") {
        Some("check the spelling; every key is listed in config/reference.toml".into())
    } else if message.contains("missing field") {
        Some("this key has no default and must be set".into())
    } else if message.contains("unknown variant") {
        Some("use one of the values listed in the message".into())
    } else if message.contains("duration") || message.contains("time unit") {
        Some("durations look like \"500ms\", \"10s\", \"5m\", \"1h 30m\"".into())
    } else {
        None
    }
}

/// A semantic problem found by [`Config::validate`], located by its key path.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    /// Where: e.g. `rules[2].clear`.
    pub path: KeyPath,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

/// A path of keys and array indices into the document, e.g. `sources[0].topics[1]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyPath(pub Vec<Seg>);

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

impl KeyPath {
    /// Parses `a.b[2].c`.
    pub fn parse(path: &str) -> KeyPath {
        let mut segs = Vec::new();
        for part in path.split('.') {
            let mut rest = part;
            if let Some(open) = rest.find('[') {
                segs.push(Seg::Key(rest[..open].to_string()));
                rest = &rest[open..];
                while let Some(close) = rest.find(']') {
                    // Only a `[` opens an index: a key such as `a[1]]` (a label name quoted in
                    // TOML) leaves `]` here, where `rest[1..close]` would panic.
                    if let Some(Ok(i)) = rest[..close].strip_prefix('[').map(str::parse) {
                        segs.push(Seg::Index(i));
                    }
                    rest = &rest[close + 1..];
                }
            } else {
                segs.push(Seg::Key(rest.to_string()));
            }
        }
        KeyPath(segs)
    }

    /// The span of the deepest part of the path present in the document.
    pub fn locate(
        &self,
        root: &toml::Spanned<toml::de::DeTable<'_>>,
    ) -> Option<std::ops::Range<usize>> {
        let mut span = None;
        let mut current: Option<&toml::Spanned<toml::de::DeValue<'_>>> = None;
        for (i, seg) in self.0.iter().enumerate() {
            let next = match (seg, i, current) {
                (Seg::Key(k), 0, _) => root.get_ref().get(k.as_str()),
                (Seg::Key(k), _, Some(v)) => v.get_ref().get(k.as_str()),
                (Seg::Index(n), _, Some(v)) => v.get_ref().get(*n),
                _ => None,
            };
            match next {
                Some(v) => {
                    span = Some(v.span());
                    current = Some(v);
                }
                None => break,
            }
        }
        span
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
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

/// Shows a [`Problem`] as a warning: valid, but probably not what was meant.
#[derive(Debug)]
pub struct Warning<'a>(pub &'a Problem);

impl std::fmt::Display for Warning<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.0;
        write!(f, "{}:{}:{}: warning: {}", p.file, p.line, p.column, p.message)?;
        if let Some(hint) = &p.hint {
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

/// Smallest outbox that can hold a useful backlog; below it every batch would evict.
const MIN_BUFFER_BYTES: u64 = 16 * 1024;
/// Largest number of simulated series: the simulator is for demos and load tests.
const MAX_SIM_SERIES: u64 = 100_000;

impl Config {
    /// Checks what serde cannot: names, ranges, patterns, URLs. Returns every issue.
    pub fn validate(&self) -> Vec<Issue> {
        self.validate_for(Purpose::Run)
    }

    /// [`Config::validate`] for `purpose`.
    pub fn validate_for(&self, purpose: Purpose) -> Vec<Issue> {
        let mut issues = Vec::new();
        let mut issue = |path: String, message: String, hint: Option<&str>| {
            issues.push(Issue {
                path: KeyPath::parse(&path),
                message,
                hint: hint.map(str::to_string),
            })
        };

        let id = &self.agent.id;
        if id.is_empty()
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            issue(
                "agent.id".into(),
                format!("`{id}` is not a valid agent id"),
                Some("use letters, digits, `-`, `_` and `.` (it is part of record ids and topics)"),
            );
        }

        let j = &self.journal;
        if j.commit_interval > Duration::from_secs(1) {
            issue(
                "journal.commit_interval".into(),
                "must be at most 1s: QoS 1 messages wait this long for their acknowledgement"
                    .into(),
                Some("10ms is a good value on an SD card"),
            );
        }
        if j.commit_max_delay > Duration::from_secs(10) {
            issue(
                "journal.commit_max_delay".into(),
                "must be at most 10s: QoS 0 and serial events wait this long for the rules".into(),
                Some("100ms to 1s"),
            );
        }
        if j.commit_max_entries == 0 {
            issue("journal.commit_max_entries".into(), "must be at least 1".into(), None);
        }
        if j.tick_interval < Duration::from_millis(10) || j.tick_interval > Duration::from_secs(60)
        {
            issue(
                "journal.tick_interval".into(),
                "must be between 10ms and 1m: missing_data rules treat a clock gap over 10 min \
                 as a clock step"
                    .into(),
                None,
            );
        }
        if j.snapshot_interval < Duration::from_millis(100) {
            issue("journal.snapshot_interval".into(), "must be at least 100ms".into(), None);
        }

        if self.sources.is_empty() && purpose == Purpose::Run {
            issue(
                "sources".into(),
                "no source is configured: the agent would have nothing to do".into(),
                Some("add a [[sources]] table with kind = \"mqtt\" or kind = \"simulated\""),
            );
        }
        let mut names: Vec<&str> = Vec::new();
        for (i, source) in self.sources.iter().enumerate() {
            let at = |key: &str| format!("sources[{i}].{key}");
            if names.contains(&source.name()) {
                issue(
                    at("name"),
                    format!("duplicate source name `{}`", source.name()),
                    Some("give every source its own name (metrics and client ids use it)"),
                );
            }
            names.push(source.name());
            match source {
                SourceConfig::Mqtt(m) => {
                    if m.topics.is_empty() {
                        issue(at("topics"), "at least one topic filter is needed".into(), None);
                    }
                    for (t, topic) in m.topics.iter().enumerate() {
                        if let Err(reason) = check_topic_filter(topic) {
                            issue(
                                format!("sources[{i}].topics[{t}]"),
                                format!("`{topic}` is not a valid topic filter: {reason}"),
                                Some("`+` matches one level, `#` the rest (last level only)"),
                            );
                        }
                    }
                    if m.qos > 1 {
                        issue(
                            at("qos"),
                            format!("QoS {} is not supported", m.qos),
                            Some("use 1 (acknowledged after the journal commit) or 0"),
                        );
                    }
                    if let Err(reason) = crate::source::payload::SeriesTemplate::parse(&m.series) {
                        issue(
                            at("series"),
                            format!("bad series template: {reason}"),
                            Some("e.g. \"{topic}\" or \"{1}/{2}\" (topic segments from 0)"),
                        );
                    }
                    if m.payload.value.is_empty() {
                        issue(at("payload.value"), "the value path is empty".into(), None);
                    }
                    let auth = mqtt_auth_issues(
                        m.username.as_deref(),
                        m.password_source(),
                        m.tls.as_ref(),
                        purpose,
                        "sources",
                    );
                    for (key, message, hint) in auth {
                        issue(at(&key), message, hint);
                    }
                    if m.reconnect_min > m.reconnect_max {
                        issue(at("reconnect_min"), "must not exceed reconnect_max".into(), None);
                    }
                    if m.keep_alive < Duration::from_secs(5) {
                        issue(at("keep_alive"), "must be at least 5s".into(), None);
                    }
                }
                SourceConfig::Serial(s) => {
                    if s.framing == SerialFraming::Frames
                        && let Err(reason) = crate::source::serial::SeriesTemplate::parse(&s.series)
                    {
                        issue(
                            at("series"),
                            format!("bad series template: {reason}"),
                            Some("frames know {device}, {channel} and {unit}"),
                        );
                    }
                    if s.path.as_os_str().is_empty() {
                        issue(at("path"), "the device path is empty".into(), None);
                    }
                    if s.baud == 0 {
                        issue(at("baud"), "must be more than 0".into(), Some("e.g. 115200"));
                    }
                    if s.reconnect_min > s.reconnect_max {
                        issue(at("reconnect_min"), "must not exceed reconnect_max".into(), None);
                    }
                }
                SourceConfig::Simulated(s) => {
                    if s.devices == 0 || s.metrics.is_empty() {
                        issue(
                            at("devices"),
                            "needs at least one device and one metric".into(),
                            None,
                        );
                    } else if u64::from(s.devices) * s.metrics.len() as u64 > MAX_SIM_SERIES {
                        issue(
                            at("devices"),
                            format!("at most {MAX_SIM_SERIES} simulated series"),
                            None,
                        );
                    }
                    if s.interval < Duration::from_millis(1) {
                        issue(at("interval"), "must be at least 1ms".into(), None);
                    }
                }
            }
        }

        let mut rule_names: Vec<&str> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule_names.contains(&rule.name()) {
                issue(
                    format!("rules[{i}].name"),
                    format!("duplicate rule name `{}`", rule.name()),
                    Some("rule names identify alerts upstream: make them unique"),
                );
            }
            rule_names.push(rule.name());
            for (key, message) in crate::rules::validate(rule) {
                issue(format!("rules[{i}].{key}"), message, None);
            }
        }
        for (i, key, message) in crate::rules::validate_references(&self.rules) {
            issue(format!("rules[{i}].{key}"), message, None);
        }

        if self.summary.window < Duration::from_millis(100) {
            issue("summary.window".into(), "must be at least 100ms".into(), None);
        }
        if self.summary.window > Duration::from_secs(86_400) {
            issue("summary.window".into(), "must be at most 24h".into(), None);
        }

        if self.buffer.max_bytes.bytes() < MIN_BUFFER_BYTES {
            issue(
                "buffer.max_bytes".into(),
                format!("{} is too small", self.buffer.max_bytes),
                Some("at least 16 KiB; 64 MiB holds days of summaries for hundreds of series"),
            );
        }
        for (key, ttl) in
            [("alerts_ttl", self.buffer.alerts_ttl), ("summaries_ttl", self.buffer.summaries_ttl)]
        {
            if ttl.is_some_and(|ttl| ttl < Duration::from_secs(1)) {
                issue(format!("buffer.{key}"), "must be at least 1s (or \"off\")".into(), None);
            }
        }
        if let Some(to) = self.buffer.compact_to {
            let window = self.summary.window;
            let (to_ms, window_ms) = (to.as_millis(), window.as_millis());
            if window_ms > 0 && (to_ms % window_ms != 0 || to_ms <= window_ms) {
                issue(
                    "buffer.compact_to".into(),
                    format!(
                        "{} is not a multiple of summary.window ({}) larger than it",
                        humantime::format_duration(to),
                        humantime::format_duration(window)
                    ),
                    Some("e.g. \"5m\" for 1 min windows; leave it out for the default"),
                );
            }
        }

        match &self.upstream {
            UpstreamConfig::Http(h) => {
                match reqwest::Url::parse(&h.url) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                    Ok(url) => issue(
                        "upstream.url".into(),
                        format!("scheme `{}` is not supported", url.scheme()),
                        Some("use http:// or https://"),
                    ),
                    Err(e) => issue(
                        "upstream.url".into(),
                        format!("`{}` is not a URL: {e}", h.url),
                        Some("e.g. \"https://ingest.example.com/v1/batches\""),
                    ),
                }
                if h.retry_initial > h.retry_max {
                    issue(
                        "upstream.retry_initial".into(),
                        "must not exceed retry_max".into(),
                        None,
                    );
                }
                if h.timeout.is_zero() {
                    issue("upstream.timeout".into(), "must be more than 0s".into(), None);
                }
                for (key, message, hint) in http_upstream_issues(h, purpose) {
                    issue(format!("upstream.{key}"), message, hint);
                }
            }
            UpstreamConfig::File(f) => {
                if f.path.as_os_str().is_empty() {
                    issue("upstream.path".into(), "the path is empty".into(), None);
                }
            }
            UpstreamConfig::Mqtt(m) => {
                for (key, message, hint) in mqtt_upstream_issues(m, purpose) {
                    issue(format!("upstream.{key}"), message, hint);
                }
            }
        }
        let batch = self.upstream.batch();
        if batch.max_records == 0 {
            issue("upstream.batch.max_records".into(), "must be at least 1".into(), None);
        }
        if batch.max_bytes.bytes() < 1024 {
            issue("upstream.batch.max_bytes".into(), "must be at least 1 KiB".into(), None);
        }
        if batch.drain_rate.is_some_and(|rate| !(rate.is_finite() && rate > 0.0)) {
            issue(
                "upstream.batch.drain_rate".into(),
                "must be a number of records per second above 0".into(),
                Some("leave it out to send as fast as the upstream acknowledges"),
            );
        }
        for (key, message, hint) in api_issues(&self.api, purpose) {
            issue(format!("api.{key}"), message, hint);
        }
        issues
    }
}

/// Checks `[api]`: the address, and a token for a listener other than loopback (read only
/// for `Purpose::Run`).
fn api_issues(api: &ApiConfig, purpose: Purpose) -> Vec<UpstreamIssue> {
    let mut out = Vec::new();
    let address = match api.address() {
        Ok(address) => address,
        Err(message) => {
            out.push(("listen".into(), message, None));
            None
        }
    };
    match api.token_source() {
        Err(message) => out.push(("token_env".into(), message, None)),
        Ok(None) if address.is_some_and(|a| !a.ip().is_loopback()) => out.push((
            "token_env".into(),
            "a listener on a non-loopback address needs a token".into(),
            Some("set token_env or token_file, or listen on 127.0.0.1"),
        )),
        Ok(Some(source)) if purpose == Purpose::Run && address.is_some() => {
            check_secret(&source, "token", &mut out);
        }
        Ok(_) => {}
    }
    out
}

/// Most simulated series listed one by one for the pattern check; above it the device part of
/// each series counts as unknown (a cheap, still correct, approximation).
const MAX_LISTED_SIM_SERIES: u64 = 10_000;

impl Config {
    /// What is valid but probably not what the technician meant: today, a rule whose series
    /// pattern matches nothing the configured sources can produce.
    pub fn warnings(&self) -> Vec<Issue> {
        use crate::rules::pattern::Shape;
        let Some(shapes) = self.series_shapes() else { return Vec::new() };
        let mut issues = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(text) = rule.common().series else { continue };
            let Ok(pattern) = crate::rules::SeriesPattern::parse(text) else { continue };
            if !shapes.iter().any(|shape| pattern.could_match(shape)) {
                let example = shapes
                    .first()
                    .map(|shape| {
                        shape
                            .iter()
                            .map(|s| match s {
                                Shape::Literal(t) => t.as_str(),
                                Shape::Any => "+",
                                Shape::Rest => "#",
                            })
                            .collect::<Vec<_>>()
                            .join("/")
                    })
                    .unwrap_or_default();
                issues.push(Issue {
                    path: KeyPath::parse(&format!("rules[{i}].series")),
                    message: format!(
                        "`{text}` matches no series the configured sources produce (they look \
                         like `{example}`); the rule `{}` would never fire",
                        rule.name()
                    ),
                    hint: Some("check the pattern against the sources' series templates".into()),
                });
            }
        }
        issues
    }

    /// The shapes of the series keys every source can produce; `None` when one is unknown.
    fn series_shapes(&self) -> Option<Vec<Vec<crate::rules::pattern::Shape>>> {
        use crate::rules::pattern::Shape;
        let mut shapes = Vec::new();
        for source in &self.sources {
            match source {
                SourceConfig::Simulated(sim) => {
                    let listed = u64::from(sim.devices) * sim.metrics.len() as u64;
                    for metric in &sim.metrics {
                        if listed > MAX_LISTED_SIM_SERIES {
                            shapes.push(vec![Shape::Any, Shape::Literal(metric.clone())]);
                            continue;
                        }
                        for device in 1..=sim.devices {
                            shapes.push(vec![
                                Shape::Literal(format!("pump-{device}")),
                                Shape::Literal(metric.clone()),
                            ]);
                        }
                    }
                }
                SourceConfig::Mqtt(mqtt) => {
                    for filter in &mqtt.topics {
                        shapes.push(template_shape(&mqtt.series, filter)?);
                    }
                }
                // Lines name their own series: nothing can be told in advance.
                SourceConfig::Serial(_) => return None,
            }
        }
        Some(shapes)
    }
}

/// The series shape a template gives over a topic filter; `None` when it cannot be told.
fn template_shape(template: &str, filter: &str) -> Option<Vec<crate::rules::pattern::Shape>> {
    use crate::rules::pattern::Shape;
    let level = |l: &str| match l {
        "+" => Shape::Any,
        "#" => Shape::Rest,
        other => Shape::Literal(other.to_string()),
    };
    let levels: Vec<&str> = filter.split('/').collect();
    let mut shape = Vec::new();
    for part in template.split('/') {
        if part == "{topic}" {
            shape.extend(levels.iter().map(|l| level(l)));
        } else if let Some(n) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            let n: usize = n.parse().ok()?;
            match (levels.get(n), levels.iter().position(|l| *l == "#")) {
                (_, Some(hash)) if n >= hash => shape.push(Shape::Rest),
                (Some(l), _) => shape.push(level(l)),
                (None, _) => return None,
            }
        } else if part.contains('{') {
            shape.push(Shape::Any);
        } else {
            shape.push(Shape::Literal(part.to_string()));
        }
    }
    Some(shape)
}

/// Loads a configuration file for `purpose` and also returns its warnings, located.
pub fn load_with_warnings(
    path: &Path,
    purpose: Purpose,
) -> Result<(Config, Vec<Problem>), ConfigErrors> {
    let config = load_for(path, purpose)?;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let file = path.display().to_string();
    let warnings = locate(&file, &text, config.warnings());
    Ok((config, warnings))
}

/// Turns issues into problems with line and column in `text`.
pub fn locate(file: &str, text: &str, issues: Vec<Issue>) -> Vec<Problem> {
    let (root, _) = toml::de::DeTable::parse_recoverable(text);
    issues
        .into_iter()
        .map(|issue| {
            let (line, column) =
                issue.path.locate(&root).map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            Problem {
                file: file.to_string(),
                line,
                column,
                message: format!("{}: {}", issue.path, issue.message),
                hint: issue.hint,
            }
        })
        .collect()
}

/// One upstream problem: the key below `upstream`, what is wrong, how to fix it.
type UpstreamIssue = (String, String, Option<&'static str>);

/// Checks the auth and TLS keys of an HTTP upstream. Secrets and TLS files are read only
/// for `Purpose::Run`: replaying a recording on a laptop needs neither.
fn http_upstream_issues(h: &HttpUpstreamConfig, purpose: Purpose) -> Vec<UpstreamIssue> {
    let mut out = Vec::new();
    let run = purpose == Purpose::Run;
    match h.token_source() {
        Err(message) => out.push(("token_env".into(), message, None)),
        Ok(Some(source)) => {
            if h.basic.is_some() {
                out.push((
                    "basic".into(),
                    "set a bearer token or basic auth, not both".into(),
                    None,
                ));
            }
            if let Some(token) = run.then(|| check_secret(&source, "token", &mut out)).flatten()
                && reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .is_err()
            {
                out.push((
                    secret_key("token", &source),
                    "the token holds characters that cannot be sent in an HTTP header".into(),
                    Some("only a trailing newline is removed from a token file"),
                ));
            }
        }
        Ok(None) => {}
    }
    if let Some(basic) = &h.basic {
        if basic.username.is_empty() || basic.username.contains(':') {
            out.push((
                "basic.username".into(),
                "must not be empty and must not contain `:`".into(),
                None,
            ));
        }
        match basic.password_source() {
            Err(message) => out.push(("basic.password_env".into(), message, None)),
            Ok(source) if run => {
                check_secret(&source, "basic.password", &mut out);
            }
            Ok(_) => {}
        }
    }
    let https = reqwest::Url::parse(&h.url).is_ok_and(|url| url.scheme() == "https");
    if h.tls.is_some() && !https {
        out.push((
            "tls".into(),
            "TLS settings need an https:// url".into(),
            Some("use https:// in upstream.url, or remove [upstream.tls]"),
        ));
    } else if https && run {
        check_tls(h.tls.as_ref(), &mut out);
    }
    out
}

/// Checks an MQTT upstream: address, client id, topic, timings, credentials, TLS.
fn mqtt_upstream_issues(m: &MqttUpstreamConfig, purpose: Purpose) -> Vec<UpstreamIssue> {
    let mut out = Vec::new();
    let mut push = |key: &str, message: String, hint: Option<&'static str>| {
        out.push((key.to_string(), message, hint));
    };
    if m.host.trim().is_empty() {
        push("host", "the host is empty".into(), Some("e.g. \"mqtt.example.com\""));
    }
    if m.port == Some(0) {
        push("port", "must be between 1 and 65535".into(), None);
    }
    if m.client_id.as_deref().is_some_and(str::is_empty) {
        push("client_id", "the client id is empty".into(), Some("leave it out for the default"));
    }
    if let Err(reason) = crate::forward::mqtt::TopicTemplate::parse(&m.topic) {
        push(
            "topic",
            format!("bad topic template: {reason}"),
            Some("e.g. \"edgewise/{agent}/{lane}\""),
        );
    }
    if m.keep_alive < Duration::from_secs(5) {
        push("keep_alive", "must be at least 5s".into(), None);
    }
    if m.timeout < Duration::from_secs(1) {
        push("timeout", "must be at least 1s".into(), None);
    }
    if m.retry_initial > m.retry_max {
        push("retry_initial", "must not exceed retry_max".into(), None);
    }
    out.extend(mqtt_auth_issues(
        m.username.as_deref(),
        m.password_source(),
        m.tls.as_ref(),
        purpose,
        "upstream",
    ));
    out
}

/// Checks MQTT credentials and TLS (shared by MQTT sources and the MQTT upstream); `section`
/// names where `username` goes in the hint.
fn mqtt_auth_issues(
    username: Option<&str>,
    password: Result<Option<SecretSource>, String>,
    tls: Option<&TlsConfig>,
    purpose: Purpose,
    section: &'static str,
) -> Vec<UpstreamIssue> {
    let mut out = Vec::new();
    if username.is_some_and(str::is_empty) {
        out.push(("username".into(), "the user name is empty".into(), None));
    }
    match password {
        Err(message) => out.push(("password_env".into(), message, None)),
        Ok(Some(source)) => {
            if username.is_none() {
                out.push((
                    secret_key("password", &source),
                    "a password needs a username (MQTT 3.1.1)".into(),
                    Some(if section == "upstream" {
                        "set upstream.username"
                    } else {
                        "set the source's username"
                    }),
                ));
            }
            if purpose == Purpose::Run {
                check_secret(&source, "password", &mut out);
            }
        }
        Ok(None) => {}
    }
    if let Some(tls) = tls
        && purpose == Purpose::Run
    {
        check_tls(Some(tls), &mut out);
    }
    out
}

/// `<name>_env` or `<name>_file`, whichever `source` came from.
fn secret_key(name: &str, source: &SecretSource) -> String {
    match source {
        SecretSource::Env(_) => format!("{name}_env"),
        SecretSource::File(_) => format!("{name}_file"),
    }
}

/// Reads a secret as the agent will at start; a problem is reported at its key.
fn check_secret(source: &SecretSource, name: &str, out: &mut Vec<UpstreamIssue>) -> Option<Secret> {
    match source.resolve() {
        Ok(secret) => Some(secret),
        Err(message) => {
            let hint = match source {
                SecretSource::Env(_) => {
                    "set it in the agent's environment (systemd: Environment= or EnvironmentFile=)"
                }
                SecretSource::File(_) => "check the path and that the agent's user may read it",
            };
            out.push((secret_key(name, source), message, Some(hint)));
            None
        }
    }
}

/// Builds the TLS client configuration as the agent will at start (reads the CA, certificate
/// and key files, or the system's roots); a problem is reported at its key.
fn check_tls(tls: Option<&TlsConfig>, out: &mut Vec<UpstreamIssue>) {
    let default = TlsConfig::default();
    if let Err(e) = crate::forward::tls::client_config(tls.unwrap_or(&default)) {
        let key = match e.key() {
            Some(key) => format!("tls.{key}"),
            None => "tls".into(),
        };
        out.push((key, e.to_string(), e.hint()));
    }
}

/// Checks an MQTT topic filter: `#` only as the last level, wildcards fill a whole level.
fn check_topic_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("it is empty");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole level and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[agent]
id = "gw-1"

[[sources]]
kind = "simulated"

[upstream]
kind = "file"
path = "out.jsonl"
"#;

    #[test]
    fn a_minimal_file_gets_pi_sized_defaults() {
        let c = load_str("t.toml", MINIMAL).unwrap();
        assert_eq!(c.storage.cache_capacity, ByteSize(1 << 20));
        assert_eq!(c.buffer.max_bytes, ByteSize(64 << 20));
        assert_eq!(c.journal.max_bytes, ByteSize(8 << 20));
        assert_eq!(c.summary.window, Duration::from_secs(60));
        assert_eq!(c.journal.commit_interval, Duration::from_millis(10));
        assert_eq!(c.journal.commit_max_delay, Duration::from_millis(100));
    }

    #[test]
    fn the_api_needs_a_token_beyond_loopback() {
        let c = load_str("t.toml", MINIMAL).unwrap();
        assert_eq!(c.api.address(), Ok(Some(DEFAULT_API_LISTEN.parse().unwrap())));
        assert!(c.api.is_default_listen());
        let with = |api: &str| load_str("t.toml", &format!("{MINIMAL}\n[api]\n{api}\n"));
        assert_eq!(with("listen = \"off\"").unwrap().api.address(), Ok(None));
        assert!(with("listen = \"127.0.0.1:9000\"").is_ok(), "loopback needs no token");
        let errors = with("listen = \"0.0.0.0:9000\"").unwrap_err().to_string();
        assert!(errors.contains("api.token_env") && errors.contains("non-loopback"), "{errors}");
        let errors = with("listen = \"nowhere\"").unwrap_err().to_string();
        assert!(errors.contains("api.listen"), "{errors}");
        let errors =
            with("listen = \"0.0.0.0:9000\"\ntoken_env = \"EDGEWISE_TEST_UNSET_API_TOKEN\"")
                .unwrap_err()
                .to_string();
        assert!(errors.contains("EDGEWISE_TEST_UNSET_API_TOKEN"), "{errors}");
    }

    #[test]
    fn outage_policies_default_to_a_week_for_summaries_and_compaction_above_half() {
        let c = load_str("t.toml", MINIMAL).unwrap();
        assert_eq!(c.buffer.alerts_ttl, None, "alerts never expire by default");
        assert_eq!(c.buffer.summaries_ttl, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.buffer.compact_above, Some(Percent(50.0)));
        assert_eq!(c.buffer.compact_to, None);
        assert_eq!(c.upstream.batch().drain_rate, None, "unpaced by default");
    }

    #[test]
    fn outage_policies_are_read_and_off_turns_them_off() {
        let text = format!(
            "{MINIMAL}\n[upstream.batch]\ndrain_rate = 200\n\n[buffer]\nalerts_ttl = \"1h\"\n\
             summaries_ttl = \"off\"\ncompact_above = \"75%\"\ncompact_to = \"10m\"\n"
        );
        let c = load_str("t.toml", &text).unwrap();
        assert_eq!(c.buffer.alerts_ttl, Some(Duration::from_secs(3_600)));
        assert_eq!(c.buffer.summaries_ttl, None);
        assert_eq!(c.buffer.compact_above, Some(Percent(75.0)));
        assert_eq!(c.buffer.compact_above.unwrap().of(1_000), 750);
        assert_eq!(c.buffer.compact_to, Some(Duration::from_secs(600)));
        assert_eq!(c.upstream.batch().drain_rate, Some(200.0));
        let off = format!("{MINIMAL}\n[buffer]\ncompact_above = \"off\"\n");
        assert_eq!(load_str("t.toml", &off).unwrap().buffer.compact_above, None);
    }

    #[test]
    fn bad_outage_policies_are_reported_at_their_keys() {
        let with = |lines: &str| format!("{MINIMAL}\n[buffer]\n{lines}\n");
        let shown = load_str("t.toml", &with("compact_to = \"90s\"")).unwrap_err().to_string();
        assert!(
            shown.contains(
                "error: buffer.compact_to: 1m 30s is not a multiple of summary.window (1m) \
                 larger than it"
            ),
            "{shown}"
        );
        let shown = load_str("t.toml", &with("compact_to = \"1m\"")).unwrap_err().to_string();
        assert!(shown.contains("buffer.compact_to"), "equal to the window: {shown}");
        assert!(load_str("t.toml", &with("compact_to = \"5m\"")).is_ok());
        let shown = load_str("t.toml", &with("compact_above = \"150%\"")).unwrap_err().to_string();
        assert!(shown.contains("must be more than 0% and at most 100%"), "{shown}");
        let shown = load_str("t.toml", &with("compact_above = \"half\"")).unwrap_err().to_string();
        assert!(shown.contains("is not a percentage"), "{shown}");
        let shown = load_str("t.toml", &with("summaries_ttl = \"soon\"")).unwrap_err().to_string();
        assert!(shown.contains("`soon` is not a duration"), "{shown}");
        let shown = load_str("t.toml", &with("alerts_ttl = \"10ms\"")).unwrap_err().to_string();
        assert!(shown.contains("error: buffer.alerts_ttl: must be at least 1s"), "{shown}");
        let paced = format!("{MINIMAL}\n[upstream.batch]\ndrain_rate = 0\n");
        let shown = load_str("t.toml", &paced).unwrap_err().to_string();
        assert!(shown.contains("error: upstream.batch.drain_rate: must be a number"), "{shown}");
    }

    #[test]
    fn byte_sizes_accept_units() {
        assert_eq!(ByteSize::parse("16 MiB"), Ok(ByteSize(16 << 20)));
        assert_eq!(ByteSize::parse("512KiB"), Ok(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("1 GB"), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("12 parsecs").is_err());
    }

    #[test]
    fn every_problem_is_reported_with_line_and_column() {
        let text = r#"[agent]
id = "gw 1"
colour = "blue"

[[sources]]
kind = "mqtt"
topics = ["a/#/b"]
qos = 2

[[rules]]
kind = "threshold"
name = "hot"
series = "+/temp"
above = "eighty"

[upstream]
kind = "http"
url = "ftp://x"
"#;
        let errors = load_str("gw.toml", text).unwrap_err();
        let shown = errors.to_string();
        // serde-level problems in two sections are both reported in one pass
        assert!(shown.contains("gw.toml:3:1: error: agent: unknown field `colour`"), "{shown}");
        assert!(shown.contains("gw.toml:14:"), "{shown}");
        assert_eq!(errors.problems.len(), 2, "{shown}");
    }

    #[test]
    fn semantic_problems_point_at_their_key() {
        let text = r#"[agent]
id = "gw 1"

[[sources]]
kind = "mqtt"
topics = ["a/#/b"]
qos = 2

[upstream]
kind = "http"
url = "ftp://x"
"#;
        let errors = load_str("gw.toml", text).unwrap_err();
        let shown = errors.to_string();
        assert!(shown.contains("gw.toml:2:6: error: agent.id"), "{shown}");
        assert!(shown.contains("gw.toml:6:11: error: sources[0].topics[0]"), "{shown}");
        assert!(shown.contains("gw.toml:7:7: error: sources[0].qos"), "{shown}");
        assert!(shown.contains("gw.toml:11:7: error: upstream.url"), "{shown}");
        assert_eq!(errors.problems.len(), 4, "{shown}");
    }

    #[test]
    fn a_syntax_error_is_located() {
        let errors = load_str("x.toml", "[agent\nid = 1\n").unwrap_err();
        assert_eq!(errors.problems[0].line, 1, "{errors}");
    }

    #[test]
    fn missing_sections_are_named() {
        let errors = load_str("x.toml", "[agent]\nid = \"a\"\n").unwrap_err();
        assert!(errors.to_string().contains("missing section `[upstream]`"), "{errors}");
    }

    #[test]
    fn a_rule_pattern_that_matches_no_source_series_is_a_warning() {
        let text = r#"[agent]
id = "gw"

[[sources]]
kind = "mqtt"
topics = ["plant/line3/+/temperature", "plant/line3/+/vibration"]
series = "{2}/{3}"

[[rules]]
kind = "threshold"
name = "typo"
series = "pump-*/temprature"
above = 1.0

[[rules]]
kind = "threshold"
name = "fine"
series = "pump-*/temperature"
above = 1.0

[upstream]
kind = "file"
path = "x"
"#;
        let config = load_str("gw.toml", text).unwrap();
        let warnings = locate("gw.toml", text, config.warnings());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let shown = Warning(&warnings[0]).to_string();
        assert!(shown.starts_with("gw.toml:12:10: warning: rules[0].series"), "{shown}");
        assert!(warnings[0].message.contains("look like `+/temperature`"), "{shown}");
    }

    #[test]
    fn simulated_series_are_known_exactly() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[[rules]]\nkind = \"threshold\"\nname = \"r\"\nseries = \"fan-*/#\"\nabove = 1.0\n\n[upstream]",
        );
        let config = load_str("t.toml", &text).unwrap();
        assert_eq!(config.warnings().len(), 1);
        let text = text.replace("fan-*/#", "pump-2/vibration");
        assert!(load_str("t.toml", &text).unwrap().warnings().is_empty());
    }

    #[test]
    fn a_serial_series_template_is_checked_at_its_key() {
        let text = MINIMAL.replace(
            "kind = \"simulated\"",
            "kind = \"serial\"\npath = \"/dev/ttyUSB0\"\nseries = \"dev-{devise}\"",
        );
        let shown = load_str("s.toml", &text).unwrap_err().to_string();
        assert!(
            shown.contains("s.toml:8:10: error: sources[0].series: bad series template"),
            "{shown}"
        );
    }

    fn serial(lines: &str) -> String {
        MINIMAL.replace(
            "kind = \"simulated\"",
            &format!("kind = \"serial\"\npath = \"/dev/ttyUSB0\"\n{lines}"),
        )
    }

    fn serial_source(config: &Config) -> &SerialSourceConfig {
        match &config.sources[0] {
            SourceConfig::Serial(s) => s,
            other => panic!("not serial: {other:?}"),
        }
    }

    #[test]
    fn serial_line_settings_default_to_8n1_and_accept_8e1_and_7o2() {
        let c = load_str("s.toml", &serial("")).unwrap();
        let s = serial_source(&c);
        assert_eq!(
            (s.parity, s.data_bits, s.stop_bits),
            (SerialParity::None, SerialDataBits::Eight, SerialStopBits::One)
        );
        let c =
            load_str("s.toml", &serial("parity = \"even\"\ndata_bits = 8\nstop_bits = 1")).unwrap();
        let s = serial_source(&c);
        assert_eq!(
            (s.parity, s.data_bits, s.stop_bits),
            (SerialParity::Even, SerialDataBits::Eight, SerialStopBits::One)
        );
        let c =
            load_str("s.toml", &serial("parity = \"odd\"\ndata_bits = 7\nstop_bits = 2")).unwrap();
        let s = serial_source(&c);
        assert_eq!(
            (s.parity, s.data_bits, s.stop_bits),
            (SerialParity::Odd, SerialDataBits::Seven, SerialStopBits::Two)
        );
        for (n, bits) in [(5, SerialDataBits::Five), (6, SerialDataBits::Six)] {
            let c = load_str("s.toml", &serial(&format!("data_bits = {n}"))).unwrap();
            assert_eq!(serial_source(&c).data_bits, bits);
        }
    }

    #[test]
    fn a_bad_serial_line_setting_is_reported_at_its_value_with_the_valid_ones() {
        // serde stops at the first error of a table, as for every other key.
        let cases = [
            (
                "parity = \"mark\"",
                "s.toml:8:10: error: sources[0]: unknown variant `mark`, expected one of `none`, `even`, `odd`",
            ),
            (
                "data_bits = 9",
                "s.toml:8:13: error: sources[0]: data_bits must be 5, 6, 7 or 8, not 9",
            ),
            (
                "data_bits = 4",
                "s.toml:8:13: error: sources[0]: data_bits must be 5, 6, 7 or 8, not 4",
            ),
            ("stop_bits = 0", "s.toml:8:13: error: sources[0]: stop_bits must be 1 or 2, not 0"),
            (
                "stop_bits = 1.5",
                "s.toml:8:13: error: sources[0]: invalid type: floating point `1.5`",
            ),
            ("data_bits = \"8\"", "s.toml:8:13: error: sources[0]: invalid type: string \"8\""),
        ];
        for (line, expected) in cases {
            let errors = load_str("s.toml", &serial(line)).unwrap_err();
            let shown = errors.to_string();
            assert!(shown.contains(expected), "{line}: {shown}");
            assert_eq!(errors.problems.len(), 1, "{shown}");
        }
    }
}

/// The `[upstream]` keys of the MQTT sink, authentication and TLS.
#[cfg(test)]
mod upstream_tests {
    use super::*;

    const HEAD: &str = "[agent]\nid = \"gw-1\"\n\n[[sources]]\nkind = \"simulated\"\n\n";

    fn load(upstream: &str) -> Result<Config, ConfigErrors> {
        load_str("u.toml", &format!("{HEAD}{upstream}"))
    }

    fn error(upstream: &str) -> String {
        load(upstream).unwrap_err().to_string()
    }

    fn mqtt(config: &Config) -> &MqttUpstreamConfig {
        match &config.upstream {
            UpstreamConfig::Mqtt(m) => m,
            other => panic!("not mqtt: {other:?}"),
        }
    }

    #[test]
    fn an_mqtt_upstream_needs_only_a_host() {
        let config = load("[upstream]\nkind = \"mqtt\"\nhost = \"broker.example\"\n").unwrap();
        let m = mqtt(&config);
        assert_eq!(m.port(), 1883);
        assert_eq!(m.client_id("gw-1"), "edgewise-gw-1-up");
        assert_eq!(m.topic, "edgewise/{agent}/{lane}");
        assert_eq!((m.format, m.compression), (sensors::wire::Format::Json, Compression::Zstd));
        assert_eq!(m.timeout, Duration::from_secs(10));
        assert!(m.tls.is_none());
        // TLS moves the default port (parsed only: validation would read the system roots).
        let with_tls = Config::from_toml(&format!(
            "{HEAD}[upstream]\nkind = \"mqtt\"\nhost = \"b\"\n[upstream.tls]\n"
        ))
        .unwrap();
        assert_eq!(mqtt(&with_tls).port(), 8883);
    }

    #[test]
    fn mqtt_settings_are_checked_at_their_keys() {
        let shown = error(
            "[upstream]\nkind = \"mqtt\"\nhost = \"\"\ntopic = \"up/#\"\nkeep_alive = \"1s\"\n\
             password_file = \"/x\"\n",
        );
        assert!(shown.contains("u.toml:9:8: error: upstream.host: the host is empty"), "{shown}");
        assert!(
            shown.contains("u.toml:10:9: error: upstream.topic: bad topic template"),
            "{shown}"
        );
        assert!(shown.contains("u.toml:11:14: error: upstream.keep_alive"), "{shown}");
        assert!(
            shown.contains(
                "u.toml:12:17: error: upstream.password_file: a password needs a username"
            ),
            "{shown}"
        );
    }

    #[test]
    fn a_secret_written_inline_is_refused_with_a_hint_and_never_echoed() {
        for key in ["password", "token", "bearer_token"] {
            let kind =
                if key == "password" { "mqtt\"\nhost = \"b" } else { "http\"\nurl = \"http://x" };
            let shown = error(&format!("[upstream]\nkind = \"{kind}\"\n{key} = \"hunter2\"\n"));
            assert!(shown.contains(&format!("unknown field `{key}`")), "{shown}");
            assert!(shown.contains("use password_env / password_file"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn a_secret_that_cannot_be_read_is_an_error_at_its_key() {
        let var = "EDGEWISE_TEST_VARIABLE_THAT_IS_NEVER_SET";
        let shown = error(&format!(
            "[upstream]\nkind = \"mqtt\"\nhost = \"b\"\nusername = \"u\"\npassword_env = \"{var}\"\n"
        ));
        assert!(
            shown.contains(&format!(
                "u.toml:11:16: error: upstream.password_env: environment variable `{var}` is not set"
            )),
            "{shown}"
        );
        assert!(shown.contains("hint: set it in the agent's environment"), "{shown}");
        let shown = error(
            "[upstream]\nkind = \"http\"\nurl = \"http://x\"\n\
             basic = { username = \"u\", password_file = \"/nonexistent/pw\" }\n",
        );
        assert!(shown.contains("u.toml:10:"), "{shown}");
        assert!(
            shown.contains("upstream.basic.password_file: cannot read secret file /nonexistent/pw"),
            "{shown}"
        );
    }

    #[test]
    fn secrets_are_read_from_files_without_the_trailing_newline_and_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc.def\r\n").unwrap();
        let secret = SecretSource::File(path.clone()).resolve().unwrap();
        assert_eq!(secret.expose(), "abc.def");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        std::fs::write(&path, "\n").unwrap();
        assert!(SecretSource::File(path.clone()).resolve().unwrap_err().contains("is empty"));
        std::fs::write(&path, vec![b'x'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        assert!(SecretSource::File(path.clone()).resolve().unwrap_err().contains("larger than"));
        let upstream = format!(
            "[upstream]\nkind = \"http\"\nurl = \"http://x\"\ntoken_file = {:?}\n",
            path.display().to_string()
        );
        std::fs::write(&path, "abc.def\n").unwrap();
        let config = load(&upstream).unwrap();
        assert!(!format!("{config:?}").contains("abc.def"), "the config holds no secret");
    }

    #[test]
    fn offline_use_reads_no_secret() {
        let text = format!(
            "{HEAD}[upstream]\nkind = \"http\"\nurl = \"http://x\"\n\
             token_env = \"EDGEWISE_TEST_VARIABLE_THAT_IS_NEVER_SET\"\n"
        );
        assert!(load_str_for("u.toml", &text, Purpose::Offline).is_ok());
        assert!(load_str_for("u.toml", &text, Purpose::Run).is_err());
    }

    #[test]
    fn auth_and_tls_combinations_are_checked() {
        let shown = error(
            "[upstream]\nkind = \"http\"\nurl = \"http://x\"\ntoken_env = \"A\"\ntoken_file = \"/t\"\n",
        );
        assert!(shown.contains("set token_env or token_file, not both"), "{shown}");
        let shown = error(
            "[upstream]\nkind = \"http\"\nurl = \"http://x\"\n[upstream.tls]\nca_file = \"/ca.pem\"\n",
        );
        assert!(
            shown.contains("u.toml:10:1: error: upstream.tls: TLS settings need an https:// url"),
            "{shown}"
        );
        let shown = error(
            "[upstream]\nkind = \"mqtt\"\nhost = \"b\"\n[upstream.tls]\ninsecure_skip_verify = true\n",
        );
        assert!(shown.contains("unknown field `insecure_skip_verify`"), "{shown}");
        assert!(shown.contains("certificate verification cannot be turned off"), "{shown}");
    }

    #[test]
    fn an_unreadable_ca_file_is_an_error_at_its_key() {
        let shown = error(
            "[upstream]\nkind = \"mqtt\"\nhost = \"b\"\n[upstream.tls]\n\
             ca_file = \"/nonexistent/ca.pem\"\n",
        );
        assert!(
            shown.contains(
                "u.toml:11:11: error: upstream.tls.ca_file: cannot read /nonexistent/ca.pem"
            ),
            "{shown}"
        );
        let shown = error("[upstream]\nkind = \"https\"\nurl = \"https://x\"\n");
        assert!(shown.contains("unknown kind `https`"), "{shown}");
        assert!(shown.contains("\"http\", \"mqtt\", \"file\""), "{shown}");
    }
}
