//! Feeds arbitrary bytes to the vhdx header, region table, metadata and log checks, as
//! all come from an untrusted image: never a panic or an overflow, and metadata that
//! passes gives a BAT whose size and indexes (sector bitmaps too) stay in range; and to
//! the parent locator parser.
#![no_main]

use block::vhdx_format::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, rest) = data.split_at(data.len().min(HEADER_LEN));
    let _ = current_header(head, head);
    let _ = parse_regions(rest);
    if let Ok(m) = parse_metadata(rest, |offset, len| {
        let end = (offset as usize).checked_add(len)?;
        rest.get(offset as usize..end).map(<[u8]>::to_vec)
    }) {
        let entries = m.bat_entries();
        let blocks = m.payload_blocks();
        if blocks > 0 {
            assert!((m.bat_index(blocks - 1) as u64) < entries);
            if m.parent.is_some() {
                assert!((m.bitmap_index(blocks - 1) as u64) < entries);
            }
        }
    }
    if let Ok(locator) = ParentLocator::parse(data) {
        let _ = locator.path();
    }
    let _ = active_sequence(&data[..data.len() / 4096 * 4096], &[0; 16]);
});
