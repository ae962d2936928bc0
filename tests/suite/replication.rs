//! Mailstore replication between two real daemons.

use std::path::PathBuf;
use std::time::Duration;

use hasync::fixture::{generate_maildirs, Step, Workload};

use super::util::*;

const CONVERGE: Duration = Duration::from_secs(60);

fn started_with_fixture(
    options: PairOptions,
    seed: u64,
    mailboxes: usize,
    messages: usize,
) -> TestPair {
    let _g = inotify_guard();
    let mut tp = TestPair::new(options);
    // mx1 has the higher priority: it will be primary and sends the fixture.
    generate_maildirs(&tp.store(0, "inbox"), &spec(seed, mailboxes, messages)).unwrap();
    tp.start_all();
    let p = tp
        .wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(p, 0, "mx1 has the higher priority");
    // Its tracker starts once it is primary: still under the guard.
    tp.wait_tracking(0);
    tp
}

/// The logs of a workload are long: kept in a file, named in the panic.
fn fail_with_logs(tp: &TestPair, what: &str) -> ! {
    let logs = std::env::temp_dir().join(format!(
        "hasync-failed-logs-{}-{}.txt",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    let _ = std::fs::write(&logs, tp.logs());
    panic!("{what}\n(daemon logs: {})", logs.display())
}

#[test]
fn seeded_maildir_workload_replicates_exactly_and_renames_send_no_content() {
    let tp = started_with_fixture(fast(), 7, 6, 300);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let mut w = Workload::new(&src, spec(7, 6, 300));
    let mut counts = std::collections::HashMap::new();
    for i in 0..500 {
        let step = w.step().unwrap();
        *counts.entry(format!("{step:?}")).or_insert(0) += 1;
        if i % 25 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Something in the second mailstore too.
    std::fs::create_dir_all(tp.store(0, "quarantine").join("2026/11")).unwrap();
    std::fs::write(
        tp.store(0, "quarantine").join("2026/11/virus.eml"),
        b"X-Virus: yes\r\n\r\nbad",
    )
    .unwrap();
    println!("workload: {counts:?}");
    let took = wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    wait_identical(
        &tp.store(0, "quarantine"),
        &tp.store(1, "quarantine"),
        CONVERGE,
    )
    .unwrap();
    println!("converged {took:?} after the workload");
    let spliced = tp.repl(0);
    assert!(
        spliced.files_spliced > 0 && spliced.bytes_spliced > (256 << 10),
        "large files go out by splice: {} files, {} bytes",
        spliced.files_spliced,
        spliced.bytes_spliced
    );
    assert!(
        walk_files(&dst)
            .iter()
            .any(|p| p.metadata().is_ok_and(|m| m.len() > (1 << 20))),
        "the replica holds large files"
    );
    let d = digest(&dst);
    assert!(
        d.values().any(|s| s.links.len() > 1),
        "hard links must be kept as links"
    );
    assert!(
        d.values()
            .any(|s| s.kind == "file" && s.hash == xxhash_rust::xxh3::xxh3_128(b"")),
        "empty files"
    );
    assert!(
        d.keys().any(|k| k.ends_with("/tmp")),
        "empty tmp/ directories are replicated"
    );

    // Renames only: content must not travel again.
    let before = tp.repl(0);
    let mut renames = 0;
    while renames < 60 {
        if matches!(w.step().unwrap(), Step::FlagRename | Step::MoveToCur) {
            renames += 1;
        }
    }
    // The loop also ran other steps; let them settle, then measure a pure-rename run.
    wait_identical(&src, &dst, CONVERGE).unwrap();
    let before_pure = tp.repl(0);
    let mut moved = 0;
    for entry in walk_files(&src) {
        if moved == 40 {
            break;
        }
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if entry.parent().unwrap().ends_with("cur") && name.contains(":2,") {
            let to = entry.with_file_name(format!("{}:2,RS", name.split(":2,").next().unwrap()));
            if to != entry && !to.exists() {
                std::fs::rename(&entry, &to).unwrap();
                moved += 1;
            }
        }
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    std::thread::sleep(Duration::from_millis(300));
    let after = tp.repl(0);
    println!(
        "pure renames: {moved} files, renames sent {} -> {}, content bytes {} -> {} (mixed phase before: {} -> {})",
        before_pure.renames_sent, after.renames_sent, before_pure.content_bytes_sent, after.content_bytes_sent,
        before.content_bytes_sent, before_pure.content_bytes_sent
    );
    if after.renames_sent < before_pure.renames_sent + moved {
        fail_with_logs(&tp, "flag renames were not all sent as renames");
    }
    assert_eq!(
        after.content_bytes_sent, before_pure.content_bytes_sent,
        "flag renames must move the replica's files, not re-send their bytes"
    );
    assert_eq!(after.hash_mismatches, 0);
}

#[test]
fn per_file_fsync_durability_and_plain_reads_replicate_the_same_workload_exactly() {
    let tp = started_with_fixture(
        PairOptions {
            durability: "fsync",
            zero_copy: false,
            ..fast()
        },
        11,
        4,
        200,
    );
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let mut w = Workload::new(&src, spec(11, 4, 200));
    for i in 0..300 {
        w.step().unwrap();
        if i % 25 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    let r = tp.repl(1);
    assert!(r.files_landed >= 200, "landed only {}", r.files_landed);
    assert_eq!(r.hash_mismatches, 0);
    assert!(
        walk_files(&dst)
            .iter()
            .any(|p| p.metadata().is_ok_and(|m| m.len() > (256 << 10))),
        "large files were streamed"
    );
    assert_eq!(tp.repl(0).files_spliced, 0, "zero_copy = false reads them");
    let staging = tp.nodes[1].state_dir.join("internal/inbox/staging");
    assert!(
        !staging.exists() || std::fs::read_dir(&staging).unwrap().count() == 0,
        "nothing left staged"
    );
}

fn walk_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn inotify_overflow_triggers_a_rescan_and_the_replica_converges() {
    const LIMIT: &str = "/proc/sys/fs/inotify/max_queued_events";
    let guard = inotify_guard();
    let old = std::fs::read_to_string(LIMIT).unwrap();
    let mut tp = TestPair::new(fast());
    generate_maildirs(&tp.store(0, "inbox"), &spec(11, 4, 50)).unwrap();
    // The limit is read when an inotify instance is created: lower it only
    // while the primary's tracker starts.
    std::fs::write(LIMIT, "4").unwrap();
    tp.start_all();
    let formed = tp.wait_formed(Duration::from_secs(20));
    let tracking =
        tp.nodes[0].wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.replication.watches > 0
        });
    // A value this low can only be left over from a run of this test that
    // was killed: put back the kernel's default instead.
    let old = old.trim().parse::<u64>().unwrap();
    let restore = if old < 1024 { 16384 } else { old };
    std::fs::write(LIMIT, restore.to_string()).unwrap();
    drop(guard);
    formed.unwrap();
    tracking.unwrap();

    let src = tp.store(0, "inbox");
    let mut w = Workload::new(&src, spec(11, 4, 50));
    for _ in 0..3000 {
        w.deliver(100).unwrap();
    }
    wait_identical(&src, &tp.store(1, "inbox"), CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let r = tp.repl(0);
    println!("overflows {}, rescans {}", r.inotify_overflows, r.rescans);
    assert!(
        r.inotify_overflows > 0,
        "a queue of 4 events must overflow under 3000 deliveries"
    );
    assert!(r.rescans > 0);
    assert!(tp.nodes[0].log_shows("overflow"), "the overflow is logged");
}

/// With the inotify queue overflowing in the middle of traffic, the
/// rescans converge exactly, deletions included: messages moved new/ →
/// cur/ leave no stale new/ copy on the replica (after a failover it would
/// be a duplicate in the user's mailbox).
#[test]
fn overflow_rescans_converge_exactly_including_names_moved_away() {
    const LIMIT: &str = "/proc/sys/fs/inotify/max_queued_events";
    let guard = inotify_guard();
    let old = std::fs::read_to_string(LIMIT).unwrap();
    let mut tp = TestPair::new(fast());
    let src = tp.store(0, "inbox");
    for f in 0..20 {
        for d in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(src.join(format!("f{f:02}/Maildir/{d}"))).unwrap();
        }
    }
    std::fs::write(LIMIT, "16").unwrap();
    tp.start_all();
    let formed = tp.wait_formed(Duration::from_secs(20));
    let tracking =
        tp.nodes[0].wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.replication.watches > 0
        });
    let old = old.trim().parse::<u64>().unwrap();
    let restore = if old < 1024 { 16384 } else { old };
    std::fs::write(LIMIT, restore.to_string()).unwrap();
    drop(guard);
    formed.unwrap();
    tracking.unwrap();
    for f in 0..20 {
        let mb = src.join(format!("f{f:02}/Maildir"));
        for m in 0..100 {
            let tmp = mb.join(format!("tmp/{m}.M{m}P1.mx"));
            std::fs::write(&tmp, format!("message {f}/{m}\n")).unwrap();
            std::fs::rename(&tmp, mb.join(format!("new/{m}.M{m}P1.mx"))).unwrap();
        }
    }
    for f in 0..20 {
        // Spread over the comparisons the overflows start.
        std::thread::sleep(Duration::from_millis(30));
        let mb = src.join(format!("f{f:02}/Maildir"));
        for m in (0..100).step_by(2) {
            std::fs::rename(
                mb.join(format!("new/{m}.M{m}P1.mx")),
                mb.join(format!("cur/{m}.M{m}P1.mx:2,S")),
            )
            .unwrap();
        }
    }
    wait_identical(&src, &tp.store(1, "inbox"), Duration::from_secs(20))
        .unwrap_or_else(|e| fail_with_logs(&tp, &e));
    let r = tp.repl(0);
    println!("overflows {}, rescans {}", r.inotify_overflows, r.rescans);
    assert!(r.inotify_overflows > 0, "a queue of 16 events overflows");
}

/// The primary's inotify watch limit (its own user namespace's, so the
/// host's is left alone) too low for the store's folders: the folders it
/// cannot watch are counted in status and the limit is named in the log;
/// the stores are compared with the replica at each retry (after 1 s here,
/// doubling up to 10 s; 30 s and 5 min in production), so mail delivered
/// into them still reaches the replica;
/// once the limit is raised every folder is watched, the count clears, and
/// changes travel as events again, with no rescan.
#[test]
fn folders_the_primary_cannot_watch_are_rescanned_until_the_limit_allows_them() {
    let mut tp = TestPair::new(fast());
    let src = tp.store(0, "inbox");
    let boxes = 10;
    for f in 0..boxes {
        for d in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(src.join(format!("u{f:02}/Maildir/{d}"))).unwrap();
        }
    }
    // 52 folders: the 2 store roots and 5 per mailbox below inbox's; the
    // limit leaves part of them unwatched (and what is below those unseen).
    tp.nodes[0].limit_watches(24);
    let guard = inotify_guard();
    tp.nodes[0]
        .start_with_env(&[("HASYNC_FAILPOINT_WATCH_RETRY_MS", "1000")])
        .unwrap();
    tp.nodes[1].start().unwrap();
    let formed = tp.wait_formed(Duration::from_secs(20));
    let short = tp.nodes[0].wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
        s.replication.unwatched_folders > 0
    });
    drop(guard);
    formed.unwrap_or_else(|e| fail_with_logs(&tp, &e.to_string()));
    let short = short.unwrap_or_else(|e| fail_with_logs(&tp, &e.to_string()));
    println!(
        "watches {}, unwatched {}",
        short.replication.watches, short.replication.unwatched_folders
    );
    assert!(
        tp.nodes[0].log_shows("max_user_watches"),
        "the log names the limit"
    );
    let mut boxes: Vec<String> = (0..boxes).map(|f| format!("u{f:02}")).collect();
    let deliver = |round: usize, boxes: &[String]| {
        for (f, b) in boxes.iter().enumerate() {
            let mb = src.join(b).join("Maildir");
            let name = format!("{round}.M{f}P1.mx");
            std::fs::write(mb.join("tmp").join(&name), format!("message {round}/{f}\n")).unwrap();
            std::fs::rename(mb.join("tmp").join(&name), mb.join("new").join(&name)).unwrap();
        }
    };
    // Into folders that have no watch: found by the comparisons.
    deliver(1, &boxes);
    wait_identical(&src, &tp.store(1, "inbox"), Duration::from_secs(20))
        .unwrap_or_else(|e| fail_with_logs(&tp, &e));
    assert!(tp.repl(0).unwatched_folders > 0, "still short of watches");
    // A watched mailbox whose folders below could not all be watched
    // (path order: u00–u03 and u04/Maildir took the watches) is renamed:
    // what was remembered by the old name is found under the new one.
    std::fs::rename(src.join("u04"), src.join("u10")).unwrap();
    boxes[4] = "u10".into();
    wait_identical(&src, &tp.store(1, "inbox"), Duration::from_secs(20))
        .unwrap_or_else(|e| fail_with_logs(&tp, &e));

    tp.nodes[0].set_watch_limit(100_000).unwrap();
    let watched = tp.nodes[0]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            s.replication.unwatched_folders == 0
        })
        .unwrap_or_else(|e| fail_with_logs(&tp, &e.to_string()));
    assert!(
        watched.replication.watches >= 52,
        "every folder watched: {}",
        watched.replication.watches
    );
    // The rescan of the retry that watched them may still be under way.
    std::thread::sleep(Duration::from_millis(500));
    let rescans = tp.repl(0).rescans;
    deliver(2, &boxes);
    wait_identical(&src, &tp.store(1, "inbox"), Duration::from_secs(10))
        .unwrap_or_else(|e| fail_with_logs(&tp, &e));
    assert_eq!(
        tp.repl(0).rescans,
        rescans,
        "events, not rescans, carried them"
    );
}

