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

// Handshake flags (16 bits), sent by the server after `IHAVEOPT` in the greeting.

/// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle negotiation (it answers
/// every option but `NBD_OPT_EXPORT_NAME` with option replies). The only style we speak.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`: the server can leave out the 124 zero bytes that end an
/// `NBD_OPT_EXPORT_NAME` reply, if the client answers with [`FLAG_C_NO_ZEROES`].
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits), the client's answer to the handshake flags. A server drops a
// client that sets a flag it does not know or did not offer.

/// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`: the client does not want the 124 zero bytes after an
/// `NBD_OPT_EXPORT_NAME` reply (only allowed when the server sent [`FLAG_NO_ZEROES`]).
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Option types (`NBD_OPT_*`): the 32-bit option of an option request during haggling.

/// `NBD_OPT_EXPORT_NAME`: choose an export by name and enter transmission at once. Its
/// answer is the export size and transmission flags, not an option reply, so a server
/// that cannot serve the name can only disconnect; `NBD_OPT_GO` replaces it.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: the client ends negotiation; the server acknowledges and both close.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: upgrade the connection to TLS. Our server has no TLS and refuses
/// it with `NBD_REP_ERR_POLICY`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export (payload: [`InfoRequest`]) with `NBD_REP_INFO`
/// replies, staying in negotiation.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: like [`OPT_INFO`], then enter transmission on that export once the
/// server has answered `NBD_REP_ACK`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: the client wants structured replies in transmission;
/// needed for block status and for sparse or partial reads.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: list the metadata contexts matching the queries
/// (payload: [`MetaContextRequest`]); context ids in the replies are 0.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: select the metadata contexts for `NBD_CMD_BLOCK_STATUS`,
/// replacing any earlier selection; each selected context gets an id in its reply.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`: 64-bit request and reply headers. Neither our server nor
/// our client supports it (the server answers `NBD_REP_ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types: the 32-bit reply type of an option reply. Errors have bit 31 set
// and may carry a message for the user.

/// `NBD_REP_ACK`: the option succeeded, or the last reply of a multi-reply option.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in the answer to `NBD_OPT_LIST` (32-bit name length,
/// name, then an optional description).
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one piece of export information (an `INFO_*` type, then its data)
/// in the answer to `NBD_OPT_INFO` or `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one metadata context (32-bit id, then name) in the answer to
/// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 of a reply type, set on every error reply (`NBD_REP_FLAG_ERROR`).
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the server does not know the option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: the option is known and valid but the server's policy forbids
/// it.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: the option is known but its data is malformed, or it is not
/// valid in this state (e.g. meta contexts before structured replies).
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: the option is not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: the server wants TLS before this option.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: the export named by the option does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down and takes no more options.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the server will not enter transmission unless the
/// client asks for `NBD_INFO_BLOCK_SIZE` (and so promises to honour it).
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: the option request or its reply is too large; our server
/// answers it to options longer than [`MAX_OPTION_LEN`].
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types (16 bits) in an `NBD_REP_INFO` payload and in the list of an
// `NBD_OPT_INFO` / `NBD_OPT_GO` request.

/// `NBD_INFO_EXPORT`: 64-bit export size in bytes and 16-bit transmission flags. Always
/// sent, whether asked for or not.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: the export's description, for people.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size, 32 bits each, in
/// bytes (see [`crate::BlockSize`]).
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (16 bits), sent with the export size when entering transmission.
// A `SEND_*` flag tells the client it may use that command or command flag.

/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`: the export is read-only; writes, trims and write-zeroes fail
/// with `EPERM`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`: the server takes `NBD_CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`: the server honours `NBD_CMD_FLAG_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`: the export behaves like a rotating disk, a hint for the
/// client's I/O scheduling. Never sent by our server.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`: the server takes `NBD_CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`: the server takes `NBD_CMD_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: the server honours `NBD_CMD_FLAG_DF` on reads; only with
/// structured replies.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`: flushes and FUA writes are visible through every
/// connection to the export once answered, so a client may spread its requests over
/// several connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_RESIZE`: the server takes `NBD_CMD_RESIZE` (the resize extension).
/// Never sent by our server.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_FLAG_SEND_CACHE`: the server takes `NBD_CMD_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`: the server honours `NBD_CMD_FLAG_FAST_ZERO` on
/// write-zeroes.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Command types (`NBD_CMD_*`): the 16-bit type of a transmission request.

/// `NBD_CMD_READ`: read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`: write the `length` bytes of payload that follow the header.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: clean disconnect; the server finishes the requests in flight, sends
/// no reply and closes.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`: every write answered before the flush is durable before its reply.
/// `offset` and `length` are 0.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`: the client no longer needs the range; it may read back as anything.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`: a hint to prefetch the range; nothing is returned.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`: make the range read as zeroes, without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`: one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per selected
/// metadata context, describing the range from `offset` on.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags (16 bits) of a transmission request; each is valid on some commands
// only, and only if the matching transmission flag was sent.

/// `NBD_CMD_FLAG_FUA`: the command's writes are durable before its reply.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: on write-zeroes, the range must stay allocated (no punching
/// a hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF` ("don't fragment"): on a structured read, answer with at most one
/// data chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: on block status, one extent per context is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: on write-zeroes, fail with `ENOTSUP` at once rather than
/// zero slowly (by writing zeroes).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks: 16-bit flags and type of each chunk header.

