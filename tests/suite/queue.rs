//! Queue failover with real processes: push after kill -9, crash points,
//! garbage in the queue.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hasync::queue::layout::{self, Layout};

use super::util::*;

fn parse_layout(l: &str) -> Layout {
    match l {
        "flat" => Layout::Flat,
        "postfix" => Layout::Postfix,
        _ => Layout::Exim,
    }
}

/// Queues `n` messages; returns their content digest.
fn fill_queue(dir: &Path, l: &str, n: usize, seed: u64) -> BTreeMap<u128, usize> {
    hasync::fixture::generate_queue(parse_layout(l), dir, n, seed).unwrap();
    queue_digest(dir, l)
}

fn queue_digest(dir: &Path, l: &str) -> BTreeMap<u128, usize> {
    hasync::fixture::queue_digest(parse_layout(l), dir).unwrap()
}

fn opts(layout: &'static str) -> PairOptions {
    PairOptions {
        queue_layout: layout,
        heartbeat_interval_ms: 50,
        heartbeat_lost_threshold: 4,
        startup_wait_ms: 600,
        ..PairOptions::default()
    }
}

fn push_settled(tp: &TestPair, i: usize) -> hasync::daemon::control::Status {
    tp.nodes[i]
        .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary
                && s.queue_push.requested > 0
                && !s.queue_push.pending
                && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()))
}

/// kill -9 of the primary mx1, takeover by mx2, mx1 restarted: returns
/// mx1's status once its queue push has settled.
fn fail_over_and_rejoin(tp: &mut TestPair) -> hasync::daemon::control::Status {
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    tp.nodes[0].start().unwrap();
    push_settled(tp, 0)
}

fn kill9_failover_push(layout: &'static str) {
    let (mut tp, p) = TestPair::formed(opts(layout));
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, layout, 40, 1);
    assert_eq!(before.values().sum::<usize>(), 40);
    let st = fail_over_and_rejoin(&mut tp);
    println!("{layout}: push report {:?}", st.queue_push.last);
    let old = queue_digest(&tp.nodes[0].queue_dir, layout);
    let new = queue_digest(&tp.nodes[1].queue_dir, layout);
    assert!(
        old.is_empty(),
        "{layout}: the old primary's queue must be empty: {old:?}"
    );
    assert_eq!(
        new, before,
        "{layout}: every message exactly once on the new primary, metadata intact"
    );
    assert!(tp.nodes[1].status().unwrap().queue_push.ingest.ingested >= 40);
}

#[test]
fn kill9_failover_pushes_a_postfix_queue_exactly_once() {
    kill9_failover_push("postfix");
}

#[test]
fn kill9_failover_pushes_an_exim_queue_exactly_once() {
    kill9_failover_push("exim");
}

#[test]
fn kill9_failover_pushes_a_flat_queue_exactly_once() {
    kill9_failover_push("flat");
}

/// The former primary comes back as secondary and scans its replica for
/// the first manifest (here a scan that takes 20 s, as a large store's
/// would): its queue is handed over meanwhile, not after the scan, and the
/// sync session that comes during the scan waits for it and converges.
#[test]
fn the_queue_is_handed_over_while_the_returning_node_scans_its_replica() {
    let (mut tp, p) = TestPair::formed(opts("flat"));
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, "flat", 20, 11);
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    // What the users change on the new primary meanwhile reaches the
    // returning node once its scan is done.
    let mail = tp.store(1, "inbox").join("during-the-scan");
    std::fs::write(&mail, b"Subject: delivered to mx2\n\nbody\n").unwrap();
    let started = std::time::Instant::now();
    tp.nodes[0]
        .start_with_env(&[
            ("HASYNC_FAILPOINT_PRESCAN_MS", "20000"),
            ("RUST_LOG", "info,hasync::replica::engine=debug"),
        ])
        .unwrap();
    let st = push_settled(&tp, 0);
    let took = started.elapsed();
    assert!(
        !tp.nodes[0]
            .log()
            .contains("replica scanned for the first manifest"),
        "the push settled after {took:?}, and only after the scan ended: it waited for it\n{}",
        tp.nodes[0].log()
    );
    assert!(
        st.queue_push.last.pushed == 20,
        "every queued message handed over during the scan: {:?}\n{}",
        st.queue_push.last,
        tp.logs()
    );
    assert!(queue_digest(&tp.nodes[0].queue_dir, "flat").is_empty());
    assert_eq!(queue_digest(&tp.nodes[1].queue_dir, "flat"), before);
    // The session waited for the scan (its stores were lent to it) and
    // took it: the mail delivered meanwhile arrives.
    let landed = tp.store(0, "inbox").join("during-the-scan");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !landed.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never caught up after its scan\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tp.nodes[0].log_shows("replica scanned for the first manifest"),
        "{}",
        tp.nodes[0].log()
    );
}