#[test]
fn secondary_killed_mid_sync_resumes_instead_of_starting_over() {
    let _g = inotify_guard();
    let mut tp = TestPair::new(fast());
    let total = 4000u64;
    let mut s = spec(5, 10, total as usize);
    s.median_size = 16 * 1024;
    generate_maildirs(&tp.store(0, "inbox"), &s).unwrap();
    tp.start_all();
    tp.wait_formed(Duration::from_secs(20)).unwrap();
    tp.wait_tracking(0);
    drop(_g);
    let landed = tp.nodes[1]
        .wait_status(Duration::from_secs(60), Duration::from_millis(2), |st| {
            st.replication.files_landed > 300
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()))
        .replication
        .files_landed;
    tp.nodes[1].kill9().unwrap();
    println!("killed the secondary after it landed {landed} files");
    std::thread::sleep(Duration::from_millis(300));
    tp.nodes[1].start().unwrap();
    wait_identical(&tp.store(0, "inbox"), &tp.store(1, "inbox"), CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // The second session only sent what had not landed.
    let log = tp.nodes[0].log();
    let sessions: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("initial sync: ").nth(1))
        .filter_map(|r| r.split(" paths").next()?.parse().ok())
        .collect();
    println!("paths to send per session: {sessions:?}");
    assert!(sessions.len() >= 2, "expected a second session:\n{log}");
    let second = *sessions.last().unwrap();
    assert!(
        second < sessions[0] && second <= sessions[0] - landed.min(sessions[0]) + 600,
        "resumed session must skip the {landed} landed files: {sessions:?}"
    );
}

#[test]
fn anti_entropy_repairs_drift_on_the_secondary() {
    let mut opts = fast();
    opts.verify_interval_ms = 1500;
    // Drift the foreign-write watch cannot see (written while the watch is
    // off: a secondary not running as root, or before hasync started).
    opts.watch_foreign_writes = false;
    let tp = started_with_fixture(opts, 3, 3, 60);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&src, &dst, CONVERGE).unwrap();
    // Drift on paths nobody changed lately (a difference at a path changed
    // in the last 2 s counts as a change in flight).
    std::thread::sleep(Duration::from_millis(2500));
    let files: Vec<_> = walk_files(&dst)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/cur/"))
        .collect();
    std::fs::remove_file(&files[0]).unwrap();
    let len = std::fs::metadata(&files[1]).unwrap().len() as usize;
    std::fs::write(&files[1], vec![b'X'; len]).unwrap();
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let r = tp.repl(0);
    println!("verify runs {}, repaired {}", r.verify_runs, r.repaired);
    assert!(
        r.repaired >= 2,
        "both the deleted and the corrupted file count as repaired"
    );
    let alarms = tp.pair.nodes[0].status().unwrap().alarms;
    assert!(
        alarms.iter().any(|a| a.message.contains("drift")),
        "real drift is an alarm: {alarms:?}"
    );
}

/// A hard-link group the replica holds apart (the same names and content,
/// two inodes: what a name sent as bytes leaves, after a refused folder
/// rename say) is joined again by the next verification, which sends the
/// names apart as links; not counted as drift, since nothing differs but
/// the links.
/// A pair verifying every second (writes on the replica not watched),
/// converged on a small fixture; its two stores and a message in
/// user0000's cur/ on the primary.
fn verifying_pair() -> (TestPair, PathBuf, PathBuf, PathBuf) {
    let mut opts = fast();
    opts.verify_interval_ms = 1000;
    opts.watch_foreign_writes = false;
    let tp = started_with_fixture(opts, 5, 3, 20);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&src, &dst, CONVERGE).unwrap();
    let first = walk_files(&src)
        .into_iter()
        .find(|p| p.to_string_lossy().contains("user0000/Maildir/cur/"))
        .expect("a message in user0000's cur/");
    (tp, src, dst, first)
}

/// The access and modification times `md` has, for `set_times`.
fn times_of(md: &std::fs::Metadata) -> std::fs::FileTimes {
    std::fs::FileTimes::new()
        .set_accessed(md.accessed().unwrap())
        .set_modified(md.modified().unwrap())
}

#[test]
fn a_hard_link_group_held_apart_on_the_replica_is_joined_again_by_verification() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (tp, src, dst, first) = verifying_pair();
    // A Dovecot copy into two other mailboxes: one inode, three names.
    let copies = ["user0001", "user0002"].map(|u| {
        let c = src.join(u).join("Maildir/cur/1700000000.copy.host:2,S");
        std::fs::hard_link(&first, &c).unwrap();
        c
    });
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    // Held apart there: one name's inode replaced by a copy with the same
    // content, mode, owner and mtime, its folder's mtime put back.
    let apart = dst.join(copies[1].strip_prefix(&src).unwrap());
    let folder = apart.parent().unwrap().to_path_buf();
    let (md, folder_md) = (
        std::fs::metadata(&apart).unwrap(),
        std::fs::metadata(&folder).unwrap(),
    );
    assert_eq!(md.nlink(), 3, "the replica holds the group as one inode");
    let tmp = folder.join("../tmp/apart");
    std::fs::copy(&apart, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(md.mode() & 0o7777)).unwrap();
    std::os::unix::fs::chown(&tmp, Some(md.uid()), Some(md.gid())).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_times(times_of(&md))
        .unwrap();
    std::fs::rename(&tmp, &apart).unwrap();
    std::fs::File::open(&folder)
        .unwrap()
        .set_times(times_of(&folder_md))
        .unwrap();
    assert_eq!(std::fs::metadata(&apart).unwrap().nlink(), 1);
    let repaired_before = tp.repl(0).repaired;
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    assert_eq!(
        std::fs::metadata(&apart).unwrap().ino(),
        std::fs::metadata(dst.join(copies[0].strip_prefix(&src).unwrap()))
            .unwrap()
            .ino(),
        "the name is a link of the group again"
    );
    let logs = tp.logs_when(|l| l.contains("sent again as links"));
    assert!(
        logs.contains("held apart on the replica are sent again as links"),
        "the primary says it joined the group again\n{logs}"
    );
    assert_eq!(
        tp.repl(0).repaired,
        repaired_before,
        "links held apart are not drift"
    );
}

