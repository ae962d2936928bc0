//! `hasync demo`: a real pair on 127.0.0.1, a real `kill -9`, a real rejoin.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::failover::Role;
use crate::fixture::{digest, generate_maildirs, MaildirSpec, Workload};
use crate::harness::{Pair, PairOptions};

fn store_root(pair: &Pair, i: usize, name: &str) -> std::path::PathBuf {
    pair.nodes[i]
        .mailstores
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
        .expect("harness creates the inbox store")
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

/// Bytes of the files under `root` (replicated paths only).
fn dir_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() && !p.parent().is_some_and(|d| d.ends_with("tmp")) => {
                    total += m.len()
                }
                _ => {}
            }
        }
    }
    total
}

/// Waits until both trees match by content hash and metadata.
pub fn wait_identical(a: &Path, b: &Path, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last = 0;
    while start.elapsed() < timeout {
        let (da, db) = (digest(a), digest(b));
        if da == db {
            return Ok(start.elapsed());
        }
        last = da.iter().filter(|(k, v)| db.get(*k) != Some(*v)).count()
            + db.keys().filter(|k| !da.contains_key(*k)).count();
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "mailstores still differ in {last} paths after {timeout:?}"
    ))
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub ok: bool,
    pub failover_detect_ms: Option<u64>,
    /// Bound the detection time should respect: threshold × interval + one interval.
    pub failover_detect_bound_ms: u64,
    pub roles_before: Vec<(String, Role)>,
    pub roles_after: std::collections::BTreeMap<String, Role>,
    pub epoch_before: Option<u64>,
    pub epoch_after: Option<u64>,
    pub queue_push_requested: bool,
    /// Files and bytes in the primary's mailstores once quiet.
    pub mailstore_files: u64,
    pub mailstore_bytes: u64,
    /// Every path matches by content hash (and mode, owner, mtime, links)
    /// on both nodes after quiescing — counted on disk, not by the engine.
    pub mailstore_identical: bool,
    /// After the failover, with the direction reversed.
    pub mailstore_identical_after_failover: bool,
    pub renames_sent_as_renames: u64,
    pub content_bytes_sent: u64,
    pub lag_ms_p50: Option<f64>,
    pub lag_ms_p99: Option<f64>,
    /// Counted by content hash on both nodes' queues, not by the engine.
    pub queue_messages_before: u64,
    pub queue_pushed: u64,
    pub queue_duplicates_dropped: u64,
    pub queue_lost: u64,
    pub queue_duplicated: u64,
    pub steps: Vec<String>,
    pub error: Option<String>,
}

/// Runs the scenario with `exe` as the daemon binary, printing progress lines
/// through `say` as it goes.
pub fn run(exe: &Path, say: &mut dyn FnMut(&str)) -> DemoReport {
    let mut report = DemoReport {
        ok: false,
        failover_detect_ms: None,
        failover_detect_bound_ms: 0,
        roles_before: vec![],
        roles_after: Default::default(),
        epoch_before: None,
        epoch_after: None,
        queue_push_requested: false,
        mailstore_files: 0,
        mailstore_bytes: 0,
        mailstore_identical: false,
        mailstore_identical_after_failover: false,
        renames_sent_as_renames: 0,
        content_bytes_sent: 0,
        lag_ms_p50: None,
        lag_ms_p99: None,
        queue_messages_before: 0,
        queue_pushed: 0,
        queue_duplicates_dropped: 0,
        queue_lost: 0,
        queue_duplicated: 0,
        steps: vec![],
        error: None,
    };
    if let Err(e) = scenario(exe, &mut report, say) {
        report.error = Some(e);
    }
    report
}

