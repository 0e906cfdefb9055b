//! Moving a connection to the thread its export is served from.
//!
//! Connections are accepted and negotiated on whatever thread the server's spawner picks;
//! only `NBD_OPT_GO` tells which export they want. An export pinned to a thread (its
//! backend's [`crate::backend::Backend::home`]) gets its connections moved there between
//! negotiation and transmission, when nothing is in flight. A tokio socket belongs to the
//! reactor of the thread that registered it, so it leaves as a std socket and is
//! registered again on arrival. Inside TLS the socket sits in a [`Slot`] that can be
//! emptied while rustls keeps the session: the session moves as it is. A connection moves
//! again whenever its export's node moves to another thread, once its requests in flight
//! are answered.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio_rustls::server::TlsStream;

/// A tokio socket that can become a std one (which may cross threads) and back.
pub(super) trait RawSocket: AsyncRead + AsyncWrite + Unpin + Sized + 'static {
    type Std: Send + 'static;
    type Read: AsyncRead + Unpin + 'static;
    type Write: AsyncWrite + Unpin + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
    fn from_std(socket: Self::Std) -> io::Result<Self>;
    fn split(self) -> (Self::Read, Self::Write);
    fn unsplit(read: Self::Read, write: Self::Write) -> io::Result<Self>;
}

macro_rules! raw_socket {
    ($tokio:ty, $std:ty, $read:ty, $write:ty) => {
        impl RawSocket for $tokio {
            type Std = $std;
            type Read = $read;
            type Write = $write;
            fn into_std(self) -> io::Result<$std> {
                <$tokio>::into_std(self)
            }
            fn from_std(socket: $std) -> io::Result<Self> {
                <$tokio>::from_std(socket)
            }
            fn split(self) -> ($read, $write) {
                self.into_split()
            }
            fn unsplit(read: $read, write: $write) -> io::Result<Self> {
                read.reunite(write)
                    .map_err(|_| io::Error::other("halves of two sockets"))
            }
        }
    };
}

raw_socket!(
    tokio::net::TcpStream,
    std::net::TcpStream,
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf
);
raw_socket!(
    tokio::net::UnixStream,
    std::os::unix::net::UnixStream,
    tokio::net::unix::OwnedReadHalf,
    tokio::net::unix::OwnedWriteHalf
);

/// A connection's stream in the halves transmission uses, that can leave its thread.
pub(super) trait Transport: 'static {
    type Read: AsyncRead + Unpin + 'static;
    type Write: AsyncWrite + Unpin + 'static;
    /// The stream off its thread's reactor.
    type Detached: Send + 'static;
    fn detach(read: Self::Read, write: Self::Write) -> io::Result<Self::Detached>;
    fn attach(detached: Self::Detached) -> io::Result<(Self::Read, Self::Write)>;
}

/// A plain socket, in its own halves.
pub(super) struct Plain<S>(std::marker::PhantomData<S>);

impl<S: RawSocket> Transport for Plain<S> {
    type Read = S::Read;
    type Write = S::Write;
    type Detached = S::Std;
    fn detach(read: S::Read, write: S::Write) -> io::Result<S::Std> {
        S::unsplit(read, write)?.into_std()
    }
    fn attach(socket: S::Std) -> io::Result<(S::Read, S::Write)> {
        Ok(S::from_std(socket)?.split())
    }
}

/// A socket inside TLS, in the halves of `tokio::io::split`.
pub(super) struct Tls<S>(std::marker::PhantomData<S>);

impl<S: RawSocket> Transport for Tls<S>
where
    TlsStream<Slot<S>>: Send,
{
    type Read = ReadHalf<TlsStream<Slot<S>>>;
    type Write = WriteHalf<TlsStream<Slot<S>>>;
    type Detached = (TlsStream<Slot<S>>, S::Std);
    fn detach(read: Self::Read, write: Self::Write) -> io::Result<Self::Detached> {
        let mut tls = read.unsplit(write);
        let socket = tls.get_mut().0.take()?;
        Ok((tls, socket.into_std()?))
    }
    fn attach((mut tls, socket): Self::Detached) -> io::Result<(Self::Read, Self::Write)> {
        tls.get_mut().0 .0 = Some(S::from_std(socket)?);
        Ok(tokio::io::split(tls))
    }
}

/// A read half with the bytes the client sent before its connection moved in front of it
/// (what the thread it left had read ahead). One type however often the connection moves.
pub(super) struct Prefixed<R> {
    early: Vec<u8>,
    at: usize,
    inner: R,
}

impl<R> Prefixed<R> {
    pub(super) fn new(inner: R) -> Prefixed<R> {
        Prefixed::with_early(Vec::new(), inner)
    }

    pub(super) fn with_early(early: Vec<u8>, inner: R) -> Prefixed<R> {
        Prefixed {
            early,
            at: 0,
            inner,
        }
    }

    /// The read half and every byte read from it but not consumed: `buffered` (taken
    /// from this stream by a reader above it) first, then what this one still holds.
    pub(super) fn into_parts(self, buffered: &[u8]) -> (Vec<u8>, R) {
        let mut early = buffered.to_vec();
        early.extend_from_slice(&self.early[self.at..]);
        (early, self.inner)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.early.len() {
            let n = (this.early.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.early[this.at..this.at + n]);
            this.at += n;
            if this.at == this.early.len() {
                this.early = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// A socket that can be taken out from under the TLS session wrapped around it. Empty
/// only while the connection moves, when nothing reads or writes it.
pub(super) struct Slot<S>(Option<S>);

impl<S> Slot<S> {
    pub(super) fn new(socket: S) -> Slot<S> {
        Slot(Some(socket))
    }

    fn take(&mut self) -> io::Result<S> {
        self.0.take().ok_or_else(gone)
    }

    fn socket(&mut self) -> io::Result<&mut S> {
        self.0.as_mut().ok_or_else(gone)
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the socket is moving")
}

impl<S: AsyncRead + Unpin> AsyncRead for Slot<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().socket() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Slot<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().socket() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().socket() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().socket() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().socket() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