/// The other way round: two names the primary holds as two files of the
/// same content, mode, owner and mtime (a message copied with its times)
/// that the replica holds as one file. A periodic verification sends one
/// name again apart: it lands in a file of its own, and nothing is
/// counted as drift.
#[test]
fn names_joined_on_the_replica_that_are_apart_here_are_taken_apart_by_verification() {
    use std::os::unix::fs::MetadataExt;
    let (tp, src, dst, first) = verifying_pair();
    // A message copied into another mailbox with its mode and times: two
    // files here.
    let copy = src.join("user0001/Maildir/cur/1700000000.copy.host:2,S");
    let status = std::process::Command::new("cp")
        .arg("-p")
        .arg(&first)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    // Joined there: the copy's name made a link to the first's file, its
    // folder's mtime put back.
    let (there_first, there_copy) = (
        dst.join(first.strip_prefix(&src).unwrap()),
        dst.join(copy.strip_prefix(&src).unwrap()),
    );
    let folder = there_copy.parent().unwrap().to_path_buf();
    let folder_md = std::fs::metadata(&folder).unwrap();
    assert_eq!(std::fs::metadata(&there_copy).unwrap().nlink(), 1);
    let tmp = folder.join("../tmp/joined");
    std::fs::hard_link(&there_first, &tmp).unwrap();
    std::fs::rename(&tmp, &there_copy).unwrap();
    std::fs::File::open(&folder)
        .unwrap()
        .set_times(times_of(&folder_md))
        .unwrap();
    assert_eq!(std::fs::metadata(&there_copy).unwrap().nlink(), 2);
    let repaired_before = tp.repl(0).repaired;
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    let (a, b) = (
        std::fs::metadata(&there_first).unwrap(),
        std::fs::metadata(&there_copy).unwrap(),
    );
    assert_ne!(a.ino(), b.ino(), "the names are two files again");
    assert_eq!((a.nlink(), b.nlink()), (1, 1));
    assert_eq!(
        std::fs::read(&there_copy).unwrap(),
        std::fs::read(&copy).unwrap()
    );
    let logs = tp.logs_when(|l| l.contains("a file of its own"));
    assert!(
        logs.contains("held as one file on the replica are apart here"),
        "the primary says it took the names apart\n{logs}"
    );
    assert_eq!(
        tp.repl(0).repaired,
        repaired_before,
        "names joined there are not drift"
    );
}

/// Periodic verification during live traffic (deliveries, flag renames,
/// deletes, folder renames): the differences it meets are changes on
/// their way, not drift; none is counted as a repair, none alarmed, and
/// the replica still converges.
#[test]
fn anti_entropy_during_live_traffic_counts_no_changes_in_flight_as_drift() {
    let mut opts = fast();
    opts.verify_interval_ms = 1000;
    let tp = started_with_fixture(opts, 11, 6, 120);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&src, &dst, CONVERGE).unwrap();
    let runs_before = tp.repl(0).verify_runs;
    let mut w = Workload::new(&src, spec(11, 6, 120));
    let started = std::time::Instant::now();
    let mut steps = 0u32;
    let mut dir_renames = 0u32;
    // Long enough for many verifications to meet changes in flight.
    while started.elapsed() < Duration::from_secs(10) {
        if matches!(w.step().unwrap(), Step::DirRename) {
            dir_renames += 1;
        }
        steps += 1;
        if steps.is_multiple_of(10) {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| fail_with_logs(&tp, &e));
    std::thread::sleep(Duration::from_millis(600));
    let r = tp.repl(0);
    let runs = r.verify_runs - runs_before;
    println!(
        "{steps} steps ({dir_renames} folder renames), {runs} verifications, repaired {}",
        r.repaired
    );
    assert!(
        runs >= 5,
        "verification ran during the traffic ({runs} runs)"
    );
    assert!(dir_renames > 0, "the traffic renamed folders");
    if r.repaired != 0 {
        fail_with_logs(
            &tp,
            &format!("{} changes in flight were counted as drift", r.repaired),
        );
    }
    let alarms = tp.pair.nodes[0].status().unwrap().alarms;
    assert!(
        !alarms.iter().any(|a| a.message.contains("drift")),
        "no drift alarm: {alarms:?}"
    );
}

#[test]
fn after_failover_exactly_the_versions_the_new_primary_never_had_are_conflicts() {
    exact_conflicts_after_failover(false);
}

/// A new primary over a tree it never indexed (its index lost) takes over
/// without reading its files; with its peer away, it reads what its record
/// lacks soon after, and the conflicts are exactly as exact.
#[test]
fn a_new_primary_that_lost_its_index_still_keeps_aside_exactly_the_genuine_conflicts() {
    exact_conflicts_after_failover(true);
}

/// A new primary that crashes while it reconciles the former primary, after
/// that peer acknowledged a message it sent and before the session ended,
/// still knows it sent it when it is back: its user deleted the message
/// meanwhile, and the former primary deletes it too instead of keeping it
/// aside as a conflict (the versions sent are logged before they leave,
/// and a restart carries the record of the tenure it interrupted over).
#[test]
fn a_new_primary_that_crashes_mid_reconciliation_still_knows_what_it_sent() {
    crash_mid_reconciliation(false);
}

/// The same, the new primary also killed at its first promotion before it
/// wrote any takeover record: what it heard of its peer's epochs is kept
/// apart from that record (`peer-epoch`), so its later tenures still count
/// their carried records for a peer that served at or below it.
#[test]
fn a_new_primary_killed_before_its_first_record_still_knows_its_peers_epoch() {
    crash_mid_reconciliation(true);
}

