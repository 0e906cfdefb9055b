//! A reader of dm-log-writes logs (what the blklogwrites driver writes), written from the
//! layout, independently of the driver, and the replay of a log onto an image.

const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const FLUSH: u64 = 1;
pub const DISCARD: u64 = 4;

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// One logged request: its byte range in the image, its flags, and where its data sits in
/// the log file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub offset: u64,
    pub len: u64,
    pub flags: u64,
    pub data: std::ops::Range<usize>,
}

impl Entry {
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0
    }
}

pub struct Log {
    pub bytes: Vec<u8>,
    pub entries: Vec<Entry>,
}

impl Log {
    pub fn read(path: &str) -> Log {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(le64(&bytes, 0), MAGIC, "log super block magic");
        assert_eq!(le64(&bytes, 8), 1, "log version");
        let count = le64(&bytes, 16) as usize;
        let sector = u32::from_le_bytes(bytes[24..28].try_into().unwrap()) as usize;
        let mut entries = Vec::with_capacity(count);
        let mut at = sector;
        for _ in 0..count {
            let (first, sectors, flags) = (
                le64(&bytes, at),
                le64(&bytes, at + 8),
                le64(&bytes, at + 16),
            );
            let data_len = if flags & (FLUSH | DISCARD) != 0 {
                0
            } else {
                sectors as usize * sector
            };
            let data = at + sector..at + sector + data_len;
            assert!(data.end <= bytes.len(), "log entry past the end of the log");
            entries.push(Entry {
                offset: first * sector as u64,
                len: sectors * sector as u64,
                flags,
                data: data.clone(),
            });
            at = data.end;
        }
        Log { bytes, entries }
    }

    /// The indexes of the flush entries.
    pub fn flushes(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].is_flush())
            .collect()
    }

    /// The first entry whose data holds a whole sector of `byte`: where a guest write of
    /// that pattern reached the file.
    pub fn first_with(&self, byte: u8) -> Option<usize> {
        self.entries.iter().position(|e| {
            self.bytes[e.data.clone()]
                .chunks_exact(512)
                .any(|s| s.iter().all(|&b| b == byte))
        })
    }

    /// `base` with the entries `keep` picks among the first `upto` applied, written to `out`.
    pub fn replay(&self, base: &str, out: &str, upto: usize, keep: impl Fn(usize) -> bool) {
        use std::os::unix::fs::FileExt;
        std::fs::copy(base, out).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(out).unwrap();
        for (i, e) in self.entries[..upto].iter().enumerate() {
            if e.is_flush() || !keep(i) {
                continue;
            }
            if e.flags & DISCARD != 0 {
                // What a discarded range reads as is unspecified: zeroes here.
                file.write_all_at(&vec![0u8; e.len as usize], e.offset)
                    .unwrap();
            } else {
                file.write_all_at(&self.bytes[e.data.clone()], e.offset)
                    .unwrap();
            }
        }
    }
}
