//! Arbitrary bytes from the network: the frame decoder under every
//! connection state, then every message decoder on whatever frame it
//! accepts. Nothing may panic; whatever decodes must re-encode to a frame
//! that decodes to the same message.
#![no_main]

use hasync::wire::sync::SyncMsg;
use hasync::wire::{decode_frame_under, FramePolicy, Kind, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for policy in [
        FramePolicy::Handshake,
        FramePolicy::Control,
        FramePolicy::Sync,
    ] {
        let mut at = 0;
        while let Ok(Some((frame, used))) = decode_frame_under(&data[at..], policy) {
            assert!(used > 0 && at + used <= data.len());
            at += used;
            match frame.kind {
                Kind::Hello | Kind::Proof | Kind::Heartbeat => {
                    if let Ok(m) = Message::decode(&frame) {
                        let bytes = m.to_frame_bytes();
                        let (f2, _) = decode_frame_under(&bytes, policy)
                            .expect("re-encoded frame decodes")
                            .expect("whole frame");
                        assert_eq!(Message::decode(&f2).expect("re-encoded message decodes"), m);
                    }
                }
                Kind::Sync => {
                    let _ = SyncMsg::data_view(&frame);
                    let _ = SyncMsg::decode(&frame);
                }
                Kind::Bulk => {}
            }
        }
    }
});
