//! Feeds arbitrary bytes to the vpc (VHD) footer and dynamic header checks, as both come
//! from an untrusted image: never a panic or an overflow, and what passes covers the disk.
#![no_main]

use block::{vpc_footer_size, VpcDynamicHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (footer, header) = data.split_at(data.len().min(512));
    let sectors = match vpc_footer_size(footer) {
        Ok(sectors) => sectors,
        // A dynamic header is checked against any size too.
        Err(_) => u64::from_le_bytes(footer.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8])) >> 20,
    };
    if let Ok(h) = VpcDynamicHeader::parse(header, sectors) {
        assert!(h.block_size.is_power_of_two() && h.block_size >= 512);
        assert!(h.entries * h.block_size >= sectors * 512);
    }
});
