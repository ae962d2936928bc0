//! A hostile (but authenticated) peer: the test plays the primary against a
//! real daemon and sends traversal paths and malformed frames.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use hasync::config::Config;
use hasync::failover::{Heartbeat, Role as WireRole};
use hasync::link::auth::{LinkKey, Side};
use hasync::link::{handshake, Conn, LinkCtx, LinkStats};
use hasync::wire::sync::{Meta, NeedReason, SyncMsg};
use hasync::wire::{encode_frame, Channel, Kind, Message, BULK_PAYLOAD_BYTES_MAX};

use super::util::*;

pub fn ctx(cfg: &Config, addr: SocketAddr) -> LinkCtx {
    LinkCtx {
        node_name: cfg.link.peer_name.clone(),
        peer_name: cfg.node_name.clone(),
        peer_addr: addr,
        key: LinkKey::from_secret(&cfg.read_secret().unwrap()),
        io_timeout: Duration::from_secs(5),
        stats: LinkStats::default(),
        redial: tokio::sync::Notify::new(),
    }
}

pub fn meta() -> Meta {
    Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
    }
}

/// The `File` header of `body`, announced with the hash of `claimed`.
pub fn file_header(seq: u64, path: &[u8], body: &[u8], claimed: &[u8], out: &mut Vec<u8>) {
    SyncMsg::File {
        seq,
        store: 0,
        path: path.to_vec(),
        meta: meta(),
        size: body.len() as u64,
        hash: xxhash_rust::xxh3::xxh3_128(claimed),
        apart: false,
    }
    .encode(out);
}

pub fn file(seq: u64, path: &[u8], body: &[u8], out: &mut Vec<u8>) {
    file_header(seq, path, body, body, out);
    SyncMsg::Data {
        seq,
        bytes: body.to_vec(),
    }
    .encode(out);
}

/// A file whose content comes in `Bulk` frames (as the sender splices it),
/// announced with the hash of `claimed`.
fn bulk_file(seq: u64, path: &[u8], body: &[u8], claimed: &[u8], out: &mut Vec<u8>) {
    file_header(seq, path, body, claimed, out);
    for chunk in body.chunks(BULK_PAYLOAD_BYTES_MAX as usize) {
        encode_frame(Kind::Bulk, chunk, out);
    }
}

