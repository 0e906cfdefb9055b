//! Feeds arbitrary bytes to the vmdk sparse and seSparse header, footer and descriptor
//! checks, as all come from an untrusted image: never a panic or an overflow, and a
//! header that passes gives a grain directory of a size blockd may read.
#![no_main]

use block::{
    vmdk_footer_header, vmdk_sesparse_check_volatile, VmdkDescriptor, VmdkSeSparseHeader,
    VmdkSparseHeader,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(Ok(h)) = VmdkSparseHeader::parse(data) {
        assert!(h.gd_entries() <= 32 << 20);
        assert!(h.capacity.checked_mul(512).is_some());
        assert!(h.grain_bytes() > 0);
    }
    if let Ok(h) = VmdkSeSparseHeader::parse(data) {
        assert!(h.capacity.checked_mul(512).is_some());
    }
    let _ = vmdk_sesparse_check_volatile(data);
    if data.len() >= 1536 {
        let _ = vmdk_footer_header(&data[data.len() - 1536..]);
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = VmdkDescriptor::parse_file(&text) {
        let total: u64 = d.extents.iter().map(|e| e.sectors).sum();
        assert!(total.checked_mul(512).is_some());
    }
    let _ = VmdkDescriptor::parse(&text, false);
});
