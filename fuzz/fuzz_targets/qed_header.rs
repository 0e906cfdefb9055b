//! Feeds arbitrary bytes to the qed header checks, as a header comes from an untrusted
//! image: never a panic or an overflow, and a header that passes has tables blockd can
//! size and a disk its tables cover.
#![no_main]

use block::QedHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = QedHeader::parse(data) {
        assert!(h.cluster_size.is_power_of_two() && h.table_size <= 16);
        let entries = h.table_size * h.cluster_size / 8;
        assert!(h.image_size <= entries.saturating_mul(entries).saturating_mul(h.cluster_size));
        if let Some((offset, len)) = h.backing {
            assert!(offset + len <= h.header_size * h.cluster_size);
        }
    }
});