/// Heartbeats as an authenticated primary at the epoch in `epoch` (read
/// before every beat).
pub async fn beat_as_primary(cfg: &Config, epoch: Rc<Cell<u64>>) -> tokio::task::JoinHandle<()> {
    let hb_addr = cfg.link.listen;
    let hctx = ctx(cfg, hb_addr);
    // Retried: right after a kill the old process's listener may still
    // take a connection and reset it.
    let mut tries = 0;
    let conn = loop {
        let attempt = async {
            let stream = tokio_uring::net::TcpStream::connect(hb_addr).await?;
            let mut conn = Conn::new(stream, hb_addr);
            handshake(&mut conn, &hctx, Side::Initiator, Channel::Heartbeat)
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(conn)
        };
        match attempt.await {
            Ok(c) => break c,
            Err(e) if tries < 200 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("no heartbeat connection to {hb_addr}: {e}"),
        }
    };
    let (hr, hw) = conn.split();
    let node = cfg.link.peer_name.clone();
    tokio_uring::spawn(async move {
        let _keep = hr;
        for seq in 1.. {
            let hb = Message::Heartbeat(Heartbeat {
                node: node.clone(),
                role: WireRole::Primary,
                epoch: epoch.get(),
                seq,
                priority: 255,
                flags: 0,
            });
            if hw.send_bytes(hb.to_frame_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// An authenticated sync connection to `cfg`'s node (its peer's name and
/// the pair's key), `Start` sent at `epoch`: both halves.
pub async fn start_sync(
    cfg: &Config,
    epoch: u64,
) -> (hasync::link::FrameReader, hasync::link::FrameWriter) {
    let addr = cfg.replication.sync_listen;
    let stream = tokio_uring::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = Conn::new(stream, addr);
    handshake(&mut conn, &ctx(cfg, addr), Side::Initiator, Channel::Sync)
        .await
        .unwrap();
    let (r, w) = conn.split();
    let mut out = Vec::new();
    SyncMsg::Start {
        stores: vec!["inbox".into(), "quarantine".into()],
        epoch,
    }
    .encode(&mut out);
    w.send_bytes(out).await.unwrap();
    (r, w)
}

/// Waits (up to 5 s) until `node` is secondary.
pub async fn wait_secondary(node: &hasync::harness::NodeProc) {
    for _ in 0..200 {
        if node.status().is_ok_and(|s| s.mode == Role::Secondary) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(node.status().unwrap().mode, Role::Secondary);
}

/// Plays the primary against `node` (started, alone): heartbeats as an
/// authenticated primary until the daemon is secondary, then a sync
/// connection with `Start` sent. Returns the heartbeat task (abort it at
/// the end) and both halves of the sync connection.
pub async fn act_as_primary(
    node: &hasync::harness::NodeProc,
    cfg: &Config,
) -> (
    tokio::task::JoinHandle<()>,
    hasync::link::FrameReader,
    hasync::link::FrameWriter,
) {
    let beat = beat_as_primary(cfg, Rc::new(Cell::new(1))).await;
    wait_secondary(node).await;
    let (mut r, w) = start_sync(cfg, 1).await;
    // The replica says first whether it served as primary.
    let f = tokio::time::timeout(Duration::from_secs(5), r.recv_frame())
        .await
        .expect("the replica answers Start")
        .unwrap();
    assert_eq!(
        SyncMsg::decode(&f).unwrap(),
        SyncMsg::PeerState {
            former_primary: false,
            served_epoch: None,
        }
    );
    (beat, r, w)
}

/// Every reply up to the `Ack` of `seq`.
pub async fn replies_until_ack(r: &mut hasync::link::FrameReader, seq: u64) -> Vec<SyncMsg> {
    let mut replies = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), r.recv_frame())
            .await
            .expect("the daemon answers the barrier")
            .unwrap();
        let m = SyncMsg::decode(&f).unwrap();
        let done = matches!(m, SyncMsg::Ack { seq: s } if s == seq);
        replies.push(m);
        if done {
            return replies;
        }
    }
}

#[test]
fn hostile_peer_writes_nothing_outside_the_root_and_cannot_crash_the_daemon() {
    let mut tp = TestPair::new(fast());
    let base = tp.nodes[0].root.parent().unwrap().to_path_buf();
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let inbox = tp.store(0, "inbox");
    // A symlink inside the root that points outside it.
    std::os::unix::fs::symlink(&outside, inbox.join("escape")).unwrap();
    tp.nodes[0].start().unwrap();
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    let sync_addr = cfg.replication.sync_listen;

    let node = &tp.nodes[0];
    let replies = tokio_uring::start(async {
        // 1. Heartbeats as a primary make the daemon secondary.
        let beat = beat_as_primary(&cfg, Rc::new(Cell::new(1))).await;
        wait_secondary(node).await;

        // 2. The sync connection, with hostile ops.
        let sctx = ctx(&cfg, sync_addr);
        let (mut r, w) = dial(&sctx, sync_addr, Channel::Sync).await;
        let mut out = Vec::new();
        SyncMsg::Start {
            stores: vec!["inbox".into(), "quarantine".into()],
            epoch: 1,
        }
        .encode(&mut out);
        file(1, b"../../../outside/evil1", b"x", &mut out);
        file(2, b"/tmp/evil2", b"x", &mut out);
        file(3, b"escape/evil3", b"x", &mut out);
        file(4, b"a/\0/evil4", b"x", &mut out);
        file(5, &[b'a'; 300], b"x", &mut out);
        file(6, b"fine/./evil6", b"x", &mut out);
        SyncMsg::Mkdir {
            seq: 7,
            store: 0,
            path: b"escape/newdir".to_vec(),
            meta: meta(),
        }
        .encode(&mut out);
        SyncMsg::Symlink {
            seq: 8,
            store: 0,
            path: b"ok-link".to_vec(),
            target: b"/etc/passwd".to_vec(),
            meta: meta(),
        }
        .encode(&mut out);
        file(
            9,
            b"ok-link",
            b"replaces the link, never writes through it",
            &mut out,
        );
        SyncMsg::Rename {
            seq: 10,
            store: 0,
            from: b"ok-link".to_vec(),
            to: b"escape/moved".to_vec(),
        }
        .encode(&mut out);
        SyncMsg::Link {
            seq: 11,
            store: 0,
            existing: b"ok-link".to_vec(),
            path: b"escape/linked".to_vec(),
            // The content ok-link holds: the link itself is what is refused.
            hash: hasync::replica::index::hash_bytes(b"replaces the link, never writes through it"),
            meta: meta(),
        }
        .encode(&mut out);
        SyncMsg::Delete {
            seq: 12,
            store: 0,
            path: b"escape/..".to_vec(),
            unsure: true,
        }
        .encode(&mut out);
        file(13, b"fine/cur/good.msg", b"a legitimate message", &mut out);
        let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        bulk_file(14, b"fine/cur/bulk-good", &big, &big, &mut out);
        let mut tampered = big.clone();
        tampered[1_200_000] ^= 1;
        bulk_file(15, b"fine/cur/bulk-bad", &tampered, &big, &mut out);
        // A message sent, linked into another folder, then sent again
        // unchanged (its link event raced its first copy): one inode stays.
        file(16, b"fine/cur/linked", b"linked message", &mut out);
        SyncMsg::Link {
            seq: 17,
            store: 0,
            existing: b"fine/cur/linked".to_vec(),
            path: b"other/cur/linked-copy".to_vec(),
            hash: hasync::replica::index::hash_bytes(b"linked message"),
            meta: meta(),
        }
        .encode(&mut out);
        file(18, b"fine/cur/linked", b"linked message", &mut out);
        SyncMsg::Barrier { seq: 18 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();

        let replies = replies_until_ack(&mut r, 18).await;
        // 3. A corrupted frame: the daemon drops the connection.
        let mut bad = Vec::new();
        file(19, b"fine/cur/after-bad-frame", b"y", &mut bad);
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        w.send_bytes(bad).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), r.recv_frame()).await;
        assert!(
            matches!(closed, Ok(Err(_))),
            "a bad checksum must drop the connection: {closed:?}"
        );
        beat.abort();
        replies
    });

    let refused: Vec<u64> = replies
        .iter()
        .filter_map(|m| match m {
            SyncMsg::Refused { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    println!("refused seqs: {refused:?}");
    for seq in [1, 2, 4, 5, 6, 12] {
        assert!(
            refused.contains(&seq),
            "op {seq} must be refused: {replies:?}"
        );
    }
    // Through the symlink in the root: never followed, and asked for again
    // rather than refused (a primary sends such a path only when it holds a
    // folder there, which its `Mkdir` makes in place of the symlink).
    for seq in [3, 7, 10, 11] {
        assert!(
            replies.iter().any(|m| matches!(
                m,
                SyncMsg::Need { seq: s, reason: NeedReason::LocalError, .. } if *s == seq
            )) && !refused.contains(&seq),
            "op {seq} through a symlink must be asked for again: {replies:?}"
        );
    }
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "nothing may appear outside the root"
    );
    assert_eq!(
        std::fs::read(inbox.join("fine/cur/good.msg")).unwrap(),
        b"a legitimate message"
    );
    let link = std::fs::symlink_metadata(inbox.join("ok-link")).unwrap();
    assert!(
        link.is_file(),
        "the file replaced the symlink instead of writing through it"
    );
    assert!(!inbox.join("fine/cur/after-bad-frame").exists());
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    assert!(std::fs::read(inbox.join("fine/cur/bulk-good")).unwrap() == big);
    {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(inbox.join("fine/cur/linked")).unwrap();
        let b = std::fs::metadata(inbox.join("other/cur/linked-copy")).unwrap();
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), 2),
            "resending unchanged content keeps the hard link"
        );
    }
    assert!(
        !inbox.join("fine/cur/bulk-bad").exists(),
        "bulk content that does not match its hash never lands"
    );
    assert!(
        replies
            .iter()
            .any(|m| matches!(m, SyncMsg::Need { seq: 15, .. })),
        "the tampered file is asked for again: {replies:?}"
    );
    let st = tp.nodes[0].status().expect("the daemon survived");
    assert!(
        st.replication.refused_paths >= 6,
        "{}",
        st.replication.refused_paths
    );
    assert!(
        tp.nodes[0].log_shows("refused"),
        "refusals are logged with the peer and path"
    );
    assert!(tp.nodes[0].is_running());
}

#[test]
fn an_authenticated_peer_mirrors_mail_but_cannot_own_the_secondary() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut tp = TestPair::new(fast());
    let inbox = tp.store(0, "inbox");
    // What local users and the system already have on the secondary.
    let local = inbox.join("localuser");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::chown(
        &local,
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )
    .unwrap();
    let mknod = |name: &str, ft: rustix::fs::FileType, dev: u64| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            inbox.join(name),
            ft,
            rustix::fs::Mode::from_raw_mode(0o600),
            dev,
        )
        .unwrap()
    };
    mknod("fifo", rustix::fs::FileType::Fifo, 0);
    mknod(
        "chardev",
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::makedev(1, 3),
    );
    tp.nodes[0].start().unwrap();
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    let forged = "2026-12-01T00:00:00Z INFO hasync::daemon: FORGED role change";
    let node = &tp.nodes[0];
    let replies = tokio_uring::start(async {
        let (beat, mut r, w) = act_as_primary(node, &cfg).await;
        let with = |mode: u32, uid: u32| Meta {
            mode,
            uid,
            gid: uid,
            ..meta()
        };
        let mut out = Vec::new();
        let file_as = |seq: u64, path: &[u8], m: Meta, out: &mut Vec<u8>| {
            SyncMsg::File {
                seq,
                store: 0,
                path: path.to_vec(),
                meta: m,
                size: 3,
                hash: xxhash_rust::xxh3::xxh3_128(b"abc"),
                apart: false,
            }
            .encode(out);
            SyncMsg::Data {
                seq,
                bytes: b"abc".to_vec(),
            }
            .encode(out);
        };
        file_as(1, b"user/cur/setuid-root", with(0o4755, 0), &mut out);
        file_as(2, b"user/cur/world-writable", with(0o666, 1000), &mut out);
        SyncMsg::Mkdir {
            seq: 3,
            store: 0,
            path: b"shared".to_vec(),
            meta: with(0o3777, 0),
        }
        .encode(&mut out);
        file_as(4, b"user/cur/nobody", with(0o600, 4_294_967_294), &mut out);
        // Re-owning an existing local directory, loosely or plainly.
        SyncMsg::Mkdir {
            seq: 5,
            store: 0,
            path: b"localuser".to_vec(),
            meta: with(0o777, 0),
        }
        .encode(&mut out);
        SyncMsg::Mkdir {
            seq: 6,
            store: 0,
            path: b"localuser".to_vec(),
            meta: with(0o750, 0),
        }
        .encode(&mut out);
        SyncMsg::Link {
            seq: 7,
            store: 0,
            existing: b"fifo".to_vec(),
            path: b"user/cur/fifo-link".to_vec(),
            hash: 0,
            meta: meta(),
        }
        .encode(&mut out);
        SyncMsg::Rename {
            seq: 8,
            store: 0,
            from: b"chardev".to_vec(),
            to: b"user/cur/dev".to_vec(),
        }
        .encode(&mut out);
        // A name that tries to forge a log line (refused: `..`).
        file_as(
            9,
            format!("../x\n{forged}").as_bytes(),
            with(0o600, 1000),
            &mut out,
        );
        // And plain mail still lands.
        file_as(10, b"user/cur/fine", with(0o600, 1000), &mut out);
        SyncMsg::Barrier { seq: 10 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let replies = replies_until_ack(&mut r, 10).await;
        beat.abort();
        replies
    });
    let refused: Vec<u64> = replies
        .iter()
        .filter_map(|m| match m {
            SyncMsg::Refused { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    for seq in [1, 2, 3, 4, 5, 7, 8, 9] {
        assert!(
            refused.contains(&seq),
            "op {seq} must be refused: {replies:?}"
        );
    }
    assert!(
        !refused.contains(&6) && !refused.contains(&10),
        "{replies:?}"
    );
    for gone in [
        "user/cur/setuid-root",
        "user/cur/world-writable",
        "shared",
        "user/cur/nobody",
        "user/cur/fifo-link",
        "user/cur/dev",
    ] {
        assert!(
            std::fs::symlink_metadata(inbox.join(gone)).is_err(),
            "{gone} was written"
        );
    }
    let md = std::fs::metadata(&local).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (1000, 1000),
        "the local directory keeps its owner"
    );
    assert_eq!(md.mode() & 0o7777, 0o750);
    assert_eq!(std::fs::read(inbox.join("user/cur/fine")).unwrap(), b"abc");
    assert!(inbox.join("chardev").exists() && inbox.join("fifo").exists());
    let st = tp.nodes[0].status().unwrap();
    assert!(
        st.replication.refused_paths >= 8,
        "{}",
        st.replication.refused_paths
    );
    let log = tp.nodes[0].log_when(LOG_WAIT, |log| {
        log.contains("\\n2026-12-01T00:00:00Z")
            && log
                .lines()
                .any(|l| l.contains("refused op from peer") && l.contains("setuid"))
    });
    assert!(
        log.lines()
            .any(|l| l.contains("refused op from peer") && l.contains("setuid")),
        "refusals are logged with their reason\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a file name forged a log line\n{log}"
    );
    assert!(
        log.contains("\\n2026-12-01T00:00:00Z"),
        "the name is logged escaped\n{log}"
    );
}

/// A link names the version it links to (content and times): a name that
/// holds the same content in another inode with other times (a message
/// renamed over a copy of itself) is not linked to; the primary is asked
/// for the bytes instead.
#[test]
fn a_link_to_the_same_content_with_other_times_is_asked_for_again() {
    use std::os::unix::fs::MetadataExt;
    let mut tp = TestPair::new(fast());
    let inbox = tp.store(0, "inbox");
    tp.nodes[0].start().unwrap();
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    let node = &tp.nodes[0];
    let body: &[u8] = b"a message and its copy";
    let hash = hasync::replica::index::hash_bytes(body);
    let later = Meta {
        mtime_sec: meta().mtime_sec + 60,
        ..meta()
    };
    let replies = tokio_uring::start(async {
        let (beat, mut r, w) = act_as_primary(node, &cfg).await;
        let mut out = Vec::new();
        file(1, b"user/cur/copy", body, &mut out);
        // The primary's inode has the same content, a later mtime.
        SyncMsg::Link {
            seq: 2,
            store: 0,
            existing: b"user/cur/copy".to_vec(),
            path: b"user/cur/stale-link".to_vec(),
            hash,
            meta: later,
        }
        .encode(&mut out);
        // The same inode's times: linked.
        SyncMsg::Link {
            seq: 3,
            store: 0,
            existing: b"user/cur/copy".to_vec(),
            path: b"user/new/good-link".to_vec(),
            hash,
            meta: meta(),
        }
        .encode(&mut out);
        SyncMsg::Barrier { seq: 3 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let replies = replies_until_ack(&mut r, 3).await;
        beat.abort();
        replies
    });
    assert!(
        replies.iter().any(|m| matches!(
            m,
            SyncMsg::Need {
                seq: 2,
                reason: hasync::wire::sync::NeedReason::SourceMissing,
                ..
            }
        )),
        "{replies:?}"
    );
    assert!(
        !replies
            .iter()
            .any(|m| matches!(m, SyncMsg::Need { seq: 3, .. })),
        "{replies:?}"
    );
    assert!(std::fs::symlink_metadata(inbox.join("user/cur/stale-link")).is_err());
    let ino = |p: &str| std::fs::metadata(inbox.join(p)).unwrap().ino();
    assert_eq!(ino("user/new/good-link"), ino("user/cur/copy"));
}

/// A connection to `addr` after its handshake on `channel`, as the peer.
async fn dial(
    sctx: &LinkCtx,
    addr: SocketAddr,
    channel: Channel,
) -> (hasync::link::FrameReader, hasync::link::FrameWriter) {
    let stream = tokio_uring::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = Conn::new(stream, addr);
    handshake(&mut conn, sctx, Side::Initiator, channel)
        .await
        .unwrap();
    conn.split()
}

/// A node started alone, primary once its start-up wait is over: the
/// pair, its status then and its configuration.
fn lone_primary() -> (TestPair, hasync::daemon::control::Status, Config) {
    let mut tp = TestPair::new(fast());
    tp.nodes[0].start().unwrap();
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    (tp, st, cfg)
}

#[test]
fn a_pushed_message_too_big_to_hold_is_refused_without_buffering_it() {
    use hasync::wire::sync::{QueueOutcome, QueuePart};
    let (mut tp, st, cfg) = lone_primary();
    let sync_addr = cfg.replication.sync_listen;
    let size = hasync::queue::push::INGEST_MESSAGE_BYTES_MAX + 1;
    let (answer, rss_kib) = tokio_uring::start(async {
        let sctx = ctx(&cfg, sync_addr);
        let (mut r, w) = dial(&sctx, sync_addr, Channel::Queue).await;
        let mut out = Vec::new();
        SyncMsg::QueueStart {
            layout: 2,
            epoch: st.epoch,
        }
        .encode(&mut out);
        SyncMsg::QueueMsg {
            id: 1,
            sub_queue: "deferred".into(),
            queue_id: "4ABCDEF123".into(),
            key: 7,
            parts: vec![QueuePart {
                suffix: String::new(),
                meta: meta(),
                size,
                hash: 0,
            }],
        }
        .encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let chunk = vec![0x42u8; 1 << 20];
        let mut left = size;
        let mut rss = 0;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            let mut out = Vec::new();
            SyncMsg::Data {
                seq: 1,
                bytes: chunk[..n].to_vec(),
            }
            .encode(&mut out);
            w.send_bytes(out).await.unwrap();
            left -= n as u64;
            if left % (64 << 20) < (1 << 20) {
                rss = rss.max(
                    std::fs::read_to_string(format!("/proc/{}/status", st.pid))
                        .unwrap()
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                        .unwrap(),
                );
            }
        }
        let f = tokio::time::timeout(Duration::from_secs(10), r.recv_frame())
            .await
            .expect("answered")
            .unwrap();
        (SyncMsg::decode(&f).unwrap(), rss)
    });
    match answer {
        SyncMsg::QueueAck {
            id: 1,
            outcome: QueueOutcome::Refused,
            detail,
        } => assert!(detail.contains("exceeds"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(
        rss_kib < 128 * 1024,
        "the daemon buffered it: RSS {rss_kib} KiB"
    );
    assert!(tp.nodes[0].is_running());
}

/// A queue push whose pusher goes silent after its start (a hung or
/// partitioned former primary) holds the ledger, so another push is
/// refused meanwhile; after the queue connection's idle limit (30 s) the
/// node drops it, and the next push is served to its end.
#[test]
fn a_queue_push_that_goes_silent_is_dropped_and_the_next_one_is_served() {
    let (mut tp, st, cfg) = lone_primary();
    let sync_addr = cfg.replication.sync_listen;
    let idle = hasync::queue::push::QUEUE_IDLE_MIN;
    let (second, dropped_after, third) = tokio_uring::start(async {
        let sctx = ctx(&cfg, sync_addr);
        // A push's start; an error once authenticated is the node closing
        // a push it refuses (it may do so before the start is written).
        let open = || async {
            let (r, w) = dial(&sctx, sync_addr, Channel::Queue).await;
            let mut out = Vec::new();
            SyncMsg::QueueStart {
                layout: 2,
                epoch: st.epoch,
            }
            .encode(&mut out);
            w.send_bytes(out).await.map(|()| (r, w))
        };
        // An empty push: start, end, and the end's answer (or none: closed).
        let empty_push = || async {
            let (mut r, w) = open().await.ok()?;
            let mut out = Vec::new();
            SyncMsg::QueueEnd.encode(&mut out);
            w.send_bytes(out).await.ok()?;
            match tokio::time::timeout(Duration::from_secs(5), r.recv_frame()).await {
                Ok(Ok(f)) => Some(SyncMsg::decode(&f).unwrap()),
                Ok(Err(_)) => None,
                Err(_) => panic!("a push neither answered nor dropped in 5 s"),
            }
        };
        let started = std::time::Instant::now();
        let (mut silent_r, _silent_w) = open().await.expect("the first push starts");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = empty_push().await;
        // The silent push is dropped by the node (its reader ends).
        let end = tokio::time::timeout(idle * 2, silent_r.recv_frame())
            .await
            .expect("the silent push is dropped");
        assert!(end.is_err(), "{end:?}");
        let dropped_after = started.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        (second, dropped_after, empty_push().await)
    });
    assert!(
        second.is_none(),
        "served while another push held the ledger: {second:?}"
    );
    assert!(
        dropped_after >= idle && dropped_after < idle * 2,
        "dropped after {dropped_after:?}"
    );
    assert!(
        matches!(third, Some(SyncMsg::QueueEndAck { hook_ok: true })),
        "{third:?}\n{}",
        tp.logs()
    );
    assert!(tp.nodes[0].is_running());
    assert!(
        tp.logs().contains("queue push from peer ended"),
        "{}",
        tp.logs()
    );
}

/// A peer that streams files and never closes its batch with a `Barrier`
/// (5,000 files here): the replica does not hold them all staged (memory
/// and outcomes without bound); past its bound of 2,048 staged files it
/// commits what it has, so files land before any barrier. The barrier
/// that comes at last is acknowledged and every file is there.
#[test]
fn a_peer_that_sends_no_barrier_cannot_grow_the_staged_files_without_bound() {
    const FILES: u64 = 5_000;
    let mut tp = TestPair::new(fast());
    let inbox = tp.store(0, "inbox");
    tp.nodes[0].start().unwrap();
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    let node = &tp.nodes[0];
    let count = |dir: &std::path::Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let (landed_before_barrier, replies) = tokio_uring::start(async {
        let (beat, mut r, w) = act_as_primary(node, &cfg).await;
        let mut out = Vec::new();
        for seq in 1..=FILES {
            let body = format!("message {seq}\n");
            file(
                seq,
                format!("u/cur/{seq}").as_bytes(),
                body.as_bytes(),
                &mut out,
            );
            if out.len() > 256 * 1024 {
                w.send_bytes(std::mem::take(&mut out)).await.unwrap();
            }
        }
        w.send_bytes(out).await.unwrap();
        // No barrier yet: what the replica holds lands on its own.
        let cur = inbox.join("u/cur");
        let mut landed = 0;
        for _ in 0..200 {
            landed = count(&cur);
            if landed >= 2_048 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = Vec::new();
        SyncMsg::Barrier { seq: FILES }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        let replies = replies_until_ack(&mut r, FILES).await;
        beat.abort();
        (landed, replies)
    });
    assert!(
        landed_before_barrier >= 2_048,
        "only {landed_before_barrier} files landed before the barrier: the rest were held staged"
    );
    assert!(
        !replies.iter().any(|m| matches!(m, SyncMsg::Need { .. })),
        "{replies:?}"
    );
    assert_eq!(count(&inbox.join("u/cur")) as u64, FILES);
}
