//! `kill -9` of the primary at random moments, during an initial sync and
//! during live Maildir traffic, then its rejoin. Every run checks what users
//! and the operator see afterwards: no false conflict (a version the new
//! primary held at takeover kept aside), no lost message (a version only the
//! old primary held that is neither on the new primary nor among its
//! conflicts), no duplicate in the live trees, no stray file of hasync's in
//! them.
//!
//! `HASYNC_KILL_LOOPS=N` runs more (default 4, half of each kind);
//! `HASYNC_KILL_SEED=S` replays a run; `scripts/kill-loop.sh N` runs many
//! and prints the totals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hasync::failover::sim::SimRng;
use hasync::fixture::{generate_maildirs, PathState, Workload};

use super::util::*;

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    runs: u64,
    conflicts: u64,
    false_conflicts: u64,
    lost: u64,
    duplicates: u64,
    stray: u64,
}

/// Content hash → how many live files (by inode) hold it.
fn contents(tree: &BTreeMap<String, PathState>) -> HashMap<u128, usize> {
    let mut seen_groups = HashSet::new();
    let mut out: HashMap<u128, usize> = HashMap::new();
    for (path, st) in tree {
        if st.kind != "file" {
            continue;
        }
        // A hard-link group is one message under several names.
        let group = st
            .links
            .iter()
            .chain(std::iter::once(path))
            .min()
            .cloned()
            .unwrap_or_default();
        if seen_groups.insert(group) {
            *out.entry(st.hash).or_default() += 1;
        }
    }
    out
}