/// The new primary walks its stores for its takeover record (here a walk
/// that takes 20 s, as a large store's would) while the former primary
/// comes back: the queue push is served meanwhile, not after the walk.
#[test]
fn the_new_primary_takes_a_queue_in_while_it_walks_for_its_takeover_record() {
    let (mut tp, p) = TestPair::formed(opts("flat"));
    assert_eq!(p, 0);
    // mx2 runs with the slow walk armed, for the takeover to come.
    tp.nodes[1].kill9().unwrap();
    tp.nodes[1]
        .start_with_env(&[
            ("HASYNC_FAILPOINT_TAKEOVER_WALK_MS", "20000"),
            ("RUST_LOG", "info"),
        ])
        .unwrap();
    let p = tp
        .wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, "flat", 20, 13);
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[0].start().unwrap();
    let st = push_settled(&tp, 0);
    assert!(
        !tp.nodes[1].log().contains("takeover record written"),
        "the push settled only after the takeover walk ended: it waited for it\n{}",
        tp.nodes[1].log()
    );
    assert_eq!(st.queue_push.last.pushed, 20, "{:?}", st.queue_push.last);
    assert!(queue_digest(&tp.nodes[0].queue_dir, "flat").is_empty());
    assert_eq!(queue_digest(&tp.nodes[1].queue_dir, "flat"), before);
}

#[test]
fn join_after_recovery_off_hands_the_queue_over() {
    let (mut tp, p) = TestPair::formed(PairOptions {
        recovery: "off",
        ..opts("postfix")
    });
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, "postfix", 25, 7);
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    tp.nodes[0].start().unwrap();
    // The policy keeps the recovered former primary out, its queue in place.
    tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.mode == Role::Off
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tp.nodes[0].status().unwrap().mode, Role::Off);
    assert_eq!(queue_digest(&tp.nodes[0].queue_dir, "postfix"), before);
    // The operator's `hasync join`: rejoin as secondary, queue handed over.
    let r = tp.nodes[0]
        .request(&hasync::daemon::control::Request::Join)
        .unwrap();
    assert!(r.ok, "join refused: {r:?}");
    let st = push_settled(&tp, 0);
    assert!(
        !st.alarms.iter().any(|a| a.message.contains("queue")),
        "alarms: {:?}",
        st.alarms
    );
    assert!(queue_digest(&tp.nodes[0].queue_dir, "postfix").is_empty());
    assert_eq!(queue_digest(&tp.nodes[1].queue_dir, "postfix"), before);
}

/// mx1 (20 queued messages) fails, mx2 takes over and is restarted with
/// `failpoints` armed, then mx1 comes back and pushes its queue to it.
/// Returns the pair and mx1's queue as it was.
fn push_to_an_armed_ingester(failpoints: &str) -> (TestPair, BTreeMap<u128, usize>) {
    let (mut tp, p) = TestPair::formed(opts("flat"));
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, "flat", 20, 5);
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    tp.nodes[1].kill9().unwrap();
    tp.nodes[1]
        .start_with_env(&[("HASYNC_FAILPOINTS", failpoints)])
        .unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[0].start().unwrap();
    (tp, before)
}

