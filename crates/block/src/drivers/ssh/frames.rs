//! A bound on what an SFTP server may send. russh-sftp allocates whatever length a packet
//! announces before reading it, so a hostile server could make blockd allocate 4 GiB; the
//! channel is read through [`Frames`], which hands on whole packets of at most
//! [`MAX_PACKET`] bytes and fails the stream (every request then fails with EIO) on a
//! longer one. It also turns status codes past SFTP version 3's (9 and up), which
//! russh-sftp cannot decode and would leave a request waiting for ever, into
//! SSH_FX_FAILURE, keeping the server's message.
//!
//! russh-sftp leaves requests waiting (until their timeout) when the stream ends, so
//! [`Frames`] tells the driver through a watch channel when it has: at the stream's end,
//! on a failure, and when the stream is dropped.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// The longest packet taken: OpenSSH's server sends at most 256 KiB, and blockd asks for
/// less than that per read.
pub const MAX_PACKET: usize = 256 << 10;

/// SSH_FXP_STATUS, and the last status code russh-sftp knows.
const STATUS: u8 = 101;
const LAST_KNOWN_CODE: u32 = 8;
const FAILURE: u32 = 4;

/// The channel's stream, read a whole packet at a time.
pub struct Frames<S> {
    inner: S,
    /// Bytes read and not yet a whole packet.
    incoming: Vec<u8>,
    /// A whole packet being handed on, and how much of it has been.
    packet: Vec<u8>,
    handed: usize,
    /// Set once the stream has ended or failed; later reads see its end.
    ended: watch::Sender<bool>,
}

impl<S> Frames<S> {
    /// The stream, and what turns true once it has ended.
    pub fn new(inner: S) -> (Frames<S>, watch::Receiver<bool>) {
        let (ended, ending) = watch::channel(false);
        let frames = Frames {
            inner,
            incoming: Vec::new(),
            packet: Vec::new(),
            handed: 0,
            ended,
        };
        (frames, ending)
    }

    /// The stream is over: the driver's waiting requests fail.
    fn end(&mut self) {
        self.ended.send_replace(true);
        self.incoming.clear();
    }

    /// Moves a whole packet from `incoming` to `packet`, if there is one.
    fn next_packet(&mut self) -> io::Result<bool> {
        let Some(header) = self.incoming.get(..4) else {
            return Ok(false);
        };
        let len = u32::from_be_bytes(header.try_into().unwrap_or_default()) as usize;
        if len > MAX_PACKET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the SFTP server sent a packet of {len} bytes"),
            ));
        }
        if self.incoming.len() < 4 + len {
            return Ok(false);
        }
        self.packet.clear();
        self.packet.extend(self.incoming.drain(..4 + len));
        self.handed = 0;
        // type (1), id (4), code (4) follow the length.
        if len >= 9 && self.packet[4] == STATUS {
            let code = u32::from_be_bytes(self.packet[9..13].try_into().unwrap_or_default());
            if code > LAST_KNOWN_CODE {
                self.packet[9..13].copy_from_slice(&FAILURE.to_be_bytes());
            }
        }
        Ok(true)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Frames<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if *this.ended.borrow() {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.handed < this.packet.len() {
                let n = buf.remaining().min(this.packet.len() - this.handed);
                buf.put_slice(&this.packet[this.handed..this.handed + n]);
                this.handed += n;
                return Poll::Ready(Ok(()));
            }
            match this.next_packet() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    this.end();
                    return Poll::Ready(Err(e));
                }
            }
            let mut chunk = [0u8; 16 << 10];
            let mut read = ReadBuf::new(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read)) {
                this.end();
                return Poll::Ready(Err(e));
            }
            if read.filled().is_empty() {
                let cut = !this.incoming.is_empty();
                this.end();
                return Poll::Ready(match cut {
                    false => Ok(()),
                    true => Err(io::ErrorKind::UnexpectedEof.into()),
                });
            }
            this.incoming.extend_from_slice(read.filled());
        }
    }
}

impl<S> Drop for Frames<S> {
    fn drop(&mut self) {
        self.ended.send_replace(true);
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Frames<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(kind);
        p.extend_from_slice(body);
        p
    }

    #[tokio::test]
    async fn whole_packets_pass_and_unknown_status_codes_become_failure() {
        let mut status = 7u32.to_be_bytes().to_vec();
        status.extend_from_slice(&11u32.to_be_bytes());
        status.extend_from_slice(b"\0\0\0\x03why\0\0\0\0");
        let mut wire = packet(103, b"\0\0\0\x01data");
        wire.extend(packet(STATUS, &status));
        let (mut frames, ended) = Frames::new(&wire[..]);
        let mut got = Vec::new();
        frames.read_to_end(&mut got).await.unwrap();
        assert!(*ended.borrow());
        let mut expected = wire.clone();
        let at = packet(103, b"\0\0\0\x01data").len() + 9;
        expected[at..at + 4].copy_from_slice(&FAILURE.to_be_bytes());
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn an_oversized_packet_fails_the_stream_before_any_allocation() {
        let wire = 0xFFFF_FFF0u32.to_be_bytes();
        let (mut frames, ended) = Frames::new(&wire[..]);
        let mut got = Vec::new();
        let e = frames.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(got.is_empty());
        assert!(*ended.borrow());
        // Read again (russh-sftp's loop does): the end, not the same error for ever.
        assert_eq!(frames.read(&mut [0u8; 8]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_cut_packet_is_an_unexpected_end() {
        let wire = packet(103, b"\0\0\0\x01data");
        let (mut frames, _) = Frames::new(&wire[..wire.len() - 1]);
        let mut got = Vec::new();
        let e = frames.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