fn crash_mid_reconciliation(killed_before_record: bool) {
    let mut tp = started_with_fixture(fast(), 21, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    if killed_before_record {
        tp.nodes[1].kill9().unwrap();
        tp.nodes[1]
            .start_with_env(&[("HASYNC_FAILPOINTS", "engine.before_takeover_record=1")])
            .unwrap();
        tp.wait_mode(1, Role::Secondary, Duration::from_secs(20));
        tp.nodes[0].kill9().unwrap();
        assert!(
            tp.nodes[1].wait_exit(Duration::from_secs(30)),
            "the new primary did not reach its failpoint\n{}",
            tp.logs()
        );
        tp.nodes[1].start().unwrap();
    } else {
        tp.nodes[0].kill9().unwrap();
    }
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    // Its takeover record written (it is, before the tracker's watches).
    tp.wait_tracking(1);
    // The new primary, from now on stopped by the first acknowledgement it
    // hears (the former primary then holds what it was sent, durably).
    tp.nodes[1].kill9().unwrap();
    tp.nodes[1]
        .start_with_env(&[("HASYNC_FAILPOINTS", "sender.acked=1")])
        .unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.wait_tracking(1);
    // Delivered to the new primary after it took over (not in its record).
    let sent = std::path::Path::new("user0001/Maildir/new/1800000000.M1P1.newprimary");
    std::fs::write(
        b.join("user0001/Maildir/tmp/x"),
        b"delivered after the takeover",
    )
    .unwrap();
    std::fs::rename(b.join("user0001/Maildir/tmp/x"), b.join(sent)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tp.nodes[0].start().unwrap();
    assert!(
        tp.nodes[1].wait_exit(Duration::from_secs(30)),
        "the new primary did not reach its failpoint\n{}",
        tp.logs()
    );
    assert!(
        a.join(sent).exists(),
        "the former primary holds the message it was sent\n{}",
        tp.logs()
    );
    // The former primary stops before it could take over; the new
    // primary's user deletes the message while it is down; it comes back,
    // then the former primary, still not reconciled.
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    std::fs::remove_file(b.join(sent)).unwrap();
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(!a.join(sent).exists());
    wait_caught_up(&tp, 0);
    assert!(
        tp.conflicts(0).is_empty() && tp.conflicts(1).is_empty(),
        "a message the new primary sent and its user deleted was kept aside: {:?} / {:?}\n{}",
        tp.conflicts(0),
        tp.conflicts(1),
        tp.logs()
    );
    assert!(tp.nodes[1].log_shows("carried over"), "{}", tp.logs());
}

/// A new primary's record carried over a restart does not count against
/// a former primary that served again while this node was down: that
/// peer's users acted on versions this node never saw. Here the new
/// primary's user deletes a message, the new primary dies, the old primary
/// serves alone and its user files the message away; when the new primary
/// comes back and the old one rejoins, the message is kept aside as a
/// conflict, never deleted on the strength of the interrupted tenure.
#[test]
fn a_record_carried_over_does_not_count_for_a_peer_that_served_since() {
    peer_served_alone_in_between(false);
}

/// The record of an interrupted tenure that could not be rewritten at the
/// next promotion (an alarm the daemon serves on with: state directory
/// full, EIO; injected here by a directory in the temp file's place) stays
/// on disk as it was: it counts only as carried over (with its tenure's
/// epochs), never as the new tenure's own.
#[test]
fn a_record_not_rewritten_at_promotion_counts_only_as_carried() {
    peer_served_alone_in_between(true);
}

/// The scenario of the two tests above; `record_write_fails` injects the
/// fault at the first new primary's second promotion.
fn peer_served_alone_in_between(record_write_fails: bool) {
    let mut tp = started_with_fixture(fast(), 23, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    let cur = std::path::Path::new("user0000/Maildir/cur");
    let name = first_name(&b.join(cur));
    let kept = std::fs::read(b.join(cur).join(&name)).unwrap();
    // Epoch 2: the secondary takes over (its record holds the message),
    // its user deletes the message, and it dies.
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.wait_tracking(1);
    std::fs::remove_file(b.join(cur).join(&name)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tp.nodes[1].kill9().unwrap();
    // Epoch 3: the old primary serves alone; its user files the message.
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
    tp.wait_tracking(0);
    let filed = std::path::Path::new("user0000/Maildir/.Keep/cur");
    std::fs::create_dir_all(a.join(filed)).unwrap();
    std::fs::rename(a.join(cur).join(&name), a.join(filed).join(&name)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    if record_write_fails {
        std::fs::create_dir(tp.nodes[1].state_dir.join(".takeover-inbox.bin.tmp")).unwrap();
    }
    // Epoch 4: the first new primary is back alone (its record of epoch 2
    // carried over), then the old primary rejoins.
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    wait_caught_up(&tp, 0);
    let conflicts = tp.conflicts(1);
    let found = conflicts
        .iter()
        .find(|c| c.path.ends_with(name.to_str().unwrap()))
        .unwrap_or_else(|| {
            panic!(
                "the message the old primary's user filed while it served alone is gone, not kept aside: {conflicts:?}\n{}",
                tp.logs()
            )
        });
    assert_eq!(tp.conflict_body(1, found), kept);
    if record_write_fails {
        assert!(
            tp.nodes[1].log_shows("cannot write the takeover record"),
            "{}",
            tp.logs()
        );
    }
    assert!(tp.nodes[1].log_shows("carried over"), "{}", tp.logs());
    assert!(tp.nodes[1].log_shows("does not count"), "{}", tp.logs());
}

/// The first name (in byte order) in the folder `dir`.
fn first_name(dir: &std::path::Path) -> std::ffi::OsString {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .min()
        .unwrap_or_else(|| panic!("nothing in {}", dir.display()))
}

/// Waits until node `i` (a secondary) has caught up with its primary.
fn wait_caught_up(tp: &TestPair, i: usize) {
    tp.nodes[i]
        .wait_status(CONVERGE, Duration::from_millis(50), |s| {
            s.replication.caught_up
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

fn exact_conflicts_after_failover(new_primary_loses_its_index: bool) {
    use hasync::daemon::control::Request;
    let mut tp = started_with_fixture(fast(), 9, 3, 40);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    if new_primary_loses_its_index {
        assert!(tp.nodes[1].stop(Duration::from_secs(10)));
        let state = tp.nodes[1].state_dir.clone();
        for f in ["index-inbox.bin", "takeover-inbox.bin"] {
            std::fs::remove_file(state.join(f)).unwrap();
        }
        tp.nodes[1].start().unwrap();
        tp.nodes[1]
            .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
                s.mode == Role::Primary
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
        // Taken without reading a file, completed once the peer stayed away.
        let start = std::time::Instant::now();
        loop {
            let log = tp.nodes[1].log();
            let taken = log
                .lines()
                .rfind(|l| l.contains("takeover record written"))
                .unwrap_or_default()
                .to_string();
            let unhashed: usize = taken
                .split("unhashed=")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let after = log.rsplit("takeover record written").next().unwrap_or("");
            if after.contains("takeover record completed") {
                assert!(unhashed > 0, "taken without reading files: {taken}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{}", tp.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let cur: Vec<_> = walk_files(&a)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/cur/"))
        .collect();
    let rel = |p: &std::path::Path| p.strip_prefix(&a).unwrap().to_path_buf();
    // Changed on the old primary inside its lag window: genuine conflicts.
    let victim = rel(&cur[0]);
    std::fs::write(a.join(&victim), b"old primary's edit").unwrap();
    std::fs::write(
        a.join("user0000/Maildir/new/lost.M1.oldprimary"),
        b"only on the old primary",
    )
    .unwrap();
    // What the new primary's users did with mail it held at takeover:
    // followed, never a conflict (the old primary still has the old state).
    let expunged = rel(&cur[1]);
    let flagged = rel(&cur[2]);
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(b.join(&victim), b"new primary's edit").unwrap();
    std::fs::remove_file(b.join(&expunged)).unwrap();
    let mut renamed = flagged.as_os_str().to_owned();
    renamed.push("T");
    std::fs::rename(b.join(&flagged), b.join(&renamed)).unwrap();
    std::fs::write(
        b.join("user0001/Maildir/new/fresh.M1.newprimary"),
        b"delivered after failover",
    )
    .unwrap();

    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(15), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary
        })
        .unwrap();
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(
        std::fs::read(a.join(&victim)).unwrap(),
        b"new primary's edit"
    );
    assert!(!a.join(&expunged).exists() && !a.join(&flagged).exists());
    // Exactly the two genuine ones, handed to the new primary; none stays
    // on the old one once acknowledged.
    let listed = |i: usize| tp.conflicts(i);
    let start = std::time::Instant::now();
    while listed(0).len() + listed(1).len() != 2 || !listed(0).is_empty() {
        assert!(
            start.elapsed() < CONVERGE,
            "{:?} / {:?}\n{}",
            listed(0),
            listed(1),
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let on_b = listed(1);
    let mut contents: Vec<String> = on_b
        .iter()
        .map(|c| String::from_utf8(tp.conflict_body(1, c)).unwrap())
        .collect();
    contents.sort();
    assert_eq!(
        contents,
        ["old primary's edit", "only on the old primary"],
        "{on_b:?}"
    );
    // Status shows the count of at most two seconds ago.
    let st = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.conflicts.count == 2
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(
        st.alarms
            .iter()
            .any(|a| a.message.contains("genuine conflicts")),
        "{:?}",
        st.alarms
    );
    // Restored on the primary as new messages; they replicate like any.
    let r = tp.nodes[0]
        .request(&Request::RestoreConflicts { id: None })
        .unwrap();
    assert!(!r.ok, "a secondary does not restore");
    let r = tp.nodes[1]
        .request(&Request::RestoreConflicts { id: None })
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert!(listed(1).is_empty());
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let restored: Vec<String> = walk_files(&b)
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".hasync-restored"))
        .map(|p| String::from_utf8(std::fs::read(p).unwrap()).unwrap())
        .collect();
    assert_eq!(restored.len(), 2, "{restored:?}");
}

/// A genuine conflict the former primary cannot move aside (an I/O error,
/// `fsops.keep_aside_eio`) is left in place and its path protected; the
/// new primary's next op on it (the delete it asks for again) moves it
/// aside first, within the session: kept and handed over, the trees equal.
#[test]
fn a_conflict_that_could_not_be_kept_aside_is_kept_at_the_next_op_on_it() {
    let mut tp = started_with_fixture(fast(), 23, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    // In the old primary's lag window: only it ever held this message.
    std::fs::write(
        a.join("user0000/Maildir/new/lost.M1.oldprimary"),
        b"only on the old primary",
    )
    .unwrap();
    tp.nodes[0]
        .start_with_env(&[("HASYNC_FAILPOINTS", "fsops.keep_aside_eio=1")])
        .unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.wait_conflicts(0, 1, CONVERGE);
    let c = &tp.conflicts(1)[0];
    assert_eq!(tp.conflict_body(1, c), b"only on the old primary");
    assert!(
        tp.nodes[0].log_shows("cannot keep a genuine conflict aside"),
        "the failpoint was not reached\n{}",
        tp.logs()
    );
}

/// The new primary renames a message onto the name where a genuine
/// conflict waits on the former primary that it cannot move aside (every
/// keep-aside fails: `fsops.keep_aside_eio=1+`). The rename is refused
/// there, and the primary deletes its source and sends its target again:
/// the former primary keeps the source, its only copy of that message,
/// while the conflict stays (ops after the rename land meanwhile), also in
/// the session after its sync connection is cut (the hold passes to the
/// next receiver). Once it can move the conflict aside (restarted without
/// the failure), the trees converge and the conflict is handed over.
#[test]
fn a_rename_onto_a_conflict_that_cannot_be_kept_aside_keeps_its_source_meanwhile() {
    let mut tp = started_with_fixture(fast(), 31, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    let new = a.join("user0000/Maildir/new");
    let name = std::fs::read_dir(&new)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .min()
        .expect("a message in new/");
    let body = std::fs::read(new.join(&name)).unwrap();
    let (from, to) = (
        format!("user0000/Maildir/new/{name}"),
        format!("user0000/Maildir/cur/{name}:2,S"),
    );
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    // In the old primary's lag window: the message read there, its flag
    // set by other content (a genuine conflict at `to`).
    std::fs::write(a.join(&to), b"only on the old primary").unwrap();
    tp.nodes[0]
        .start_with_env(&[("HASYNC_FAILPOINTS", "fsops.keep_aside_eio=1+")])
        .unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    let start = std::time::Instant::now();
    while !tp.nodes[0]
        .log()
        .contains("cannot keep a genuine conflict aside")
    {
        assert!(start.elapsed() < CONVERGE, "never tried\n{}", tp.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::rename(b.join(&from), b.join(&to)).unwrap();
    std::fs::write(b.join("user0000/Maildir/new/after.M2.primary"), b"after").unwrap();
    let start = std::time::Instant::now();
    while !a.join("user0000/Maildir/new/after.M2.primary").exists() {
        assert!(start.elapsed() < CONVERGE, "never landed\n{}", tp.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The primary's delete of the source follows the refused rename's
    // acknowledgement, and is asked again while refused: for a while, the
    // source must stay; and in the next session too (the connection cut:
    // a new receiver, whose comparison deletes the source again).
    let kept = |tp: &TestPair, secs: u64| {
        let start = std::time::Instant::now();
        loop {
            assert_eq!(
                std::fs::read(a.join(&from)).ok().as_deref(),
                Some(&body[..]),
                "the former primary's only copy of the message went\n{}",
                tp.logs()
            );
            assert_eq!(
                std::fs::read(a.join(&to)).unwrap(),
                b"only on the old primary"
            );
            if start.elapsed() >= Duration::from_secs(secs) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    kept(&tp, 3);
    let sessions = tp.nodes[0].log().matches("sync session started").count();
    tp.cut_sync_connection(0);
    let start = std::time::Instant::now();
    while tp.nodes[0].log().matches("sync session started").count() == sessions {
        assert!(start.elapsed() < CONVERGE, "no new session\n{}", tp.logs());
        kept(&tp, 0);
        std::thread::sleep(Duration::from_millis(20));
    }
    kept(&tp, 3);
    // And across a crash of the replica's process: its next session's
    // comparison deletes the source again.
    let sessions = tp.nodes[0].log().matches("sync session started").count();
    tp.nodes[0].kill9().unwrap();
    tp.nodes[0]
        .start_with_env(&[("HASYNC_FAILPOINTS", "fsops.keep_aside_eio=1+")])
        .unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    assert!(
        tp.nodes[0].log_shows("kept across the restart"),
        "{}",
        tp.logs()
    );
    let start = std::time::Instant::now();
    while tp.nodes[0].log().matches("sync session started").count() == sessions {
        assert!(start.elapsed() < CONVERGE, "no new session\n{}", tp.logs());
        kept(&tp, 0);
        std::thread::sleep(Duration::from_millis(20));
    }
    kept(&tp, 3);
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    // A damaged hold file stops the start, naming it, rather than let the
    // next session delete what it held.
    let held = tp.nodes[0].state_dir.join("held-for-rename");
    let good = std::fs::read(&held).expect("the hold is on disk");
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    std::fs::write(&held, &bad).unwrap();
    tp.nodes[0].start().unwrap();
    let start = std::time::Instant::now();
    while tp.nodes[0].is_running() {
        assert!(start.elapsed() < CONVERGE, "started anyway\n{}", tp.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        tp.nodes[0].log_shows("held-for-rename are garbled at byte"),
        "{}",
        tp.logs()
    );
    kept(&tp, 0);
    std::fs::write(&held, &good).unwrap();
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(std::fs::read(a.join(&to)).unwrap(), body);
    assert!(
        !tp.nodes[0].state_dir.join("held-for-rename").exists(),
        "the hold is released on disk too"
    );
    tp.wait_conflicts(0, 1, CONVERGE);
    let c = &tp.conflicts(1)[0];
    assert_eq!(tp.conflict_body(1, c), b"only on the old primary");
}

/// A version handed over that the new primary cannot keep is refused, with
/// why: the former primary raises an alarm, shows the reason in its status,
/// keeps its copy and hands it over again
/// in the same session once the wait for the acknowledgement is over
/// (`HASYNC_FAILPOINT_ACK_WAIT_MS`, 60 s in production, doubling while none
/// comes), and it is kept once the primary's disk works. Refused twice:
/// first its conflicts directory unusable (a file in its place), then its
/// disk full as the content arrives (`conflicts.write_enospc`, which must
/// not cut the session); nothing is left half-written on the primary.
#[test]
fn a_version_the_primary_could_not_keep_is_handed_over_again_in_the_same_session() {
    let mut tp = started_with_fixture(fast(), 29, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    assert!(tp.nodes[1].stop(Duration::from_secs(10)));
    tp.nodes[1]
        .start_with_env(&[("HASYNC_FAILPOINTS", "conflicts.write_enospc=1")])
        .unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    std::fs::write(
        a.join("user0000/Maildir/new/lost.M1.oldprimary"),
        b"only on the old primary",
    )
    .unwrap();
    let shelf = tp.nodes[1].state_dir.join("internal/inbox/conflicts");
    std::fs::create_dir_all(shelf.parent().unwrap()).unwrap();
    if shelf.is_dir() {
        std::fs::remove_dir_all(&shelf).unwrap();
    }
    std::fs::write(&shelf, b"in the way").unwrap();
    tp.nodes[0]
        .start_with_env(&[("HASYNC_FAILPOINT_ACK_WAIT_MS", "2000")])
        .unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let start = std::time::Instant::now();
    while !tp.nodes[1].log().contains("the peer keeps its copy") {
        assert!(start.elapsed() < CONVERGE, "never refused\n{}", tp.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tp.conflicts(0).len(),
        1,
        "the former primary keeps its copy"
    );
    let refused = tp.nodes[0]
        .wait_status(CONVERGE, Duration::from_millis(50), |s| {
            s.replication.conflict_refused.is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let why = refused.replication.conflict_refused.unwrap();
    assert!(
        why.contains("user0000/Maildir/new/lost.M1.oldprimary") && why.contains("cannot keep"),
        "{why}"
    );
    assert!(
        tp.nodes[0].log_shows("ALARM: the primary could not keep a version kept aside here"),
        "{}",
        tp.logs()
    );
    let sessions = tp.nodes[0].log().matches("session started").count();
    // Room again: handed over within the session, no reconnect needed.
    std::fs::remove_file(&shelf).unwrap();
    tp.wait_conflicts(0, 1, CONVERGE);
    let c = &tp.conflicts(1)[0];
    assert_eq!(tp.conflict_body(1, c), b"only on the old primary");
    tp.nodes[0]
        .wait_status(CONVERGE, Duration::from_millis(50), |s| {
            s.replication.conflict_refused.is_none()
        })
        .unwrap_or_else(|e| panic!("the refusal stays in the status once kept: {e}"));
    assert!(
        tp.nodes[1].log_shows("not kept: No space left on device"),
        "the disk-full failpoint was not reached\n{}",
        tp.logs()
    );
    let log = tp.nodes[0].log_when(LOG_WAIT, |l| {
        l.matches("handing them over again").count() >= 2
    });
    assert!(
        log.matches("handing them over again").count() >= 2,
        "{}",
        tp.logs()
    );
    assert_eq!(
        log.matches("session started").count(),
        sessions,
        "handed over again in the same session\n{}",
        tp.logs()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&shelf)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".incoming"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A pair formed with the secondary's mail on a 1 MiB tmpfs (its store
/// and internal directory share it): the pair, the mount and the
/// secondary's store.
fn pair_with_a_small_secondary_disk() -> (TestPair, Unmount, std::path::PathBuf) {
    let g = inotify_guard();
    let mut tp = TestPair::new(PairOptions {
        internal_beside_stores: true,
        ..fast()
    });
    let dst = tp.store(1, "inbox");
    let unmount = mount_tmpfs(&tp.nodes[1].mail_dir(), "size=1m");
    tp.nodes[1].make_store_dirs().unwrap();
    drop(g);
    tp.start_all();
    tp.wait_formed(Duration::from_secs(20)).unwrap();
    (tp, unmount, dst)
}

#[test]
fn full_disk_on_the_secondary_pauses_and_resumes_without_loss() {
    let (tp, _unmount, dst) = pair_with_a_small_secondary_disk();
    // Past the initial comparison: a scan racing the writes below could
    // send an empty early version of a file, complete in its own right.
    tp.nodes[0]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            s.replication.phase == "streaming"
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let src = tp.store(0, "inbox");
    std::fs::create_dir_all(src.join("big/cur")).unwrap();
    std::fs::create_dir_all(src.join("big/tmp")).unwrap();
    // Delivered the Maildir way (written in tmp/, renamed into cur/): a
    // file written in place can be sent mid-write as an earlier, shorter
    // version (superseded at its close), which is not what this checks.
    for i in 0..24 {
        let tmp = src.join(format!("big/tmp/{i}.msg"));
        std::fs::write(&tmp, vec![b'a' + (i % 26) as u8; 100 * 1024]).unwrap();
        std::fs::rename(&tmp, src.join(format!("big/cur/{i}.msg"))).unwrap();
    }
    tp.nodes[1]
        .wait_status(Duration::from_secs(30), Duration::from_millis(20), |s| {
            s.replication.disk_full
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(tp.nodes[1].log_shows("disk full"), "the alarm is logged");
    // No partial file under a final name: whatever landed is complete.
    for f in walk_files(&dst) {
        // (A file may still be moving while we look; what is there is whole.)
        if let Ok(md) = std::fs::metadata(&f) {
            assert_eq!(md.len(), 100 * 1024, "{f:?} is partial");
        }
    }
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(tp.nodes[1].mail_dir())
        .status()
        .unwrap();
    assert!(ok.success());
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Identical trees can still have a re-send of the same content in
    // flight; what must not happen is a staged file that stays.
    let start = std::time::Instant::now();
    loop {
        let staging: Vec<_> =
            std::fs::read_dir(tp.nodes[1].mail_dir().join(".hasync-inbox/staging"))
                .unwrap()
                .collect();
        if staging.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!("staged leftovers: {staging:?}\n{}", tp.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Messages flagged while the secondary was down, its disk full when it
/// comes back: the comparison sends each new name (no room for it) and
/// deletes each old one. The replica holds the deletes back while the
/// content waits for room, so every message stays there under its old
/// name (a failover meanwhile finds it in the mailbox); once there is room
/// the names follow the primary's.
#[test]
fn flags_changed_while_the_secondary_was_down_keep_the_old_names_while_its_disk_is_full() {
    messages_changed_while_the_secondary_was_down_stay_while_its_disk_is_full(
        &["box/cur", "box/tmp"],
        |i| format!("box/cur/{i}.msg:2,"),
        |src| {
            for i in 0..5 {
                std::fs::rename(
                    src.join(format!("box/cur/{i}.msg:2,")),
                    src.join(format!("box/cur/{i}.msg:2,S")),
                )
                .unwrap();
            }
        },
        5,
    );
}

/// Messages moved to another folder while the secondary was down, their
/// old folder then deleted, its disk full when it comes back: the
/// comparison sends the new names (no room for them) and deletes the old
/// folder. The replica holds the folder's delete while the content in it
/// waits for room, so every message stays there (a failover meanwhile
/// finds it in the mailbox); once there is room the replica follows.
#[test]
fn a_folder_deleted_after_its_messages_moved_stays_while_the_secondarys_disk_is_full() {
    messages_changed_while_the_secondary_was_down_stay_while_its_disk_is_full(
        &["old/cur", "old/tmp", "new/cur"],
        |i| format!("old/cur/{i}.msg:2,S"),
        |src| {
            for i in 0..5 {
                std::fs::rename(
                    src.join(format!("old/cur/{i}.msg:2,S")),
                    src.join(format!("new/cur/{i}.msg:2,S")),
                )
                .unwrap();
            }
            std::fs::remove_dir_all(src.join("old")).unwrap();
        },
        1,
    );
}

/// Five messages of 100 KiB delivered (through `<folder>/tmp/`) under
/// `name(i)` in the folders `dirs` make, replicated; the secondary killed,
/// its disk filled, `change` made on the primary, the secondary started:
/// once it holds `held_at_least` deletes for room, every message stays on
/// the replica under some name for 3 s; once room returns, it converges.
fn messages_changed_while_the_secondary_was_down_stay_while_its_disk_is_full(
    dirs: &[&str],
    name: impl Fn(usize) -> String,
    change: impl FnOnce(&std::path::Path),
    held_at_least: u64,
) {
    let (mut tp, _unmount, dst) = pair_with_a_small_secondary_disk();
    let src = tp.store(0, "inbox");
    let body = |i: usize| vec![b'a' + i as u8; 100 * 1024];
    for d in dirs {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    for i in 0..5 {
        let at = src.join(name(i));
        let tmp = at
            .parent()
            .unwrap()
            .with_file_name("tmp")
            .join(i.to_string());
        std::fs::write(&tmp, body(i)).unwrap();
        std::fs::rename(&tmp, &at).unwrap();
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[1].kill9().unwrap();
    let fill = fill_up_after_staged_leftovers(&tp.nodes[1].mail_dir());
    change(&src);
    tp.nodes[1].start().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(30), Duration::from_millis(50), |s| {
            s.replication.deletes_held_for_room >= held_at_least
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Every message stays on the replica, under some name, while the
    // deletes are asked for again.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let held: Vec<Vec<u8>> = walk_files(&dst)
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .collect();
        for i in 0..5 {
            assert!(
                held.contains(&body(i)),
                "message {i} is under neither name on the replica\n{}",
                tp.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(fill).unwrap();
    wait_identical(&src, &dst, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// A message with two names loses the one the sender had recorded for its
/// inode, then gains a third name: the third must still reach the replica
/// (as a link to the name that remains, or as bytes), not be asked for
/// forever as a link to the deleted name.
#[test]
fn a_link_to_a_message_whose_first_name_was_deleted_still_arrives() {
    let tp = started_with_fixture(fast(), 21, 1, 3);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let cur = src.join("user0000/Maildir/cur");
    let (a, b, c) = (cur.join("a:2,"), cur.join("b:2,S"), cur.join("c:2,T"));
    std::fs::write(&a, vec![b'm'; 5000]).unwrap();
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    std::fs::hard_link(&a, &b).unwrap();
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    std::fs::remove_file(&a).unwrap();
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    std::fs::hard_link(&b, &c).unwrap();
    wait_identical(&src, &dst, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    use std::os::unix::fs::MetadataExt;
    let (mb, mc) = (
        std::fs::metadata(dst.join("user0000/Maildir/cur/b:2,S")).unwrap(),
        std::fs::metadata(dst.join("user0000/Maildir/cur/c:2,T")).unwrap(),
    );
    assert_eq!(
        mb.ino(),
        mc.ino(),
        "the replica's two names share one inode"
    );
    let r = tp.repl(0);
    assert!(
        r.needs_received < 10,
        "the third name was asked for {} times",
        r.needs_received
    );
}

/// A name that turns from a folder into a file, or from a file into a
/// folder, while the pair runs (one merged change) and while the secondary
/// is down (found by the comparison at reconnect): the replica follows
/// both ways instead of failing the same op forever.
#[test]
fn a_name_that_changes_between_file_and_folder_replicates_both_ways() {
    let mut tp = started_with_fixture(fast(), 23, 1, 3);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let base = src.join("user0000/Maildir");
    for name in ["live-d2f", "down-d2f"] {
        std::fs::create_dir_all(base.join(name).join("sub")).unwrap();
        std::fs::write(base.join(name).join("sub/m1"), b"first").unwrap();
        std::fs::write(base.join(name).join("m2"), b"second").unwrap();
    }
    for name in ["live-f2d", "down-f2d"] {
        std::fs::write(base.join(name), b"a file for now").unwrap();
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));

    let flip = |name: &str| {
        let p = base.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
            std::fs::write(&p, b"now a file").unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("inside"), b"now in a folder").unwrap();
        }
    };
    flip("live-d2f");
    flip("live-f2d");
    wait_identical(&src, &dst, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("while running: {e}\n{}", tp.logs()));

    tp.nodes[1].kill9().unwrap();
    flip("down-d2f");
    flip("down-f2d");
    tp.nodes[1].start().unwrap();
    wait_identical(&src, &dst, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after a restart: {e}\n{}", tp.logs()));
    assert!(dst.join("user0000/Maildir/down-d2f").is_file());
    assert!(dst.join("user0000/Maildir/down-f2d/inside").is_file());
}

/// Flag renames of messages the replica lost by hand: each rename is
/// refused there (source missing), and the renamed message must then
/// arrive in full, now, not at the next verification ten minutes later.
#[test]
fn a_rename_the_replica_cannot_apply_is_sent_in_full() {
    let tp = started_with_fixture(fast(), 25, 1, 3);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let cur = "user0000/Maildir/cur";
    for i in 0..40 {
        std::fs::write(
            src.join(cur).join(format!("m{i}:2,")),
            format!("message {i}"),
        )
        .unwrap();
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    for i in 0..40 {
        std::fs::remove_file(dst.join(cur).join(format!("m{i}:2,"))).unwrap();
    }
    for i in 0..40 {
        std::fs::rename(
            src.join(cur).join(format!("m{i}:2,")),
            src.join(cur).join(format!("m{i}:2,S")),
        )
        .unwrap();
        // One rename per batch: each is its own race between the refusal
        // and the acknowledgement.
        std::thread::sleep(Duration::from_millis(15));
    }
    wait_identical(&src, &dst, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let r = tp.repl(1);
    assert!(r.rename_sources_missing >= 1, "renames were refused there");
}

/// A secondary stopped with SIGTERM in the middle of a steady session
/// saves its index first, so that after a restart it does not re-read and
/// re-hash its whole store.
#[test]
fn a_secondary_saves_its_index_when_it_stops() {
    let mut tp = started_with_fixture(fast(), 11, 20, 1500);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Live changes after the initial sync, so the session is mid-stream.
    for i in 0..50 {
        let d = src.join("live/new");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{i}.m")), format!("live {i}\n")).unwrap();
    }
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let files = walk_files(&dst).len();
    assert!(tp.nodes[1].stop(Duration::from_secs(20)), "stopped");
    let state = tp.nodes[1].state_dir.clone();
    let ix = hasync::replica::index::Index::load(&state, "inbox");
    println!(
        "{files} files on the replica, {} in its saved index",
        ix.len()
    );
    assert!(
        ix.len() >= files,
        "the saved index has {} of {files} files",
        ix.len()
    );
}

/// Epoch numbers do not order tenures in time: a node that was down when
/// its peer promoted takes the next epoch of its own parity above what it
/// knows, which can be below the peer's although it serves later. Here mx1
/// (odd epochs) restarts alone while mx2 is stopped and takes epoch 3; its
/// user deletes a message; mx1 dies; mx2 (which knows epoch 1 only) starts
/// alone at epoch 2 and its user files the message; mx1 comes back (epoch
/// 5, carrying its record of epoch 3), mx2 rejoins saying it last served at
/// 2. Epoch 2 is not a tenure mx1 knew of as it took over at 3: the carried
/// record does not count, and the filed message is kept aside, not deleted.
#[test]
fn a_peer_that_served_later_at_a_lower_epoch_is_not_judged_by_a_carried_record() {
    peer_serves_later_below(false);
}

/// A floor that is this node's own earlier epoch would say nothing about
/// the peer (the floor is the peer's last epoch heard of). mx1 (odd epochs) restarts alone at epoch 3 while mx2 (which
/// knows epoch 1 only) is stopped, and its inbox record cannot be written
/// there (the injected fault of the test above: an alarm the daemon serves
/// on). It restarts alone again at epoch 5: the record of 5 says floor 3
/// (mx1's own epoch 3, never heard of by mx2). Its user deletes a message;
/// it dies. mx2 alone takes epoch 2 (after mx1's epoch 5 began) and its
/// user files the message. mx1 comes back (epoch 7, carrying (5, floor 3)),
/// mx2 rejoins saying it last served at 2, an epoch mx1 never heard of:
/// the carried part does not count, and the filed message is kept aside.
#[test]
fn a_carried_record_counts_only_for_a_peer_tenure_heard_of_not_for_own_epochs() {
    peer_serves_later_below(true);
}

/// The scenario of the two tests above: mx1 serves alone (at 3, or at 5
/// after a tenure at 3 whose record could not be written, with
/// `unrecorded_tenure_first`) and its user deletes a message; mx2, which
/// knows epoch 1 only, then serves alone at 2 and its user files it; mx1
/// comes back, mx2 rejoins: the filed message must be kept aside.
fn peer_serves_later_below(unrecorded_tenure_first: bool) {
    let mut tp = started_with_fixture(fast(), 29, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    // The peer said it is no former primary: mx1's record of epoch 1 settles.
    let rec = tp.nodes[0].state_dir.join("takeover-inbox.bin");
    let t0 = std::time::Instant::now();
    while rec.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !rec.exists(),
        "record of epoch 1 not settled\n{}",
        tp.logs()
    );
    let cur = std::path::Path::new("user0000/Maildir/cur");
    let name = first_name(&a.join(cur));
    let kept = std::fs::read(a.join(cur).join(&name)).unwrap();
    // mx2 stops (it knows epoch 1 only).
    assert!(tp.nodes[1].stop(Duration::from_secs(10)));
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    let mut epoch = 3;
    if unrecorded_tenure_first {
        // mx1 alone at epoch 3; its inbox record cannot be written.
        let fault = tp.nodes[0].state_dir.join(".takeover-inbox.bin.tmp");
        std::fs::create_dir(&fault).unwrap();
        tp.nodes[0].start().unwrap();
        tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
        tp.wait_tracking(0);
        assert_eq!(tp.nodes[0].status().unwrap().epoch, 3);
        assert!(!rec.exists(), "no record of epoch 3\n{}", tp.logs());
        assert!(tp.nodes[0].stop(Duration::from_secs(10)));
        std::fs::remove_dir(&fault).unwrap();
        epoch = 5;
    }
    // mx1 alone (its record holds the message); its user deletes the
    // message; it dies.
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
    tp.wait_tracking(0);
    assert_eq!(tp.nodes[0].status().unwrap().epoch, epoch);
    std::fs::remove_file(a.join(cur).join(&name)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tp.nodes[0].kill9().unwrap();
    // mx2 alone: epoch 2 (it never heard of mx1's); its user files it.
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.wait_tracking(1);
    assert_eq!(tp.nodes[1].status().unwrap().epoch, 2);
    let filed = std::path::Path::new("user0000/Maildir/.Keep/cur");
    std::fs::create_dir_all(b.join(filed)).unwrap();
    std::fs::rename(b.join(cur).join(&name), b.join(filed).join(&name)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(tp.nodes[1].stop(Duration::from_secs(10)));
    // mx1 back alone (its record carried), then mx2.
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Secondary, Duration::from_secs(20));
    wait_identical(&a, &b, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    wait_caught_up(&tp, 1);
    let conflicts = tp.conflicts(0);
    let still_filed = b.join(filed).join(&name).exists() || a.join(filed).join(&name).exists();
    let found = conflicts
        .iter()
        .find(|c| c.path.ends_with(name.to_str().unwrap()));
    if let Some(found) = found {
        assert_eq!(tp.conflict_body(0, found), kept);
    }
    assert!(
        still_filed || found.is_some(),
        "the message mx2's user filed while serving alone at epoch 2 (after mx1's epoch {epoch} began) is gone, not kept aside: {conflicts:?}\n{}",
        tp.logs()
    );
}

/// A record of an earlier release (version 1 or 2, no epochs) left where
/// this tenure's should be, because the write at this promotion failed,
/// never counts as this tenure's own. Here mx2
/// holds such a record from an old failover (it names a message mx2 no
/// longer holds); mx1's user restores that message's content under a new
/// name while mx2 is down; mx2 takes over at epoch 2 and cannot rewrite its
/// record; mx1 rejoins: its restored message is kept aside, not deleted on
/// the strength of the old record.
#[test]
fn a_record_of_an_earlier_release_not_rewritten_at_promotion_does_not_count() {
    let mut tp = started_with_fixture(fast(), 31, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    let cur = std::path::Path::new("user0000/Maildir/cur");
    let name = first_name(&a.join(cur));
    let kept = std::fs::read(a.join(cur).join(&name)).unwrap();
    // mx1's user deletes it; both nodes lose it.
    std::fs::remove_file(a.join(cur).join(&name)).unwrap();
    wait_identical(&a, &b, CONVERGE).unwrap();
    assert!(tp.nodes[1].stop(Duration::from_secs(10)));
    // mx2 holds a record of an earlier release (version 1) of some old
    // failover that names the message's content.
    let mut rec = Vec::new();
    rec.extend_from_slice(b"HSTK");
    rec.extend_from_slice(&1u32.to_le_bytes());
    rec.extend_from_slice(&1u64.to_le_bytes());
    rec.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(&kept).to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&rec);
    rec.extend_from_slice(&sum.to_le_bytes());
    std::fs::write(tp.nodes[1].state_dir.join("takeover-inbox.bin"), &rec).unwrap();
    // mx1's user restores the message (from a backup) while mx2 is down.
    let restored = std::path::Path::new("user0000/Maildir/.Restored/cur");
    std::fs::create_dir_all(a.join(restored)).unwrap();
    std::fs::write(a.join(restored).join(&name), &kept).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tp.nodes[0].kill9().unwrap();
    // mx2 takes over; its record cannot be rewritten (state dir fault).
    std::fs::create_dir(tp.nodes[1].state_dir.join(".takeover-inbox.bin.tmp")).unwrap();
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    tp.wait_tracking(1);
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Secondary, Duration::from_secs(20));
    wait_identical(&b, &a, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    wait_caught_up(&tp, 0);
    let conflicts = tp.conflicts(1);
    let found = conflicts
        .iter()
        .find(|c| c.path.ends_with(name.to_str().unwrap()));
    if let Some(found) = found {
        assert_eq!(tp.conflict_body(1, found), kept);
    }
    assert!(
        found.is_some() || a.join(restored).join(&name).exists(),
        "the message mx1's user restored while mx2 was down is gone, judged by a record of an earlier release left from an old failover: {conflicts:?}\n{}",
        tp.logs()
    );
}

/// A new primary whose former-primary mark could not be written at once
/// (injected by a directory in the temp file's place) waits, then serves
/// once it is written; when it leaves primary without restarting (a failed
/// self-check) it tells the next primary it served: a message its user got
/// while it served alone is kept aside, not deleted.
#[test]
fn a_primary_whose_mark_was_written_late_still_says_it_served() {
    primary_left_without_restart(true);
}

/// The same without the fault: the message is kept aside.
#[test]
fn a_primary_left_without_restart_keeps_its_users_mail() {
    primary_left_without_restart(false);
}

fn primary_left_without_restart(mark_fails: bool) {
    let mut tp = started_with_fixture(fast(), 29, 2, 10);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    wait_identical(&a, &b, CONVERGE).unwrap();
    if mark_fails {
        std::fs::create_dir(tp.nodes[1].state_dir.join(".former-primary.tmp")).unwrap();
    }
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    if mark_fails {
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::remove_dir(tp.nodes[1].state_dir.join(".former-primary.tmp")).unwrap();
    }
    tp.wait_tracking(1);
    let only = std::path::Path::new("user0000/Maildir/new/only.M1.newprimary");
    std::fs::write(b.join(only), b"delivered while the old primary was down").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The new primary fails its self-check (no restart); the old one is
    // back and takes over; then the new one rejoins as secondary.
    let queue = tp.nodes[1].queue_dir.clone();
    let moved = queue.with_extension("away");
    std::fs::rename(&queue, &moved).unwrap();
    tp.wait_mode(1, Role::Failed, Duration::from_secs(20));
    tp.nodes[0].start().unwrap();
    tp.wait_mode(0, Role::Primary, Duration::from_secs(30));
    std::fs::rename(&moved, &queue).unwrap();
    tp.wait_mode(1, Role::Secondary, Duration::from_secs(30));
    wait_caught_up(&tp, 1);
    std::thread::sleep(Duration::from_secs(2));
    let kept_aside = tp.conflicts(0).len() + tp.conflicts(1).len();
    assert!(
        b.join(only).exists() || a.join(only).exists() || kept_aside > 0,
        "the message delivered on the new primary is gone, not kept aside\n{}",
        tp.logs()
    );
}

/// A flag rename the replica cannot apply (its `cur/` is another
/// filesystem there: `EXDEV`) leaves the message's old name as its only
/// copy on the replica. The primary deletes that name next and sends the
/// new one again: the delete waits until the new name lands, so the
/// message is never on neither name (a failover then would find it only on
/// the old primary).
#[test]
fn a_message_whose_flag_rename_fails_on_the_replica_keeps_its_old_name_until_the_new_one_lands() {
    let tp = started_with_fixture(fast(), 26, 1, 3);
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let folder = "user0000/Maildir/.Held";
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(src.join(folder).join(sub)).unwrap();
    }
    let (old, new) = (
        format!("{folder}/new/1700000000.M1P1.mx"),
        format!("{folder}/cur/1700000000.M1P1.mx:2,S"),
    );
    std::fs::write(src.join(&old), "Subject: kept\n\nthe only copy\n").unwrap();
    wait_identical(&src, &dst, CONVERGE).unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let unmount = mount_tmpfs(&dst.join(folder).join("cur"), "size=1m");
    std::fs::rename(src.join(&old), src.join(&new)).unwrap();
    // The rename fails there, and so does every copy of the new name sent
    // since: the old name stays, for seconds.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        assert!(
            dst.join(&old).is_file(),
            "the replica deleted the message's only copy before its new name landed\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(unmount);
    wait_identical(&src, &dst, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(
        std::fs::read(dst.join(&new)).unwrap(),
        b"Subject: kept\n\nthe only copy\n"
    );
    assert!(!dst.join(&old).exists());
}

/// A primary that finds a name gone at its sync does not know whether the
/// message was expunged or moved to a name it has not sent yet (a tracker
/// event not read, a name queued behind): its first delete is unsure. The
/// test plays that primary against a real secondary: the replica keeps its
/// only copy of the message (answered `MayHaveMoved`) until the content
/// lands under its new name, which takes the old name along at once, or
/// until the primary's sure delete. A folder with mail in it (renamed, the
/// rename not read yet) is kept until the sure delete.
#[test]
fn an_unsure_delete_keeps_the_replicas_only_copy_until_its_new_name_lands() {
    use super::hostile::{act_as_primary, file, replies_until_ack};
    use hasync::wire::sync::{NeedReason, SyncMsg};
    let mut tp = TestPair::new(fast());
    let inbox = tp.store(0, "inbox");
    tp.nodes[0].start().unwrap();
    let cfg = hasync::config::Config::load(&tp.nodes[0].config_path).unwrap();
    let node = &tp.nodes[0];
    let body: &[u8] = b"a message its user flagged: cur/m:2,S, not sent yet";
    let delete = |seq: u64, path: &[u8], unsure: bool, out: &mut Vec<u8>| {
        SyncMsg::Delete {
            seq,
            store: 0,
            path: path.to_vec(),
            unsure,
        }
        .encode(out)
    };
    let held = |replies: &[SyncMsg]| -> Vec<u64> {
        replies
            .iter()
            .filter_map(|m| match m {
                SyncMsg::Need {
                    seq,
                    reason: NeedReason::MayHaveMoved,
                    ..
                } => Some(*seq),
                _ => None,
            })
            .collect()
    };
    let (after_hold, after_landing, after_sure) = tokio_uring::start(async {
        let (beat, mut r, w) = act_as_primary(node, &cfg).await;
        let mut out = Vec::new();
        file(1, b"user/new/m", body, &mut out);
        file(2, b"user/new/n", b"expunged for real", &mut out);
        file(3, b"user/old/f", b"in a folder deleted", &mut out);
        SyncMsg::Barrier { seq: 3 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        replies_until_ack(&mut r, 3).await;
        let mut out = Vec::new();
        delete(4, b"user/new/m", true, &mut out);
        delete(5, b"user/new/n", true, &mut out);
        delete(6, b"user/old", true, &mut out);
        SyncMsg::Barrier { seq: 6 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let after_hold = replies_until_ack(&mut r, 6).await;
        let on_disk = (
            inbox.join("user/new/m").exists(),
            inbox.join("user/new/n").exists(),
            inbox.join("user/old").exists(),
        );
        // The new name lands: the held old name goes with it.
        let mut out = Vec::new();
        file(7, b"user/cur/m:2,S", body, &mut out);
        SyncMsg::Barrier { seq: 7 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let after_landing = replies_until_ack(&mut r, 7).await;
        let m_after_landing = inbox.join("user/new/m").exists();
        // A real expunge: sure the second time.
        let mut out = Vec::new();
        delete(8, b"user/new/n", false, &mut out);
        delete(9, b"user/old", false, &mut out);
        SyncMsg::Barrier { seq: 9 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let after_sure = replies_until_ack(&mut r, 9).await;
        beat.abort();
        (
            (after_hold, on_disk),
            (after_landing, m_after_landing),
            after_sure,
        )
    });
    let ((replies, (m, n, folder)), (landing, m_after)) = (after_hold, after_landing);
    assert_eq!(held(&replies), [4, 5, 6], "{replies:?}\n{}", tp.logs());
    assert!(m && n && folder, "the held names stay on the replica");
    assert!(held(&landing).is_empty(), "{landing:?}");
    assert!(
        !m_after,
        "the old name goes as its content lands under the new one"
    );
    assert_eq!(std::fs::read(inbox.join("user/cur/m:2,S")).unwrap(), body);
    assert!(held(&after_sure).is_empty(), "{after_sure:?}");
    assert!(!inbox.join("user/new/n").exists(), "a sure delete applies");
    assert!(!inbox.join("user/old").exists(), "a sure delete applies");
}

/// A real secondary whose disk is full: a message copied under another
/// name is refused for room, and until that copy lands, nothing the
/// primary says may replace the only copy left of it here: not a rename
/// onto it, a link, a symlink, nor a folder made in its place. Each is
/// held (asked for again, `NoSpace`). With room back, the copy lands and
/// the rename applies.
#[test]
fn ops_that_would_replace_the_only_copy_of_a_message_waiting_for_room_are_held() {
    use super::hostile::{act_as_primary, file, meta, replies_until_ack};
    use hasync::wire::sync::{NeedReason, SyncMsg};
    let g = inotify_guard();
    let mut tp = TestPair::new(PairOptions {
        internal_beside_stores: true,
        ..fast()
    });
    let inbox = tp.store(0, "inbox");
    let _unmount = mount_tmpfs(&tp.nodes[0].mail_dir(), "size=1m");
    tp.nodes[0].make_store_dirs().unwrap();
    drop(g);
    tp.nodes[0].start().unwrap();
    let cfg = hasync::config::Config::load(&tp.nodes[0].config_path).unwrap();
    let node = &tp.nodes[0];
    let (m, x, y) = (
        vec![b'm'; 64 << 10],
        vec![b'x'; 64 << 10],
        vec![b'y'; 64 << 10],
    );
    let hash = |b: &[u8]| xxhash_rust::xxh3::xxh3_128(b);
    let no_space = |replies: &[SyncMsg]| -> Vec<u64> {
        replies
            .iter()
            .filter_map(|r| match r {
                SyncMsg::Need {
                    seq,
                    reason: NeedReason::NoSpace,
                    ..
                } => Some(*seq),
                _ => None,
            })
            .collect()
    };
    let (refused, held, on_disk, landed) = tokio_uring::start(async {
        let (beat, mut r, w) = act_as_primary(node, &cfg).await;
        let mut out = Vec::new();
        file(1, b"u/cur/m", &m, &mut out);
        file(2, b"u/cur/x", &x, &mut out);
        file(3, b"u/cur/y", &y, &mut out);
        // What leaves less room than another copy of m takes.
        file(4, b"u/filler", &vec![b'f'; 800 << 10], &mut out);
        SyncMsg::Barrier { seq: 4 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let filled = replies_until_ack(&mut r, 4).await;
        assert!(no_space(&filled).is_empty(), "{filled:?}");
        // The user copies m to another folder: refused for room.
        let mut out = Vec::new();
        file(5, b"u/new/m2", &m, &mut out);
        SyncMsg::Barrier { seq: 5 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let refused = replies_until_ack(&mut r, 5).await;
        // Then x renamed onto m's name, y linked there, a symlink and a
        // folder made there.
        let mut out = Vec::new();
        let (path, store) = (b"u/cur/m".to_vec(), 0);
        SyncMsg::Rename {
            seq: 6,
            store,
            from: b"u/cur/x".to_vec(),
            to: path.clone(),
        }
        .encode(&mut out);
        SyncMsg::Link {
            seq: 7,
            store,
            existing: b"u/cur/y".to_vec(),
            path: path.clone(),
            hash: hash(&y),
            meta: meta(),
        }
        .encode(&mut out);
        SyncMsg::Symlink {
            seq: 8,
            store,
            path: path.clone(),
            target: b"y".to_vec(),
            meta: meta(),
        }
        .encode(&mut out);
        SyncMsg::Mkdir {
            seq: 9,
            store,
            path: path.clone(),
            meta: {
                let mut folder = meta();
                folder.mode = 0o755;
                folder
            },
        }
        .encode(&mut out);
        SyncMsg::Barrier { seq: 9 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let held = replies_until_ack(&mut r, 9).await;
        let on_disk = (
            std::fs::read(inbox.join("u/cur/m")).ok(),
            inbox.join("u/cur/x").exists(),
        );
        // Room back: the copy is sent again and lands, then the rename.
        let mut out = Vec::new();
        SyncMsg::Delete {
            seq: 10,
            store,
            path: b"u/filler".to_vec(),
            unsure: false,
        }
        .encode(&mut out);
        file(11, b"u/new/m2", &m, &mut out);
        SyncMsg::Rename {
            seq: 12,
            store,
            from: b"u/cur/x".to_vec(),
            to: path.clone(),
        }
        .encode(&mut out);
        SyncMsg::Barrier { seq: 12 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let landed = replies_until_ack(&mut r, 12).await;
        beat.abort();
        (refused, held, on_disk, landed)
    });
    assert_eq!(no_space(&refused), [5], "{refused:?}\n{}", tp.logs());
    assert_eq!(no_space(&held), [6, 7, 8, 9], "{held:?}\n{}", tp.logs());
    assert_eq!(on_disk.0.as_deref(), Some(&m[..]), "m's only copy stays");
    assert!(on_disk.1, "the rename's source stays");
    assert!(no_space(&landed).is_empty(), "{landed:?}\n{}", tp.logs());
    assert_eq!(std::fs::read(inbox.join("u/new/m2")).unwrap(), m);
    assert_eq!(std::fs::read(inbox.join("u/cur/m")).unwrap(), x);
    assert!(!inbox.join("u/cur/x").exists());
}
