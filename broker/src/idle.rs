//! The idle timeout of a parent connection after its handshake: a
//! connection with no request open (no unary call in flight, no stream such
//! as `WatchEvents` still answering) for the configured time is closed.
//! HTTP/2 PINGs and other frames that open no request do not keep it open.
//!
//! Each connection is wrapped in [`Idle`], which carries an [`Activity`]
//! (open requests, when the last one ended) into every request's
//! extensions as part of its connect info; the [`IdleLayer`] counts a
//! request as open from its headers until its response body is finished or
//! dropped. When the timer runs out with nothing open, the connection's
//! reads end (end of stream) and the server drops it; the client sees the
//! connection close (a gRPC channel reconnects on its next call).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

/// Default idle timeout (five minutes).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// The requests of one connection.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    last_end: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            last_end: Mutex::new(Instant::now()),
        })
    }

    /// Counts a request as open until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenRequest(self.clone())
    }

    /// When the connection may be closed if nothing happens before then.
    fn deadline(&self, idle: Duration) -> Instant {
        if self.open.load(Ordering::SeqCst) > 0 {
            Instant::now() + idle
        } else {
            *self.last_end.lock() + idle
        }
    }
}

/// An open request; ends it when dropped.
struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        // The end time first, then the count: a reader that sees no open
        // request also sees when the last one ended.
        *self.0.last_end.lock() = Instant::now();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connect info of an [`Idle`] connection: the wrapped connection's,
/// and its [`Activity`].
#[derive(Clone, Debug)]
pub struct Tracked<T> {
    /// The wrapped connection's connect info.
    pub inner: T,
    activity: Arc<Activity>,
}

/// Peer credentials of a Unix-socket request, if it came over one.
pub fn uds_info(ext: &tonic::codegen::http::Extensions) -> Option<&UdsConnectInfo> {
    ext.get::<Tracked<UdsConnectInfo>>().map(|t| &t.inner)
}

/// The TLS connect info of a TCP request (verified client certificates).
pub fn tls_info(
    ext: &tonic::codegen::http::Extensions,
) -> Option<&TlsConnectInfo<Tracked<TcpConnectInfo>>> {
    ext.get::<TlsConnectInfo<Tracked<TcpConnectInfo>>>()
}

/// The activity of the connection a request came on.
fn activity_of(ext: &tonic::codegen::http::Extensions) -> Option<Arc<Activity>> {
    if let Some(t) = ext.get::<Tracked<UdsConnectInfo>>() {
        return Some(t.activity.clone());
    }
    tls_info(ext).map(|t| t.get_ref().activity.clone())
}

/// A connection closed after `idle` with no open request.
pub struct Idle<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The timeout and its timer; `None`: never closed for idleness.
    timer: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    closed: bool,
}

impl<S> Idle<S> {
    /// Wraps `inner`; the timer starts now (after the transport's own
    /// handshake for an accepted TCP connection, before TLS's). `None`
    /// turns the timeout off.
    pub fn new(inner: S, idle: Option<Duration>) -> Self {
        let activity = Activity::new();
        let timer = idle.map(|d| (d, Box::pin(tokio::time::sleep_until(activity.deadline(d)))));
        Self {
            inner,
            activity,
            timer,
            closed: false,
        }
    }

    /// Whether the timer ran out with nothing open (and registers `cx` for
    /// the next deadline otherwise).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((idle, timer)) = self.timer.as_mut() else {
            return false;
        };
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let next = self.activity.deadline(*idle);
            if next <= Instant::now() {
                return true;
            }
            timer.as_mut().reset(next);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_pending() && this.expired(cx) {
            tracing::debug!("closing a connection idle past the idle timeout");
            this.closed = true;
            return Poll::Ready(Ok(()));
        }
        r
    }
}

crate::wrap_io::delegate_write!(Idle);

impl<S: Connected> Connected for Idle<S> {
    type ConnectInfo = Tracked<S::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        Tracked {
            inner: self.inner.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

/// Counts each request as open on its connection until its response body
/// ends (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct IdleLayer;

impl<S> tower::Layer<S> for IdleLayer {
    type Service = IdleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleService { inner }
    }
}

/// See [`IdleLayer`].
#[derive(Clone, Debug)]
pub struct IdleService<S> {
    inner: S,
}

impl<S> tower::Service<HttpRequest> for IdleService<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let open = activity_of(req.extensions()).map(|a| a.begin());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match open {
                Some(open) => resp.map(|body| {
                    tonic::body::Body::new(OpenBody {
                        inner: body,
                        _open: open,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body holding its request open.
struct OpenBody {
    inner: tonic::body::Body,
    _open: OpenRequest,
}

impl http_body::Body for OpenBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadline_follows_open_requests() {
        let idle = Duration::from_secs(10);
        let a = Activity::new();
        let start = Instant::now();
        assert_eq!(a.deadline(idle), start + idle);
        let open = a.begin();
        tokio::time::advance(Duration::from_secs(30)).await;
        // An open request pushes the deadline forward.
        assert_eq!(a.deadline(idle), Instant::now() + idle);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(open);
        let ended = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        // Counted from when the last request ended.
        assert_eq!(a.deadline(idle), ended + idle);
    }
}
