//! The `edgewise` command line: `run`, `check`, `replay`, `journal export`, `collect`,
//! `status`, `--version`.
//!
//! Exit status: 0 on success, 2 for a usage, configuration or input-file error (fix the
//! command or the file), 1 for a failure while working.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgewise::config::{self, Config, ConfigErrors};
use edgewise::replay;
use tracing_subscriber::filter::{LevelFilter, Targets};

/// The configuration `edgewise run` uses without `--config`: simulated pumps, threshold rules,
/// 10 s summaries, and a JSON-lines file as the upstream. Needs nothing else installed.
const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

#[derive(Debug, Parser)]
#[command(name = "edgewise", version, about = "Event aggregation agent for edge and IoT gateways")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Configuration file. Without it, the embedded demo configuration runs (simulated
        /// sensors, upstream = ./edgewise-out/upstream.jsonl).
        #[arg(long, short, env = "EDGEWISE_CONFIG")]
        config: Option<PathBuf>,
        /// Stop by itself after this long (e.g. `30s`); for demos and smoke tests.
        #[arg(long, value_parser = humantime::parse_duration)]
        exit_after: Option<Duration>,
    },
    /// Validate a configuration file: prints every problem with file:line:column and a hint.
    /// Exit status 0 when valid, 2 when not.
    Check {
        /// Configuration file.
        #[arg(long, short, env = "EDGEWISE_CONFIG")]
        config: PathBuf,
    },
    /// Run the configured rules and summaries over a recording, in event time, as fast as
    /// possible; prints alerts and summaries.
    ///
    /// Recordings are JSON lines ({"ts": ms | s | RFC 3339, "series": "...", "value": 1.5})
    /// or CSV (timestamp,series,value or timestamp,value with --series; header optional).
    Replay {
        /// Configuration file (its rules, summaries and journal.tick_interval are used).
        #[arg(long, short, env = "EDGEWISE_CONFIG")]
        config: PathBuf,
        /// The recording (.jsonl or .csv; other names are sniffed).
        #[arg(long, short)]
        input: PathBuf,
        /// Series name for readings that have none (a timestamp,value CSV).
        #[arg(long)]
        series: Option<String>,
        /// Output: an aligned table, or JSON lines (one record per line, counts on stderr).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write timestamp,value,anomaly_score per scored event to this CSV.
        #[arg(long, value_name = "OUT.csv")]
        scores: Option<PathBuf>,
        /// Replay with this configuration too and show which alerts appear, disappear or move.
        #[arg(long, value_name = "OTHER.toml")]
        against: Option<PathBuf>,
        /// Do not draw the progress line (it is drawn only when stderr is a terminal).
        #[arg(long)]
        no_progress: bool,
    },
    /// Work with the agent's journal (the agent must be stopped).
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Receive batches as a backend would (a reference receiver): POST to any path, JSON or
    /// the compact format, identity, zstd or gzip. Verifies each batch, drops records already
    /// written (by id) and appends new ones to a JSON-lines file; one log line per batch.
    /// Stops on SIGTERM or SIGINT.
    Collect {
        /// Address to listen on (port 0 picks a free one; the URL is printed on stdout).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
        /// JSON-lines file that new records are appended to, one record per line (created if
        /// missing; the records in it are remembered, so a restart writes no resent batch twice).
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
        /// Largest request body as received (compressed): `16 MiB`, `512 KiB`, bytes.
        #[arg(long, default_value = "16 MiB", value_name = "SIZE", value_parser = parse_size)]
        max_body: usize,
    },
    /// Show the running agent's status and active alerts (from its local API).
    Status {
        /// The agent's configuration: its `[api] listen` address and token.
        #[arg(long, short, env = "EDGEWISE_CONFIG")]
        config: Option<PathBuf>,
        /// The API's address (default: `[api] listen` of --config, else 127.0.0.1:9898).
        #[arg(long, value_name = "ADDR")]
        api: Option<SocketAddr>,
        /// Environment variable holding the API's bearer token (default: the config's).
        #[arg(long, value_name = "VAR")]
        token_env: Option<String>,
    },
}

/// `--max-body`: a size with a unit, as in the configuration.
fn parse_size(text: &str) -> Result<usize, String> {
    let size = config::ByteSize::parse(text)?;
    usize::try_from(size.bytes()).map_err(|_| format!("{text} is too large"))
}

