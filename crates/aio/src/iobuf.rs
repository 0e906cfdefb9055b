//! `IoBuf`: an owned run of bytes in a pooled buffer, which the kernel fills or drains in
//! place.
//!
//! A caller that hands its data to [`ImageFile::read_buf`](crate::ImageFile::read_buf) or
//! [`write_buf`](crate::ImageFile::write_buf) gives the buffer away for the time of the
//! request, so the request can own it until the kernel is done, exactly like the bounce
//! buffers of the slice API, but without copying into and out of them (one memcpy each way,
//! a fifth of a job's CPU with the images in RAM). A qcow2 request that maps to several host
//! ranges splits its buffer into pieces, one per range; each piece owns its bytes alone, so
//! the pieces can be in flight at once and written or read through `&mut` without aliasing
//! another. [`IoBuf::unsplit`] puts neighbours back together.

use crate::pool::PoolBuf;
use std::io;
use std::sync::Arc;

/// Bytes of a pooled, page-aligned buffer that this value alone may read and write.
pub struct IoBuf(Inner);

enum Inner {
    Empty,
    /// All of a pool buffer, not split: no reference count.
    Whole(PoolBuf),
    /// `start..start + len` of a buffer split into pieces. Pieces of one buffer never
    /// overlap (only `split_to` makes them and only `unsplit` joins them), and the shared
    /// `PoolBuf` is never read as a whole while split, so each piece's bytes are its own.
    Part {
        buf: Arc<PoolBuf>,
        start: usize,
        len: usize,
    },
}

impl IoBuf {
    /// A page-aligned buffer of `len` bytes (at most [`MAX_BUF`](crate::pool::MAX_BUF))
    /// from the current thread's pool; its contents are unspecified.
    pub fn new(len: usize) -> io::Result<IoBuf> {
        PoolBuf::new(len, 1).map(IoBuf::from)
    }

    /// `len` bytes in a buffer of the pool's size class for `capacity` (or `len`, if
    /// larger). A job that asks for its largest step every time keeps one class of
    /// buffers in the pool instead of one per length it met, and so fewer of them idle.
    pub fn with_capacity(len: usize, capacity: usize) -> io::Result<IoBuf> {
        let mut buf = PoolBuf::new(capacity.max(len), 1)?;
        buf.set_len(len)?;
        Ok(IoBuf::from(buf))
    }

    /// No bytes: what is left of a buffer after its last byte was split off.
    pub fn empty() -> IoBuf {
        IoBuf(Inner::Empty)
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Inner::Empty => 0,
            Inner::Whole(buf) => buf.len(),
            Inner::Part { len, .. } => *len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Address of the first byte, for alignment checks.
    pub(crate) fn addr(&self) -> usize {
        match &self.0 {
            Inner::Empty => 0,
            Inner::Whole(buf) => buf.as_ptr() as usize,
            Inner::Part { buf, start, .. } => buf.as_ptr() as usize + start,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Inner::Empty => &[],
            Inner::Whole(buf) => buf.as_slice(),
            // Safety: the piece's bytes are initialised (pool buffers are) and no other
            // value reads or writes them (see `Inner::Part`); `&self` keeps this value from
            // writing them meanwhile.
            Inner::Part { buf, start, len } => unsafe {
                std::slice::from_raw_parts(buf.data_ptr().add(*start), *len)
            },
        }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Inner::Empty => &mut [],
            Inner::Whole(buf) => buf.as_mut_slice(),
            // Safety: as in `as_slice`, and `&mut self` makes the access exclusive.
            Inner::Part { buf, start, len } => unsafe {
                std::slice::from_raw_parts_mut(buf.data_ptr().add(*start), *len)
            },
        }
    }

