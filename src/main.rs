//! The `hasync` command line: argument parsing and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hasync::config::Config;
use hasync::daemon::{self, control};

#[derive(Parser)]
#[command(
    name = "hasync",
    version,
    about = "Keeps an active-passive mail appliance pair in step"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Target {
    /// Daemon configuration (its state_dir holds the control socket).
    #[arg(long, default_value = "/etc/hasync/hasync.toml")]
    config: PathBuf,
    /// Talk to this control socket instead of the config's.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let cfg = Config::load(&self.config)?;
        Ok(control::socket_path(&cfg.state_dir))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a configuration and explain what it does.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the running daemon's mode, epoch and peer.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Manual switchover: the primary hands over to the secondary.
    Failover {
        #[command(flatten)]
        target: Target,
    },
    /// Bring a node that is `off` back into the pair.
    Join {
        #[command(flatten)]
        target: Target,
    },
    /// Start a pair on 127.0.0.1, kill the primary, watch the failover.
    Demo {
        #[arg(long)]
        json: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .init();
}

fn ask(target: &Target, req: control::Request) -> Result<control::Response> {
    let socket = target.socket()?;
    Ok(control::request(&socket, &req, Duration::from_secs(5))?)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hasync: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config } => {
            init_logging();
            let cfg = Config::load(&config)?;
            daemon::run(cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!("{} is valid.\n", config.display());
            println!("{}", cfg.explain());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { target, json } => {
            let resp = ask(&target, control::Request::Status)?;
            let Some(s) = resp.status else {
                bail!("daemon refused status: {}", resp.error.unwrap_or_default());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", hasync::daemon::render_status(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Failover { target } => reply(ask(&target, control::Request::Failover)?),
        Cmd::Join { target } => reply(ask(&target, control::Request::Join)?),
        Cmd::Demo { json } => {
            let exe = std::env::current_exe().context("locating the hasync binary")?;
            let mut say = |line: &str| {
                if !json {
                    println!("{line}");
                }
            };
            let report = hasync::demo::run(&exe, &mut say);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                match (&report.error, report.ok) {
                    (None, true) => println!(
                        "\nOK: failover detected in {} ms (bound {} ms); roles after: {:?}",
                        report.failover_detect_ms.unwrap_or_default(),
                        report.failover_detect_bound_ms,
                        report.roles_after
                    ),
                    (Some(e), _) => println!("\nFAILED: {e}"),
                    (None, false) => println!("\nFAILED: final roles {:?}", report.roles_after),
                }
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn reply(resp: control::Response) -> Result<ExitCode> {
    if resp.ok {
        println!("{}", resp.message.unwrap_or_else(|| "ok".into()));
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{}", resp.error.unwrap_or_else(|| "refused".into()))
    }
}
