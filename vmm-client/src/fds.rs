//! Sending descriptors to a VMM along with a frame (`SCM_RIGHTS`).

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Writes `frame` to `stream`, the descriptors of `files` attached to its
/// first bytes (none: a plain write). The receiver must read those first
/// bytes with `recvmsg` (see bubble-vmm's spare mode); the kernel
/// duplicates the descriptors into it, ours stay open until `files` is
/// dropped.
pub(crate) async fn send_with(
    stream: &mut UnixStream,
    frame: &[u8],
    files: &[File],
) -> io::Result<()> {
    if files.is_empty() || frame.is_empty() {
        return stream.write_all(frame).await;
    }
    let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let sock = stream.as_raw_fd();
    let sent = loop {
        stream.writable().await?;
        let r = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                sock,
                &[IoSlice::new(frame)],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&frame[sent..]).await
}
