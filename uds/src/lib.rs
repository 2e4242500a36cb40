//! Unix stream sockets for request/response traffic, registered with
//! tokio's reactor for read readiness only.
//!
//! A Unix socket notifies its writer (`EPOLLOUT`) every time the peer
//! consumes data. tokio registers every `UnixStream` for read *and* write
//! readiness, so a task that sends a request and waits for the answer has
//! its thread woken twice: once when the peer reads the request (nothing to
//! do) and once when the answer arrives. On a nested VM such as the hosts
//! bubbled runs on, waking a sleeping thread costs the waker an
//! inter-processor interrupt and the woken thread 10-30 µs, so a spurious
//! wake-up costs about as much as the guest exit it waits for.
//!
//! [`UnixConn`] registers for read readiness only. Writes go straight to the
//! socket (`MSG_NOSIGNAL`); only a write that would block registers a
//! duplicate descriptor for write readiness, and drops it as soon as the
//! write has gone through.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::unix::{SocketAddr, UCred};

/// A connected Unix stream socket registered for read readiness only.
#[derive(Debug)]
pub struct UnixConn {
    read: ReadHalf,
    write: WriteHalf,
    peer_cred: Option<UCred>,
    peer_addr: Option<Arc<SocketAddr>>,
}

/// The reading half of a [`UnixConn`].
#[derive(Debug)]
pub struct ReadHalf {
    io: Arc<AsyncFd<StdUnixStream>>,
}

/// The writing half of a [`UnixConn`]; dropping it shuts the writing
/// direction down.
#[derive(Debug)]
pub struct WriteHalf {
    io: Arc<AsyncFd<StdUnixStream>>,
    /// A duplicate of the socket registered for write readiness, present
    /// only while a write is blocked.
    waiter: Option<AsyncFd<OwnedFd>>,
}

impl UnixConn {
    /// Connects to the socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    /// Takes over a tokio stream (its peer credentials and address are kept
    /// for [`UnixConn::peer_cred`]). Must be called within a tokio runtime.
    pub fn from_tokio(s: tokio::net::UnixStream) -> io::Result<Self> {
        let peer_cred = s.peer_cred().ok();
        let peer_addr = s.peer_addr().ok().map(Arc::new);
        // `into_std` deregisters the socket and leaves it non-blocking.
        let mut c = Self::from_std(s.into_std()?)?;
        c.peer_cred = peer_cred;
        c.peer_addr = peer_addr;
        Ok(c)
    }

    /// Takes over a std stream (made non-blocking). Must be called within
    /// a tokio runtime.
    pub fn from_std(s: StdUnixStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        let io = Arc::new(register(s, Interest::READABLE)?);
        Ok(UnixConn {
            read: ReadHalf { io: io.clone() },
            write: WriteHalf { io, waiter: None },
            peer_cred: None,
            peer_addr: None,
        })
    }

    /// Credentials of the peer process when the connection was taken over
    /// from a tokio stream.
    pub fn peer_cred(&self) -> Option<UCred> {
        self.peer_cred
    }

    /// Splits into halves that can be used from different tasks.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (self.read, self.write)
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // SAFETY: recv writes at most `unfilled.len()` bytes into the
            // unfilled part of the buffer and reports how many it wrote;
            // only those are marked initialized below.
            let r = guard.try_io(|inner| unsafe {
                let unfilled = buf.unfilled_mut();
                let n = libc::recv(
                    inner.get_ref().as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                    0,
                );
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => {
                    // SAFETY: recv initialized the first `n` unfilled bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness was cleared; wait again.
                Err(_) => continue,
            }
        }
    }
}

impl Drop for WriteHalf {
    /// Shuts the writing direction down, so the peer sees the end of the
    /// stream even while the reading half lives on (as with tokio's
    /// `OwnedWriteHalf`).
    fn drop(&mut self) {
        let _ = self.io.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

impl WriteHalf {
    /// A handle on the socket for `bubble_vmm::control::spin_readable`, usable without holding
    /// either half (it keeps the socket open while it lives).
    pub fn poll_handle(&self) -> PollHandle {
        PollHandle(self.io.clone())
    }
}

/// The socket of a connection, for `bubble_vmm::control::spin_readable` (see
/// [`WriteHalf::poll_handle`]).
#[derive(Clone, Debug)]
pub struct PollHandle(Arc<AsyncFd<StdUnixStream>>);

impl AsFd for PollHandle {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

/// Registers `fd` with the current runtime's reactor for `interest`.
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` (a std socket or an OwnedFd) owns its descriptor, which
    // stays open and the same until the AsyncFd, its only owner, drops it;
    // nothing here swaps the inner value.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// One non-blocking send of `bufs` (as one message part), without SIGPIPE.
fn send(sock: &StdUnixStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    loop {
        // SAFETY: a zeroed msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024) as _;
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices outlive
        // the call and the kernel only reads them.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl WriteHalf {
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.waiter.is_none() {
                match send(self.io.get_ref(), bufs) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    r => return Poll::Ready(r),
                }
                let dup = self.io.get_ref().as_fd().try_clone_to_owned()?;
                self.waiter = Some(register(dup, Interest::WRITABLE)?);
            }
            let Some(waiter) = &self.waiter else { continue };
            let mut guard = ready!(waiter.poll_write_ready(cx))?;
            let r = guard.try_io(|_| send(self.io.get_ref(), bufs));
            drop(guard);
            if let Ok(r) = r {
                // Done blocking: stop listening for write readiness.
                self.waiter = None;
                return Poll::Ready(r);
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.get_ref().shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

#[cfg(feature = "tonic")]
impl tonic::transport::server::Connected for UnixConn {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::UdsConnectInfo {
            peer_addr: self.peer_addr.clone(),
            peer_cred: self.peer_cred,
        }
    }
}

#[cfg(test)]
mod tests;