#[test]
fn push_cut_by_the_new_primarys_crash_is_cancelled_not_left_pending() {
    // mx2 dies while it ingests mx1's push, and stays down: mx1 becomes
    // primary again with its queue.
    let (mut tp, before) = push_to_an_armed_ingester("queue.after_stage=1");
    assert!(
        tp.nodes[1].wait_exit(Duration::from_secs(30)),
        "mx2 must reach its crash point\n{}",
        tp.logs()
    );
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(30), Duration::from_millis(20), |s| {
            s.mode == Role::Primary && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Let any retry or late outcome land, then check what status claims.
    std::thread::sleep(Duration::from_secs(3));
    let st2 = tp.nodes[0].status().unwrap();
    for s in [&st, &st2] {
        assert!(
            !s.queue_push.pending,
            "no push can happen on a primary: {:?}",
            s.queue_push
        );
        assert!(
            !s.alarms.iter().any(|a| a.message.contains("push-queue")),
            "no alarm asks for a push that is refused on a primary: {:?}",
            s.alarms
        );
    }
    assert!(
        tp.nodes[0].log_shows("queue push cancelled"),
        "the cancel is logged\n{}",
        tp.nodes[0].log()
    );
    // What mx2 durably took in before its crash is handed back by its own
    // push when it returns; meanwhile, nothing is lost: the union holds
    // every message exactly once.
    let a = queue_digest(&tp.nodes[0].queue_dir, "flat");
    let b = queue_digest(&tp.nodes[1].queue_dir, "flat");
    let mut union = a.clone();
    for (k, v) in &b {
        *union.entry(*k).or_insert(0) += v;
    }
    assert_eq!(union, before);
}

/// Crash points on both sides of the push, several hit counts each: the
/// union of both queues always holds every message exactly once, and once
/// the pair settles the secondary's queue is empty.
#[test]
fn queue_push_interrupted_by_crashes_never_loses_or_duplicates() {
    // Batch-level points are reached once per ingest batch; per-message
    // points are tried at the first and the ninth message.
    let points: [(usize, &str, &[u32]); 6] = [
        (1, "queue.after_stage", &[1]),
        (1, "queue.after_intent", &[1]),
        (1, "queue.mid_rename", &[1, 9]),
        (1, "queue.after_rename", &[1]),
        (1, "queue.before_ack", &[1]),
        (0, "push.after_ack_before_delete", &[1, 9]),
    ];
    for (victim, point, hits) in points {
        for &hit in hits {
            let (mut tp, _) = TestPair::formed(opts("flat"));
            let before = fill_queue(&tp.nodes[0].queue_dir, "flat", 20, 3);
            // mx1 fails; mx2 takes over (and, for a receiving-side point, is
            // restarted with the crash point armed).
            tp.nodes[0].kill9().unwrap();
            tp.nodes[1]
                .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
                    s.mode == Role::Primary
                })
                .unwrap();
            let spec = format!("{point}={hit}");
            let env = [("HASYNC_FAILPOINTS", spec.as_str())];
            if victim == 1 {
                tp.nodes[1].kill9().unwrap();
                tp.nodes[1].start_with_env(&env).unwrap();
                tp.nodes[1]
                    .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
                        s.mode == Role::Primary
                    })
                    .unwrap_or_else(|e| panic!("{point}={hit}: {e}\n{}", tp.logs()));
                tp.nodes[0].start().unwrap();
            } else {
                tp.nodes[0].start_with_env(&env).unwrap();
            }
            let crashed = tp.nodes[victim].wait_exit(Duration::from_secs(30));
            assert!(
                crashed,
                "{point}={hit}: the armed node must reach its crash point\n{}",
                tp.logs()
            );
            // Bring the crashed node back without crash points and let the pair settle.
            tp.nodes[victim].start().unwrap();
            let settled = tp.wait_formed(Duration::from_secs(30)).unwrap_or_else(|e| {
                let running = [tp.nodes[0].is_running(), tp.nodes[1].is_running()];
                panic!("{point}={hit}: {e} (running: {running:?})\n{}", tp.logs())
            });
            let secondary = 1 - settled;
            tp.nodes[secondary]
                .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
                    !s.queue_push.pending && !s.queue_push.running
                })
                .unwrap_or_else(|e| panic!("{point}={hit}: {e}\n{}", tp.logs()));
            let a = queue_digest(&tp.nodes[0].queue_dir, "flat");
            let b = queue_digest(&tp.nodes[1].queue_dir, "flat");
            let mut union = a.clone();
            for (k, v) in &b {
                *union.entry(*k).or_insert(0) += v;
            }
            assert_eq!(
                union,
                before,
                "{point}={hit}: lost or duplicated messages\n{}",
                tp.logs()
            );
            let on_secondary = if secondary == 0 { &a } else { &b };
            assert!(
                on_secondary.is_empty(),
                "{point}={hit}: the secondary still holds {on_secondary:?}"
            );
            println!("{point}={hit}: ok (primary is {})", tp.nodes[settled].name);
        }
    }
}