fn scenario(exe: &Path, r: &mut DemoReport, say: &mut dyn FnMut(&str)) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("hasync-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let mut step = |r: &mut DemoReport, line: String| {
        say(&line);
        r.steps.push(line);
    };
    let opts = PairOptions::default();
    let interval = Duration::from_millis(opts.heartbeat_interval_ms);
    let mut pair = Pair::create(exe, tmp.path(), opts).map_err(|e| format!("setting up: {e}"))?;
    let window = pair.detection_window();
    r.failover_detect_bound_ms = (window + interval).as_millis() as u64;
    step(
        r,
        format!(
            "starting two nodes in {} (heartbeat {}ms, lost after {} missed)",
            tmp.path().display(),
            pair.options.heartbeat_interval_ms,
            pair.options.heartbeat_lost_threshold
        ),
    );
    let spec = MaildirSpec {
        seed: 42,
        mailboxes: 10,
        messages: 500,
        median_size: 8 * 1024,
        min_size: 0,
        max_size: 512 * 1024,
    };
    // mx1 has the higher priority and will be primary: its mailstore is the source.
    let inbox0 = store_root(&pair, 0, "inbox");
    let (files, bytes) =
        generate_maildirs(&inbox0, &spec).map_err(|e| format!("generating the Maildir: {e}"))?;
    step(
        r,
        format!(
            "generated a Maildir mailstore on mx1: {files} files, {:.1} MB in {} mailboxes",
            bytes as f64 / 1e6,
            spec.mailboxes
        ),
    );
    for n in pair.nodes.iter_mut() {
        n.start().map_err(|e| format!("starting {}: {e}", n.name))?;
    }
    let p = pair.wait_formed(Duration::from_secs(20))?;
    let s = 1 - p;
    let before = pair.nodes[p].status()?;
    r.epoch_before = Some(before.epoch);
    r.roles_before = vec![
        (pair.nodes[p].name.clone(), Role::Primary),
        (pair.nodes[s].name.clone(), Role::Secondary),
    ];
    step(
        r,
        format!(
            "pair formed: {} primary at epoch {}, {} secondary",
            pair.nodes[p].name, before.epoch, pair.nodes[s].name
        ),
    );

    let (src, dst) = (store_root(&pair, p, "inbox"), store_root(&pair, s, "inbox"));
    let t = wait_identical(&src, &dst, Duration::from_secs(60))?;
    step(
        r,
        format!(
            "initial sync done: replica identical by content hash after {:.2}s",
            t.as_secs_f64()
        ),
    );

    // Mail activity while the pair runs: deliveries, flag renames, moves, deletes.
    let mut w = Workload::new(&src, spec.clone());
    w.dir_renames = false;
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..400 {
        let st = w.step().map_err(|e| format!("workload: {e}"))?;
        *counts.entry(format!("{st:?}")).or_insert(0u32) += 1;
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    step(r, format!("mail activity on the primary: {counts:?}"));
    let t = wait_identical(&src, &dst, Duration::from_secs(60));
    r.mailstore_identical = t.is_ok();
    let digest = crate::fixture::digest(&src);
    r.mailstore_files = digest.values().filter(|d| d.kind == "file").count() as u64;
    r.mailstore_bytes = dir_bytes(&src);
    let repl = pair.nodes[p].status()?.replication;
    r.renames_sent_as_renames = repl.renames_sent;
    r.content_bytes_sent = repl.content_bytes_sent;
    r.lag_ms_p50 = repl.lag_ms_p50;
    r.lag_ms_p99 = repl.lag_ms_p99;
    step(
        r,
        format!(
            "replica {} after quiescing ({} files, {:.1} MB); {} renames sent as renames, {} hard links as links; change-to-durable lag p50 {} p99 {}",
            if r.mailstore_identical { "identical" } else { "DIFFERENT" },
            r.mailstore_files,
            r.mailstore_bytes as f64 / 1e6,
            repl.renames_sent,
            repl.links_sent,
            fmt_ms(repl.lag_ms_p50),
            fmt_ms(repl.lag_ms_p99)
        ),
    );
    t?;

    // Mail waiting in the primary's queue when it dies.
    let layout = crate::queue::layout::Layout::Postfix;
    crate::fixture::generate_queue(layout, &pair.nodes[p].queue_dir, 50, 7)
        .map_err(|e| format!("queueing mail: {e}"))?;
    let queued = crate::fixture::queue_digest(layout, &pair.nodes[p].queue_dir)
        .map_err(|e| e.to_string())?;
    r.queue_messages_before = queued.values().sum::<usize>() as u64;
    step(
        r,
        format!(
            "{} messages waiting in {}'s Postfix queue (deferred/ and hold/)",
            r.queue_messages_before, pair.nodes[p].name
        ),
    );

    // Let a few heartbeats flow so that the kill lands in steady state.
    std::thread::sleep(interval * 3);
    let killed_at = Instant::now();
    pair.nodes[p]
        .kill9()
        .map_err(|e| format!("killing {}: {e}", pair.nodes[p].name))?;
    step(r, format!("kill -9 {} (the primary)", pair.nodes[p].name));
    let took_over = pair.nodes[s].wait_status(
        window * 4 + Duration::from_secs(2),
        Duration::from_millis(5),
        |st| st.mode == Role::Primary,
    )?;
    let detect = killed_at.elapsed().as_millis() as u64;
    r.failover_detect_ms = Some(detect);
    r.epoch_after = Some(took_over.epoch);
    step(
        r,
        format!(
            "{} took over as primary at epoch {} after {detect} ms (bound {} ms: {})",
            pair.nodes[s].name, took_over.epoch, r.failover_detect_bound_ms, took_over.reason
        ),
    );

    pair.nodes[p]
        .start()
        .map_err(|e| format!("restarting {}: {e}", pair.nodes[p].name))?;
    step(r, format!("restarting {}", pair.nodes[p].name));
    let rejoined =
        pair.nodes[p].wait_status(Duration::from_secs(20), Duration::from_millis(20), |st| {
            st.mode == Role::Secondary && st.queue_push.requested > 0
        })?;
    r.queue_push_requested = rejoined.queue_push.requested > 0;
    step(
        r,
        format!(
            "{} rejoined as secondary at epoch {} and raised its queue push to the new primary",
            pair.nodes[p].name, rejoined.epoch
        ),
    );
    let pushed =
        pair.nodes[p].wait_status(Duration::from_secs(60), Duration::from_millis(20), |st| {
            !st.queue_push.pending && !st.queue_push.running && st.queue_push.requested > 0
        })?;
    let old_q = crate::fixture::queue_digest(layout, &pair.nodes[p].queue_dir)
        .map_err(|e| e.to_string())?;
    let new_q = crate::fixture::queue_digest(layout, &pair.nodes[s].queue_dir)
        .map_err(|e| e.to_string())?;
    r.queue_pushed = pushed.queue_push.last.pushed;
    r.queue_duplicates_dropped = pushed.queue_push.last.duplicates_dropped;
    for (k, n) in &queued {
        let total = old_q.get(k).copied().unwrap_or(0) + new_q.get(k).copied().unwrap_or(0);
        if total < *n {
            r.queue_lost += (*n - total) as u64;
        }
        if total > *n {
            r.queue_duplicated += (total - *n) as u64;
        }
    }
    step(
        r,
        format!(
            "queue push: {} messages pushed to {}, {} duplicates dropped; by content hash: {} lost, {} duplicated, {} left on {}",
            r.queue_pushed,
            pair.nodes[s].name,
            r.queue_duplicates_dropped,
            r.queue_lost,
            r.queue_duplicated,
            old_q.values().sum::<usize>(),
            pair.nodes[p].name
        ),
    );

    // The direction reverses: mail delivered on the new primary reaches the old one.
    let mut w2 = Workload::new(&dst, MaildirSpec { seed: 43, ..spec });
    for _ in 0..20 {
        w2.deliver(4096).map_err(|e| format!("workload: {e}"))?;
    }
    let t = wait_identical(&dst, &src, Duration::from_secs(60));
    r.mailstore_identical_after_failover = t.is_ok();
    step(
        r,
        format!(
            "20 messages delivered on the new primary {}: replica on {} {}",
            pair.nodes[s].name,
            pair.nodes[p].name,
            if t.is_ok() {
                "identical again"
            } else {
                "DIFFERENT"
            }
        ),
    );
    let new_primary = pair.nodes[s].status()?;
    r.roles_after
        .insert(pair.nodes[p].name.clone(), rejoined.mode);
    r.roles_after
        .insert(pair.nodes[s].name.clone(), new_primary.mode);
    r.ok = new_primary.mode == Role::Primary
        && rejoined.mode == Role::Secondary
        && r.queue_push_requested
        && took_over.epoch > before.epoch
        && r.mailstore_identical
        && r.mailstore_identical_after_failover
        && r.queue_lost == 0
        && r.queue_duplicated == 0
        && r.queue_messages_before > 0;
    for n in pair.nodes.iter_mut() {
        let _ = n.kill9();
    }
    Ok(())
}
