//! The `edgewise` command line: `run`, `check`, `--version`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgewise::config::{self, Config, ConfigErrors};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
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
        },
        Command::Run { config, exit_after } => {
            init_logging();
            let loaded = match &config {
                Some(path) => config::load(path),
                None => config::load_str("<embedded demo config>", DEMO_CONFIG),
            };
            let config = match loaded {
                Ok(c) => c,
                Err(errors) => return config_error(&errors),
            };
            run(config, exit_after)
        }
    }
}

fn upstream_kind(c: &Config) -> String {
    match &c.upstream {
        config::UpstreamConfig::Http(h) => format!("http {}", h.url),
        config::UpstreamConfig::File(f) => format!("file {}", f.path.display()),
    }
}

fn config_error(errors: &ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    ExitCode::from(2)
}

fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEWISE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Worker threads of the runtime: a Pi has 1–4 cores and the agent shares them with the broker.
const WORKER_THREADS: usize = 2;
/// Blocking threads (fsyncs, file writes); one flusher needs one, the rest is headroom.
const MAX_BLOCKING_THREADS: usize = 8;

fn run(config: Config, exit_after: Option<Duration>) -> ExitCode {
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
    let result = runtime.block_on(edgewise::run(config, async move {
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
    }));
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