    /// Splits off the first `at` bytes (all of them if `at` is larger) and returns them;
    /// `self` keeps the rest. Splitting at either end moves no reference count.
    pub fn split_to(&mut self, at: usize) -> IoBuf {
        let len = self.len();
        if at == 0 {
            return IoBuf::empty();
        }
        if at >= len {
            return std::mem::replace(self, IoBuf::empty());
        }
        let (buf, start) = match std::mem::replace(&mut self.0, Inner::Empty) {
            Inner::Whole(buf) => (Arc::new(buf), 0),
            Inner::Part { buf, start, .. } => (buf, start),
            Inner::Empty => unreachable!("an empty buffer was returned above"),
        };
        self.0 = Inner::Part {
            buf: Arc::clone(&buf),
            start: start + at,
            len: len - at,
        };
        IoBuf(Inner::Part {
            buf,
            start,
            len: at,
        })
    }

    /// Appends `next`, the piece split off right after this one, so that the two are one
    /// again. Pieces that are not neighbours stay apart and `next` comes back.
    pub fn unsplit(&mut self, next: IoBuf) -> Result<(), IoBuf> {
        if next.is_empty() {
            return Ok(());
        }
        if self.is_empty() {
            *self = next;
            return Ok(());
        }
        let (
            Inner::Part { buf, start, len },
            Inner::Part {
                buf: other,
                start: next_start,
                len: next_len,
            },
        ) = (&mut self.0, &next.0)
        else {
            return Err(next);
        };
        if !Arc::ptr_eq(buf, other) || *start + *len != *next_start {
            return Err(next);
        }
        *len += next_len;
        let whole = *start == 0 && *len == buf.len();
        drop(next);
        if whole {
            if let Inner::Part { buf, .. } = std::mem::replace(&mut self.0, Inner::Empty) {
                self.0 = match Arc::try_unwrap(buf) {
                    Ok(buf) => Inner::Whole(buf),
                    Err(buf) => Inner::Part {
                        len: buf.len(),
                        buf,
                        start: 0,
                    },
                };
            }
        }
        Ok(())
    }
}

impl From<PoolBuf> for IoBuf {
    fn from(buf: PoolBuf) -> IoBuf {
        IoBuf(Inner::Whole(buf))
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("addr", &self.addr())
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_own_their_bytes_and_join_again() {
        let mut buf = IoBuf::new(3 * 4096).unwrap();
        let base = buf.addr();
        buf.as_mut_slice().fill(7);
        let mut a = buf.split_to(4096);
        let mut b = buf.split_to(4096);
        assert_eq!((a.len(), b.len(), buf.len()), (4096, 4096, 4096));
        assert_eq!(
            (a.addr(), b.addr(), buf.addr()),
            (base, base + 4096, base + 8192)
        );
        b.as_mut_slice().fill(9);
        assert!(a.as_slice().iter().all(|&x| x == 7));
        assert!(buf.as_slice().iter().all(|&x| x == 7));
        // Not neighbours: `buf` follows `b`, not `a`.
        let buf = a.unsplit(buf).unwrap_err();
        a.unsplit(b).unwrap();
        a.unsplit(buf).unwrap();
        assert!(
            matches!(a.0, Inner::Whole(_)),
            "all pieces back: no count left"
        );
        assert_eq!(a.len(), 3 * 4096);
        assert_eq!(a.as_slice()[4096], 9);
        assert_eq!(a.as_slice()[8192], 7);
    }

    #[test]
    fn splitting_at_the_ends_moves_the_whole_buffer() {
        let mut buf = IoBuf::new(4096).unwrap();
        assert!(buf.split_to(0).is_empty());
        let all = buf.split_to(5000);
        assert!(buf.is_empty());
        assert!(matches!(all.0, Inner::Whole(_)));
        let mut joined = IoBuf::empty();
        joined.unsplit(all).unwrap();
        joined.unsplit(IoBuf::empty()).unwrap();
        assert_eq!(joined.len(), 4096);
    }

    #[test]
    fn pieces_of_different_buffers_stay_apart() {
        let mut a = IoBuf::new(8192).unwrap();
        let mut b = IoBuf::new(8192).unwrap();
        let mut a1 = a.split_to(4096);
        let b1 = b.split_to(4096);
        assert!(a1.unsplit(b).is_err());
        drop(b1);
        a1.unsplit(a).unwrap();
    }
}
