//! Role hooks: the machine acts on the node's role (as keepalived's notify
//! scripts and Pacemaker's resource agents do). `[hooks] on_primary`,
//! `on_secondary`, `on_failed`, `on_off` run one at a time, in the order
//! of the role changes, on a task of their own, so the event loop (and the
//! heartbeats) never wait for them.
//!
//! Order is part of the contract:
//! - `on_primary` runs once the new epoch is durable and the engine has
//!   prepared the tenure (IMAP UIDs raised, takeover record written) and a
//!   continuous queue replica has been promoted; a node that leaves the
//!   role first never runs it.
//! - A switchover from this node: `on_secondary` runs (the MTA stops),
//!   then every change is made durable on the peer, and only then does the
//!   core hand over (`Job::PrepareHandover`).
//! - At shutdown a primary runs `on_secondary`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::HooksConfig;
use crate::hooks::{self, Outcome};

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    OnPrimary,
    OnSecondary,
    OnFailed,
    OnOff,
}

impl HookKind {
    pub fn key(self) -> &'static str {
        match self {
            HookKind::OnPrimary => "on_primary",
            HookKind::OnSecondary => "on_secondary",
            HookKind::OnFailed => "on_failed",
            HookKind::OnOff => "on_off",
        }
    }

    fn argv(self, cfg: &HooksConfig) -> Option<&Vec<String>> {
        match self {
            HookKind::OnPrimary => cfg.on_primary.as_ref(),
            HookKind::OnSecondary => cfg.on_secondary.as_ref(),
            HookKind::OnFailed => cfg.on_failed.as_ref(),
            HookKind::OnOff => cfg.on_off.as_ref(),
        }
    }
}

/// One run, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    pub hook: HookKind,
    pub at_unix_ms: u64,
    pub epoch: u64,
    pub ok: bool,
    pub summary: String,
    /// The tail of its output.
    pub output: String,
}

/// What the hook task reports to the event loop.
#[derive(Debug)]
pub enum RoleMsg {
    Ran {
        run: HookRun,
        kind: HookKind,
    },
    /// A switchover's preparation ended: the one the daemon numbered `id`
    /// ([`RoleHooks::prepare_handover`]).
    Prepared {
        id: u64,
        res: Result<(), String>,
    },
}

/// What the role is, for a hook's environment.
#[derive(Debug, Clone)]
pub struct HookEnv {
    pub node: String,
    pub peer: String,
    pub role: String,
    pub previous_role: String,
    pub epoch: u64,
    pub reason: String,
    /// `role-change`, `switchover`, `resume`, `shutdown`.
    pub event: &'static str,
}

impl HookEnv {
    fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("HASYNC_NODE".into(), self.node.clone()),
            ("HASYNC_PEER".into(), self.peer.clone()),
            ("HASYNC_ROLE".into(), self.role.clone()),
            ("HASYNC_PREVIOUS_ROLE".into(), self.previous_role.clone()),
            ("HASYNC_EPOCH".into(), self.epoch.to_string()),
            ("HASYNC_REASON".into(), self.reason.clone()),
            ("HASYNC_EVENT".into(), self.event.into()),
        ]
    }
}

type Ready = Pin<Box<dyn Future<Output = bool>>>;
type Drain = Box<dyn FnOnce() -> oneshot::Receiver<()>>;

enum Job {
    Hook(HookKind, HookEnv),
    /// `on_primary` once `ready` says the tenure is prepared (false: the
    /// node left it first; nothing runs).
    OnPrimary(HookEnv, Ready),
    /// `on_secondary`, then the drain; the outcome as [`RoleMsg::Prepared`].
    PrepareHandover(HookEnv, Drain, u64),
}

/// The hook runner of a node.
pub struct RoleHooks {
    cfg: HooksConfig,
    jobs: mpsc::UnboundedSender<Job>,
    /// Each hook's last run.
    pub last: VecDeque<HookRun>,
}

impl RoleHooks {
    /// Starts the hook task on the current tokio-uring runtime.
    /// `vips`: the service addresses, added before `on_primary` runs and
    /// removed before a switchover hands over.
    pub fn start(
        cfg: HooksConfig,
        vips: Option<crate::vip::Vips>,
    ) -> (RoleHooks, mpsc::UnboundedReceiver<RoleMsg>) {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (out, out_rx) = mpsc::unbounded_channel();
        let task_cfg = cfg.clone();
        let task_vips = vips.clone();
        tokio_uring::spawn(async move {
            while let Some(job) = rx.recv().await {
                run_job(&task_cfg, task_vips.as_ref(), job, &out).await;
            }
        });
        (
            RoleHooks {
                cfg,
                jobs,
                last: VecDeque::new(),
            },
            out_rx,
        )
    }

    pub fn config(&self) -> &HooksConfig {
        &self.cfg
    }

    /// Queues `kind` (a role the node entered).
    pub fn run(&self, kind: HookKind, env: HookEnv) {
        if kind.argv(&self.cfg).is_some() {
            let _ = self.jobs.send(Job::Hook(kind, env));
        }
    }

