//! Socket options the NBD server and client set on their connections.

use std::os::fd::AsRawFd;

/// Send buffer asked for on Unix connections: room for a whole large reply or write.
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

/// A Unix socket's default send buffer (about 200 KiB) turns a 1 MiB read reply or write
/// request into a run of partial writes, each waiting for the peer to drain the socket
/// and wake us; with a larger one it goes in one write. The kernel caps the size at
/// `net.core.wmem_max`, so this is best effort. It is only a limit: memory is used as
/// data is queued. TCP keeps its autotuning, which a fixed size would switch off.
pub(crate) fn enlarge_send_buffer(stream: &tokio::net::UnixStream) {
    let size = UNIX_SEND_BUFFER;
    // Safety: a valid socket descriptor and an int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "cannot enlarge the NBD socket's send buffer: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An OS error's text without Rust's "(os error N)" suffix, as QEMU words it.
pub(crate) fn os_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// A listening unix socket at `path` that only the daemon's user can connect to: mode
/// 0600, set between bind and listen, so nobody connects before it holds. (qsd leaves the
/// mode to the umask; with the common 0002 a whole group could drive the monitor.)
pub fn listen_unix_private(
    path: &std::path::Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    socket.listen(libc::SOMAXCONN)?;
    Ok(std::os::unix::net::UnixListener::from(
        std::os::fd::OwnedFd::from(socket),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(stream: &tokio::net::UnixStream) -> libc::c_int {
        let mut size: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // Safety: a valid socket descriptor and an int-sized option buffer.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut size as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        size
    }

    #[tokio::test]
    async fn unix_connections_get_a_larger_send_buffer() {
        let (server, _client) = tokio::net::UnixStream::pair().unwrap();
        let before = send_buffer(&server);
        enlarge_send_buffer(&server);
        assert!(
            send_buffer(&server) > before,
            "send buffer stayed at {before}"
        );
    }
}