/// A commit that fails after its intents are in the ledger (a rename
/// failing midway) completes its batch: the ledger already counts those
/// messages, so dropping them would lose every one a later push then
/// finds a duplicate.
#[test]
fn a_commit_failing_after_its_intents_completes_its_batch() {
    let (tp, before) = push_to_an_armed_ingester("queue.fail_mid_rename=5");
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary && !s.queue_push.pending && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(
        tp.nodes[1].log_shows("queue ingest batch failed"),
        "the failpoint was reached\n{}",
        tp.logs()
    );
    assert_eq!(st.queue_push.last.failed, 0, "{:?}", st.queue_push);
    let a = queue_digest(&tp.nodes[0].queue_dir, "flat");
    let b = queue_digest(&tp.nodes[1].queue_dir, "flat");
    assert!(a.is_empty(), "the former primary still holds {a:?}");
    assert_eq!(b, before, "lost or duplicated messages\n{}", tp.logs());
}

/// A commit fails after its intents are recorded and its completion fails
/// too: the push ends without acknowledging the batch (refused, the former
/// primary would keep copies the new primary's ledger counts, and both
/// would deliver them); the retry lands the batch first, and its messages
/// are then duplicates the former primary deletes.
#[test]
fn a_batch_counted_but_not_landed_ends_the_push_unacknowledged() {
    let (tp, before) =
        push_to_an_armed_ingester("queue.fail_mid_rename=5,queue.fail_roll_forward=1");
    tp.nodes[0]
        .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary && !s.queue_push.pending && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(
        tp.nodes[1].log_shows("the push ends"),
        "the failpoints were reached\n{}",
        tp.logs()
    );
    let a = queue_digest(&tp.nodes[0].queue_dir, "flat");
    let b = queue_digest(&tp.nodes[1].queue_dir, "flat");
    assert!(a.is_empty(), "the former primary still holds {a:?}");
    assert_eq!(b, before, "lost or duplicated messages\n{}", tp.logs());
}

