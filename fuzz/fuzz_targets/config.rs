//! The configuration loader (everything short of the filesystem checks) on
//! arbitrary text: a config or an error naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = std::path::Path::new("/etc/hasync/hasync.toml");
    if let Err(e) = hasync::config::Config::parse(&text, path) {
        assert!(e.to_string().contains("hasync.toml"), "{e}");
    }
});
