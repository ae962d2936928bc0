//! `hasync demo`: a real pair on 127.0.0.1, a real `kill -9`, a real rejoin.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::failover::Role;
use crate::harness::{Pair, PairOptions};

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
    let new_primary = pair.nodes[s].status()?;
    r.roles_after
        .insert(pair.nodes[p].name.clone(), rejoined.mode);
    r.roles_after
        .insert(pair.nodes[s].name.clone(), new_primary.mode);
    r.ok = new_primary.mode == Role::Primary
        && rejoined.mode == Role::Secondary
        && r.queue_push_requested
        && took_over.epoch > before.epoch;
    for n in pair.nodes.iter_mut() {
        let _ = n.kill9();
    }
    Ok(())
}
