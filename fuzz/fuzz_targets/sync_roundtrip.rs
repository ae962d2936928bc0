//! Every sync and queue message the decoder accepts encodes back to a frame
//! the decoder accepts, and to the same message (encode → decode round
//! trip, the property behind "the encoder never produces what the decoder
//! refuses").
#![no_main]

use hasync::wire::sync::SyncMsg;
use hasync::wire::{decode_frame, Frame, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let frame = Frame {
        kind: Kind::Sync,
        payload: payload.to_vec(),
    };
    let Ok(msg) = SyncMsg::decode(&frame) else {
        return;
    };
    let mut out = Vec::new();
    msg.encode(&mut out);
    let (f2, used) = decode_frame(&out)
        .expect("the encoder produced a frame the decoder refuses")
        .expect("one whole frame");
    assert_eq!(used, out.len());
    let back = SyncMsg::decode(&f2).expect("the encoder produced a message the decoder refuses");
    assert_eq!(back, msg);
});
