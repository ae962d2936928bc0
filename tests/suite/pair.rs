//! Two real `hasync` processes on loopback.

use std::time::{Duration, Instant};

use hasync::daemon::control::Request;

use super::util::*;

#[test]
fn kill9_primary_fails_over_and_old_primary_rejoins_as_secondary() {
    let (mut tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let before = tp.nodes[p].status().unwrap();
    assert_eq!(before.mode, Role::Primary);
    std::thread::sleep(Duration::from_millis(300));

    let killed = Instant::now();
    tp.nodes[p].kill9().unwrap();
    let window = tp.detection_window();
    let after = tp.nodes[s]
        .wait_status(window * 10, Duration::from_millis(5), |st| {
            st.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let detect = killed.elapsed();
    println!(
        "failover detection: {} ms (threshold x interval = {} ms, plus one interval = {} ms)",
        detect.as_millis(),
        window.as_millis(),
        (window + Duration::from_millis(tp.options.heartbeat_interval_ms)).as_millis()
    );
    assert!(
        after.epoch > before.epoch,
        "takeover must take a newer epoch"
    );
    assert!(
        after.reason.contains("new epoch is durable"),
        "{}",
        after.reason
    );

    // The old primary restarts, finds the new primary, becomes secondary and
    // raises its queue push.
    tp.nodes[p].start().unwrap();
    let rejoined = tp.nodes[p]
        .wait_status(Duration::from_secs(15), Duration::from_millis(20), |st| {
            st.mode == Role::Secondary && st.queue_push.requested > 0
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(rejoined.epoch, after.epoch);
    assert_eq!(rejoined.queue_push.last_target_epoch, Some(after.epoch));
    assert!(
        tp.nodes[p].log_shows("queue push requested"),
        "{}",
        tp.logs()
    );
    assert_eq!(tp.nodes[s].status().unwrap().mode, Role::Primary);
}

#[test]
fn wrong_secret_is_refused_before_any_state_change() {
    let mut tp = TestPair::new(fast());
    std::fs::write(
        tp.nodes[1].root.join("link.secret"),
        b"a-different-secret-0000000\n",
    )
    .unwrap();
    tp.start_all();
    // Give the nodes several handshake attempts.
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |st| {
            st.link.auth_failures > 0
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    std::thread::sleep(Duration::from_millis(500));
    for n in tp.nodes.iter() {
        let st = n.status().unwrap();
        assert!(
            !st.peer.seen,
            "{}: a peer with the wrong secret must never be heard",
            n.name
        );
        assert_eq!(st.link.heartbeats_received, 0);
    }
    assert!(st.link.auth_failures > 0);
    let log = tp.nodes[0].log_when(LOG_WAIT, |log| {
        log.contains("failed authentication") && log.contains("link refused")
    });
    assert!(
        log.contains("failed authentication") && log.contains("link refused"),
        "log must say why the peer was refused:\n{log}"
    );
}

#[test]
fn manual_switchover_from_either_node() {
    let (tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    // On the primary: it hands over to the secondary.
    let out = hasync(&[
        "failover",
        "--wait",
        "--config",
        tp.nodes[p].config_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let new_p = tp.nodes[s]
        .wait_status(Duration::from_secs(10), Duration::from_millis(5), |st| {
            st.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let old = tp.nodes[p]
        .wait_status(Duration::from_secs(10), Duration::from_millis(5), |st| {
            st.mode == Role::Secondary
        })
        .unwrap();
    let stepped_down = old
        .transitions
        .iter()
        .rev()
        .find(|t| t.message.starts_with("now handing-over"))
        .expect("old primary logged its step-down")
        .at_unix_ms;
    let took_over = new_p
        .transitions
        .iter()
        .rev()
        .find(|t| t.message.starts_with("now primary"))
        .unwrap()
        .at_unix_ms;
    println!(
        "switchover gap without a primary: {} ms (interval {} ms)",
        took_over.saturating_sub(stepped_down),
        tp.options.heartbeat_interval_ms
    );
    assert!(
        took_over >= stepped_down,
        "the new primary must not start before the old one stepped down"
    );

    // On the (new) secondary: it asks the primary to hand back.
    let out = hasync(&[
        "failover",
        "--wait",
        "--socket",
        tp.nodes[p].socket().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tp.nodes[p]
        .wait_status(Duration::from_secs(10), Duration::from_millis(5), |st| {
            st.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[s]
        .wait_status(Duration::from_secs(10), Duration::from_millis(5), |st| {
            st.mode == Role::Secondary
        })
        .unwrap();
}

#[test]
fn node_whose_directories_vanish_steps_out_as_failed() {
    let (tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let queue = tp.nodes[p].queue_dir.clone();
    let moved = queue.with_extension("away");
    std::fs::rename(&queue, &moved).unwrap();
    let failed = tp.nodes[p]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |st| {
            st.mode == Role::Failed
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(
        failed.reason.contains("queue_dir"),
        "failed mode must say why: {}",
        failed.reason
    );
    // The operator asks why with the command line: it needs only the
    // control socket, not a config whose directories all exist.
    let cfg = tp.nodes[p].config_path.to_str().unwrap().to_string();
    let out = hasync(&["status", "--config", &cfg]);
    assert!(out.status.success(), "status refused: {out:?}");
    let shown = text(&out.stdout);
    assert!(
        shown.contains("failed") && shown.contains("queue_dir"),
        "status shows the failure and why: {shown}"
    );
    tp.nodes[s]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |st| {
            st.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // The directory comes back: the node rejoins as secondary and pushes.
    std::fs::rename(&moved, &queue).unwrap();
    tp.nodes[p]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |st| {
            st.mode == Role::Secondary && st.queue_push.requested > 0
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

#[test]
fn switchover_without_peer_is_refused_with_a_reason() {
    let mut tp = TestPair::new(fast());
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(20), |st| {
            st.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let resp = tp.nodes[0]
        .request(&Request::Failover { force: false })
        .unwrap();
    assert!(!resp.ok);
    assert!(resp.error.unwrap().contains("not heard"));
}

#[test]
fn demo_json_reports_a_successful_failover() {
    let out = hasync(&["demo", "--json"]);
    let stdout = text(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("demo --json must print one JSON object ({e}): {stdout}"));
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["failover_detect_ms"].as_u64().unwrap() > 0);
    let roles = v["roles_after"].as_object().unwrap();
    let mut r: Vec<_> = roles
        .values()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    r.sort();
    assert_eq!(r, ["primary", "secondary"]);
    assert!(out.status.success());
}

/// A node restarted long after its peer lost it (the peer's dialer backs off
/// to 2 s between attempts) hears the peer within a start-up wait shorter
/// than that backoff: connecting to the peer wakes the peer's dialer. It
/// joins as secondary and never promotes itself (before, it promoted and
/// won the split brain with a stale replica).
#[test]
fn a_node_restarted_after_a_long_outage_hears_its_peer_within_a_short_startup_wait() {
    let (mut tp, p) = TestPair::formed(PairOptions {
        heartbeat_interval_ms: 50,
        heartbeat_lost_threshold: 4,
        startup_wait_ms: 400,
        ..PairOptions::default()
    });
    let s = 1 - p;
    tp.nodes[p].kill9().unwrap();
    tp.nodes[s]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |st| {
            st.mode == Role::Primary
        })
        .unwrap();
    // Long enough for the survivor's dialer to reach its 2 s ceiling.
    std::thread::sleep(Duration::from_secs(5));
    for round in 0..4 {
        tp.nodes[p].start().unwrap();
        let st = tp.nodes[p]
            .wait_status(Duration::from_secs(10), Duration::from_millis(10), |st| {
                st.mode == Role::Secondary
            })
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", tp.logs()));
        assert!(
            st.transitions
                .iter()
                .all(|t| !t.message.contains("now promoting")),
            "round {round}: the restarted node promoted itself: {:?}",
            st.transitions
        );
        assert_eq!(tp.nodes[s].status().unwrap().mode, Role::Primary);
        tp.nodes[p].kill9().unwrap();
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// "Is it safe to fail over now?": while the secondary is still being
/// filled, status says what would be left behind and `hasync failover`
/// refuses; `--wait` waits for the catch-up and then switches over with
/// nothing left behind; `--force` does not wait.
#[test]
fn a_switchover_that_would_leave_changes_behind_is_refused_unless_waited_for_or_forced() {
    let mut tp = TestPair::new(fast());
    hasync::fixture::generate_maildirs(&tp.store(0, "inbox"), &spec(7, 40, 6000)).unwrap();
    tp.start_all();
    assert_eq!(tp.wait_roles(Duration::from_secs(20)).unwrap(), 0);
    let cfg0 = tp.nodes[0].config_path.to_str().unwrap().to_string();
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(5), |s| {
            s.switchover_blocker.is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let why = st.switchover_blocker.unwrap();
    println!("status during the initial sync: {why}");
    let shown = text(&hasync(&["status", "--config", &cfg0]).stdout);
    assert!(shown.contains("failover  NOT SAFE"), "{shown}");
    let out = hasync(&["failover", "--config", &cfg0]);
    assert!(!out.status.success(), "refused while the replica is filled");
    let err = text(&out.stderr);
    assert!(err.contains("not safe") && err.contains("--force"), "{err}");
    assert_eq!(tp.nodes[0].status().unwrap().mode, Role::Primary);
    let t0 = Instant::now();
    let out = hasync(&["failover", "--wait", "--config", &cfg0]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    println!(
        "--wait: {} after {:?}",
        text(&out.stdout).trim(),
        t0.elapsed()
    );
    assert!(text(&out.stdout).contains("waiting: "), "it waited");
    tp.nodes[1]
        .wait_status(Duration::from_secs(20), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    wait_identical(
        &tp.store(0, "inbox"),
        &tp.store(1, "inbox"),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Back at once with --force (the new secondary may not have caught up).
    let cfg1 = tp.nodes[1].config_path.to_str().unwrap().to_string();
    tp.nodes[1]
        .wait_status(Duration::from_secs(20), Duration::from_millis(10), |s| {
            s.peer.role == Some(Role::Secondary)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let out = hasync(&["failover", "--force", "--config", &cfg1]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tp.nodes[0]
        .wait_status(Duration::from_secs(20), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// Starts mx1 alone over a store of a few thousand messages (primary),
/// then mx2, and kills mx1 (an abort, like `kill -9`) once mx2 has
/// acknowledged a few batches of its first sync: mx2's replica is
/// incomplete. Returns the pair and how many files mx1 holds.
fn primary_lost_during_the_first_sync() -> TestPair {
    // mx2 has the higher priority: only its incomplete replica keeps it
    // from winning elections.
    let mut tp = TestPair::new(PairOptions {
        priorities: [100, 200],
        ..fast()
    });
    hasync::fixture::generate_maildirs(&tp.store(0, "inbox"), &spec(5, 20, 4000)).unwrap();
    tp.nodes[0]
        .start_with_env(&[("HASYNC_FAILPOINTS", "sender.acked=3")])
        .unwrap();
    tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
    tp.nodes[1].start().unwrap();
    assert!(
        tp.nodes[0].wait_exit(Duration::from_secs(60)),
        "mx1 aborts at its third acknowledged batch\n{}",
        tp.logs()
    );
    tp
}

/// A secondary whose first sync was cut by the loss of its primary holds
/// only part of the mail: it does not take over (its users would find
/// their mailboxes emptied, and whatever they did would turn the old
/// primary's mail into conflicts), not even after a restart; the old
/// primary, started again, takes the role back on hearing it and finishes
/// the fill.
#[test]
fn a_secondary_whose_first_sync_did_not_finish_does_not_take_over() {
    let mut tp = primary_lost_during_the_first_sync();
    let window = tp.detection_window();
    let st = tp.nodes[1]
        .wait_status(window * 10, Duration::from_millis(20), |s| {
            !s.peer.alive
                && s.alarms
                    .iter()
                    .any(|a| a.message.contains("does not promote"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(st.replication.replica_incomplete, "{st:?}");
    std::thread::sleep(window * 4);
    let st = tp.nodes[1].status().unwrap();
    assert_eq!(st.mode, Role::Secondary, "no takeover\n{}", tp.logs());
    let held = walk_files(&tp.store(1, "inbox"));
    let all = walk_files(&tp.store(0, "inbox"));
    assert!(
        held < all,
        "the replica holds part of the store ({held} of {all} files)"
    );
    let cfg1 = tp.nodes[1].config_path.to_str().unwrap().to_string();
    let shown = text(&hasync(&["status", "--config", &cfg1]).stdout);
    assert!(shown.contains("INCOMPLETE"), "{shown}");
    assert_eq!(
        std::fs::read_to_string(tp.nodes[1].state_dir.join("replica-fill"))
            .unwrap()
            .trim(),
        "filling"
    );

    // Restarted while its peer is still down: it waits out the start-up
    // wait and longer without serving.
    assert!(tp.nodes[1].stop(Duration::from_secs(10)));
    tp.nodes[1].start().unwrap();
    std::thread::sleep(Duration::from_millis(tp.options.startup_wait_ms) + window * 4);
    let st = tp.nodes[1].status().unwrap();
    assert_eq!(st.mode, Role::Negotiating, "{}", tp.logs());
    assert!(st.replication.replica_incomplete);

    // The old primary comes back: it serves again (mx2 would win the
    // election on priority, but not with an incomplete replica) and the
    // fill ends with the replica complete.
    tp.nodes[0].start().unwrap();
    let st = tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
    assert!(
        st.transitions.iter().any(|t| t
            .message
            .contains("won start-up election against peer priority 200")),
        "it won against the higher priority: {:?}",
        st.transitions
    );
    tp.wait_mode(1, Role::Secondary, Duration::from_secs(20));
    wait_identical(
        &tp.store(0, "inbox"),
        &tp.store(1, "inbox"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[1]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            !s.replication.replica_incomplete
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(
        std::fs::read_to_string(tp.nodes[1].state_dir.join("replica-fill"))
            .unwrap()
            .trim(),
        "complete"
    );
}

/// The operator whose primary is lost for good during the first sync
/// accepts the incomplete replica: the node takes over with what it holds.
#[test]
fn an_incomplete_replica_accepted_by_the_operator_takes_over() {
    let tp = primary_lost_during_the_first_sync();
    let window = tp.detection_window();
    tp.nodes[1]
        .wait_status(window * 10, Duration::from_millis(20), |s| {
            !s.peer.alive && s.replication.replica_incomplete
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let cfg1 = tp.nodes[1].config_path.to_str().unwrap().to_string();
    let out = hasync(&["accept-replica", "--config", &cfg1]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let st = tp.wait_mode(1, Role::Primary, Duration::from_secs(10));
    assert!(!st.replication.replica_incomplete);
    // Refused where there is nothing to accept.
    let again = hasync(&["accept-replica", "--config", &cfg1]);
    assert!(!again.status.success(), "nothing left to accept");
    assert!(
        text(&again.stderr).contains("not incomplete"),
        "{}",
        text(&again.stderr)
    );
}

/// Regular files under `dir`.
fn walk_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                n += 1;
            }
        }
    }
    n
}

/// The daemon's loop carries the heartbeats and reads no disk: a conflicts
/// directory of 100,000 versions, listed (`hasync conflicts list`) and
/// counted (`hasync status`) again and again on the primary, delays no
/// heartbeat: no peer lost, no failover.
#[test]
fn listing_a_huge_conflicts_directory_delays_no_heartbeat() {
    let (tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let slot = tp.nodes[p]
        .state_dir
        .join("internal/inbox/conflicts/1700000000-00000000000000aa");
    for d in 0..100 {
        let dir = slot.join(format!("u{d}/cur"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            std::fs::File::create(dir.join(format!("{f}:2,S"))).unwrap();
        }
    }
    let socket = tp.nodes[p].socket();
    let t0 = Instant::now();
    let mut lists = 0;
    while t0.elapsed() < Duration::from_secs(4) || lists < 2 {
        let r =
            hasync::daemon::control::request(&socket, &Request::Conflicts, Duration::from_secs(60))
                .unwrap();
        assert_eq!(r.conflicts.map(|c| c.len()), Some(100_000), "{:?}", r.error);
        tp.nodes[p].status().unwrap();
        lists += 1;
    }
    let st = tp.nodes[p]
        .wait_status(Duration::from_secs(20), Duration::from_millis(50), |s| {
            s.conflicts.count == 100_000
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    println!(
        "{lists} listings of 100,000 kept-aside versions in {:?}; the heartbeat gap seen by the primary: p99 {:?} max {:?} ms",
        t0.elapsed(),
        st.link.heartbeat_gap_ms_p99,
        st.link.heartbeat_gap_ms_max
    );
    let sec = tp.nodes[s].status().unwrap();
    for (node, st) in [(p, &st), (s, &sec)] {
        assert!(
            !st.alarms.iter().any(|a| a.message.contains("peer lost")),
            "node {node}: {:?}\n{}",
            st.alarms,
            tp.logs()
        );
    }
    assert_eq!(st.mode, Role::Primary);
    assert_eq!(sec.mode, Role::Secondary);
    // The secondary heard every heartbeat in time (lost after 500 ms).
    let gap = sec.link.heartbeat_gap_ms_max.unwrap_or(0.0);
    assert!(gap < 400.0, "the secondary heard no heartbeat for {gap} ms");
}

/// A node replaced (new disks: no state, an empty store) beside a
/// secondary whose first sync did not finish does not take over: it holds
/// no mail, and serving would delete from the replica what only the
/// replica holds. Both wait, alarmed, for the operator, who accepts the
/// replica; the replaced node then fills from it.
#[test]
fn a_replaced_node_does_not_take_over_from_an_incomplete_replica() {
    let mut tp = primary_lost_during_the_first_sync();
    let window = tp.detection_window();
    tp.nodes[1]
        .wait_status(window * 10, Duration::from_millis(20), |s| {
            !s.peer.alive && s.replication.replica_incomplete
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // What mx1 sent before it aborted may still be landing (the frames
    // read ahead, the files staged): counted once the replica is still.
    let mut held = walk_files(&tp.store(1, "inbox"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = walk_files(&tp.store(1, "inbox"));
        if now == held || std::time::Instant::now() > deadline {
            break;
        }
        held = now;
    }
    assert!(held > 0, "the replica holds part of the mail");
    // mx1's disks are replaced: no state, an empty store.
    let state = tp.nodes[0].state_dir.clone();
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let store = tp.store(0, "inbox");
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    tp.nodes[0].start().unwrap();
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.alarms
                .iter()
                .any(|a| a.message.contains("never held the mail"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_ne!(st.mode, Role::Primary);
    std::thread::sleep(Duration::from_millis(tp.options.startup_wait_ms) + window * 2);
    assert_ne!(
        tp.nodes[0].status().unwrap().mode,
        Role::Primary,
        "{}",
        tp.logs()
    );
    assert_eq!(tp.nodes[1].status().unwrap().mode, Role::Secondary);
    assert_eq!(walk_files(&tp.store(1, "inbox")), held, "nothing deleted");
    // The operator accepts mx2's replica: it serves, and mx1 fills from it.
    let cfg1 = tp.nodes[1].config_path.to_str().unwrap().to_string();
    let out = hasync(&["accept-replica", "--config", &cfg1]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tp.wait_mode(1, Role::Primary, Duration::from_secs(10));
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(
        &tp.store(1, "inbox"),
        &tp.store(0, "inbox"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(walk_files(&tp.store(1, "inbox")), held, "nothing deleted");
}

/// mx2 is handed the primary role, and asked to hand it back while it
/// still walks its stores for its takeover record (stretched to 15 s here,
/// as a large store's walk takes; the walk runs off the replication loop):
/// the switchover waits for the walk (it drains replication first), mx2
/// takes mx1's sync session only once its walk and record are done, and
/// the pair converges.
#[test]
fn a_switchover_back_during_the_takeover_walk_waits_for_it_and_converges() {
    let (mut tp, p) = TestPair::formed(fast());
    assert_eq!(p, 0);
    restart_with_a_slow_takeover_walk(&mut tp, 1, 15000);
    let r = tp.nodes[0]
        .request(&Request::Failover { force: true })
        .unwrap();
    assert!(r.ok, "switchover to mx2 refused: {r:?}\n{}", tp.logs());
    // A switchover needs the peer in role secondary: mx1 reports
    // handing-over until its own demotion is durable, a heartbeat later.
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary && s.peer.role == Some(Role::Secondary)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let r = tp.nodes[1]
        .request(&Request::Failover { force: true })
        .unwrap();
    assert!(r.ok, "switchover back to mx1 refused: {r:?}\n{}", tp.logs());
    let deadline = Instant::now() + Duration::from_secs(40);
    let synced_again = |l: &str| {
        l.find("now primary")
            .is_some_and(|at| l[at..].contains("sync connection from primary up"))
    };
    while !synced_again(&tp.nodes[1].log()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = tp.logs();
    let l = tp.nodes[1].log();
    let promoted = l.find("now primary").expect("mx2 was primary");
    let after = &l[promoted..];
    let session = after
        .find("sync connection from primary up")
        .unwrap_or_else(|| panic!("mx1 never synced to mx2 again\n{log}"));
    let walked = after
        .find("takeover record written")
        .unwrap_or_else(|| panic!("mx2's walk never ended\n{log}"));
    assert!(
        walked < session,
        "mx2 took a sync session while its takeover walk still ran\n{log}"
    );
    let src = tp.store(0, "inbox");
    std::fs::write(src.join("after-the-handback"), b"Subject: x\n\nbody\n").unwrap();
    wait_identical(&src, &tp.store(1, "inbox"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// mx2 takes over from a killed mx1 and walks for its takeover record
/// (stretched to 20 s); a primary with a higher epoch (the test, with the
/// pair's key) demotes it during the walk. Sync connections from that
/// primary wait for the walk; a newer one replaces the one waiting at once
/// (a peer that redials during a long walk holds one socket open on the
/// replica, not one per attempt), and the newest is served once the walk
/// ends.
#[test]
fn a_sync_connection_waiting_for_the_takeover_walk_is_replaced_by_a_newer_one() {
    use hasync::config::Config;
    use hasync::wire::sync::SyncMsg;

    let (mut tp, p) = TestPair::formed(fast());
    assert_eq!(p, 0);
    restart_with_a_slow_takeover_walk(&mut tp, 1, 20000);
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let cfg = Config::load(&tp.nodes[1].config_path).unwrap();
    let node = &tp.nodes[1];
    let walk_over = || {
        let l = node.log();
        l.find("now primary")
            .is_some_and(|at| l[at..].contains("takeover record written"))
    };
    let (closed_in, walk_over_then, answered) = tokio_uring::start(async {
        let beat =
            super::hostile::beat_as_primary(&cfg, std::rc::Rc::new(std::cell::Cell::new(100)))
                .await;
        super::hostile::wait_secondary(node).await;
        let (mut first_r, _first_w) = super::hostile::start_sync(&cfg, 100).await;
        let (mut second_r, _second_w) = super::hostile::start_sync(&cfg, 100).await;
        let t = Instant::now();
        let closed_in =
            match tokio::time::timeout(Duration::from_secs(8), first_r.recv_frame()).await {
                Ok(Err(_)) => t.elapsed(),
                Ok(Ok(_)) => panic!("the first connection was answered during the walk"),
                Err(_) => panic!("the first connection still waits 8 s after a newer one came"),
            };
        let walk_over_then = walk_over();
        // The newest is served once the walk ends.
        let f = tokio::time::timeout(Duration::from_secs(40), second_r.recv_frame())
            .await
            .expect("the newest connection is answered after the walk")
            .expect("the newest connection stays open");
        beat.abort();
        (closed_in, walk_over_then, SyncMsg::decode(&f).unwrap())
    });
    assert!(
        !walk_over_then,
        "the walk ended before the check ({closed_in:?})\n{}",
        tp.logs()
    );
    assert!(
        walk_over(),
        "the newest connection was answered before the walk ended\n{}",
        tp.logs()
    );
    assert!(
        matches!(answered, SyncMsg::PeerState { .. }),
        "{answered:?}"
    );
}
