use proptest::prelude::*;

use super::*;
use crate::failover::{Heartbeat, Role};

fn hb() -> Message {
    Message::Heartbeat(Heartbeat {
        node: "mx1".into(),
        role: Role::Primary,
        epoch: 7,
        seq: 42,
        priority: 100,
        flags: 1,
    })
}

#[test]
fn heartbeat_round_trips() {
    let bytes = hb().to_frame_bytes();
    let (frame, used) = decode_frame(&bytes).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(Message::decode(&frame).unwrap(), hb());
}

#[test]
fn partial_frames_ask_for_more() {
    let bytes = hb().to_frame_bytes();
    for cut in 0..bytes.len() {
        assert_eq!(decode_frame(&bytes[..cut]), Ok(None), "cut at {cut}");
    }
}

#[test]
fn corrupted_byte_is_refused_by_checksum() {
    let mut bytes = hb().to_frame_bytes();
    bytes[HEADER_LEN + 3] ^= 0x40;
    assert!(matches!(
        decode_frame(&bytes),
        Err(WireError::BadChecksum {
            kind: Kind::Heartbeat,
            ..
        })
    ));
}

#[test]
fn unknown_version_and_kind_are_refused() {
    let mut bytes = hb().to_frame_bytes();
    bytes[2] = VERSION + 1;
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::UnsupportedVersion { got: VERSION + 1 })
    );
    let mut bytes = hb().to_frame_bytes();
    bytes[3] = 200;
    assert_eq!(decode_frame(&bytes), Err(WireError::UnknownKind(200)));
    assert_eq!(
        decode_frame(b"GET / HTTP/1.1"),
        Err(WireError::BadMagic(*b"GE"))
    );
}

#[test]
fn over_long_length_is_refused_before_the_payload_arrives() {
    // Only a header: the length alone must be refused, nothing allocated.
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC);
    header.push(VERSION);
    header.push(Kind::Heartbeat as u8);
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        decode_frame(&header),
        Err(WireError::TooLong {
            kind: Kind::Heartbeat,
            len: u32::MAX,
            max: CONTROL_PAYLOAD_BYTES_MAX
        })
    );
}

#[test]
fn trailing_bytes_in_payload_are_refused() {
    let mut w = Writer::new();
    w.u8(Role::Primary.code())
        .u8(1)
        .u8(0)
        .u64(1)
        .u64(1)
        .short_str("mx1")
        .u8(0xff);
    let mut bytes = Vec::new();
    encode_frame(Kind::Heartbeat, &w.finish(), &mut bytes);
    let (frame, _) = decode_frame(&bytes).unwrap().unwrap();
    assert_eq!(
        Message::decode(&frame),
        Err(WireError::TrailingBytes {
            kind: Kind::Heartbeat,
            extra: 1
        })
    );
}

