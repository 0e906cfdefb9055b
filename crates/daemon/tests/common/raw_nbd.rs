//! NBD requests sent raw, for what client libraries refuse to send (writes to a read-only
//! export) and for many connections at once: the fixed newstyle handshake with
//! NBD_OPT_GO and simple replies only.

use super::WAIT;
use nbd::proto::{
    CMD_READ, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, INFO_EXPORT, OPT_GO, REP_ACK,
    REP_FLAG_ERROR, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A transmission-phase connection to `export` without structured replies: the raw
/// handshake (fixed newstyle, NBD_OPT_GO), so that nothing refuses requests for the
/// server.
pub fn connect(sock: &Path, export: &str) -> (UnixStream, u16) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).unwrap();
    let mut flags = 0;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0; len];
        s.read_exact(&mut body).unwrap();
        if kind == REP_INFO && len >= 12 && body[..2] == INFO_EXPORT.to_be_bytes() {
            flags = u16::from_be_bytes(body[10..12].try_into().unwrap());
        }
        if kind == REP_ACK {
            return (s, flags);
        }
        assert_eq!(kind & REP_FLAG_ERROR, 0, "NBD_OPT_GO refused");
    }
}

/// Sends one request (with `payload` for a write) and returns the reply's error code; a
/// successful read's data is read and dropped.
pub fn request(s: &mut UnixStream, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&cmd.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(payload);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], SIMPLE_REPLY_MAGIC.to_be_bytes(), "simple reply");
    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    if cmd == CMD_READ && error == 0 {
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).unwrap();
    }
    error
}
