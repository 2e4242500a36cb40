//! Serving the broker: gRPC on a Unix socket and on TCP with mutual TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bubble_proto::v1::broker_server::BrokerServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::BrokerService;
use crate::core::Broker;

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
}

impl TlsFiles {
    /// The files `bubblectl pki init` writes into `dir`.
    pub fn in_pki_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("ca.pem"),
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

/// Binds the Unix socket at `path`, replacing a stale socket file. Mode 0666:
/// any local user may connect, and each is a separate parent (its uid).
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        what: path.display().to_string(),
        source,
    };
    if path.exists() {
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(l)
}

/// Serves the broker on a bound Unix socket until `shutdown` resolves.
pub async fn serve_unix(
    broker: Arc<Broker>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(health(&broker).await)
        .add_service(service(&broker))
        .serve_with_incoming_shutdown(parent_conns(listener), shutdown)
        .await
}

/// Accepted parent connections, registered for read readiness only (a
/// parent reading its answer does not wake the broker; see bubble-uds),
/// with their peer credentials.
fn parent_conns(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<bubble_uds::UnixConn>> {
    UnixListenerStream::new(listener).map(|s| s.and_then(bubble_uds::UnixConn::from_tokio))
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
/// CA are refused during the handshake.
pub async fn serve_tls(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: &TlsFiles,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())));
    let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let ca = Certificate::from_pem(read(&tls.client_ca)?);
    let cfg = ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(ca)
        .client_auth_optional(false);
    Server::builder()
        .tls_config(cfg)
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .add_service(health(&broker).await)
        .add_service(service(&broker))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| ServeError::Tls(e.to_string()))
}
