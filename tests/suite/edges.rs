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
