//! The epoch record parser: a record or an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("/var/lib/hasync/epoch.json");
    if let Err(e) = hasync::daemon::state::parse(path, data) {
        assert!(e.to_string().contains("epoch.json"));
    }
});
