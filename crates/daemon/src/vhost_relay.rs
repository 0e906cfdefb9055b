//! The vhost-user-blk export's relay: it carries the control messages between the
//! frontend and vhost-user-backend's handler unchanged, except that it keeps the backend
//! channel (VHOST_USER_SET_BACKEND_REQ_FD) for itself, so that blockd can send
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG after a resize. vhost 0.18, which the handler is
//! built on, has no way to send that message; the relay is the smallest piece that adds
//! it without touching the library. Only control messages pass here, never request data.
//!
//! A message is a 12-byte header (request, flags, payload size, little-endian), the
//! payload, and file descriptors passed with the header (the vhost-user specification).

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use vhost::vhost_user::message::{BackendReq, FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::event::EventConsumer;

/// The header's flags: protocol version 1, the only one.
const VERSION: u32 = 1;

/// One message read off a socket.
struct Message {
    header: [u8; 12],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes(self.header[0..4].try_into().unwrap())
    }
}

/// Reads one whole message; None at the end of the stream.
fn receive(socket: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; 12];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_ATTACHED_FD_ENTRIES]);
    let mut fds = Vec::new();
    let got = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // Safety: descriptors the kernel just installed for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    if got == 0 {
        return Ok(None);
    }
    socket.read_exact(&mut header[got..])?;
    let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut payload = vec![0; size];
    socket.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Writes one whole message, its descriptors with the first bytes.
fn send(socket: &UnixStream, header: &[u8], payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let total = header.len() + payload.len();
    let mut sent = 0;
    while sent < total {
        let iov: Vec<IoSlice> = if sent < header.len() {
            vec![IoSlice::new(&header[sent..]), IoSlice::new(payload)]
        } else {
            vec![IoSlice::new(&payload[sent - header.len()..])]
        };
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        sent += sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
    }
    Ok(())
}

/// Carries messages between `frontend` and `handler` until either side ends or `stop`
/// fires; a `resized` event sends the frontend a config-change message on the backend
/// channel, once it has handed one over.
pub fn run(
    mut frontend: UnixStream,
    mut handler: UnixStream,
    resized: &EventConsumer,
    stop: &EventConsumer,
) {
    let mut backend_channel: Option<UnixStream> = None;
    let result = loop {
        let mut fds = [
            frontend.as_raw_fd(),
            handler.as_raw_fd(),
            resized.as_raw_fd(),
            stop.as_raw_fd(),
        ]
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // Safety: four valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 4, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if fds[3].revents != 0 {
            break Ok(());
        }
        if fds[2].revents != 0 {
            let _ = resized.consume();
            if let Some(channel) = &backend_channel {
                let mut header = [0u8; 12];
                header[0..4]
                    .copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
                header[4..8].copy_from_slice(&VERSION.to_le_bytes());
                if let Err(e) = send(channel, &header, &[], &[]) {
                    tracing::info!("vhost-user-blk: config change not sent: {e}");
                }
            }
        }
        if fds[0].revents != 0 {
            match receive(&mut frontend) {
                Ok(Some(mut msg)) => {
                    let mut placeholder = None;
                    if msg.request() == u32::from(FrontendReq::SET_BACKEND_REQ_FD)
                        && msg.fds.len() == 1
                    {
                        // The handler gets a socket of its own whose far end is closed:
                        // it never sends on it (no shared objects or memory are offered).
                        let (ours, theirs) = match UnixStream::pair() {
                            Ok(pair) => pair,
                            Err(e) => break Err(e),
                        };
                        drop(theirs);
                        backend_channel = Some(UnixStream::from(msg.fds.remove(0)));
                        placeholder = Some(ours);
                    }
                    let raw: Vec<RawFd> = match &placeholder {
                        Some(socket) => vec![socket.as_raw_fd()],
                        None => msg.fds.iter().map(AsRawFd::as_raw_fd).collect(),
                    };
                    if let Err(e) = send(&handler, &msg.header, &msg.payload, &raw) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
        if fds[1].revents != 0 {
            match receive(&mut handler) {
                Ok(Some(msg)) => {
                    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
                    if let Err(e) = send(&frontend, &msg.header, &msg.payload, &raw) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    };
    if let Err(e) = result {
        tracing::info!("vhost-user-blk: frontend connection ends: {e}");
    }
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = handler.shutdown(std::net::Shutdown::Both);
}
