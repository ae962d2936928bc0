//! Running operator commands (post-ingest hook, role hooks): an argv list
//! (no shell), extra environment, a timeout after which the command is
//! killed, its output captured (bounded) for the log and status. The
//! command runs on a thread of its own; callers on an event loop await
//! [`run_async`].

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Output kept of a command (the tail matters most).
const OUTPUT_BYTES_MAX: usize = 4096;

/// How long output is still read after the command ended (a daemon it
/// started may hold its pipes open for good).
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub argv: Vec<String>,
    pub ok: bool,
    /// Exit code; `None` when it was killed or never ran.
    pub code: Option<i32>,
    pub timed_out: bool,
    /// stdout and stderr, interleaved as read, at most 4 KiB (the tail).
    pub output: String,
    pub ms: u64,
    /// Why it could not run at all.
    pub error: Option<String>,
}

impl Outcome {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let what = if self.timed_out {
            "timed out and was killed".to_string()
        } else if let Some(e) = &self.error {
            format!("could not run: {e}")
        } else {
            match self.code {
                Some(0) => "succeeded".to_string(),
                Some(c) => format!("exited with {c}"),
                None => "was killed by a signal".to_string(),
            }
        };
        format!("{:?} {what} after {} ms", self.argv, self.ms)
    }
}

/// Runs `argv` with `env` added, waiting at most `timeout`.
pub fn run(argv: &[String], env: &[(String, String)], timeout: Duration) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome {
        argv: argv.to_vec(),
        ok: false,
        code: None,
        timed_out: false,
        output: String::new(),
        ms: 0,
        error: None,
    };
    let Some((prog, args)) = argv.split_first() else {
        out.error = Some("empty command".into());
        return out;
    };
    // A process group of its own, so a timeout kills what the command
    // started too (a shell's children would otherwise keep the pipes open).
    let mut cmd = Command::new(prog);
    for var in crate::daemon::systemd::INHERITED_VARS {
        cmd.env_remove(var);
    }
    let mut child = match cmd
        .process_group(0)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(e.to_string());
            out.ms = started.elapsed().as_millis() as u64;
            return out;
        }
    };
    // Both pipes drained on threads of their own, so a chatty command
    // never blocks on a full pipe. A daemon the command started may keep
    // the pipes open after the command ends: its output is not waited for.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 2 * OUTPUT_BYTES_MAX {
                        buf.drain(..buf.len() - OUTPUT_BYTES_MAX);
                    }
                }
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let so = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let se = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if started.elapsed() >= timeout => {
                kill_group(&child);
                let _ = child.kill();
                let _ = child.wait();
                out.timed_out = true;
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                out.error = Some(e.to_string());
                kill_group(&child);
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let grace = Instant::now() + PIPE_GRACE;
    let mut text = Vec::new();
    for rx in [so, se] {
        let left = grace.saturating_duration_since(Instant::now());
        text.extend(rx.recv_timeout(left).unwrap_or_default());
    }
    let start = text.len().saturating_sub(OUTPUT_BYTES_MAX);
    out.output = String::from_utf8_lossy(&text[start..]).trim().to_string();
    out.code = status.and_then(|s| s.code());
    out.ok = status.is_some_and(|s| s.success());
    out.ms = started.elapsed().as_millis() as u64;
    out
}

/// SIGKILL to the child's process group (its id: see `process_group(0)`).
fn kill_group(child: &std::process::Child) {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// [`run`] on a thread of its own; the caller's event loop keeps running.
pub async fn run_async(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
) -> Outcome {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let argv2 = argv.clone();
    let spawned = std::thread::Builder::new()
        .name("hasync-hook".into())
        .spawn(move || {
            let _ = tx.send(run(&argv2, &env, timeout));
        });
    match spawned {
        Ok(_) => rx.await.unwrap_or_else(|_| Outcome {
            argv,
            ok: false,
            code: None,
            timed_out: false,
            output: String::new(),
            ms: 0,
            error: Some("the hook thread ended without an outcome".into()),
        }),
        Err(e) => Outcome {
            argv,
            ok: false,
            code: None,
            timed_out: false,
            output: String::new(),
            ms: 0,
            error: Some(format!("cannot start a thread: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn output_exit_code_and_environment() {
        let o = run(
            &sh("echo out; echo err >&2; echo $HASYNC_ROLE; exit 3"),
            &[("HASYNC_ROLE".into(), "primary".into())],
            Duration::from_secs(5),
        );
        assert!(!o.ok && o.code == Some(3) && !o.timed_out, "{o:?}");
        assert!(
            o.output.contains("out") && o.output.contains("err") && o.output.contains("primary"),
            "{o:?}"
        );
        assert!(o.summary().contains("exited with 3"));
        assert!(run(&sh("true"), &[], Duration::from_secs(5)).ok);
    }

    #[test]
    fn a_hung_command_is_killed_at_its_timeout() {
        let t = Instant::now();
        let o = run(&sh("sleep 30"), &[], Duration::from_millis(200));
        assert!(o.timed_out && !o.ok, "{o:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_daemon_left_behind_holding_the_pipes_does_not_hold_the_hook() {
        let t = Instant::now();
        // setsid: out of the process group, as a daemon started by a role
        // hook would be; it inherits stdout.
        let o = run(
            &sh("echo started; setsid sleep 30 & exit 0"),
            &[],
            Duration::from_secs(10),
        );
        assert!(o.ok, "{o:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_panic() {
        let o = run(
            &["/nonexistent/hook".to_string()],
            &[],
            Duration::from_secs(1),
        );
        assert!(!o.ok && o.error.is_some(), "{o:?}");
        assert!(run(&[], &[], Duration::from_secs(1)).error.is_some());
    }

    #[test]
    fn huge_output_keeps_the_tail() {
        let o = run(&sh("seq 1 100000"), &[], Duration::from_secs(10));
        assert!(o.ok);
        assert!(
            o.output.len() <= OUTPUT_BYTES_MAX && o.output.ends_with("100000"),
            "{}",
            o.output.len()
        );
    }
}
