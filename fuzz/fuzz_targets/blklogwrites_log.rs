//! Feeds arbitrary bytes, as a whole log file, to the walk blklogwrites makes over an
//! existing log before appending to it (`log-append`): never a panic, and every entry the
//! super block counts lies inside the file (an empty log's first entry goes at sector 1,
//! which a short file need not hold yet).
#![no_main]

use block::BlkLogWalk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(28)];
    let Ok(mut walk) = BlkLogWalk::new(head, data.len() as u64) else {
        return;
    };
    loop {
        let at = match walk.next_header() {
            Ok(Some(at)) => at as usize,
            Ok(None) => break,
            Err(_) => return,
        };
        let header = &data[at..(at + 32).min(data.len())];
        if walk.take(header).is_err() {
            return;
        }
    }
    assert!(walk.entries == 0 || walk.next * walk.sector <= data.len() as u64);
});
