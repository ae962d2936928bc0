//! The queue ledger parser on arbitrary file contents: records or an error
//! naming the file and line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("/var/lib/hasync/queue-ledger.log");
    if let Err(e) = hasync::queue::ledger::check_bytes(path, data) {
        assert!(e.to_string().contains("queue-ledger.log"));
    }
});
