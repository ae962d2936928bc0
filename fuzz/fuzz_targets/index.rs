//! The index file parser on arbitrary contents (past its checksum too, so
//! that the entry decoder itself is exercised): entries or an error naming
//! the file, never a panic or an allocation the file cannot back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("/var/lib/hasync/index-inbox.bin");
    let _ = hasync::replica::index::check_bytes(path, data);
    // The same bytes as a well-sealed file.
    if data.len() >= 16 {
        // Either format (1: count in the header; 2: count after the entries).
        let version: &[u8] = if data[0] & 1 == 0 { b"\x01" } else { b"\x02" };
        let mut sealed = b"HSIX".to_vec();
        sealed.extend_from_slice(version);
        sealed.extend_from_slice(b"\x00\x00\x00");
        sealed.extend_from_slice(&data[8..]);
        let sum = xxh3(&sealed);
        sealed.extend_from_slice(&sum.to_le_bytes());
        if let Err(e) = hasync::replica::index::check_bytes(path, &sealed) {
            assert!(e.to_string().contains("index-inbox.bin"));
        }
    }
});

fn xxh3(b: &[u8]) -> u64 {
    hasync::replica::index::checksum(b)
}
