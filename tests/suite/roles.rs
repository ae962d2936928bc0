//! Role hooks with real daemons: order, environment, a switchover that
//! stops the writer and drains replication before the peer promotes, a
//! failed on_primary that steps down, and on_secondary at shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::util::*;

/// Hooks that append `<hook> <event> <role> <epoch> <previous role>` to
/// `<node>/hooks.log`.
fn logging_hooks(extra: &str) -> String {
    let line = |hook: &str| {
        format!(
            "[\"/bin/sh\", \"-c\", \"echo {hook} $HASYNC_EVENT $HASYNC_ROLE $HASYNC_EPOCH $HASYNC_PREVIOUS_ROLE >> {{node_root}}/hooks.log\"]"
        )
    };
    format!(
        "[hooks]\non_primary = {}\non_secondary = {}\non_failed = {}\non_off = {}\n{extra}",
        line("on_primary"),
        line("on_secondary"),
        line("on_failed"),
        line("on_off"),
    )
}

fn hook_lines(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_for_line(root: &Path, prefix: &str, timeout: Duration) -> Vec<String> {
    let until = Instant::now() + timeout;
    loop {
        let lines = hook_lines(root);
        if lines.iter().any(|l| l.starts_with(prefix)) {
            return lines;
        }
        assert!(
            Instant::now() < until,
            "no hook line {prefix:?} in {}: {lines:?}",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn opts(extra: String) -> PairOptions {
    PairOptions {
        heartbeat_interval_ms: 50,
        heartbeat_lost_threshold: 4,
        startup_wait_ms: 600,
        extra_toml: Some(extra),
        ..PairOptions::default()
    }
}

#[test]
fn hooks_follow_the_roles_in_order_with_their_environment() {
    let (mut tp, p) = TestPair::formed(opts(logging_hooks("")));
    assert_eq!(p, 0);
    let roots: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.root.clone()).collect();
    let l1 = wait_for_line(
        &roots[0],
        "on_primary role-change primary",
        Duration::from_secs(10),
    );
    let l2 = wait_for_line(
        &roots[1],
        "on_secondary role-change secondary",
        Duration::from_secs(10),
    );
    assert!(!l1.iter().any(|l| l.starts_with("on_secondary")), "{l1:?}");
    assert!(!l2.iter().any(|l| l.starts_with("on_primary")), "{l2:?}");
    // The primary dies; the secondary takes over and runs on_primary at its
    // new epoch.
    tp.nodes[0].kill9().unwrap();
    let st = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    let l2 = wait_for_line(
        &roots[1],
        &format!("on_primary role-change primary {}", st.epoch),
        Duration::from_secs(10),
    );
    assert!(
        l2.last().unwrap().ends_with("promoting"),
        "previous role in the environment: {l2:?}"
    );
    // The old primary restarts and rejoins: its MTA must stay stopped.
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Secondary
        })
        .unwrap();
    let l1 = wait_for_line(
        &roots[0],
        "on_secondary role-change secondary",
        Duration::from_secs(10),
    );
    let st = tp.nodes[1].status().unwrap();
    assert_eq!(st.hooks.configured.len(), 4);
    assert!(
        st.hooks.last.iter().any(|r| r.ok && r.epoch == st.epoch),
        "{:?}",
        st.hooks
    );
    // A primary that stops runs on_secondary (its MTA goes down with it).
    assert!(tp.nodes[1].stop(Duration::from_secs(10)));
    wait_for_line(
        &roots[1],
        "on_secondary shutdown primary",
        Duration::from_secs(5),
    );
    println!("mx1: {l1:?}");
}

/// A node that cannot write its former-primary mark (what it tells a later
/// primary about this tenure) does not serve: no on_primary hook until the
/// mark is written, one alarm saying why; it serves once the mark is
/// written.
#[test]
fn a_primary_that_cannot_mark_its_tenure_waits_to_serve() {
    let (mut tp, p) = TestPair::formed(opts(logging_hooks("")));
    assert_eq!(p, 0);
    let root = tp.pair.nodes[1].root.clone();
    wait_for_line(
        &root,
        "on_secondary role-change secondary",
        Duration::from_secs(10),
    );
    // The mark's temporary name taken by a directory: its write fails.
    let blocker = tp.nodes[1].state_dir.join(".former-primary.tmp");
    std::fs::create_dir(&blocker).unwrap();
    tp.nodes[0].kill9().unwrap();
    let st = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let alarms = loop {
        let s = tp.nodes[1].status().unwrap();
        let n = s
            .alarms
            .iter()
            .filter(|a| {
                a.message
                    .contains("cannot mark this node as serving primary")
            })
            .count();
        if n > 0 || Instant::now() > until {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(alarms, 1, "{}", tp.logs());
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !hook_lines(&root)
            .iter()
            .any(|l| l.starts_with("on_primary")),
        "on_primary ran without the mark\n{}",
        tp.logs()
    );
    assert!(!tp.nodes[1]
        .state_dir
        .join(hasync::replica::takeover::FORMER_PRIMARY_FILE)
        .exists());
    std::fs::remove_dir(&blocker).unwrap();
    wait_for_line(
        &root,
        &format!("on_primary role-change primary {}", st.epoch),
        Duration::from_secs(10),
    );
    let mark = std::fs::read_to_string(
        tp.nodes[1]
            .state_dir
            .join(hasync::replica::takeover::FORMER_PRIMARY_FILE),
    )
    .unwrap();
    assert!(
        mark.trim_end().ends_with(&format!(" {}", st.epoch)),
        "{mark:?}"
    );
}

/// A switchover with a writer (the MTA) busy on the primary: the old
/// primary's on_secondary stops the writer, every file it wrote is durable
/// on the peer before the peer promotes, nothing is kept aside as a
/// conflict.
#[test]
fn switchover_stops_the_writer_and_drains_before_the_peer_promotes() {
    let stop_hook = "[\"/bin/sh\", \"-c\", \"touch {node_root}/mta-stop; i=0; while [ ! -e {node_root}/mta-stopped ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done\"]";
    let extra = format!("[hooks]\non_secondary = {stop_hook}\n");
    let (tp, p) = TestPair::formed(opts(extra));
    assert_eq!(p, 0);
    let root = tp.pair.nodes[0].root.clone();
    let src = tp.store(0, "inbox").join("user/Maildir/new");
    std::fs::create_dir_all(&src).unwrap();
    // The writer: ~200 files/s until the hook tells it to stop.
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, src, written, done) = (root.clone(), src.clone(), written.clone(), done.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !root.join("mta-stop").exists() && !done.load(Ordering::Relaxed) {
                std::fs::write(src.join(format!("m{n}")), format!("message {n}\n")).unwrap();
                n += 1;
                written.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            std::fs::write(root.join("mta-stopped"), b"").unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let r = tp.nodes[0].switchover(Duration::from_secs(30)).unwrap();
    assert!(r.ok, "{r:?}");
    let st = tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    // The instant the peer is primary, it holds every file written.
    let on_new = digest(&tp.store(1, "inbox"));
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let n = written.load(Ordering::Relaxed);
    assert!(n > 50, "the writer was busy ({n} files)");
    let on_old = digest(&tp.store(0, "inbox"));
    let files = |d: &std::collections::BTreeMap<String, PathState>| {
        d.iter()
            .filter(|(_, s)| s.kind == "file")
            .map(|(k, s)| (k.clone(), s.hash))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        files(&on_new),
        files(&on_old),
        "every file the old primary wrote was on the new primary when it promoted\n{}",
        tp.logs()
    );
    assert!(tp.nodes[0].log_shows("replication drained"));
    tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let st2 = tp.nodes[1].status().unwrap();
    assert_eq!(st2.conflicts.count, 0, "nothing kept aside");
    println!(
        "switchover with a writer: {n} files, new primary at epoch {}",
        st.epoch
    );
}

/// With `on_primary_failure = "step-down"`, a node whose on_primary fails
/// goes `off` and the peer takes over. The hook fails as the pair forms,
/// during the peer's first sync, which takes longer than a switchover may
/// (`switchover_timeout_ms` 1 s): the node stays primary until the peer
/// holds all the mail, then hands the role over as in a switchover (an
/// incomplete replica would not take over from an `off` node, and must not
/// serve with part of the mail).
#[test]
fn on_primary_failure_with_step_down_hands_the_role_over() {
    let extra = "[hooks]\non_primary = [\"/bin/sh\", \"-c\", \"[ -e {node_root}/healthy ]\"]\non_primary_failure = \"step-down\"\nswitchover_timeout_ms = 1000\n".to_string();
    let mut tp = TestPair::new(opts(extra));
    // mx2 will be healthy, mx1 (the higher priority) not.
    std::fs::write(tp.pair.nodes[1].root.join("healthy"), b"").unwrap();
    // Mail only mx1 holds: the first sync has something to do.
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    for u in 0..20 {
        let d = a.join(format!("user{u}/Maildir/cur"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..400 {
            write(
                &d.join(format!("{i}.M{u}.mx1:2,S")),
                &format!("message {i} of user {u}\n{}", "x".repeat(4000)),
            );
        }
    }
    tp.start_all();
    let st = tp.wait_mode(1, Role::Primary, Duration::from_secs(30));
    assert_eq!(
        digest(&a),
        digest(&b),
        "the new primary holds all the mail as it serves\n{}",
        tp.logs()
    );
    let st1 = tp.wait_mode(0, Role::Off, Duration::from_secs(10));
    assert!(
        st1.reason.contains("on_primary hook failed"),
        "{}",
        st1.reason
    );
    assert!(
        st1.alarms
            .iter()
            .any(|a| a.message.contains("on_primary hook failed")),
        "{:?}",
        st1.alarms
    );
    println!(
        "mx2 primary at epoch {} after mx1's on_primary failed",
        st.epoch
    );
}

/// Something left running on the secondary (an MTA, a script) writes into
/// its replica: the secondary notices at once, alarms naming the process,
/// keeps the new and rewritten files aside (handed to the primary as
/// conflicts, so the mail is not lost), and puts its replica back to the
/// primary's tree (a deleted file comes back, the rewritten one too).
#[test]
fn a_secondary_keeps_writes_by_other_processes_aside_and_alarms() {
    let (tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let (src, dst) = (tp.store(p, "inbox"), tp.store(s, "inbox"));
    for i in 0..10 {
        let d = src.join("INBOX/cur");
        std::fs::create_dir_all(&d).unwrap();
        write(&d.join(format!("{i}.mx1:2,S")), &format!("message {i}\n"));
    }
    wait_identical(&src, &dst, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let before = tp.repl(s);
    assert_eq!(before.foreign_watch, "on", "{before:?}");
    assert_eq!(before.foreign_writes, 0);

    // This test process is "the MTA left running".
    let t0 = Instant::now();
    let stray = dst.join("INBOX/new");
    std::fs::create_dir_all(&stray).unwrap();
    for i in 0..20 {
        write(
            &stray.join(format!("stray{i}.local")),
            &format!("delivered on the secondary {i}\n"),
        );
    }
    std::fs::remove_file(dst.join("INBOX/cur/3.mx1:2,S")).unwrap();
    write(&dst.join("INBOX/cur/4.mx1:2,S"), "rewritten locally\n");
    // Opened for writing and closed without a write: not a conflict.
    drop(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dst.join("INBOX/cur/5.mx1:2,S"))
            .unwrap(),
    );

    let alarm = loop {
        let st = tp.nodes[s].status().unwrap();
        if let Some(a) = st
            .alarms
            .iter()
            .find(|a| a.message.contains("changed outside hasync"))
        {
            break a.message.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no alarm for foreign writes: {:?}\n{}",
            st.alarms,
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let noticed = t0.elapsed();
    println!("alarm after {noticed:?}: {alarm}");
    assert!(
        alarm.contains(&format!("pid {}", std::process::id())),
        "{alarm}"
    );

    // The replica is the primary's tree again, and every foreign version
    // reaches the primary's conflicts.
    wait_identical(&src, &dst, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let repaired = t0.elapsed();
    let conflicts = tp.nodes[p]
        .wait_status(Duration::from_secs(20), Duration::from_millis(50), |st| {
            st.conflicts.count >= 21
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let r = tp.repl(s);
    println!(
        "replica restored after {repaired:?}; secondary foreign writes {}, primary conflicts {}",
        r.foreign_writes, conflicts.conflicts.count
    );
    assert!(r.foreign_writes >= 22, "{r:?}");
    let mut kept = Vec::new();
    let mut untouched = Vec::new();
    let mut stack = vec![tp.nodes[p].state_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with("stray") {
                kept.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with("5.mx1") {
                untouched.push(e.path());
            }
        }
    }
    assert!(
        untouched.is_empty(),
        "a file only opened for writing became a conflict: {untouched:?}"
    );
    assert_eq!(
        kept.len(),
        20,
        "every stray delivery reaches the primary: {kept:?}"
    );
    assert_eq!(
        std::fs::read_to_string(src.join("INBOX/cur/4.mx1:2,S")).unwrap(),
        "message 4\n",
        "the primary's version stays"
    );
}
