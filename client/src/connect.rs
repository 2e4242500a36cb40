//! Connecting to a broker as a parent (used by `bubblectl`, tests and the
//! benchmark).

use std::path::{Path, PathBuf};

use bubble_proto::v1::broker_client::BrokerClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A gRPC client of the broker.
pub type Client = BrokerClient<Channel>;

/// Largest message a client accepts (payload limit plus framing).
const CLIENT_MAX_MESSAGE: usize = 64 << 20;

/// Errors while connecting to a broker.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker could not be reached.
    #[error("cannot connect to the broker at {target}: {detail}")]
    Connect {
        /// Socket path or URL.
        target: String,
        /// Cause.
        detail: String,
    },
    /// TLS material could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The innermost cause of a transport error, the one that says what went
/// wrong ("No such file or directory (os error 2)", a TLS alert), on one
/// line.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string().replace('\n', " ")
}

fn limits(c: BrokerClient<Channel>) -> BrokerClient<Channel> {
    c.max_decoding_message_size(CLIENT_MAX_MESSAGE)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE)
}

/// Connects over the broker's Unix socket.
pub async fn connect_unix(path: &Path) -> Result<BrokerClient<Channel>, ConnectError> {
    let p = path.to_path_buf();
    let channel = Endpoint::from_static("http://bubbled.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                // Read readiness only: the broker reading a request does
                // not wake this client's thread (see bubble-uds).
                let s = bubble_uds::UnixConn::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| ConnectError::Connect {
            target: path.display().to_string(),
            detail: root_cause(&e),
        })?;
    Ok(limits(BrokerClient::new(channel)))
}

/// Connects over TCP with mutual TLS as the parent whose certificate and key
/// are `cert` and `key`; `ca` is the CA that signed the server certificate,
/// which must name the URL's host.
pub async fn connect_tls(
    url: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<BrokerClient<Channel>, ConnectError> {
    connect_tls_named(url, ca, cert, key, None).await
}

/// Like [`connect_tls`], with the server certificate checked against
/// `server_name` instead of the URL's host when given (a broker reached
/// by an address its certificate does not name, e.g. through a tunnel).
pub async fn connect_tls_named(
    url: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    server_name: Option<&str>,
) -> Result<BrokerClient<Channel>, ConnectError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ConnectError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    // The server certificate is checked against the host the URL names
    // (a DNS name or an IP address), as in any TLS client, or against
    // `server_name`.
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    let err = |e: tonic::transport::Error| ConnectError::Connect {
        target: url.to_string(),
        detail: root_cause(&e),
    };
    let channel = Endpoint::from_shared(url.to_string())
        .map_err(err)?
        .tls_config(tls)
        .map_err(err)?
        .connect()
        .await
        .map_err(err)?;
    Ok(limits(BrokerClient::new(channel)))
}