/// The new primary's ledger flush fails while it records a batch's
/// intents (`ledger.fail_sync`; with `cut_fails`, cutting the written
/// bytes off fails too). Either the batch is refused and nothing of it
/// stays recorded (the former primary keeps its copies), or it counts as
/// recorded and is completed: after the new primary restarts (re-reading
/// its ledger) and the former primary pushes again, every message is in
/// the queues exactly once.
fn ledger_flush_fails_during_a_push(cut_fails: bool) {
    let spec = if cut_fails {
        "ledger.fail_sync=1,ledger.fail_cut=1"
    } else {
        "ledger.fail_sync=1"
    };
    let (mut tp, before) = push_to_an_armed_ingester(spec);
    // The first push has an outcome for every message.
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
            let last = &s.queue_push.last;
            s.mode == Role::Secondary && !s.queue_push.running && last.ingested + last.failed == 20
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Refused and kept, or completed: never a part of both.
    let expect = if cut_fails { (20, 0) } else { (0, 20) };
    assert_eq!(
        (st.queue_push.last.ingested, st.queue_push.last.failed),
        expect,
        "{:?}",
        st.queue_push
    );
    assert!(
        tp.nodes[1].log_shows("failpoint ledger.fail_sync"),
        "the failpoint was reached\n{}",
        tp.logs()
    );
    // The new primary restarts alone (its ledger read again), then the
    // former primary rejoins and pushes what it still holds.
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    tp.nodes[1].kill9().unwrap();
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary && !s.queue_push.pending && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let a = queue_digest(&tp.nodes[0].queue_dir, "flat");
    let b = queue_digest(&tp.nodes[1].queue_dir, "flat");
    let mut union = a.clone();
    for (k, v) in &b {
        *union.entry(*k).or_insert(0) += v;
    }
    assert_eq!(union, before, "lost or duplicated messages\n{}", tp.logs());
    assert!(a.is_empty(), "the former primary still holds {a:?}");
}

#[test]
fn a_ledger_flush_failing_refuses_its_batch_and_records_none_of_it() {
    ledger_flush_fails_during_a_push(false);
}

#[test]
fn a_ledger_append_that_cannot_be_cut_off_completes_its_batch() {
    ledger_flush_fails_during_a_push(true);
}

#[test]
fn garbage_in_the_queue_is_reported_and_left_in_place() {
    let (mut tp, _) = TestPair::formed(opts("exim"));
    let q = tp.nodes[0].queue_dir.clone();
    let before = fill_queue(&q, "exim", 5, 4);
    // A truncated pair and a header that names another message.
    std::fs::write(q.join("input/1vAAAA-000001-00-H"), "1vAAAA-000001-00-H\n").unwrap();
    std::fs::write(q.join("input/1vBBBB-000002-00-H"), "1vZZZZ-000009-00-H\n").unwrap();
    std::fs::write(
        q.join("input/1vBBBB-000002-00-D"),
        "1vBBBB-000002-00-D\nbody\n",
    )
    .unwrap();
    let st = fail_over_and_rejoin(&mut tp);
    let g = &st.queue_push.last.garbage;
    println!("garbage: {g:?}");
    assert!(g.iter().any(|x| x.contains("1vAAAA-000001-00-H")), "{g:?}");
    assert!(g.iter().any(|x| x.contains("1vBBBB-000002-00")), "{g:?}");
    assert!(
        q.join("input/1vAAAA-000001-00-H").exists(),
        "garbage is left in place"
    );
    assert_eq!(queue_digest(&tp.nodes[1].queue_dir, "exim"), before);
    assert!(tp.nodes[0].is_running());
}

