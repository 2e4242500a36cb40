//! Revoked parent certificates: a denylist of SHA-256 fingerprints (of a
//! certificate's DER) in the PKI directory's `revoked` file, written by
//! `bubblectl pki revoke` and by `pki add-parent --force` (which revokes the
//! certificate it replaces). The broker checks every mutual-TLS request's
//! client certificate against it (see [`RevokedLayer`]) and re-reads the
//! file when it changes, so a revocation takes effect on the next request
//! without a restart, on connections already open too; a response stream
//! already open (`WatchEvents`, `StreamLogs --follow`, `AdminWatchEvents`)
//! re-checks every [`STREAM_RECHECK`] and ends with UNAUTHENTICATED once
//! its certificate is revoked.
//!
//! File format: one revoked certificate a line, `<64 hex digits>` then
//! optionally a space and a note (the parent name and when); `#` starts a
//! comment line. A line that is neither makes the whole list unreadable,
//! and the broker then refuses every TLS request (fails closed).

use std::collections::HashSet;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// Name of the denylist in a PKI directory.
pub const REVOKED_FILE: &str = "revoked";

/// A certificate fingerprint: SHA-256 of its DER.
pub type Fingerprint = [u8; 32];

/// The fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

/// Errors of the denylist.
#[derive(Debug, thiserror::Error)]
pub enum RevokedError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is not a fingerprint.
    #[error("{path} line {line}: not a SHA-256 fingerprint (64 hex digits)")]
    Malformed {
        /// File.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{0}: no PEM certificate")]
    NotACertificate(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RevokedError + '_ {
    move |source| RevokedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses the denylist file's text.
fn parse(path: &Path, text: &str) -> Result<HashSet<Fingerprint>, RevokedError> {
    let mut set = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hex_fp = line.split_whitespace().next().unwrap_or_default();
        let mut fp = [0u8; 32];
        hex::decode_to_slice(hex_fp, &mut fp).map_err(|_| RevokedError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
        })?;
        set.insert(fp);
    }
    Ok(set)
}

/// Reads a denylist; a missing file is an empty list.
pub fn read(path: &Path) -> Result<HashSet<Fingerprint>, RevokedError> {
    match std::fs::read_to_string(path) {
        Ok(t) => parse(path, &t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(io(path)(e)),
    }
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(pem_path: &Path) -> Result<Vec<u8>, RevokedError> {
    let pem = std::fs::read(pem_path).map_err(io(pem_path))?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| RevokedError::NotACertificate(pem_path.to_path_buf()))?;
    if p.label != "CERTIFICATE" {
        return Err(RevokedError::NotACertificate(pem_path.to_path_buf()));
    }
    Ok(p.contents)
}

/// Adds the certificate `der` to the denylist of PKI directory `dir`
/// (atomically: a new file renamed over the old one). `note` (a parent
/// name) is written beside it for people. Returns the fingerprint.
pub fn revoke(dir: &Path, der: &[u8], note: &str) -> Result<Fingerprint, RevokedError> {
    let path = dir.join(REVOKED_FILE);
    let fp = fingerprint(der);
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    // Refuse to extend a list the broker could not read.
    let set = parse(&path, &old)?;
    if set.contains(&fp) {
        return Ok(fp);
    }
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let note: String = note
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    let mut text = old;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{} {note} revoked-at={when}\n", hex::encode(fp)));
    tmp.write_all(text.as_bytes()).map_err(io(&path))?;
    tmp.as_file().sync_all().map_err(io(&path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(io(&path))?;
    }
    tmp.persist(&path).map_err(|e| io(&path)(e.error))?;
    Ok(fp)
}

/// Identity of the file's current version (device, inode, mtime, length).
type Version = Option<(u64, u64, i64, i64, u64)>;

fn version(path: &Path) -> Result<Version, RevokedError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Why a request's certificate is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The certificate is on the denylist.
    #[error("the client certificate has been revoked")]
    Revoked,
    /// The denylist cannot be read: every certificate is refused.
    #[error("the broker cannot read its certificate revocation list")]
    ListUnreadable,
}

/// The broker's view of the denylist, re-read when the file changes.
pub struct Denylist {
    path: PathBuf,
    state: Mutex<(Version, Result<HashSet<Fingerprint>, ()>)>,
}

impl Denylist {
    /// Reads the list at `path` (missing: empty); an unreadable list is an
    /// error at start.
    pub fn open(path: PathBuf) -> Result<Self, RevokedError> {
        let v = version(&path)?;
        let set = read(&path)?;
        Ok(Self {
            path,
            state: Mutex::new((v, Ok(set))),
        })
    }

    /// Whether the certificate `der` may be used.
    pub fn check(&self, der: &[u8]) -> Result<(), Refusal> {
        let mut st = self.state.lock();
        let v = version(&self.path);
        match v {
            Ok(v) if v == st.0 => {}
            Ok(v) => {
                st.1 = read(&self.path).map_err(|e| {
                    tracing::error!(error = %e, "revocation list unreadable: refusing every TLS request");
                });
                st.0 = v;
            }
            Err(e) => {
                tracing::error!(error = %e, "revocation list unreadable: refusing every TLS request");
                return Err(Refusal::ListUnreadable);
            }
        }
        match &st.1 {
            Ok(set) if set.contains(&fingerprint(der)) => Err(Refusal::Revoked),
            Ok(_) => Ok(()),
            Err(()) => Err(Refusal::ListUnreadable),
        }
    }
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

/// Refuses, with UNAUTHENTICATED, a mutual-TLS request whose client
/// certificate is on the denylist (UNAVAILABLE while the list is
/// unreadable).
#[derive(Clone)]
pub struct RevokedLayer(pub Arc<Denylist>);

impl<S> tower::Layer<S> for RevokedLayer {
    type Service = RevokedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RevokedService {
            inner,
            list: self.0.clone(),
        }
    }
}

/// See [`RevokedLayer`].
#[derive(Clone)]
pub struct RevokedService<S> {
    inner: S,
    list: Arc<Denylist>,
}

impl<S> tower::Service<HttpRequest> for RevokedService<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let leaf = crate::idle::tls_info(req.extensions())
            .and_then(|i| i.peer_certs())
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()));
        let Some(der) = leaf else {
            return Box::pin(self.inner.call(req));
        };
        if let Err(r) = self.list.check(&der) {
            return Box::pin(std::future::ready(Ok(r.status().into_http())));
        }
        let list = self.list.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| {
                tonic::body::Body::new(Revocable {
                    inner,
                    list,
                    der,
                    tick: None,
                    ended: false,
                })
            }))
        })
    }
}

