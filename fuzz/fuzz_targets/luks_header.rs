//! The LUKS1 header parser on arbitrary bytes (a crafted volume, a qcow2 image's crypto
//! header): never a panic; what parses serializes back to the same header, and unlocking a
//! slot of it with any material stays within bounds.

#![no_main]

use crypto::luks::{Header, SLOTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::parse(data) else {
        return;
    };
    let again = Header::parse(&header.serialize()).expect("a parsed header parses again");
    assert_eq!(again, header);
    let _ = header.header_area_len();
    // Cheap PBKDF2 only: the fuzzer chooses the iteration counts.
    if header.mk_digest_iter > 64 {
        return;
    }
    for slot in 0..SLOTS {
        if header.slots[slot].active && header.slots[slot].iterations <= 64 {
            let (_, len) = header.material_range(slot);
            let material = vec![0x5a; len];
            let _ = header.try_slot(slot, b"password", &material);
        }
    }
});
