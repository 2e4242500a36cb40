//! Serving the broker: gRPC on a Unix socket and on TCP with mutual TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bubble_proto::v1::broker_server::BrokerServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::BrokerService;
use crate::authority::AuthorityFix;
use crate::conn_limit::{ConnLimits, Limited};
use crate::core::Broker;
use crate::idle::{Idle, IdleLayer};

/// Room for the protobuf framing around a maximum-size payload.
const FRAMING_ALLOWANCE: usize = 64 * 1024;

/// Errors while starting a listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The address or path.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Another broker answers on the socket.
    #[error("another broker is serving on {0}; stop it first (or give this one --socket)")]
    InUse(PathBuf),
    /// TLS material could not be read or used.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Files of the broker's mutual-TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that signs parent (client) certificates (PEM).
    pub client_ca: PathBuf,
    /// Revoked client certificates (see [`crate::revoked`]; missing: none).
    pub revoked: PathBuf,
}

impl TlsFiles {
    /// The files `bubblectl pki init` writes into `dir`.
    pub fn in_pki_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("ca.pem"),
            revoked: dir.join(crate::revoked::REVOKED_FILE),
        }
    }
}

/// The standard gRPC health service: `bubble.v1.Broker` (and the whole
/// server, "") SERVING while every dependency checks out, NOT_SERVING
/// otherwise (`obs::health`).
async fn health(
    broker: &Arc<Broker>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_serving::<BrokerServer<BrokerService>>().await;
    let mut h = broker.health();
    tokio::spawn(async move {
        loop {
            let status = if h.borrow_and_update().serving() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter
                .set_service_status(
                    <BrokerServer<BrokerService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            reporter.set_service_status("", status).await;
            if h.changed().await.is_err() {
                return;
            }
        }
    });
    service
}

fn service(broker: &Arc<Broker>) -> BrokerServer<BrokerService> {
    let limit = broker.config().max_payload + FRAMING_ALLOWANCE;
    BrokerServer::new(BrokerService::new(broker.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}

/// Binds the Unix socket at `path`, replacing a stale socket file (one no
/// process answers on); a socket a live broker serves is left alone and
/// refused. Mode 0666: any local user may connect, and each is a separate
/// parent (its uid).
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        what: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(l)
}

/// The broker's socket file, removed when this is dropped (the broker
/// ends, or fails to start).
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

/// tonic answers a request over the message limit with OUT_OF_RANGE, a code
/// the API never uses otherwise: it becomes RESOURCE_EXHAUSTED naming the
/// broker's `max_payload`.
fn oversized_as_exhausted(max_payload: usize) -> impl Fn(HttpResponse) -> HttpResponse + Clone {
    move |mut resp: HttpResponse| {
        let over = tonic::Status::from_header_map(resp.headers())
            .is_some_and(|s| s.code() == tonic::Code::OutOfRange);
        if over {
            let s = tonic::Status::resource_exhausted(format!(
                "the message is larger than this broker accepts: max_payload is {max_payload} \
                 bytes (plus {FRAMING_ALLOWANCE} bytes of framing)"
            ));
            // The status of a trailers-only answer lives in its headers.
            let _ = s.add_header(resp.headers_mut());
        }
        resp
    }
}

fn limits_layer(
    broker: &Arc<Broker>,
) -> tower::util::MapResponseLayer<impl Fn(HttpResponse) -> HttpResponse + Clone> {
    tower::util::MapResponseLayer::new(oversized_as_exhausted(broker.config().max_payload))
}

/// Serves the broker on a bound Unix socket until `shutdown` resolves, with
/// the default connection limits.
pub async fn serve_unix(
    broker: Arc<Broker>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_unix_with(broker, listener, ConnLimits::default(), shutdown).await
}

/// Serves the broker on a bound Unix socket until `shutdown` resolves.
pub async fn serve_unix_with(
    broker: Arc<Broker>,
    listener: UnixListener,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .layer(IdleLayer)
        .layer(limits_layer(&broker))
        .add_service(health(&broker).await)
        .add_service(service(&broker))
        .serve_with_incoming_shutdown(parent_conns(listener, limits), shutdown)
        .await
}

/// Accepted parent connections within the per-uid cap and the handshake
/// deadline (see [`crate::conn_limit`]), registered for read readiness
/// only (a parent reading its answer does not wake the broker; see
/// bubble-uds), with their peer credentials, any `:authority` accepted
/// (see [`crate::authority`]) and the idle timeout (see [`crate::idle`]).
fn parent_conns(
    listener: UnixListener,
    limits: ConnLimits,
) -> impl tokio_stream::Stream<Item = std::io::Result<Idle<AuthorityFix<Limited<bubble_uds::UnixConn>>>>>
{
    crate::conn_limit::accept_loop(listener, limits)
        .map(move |c| c.map(|c| Idle::new(AuthorityFix::new(c), limits.idle)))
}

/// Binds a TCP listener.
pub async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: addr.to_string(),
            source,
        })
}

/// Serves the broker with mutual TLS on a bound TCP listener until
/// `shutdown` resolves. Clients without a certificate signed by the parent
/// CA are refused during the handshake, and a request with a revoked one
/// (DIR/revoked, re-read when it changes) is UNAUTHENTICATED; a connection with no open request
/// for `idle` is closed (see [`crate::idle`]).
pub async fn serve_tls(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: &TlsFiles,
    idle: Option<std::time::Duration>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())));
    let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let ca = Certificate::from_pem(read(&tls.client_ca)?);
    let revoked = crate::revoked::Denylist::open(tls.revoked.clone())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let cfg = ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(ca)
        .client_auth_optional(false);
    Server::builder()
        .tls_config(cfg)
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .layer(IdleLayer)
        .layer(crate::revoked::RevokedLayer(Arc::new(revoked)))
        .layer(limits_layer(&broker))
        .add_service(health(&broker).await)
        .add_service(service(&broker))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener).map(move |c| c.map(|c| Idle::new(c, idle))),
            shutdown,
        )
        .await
        .map_err(|e| ServeError::Tls(e.to_string()))
}