#[test]
fn unknown_role_code_is_refused() {
    let mut w = Writer::new();
    w.u8(99).u8(1).u8(0).u64(1).u64(1).short_str("mx1");
    let mut bytes = Vec::new();
    encode_frame(Kind::Heartbeat, &w.finish(), &mut bytes);
    let (frame, _) = decode_frame(&bytes).unwrap().unwrap();
    assert!(matches!(
        Message::decode(&frame),
        Err(WireError::BadField {
            field: "heartbeat.role",
            ..
        })
    ));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(Some((frame, used))) = decode_frame(&data) {
            prop_assert!(used <= data.len());
            let _ = Message::decode(&frame);
        }
    }

    #[test]
    fn heartbeat_round_trips_with_any_valid_name(
        node in "[A-Za-z0-9._-]{1,64}",
        role in 0u8..4,
        priority in any::<u8>(),
        flags in any::<u8>(),
        epoch in any::<u64>(),
        seq in any::<u64>(),
    ) {
        let msg = Message::Heartbeat(Heartbeat {
            node,
            role: Role::from_code(role).unwrap_or(Role::Secondary),
            epoch,
            seq,
            priority,
            flags,
        });
        let bytes = msg.to_frame_bytes();
        let (frame, _) = decode_frame_under(&bytes, FramePolicy::Control).unwrap().unwrap();
        prop_assert_eq!(Message::decode(&frame).unwrap(), msg);
    }

    #[test]
    fn node_names_outside_the_config_charset_are_refused(node in "[^A-Za-z0-9._-]{1,8}") {
        let msg = Message::Hello(Hello { channel: Channel::Sync, node, nonce: [0; 32] });
        let bytes = msg.to_frame_bytes();
        if let Ok(Some((frame, _))) = decode_frame_under(&bytes, FramePolicy::Handshake) {
            prop_assert!(Message::decode(&frame).is_err());
        }
    }

    #[test]
    fn before_authentication_only_small_handshake_frames_are_read(
        kind in prop_oneof![Just(Kind::Heartbeat), Just(Kind::Sync), Just(Kind::Bulk)],
        len in any::<u32>(),
    ) {
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.push(VERSION);
        header.push(kind as u8);
        header.extend_from_slice(&len.to_le_bytes());
        let refused = matches!(
            decode_frame_under(&header, FramePolicy::Handshake),
            Err(WireError::NotAccepted { .. })
        );
        prop_assert!(refused);
        let mut hello = header.clone();
        hello[3] = Kind::Hello as u8;
        let res = decode_frame_under(&hello, FramePolicy::Handshake);
        if len > HANDSHAKE_PAYLOAD_BYTES_MAX {
            let too_long = matches!(res, Err(WireError::TooLong { .. }));
            prop_assert!(too_long, "{:?}", res);
        }
    }

    #[test]
    fn hello_round_trips(node in "[a-z0-9.-]{1,64}", nonce in any::<[u8; 32]>(), sync in any::<bool>()) {
        let msg = Message::Hello(Hello {
            channel: if sync { Channel::Sync } else { Channel::Heartbeat },
            node,
            nonce,
        });
        let bytes = msg.to_frame_bytes();
        let (frame, _) = decode_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(Message::decode(&frame).unwrap(), msg);
    }
}

#[test]
fn bulk_frame_round_trips_and_asks_for_more_until_complete() {
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut bytes = Vec::new();
    encode_frame(Kind::Bulk, &payload, &mut bytes);
    assert_eq!(bytes.len(), BULK_HEADER_LEN + payload.len());
    assert_eq!(&bytes[..BULK_HEADER_LEN], &bulk_header(5000));
    for cut in [0, 7, 8, 15, 16, 4000, bytes.len() - 1] {
        assert_eq!(decode_frame(&bytes[..cut]), Ok(None), "cut at {cut}");
    }
    // A frame after it is left alone.
    bytes.extend_from_slice(&hb().to_frame_bytes());
    let (frame, used) = decode_frame(&bytes).unwrap().unwrap();
    assert_eq!(used, BULK_HEADER_LEN + payload.len());
    assert_eq!(frame.kind, Kind::Bulk);
    assert_eq!(frame.payload, payload);
    let (next, _) = decode_frame(&bytes[used..]).unwrap().unwrap();
    assert_eq!(Message::decode(&next).unwrap(), hb());
}

#[test]
fn bulk_header_corruption_and_over_long_length_are_refused() {
    let mut h = bulk_header(100).to_vec();
    h[5] ^= 1; // length changed: the header checksum no longer matches
    assert!(matches!(
        decode_frame(&h),
        Err(WireError::BadChecksum {
            kind: Kind::Bulk,
            ..
        })
    ));
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC);
    h.push(VERSION);
    h.push(Kind::Bulk as u8);
    h.extend_from_slice(&(BULK_PAYLOAD_BYTES_MAX + 1).to_le_bytes());
    assert_eq!(
        decode_frame(&h),
        Err(WireError::TooLong {
            kind: Kind::Bulk,
            len: BULK_PAYLOAD_BYTES_MAX + 1,
            max: BULK_PAYLOAD_BYTES_MAX
        })
    );
    // Not a message: the heartbeat connection refuses it.
    let mut bytes = Vec::new();
    encode_frame(Kind::Bulk, b"abc", &mut bytes);
    let (frame, _) = decode_frame(&bytes).unwrap().unwrap();
    assert!(Message::decode(&frame).is_err());
}
