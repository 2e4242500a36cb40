//! The idle timeout after the handshake, as the attack: a parent that made
//! one call and then holds its connection open doing nothing loses it after
//! the configured time (on the Unix socket and over mutual TLS), while a
//! connection with an open `WatchEvents` stream is kept for many idle
//! periods and still delivers events; once its watch ends, it is idle too
//! and is closed.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use bubble_proto::v1::broker_client::BrokerClient;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const IDLE: Duration = Duration::from_millis(1500);

/// A client connection that reports when the broker closed it (its reads
/// end or fail).
struct Watched<S> {
    inner: S,
    closed: Arc<watch::Sender<bool>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let ended = match &r {
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended {
            this.closed.send_replace(true);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A client on one Unix-socket connection, and whether the broker closed
/// its first connection.
async fn unix_client(socket: &std::path::Path) -> (Client, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let p = socket.to_path_buf();
    let ch = Endpoint::from_static("http://bubbled.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let (p, tx) = (p.clone(), tx.clone());
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, io::Error>(TokioIo::new(Watched {
                    inner: s,
                    closed: tx,
                }))
            }
        }))
        .await
        .unwrap();
    (BrokerClient::new(ch), rx)
}

/// A client over mutual TLS as `parent-a`, and whether the broker closed
/// its first connection.
async fn tls_client(b: &BrokerProc) -> (Client, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let pki = b.dir.join("pki");
    let (cert, key) = bubbled::pki::parent_files(&pki, "parent-a");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(pki.join("ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    let addr = b.tls.unwrap();
    let ch = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let tx = tx.clone();
            async move {
                let s = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, io::Error>(TokioIo::new(Watched {
                    inner: s,
                    closed: tx,
                }))
            }
        }))
        .await
        .unwrap();
    (BrokerClient::new(ch), rx)
}

/// Waits until the connection is closed; fails the test after `limit`.
async fn closed_within(rx: &mut watch::Receiver<bool>, limit: Duration, what: &str) {
    tokio::time::timeout(limit, rx.wait_for(|c| *c))
        .await
        .unwrap_or_else(|_| panic!("{what}: not closed within {limit:?}"))
        .unwrap();
}

async fn list(c: &mut Client) {
    c.list_bubbles(pb::ListBubblesRequest::default())
        .await
        .unwrap();
}

/// One idle and one watching connection from `connect`.
async fn idle_closed_watch_kept<F, Fut>(connect: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Client, watch::Receiver<bool>)>,
{
    // A connection that makes one call and then does nothing.
    let (mut idle, mut idle_closed) = connect().await;
    list(&mut idle).await;
    let last_call = Instant::now();
    // A connection with a watch open.
    let (mut watcher, mut watch_closed) = connect().await;
    let mut events = watcher
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    closed_within(&mut idle_closed, IDLE * 10, "the idle connection").await;
    let after = last_call.elapsed();
    assert!(
        after >= IDLE - Duration::from_millis(100),
        "closed {after:?} after its last call, before the {IDLE:?} timeout"
    );
    // The watching connection outlives three idle periods.
    assert!(
        tokio::time::timeout(IDLE * 3, watch_closed.wait_for(|c| *c))
            .await
            .is_err(),
        "a connection with an open watch was closed as idle"
    );
    assert!(!*watch_closed.borrow());
    // And its watch still delivers: a bubble created by this parent on
    // another connection shows up on it.
    let (mut other, _) = connect().await;
    let made = other
        .create_bubble(create_req(16))
        .await
        .unwrap()
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(30), events.message())
        .await
        .expect("no event on the kept watch")
        .unwrap()
        .expect("watch ended");
    assert_eq!(ev.bubble_id, made.bubble_id);
    // Once the watch ends, the connection is idle too and is closed.
    drop(events);
    closed_within(
        &mut watch_closed,
        IDLE * 10,
        "the connection whose watch ended",
    )
    .await;
    // `other` sat idle meanwhile and may be closed itself: clean up on a
    // new connection.
    let (mut fresh, _) = connect().await;
    fresh
        .delete_bubble(pb::BubbleRef {
            bubble_id: made.bubble_id,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_unix_connection_is_closed_and_a_watching_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(format!("idle_timeout_ms = {}\n", IDLE.as_millis())),
            ..Default::default()
        },
    );
    let socket = b.socket.clone();
    idle_closed_watch_kept(|| unix_client(&socket)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_connection_is_closed_and_a_watching_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            config: Some(format!("idle_timeout_ms = {}\n", IDLE.as_millis())),
            ..Default::default()
        },
    );
    idle_closed_watch_kept(|| tls_client(&b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_is_not_idle() {
    // Calls more often than the timeout keep one connection open.
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(format!("idle_timeout_ms = {}\n", IDLE.as_millis())),
            ..Default::default()
        },
    );
    let (mut c, closed) = unix_client(&b.socket).await;
    let start = Instant::now();
    while start.elapsed() < IDLE * 4 {
        list(&mut c).await;
        assert!(!*closed.borrow(), "closed while calls kept coming");
        tokio::time::sleep(IDLE / 4).await;
    }
}
