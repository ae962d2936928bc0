//! The epoch record parser: a record or an error naming the file; and the
//! data path's fence file (the highest epoch a session brought).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("/var/lib/hasync/epoch.json");
    if let Err(e) = hasync::daemon::state::parse(path, data) {
        assert!(e.to_string().contains("epoch.json"));
    }
    // Never panics; an epoch it accepts is written back the same way.
    if let Ok(epoch) = hasync::replica::fence::parse(data) {
        let again = format!("hasync-fence 1\n{epoch}\n");
        assert_eq!(hasync::replica::fence::parse(again.as_bytes()), Ok(epoch));
    }
});