#[derive(Debug, Subcommand)]
enum JournalCommand {
    /// Write the journal's events as a JSON-lines recording, for `edgewise replay`.
    Export {
        /// Configuration file (for agent.data_dir).
        #[arg(long, short, env = "EDGEWISE_CONFIG")]
        config: PathBuf,
        /// The recording to write (`-` for stdout).
        #[arg(long, short, value_name = "RECORDING.jsonl")]
        out: PathBuf,
        /// Earliest event time: RFC 3339 (2024-06-10T06:00:00Z) or a duration ago (2h).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Latest event time (exclusive), as --from.
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Only series matching this pattern (`pump-*/temperature`, `site/+/#`).
        #[arg(long, value_name = "PATTERN")]
        series: Option<String>,
        /// Read this data directory instead of agent.data_dir (e.g. a copy).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// `--format` of `replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// An aligned table.
    Table,
    /// JSON lines.
    Jsonl,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            match config::load_with_warnings(&config, config::Purpose::Run) {
                Ok((c, warnings)) => {
                    for warning in &warnings {
                        eprintln!("{}", config::Warning(warning));
                    }
                    println!(
                        "{}: ok ({} source(s), {} rule(s), upstream {})",
                        config.display(),
                        c.sources.len(),
                        c.rules.len(),
                        upstream_kind(&c)
                    );
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config, exit_after } => {
            malloc::tune_or_continue();
            init_logging();
            malloc::log();
            let loaded = match &config {
                Some(path) => config::load_with_warnings(path, config::Purpose::Run),
                None => {
                    config::load_str("<embedded demo config>", DEMO_CONFIG).map(|c| (c, Vec::new()))
                }
            };
            let (loaded, warnings) = match loaded {
                Ok(c) => c,
                Err(errors) => return config_error(&errors),
            };
            for warning in &warnings {
                tracing::warn!("{}", config::Warning(warning));
            }
            run(loaded, config, exit_after)
        }
        Command::Replay { config, input, series, format, scores, against, no_progress } => {
            init_quiet_logging();
            let args = ReplayArgs { config, input, series, format, scores, against, no_progress };
            replay(&args)
        }
        Command::Journal {
            command: JournalCommand::Export { config, out, from, to, series, data_dir },
        } => {
            init_quiet_logging();
            export(&ExportArgs { config, out, from, to, series, data_dir })
        }
        Command::Collect { listen, out, max_body } => {
            init_logging();
            collect(&edgewise::collect::CollectOptions { listen, out, max_body })
        }
        Command::Status { config, api, token_env } => status(config, api, token_env),
    }
}

/// `edgewise status`: GETs `/api/v1/status` and `/api/v1/alerts` and prints a table.
fn status(config: Option<PathBuf>, api: Option<SocketAddr>, token_env: Option<String>) -> ExitCode {
    let loaded = match &config {
        Some(path) => match config::load_for(path, config::Purpose::Offline) {
            Ok(c) => Some(c),
            Err(errors) => return config_error(&errors),
        },
        None => None,
    };
    let addr = match (api, &loaded) {
        (Some(addr), _) => addr,
        (None, Some(c)) => match c.api.address() {
            Ok(Some(addr)) => addr,
            Ok(None) => {
                eprintln!("edgewise status: the API is off in this configuration ([api] listen)");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("edgewise status: [api] listen: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => match config::DEFAULT_API_LISTEN.parse() {
            Ok(addr) => addr,
            Err(_) => return ExitCode::FAILURE,
        },
    };
    let source = match token_env {
        Some(var) => Ok(Some(config::SecretSource::Env(var))),
        None => loaded.as_ref().map_or(Ok(None), |c| c.api.token_source()),
    };
    let token = match source.and_then(|s| s.map(|s| s.resolve()).transpose()) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("edgewise status: token: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fetch_status(addr, token.as_ref())) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgewise status: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long `edgewise status` waits for the agent: it answers from memory, at once.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

async fn fetch_status(addr: SocketAddr, token: Option<&config::Secret>) -> Result<String, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let get = |path: &'static str| {
        let mut request = client.get(format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token.expose());
        }
        async move {
            let response = request.send().await.map_err(|e| {
                if e.is_connect() || e.is_timeout() {
                    format!("no agent answering at {addr} (is it running, with [api] listen = \"{addr}\"?)")
                } else {
                    format!("GET {path} from {addr}: {e}")
                }
            })?;
            let code = response.status();
            let body = response.text().await.map_err(|e| format!("GET {path}: {e}"))?;
            if !code.is_success() {
                return Err(format!("GET {path} from {addr}: {code}: {}", body.trim()));
            }
            Ok(body)
        }
    };
    let status: edgewise::api::Status = serde_json::from_str(&get("/api/v1/status").await?)
        .map_err(|e| format!("unexpected /api/v1/status answer: {e}"))?;
    let alerts: edgewise::readmodel::AlertsView =
        serde_json::from_str(&get("/api/v1/alerts").await?)
            .map_err(|e| format!("unexpected /api/v1/alerts answer: {e}"))?;
    Ok(edgewise::api::format_status(&status, &alerts))
}

/// `edgewise collect`: serves until SIGTERM/SIGINT, then prints the totals.
fn collect(options: &edgewise::collect::CollectOptions) -> ExitCode {
    use std::io::Write;

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("edgewise-collect")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ready = |addr: SocketAddr| {
        // The one line on stdout: scripts and tests read the URL (and the port) from it.
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening on http://{addr}/ingest");
        let _ = stdout.flush();
    };
    match runtime.block_on(edgewise::collect::run(options, ready, signal())) {
        Ok(totals) => {
            tracing::info!(
                batches = totals.batches,
                written = totals.written,
                duplicates = totals.duplicates,
                refused = totals.refused,
                "collect stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgewise collect: {}", edgewise::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The arguments of `replay`.
#[derive(Debug)]
struct ReplayArgs {
    config: PathBuf,
    input: PathBuf,
    series: Option<String>,
    format: Format,
    scores: Option<PathBuf>,
    against: Option<PathBuf>,
    no_progress: bool,
}

fn replay(args: &ReplayArgs) -> ExitCode {
    use std::io::IsTerminal;
    use std::io::Write;

    let base = match load_without_sources(&args.config) {
        Ok(c) => c,
        Err(errors) => return config_error(&errors),
    };
    let other = match args.against.as_deref().map(load_without_sources).transpose() {
        Ok(c) => c,
        Err(errors) => return config_error(&errors),
    };
    let base_name = args.config.display().to_string();
    let other_name = args.against.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let options = replay::ReplayOptions {
        input: args.input.clone(),
        series: args.series.clone(),
        format: match args.format {
            Format::Table => replay::OutputFormat::Table,
            Format::Jsonl => replay::OutputFormat::JsonLines,
        },
        scores: args.scores.clone(),
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        records_on_terminal: std::io::stdout().is_terminal(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = std::io::stderr();
    let result = replay::run(
        replay::Named { name: &base_name, config: &base },
        other.as_ref().map(|config| replay::Named { name: &other_name, config }),
        &options,
        &mut out,
        &mut err,
    );
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            eprintln!("edgewise replay: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

/// Loads a configuration for `replay` and `journal export`, which need no source: a file
/// written only to try rules on a recording, or to name a data directory, is valid without
/// one. Every other problem is still reported.
fn load_without_sources(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    config::load_for(path, config::Purpose::Offline)
}

/// The arguments of `journal export`.
#[derive(Debug)]
struct ExportArgs {
    config: PathBuf,
    out: PathBuf,
    from: Option<String>,
    to: Option<String>,
    series: Option<String>,
    data_dir: Option<PathBuf>,
}

fn export(args: &ExportArgs) -> ExitCode {
    use edgewise::recording::{self, ExportFilter};

    let config = match load_without_sources(&args.config) {
        Ok(c) => c,
        Err(errors) => return config_error(&errors),
    };
    let fail = |e: recording::RecordingError| {
        eprintln!("edgewise journal export: {e}");
        ExitCode::from(if e.is_usage() { 2 } else { 1 })
    };
    let now = edgewise::event::now_ms();
    let bound = |text: &Option<String>| text.as_deref().map(|t| recording::parse_time(t, now));
    let filter = match (bound(&args.from).transpose(), bound(&args.to).transpose()) {
        (Ok(from_ms), Ok(to_ms)) => ExportFilter { from_ms, to_ms, series: None },
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let filter = match args.series.as_deref().map(|p| filter.clone().with_series(p)) {
        None => filter,
        Some(Ok(filter)) => filter,
        Some(Err(e)) => return fail(e),
    };
    let data_dir = args.data_dir.as_ref().unwrap_or(&config.agent.data_dir);
    let report = if args.out.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        recording::export_journal(data_dir, &filter, &mut out, &args.out)
    } else {
        let write_error =
            |source| recording::RecordingError::Write { path: args.out.clone(), source };
        let mut file = match replay::AtomicFile::create(&args.out) {
            Ok(file) => file,
            Err(source) => return fail(write_error(source)),
        };
        // Dropped uncommitted on error: the partial file goes away.
        recording::export_journal(data_dir, &filter, file.writer(), &args.out)
            .and_then(|report| file.commit().map(|()| report).map_err(write_error))
    };
    match report {
        Ok(report) => {
            let span = report.span_ms.map_or(String::new(), |(from, to)| {
                format!(", {} to {}", recording::format_ms(from), recording::format_ms(to))
            });
            eprintln!(
                "exported {} of {} journal events{span} to {}",
                report.exported,
                report.journal_events,
                args.out.display()
            );
            if report.corrupt > 0 {
                eprintln!("skipped {} journal chunks that do not decode", report.corrupt);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn upstream_kind(c: &Config) -> String {
    match &c.upstream {
        config::UpstreamConfig::Http(h) => format!("http {}", h.url),
        config::UpstreamConfig::File(f) => format!("file {}", f.path.display()),
        config::UpstreamConfig::Mqtt(m) => format!("mqtt {}:{}", m.host, m.port()),
    }
}

fn config_error(errors: &ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    ExitCode::from(2)
}

/// glibc's malloc, tuned for a long-running agent in a few MB (BENCHMARKS.md, "Memory,
/// session 7", "session 8" and "session 9"): one arena instead of eight per core, and a fixed mmap
/// threshold, so that large blocks (sled's 512 KiB I/O buffers, a window close's outputs) get
/// their own mappings, returned on free, instead of fragmenting the heap once glibc's dynamic
/// threshold has grown past them (10,000 series: 86 MB with glibc's defaults, 47 MB tuned).
///
/// glibc reads these settings from the environment at startup only, and setting them from
/// inside needs `mallopt` (unsafe FFI). So `edgewise run` re-executes itself once with them
/// (same PID, same arguments: systemd and supervisors see one process) unless the environment
/// already says something about malloc: any of the variables set (the systemd unit sets them
/// too), `GLIBC_TUNABLES`, or `EDGEWISE_MALLOC=default` to keep glibc's defaults.
mod malloc {
    use edgewise::MALLOC_TUNING as TUNING;

    /// Whether the environment already decides about malloc.
    fn decided() -> bool {
        TUNING.iter().any(|(name, _)| std::env::var_os(name).is_some())
            || std::env::var_os("GLIBC_TUNABLES").is_some()
            || std::env::var_os("EDGEWISE_MALLOC").is_some()
    }

    /// Re-executes the agent with [`TUNING`] unless the environment decided already; returns
    /// (with a warning) only if that is impossible, and the agent runs with glibc's defaults.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn tune_or_continue() {
        use std::os::unix::process::CommandExt;
        if decided() {
            return;
        }
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(error) => {
                eprintln!("edgewise: malloc tuning skipped: cannot find my executable: {error}");
                return;
            }
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(&exe);
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        let error = command.args(args).envs(TUNING).exec();
        eprintln!(
            "edgewise: malloc tuning skipped: cannot re-execute {}: {error}; running with glibc's \
             defaults (set EDGEWISE_MALLOC=default to skip the attempt)",
            exe.display()
        );
    }

    /// Other C libraries (musl) ignore these variables: nothing to do.
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn tune_or_continue() {}

    /// Logs what malloc runs with.
    pub fn log() {
        let tuned: Vec<String> = TUNING
            .iter()
            .filter_map(|(name, _)| std::env::var(name).ok().map(|value| format!("{name}={value}")))
            .collect();
        if tuned.is_empty() {
            tracing::info!("malloc: not tuned by edgewise (EDGEWISE_MALLOC or GLIBC_TUNABLES set)");
        } else {
            tracing::info!(tuning = %tuned.join(" "), "malloc tuned");
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(fmt).with(log_filter(LevelFilter::INFO)).init();
}

/// Logging for the one-shot commands: warnings and errors only, so that stderr carries the
/// command's own messages.
fn init_quiet_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    tracing_subscriber::registry().with(fmt).with(log_filter(LevelFilter::WARN)).init();
}

/// The log filter from `EDGEWISE_LOG`: a level (`debug`) or comma-separated `target=level`
/// directives (`warn,edgewise=debug`), `default` when unset. `Targets` rather than
/// `EnvFilter`: the same directives without span/field filters, and without the regex engine
/// that `EnvFilter` links (about 0.5 MB of the release binary). A filter that does not parse
/// is reported on stderr and the default is used: a typo must not silence the logs.
fn log_filter(default: LevelFilter) -> Targets {
    match std::env::var("EDGEWISE_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse().unwrap_or_else(|e| {
            eprintln!("EDGEWISE_LOG={spec:?} is not a log filter ({e}); using {default}");
            Targets::new().with_default(default)
        }),
        _ => Targets::new().with_default(default),
    }
}

/// Worker threads of the runtime: a Pi has 1–4 cores and the agent shares them with the broker.
const WORKER_THREADS: usize = 2;
/// Blocking threads (fsyncs, file writes); one flusher needs one, the rest is headroom.
const MAX_BLOCKING_THREADS: usize = 8;

/// Runs the agent; with a config file, rules reload on SIGHUP and when the file changes.
fn run(config: Config, path: Option<PathBuf>, exit_after: Option<Duration>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("edgewise")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = std::sync::Arc::new(edgewise::metrics::Metrics::default());
    let shutdown = async move {
        let exit_after = async {
            match exit_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = signal() => {}
            () = exit_after => tracing::info!("--exit-after elapsed"),
        }
    };
    let result =
        runtime.block_on(edgewise::topology::run_with_metrics(config, path, metrics, shutdown));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "edgewise stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
