//! Feeds arbitrary bytes to `block::Qcow2Header::parse`, as an image file's first 64 KiB are untrusted, then calls every method that computes from the parsed fields (crafted values may overflow there).
#![no_main]

use block::Qcow2Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Qcow2Header::parse(data) else {
        return;
    };
    // What the parser promises about a successful result.
    assert!((2..=3).contains(&header.version));
    assert!((9..=21).contains(&header.cluster_bits));
    if let Some(name) = &header.backing_file {
        assert!(
            name.len() <= 3 * 1023,
            "backing name longer than the 1023 bytes allowed"
        );
    }
    if let Some((offset, len)) = header.backing_file_span {
        assert!(offset <= header.cluster_size() && len <= 1023);
    }

    let _ = header.cluster_size();
    let _ = header.check_supported();
    let _ = header.is_dirty();
    let _ = header.consistent_bitmaps();
    let specific = header.format_specific();
    let _ = specific.to_string();
    let _ = format!("{header:?}");
    assert_eq!(header.clone(), header);
});