/// With continuous queue replication, the new primary delivers from the
/// promoted replica even if the old primary never comes back; when it does
/// come back, its push finds only duplicates.
#[test]
fn continuous_queue_replication_survives_a_primary_that_never_returns() {
    let mut o = opts("postfix");
    o.queue_sync = "continuous";
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("hook-runs");
    o.post_ingest_hook = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "echo \"$HASYNC_EVENT $HASYNC_MESSAGES $HASYNC_QUEUE_DIR\" >> {}",
            mark.display()
        ),
    ]);
    let (mut tp, p) = TestPair::formed(o);
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, "postfix", 30, 5);
    let replica = tp.nodes[1].state_dir.join("queue-replica");
    // Wait until the replica holds the queue (outside the live queue); the
    // secondary creates the replica directory with the first change it lands.
    let start = std::time::Instant::now();
    while !replica.exists() || queue_digest(&replica, "postfix") != before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "queue never replicated\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        queue_digest(&tp.nodes[1].queue_dir, "postfix").is_empty(),
        "the replica stays out of the live queue"
    );
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    let start = std::time::Instant::now();
    while queue_digest(&tp.nodes[1].queue_dir, "postfix") != before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replica not promoted\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // As after a push, the MTA is told (postsuper -s) of what the
    // promotion put in its queue, and the ledger counts it.
    let st = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.queue_push.ingest.hook_runs >= 1
        })
        .unwrap_or_else(|e| panic!("the promotion ran no hook: {e}\n{}", tp.logs()));
    assert_eq!(
        st.queue_push.ingest.ledger_entries, 30,
        "{:?}",
        st.queue_push.ingest
    );
    let runs = std::fs::read_to_string(&mark).unwrap();
    assert_eq!(
        runs.trim(),
        format!("promotion 30 {}", tp.nodes[1].queue_dir.display()),
        "{runs}"
    );
    // The old primary returns after all: everything it pushes is a duplicate.
    tp.nodes[0].start().unwrap();
    let st = push_settled(&tp, 0);
    println!("push after promotion: {:?}", st.queue_push.last);
    assert_eq!(
        st.queue_push.last.duplicates_dropped,
        30,
        "{:?}\n{}",
        st.queue_push,
        tp.logs()
    );
    assert_eq!(
        queue_digest(&tp.nodes[1].queue_dir, "postfix"),
        before,
        "still exactly once\n{}",
        tp.logs()
    );
    assert!(queue_digest(&tp.nodes[0].queue_dir, "postfix").is_empty());
}