/// `NBD_REPLY_FLAG_DONE`: the last chunk of the reply to this request.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: no payload; ends a reply (always with [`REPLY_FLAG_DONE`]).
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: read data; payload is a 64-bit offset, then the bytes.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: a read range that reads as zeroes; payload is a 64-bit
/// offset and a 32-bit length.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: a 32-bit context id, then extents of 32-bit length
/// and 32-bit flags.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 of a chunk type, set on every error chunk; a client treats an unknown type
/// with it as an error.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`: the request failed; payload is a 32-bit error value, a
/// 16-bit message length and the message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: like [`REPLY_TYPE_ERROR`] followed by the 64-bit
/// offset where it failed. Never sent by our server.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// `NBD_STATE_HOLE` in `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` in `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `NBD_STATE_DIRTY` in `qemu:dirty-bitmap:NAME`: the extent is dirty in the bitmap.
pub const STATE_DIRTY: u32 = 1 << 0;

// NBD error values, sent in simple replies and error chunks. The protocol fixes them;
// they happen to equal Linux errnos. See `errno_of` and `error_of` for the mapping.

/// Operation not permitted, e.g. a write to a read-only export.
pub const EPERM: u32 = 1;
/// I/O error; also what any error without a value of its own becomes.
pub const EIO: u32 = 5;
/// Out of memory (servers should avoid it).
pub const ENOMEM: u32 = 12;
/// Invalid request: unknown command or flag, or a range beyond the end of the export.
pub const EINVAL: u32 = 22;
/// No space left for the write (the spec folds `EDQUOT` and `EFBIG` into it).
pub const ENOSPC: u32 = 28;
/// Value too large: a read with `NBD_CMD_FLAG_DF` too long to send in one chunk.
pub const EOVERFLOW: u32 = 75;
/// Not supported, e.g. a write-zeroes with `NBD_CMD_FLAG_FAST_ZERO` that cannot be fast.
pub const ENOTSUP: u32 = 95;
/// The server is shutting down; the client must disconnect.
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload the server accepts (and advertises as maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Strings (export names, descriptions, queries) longer than this are invalid.
pub const MAX_STRING: usize = 4096;
/// Option payloads longer than this are drained and refused instead of buffered.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Bytes in a transmission request header (compact headers), before any write payload.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes in a simple reply header, before any read data.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured reply chunk header, magic included, before its payload.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// `base:allocation`, the standard metadata context (flags [`STATE_HOLE`],
/// [`STATE_ZERO`]).
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `qemu:allocation-depth`, QEMU's context whose extent flags are the depth in the
/// backing chain where the data lives (0 unallocated, 1 the top image).
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's `qemu:dirty-bitmap:NAME` contexts (flag [`STATE_DIRTY`]); alone,
/// it is also the list query for every bitmap.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A transmission request header (compact form, [`REQUEST_HEADER_LEN`] bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Chosen by the client and echoed in every reply to this request (the spec's
    /// "handle" in older versions).
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Bytes the command covers; for a write, also the payload that follows.
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

    /// Appends the header, magic first (the client's side of [`Request::parse`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A simple reply header: `error` is 0 or an NBD error value; read data, if any, follows.
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
    /// Reply flags ([`REPLY_FLAG_DONE`]).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// The cookie of the request this chunk answers.
    pub cookie: u64,
    /// Payload bytes that follow the header.
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
    /// A cursor at the start of `buf`.
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

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        self.take(2).map(be_u16)
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        self.take(4).map(be_u32)
    }

    /// Reads a string prefixed by a 32-bit length, checked as [`check_string`] does and
    /// refused past [`MAX_STRING`] bytes.
    pub fn string(&mut self) -> Result<&'a str, Malformed> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(Malformed("string too long"));
        }
        let bytes = self.take(len)?;
        check_string(bytes)
    }

    /// Fails if bytes are left: the spec makes trailing option data invalid.
    pub fn finish(&self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed("trailing option data"))
        }
    }

    /// The bytes not read yet.
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
    /// The export (empty for the default export).
    pub name: &'a str,
    /// Information types asked for (`INFO_*`), in the client's order; unknown ones are
    /// kept, for the server to ignore.
    pub infos: Vec<u16>,
}

/// Parses an `NBD_OPT_INFO` / `NBD_OPT_GO` payload: 32-bit name length, name, 16-bit
/// count, then that many 16-bit information types and nothing else.
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

/// Appends an `NBD_OPT_INFO` / `NBD_OPT_GO` payload (the client's side of
/// [`parse_info_request`]).
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
    /// The export whose contexts are listed or selected.
    pub export: &'a str,
    /// Context names or query strings (e.g. `qemu:dirty-bitmap:` lists every bitmap);
    /// none means "all" when listing and "none" when selecting.
    pub queries: Vec<&'a str>,
}

/// Parses an `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload: 32-bit
/// export name length, name, 32-bit query count, then that many length-prefixed
/// queries and nothing else.
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

/// Appends an `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload (the
/// client's side of [`parse_meta_context_request`]).
pub fn encode_meta_context_request(out: &mut Vec<u8>, export: &str, queries: &[&str]) {
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
}

/// Maps an I/O error to the NBD error value sent on the wire. An errno the protocol has
/// no value for becomes EINVAL, as in QEMU's server (a cbw-timeout's ETIMEDOUT, a
/// broken snapshot's EACCES reach the client as qsd sends them).
pub fn errno_of(err: &io::Error) -> u32 {
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EPERM | libc::EROFS => EPERM,
            libc::EIO => EIO,
            libc::ENOMEM => ENOMEM,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EINVAL,
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

/// The big-endian `u16` at the start of `b`; panics if `b` is shorter.
pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The big-endian `u32` at the start of `b`; panics if `b` is shorter.
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The big-endian `u64` at the start of `b`; panics if `b` is shorter.
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
        for unmapped in [libc::ETIMEDOUT, libc::EACCES, libc::ENOENT] {
            assert_eq!(errno_of(&io::Error::from_raw_os_error(unmapped)), EINVAL);
        }
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
