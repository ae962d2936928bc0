//! The epoch as a fencing token on the data path, against real daemons:
//! the test plays an authenticated peer whose heartbeats and sessions name
//! chosen epochs.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use hasync::config::Config;
use hasync::link::auth::Side;
use hasync::link::{handshake, Conn, FrameReader, FrameWriter};
use hasync::wire::sync::SyncMsg;
use hasync::wire::Channel;

use super::hostile::{beat_as_primary, ctx, file, replies_until_ack};
use super::util::*;

/// An authenticated connection to the daemon's sync port, `first` sent.
async fn open(cfg: &Config, channel: Channel, first: SyncMsg) -> (FrameReader, FrameWriter) {
    let addr = cfg.replication.sync_listen;
    let stream = tokio_uring::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = Conn::new(stream, addr);
    handshake(&mut conn, &ctx(cfg, addr), Side::Initiator, channel)
        .await
        .unwrap();
    let (r, w) = conn.split();
    let mut out = Vec::new();
    first.encode(&mut out);
    w.send_bytes(out).await.unwrap();
    (r, w)
}

fn start(epoch: u64) -> SyncMsg {
    SyncMsg::Start {
        stores: vec!["inbox".into(), "quarantine".into()],
        epoch,
    }
}

/// The next message, or `None` once the daemon closed the connection.
async fn next(r: &mut FrameReader) -> Option<SyncMsg> {
    match tokio::time::timeout(Duration::from_secs(10), r.recv_frame()).await {
        Ok(Ok(f)) => Some(SyncMsg::decode(&f).unwrap()),
        Ok(Err(_)) => None,
        Err(_) => panic!("the daemon neither answered nor closed within 10 s"),
    }
}

async fn wait_epoch(node: &hasync::harness::NodeProc, epoch: u64) {
    for _ in 0..200 {
        if node
            .status()
            .is_ok_and(|s| s.mode == hasync::failover::Role::Secondary && s.epoch == epoch)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never secondary at epoch {epoch}: {:?}", node.status());
}

#[test]
fn a_replica_refuses_and_cuts_sessions_from_below_the_highest_epoch_it_knows() {
    let mut tp = TestPair::new(fast());
    let inbox = tp.store(0, "inbox");
    tp.nodes[0].start().unwrap();
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    let state_dir = tp.nodes[0].state_dir.clone();
    let epoch = Rc::new(Cell::new(5));
    tokio_uring::start(async {
        let node = &tp.nodes[0];
        let beat = beat_as_primary(&cfg, epoch.clone()).await;
        wait_epoch(node, 5).await;

        // A session from epoch 4 (a primary deposed without knowing it):
        // told why, closed, and nothing it sends lands.
        let (mut r, w) = open(&cfg, Channel::Sync, start(4)).await;
        let mut out = Vec::new();
        file(1, b"stale-a", b"from a deposed primary", &mut out);
        SyncMsg::Barrier { seq: 1 }.encode(&mut out);
        let _ = w.send_bytes(out).await;
        assert_eq!(next(&mut r).await, Some(SyncMsg::Fenced { seen: 5 }));
        assert_eq!(next(&mut r).await, None, "closed after Fenced");
        assert!(!inbox.join("stale-a").exists());

        // The current epoch is admitted and its files land.
        let (mut r, w) = open(&cfg, Channel::Sync, start(5)).await;
        assert!(matches!(
            next(&mut r).await,
            Some(SyncMsg::PeerState { .. })
        ));
        let mut out = Vec::new();
        file(1, b"fresh-b", b"from the primary", &mut out);
        SyncMsg::Barrier { seq: 1 }.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        replies_until_ack(&mut r, 1).await;
        assert!(inbox.join("fresh-b").exists());

        // The node learns of epoch 7 (its record): the session from 5 is
        // cut while it is open.
        epoch.set(7);
        wait_epoch(node, 7).await;
        let cut = async {
            loop {
                match r.recv_frame().await {
                    Ok(_) => continue,
                    Err(_) => return,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), cut)
            .await
            .expect("the session from epoch 5 is cut once epoch 7 is durable");
        let (mut r, _w) = open(&cfg, Channel::Sync, start(6)).await;
        assert_eq!(next(&mut r).await, Some(SyncMsg::Fenced { seen: 7 }));

        // A session from a newer epoch than the heartbeats say (a newer
        // primary) is admitted, and its epoch is kept durably.
        let (mut r, _w) = open(&cfg, Channel::Sync, start(9)).await;
        assert!(matches!(
            next(&mut r).await,
            Some(SyncMsg::PeerState { .. })
        ));
        let fence = std::fs::read_to_string(state_dir.join("fence")).unwrap();
        assert_eq!(fence, "hasync-fence 1\n9\n");
        beat.abort();
    });

    // Restarted, it still refuses epoch 8 (the record says 7, the fence 9).
    tp.nodes[0].kill9().unwrap();
    tp.nodes[0].start().unwrap();
    tokio_uring::start(async {
        let beat = beat_as_primary(&cfg, epoch.clone()).await;
        wait_epoch(&tp.nodes[0], 7).await;
        let (mut r, _w) = open(&cfg, Channel::Sync, start(8)).await;
        assert_eq!(next(&mut r).await, Some(SyncMsg::Fenced { seen: 9 }));
        beat.abort();
    });
    assert!(tp.nodes[0].is_running());
    let log = tp.logs_when(|l| l.contains("epoch 4 refused") && l.contains("is below 7"));
    assert!(log.contains("epoch 4 refused"), "{log}");
    assert!(log.contains("is below 7"), "{log}");
}

#[test]
fn a_queue_push_addressed_to_another_tenure_is_refused() {
    let mut tp = TestPair::new(fast());
    tp.nodes[0].start().unwrap();
    let st = tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == hasync::failover::Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    tokio_uring::start(async {
        for addressed in [st.epoch - 1, st.epoch + 1] {
            let (mut r, _w) = open(
                &cfg,
                Channel::Queue,
                SyncMsg::QueueStart {
                    layout: 2,
                    epoch: addressed,
                },
            )
            .await;
            assert_eq!(
                next(&mut r).await,
                Some(SyncMsg::Fenced { seen: st.epoch }),
                "addressed to {addressed}"
            );
            assert_eq!(next(&mut r).await, None);
        }
        // Addressed to this tenure, an empty push is served to its end.
        let (mut r, w) = open(
            &cfg,
            Channel::Queue,
            SyncMsg::QueueStart {
                layout: 2,
                epoch: st.epoch,
            },
        )
        .await;
        let mut out = Vec::new();
        SyncMsg::QueueEnd.encode(&mut out);
        w.send_bytes(out).await.unwrap();
        assert!(matches!(
            next(&mut r).await,
            Some(SyncMsg::QueueEndAck { .. })
        ));
    });
    let refused = format!(
        "addressed to the primary of epoch {}, but the receiving node serves epoch {}",
        st.epoch + 1,
        st.epoch
    );
    let log = tp.logs_when(|l| l.contains(&refused));
    assert!(log.contains(&refused), "{log}");
}
