//! The `hasync` command line: argument parsing and calls into the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hasync::config::Config;
use hasync::daemon::{self, control};

/// Where every subcommand looks for the configuration by default.
const DEFAULT_CONFIG: &str = "/etc/hasync/hasync.toml";

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
    #[arg(long, default_value = DEFAULT_CONFIG)]
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
        let state_dir = Config::load_state_dir(&self.config)?;
        Ok(control::socket_path(&state_dir))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How records are written: journald when systemd started the
        /// daemon, human lines otherwise (auto), or text, json, journald.
        #[arg(long, value_enum, env = "HASYNC_LOG_FORMAT", default_value = "auto")]
        log_format: hasync::logging::LogFormat,
    },
    /// Validate a configuration and explain what it does.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the running daemon's mode, epoch and peer.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Manual switchover: the primary hands over to the secondary. Refused
    /// while it would leave changes behind (see `hasync status`).
    Failover {
        #[command(flatten)]
        target: Target,
        /// Switch over even if changes would be left behind.
        #[arg(long, conflicts_with = "wait")]
        force: bool,
        /// Wait until it is safe (replica caught up, backlog drained), then
        /// switch over.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 600, requires = "wait")]
        timeout: u64,
    },
    /// Force a full verification of the replica (every file re-hashed), with progress.
    Resync {
        #[command(flatten)]
        target: Target,
    },
    /// Push this (secondary) node's mail queue to the primary now.
    PushQueue {
        #[command(flatten)]
        target: Target,
    },
    /// Zero-loss commit: return once FILE is durable on the peer too (prints
    /// `replicated: …`), or `local-only: …` after queue.commit_timeout_ms.
    Commit {
        #[command(flatten)]
        target: Target,
        file: PathBuf,
    },
    /// Bring a node that is `off` back into the pair.
    Join {
        #[command(flatten)]
        target: Target,
    },
    /// Accept this node's incomplete replica (its first sync did not
    /// finish, and it does not take over on its own) as complete: it may
    /// then take over with the mail it holds. For a primary lost for good
    /// during the first sync; what only that primary held is missing here.
    AcceptReplica {
        #[command(flatten)]
        target: Target,
        /// Accept it also while the primary is heard (its fill goes on),
        /// or on a node that never held the mail (its stores were filled
        /// by other means).
        #[arg(long)]
        force: bool,
    },
    /// Versions a former primary held that the new primary never had,
    /// kept aside after a failover: list them, or restore them into the
    /// live tree as new files (on the primary).
    Conflicts {
        #[command(subcommand)]
        action: ConflictsCmd,
    },
    /// Write a matching pair of configurations and a fresh link secret:
    /// OUT/<name>/hasync.toml for each node and OUT/link.secret (copy each
    /// node's file and the secret to /etc/hasync/ on that node).
    Init {
        /// A node as NAME=ADDRESS (the address its peer reaches it at); twice.
        #[arg(long = "node", required = true, num_args = 1, value_parser = hasync::init::parse_node)]
        nodes: Vec<(String, std::net::IpAddr)>,
        /// A mailstore as NAME=PATH; repeat for each.
        #[arg(long = "mailstore", value_parser = hasync::init::parse_store)]
        mailstores: Vec<(String, PathBuf)>,
        #[arg(long, default_value = "/var/spool/postfix")]
        queue_dir: PathBuf,
        #[arg(long, default_value = "/var/lib/hasync")]
        state_dir: PathBuf,
        /// Heartbeat port; the sync port is the next one.
        #[arg(long, default_value_t = 7401)]
        port: u16,
        /// Where the files are written.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a deterministic Maildir fixture (for tests and benchmarks).
    #[cfg(feature = "tools")]
    Fixture {
        /// Directory to fill (created; must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Number of messages.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        #[arg(long, default_value_t = 200)]
        mailboxes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Median message size in bytes (lognormal-like, clipped 512 B .. 4 MiB).
        #[arg(long, default_value_t = 10 * 1024)]
        median_size: u64,
    },
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory for man/ and completions/.
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a pair on 127.0.0.1, kill the primary, watch the failover.
    #[cfg(feature = "tools")]
    Demo {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConflictsCmd {
    /// List the versions kept aside on this node, oldest first.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Put kept versions back into the live tree as new files (a Maildir
    /// message gets a new name in `new/`, so the IMAP server gives it a new
    /// UID). Only on the primary.
    Restore {
        #[command(flatten)]
        target: Target,
        /// The conflict's id, as `list` shows it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Restore every kept version.
        #[arg(long)]
        all: bool,
    },
}

fn ask(target: &Target, req: control::Request) -> Result<control::Response> {
    let socket = target.socket()?;
    Ok(control::request(&socket, &req, Duration::from_secs(5))?)
}

fn main() -> ExitCode {
    let outcome = real_main();
    // The daemon's last records are on the log writer's queue.
    hasync::logging::flush(std::time::Duration::from_secs(2));
    match outcome {
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
        Cmd::Run { config, log_format } => {
            hasync::logging::init_with(log_format);
            let cfg = Config::load(&config)?;
            hasync::Node::run_until_signal(cfg)?;
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
        Cmd::Failover {
            target,
            force,
            wait,
            timeout,
        } => {
            let until = std::time::Instant::now() + Duration::from_secs(timeout);
            let mut said = String::new();
            loop {
                let resp = ask(&target, control::Request::Failover { force })?;
                let err = resp.error.clone().unwrap_or_default();
                if !wait || resp.ok || !err.starts_with(daemon::NOT_SAFE) {
                    return reply(resp);
                }
                if std::time::Instant::now() >= until {
                    bail!("gave up after {timeout} s: {err}");
                }
                let why = err
                    .trim_start_matches(daemon::NOT_SAFE)
                    .split("; `hasync failover")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if why != said {
                    println!("waiting: {why}");
                    said = why;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Cmd::Conflicts {
            action: ConflictsCmd::List { target, json },
        } => {
            let resp = ask(&target, control::Request::Conflicts)?;
            let Some(list) = resp.conflicts else {
                bail!("{}", resp.error.unwrap_or_else(|| "no answer".into()));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no conflicts kept aside on this node");
            } else {
                for c in &list {
                    println!(
                        "{}  {} bytes  kept at {}  {}",
                        c.id,
                        c.size,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(c.kept_at.max(0) as u64)
                        ),
                        hasync::logging::printable(&c.path)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Conflicts {
            action: ConflictsCmd::Restore { target, id, all },
        } => {
            let id = if all { None } else { id };
            reply(ask(&target, control::Request::RestoreConflicts { id })?)
        }
        Cmd::Join { target } => reply(ask(&target, control::Request::Join)?),
        Cmd::AcceptReplica { target, force } => {
            reply(ask(&target, control::Request::AcceptReplica { force })?)
        }
        Cmd::PushQueue { target } => reply(ask(&target, control::Request::PushQueue)?),
        Cmd::Commit { target, file } => {
            let path =
                std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?;
            reply(ask(&target, control::Request::Commit { path })?)
        }
        Cmd::Resync { target } => {
            let resp = ask(&target, control::Request::Resync)?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{}", resp.message.unwrap_or_default());
            resync_progress(&target)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Init {
            nodes,
            mailstores,
            queue_dir,
            state_dir,
            port,
            out,
        } => {
            let [a, b]: [(String, std::net::IpAddr); 2] =
                nodes.try_into().map_err(|n: Vec<_>| {
                    anyhow::anyhow!("--node takes exactly two nodes, got {}", n.len())
                })?;
            if port == u16::MAX {
                bail!("--port {port}: the sync port (the next one) would not fit");
            }
            let spec = hasync::init::InitSpec {
                nodes: [a, b],
                port,
                mailstores,
                queue_dir,
                state_dir,
                secret_file: PathBuf::from("/etc/hasync/link.secret"),
            };
            for f in hasync::init::write_pair(&spec, &out)? {
                println!("wrote {}", f.display());
            }
            println!(
                "copy each node's hasync.toml and link.secret (mode 0600) to /etc/hasync/ on that node, then: hasync check-config"
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "tools")]
        Cmd::Fixture {
            out,
            messages,
            mailboxes,
            seed,
            median_size,
        } => {
            if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
                bail!(
                    "{} is not empty: fixtures go into a fresh directory",
                    out.display()
                );
            }
            let spec = hasync::fixture::MaildirSpec {
                seed,
                mailboxes: mailboxes.max(1),
                messages,
                median_size,
                ..Default::default()
            };
            let (files, bytes) = hasync::fixture::generate_maildirs(&out, &spec)
                .with_context(|| format!("generating into {}", out.display()))?;
            println!("{files} files, {bytes} bytes in {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GenerateDocs { out } => {
            use clap::CommandFactory;
            let cmd = Cli::command();
            let man = out.join("man");
            let completions = out.join("completions");
            std::fs::create_dir_all(&man)?;
            std::fs::create_dir_all(&completions)?;
            clap_mangen::generate_to(cmd.clone(), &man)
                .with_context(|| format!("writing man pages to {}", man.display()))?;
            for shell in [
                clap_complete::Shell::Bash,
                clap_complete::Shell::Zsh,
                clap_complete::Shell::Fish,
            ] {
                clap_complete::generate_to(shell, &mut cmd.clone(), "hasync", &completions)
                    .with_context(|| format!("writing {shell} completions"))?;
            }
            println!(
                "man pages in {}, completions in {}",
                man.display(),
                completions.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "tools")]
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

/// Follows a verification until it finishes; a progress bar on a terminal,
/// one line per second otherwise.
fn resync_progress(target: &Target) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let started = std::time::Instant::now();
    let mut seen_running = false;
    loop {
        let s = ask(target, control::Request::Status)?
            .status
            .context("daemon returned no status")?;
        let r = &s.replication;
        let running = r.phase == "verifying" || r.phase == "manifest" || r.phase == "initial-sync";
        if let Some(p) = &r.progress {
            let frac = if p.files_total == 0 {
                1.0
            } else {
                p.files_done as f64 / p.files_total as f64
            };
            let width = 30;
            let filled = (frac * width as f64).round() as usize;
            let line = format!(
                "[{}{}] {}/{} files  {:.1}/{:.1} MB  {:.0} files/s  ETA {}",
                "#".repeat(filled.min(width)),
                "-".repeat(width - filled.min(width)),
                p.files_done,
                p.files_total,
                p.bytes_done as f64 / 1e6,
                p.bytes_total as f64 / 1e6,
                p.files_per_s,
                p.eta_s.map_or("-".to_string(), |e| format!("{e:.0}s"))
            );
            if tty {
                print!("\r{line}");
                std::io::stdout().flush()?;
            } else {
                println!("{line}");
            }
        }
        seen_running |= running;
        if (seen_running && !running)
            || (!seen_running && started.elapsed() > Duration::from_secs(10))
        {
            if tty {
                println!();
            }
            println!(
                "verification finished: {} paths repaired so far, replica {}",
                r.repaired,
                if r.connected {
                    "connected"
                } else {
                    "NOT connected"
                }
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(if tty { 200 } else { 1000 }));
    }
}