/// A continuously replicated Postfix pair whose primary committed 20
/// messages with `hasync commit` (each "replicated"): the pair and the
/// messages' content hashes.
fn pair_with_committed_messages() -> (TestPair, BTreeMap<u128, usize>) {
    let mut o = opts("postfix");
    o.queue_sync = "continuous";
    let (tp, _) = TestPair::formed(o);
    let q = tp.nodes[0].queue_dir.clone();
    let cfg = tp.nodes[0].config_path.to_str().unwrap().to_string();
    std::fs::create_dir_all(q.join("incoming")).unwrap();
    let mut committed = BTreeMap::new();
    for i in 0..20 {
        let p = q.join("incoming").join(format!("C{i:09X}"));
        let body = format!("committed message {i}\r\n");
        std::fs::write(&p, &body).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let out = hasync(&["commit", "--config", &cfg, p.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.starts_with("replicated"),
            "commit {i}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        committed.insert(xxhash_rust::xxh3::xxh3_128(body.as_bytes()), 1);
    }
    (tp, committed)
}

/// The committed messages (queue IDs `C…`) in node `i`'s live queue, once
/// they are `want` or after `timeout`.
fn live_committed(
    tp: &TestPair,
    i: usize,
    want: &BTreeMap<u128, usize>,
    timeout: Duration,
) -> BTreeMap<u128, usize> {
    let start = std::time::Instant::now();
    loop {
        let scan = layout::scan(Layout::Postfix, &tp.nodes[i].queue_dir).unwrap();
        let got: BTreeMap<u128, usize> = scan
            .messages
            .iter()
            .filter(|m| m.queue_id.starts_with('C'))
            .map(|m| {
                (
                    xxhash_rust::xxh3::xxh3_128(&std::fs::read(&m.parts[0].path).unwrap()),
                    1,
                )
            })
            .collect();
        if &got == want || start.elapsed() > timeout {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The promotion of the queue replica commits a batch that fails midway
/// (after its intents are recorded): the batch is completed at once, not
/// left in staging until the next start.
#[test]
fn a_promotion_whose_commit_fails_midway_completes_its_batch() {
    promotion_with_a_fault(
        "queue.fail_mid_rename=5",
        "failpoint queue.fail_mid_rename",
        Duration::from_secs(5),
    );
}

/// The promotion of the queue replica fails (a ledger flush fails, nothing
/// counted): it is tried again while the node is primary, and every
/// committed message reaches the live queue without a restart.
#[test]
fn a_failed_promotion_is_tried_again() {
    promotion_with_a_fault(
        "ledger.fail_sync=1",
        "promoting the queue replica failed",
        Duration::from_secs(20),
    );
}

/// The secondary of a pair with committed messages restarts with
/// `failpoints` armed, then the primary dies: the new primary's log says
/// `reached`, and every committed message is in its live queue within
/// `within`.
fn promotion_with_a_fault(failpoints: &str, reached: &str, within: Duration) {
    let (mut tp, committed) = pair_with_committed_messages();
    tp.nodes[1].kill9().unwrap();
    tp.nodes[1]
        .start_with_env(&[("HASYNC_FAILPOINTS", failpoints)])
        .unwrap();
    tp.wait_mode(1, Role::Secondary, Duration::from_secs(20));
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    let live = live_committed(&tp, 1, &committed, within);
    assert!(
        tp.nodes[1].log_shows(reached),
        "the failpoint was reached\n{}",
        tp.logs()
    );
    assert_eq!(
        live,
        committed,
        "every committed message is in the live queue\n{}",
        tp.logs()
    );
}

/// Zero-loss commit: a message whose commit returned "replicated" survives
/// the primary's sudden death, even though it never comes back; with the
/// peer gone, commits degrade to local-only after the timeout.
#[test]
fn committed_messages_survive_the_primary_never_returning() {
    let (mut tp, committed) = pair_with_committed_messages();
    let st = tp.nodes[0].status().unwrap();
    assert_eq!(st.replication.commit_mode, "synchronous");
    // The primary dies right after the last commit returned, for good.
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    let live = live_committed(&tp, 1, &committed, Duration::from_secs(20));
    assert_eq!(
        live,
        committed,
        "every committed message is in the new primary's queue\n{}",
        tp.logs()
    );

    // Now the new primary is alone: a commit degrades to local-only.
    let cfg2 = tp.nodes[1].config_path.to_str().unwrap().to_string();
    let p = tp.nodes[1].queue_dir.join("incoming").join("D000000001");
    std::fs::write(&p, "after the peer died").unwrap();
    let out = hasync(&["commit", "--config", &cfg2, p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("local-only"), "{text}");
    assert_eq!(
        tp.nodes[1].status().unwrap().replication.commit_mode,
        "degraded"
    );
}

/// Periodic queue replication sends queue changes at the interval, not at once.
#[test]
fn periodic_queue_replication_sends_changes_at_the_interval() {
    let mut o = opts("flat");
    o.queue_sync = "periodic";
    o.queue_sync_interval_ms = 2000;
    // No failover here: a loaded machine must not fake one (the 200 ms
    // window of the failover tests did, once, under two test suites).
    o.heartbeat_interval_ms = 100;
    o.heartbeat_lost_threshold = 10;
    let (tp, _) = TestPair::formed(o);
    let replica = tp.nodes[1].state_dir.join("queue-replica");
    // Let the first release pass, then queue mail right after one.
    std::thread::sleep(Duration::from_millis(2500));
    let before = fill_queue(&tp.nodes[0].queue_dir, "flat", 5, 9);
    let queued = std::time::Instant::now();
    let mut seen_at = None;
    while queued.elapsed() < Duration::from_secs(10) {
        if queue_digest(&replica, "flat") == before {
            seen_at = Some(queued.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let at = seen_at.unwrap_or_else(|| panic!("periodic sync never sent the queue\n{}", tp.logs()));
    println!("queue replicated {at:?} after queueing (interval 2 s)");
    assert!(
        at <= Duration::from_secs(5),
        "sent within an interval or two"
    );
}

/// Postfix keeps each message's delay, bounce and trace logs under its
/// queue ID in `defer/`, `bounce/`, `trace/`: they travel with it (renamed
/// with it when the new primary gives it a new ID) and leave the old
/// primary with it.
#[test]
fn per_message_logs_travel_with_their_message() {
    let (mut tp, p) = TestPair::formed(opts("postfix"));
    assert_eq!(p, 0);
    let (qa, qb) = (tp.nodes[0].queue_dir.clone(), tp.nodes[1].queue_dir.clone());
    fill_queue(&qa, "postfix", 12, 7);
    let scan = layout::scan(Layout::Postfix, &qa).unwrap();
    // Logs for the first few messages, of every kind.
    let mut logs: BTreeMap<Vec<u8>, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    for (i, m) in scan.messages.iter().take(4).enumerate() {
        let body = std::fs::read(&m.parts[0].path).unwrap();
        for kind in ["defer", "bounce", "trace"].iter().take(i % 3 + 1) {
            let log = format!("recipient=<u{i}@example.net>\nreason=4.4.1 {kind} try {i}\n");
            let at = layout::side_target(Layout::Postfix, &qa, kind, &m.queue_id);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::fs::write(&at, &log).unwrap();
            logs.entry(body.clone())
                .or_default()
                .push((kind.to_string(), log.into_bytes()));
        }
    }
    // A stale log on the new primary takes the first message's ID there:
    // it lands under a new ID, and its logs must follow it.
    let taken = &scan.messages[0].queue_id;
    let stale = layout::side_target(Layout::Postfix, &qb, "defer", taken);
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"someone else's log\n").unwrap();

    fail_over_and_rejoin(&mut tp);
    let on_b = layout::scan(Layout::Postfix, &qb).unwrap();
    let mut found = 0;
    for m in &on_b.messages {
        let body = std::fs::read(&m.parts[0].path).unwrap();
        let Some(want) = logs.get(&body) else {
            assert!(m.side.is_empty() || m.queue_id == *taken, "{m:?}");
            continue;
        };
        let mut got: Vec<(String, Vec<u8>)> = m
            .side
            .iter()
            .map(|s| (s.suffix.clone(), std::fs::read(&s.path).unwrap()))
            .collect();
        got.sort();
        let mut want = want.clone();
        want.sort();
        assert_eq!(got, want, "logs of {} on the new primary", m.queue_id);
        for s in &m.side {
            assert!(s.path.ends_with(&m.queue_id), "{s:?} named by its message");
        }
        found += 1;
    }
    assert_eq!(found, 4, "{:?}", on_b.messages);
    assert!(
        on_b.messages
            .iter()
            .all(|m| &m.queue_id != taken || m.side.is_empty()),
        "the message whose ID was taken got a new one"
    );
    assert_eq!(std::fs::read(&stale).unwrap(), b"someone else's log\n");
    // Nothing of them is left on the old primary.
    for kind in ["defer", "bounce", "trace"] {
        let left: Vec<_> = walkdir(&qa.join(kind));
        assert!(
            left.is_empty(),
            "{kind} logs left on the old primary: {left:?}"
        );
    }
}

fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// A switchover drains a periodic queue's held changes at once: it does not
/// wait for the interval (a minute here), and the changes reach the peer.
#[test]
fn switchover_releases_a_periodic_queues_held_changes_at_once() {
    let mut o = opts("flat");
    o.queue_sync = "periodic";
    o.queue_sync_interval_ms = 60_000;
    o.heartbeat_interval_ms = 100;
    o.heartbeat_lost_threshold = 10;
    let (tp, p) = TestPair::formed(o);
    assert_eq!(p, 0);
    let before = fill_queue(&tp.nodes[0].queue_dir, "flat", 5, 11);
    // The tracker has seen them (held now, not sent: the interval is a minute).
    std::thread::sleep(Duration::from_millis(500));
    let replica = tp.nodes[1].state_dir.join("queue-replica");
    assert!(
        !replica.exists() || queue_digest(&replica, "flat").is_empty(),
        "held until the interval"
    );
    let cfg0 = tp.nodes[0].config_path.to_str().unwrap().to_string();
    let start = std::time::Instant::now();
    let out = hasync(&["failover", "--wait", "--config", &cfg0]);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "switchover refused after {took:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tp.logs()
    );
    println!("switchover with held periodic changes took {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "drained without waiting for the interval"
    );
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let start = std::time::Instant::now();
    while queue_digest(&tp.nodes[1].queue_dir, "flat") != before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the held changes never reached the new primary's queue\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
