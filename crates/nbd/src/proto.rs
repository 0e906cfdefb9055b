//! NBD wire format: magic numbers, option/command/reply codes, header encoding and
//! parsing, and the mapping between `io::Error` and NBD error values.
//!
//! Everything here is pure (no I/O) so that the server and the client share it and the
//! parsers can be fed arbitrary bytes by tests.

use std::io;

/// `NBDMAGIC`, first word of the newstyle greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags sent by the server.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// NBD error values (the protocol fixes them; they happen to equal Linux errnos).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload the server accepts (and advertises as maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Strings (export names, descriptions, queries) longer than this are invalid.
pub const MAX_STRING: usize = 4096;
/// Option payloads longer than this are drained and refused instead of buffered.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Name of the standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parses a request header; `None` means a bad magic, after which the stream cannot be
    /// resynchronised.
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Option<Request> {
        if be_u32(&buf[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be_u16(&buf[4..6]),
            kind: be_u16(&buf[6..8]),
            cookie: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            length: be_u32(&buf[24..28]),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut h = [0; SIMPLE_REPLY_LEN];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// A structured reply chunk header announcing `length` payload bytes.
pub fn chunk_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut h = [0; STRUCTURED_HEADER_LEN];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..].copy_from_slice(&length.to_be_bytes());
    h
}

/// Appends a structured reply chunk header announcing `length` payload bytes.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&chunk_header(flags, kind, cookie, length));
}

/// Appends a complete `NBD_REPLY_TYPE_ERROR` chunk (flagged done) with a message.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate_str(message, MAX_STRING);
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends an option reply header plus payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A parsed structured reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    /// Parses the 16 bytes that follow the 4-byte structured magic.
    pub fn parse(buf: &[u8; 16]) -> ChunkHeader {
        ChunkHeader {
            flags: be_u16(&buf[0..2]),
            kind: be_u16(&buf[2..4]),
            cookie: be_u64(&buf[4..12]),
            length: be_u32(&buf[12..16]),
        }
    }
}

/// Error of a malformed option payload; the server answers it with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// A cursor over an option payload that refuses to read past its end.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed("option data too short"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        self.take(2).map(be_u16)
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        self.take(4).map(be_u32)
    }

    /// Reads a string prefixed by a 32-bit length.
    pub fn string(&mut self) -> Result<&'a str, Malformed> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(Malformed("string too long"));
        }
        let bytes = self.take(len)?;
        check_string(bytes)
    }

    pub fn finish(&self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed("trailing option data"))
        }
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// Validates a protocol string: UTF-8, no NUL.
pub fn check_string(bytes: &[u8]) -> Result<&str, Malformed> {
    let s = std::str::from_utf8(bytes).map_err(|_| Malformed("string is not UTF-8"))?;
    if s.contains('\0') {
        return Err(Malformed("string contains NUL"));
    }
    Ok(s)
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, Malformed> {
    let mut c = Cursor::new(data);
    let name = c.string()?;
    let count = c.u16()? as usize;
    if c.rest().len() != count * 2 {
        return Err(Malformed("information request count mismatch"));
    }
    let mut infos = Vec::with_capacity(count);
    for _ in 0..count {
        infos.push(c.u16()?);
    }
    Ok(InfoRequest { name, infos })
}

pub fn encode_info_request(out: &mut Vec<u8>, name: &str, infos: &[u16]) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export: &'a str,
    pub queries: Vec<&'a str>,
}

pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, Malformed> {
    let mut c = Cursor::new(data);
    let export = c.string()?;
    let count = c.u32()? as usize;
    // Each query takes at least its 4-byte length, which bounds the allocation below.
    if count > c.rest().len() / 4 {
        return Err(Malformed("query count exceeds option length"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(c.string()?);
    }
    c.finish()?;
    Ok(MetaContextRequest { export, queries })
}

pub fn encode_meta_context_request(out: &mut Vec<u8>, export: &str, queries: &[&str]) {
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
}

/// Maps an I/O error to the NBD error value sent on the wire.
pub fn errno_of(err: &io::Error) -> u32 {
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

/// Maps an NBD error value received from a server back to an `io::Error` that keeps the
/// errno, so callers (e.g. the block layer) can act on it.
pub fn error_of(errno: u32) -> io::Error {
    let code = match errno {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(code)
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 4096,
            length: 512,
        };
        let mut v = Vec::new();
        r.encode(&mut v);
        let arr: [u8; REQUEST_HEADER_LEN] = v.try_into().unwrap();
        assert_eq!(Request::parse(&arr), Some(r));
        let mut bad = arr;
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn info_request_parsing() {
        let mut v = Vec::new();
        encode_info_request(&mut v, "disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let r = parse_info_request(&v).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.infos, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&v[..v.len() - 1]).is_err());
        v.push(0);
        assert!(parse_info_request(&v).is_err());
        assert!(parse_info_request(&[0, 0, 0, 1, 0]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 1, 0, 0, 0]).is_err());
    }

    #[test]
    fn meta_context_request_parsing() {
        let mut v = Vec::new();
        encode_meta_context_request(&mut v, "", &["base:allocation", "qemu:"]);
        let r = parse_meta_context_request(&v).unwrap();
        assert_eq!(r.export, "");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:"]);
        assert!(parse_meta_context_request(&v[..v.len() - 1]).is_err());
        let huge = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_meta_context_request(&huge).is_err());
    }

    #[test]
    fn strings_are_validated() {
        assert!(check_string(b"ok").is_ok());
        assert!(check_string(b"a\0b").is_err());
        assert!(check_string(&[0xff, 0xfe]).is_err());
        assert_eq!(truncate_str("héllo", 2), "h");
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::EDQUOT)),
            ENOSPC
        );
        assert_eq!(errno_of(&io::Error::from_raw_os_error(libc::EROFS)), EPERM);
        assert_eq!(
            errno_of(&io::Error::from(io::ErrorKind::Unsupported)),
            ENOTSUP
        );
        assert_eq!(errno_of(&io::Error::other("x")), EIO);
        for e in [
            EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
        ] {
            assert_eq!(errno_of(&error_of(e)), e);
        }
        assert_eq!(errno_of(&error_of(12345)), EIO);
    }
}