impl Refusal {
    /// The gRPC status a refused request (or stream) gets.
    fn status(&self) -> tonic::Status {
        match self {
            Refusal::Revoked => tonic::Status::unauthenticated(self.to_string()),
            Refusal::ListUnreadable => tonic::Status::unavailable(self.to_string()),
        }
    }
}

/// How often an open response stream re-checks its client certificate: a
/// stream (`WatchEvents`, `StreamLogs --follow`, `AdminWatchEvents`)
/// whose certificate is revoked ends within this time of the change.
pub const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// A response body that ends with the refusal's status once its request's
/// certificate is revoked. The re-check timer starts only when the body
/// first waits (a unary answer, ready at once, never starts one).
struct Revocable {
    inner: tonic::body::Body,
    list: Arc<Denylist>,
    der: Vec<u8>,
    tick: Option<tokio::time::Interval>,
    ended: bool,
}

impl http_body::Body for Revocable {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(tick) = &mut this.tick {
            while tick.poll_tick(cx).is_ready() {
                if let Err(r) = this.list.check(&this.der) {
                    this.ended = true;
                    let mut trailers = tonic::codegen::http::HeaderMap::new();
                    if let Err(s) = r.status().add_header(&mut trailers) {
                        return Poll::Ready(Some(Err(s)));
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
                }
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() && this.tick.is_none() {
            let start = tokio::time::Instant::now() + STREAM_RECHECK;
            let mut tick = tokio::time::interval_at(start, STREAM_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Registers the waker for the first re-check.
            let _ = tick.poll_tick(cx);
            this.tick = Some(tick);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn revoke_appends_and_the_list_follows_the_file() {
        let d = tempfile::tempdir().unwrap();
        let list = Denylist::open(d.path().join(REVOKED_FILE)).unwrap();
        list.check(b"cert-a").unwrap();
        revoke(d.path(), b"cert-a", "parent-a").unwrap();
        assert!(matches!(list.check(b"cert-a"), Err(Refusal::Revoked)));
        list.check(b"cert-b").unwrap();
        revoke(d.path(), b"cert-b", "b").unwrap();
        revoke(d.path(), b"cert-b", "b").unwrap();
        let text = std::fs::read_to_string(d.path().join(REVOKED_FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(matches!(list.check(b"cert-b"), Err(Refusal::Revoked)));
        // A broken list refuses everything, and cannot be extended.
        std::fs::write(d.path().join(REVOKED_FILE), "zz not hex\n").unwrap();
        assert!(matches!(
            list.check(b"cert-c"),
            Err(Refusal::ListUnreadable)
        ));
        assert!(matches!(
            revoke(d.path(), b"cert-c", ""),
            Err(RevokedError::Malformed { line: 1, .. })
        ));
        assert!(Denylist::open(d.path().join(REVOKED_FILE)).is_err());
    }
}
