//! The primary role as a lease in an existing etcd cluster (the Patroni
//! model): the primary holds a key attached to a lease with a TTL and
//! renews it; a node promotes only by acquiring the key; a primary that
//! cannot renew steps down before the TTL runs out unless it still hears
//! its peer. The key's revision at acquisition is the tenure's fencing
//! token, logged with the epoch.
//!
//! The etcd client (gRPC) runs on a thread of its own with its own tokio
//! runtime; the daemon sends commands and gets [`LeaseEvent`]s back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What the daemon hears from the lease thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// This node holds the key until `valid_until` (unless renewed), with
    /// this revision as its fencing token.
    Acquired { valid_until: Instant, revision: i64 },
    /// The key is held by someone else, or etcd could not be asked.
    Refused(String),
    /// A renewal went through: valid until then.
    Renewed { valid_until: Instant },
    /// The lease is gone (expired or revoked on the etcd side).
    Lost(String),
}

/// For status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub key: String,
    pub endpoints: Vec<String>,
    pub held: bool,
    /// Who holds the key, as last seen.
    pub holder: Option<String>,
    pub revision: Option<i64>,
    pub ttl_left_ms: Option<u64>,
    pub last_error: Option<String>,
}

enum Cmd {
    Acquire,
    Release,
}

/// Handle to the lease thread.
pub struct Lease {
    tx: mpsc::UnboundedSender<Cmd>,
    pub status: Arc<Mutex<LeaseStatus>>,
    valid_until: Arc<Mutex<Option<Instant>>>,
}

impl Lease {
    /// `node`: the value written under `key` while held.
    pub fn start(
        endpoints: Vec<String>,
        key: String,
        node: String,
        ttl: Duration,
        events: mpsc::UnboundedSender<LeaseEvent>,
    ) -> std::io::Result<Lease> {
        let status = Arc::new(Mutex::new(LeaseStatus {
            key: key.clone(),
            endpoints: endpoints.clone(),
            ..LeaseStatus::default()
        }));
        let valid_until = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::unbounded_channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker {
            endpoints,
            key,
            node,
            ttl,
            events,
            status: status.clone(),
            valid_until: valid_until.clone(),
            client: None,
            lease_id: None,
        };
        std::thread::Builder::new()
            .name("hasync-lease".into())
            .spawn(move || rt.block_on(worker.run(rx)))?;
        Ok(Lease {
            tx,
            status,
            valid_until,
        })
    }

    /// Try to take the key (answered by `Acquired` or `Refused`).
    pub fn acquire(&self) {
        let _ = self.tx.send(Cmd::Acquire);
    }

    /// Give the key up (a switchover, a step-down).
    pub fn release(&self) {
        let _ = self.tx.send(Cmd::Release);
    }

    /// For status: the TTL left as this node sees it.
    pub fn refresh_status(&self) {
        let until = *self.valid_until.lock().expect("lease lock");
        let mut st = self.status.lock().expect("lease status");
        st.ttl_left_ms = until
            .filter(|_| st.held)
            .map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64);
    }
}

