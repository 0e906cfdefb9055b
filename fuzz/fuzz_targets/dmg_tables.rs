//! Feeds arbitrary bytes to the dmg trailer and chunk-table parsers as a whole image:
//! never a panic or an overflow, and what passes has chunks blockd can decompress.
#![no_main]

use block::dmg_parse_image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((trailer, chunks)) = dmg_parse_image(data) {
        assert!(trailer.sectors <= i64::MAX as u64 / 512);
        assert!(chunks.windows(2).all(|w| w[0].sector <= w[1].sector));
        assert!(chunks.iter().all(|c| c.length <= 64 << 20));
    }
});