fn stray_in(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".hasync" || name.contains(".incoming-") {
                out.push(e.path().display().to_string());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

fn empty_or_missing(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

fn run_once(rng: &mut SimRng, live: bool, tally: &mut Tally) -> Result<(), String> {
    let mut tp = TestPair::new(fast());
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let seed = rng.next_u64();
    let messages = if live {
        120
    } else {
        rng.range(200, 800) as usize
    };
    generate_maildirs(&a, &spec(seed, 6, messages)).unwrap();
    tp.start_all();
    if tp.wait_roles(Duration::from_secs(20))? != 0 {
        return Err("mx1 did not win the election".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = if live {
        wait_identical(&a, &b, Duration::from_secs(60))?;
        let (root, stop) = (a.clone(), stop.clone());
        let spec = spec(seed ^ 1, 6, messages);
        Some(std::thread::spawn(move || {
            let mut w = Workload::new(&root, spec);
            while !stop.load(Relaxed) {
                let _ = w.step();
                std::thread::sleep(Duration::from_millis(2));
            }
        }))
    } else {
        None
    };
    // The kill, at a random moment of the initial sync or of the traffic.
    let delay = if live {
        rng.range(300, 1500)
    } else {
        rng.range(0, 400)
    };
    std::thread::sleep(Duration::from_millis(delay));
    tp.nodes[0].kill9().map_err(|e| e.to_string())?;
    stop.store(true, Relaxed);
    if let Some(w) = writer {
        w.join().map_err(|_| "writer panicked")?;
    }
    let at_kill = digest(&a);
    // Killed during mx2's first sync, its replica is incomplete and it does
    // not take over on its own: the operator accepts it as it is, and what
    // it lacks is the lag window.
    let st = tp.nodes[1].wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
        s.mode == Role::Primary || (s.replication.replica_incomplete && !s.peer.alive)
    })?;
    if st.mode != Role::Primary {
        let cfg1 = tp.nodes[1].config_path.to_str().unwrap().to_string();
        let out = hasync(&["accept-replica", "--config", &cfg1]);
        if !out.status.success() {
            return Err(format!("accept-replica: {}", text(&out.stderr)));
        }
    }
    tp.nodes[1].wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
        s.mode == Role::Primary
    })?;
    let at_takeover = digest(&b);
    let held: HashSet<u128> = contents(&at_takeover).into_keys().collect();
    // The new primary's users act on mail it held: a flag change, an
    // expunge, a new delivery. The rejoining node must follow them.
    let mut w = Workload::new(&b, spec(seed ^ 2, 6, messages));
    for _ in 0..20 {
        let _ = w.step();
    }
    let after_actions = digest(&b);
    tp.nodes[0].start().map_err(|e| e.to_string())?;
    tp.nodes[0].wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
        s.mode == Role::Secondary
    })?;
    wait_identical(&b, &a, Duration::from_secs(90))?;
    // Every kept version handed over, and the rejoined node reconciled.
    let start = Instant::now();
    let conflicts = loop {
        let (ca, cb) = (tp.conflicts(0), tp.conflicts(1));
        let reconciled = !tp.nodes[0].state_dir.join("former-primary").exists();
        if ca.is_empty() && reconciled {
            break cb;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "not reconciled: {} versions still on the old primary, mark {}",
                ca.len(),
                if reconciled { "cleared" } else { "still set" }
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let kept: Vec<u128> = conflicts
        .iter()
        .map(|c| xxhash_rust::xxh3::xxh3_128(&tp.conflict_body(1, c)))
        .collect();
    let kept_set: HashSet<u128> = kept.iter().copied().collect();
    let final_b = digest(&b);
    let final_contents = contents(&final_b);
    let false_conflicts = kept.iter().filter(|h| held.contains(h)).count() as u64;
    // A version only the old primary held must be among the conflicts,
    // unless the new primary has that content anyway.
    let lost = contents(&at_kill)
        .into_keys()
        .filter(|h| !held.contains(h) && !kept_set.contains(h) && !final_contents.contains_key(h))
        .count() as u64;
    // The rejoin changes nothing on the new primary: no message comes back
    // into its live tree a second time (duplicates against its state after
    // its own users' actions, which may copy mail themselves).
    let baseline: HashMap<u128, usize> = contents(&after_actions);
    let duplicates = final_contents
        .iter()
        .filter(|(h, n)| **n > baseline.get(*h).copied().unwrap_or(0).max(1))
        .count() as u64;
    if final_b != after_actions {
        return Err(format!(
            "the rejoin changed the new primary's tree: {}\n{}",
            diff(&after_actions, &final_b),
            tp.logs()
        ));
    }
    let mut stray = stray_in(&a).len() + stray_in(&b).len();
    for n in &tp.nodes {
        let staging = n.state_dir.join("internal/inbox/staging");
        if !empty_or_missing(&staging) {
            stray += 1;
        }
    }
    println!(
        "{} kill after {delay} ms ({messages} messages): {} conflicts kept, {false_conflicts} false, {lost} lost, {duplicates} duplicates, {stray} stray",
        if live { "live traffic:" } else { "initial sync:" },
        kept.len()
    );
    tally.runs += 1;
    tally.conflicts += kept.len() as u64;
    tally.false_conflicts += false_conflicts;
    tally.lost += lost;
    tally.duplicates += duplicates;
    tally.stray += stray as u64;
    if false_conflicts + lost + duplicates + stray as u64 > 0 {
        return Err(format!("run failed its checks\n{}", tp.logs()));
    }
    Ok(())
}

#[test]
fn kill9_at_random_moments_loses_nothing_and_keeps_aside_exactly_the_lag_window() {
    let loops: u64 = std::env::var("HASYNC_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("HASYNC_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("kill loop: seed {seed} (HASYNC_KILL_SEED={seed} replays it), {loops} runs");
    let mut rng = SimRng::new(seed);
    let mut tally = Tally::default();
    for i in 0..loops {
        if let Err(e) = run_once(&mut rng, i % 2 == 1, &mut tally) {
            panic!("run {i} of seed {seed}: {e}");
        }
    }
    println!(
        "kill loop totals: {} runs, {} conflicts kept, {} false conflicts, {} lost, {} duplicates, {} stray files",
        tally.runs, tally.conflicts, tally.false_conflicts, tally.lost, tally.duplicates, tally.stray
    );
}