struct Worker {
    endpoints: Vec<String>,
    key: String,
    node: String,
    ttl: Duration,
    events: mpsc::UnboundedSender<LeaseEvent>,
    status: Arc<Mutex<LeaseStatus>>,
    valid_until: Arc<Mutex<Option<Instant>>>,
    client: Option<Client>,
    lease_id: Option<i64>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> =
            None;
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Acquire) => {
                        let ev = match self.acquire().await {
                            Ok((valid_until, revision, k)) => {
                                keeper = Some(k);
                                LeaseEvent::Acquired { valid_until, revision }
                            }
                            Err(why) => LeaseEvent::Refused(why),
                        };
                        self.note(&ev);
                        let _ = self.events.send(ev);
                    }
                    Some(Cmd::Release) => {
                        keeper = None;
                        self.release().await;
                    }
                },
                _ = tick.tick(), if keeper.is_some() => {
                    let sent = Instant::now();
                    let renewed = match keeper.as_mut() {
                        Some((k, stream)) => {
                            let r = tokio::time::timeout(self.ttl / 3, async {
                                k.keep_alive().await?;
                                stream.message().await
                            })
                            .await;
                            match r {
                                Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(Some(sent + Duration::from_secs(resp.ttl() as u64))),
                                Ok(Ok(Some(_))) => Ok(None),
                                Ok(Ok(None)) => Err("the keep-alive stream ended".to_string()),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err("etcd did not answer the renewal in time".to_string()),
                            }
                        }
                        None => continue,
                    };
                    match renewed {
                        Ok(Some(valid_until)) => {
                            let ev = LeaseEvent::Renewed { valid_until };
                            self.note(&ev);
                            let _ = self.events.send(ev);
                        }
                        Ok(None) => {
                            keeper = None;
                            self.lease_id = None;
                            let ev = LeaseEvent::Lost("the lease expired on the etcd side".into());
                            self.note(&ev);
                            let _ = self.events.send(ev);
                        }
                        Err(e) => {
                            // No event: the core acts on the TTL running out.
                            warn!("etcd: renewing the lease failed: {e}");
                            self.status.lock().expect("lease status").last_error = Some(e);
                            // A broken stream is opened again at the next tick.
                            if let (Some(id), Some(c)) = (self.lease_id, self.client.as_mut()) {
                                if let Ok(k) = c.lease_keep_alive(id).await {
                                    keeper = Some(k);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn note(&self, ev: &LeaseEvent) {
        let mut st = self.status.lock().expect("lease status");
        let mut vu = self.valid_until.lock().expect("lease lock");
        match ev {
            LeaseEvent::Acquired {
                valid_until,
                revision,
            } => {
                st.held = true;
                st.holder = Some(self.node.clone());
                st.revision = Some(*revision);
                st.last_error = None;
                *vu = Some(*valid_until);
            }
            LeaseEvent::Renewed { valid_until } => {
                st.last_error = None;
                *vu = Some(*valid_until);
            }
            LeaseEvent::Refused(why) | LeaseEvent::Lost(why) => {
                st.held = false;
                st.last_error = Some(why.clone());
                *vu = None;
            }
        }
    }

    async fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.is_none() {
            let opts = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(self.ttl / 3);
            let c = Client::connect(&self.endpoints, Some(opts))
                .await
                .map_err(|e| format!("cannot reach etcd at {:?}: {e}", self.endpoints))?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    #[allow(clippy::type_complexity)]
    async fn acquire(
        &mut self,
    ) -> Result<
        (
            Instant,
            i64,
            (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream),
        ),
        String,
    > {
        let (key, node) = (self.key.clone(), self.node.clone());
        let ttl_s = self.ttl.as_secs().max(1) as i64;
        let res = async {
            let c = self.client().await?;
            let started = Instant::now();
            let grant = c
                .lease_grant(ttl_s, None)
                .await
                .map_err(|e| format!("lease grant: {e}"))?;
            let id = grant.id();
            // Take the key if nobody holds it, or if this node does (a
            // lease of an earlier tenure of its own).
            let put = TxnOp::put(
                key.clone(),
                node.clone(),
                Some(PutOptions::new().with_lease(id)),
            );
            let free = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put.clone()])
                .or_else([TxnOp::get(key.clone(), None)]);
            let mut resp = c.txn(free).await.map_err(|e| format!("txn: {e}"))?;
            if !resp.succeeded() {
                let mine = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, node.clone())])
                    .and_then([put])
                    .or_else([TxnOp::get(key.clone(), None)]);
                resp = c.txn(mine).await.map_err(|e| format!("txn: {e}"))?;
            }
            if !resp.succeeded() {
                let holder = resp.op_responses().into_iter().find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    _ => None,
                });
                let _ = c.lease_revoke(id).await;
                return Err(format!(
                    "the key {key} is held by {}",
                    holder.as_deref().unwrap_or("another node")
                ));
            }
            let revision = resp.header().map_or(0, |h| h.revision());
            let keeper = c
                .lease_keep_alive(id)
                .await
                .map_err(|e| format!("keep-alive: {e}"))?;
            Ok::<_, String>((
                started + Duration::from_secs(ttl_s as u64),
                revision,
                keeper,
                id,
            ))
        }
        .await;
        match res {
            Ok((valid_until, revision, keeper, id)) => {
                self.lease_id = Some(id);
                info!(key = %self.key, revision, "etcd: this node holds the primary lease");
                Ok((valid_until, revision, keeper))
            }
            Err(e) => {
                if e.starts_with("cannot reach") || e.contains("transport") {
                    self.client = None;
                }
                Err(e)
            }
        }
    }

    async fn release(&mut self) {
        let Some(id) = self.lease_id.take() else {
            return;
        };
        self.status.lock().expect("lease status").held = false;
        *self.valid_until.lock().expect("lease lock") = None;
        match self.client().await {
            Ok(c) => match c.lease_revoke(id).await {
                Ok(_) => info!(key = %self.key, "etcd: primary lease released"),
                Err(e) => warn!("etcd: releasing the lease failed (it expires with its TTL): {e}"),
            },
            Err(e) => warn!("etcd: releasing the lease failed (it expires with its TTL): {e}"),
        }
    }
}
