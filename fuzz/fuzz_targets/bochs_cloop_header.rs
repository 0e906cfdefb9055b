//! Feeds arbitrary bytes to the bochs and cloop header checks, as both come from an
//! untrusted image: never a panic or an overflow, and what passes has tables blockd can
//! size.
#![no_main]

use block::{BochsHeader, CloopHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = BochsHeader::parse(data) {
        assert!(h.extent.is_power_of_two() && h.catalog <= 1 << 24);
        assert!(h.disk.div_ceil(h.extent) <= h.catalog);
    }
    if let Ok(h) = CloopHeader::parse(data) {
        assert!(h.block_size > 0 && (h.blocks + 1) * 8 <= 512 << 20);
    }
});
