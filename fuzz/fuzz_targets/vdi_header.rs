//! Feeds arbitrary bytes to `block::VdiHeader::parse`, as a vdi image's first 512 bytes are
//! untrusted: never a panic, and what parses keeps the promises the driver relies on.
#![no_main]

use block::VdiHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = VdiHeader::parse(data) else {
        return;
    };
    assert!(header.blocks_allocated <= header.blocks_in_image);
    assert!(header.disk_size <= header.blocks_in_image as u64 * (1 << 20));
    assert_eq!(header.offset_bmap % 512, 0);
    assert_eq!(header.offset_data % 512, 0);
    let _ = format!("{header:?}");
});