    /// Queues `on_primary` (and the service addresses before it), to run
    /// once `ready` resolves true.
    /// (`ready` is awaited even without a hook: it also tells an embedder.)
    pub fn on_primary(&self, env: HookEnv, ready: impl Future<Output = bool> + 'static) {
        let _ = self.jobs.send(Job::OnPrimary(env, Box::pin(ready)));
    }

    /// Queues a switchover's preparation, numbered `id`: `on_secondary`,
    /// then `drain()` awaited up to `hooks.switchover_timeout`. Its outcome
    /// carries the number: the core may have given it up and asked for
    /// another meanwhile.
    pub fn prepare_handover(
        &self,
        env: HookEnv,
        id: u64,
        drain: impl FnOnce() -> oneshot::Receiver<()> + 'static,
    ) {
        let _ = self
            .jobs
            .send(Job::PrepareHandover(env, Box::new(drain), id));
    }

    /// Runs `on_secondary` now and waits for it (shutdown of a primary).
    pub async fn run_now(&self, kind: HookKind, env: HookEnv) -> Option<HookRun> {
        let argv = kind.argv(&self.cfg)?.clone();
        Some(run_hook(kind, argv, &env, self.cfg.timeout).await)
    }

    /// Keeps the last run of each hook for status.
    pub fn record(&mut self, run: HookRun) {
        self.last.retain(|r| r.hook != run.hook);
        self.last.push_back(run);
    }
}

async fn run_job(
    cfg: &HooksConfig,
    vips: Option<&crate::vip::Vips>,
    job: Job,
    out: &mpsc::UnboundedSender<RoleMsg>,
) {
    match job {
        Job::Hook(kind, env) => {
            if let Some(argv) = kind.argv(cfg) {
                let run = run_hook(kind, argv.clone(), &env, cfg.timeout).await;
                let _ = out.send(RoleMsg::Ran { run, kind });
            }
        }
        Job::OnPrimary(env, ready) => {
            if !ready.await {
                info!(
                    epoch = env.epoch,
                    "on_primary not run: the node left the primary role before it was prepared"
                );
                return;
            }
            if let Some(v) = vips {
                let outcome = match v.acquire().await {
                    Ok(r) => r,
                    Err(_) => Err("the service address thread stopped".to_string()),
                };
                match outcome {
                    Ok(()) => info!("service addresses added and announced"),
                    // Alarmed by the daemon from the addresses' status.
                    Err(e) => error!("cannot add the service addresses: {e}"),
                }
            }
            if let Some(argv) = &cfg.on_primary {
                let run = run_hook(HookKind::OnPrimary, argv.clone(), &env, cfg.timeout).await;
                let _ = out.send(RoleMsg::Ran {
                    run,
                    kind: HookKind::OnPrimary,
                });
            }
        }
        Job::PrepareHandover(env, drain, id) => {
            info!("switchover: stopping services (on_secondary) and draining replication before handing over");
            if let Some(argv) = &cfg.on_secondary {
                let run = run_hook(HookKind::OnSecondary, argv.clone(), &env, cfg.timeout).await;
                let ok = run.ok;
                let summary = run.summary.clone();
                let _ = out.send(RoleMsg::Ran {
                    run,
                    kind: HookKind::OnSecondary,
                });
                if !ok {
                    let _ = out.send(RoleMsg::Prepared {
                        id,
                        res: Err(format!("on_secondary {summary}")),
                    });
                    return;
                }
            }
            let started = std::time::Instant::now();
            let res = tokio::time::timeout(cfg.switchover_timeout, drain()).await;
            let msg = match res {
                Ok(Ok(())) => {
                    info!(
                        ms = started.elapsed().as_millis() as u64,
                        "switchover: replication drained"
                    );
                    // The address moves with the role: off here before the
                    // peer takes it.
                    if let Some(v) = vips {
                        if let Ok(Err(e)) = v.release().await {
                            warn!("switchover: cannot remove the service addresses: {e}");
                        }
                    }
                    Ok(())
                }
                Ok(Err(_)) => Err("the replication engine stopped".to_string()),
                Err(_) => Err(format!(
                    "replication did not drain within {:?} (hooks.switchover_timeout_ms): changes would be left behind",
                    cfg.switchover_timeout
                )),
            };
            let _ = out.send(RoleMsg::Prepared { id, res: msg });
        }
    }
}

async fn run_hook(kind: HookKind, argv: Vec<String>, env: &HookEnv, timeout: Duration) -> HookRun {
    info!(hook = kind.key(), role = %env.role, epoch = env.epoch, "running {} hook", kind.key());
    let o: Outcome = hooks::run_async(argv, env.vars(), timeout).await;
    if o.ok {
        info!(
            hook = kind.key(),
            "{} hook: {}: {}",
            kind.key(),
            o.summary(),
            o.output
        );
    } else if kind == HookKind::OnPrimary {
        error!(
            hook = kind.key(),
            "{} hook: {}: {}",
            kind.key(),
            o.summary(),
            o.output
        );
    } else {
        warn!(
            hook = kind.key(),
            "{} hook: {}: {}",
            kind.key(),
            o.summary(),
            o.output
        );
    }
    HookRun {
        hook: kind,
        at_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        epoch: env.epoch,
        ok: o.ok,
        summary: o.summary(),
        output: o.output,
    }
}
