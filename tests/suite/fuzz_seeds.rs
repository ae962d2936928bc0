//! Writes the fuzzers' seed corpus (`fuzz/corpus/<target>/`) from the real
//! encoders, so the seeds follow the formats. Run after a format change:
//! `cargo test --test tests write_fuzz_seeds -- --ignored`.

use std::path::{Path, PathBuf};

use hasync::failover::{Heartbeat, Role};
use hasync::wire::sync::{
    EntryKind, ManifestEntry, Meta, NeedReason, QueueOutcome, QueuePart, SyncMsg,
};
use hasync::wire::{encode_frame, Channel, Hello, Kind, Message, Proof};

fn corpus(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).unwrap();
}

fn sync_samples() -> Vec<(&'static str, SyncMsg)> {
    let meta = Meta {
        mode: 0o600,
        uid: 5000,
        gid: 5000,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123,
    };
    vec![
        (
            "start",
            SyncMsg::Start {
                stores: vec!["inbox".into(), "queue".into()],
                epoch: 3,
            },
        ),
        (
            "peer-state",
            SyncMsg::PeerState {
                former_primary: true,
                served_epoch: Some(2),
            },
        ),
        (
            "manifest-request",
            SyncMsg::ManifestRequest {
                id: 1,
                full_verify: true,
            },
        ),
        (
            "file",
            SyncMsg::File {
                seq: 1,
                store: 0,
                path: b"u/cur/1:2,S".to_vec(),
                meta,
                size: 5,
                hash: 42,
                apart: false,
            },
        ),
        (
            "file-apart",
            SyncMsg::File {
                seq: 2,
                store: 0,
                path: b"v/cur/1:2,S".to_vec(),
                meta,
                size: 5,
                hash: 42,
                apart: true,
            },
        ),
        (
            "data",
            SyncMsg::Data {
                seq: 1,
                bytes: b"hello".to_vec(),
            },
        ),
        (
            "mkdir",
            SyncMsg::Mkdir {
                seq: 2,
                store: 0,
                path: b"u/.Sent".to_vec(),
                meta,
            },
        ),
        (
            "delete",
            SyncMsg::Delete {
                seq: 3,
                store: 0,
                path: b"u/new/x".to_vec(),
                unsure: false,
            },
        ),
        (
            "rename",
            SyncMsg::Rename {
                seq: 4,
                store: 0,
                from: b"u/new/x".to_vec(),
                to: b"u/cur/x:2,S".to_vec(),
            },
        ),
        (
            "link",
            SyncMsg::Link {
                seq: 5,
                store: 1,
                existing: b"a".to_vec(),
                path: b"b".to_vec(),
                hash: 9,
                meta,
            },
        ),
        (
            "symlink",
            SyncMsg::Symlink {
                seq: 6,
                store: 0,
                path: b"l".to_vec(),
                target: b"../t".to_vec(),
                meta,
            },
        ),
        ("barrier", SyncMsg::Barrier { seq: 6 }),
        ("caught-up", SyncMsg::CaughtUp),
        (
            "manifest",
            SyncMsg::Manifest {
                id: 1,
                store: 0,
                entries: vec![ManifestEntry {
                    path: b"u/cur/1".to_vec(),
                    kind: EntryKind::File,
                    size: 5,
                    meta,
                    hash: 9,
                    link: 0,
                }],
                last: true,
            },
        ),
        ("ack", SyncMsg::Ack { seq: 6 }),
        (
            "need",
            SyncMsg::Need {
                seq: 1,
                store: 0,
                path: b"u/cur/1".to_vec(),
                reason: NeedReason::NoSpace,
            },
        ),
        (
            "refused",
            SyncMsg::Refused {
                seq: 1,
                store: 0,
                path: b"../x".to_vec(),
                why: "traversal \u{20ac}".into(),
            },
        ),
        (
            "queue-start",
            SyncMsg::QueueStart {
                layout: 1,
                epoch: 2,
            },
        ),
        ("fenced", SyncMsg::Fenced { seen: 9 }),
        (
            "conflict-file",
            SyncMsg::ConflictFile {
                id: 4,
                store: 0,
                path: b"u/cur/2:2,S".to_vec(),
                meta,
                size: 5,
                hash: 43,
                kept_at: 1_700_000_100,
            },
        ),
        ("conflict-ack", SyncMsg::ConflictAck { id: 4 }),
        (
            "conflict-refused",
            SyncMsg::ConflictRefused {
                id: 5,
                why: "cannot keep u/cur/2:2,S: No space left on device (os error 28)".into(),
            },
        ),
        (
            "queue-msg",
            SyncMsg::QueueMsg {
                id: 1,
                sub_queue: "deferred".into(),
                queue_id: "4ABCDEF123".into(),
                key: 7,
                parts: vec![QueuePart {
                    suffix: String::new(),
                    meta,
                    size: 10,
                    hash: 3,
                }],
            },
        ),
        (
            "queue-ack",
            SyncMsg::QueueAck {
                id: 1,
                outcome: QueueOutcome::Duplicate,
                detail: "seen".into(),
            },
        ),
        ("queue-end", SyncMsg::QueueEnd),
        ("queue-end-ack", SyncMsg::QueueEndAck { hook_ok: true }),
    ]
}

