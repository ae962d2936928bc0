//! Odd names, deep trees, full disks and bad configuration, against real
//! daemons: each input from outside has a limit, a clear error, and leaves
//! the rest of the pair working.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use super::util::*;

fn name(raw: &[u8]) -> PathBuf {
    PathBuf::from(std::ffi::OsStr::from_bytes(raw))
}

#[test]
fn non_utf8_names_replicate_and_the_index_keeps_them_byte_exact() {
    let (mut tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let inbox = tp.store(p, "inbox");
    let cur = inbox.join("user/cur");
    std::fs::create_dir_all(&cur).unwrap();
    let odd: [&[u8]; 3] = [b"latin1-\xe9t\xe9:2,S", b"\xff\xfe-not-utf8", b"plain"];
    for (i, raw) in odd.iter().enumerate() {
        std::fs::write(cur.join(name(raw)), format!("message {i}")).unwrap();
    }
    wait_identical(&inbox, &tp.store(s, "inbox"), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    for i in [p, s] {
        assert!(tp.nodes[i].stop(Duration::from_secs(10)), "{}", tp.logs());
    }
    for i in [p, s] {
        let index = tp.nodes[i].state_dir.join("index-inbox.bin");
        let bytes = std::fs::read(&index)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", index.display(), tp.logs()));
        for raw in odd {
            assert!(
                bytes.windows(raw.len()).any(|w| w == raw),
                "{} lacks {:?}",
                index.display(),
                String::from_utf8_lossy(raw)
            );
        }
    }
    assert!(!tp.logs().contains("cannot save index"), "{}", tp.logs());
}

#[test]
fn a_full_state_directory_keeps_the_node_failed_at_its_durable_epoch_until_space_returns() {
    // The stores' internal directories are beside them: the state
    // directory is a filesystem of its own here.
    let mut tp = TestPair::new(PairOptions {
        internal_beside_stores: true,
        ..fast()
    });
    // mx2 (priority 100) will be the secondary; its state directory is small.
    let state = tp.nodes[1].state_dir.clone();
    let _unmount = mount_tmpfs(&state, "size=256k");
    tp.start_all();
    tp.wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let before = tp.nodes[1].status().unwrap();
    assert_eq!(before.mode, Role::Secondary);
    let fill = fill_up(&state);
    // The primary dies: mx2 must promote, and cannot make its epoch durable.
    tp.nodes[0].kill9().unwrap();
    let failed = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Failed
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(failed.reason.contains("persist"), "{}", failed.reason);
    // It stays failed, at its durable epoch, with one alarm, and leaves no
    // temporary file behind.
    let mut modes = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let s = tp.nodes[1].status().unwrap();
        modes.insert(s.mode.to_string());
        assert_eq!(s.epoch, before.epoch, "the epoch must not climb: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = tp.nodes[1].status().unwrap();
    assert_eq!(
        modes.into_iter().collect::<Vec<_>>(),
        ["failed"],
        "{}",
        tp.logs()
    );
    let alarms = s
        .alarms
        .iter()
        .filter(|a| a.message.contains("persist"))
        .count();
    assert_eq!(alarms, 1, "{:?}", s.alarms);
    // The failed node retries its record now and then, so a temporary
    // file may exist for the instant of an attempt; a leaked one would
    // stay, so look for an instant without any.
    let temps = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    };
    let mut left = temps(&state);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        left = temps(&state);
    }
    assert!(left.is_empty(), "temporary files left: {left:?}");
    // Space returns: the node takes the next epoch it owns, once.
    std::fs::remove_file(fill).unwrap();
    let primary = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(
        primary.epoch > before.epoch && primary.epoch <= before.epoch + 2,
        "{} after {}",
        primary.epoch,
        before.epoch
    );
    let on_disk = std::fs::read_to_string(state.join("epoch.json")).unwrap();
    assert!(
        on_disk.contains(&format!("\"epoch\":{}", primary.epoch)),
        "{on_disk}"
    );
}

/// Free bytes of the filesystem holding `dir`.
fn free_bytes(dir: &std::path::Path) -> u64 {
    let st = rustix::fs::statvfs(dir).unwrap();
    st.f_bavail * st.f_frsize
}

#[test]
fn an_announced_size_that_cannot_fit_is_refused_before_a_byte_is_staged() {
    use hasync::wire::sync::SyncMsg;
    let mut tp = TestPair::new(PairOptions {
        internal_beside_stores: true,
        ..fast()
    });
    let inbox = tp.store(0, "inbox");
    let _unmount = mount_tmpfs(&tp.nodes[0].mail_dir(), "size=48m");
    tp.nodes[0].make_store_dirs().unwrap();
    tp.nodes[0].start().unwrap();
    let cfg = hasync::config::Config::load(&tp.nodes[0].config_path).unwrap();
    let free_before = free_bytes(&inbox);
    let node = &tp.nodes[0];
    let (answer, free_during) = tokio_uring::start(async {
        let (beat, mut r, w) = super::hostile::act_as_primary(node, &cfg).await;
        let mut out = Vec::new();
        SyncMsg::File {
            seq: 1,
            store: 0,
            path: b"huge/cur/10GiB".to_vec(),
            meta: super::hostile::meta(),
            size: 10 << 30,
            hash: 0,
            apart: false,
        }
        .encode(&mut out);
        w.send_bytes(out).await.unwrap();
        // The answer comes before any data is sent.
        let f = tokio::time::timeout(Duration::from_secs(5), r.recv_frame())
            .await
            .expect("answered at once")
            .unwrap();
        let answer = SyncMsg::decode(&f).unwrap();
        // Whatever content follows is read and dropped, never staged.
        for _ in 0..64 {
            let mut out = Vec::new();
            SyncMsg::Data {
                seq: 1,
                bytes: vec![7u8; 1 << 20],
            }
            .encode(&mut out);
            w.send_bytes(out).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let free_during = free_bytes(&inbox);
        beat.abort();
        (answer, free_during)
    });
    assert!(
        matches!(
            answer,
            SyncMsg::Need {
                seq: 1,
                reason: hasync::wire::sync::NeedReason::NoSpace,
                ..
            }
        ),
        "{answer:?}"
    );
    assert!(
        free_before - free_during < 2 << 20,
        "{} bytes staged",
        free_before - free_during
    );
    let st = tp.nodes[0].status().unwrap();
    assert!(st.replication.disk_full, "{:?}", st.replication);
    let why = st.replication.disk_full_why.unwrap_or_default();
    assert!(why.contains("10240.0 MiB announced"), "{why}");
    assert_eq!(
        st.alarms
            .iter()
            .filter(|a| a.message.contains("disk full"))
            .count(),
        1,
        "{:?}",
        st.alarms
    );
}

#[test]
fn exhausted_inodes_hold_the_disk_full_alarm_until_they_return() {
    let mut tp = TestPair::new(PairOptions {
        internal_beside_stores: true,
        ..fast()
    });
    let dst = tp.store(1, "quarantine");
    // The stores, their internal directories and 36 more inodes.
    let _unmount = mount_tmpfs(&tp.nodes[1].mail_dir(), "size=16m,nr_inodes=48");
    tp.nodes[1].make_store_dirs().unwrap();
    tp.start_all();
    tp.wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let src = tp.store(0, "quarantine");
    std::fs::create_dir_all(src.join("q/cur")).unwrap();
    for i in 0..80 {
        std::fs::write(src.join(format!("q/cur/{i}.msg")), format!("held {i}")).unwrap();
    }
    tp.nodes[1]
        .wait_status(Duration::from_secs(20), Duration::from_millis(50), |s| {
            s.replication.disk_full
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Renames of files that did land still succeed on a full disk; the
    // condition must hold all the same, with one alarm.
    for i in 0..5 {
        let _ = std::fs::rename(
            src.join(format!("q/cur/{i}.msg")),
            src.join(format!("q/cur/{i}.msg:2,S")),
        );
    }
    for _ in 0..30 {
        let s = tp.nodes[1].status().unwrap();
        assert!(
            s.replication.disk_full,
            "the alarm must hold\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = tp.nodes[1].status().unwrap();
    assert_eq!(
        s.alarms
            .iter()
            .filter(|a| a.message.contains("disk full"))
            .count(),
        1,
        "{:?}",
        s.alarms
    );
    assert!(
        !tp.nodes[1].log().contains("disk space is back"),
        "{}",
        tp.logs()
    );
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,nr_inodes=10000"])
        .arg(tp.nodes[1].mail_dir())
        .status()
        .unwrap();
    assert!(ok.success());
    wait_identical(&src, &dst, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            !s.replication.disk_full && s.replication.disk_full_why.is_none()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(tp.nodes[1].log_shows("disk space is back"));
}

/// Makes the nested folders `dirs` under `base` (walking by descriptor:
/// the path soon exceeds what one syscall takes) and a file `name` at the
/// bottom; returns the relative path of that file.
fn deep_tree(base: &std::path::Path, dirs: &[String], name: &str) -> Vec<u8> {
    use rustix::fs::{Mode, OFlags};
    let mut dir = rustix::fs::open(base, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    let mut rel = Vec::new();
    for d in dirs {
        match rustix::fs::mkdirat(&dir, d.as_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => panic!("{e}"),
        }
        dir = rustix::fs::openat(
            &dir,
            d.as_str(),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        rel.extend_from_slice(d.as_bytes());
        rel.push(b'/');
    }
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&fd, b"at the bottom").unwrap();
    rel.extend_from_slice(name.as_bytes());
    rel
}

#[test]
fn deep_folders_never_stop_the_rest_of_the_store() {
    let (tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let inbox = tp.store(p, "inbox");
    // A path of 4,076 bytes below the root (past PATH_MAX with the root's
    // own path) and a tree 400 levels deep replicate; a path of 5,000
    // bytes (over the 4,095-byte limit) is refused with an alarm naming
    // it; mail elsewhere keeps flowing.
    let long = |c: char, n: usize| {
        (0..n)
            .map(|i| format!("{c}{i:02}{}", "x".repeat(247)))
            .collect::<Vec<_>>()
    };
    let ok = deep_tree(&inbox, &long('a', 16), &"m".repeat(60));
    assert_eq!(ok.len(), 4076);
    assert!(inbox.as_os_str().len() + 1 + ok.len() > 4096);
    let deep = deep_tree(&inbox, &vec!["d".to_string(); 400], "deep-ok");
    std::fs::create_dir_all(inbox.join("x")).unwrap();
    let mut too_deep = b"x/".to_vec();
    too_deep.extend(deep_tree(&inbox.join("x"), &long('b', 20), "refused"));
    std::fs::create_dir_all(inbox.join("user/cur")).unwrap();
    for i in 0..20 {
        std::fs::write(inbox.join(format!("user/cur/{i}")), format!("mail {i}")).unwrap();
    }
    let dst = tp.store(s, "inbox");
    let landed = |rel: &[u8]| {
        let fd =
            rustix::fs::open(&dst, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        rustix::fs::statat(
            &fd,
            std::ffi::OsStr::from_bytes(rel),
            rustix::fs::AtFlags::empty(),
        )
        .is_ok()
    };
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if (0..20).all(|i| dst.join(format!("user/cur/{i}")).exists())
            && landed(&ok)
            && landed(&deep)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        (0..20).all(|i| dst.join(format!("user/cur/{i}")).exists()),
        "mail elsewhere stopped\n{}",
        tp.logs()
    );
    assert!(
        landed(&ok),
        "a 4,076-byte path did not replicate\n{}",
        tp.logs()
    );
    assert!(
        landed(&deep),
        "a 400-level tree did not replicate\n{}",
        tp.logs()
    );
    assert!(!landed(&too_deep));
    let st = tp.nodes[p].status().unwrap();
    assert!(
        st.alarms
            .iter()
            .any(|a| a.message.contains("x/b00") && a.message.contains("4095")),
        "{:?}\n{}",
        st.alarms,
        tp.logs()
    );
}

/// A flush that fails on the secondary (an injected EIO from its second
/// `syncfs`; a real one cannot be provoked on this machine's disks): the
/// replica is latched unverified (alarm, marker in the state directory),
/// the session ends, the next session re-reads every file from disk before
/// anything is acknowledged, the latch lifts, and the replica converges.
#[test]
fn a_failed_flush_latches_the_replica_unverified_until_it_is_read_again_from_disk() {
    let mut tp = TestPair::new(fast());
    tp.nodes[0].start().unwrap();
    tp.nodes[1]
        .start_with_env(&[("HASYNC_FAILPOINTS", "syncfs.eio=2")])
        .unwrap();
    tp.wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let (src, dst) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    std::fs::create_dir_all(src.join("u/cur")).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("u/cur/{i}")), format!("message {i}")).unwrap();
    }
    wait_identical(&src, &dst, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    latched_then_lifted(&tp, Duration::from_secs(10));
    // Lifted, the pair goes on as usual.
    std::fs::write(src.join("u/cur/after"), "after the latch").unwrap();
    wait_identical(&src, &dst, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// A flush still running when the sync connection is cut (injected: the
/// secondary's second `syncfs` waits 3 s and then fails; the test kills the
/// connection meanwhile with `ss -K`) fails after its session ended. The
/// session hears it before it ends, so the replica is latched and the next
/// session's manifest re-reads every file from disk, although the files
/// are all landed and nothing is left to send (no later flush would report
/// the failure).
#[test]
fn a_flush_failing_after_the_sync_connection_was_cut_still_latches_the_replica() {
    let (tp, src) = pair_in_a_slow_failing_flush("3000");
    let dst = tp.store(1, "inbox");
    tp.cut_sync_connection(1);
    latched_then_lifted(&tp, Duration::from_secs(20));
    let log = tp.logs();
    // The cut ended the session, not the flush's failure.
    let ended = tp.nodes[1].log_when(LOG_WAIT, |l| l.contains("sync connection ended"));
    let ended = ended
        .lines()
        .find(|l| l.contains("sync connection ended"))
        .unwrap_or_else(|| panic!("the session did not end\n{log}"));
    assert!(!ended.contains("syncfs"), "{ended}");
    wait_identical(&src, &dst, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// A flush on the secondary that has not returned within
/// `replication.flush_alarm_ms` (a hung disk: here a `syncfs` held for 6 s)
/// is an alarm, shows in the status and blocks a switchover while it runs;
/// once it returns the status clears (this one fails: the replica is
/// latched, then re-read, and converges).
#[test]
fn a_flush_that_hangs_is_an_alarm_and_in_the_status_until_it_returns() {
    let opts = PairOptions {
        flush_alarm_ms: 1000,
        ..fast()
    };
    let (tp, src) = pair_in_a_slow_failing_flush_with("6000", opts);
    let dst = tp.store(1, "inbox");
    let st = flush_overdue(&tp, Duration::from_secs(5));
    assert!(st.replication.flush_overdue_ms >= Some(1000));
    let blocker = st.switchover_blocker.unwrap_or_default();
    assert!(blocker.contains("flush has not returned"), "{blocker}");
    // Once it returns (failing), the overdue flush is over.
    latched_then_lifted(&tp, Duration::from_secs(30));
    let st = tp.nodes[1].status().unwrap();
    assert_eq!(st.replication.flush_overdue_ms, None);
    assert!(
        tp.nodes[1].log_shows("overdue flush returned after"),
        "{}",
        tp.logs()
    );
    wait_identical(&src, &dst, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// The same alarm while an op waits for the hung flush: a message written
/// on the primary during the secondary's held `syncfs`, sent and staged
/// there, then renamed (the rename touches the staged file, so the
/// receiver waits for the flush before it applies it).
#[test]
fn a_flush_that_hangs_is_an_alarm_also_while_an_op_waits_for_it() {
    let opts = PairOptions {
        flush_alarm_ms: 1000,
        ..fast()
    };
    let (tp, src) = pair_in_a_slow_failing_flush_with("8000", opts);
    std::fs::create_dir_all(src.join("u/new")).unwrap();
    std::fs::write(src.join("u/new/late"), b"a message during the held flush").unwrap();
    // Sent and staged on the secondary before it is renamed.
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(src.join("u/new/late"), src.join("u/cur/late:2,S")).unwrap();
    flush_overdue(&tp, Duration::from_secs(6));
    latched_then_lifted(&tp, Duration::from_secs(30));
    wait_identical(&src, &tp.store(1, "inbox"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// A node killed while its ended session waits for a flush in flight (the
/// sync connection cut during the secondary's slow flush, then the
/// secondary killed before the flush reports) cannot know the flush's
/// outcome: the marker written as the session ended says so, and the
/// restarted node re-reads its replica from disk before it trusts it.
#[test]
fn a_node_killed_while_an_ended_sessions_flush_runs_restarts_latched() {
    let (mut tp, src) = pair_in_a_slow_failing_flush("7000");
    tp.cut_sync_connection(1);
    let marker = tp.nodes[1].state_dir.join("replica-unverified");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&marker).is_ok_and(|r| r.starts_with("a flush was in flight")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no marker while the ended session's flush runs\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    tp.nodes[1].kill9().unwrap();
    restarts_and_rereads(&mut tp, &src, "a flush was in flight");
}

/// A flush still running when its node takes over (the primary killed
/// while the secondary's second `syncfs` runs; injected: it fails 3 s
/// late): the session, dropped by the promotion, still hears it (the
/// engine waits for it after the drop) and latches the replica, durably:
/// the node re-reads its replica from disk the next time it serves as a
/// secondary, even after a restart in between.
#[test]
fn a_flush_in_flight_at_a_takeover_latches_the_replica_across_a_restart() {
    let reason_says = "a flush failed: syncfs";
    let (mut tp, src) = pair_in_a_slow_failing_flush("3000");
    // The slow flush is one of mx2's first sync: the operator accepts its
    // replica as it is (`--force`: the primary is still heard), so that it
    // takes over while the flush is in flight.
    let cfg1 = tp.nodes[1].config_path.to_str().unwrap().to_string();
    let out = hasync(&["accept-replica", "--config", &cfg1]);
    assert!(!out.status.success(), "refused while the primary is heard");
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    let out = hasync(&["accept-replica", "--force", "--config", &cfg1]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(20));
    let marker = tp.nodes[1].state_dir.join("replica-unverified");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&marker).is_ok_and(|r| r.starts_with(reason_says)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure of the flush in flight was not recorded ({:?})\n{}",
            std::fs::read_to_string(&marker),
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old primary rejoins; then this node restarts and serves as the
    // secondary: it re-reads its replica before it trusts it.
    tp.nodes[0].start().unwrap();
    tp.wait_formed(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    tp.nodes[1].kill9().unwrap();
    tp.wait_mode(0, Role::Primary, Duration::from_secs(20));
    restarts_and_rereads(&mut tp, &src, reason_says);
}

/// Node 1 (stopped, latched on disk for a reason that starts with
/// `reason_says`) starts and serves as the secondary: it re-reads its
/// replica from disk before it trusts it, the marker goes, and the replica
/// converges to `src`.
fn restarts_and_rereads(tp: &mut TestPair, src: &std::path::Path, reason_says: &str) {
    tp.nodes[1].start().unwrap();
    tp.wait_mode(1, Role::Secondary, Duration::from_secs(30));
    tp.nodes[1]
        .wait_status(Duration::from_secs(30), Duration::from_millis(50), |s| {
            s.replication.replica_unverified.is_none() && s.replication.connected
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(!tp.nodes[1].state_dir.join("replica-unverified").exists());
    assert!(
        tp.nodes[1].log_shows(&format!("was re-read from disk after \"{reason_says}")),
        "the restarted node re-read its replica\n{}",
        tp.logs()
    );
    wait_identical(src, &tp.store(1, "inbox"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
}

/// A pair whose primary holds 40 messages, sent in one batch: every file
/// lands in the secondary's first commit, whose directory flush (its second
/// `syncfs`) fails `slow_ms` late. Returns once that flush runs, with the
/// primary's store.
fn pair_in_a_slow_failing_flush(slow_ms: &str) -> (TestPair, PathBuf) {
    pair_in_a_slow_failing_flush_with(slow_ms, fast())
}

fn pair_in_a_slow_failing_flush_with(slow_ms: &str, opts: PairOptions) -> (TestPair, PathBuf) {
    let mut tp = TestPair::new(opts);
    let src = tp.store(0, "inbox");
    std::fs::create_dir_all(src.join("u/cur")).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("u/cur/{i}")), format!("message {i}")).unwrap();
    }
    tp.nodes[0].start().unwrap();
    tp.nodes[1]
        .start_with_env(&[
            ("HASYNC_FAILPOINTS", "syncfs.slow_eio=2"),
            ("HASYNC_FAILPOINT_SLOW_MS", slow_ms),
        ])
        .unwrap();
    tp.wait_roles(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !tp.nodes[1].log().contains("syncfs.slow_eio reached") {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow flush never ran\n{}",
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (tp, src)
}

/// The secondary's (node 1's) status shows its flush overdue, and the
/// alarm is raised, within `within`.
fn flush_overdue(tp: &TestPair, within: Duration) -> hasync::daemon::control::Status {
    tp.nodes[1]
        .wait_status(within, Duration::from_millis(50), |s| {
            s.replication.flush_overdue_ms.is_some()
                && s.alarms
                    .iter()
                    .any(|a| a.message.contains("flush has not returned"))
        })
        .unwrap_or_else(|e| panic!("no overdue flush and alarm: {e}\n{}", tp.logs()))
}

/// The secondary (node 1) was latched unverified by a failed `syncfs`
/// (alarm), and a re-read from disk lifted the latch (marker gone) within
/// `within`.
fn latched_then_lifted(tp: &TestPair, within: Duration) {
    let st = tp.nodes[1]
        .wait_status(within, Duration::from_millis(50), |s| {
            s.replication.replica_unverified.is_none()
                && s.alarms.iter().any(|a| a.message.contains("unverified"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert!(
        st.alarms
            .iter()
            .any(|a| a.message.contains("a flush failed") && a.message.contains("syncfs")),
        "{:?}",
        st.alarms
    );
    assert!(!tp.nodes[1].state_dir.join("replica-unverified").exists());
    let log = tp.logs_when(|l| l.contains("was re-read from disk after"));
    assert!(
        log.contains("was re-read from disk after"),
        "the latch lifts only after a re-read\n{log}"
    );
}
