//! Feeds arbitrary bytes to `block::QcowHeader::parse`, as a version 1 qcow image's first
//! 48 bytes are untrusted: never a panic, and what parses keeps the promises the driver
//! relies on (table sizes that cannot overflow).
#![no_main]

use block::QcowHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = QcowHeader::parse(data) else {
        return;
    };
    assert!((9..=16).contains(&header.cluster_bits));
    assert!(header.l1_size * 8 <= i32::MAX as u64);
    assert!(header.size > 1);
    if let Some((_, len)) = header.backing {
        assert!(len <= 1023);
    }
    let _ = format!("{header:?}");
});