#[test]
#[ignore = "writes the fuzz seed corpus; run by hand after a format change"]
fn write_fuzz_seeds() {
    // Frames, as they arrive on a socket.
    let control = [
        (
            "hello",
            Message::Hello(Hello {
                channel: Channel::Sync,
                node: "mx1".into(),
                nonce: [7; 32],
            }),
        ),
        ("proof", Message::Proof(Proof { mac: [9; 32] })),
        (
            "heartbeat",
            Message::Heartbeat(Heartbeat {
                node: "mx2".into(),
                role: Role::Primary,
                epoch: 3,
                seq: 10,
                priority: 100,
                flags: 0,
            }),
        ),
    ];
    for (name, m) in &control {
        put("frame", name, &m.to_frame_bytes());
    }
    let mut stream = Vec::new();
    for (name, m) in sync_samples() {
        let mut f = Vec::new();
        m.encode(&mut f);
        put("frame", &format!("sync-{name}"), &f);
        stream.extend_from_slice(&f);
        // The payload alone, for the round-trip target.
        put("sync_roundtrip", name, &f[8..f.len() - 8]);
    }
    encode_frame(Kind::Bulk, b"raw file content", &mut stream);
    put("frame", "stream", &stream);

    // On-disk files, written by the real code.
    let dir = tempfile::tempdir().unwrap();
    let lpath = dir.path().join("ledger");
    let mut l =
        hasync::queue::ledger::Ledger::open(&lpath, 1000, std::time::Duration::from_secs(3600))
            .unwrap();
    let moves = vec![(
        PathBuf::from("/q/.hasync/staging/1"),
        PathBuf::from("/q/deferred/A/ABC123"),
    )];
    l.record_intent(1, "ABC123", &moves).unwrap();
    l.record_intent(2, "DEF456", &moves).unwrap();
    l.record_done(&[1]).unwrap();
    drop(l);
    put(
        "ledger",
        "two-intents-one-done",
        &std::fs::read(&lpath).unwrap(),
    );

    let mut ix = hasync::replica::index::Index::load(dir.path(), "inbox");
    let st = hasync::replica::index::Stat {
        kind: hasync::replica::index::Kind::File,
        version: hasync::replica::index::Version {
            size: 5,
            mtime_s: 1,
            mtime_ns: 2,
            ino: 3,
            ctime_s: 4,
            ctime_ns: 5,
        },
        meta: Meta {
            mode: 0o600,
            uid: 1,
            gid: 2,
            mtime_sec: 1,
            mtime_nsec: 2,
        },
        nlink: 1,
        dev: 1,
    };
    ix.set(
        PathBuf::from("u/cur/1:2,S"),
        hasync::replica::index::Entry::new(&st, 99, true),
    );
    ix.set(
        PathBuf::from("u/cur/2"),
        hasync::replica::index::Entry::new(&st, 98, false),
    );
    ix.save().unwrap();
    put(
        "index",
        "two-entries",
        &std::fs::read(dir.path().join("index-inbox.bin")).unwrap(),
    );

    put("epoch", "record", br#"{"epoch":7,"held_primary":7}"#);
    put("epoch", "fresh", br#"{"epoch":0,"held_primary":null}"#);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hasync.example.toml");
    put("config", "example", &std::fs::read(example).unwrap());
}
