//! Connection hygiene on the Unix socket (mode 0666: any local user can
//! connect): at most so many connections per uid, a deadline for the
//! HTTP/2 preface, and an accept loop that backs off and logs when the
//! process runs out of descriptors instead of spinning.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixListener;
use tracing::warn;

/// Limits of the Unix socket's connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open connections one uid may hold; more are closed at once.
    pub per_uid: usize,
    /// Time a new connection has to send its first bytes (the HTTP/2
    /// preface) before it is closed.
    pub handshake: Duration,
    /// Time a connection may stay without an open request before it is
    /// closed (Unix socket and mutual TLS; see [`crate::idle`]); `None`:
    /// never.
    pub idle: Option<Duration>,
}

/// Default [`ConnLimits::per_uid`].
pub const DEFAULT_PER_UID: usize = 256;
/// Default [`ConnLimits::handshake`].
pub const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            per_uid: DEFAULT_PER_UID,
            handshake: DEFAULT_HANDSHAKE,
            idle: Some(crate::idle::DEFAULT_IDLE),
        }
    }
}

/// Open connections per uid.
type Counts = Arc<Mutex<HashMap<u32, usize>>>;

/// A connection's place in its uid's count, given back when it closes.
pub struct Slot {
    counts: Counts,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        if let Some(n) = c.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.uid);
            }
        }
    }
}

/// Whether an accept error means the process (or system) is out of
/// descriptors or memory: waiting helps, retrying at once does not.
fn exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepted connections within the limits; never ends and never yields an
/// error (errors are logged, and exhaustion backs off up to a second).
pub fn accept_loop(
    listener: UnixListener,
    limits: ConnLimits,
) -> impl tokio_stream::Stream<Item = io::Result<Limited<bubble_uds::UnixConn>>> {
    let counts: Counts = Arc::default();
    futures::stream::unfold((listener, counts), move |(listener, counts)| async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            let s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) if exhausted(&e) => {
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64,
                              "cannot accept a connection: out of descriptors; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            let conn = match bubble_uds::UnixConn::from_tokio(s) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "registering a connection failed");
                    continue;
                }
            };
            let uid = conn.peer_cred().map_or(u32::MAX, |c| c.uid());
            let admitted = {
                let mut c = counts.lock();
                let n = c.entry(uid).or_insert(0);
                if *n < limits.per_uid {
                    *n += 1;
                    true
                } else {
                    false
                }
            };
            if !admitted {
                warn!(
                    uid,
                    cap = limits.per_uid,
                    "connection refused: too many from this uid"
                );
                continue;
            }
            let slot = Slot {
                counts: counts.clone(),
                uid,
            };
            let item = Limited::new(conn, slot, limits.handshake);
            return Some((Ok(item), (listener, counts)));
        }
    })
}

/// A connection holding its uid's slot, closed if its first bytes do not
/// come in time.
pub struct Limited<S> {
    inner: S,
    _slot: Slot,
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Limited<S> {
    fn new(inner: S, slot: Slot, handshake: Duration) -> Self {
        Self {
            inner,
            _slot: slot,
            handshake: Some(Box::pin(tokio::time::sleep(handshake))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.handshake = None;
        }
        let expired = r.is_pending()
            && this
                .handshake
                .as_mut()
                .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if expired {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface in time",
            )));
        }
        r
    }
}

crate::wrap_io::delegate_write_and_connect_info!(Limited);
