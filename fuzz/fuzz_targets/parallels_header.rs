//! Feeds arbitrary bytes to the parallels header checks, as a header comes from an
//! untrusted image: never a panic or an overflow, and a header that passes has a BAT
//! that covers its disk.
#![no_main]

use block::ParallelsHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ParallelsHeader::parse(data) {
        assert!(h.cluster_size >= 512);
        assert!(h.sectors * 512 <= h.bat_entries * h.cluster_size);
    }
});
