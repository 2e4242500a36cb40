//! Who is calling: the parent identity of a gRPC request.
//!
//! On the Unix socket a parent is its peer user (`uid:<n>`, from
//! `SO_PEERCRED`); on TCP it is the common name of its client certificate
//! (`cert:<cn>`), which mutual TLS has already verified against the broker's
//! parent CA.

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Maximum length of a certificate common name accepted as a parent id.
const MAX_CN_LEN: usize = 128;

/// Returns the parent identity of `req`, or UNAUTHENTICATED.
pub fn parent_of<T>(req: &Request<T>) -> Result<String, Status> {
    // Connections are wrapped for the idle timeout (`crate::idle`), so
    // their connect info is looked up through it.
    if let Some(certs) = crate::idle::tls_info(req.extensions()).and_then(|i| i.peer_certs()) {
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("client presented no certificate"))?;
        return cert_parent(leaf.as_ref());
    }
    if let Some(info) = crate::idle::uds_info(req.extensions()) {
        if let Some(cred) = info.peer_cred {
            return Ok(format!("uid:{}", cred.uid()));
        }
    }
    Err(Status::unauthenticated(
        "no parent identity: connect over the Unix socket or with a client certificate",
    ))
}

/// Derives the parent id from a DER client certificate's subject CN.
pub fn cert_parent(der: &[u8]) -> Result<String, Status> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Status::unauthenticated("client certificate cannot be parsed"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Status::unauthenticated("client certificate has no common name"))?;
    if cn.is_empty()
        || cn.len() > MAX_CN_LEN
        || !cn
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(Status::unauthenticated(
            "client certificate common name is not a valid parent id",
        ));
    }
    Ok(format!("cert:{cn}"))
}
