//! A development PKI for mutual TLS: one CA that signs both the broker's
//! server certificate and the parents' client certificates.
//!
//! `bubblectl pki init DIR` writes `ca.pem`, `ca.key`, `server.pem`,
//! `server.key` and `parents/<name>.pem|.key`; private keys are mode 0600.
//! The parent id the broker sees is `cert:<name>` (the certificate's CN).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Common name of the development CA.
const CA_CN: &str = "bubbled development CA";

/// Errors while creating PKI files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A parent name is not usable as a certificate CN.
    #[error("parent name {0:?} must be 1-64 characters of A-Z a-z 0-9 - _ .")]
    BadName(String),
    /// `init` would overwrite an existing CA.
    #[error("{0} already holds a CA; use another directory or `pki add-parent`")]
    Exists(PathBuf),
    /// `add-parent` would replace an existing parent's key.
    #[error("parent {0:?} already has a certificate; pass --force to replace its key")]
    ParentExists(String),
    /// A subject alternative name is neither a DNS name nor an IP address.
    #[error("--san {0:?} is neither a DNS name nor an IP address")]
    BadSan(String),
    /// A validity out of range.
    #[error("--days {0}: must be 1..={MAX_DAYS}")]
    BadDays(u32),
    /// The replaced certificate could not be revoked.
    #[error(transparent)]
    Revoked(#[from] crate::revoked::RevokedError),
}

/// Longest validity `--days` accepts (100 years).
pub const MAX_DAYS: u32 = 36_500;

/// Sets a certificate's validity to `days` from now (from a minute ago,
/// for clocks slightly behind); `None` keeps rcgen's default (1975-4096).
fn set_validity(p: &mut CertificateParams, days: Option<u32>) -> Result<(), PkiError> {
    if let Some(d) = days {
        if d == 0 || d > MAX_DAYS {
            return Err(PkiError::BadDays(d));
        }
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(i64::from(d));
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        // Private keys live here: the directories are 0700.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn ca_params_for(days: Option<u32>) -> Result<CertificateParams, PkiError> {
    let mut p = ca_params();
    set_validity(&mut p, days)?;
    Ok(p)
}

fn leaf_params(
    cn: &str,
    sans: Vec<String>,
    server: bool,
    days: Option<u32>,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(sans)?;
    set_validity(&mut p, days)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    Ok(p)
}

fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

fn load_ca(dir: &Path) -> Result<KeyPair, PkiError> {
    let path = dir.join("ca.key");
    let pem = fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })?;
    Ok(KeyPair::from_pem(&pem)?)
}

/// Creates the CA, the server certificate (for `localhost` and 127.0.0.1)
/// and one client certificate per parent name.
pub fn init(dir: &Path, parents: &[String]) -> Result<(), PkiError> {
    init_with_sans(dir, parents, &[], None)
}

/// A DNS name (letters, digits, `-`, `.`, a leading `*.`) or an IP address.
fn validate_san(san: &str) -> Result<(), PkiError> {
    if san.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let host = san.strip_prefix("*.").unwrap_or(san);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadSan(san.to_string()))
    }
}

/// Like [`init`], with the server certificate also naming each of `sans`
/// (DNS names or IP addresses), and every certificate valid for `days`
/// from now (`None`: rcgen's default, 1975 to 4096).
pub fn init_with_sans(
    dir: &Path,
    parents: &[String],
    sans: &[String],
    days: Option<u32>,
) -> Result<(), PkiError> {
    if dir.join("ca.key").exists() {
        return Err(PkiError::Exists(dir.to_path_buf()));
    }
    for p in parents {
        validate_name(p)?;
    }
    for s in sans {
        validate_san(s)?;
    }
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params_for(days)?.self_signed(&ca_key)?;
    write_file(
        &dir.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
    let issuer = Issuer::new(ca_params(), &ca_key);
    let server_key = KeyPair::generate()?;
    let server = leaf_params("bubbled", names, true, days)?.signed_by(&server_key, &issuer)?;
    write_file(
        &dir.join("server.key"),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&dir.join("server.pem"), server.pem().as_bytes(), 0o644)?;
    for p in parents {
        add_parent_with(dir, p, &issuer, days)?;
    }
    Ok(())
}

/// Issues a client certificate for one more parent with an existing CA,
/// valid for `days` (`None`: rcgen's default); refuses to replace an
/// existing parent's key unless `force`, and then revokes the certificate
/// it replaces (see [`crate::revoked`]).
pub fn add_parent(dir: &Path, name: &str, force: bool, days: Option<u32>) -> Result<(), PkiError> {
    issue_parent(dir, dir, name, force, days)
}

/// Issues a client certificate for parent `name`, signed by the CA in
/// `ca_dir`, into `out_dir/parents/` (a throw-away directory for load
/// tests, or `ca_dir` itself); refuses to replace an existing one unless
/// `force`, and then adds the replaced certificate to `out_dir`'s
/// denylist before issuing the new one.
pub fn issue_parent(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    force: bool,
    days: Option<u32>,
) -> Result<(), PkiError> {
    validate_name(name)?;
    let old = parent_files(out_dir, name).0;
    if old.exists() {
        if !force {
            return Err(PkiError::ParentExists(name.to_string()));
        }
        let der = crate::revoked::cert_der(&old)?;
        crate::revoked::revoke(out_dir, &der, name)?;
    }
    let ca_key = load_ca(ca_dir)?;
    let issuer = Issuer::new(ca_params(), &ca_key);
    add_parent_with(out_dir, name, &issuer, days)
}

fn add_parent_with(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, &KeyPair>,
    days: Option<u32>,
) -> Result<(), PkiError> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(name, vec![], false, days)?.signed_by(&key, issuer)?;
    let (c, k) = parent_files(dir, name);
    write_file(&k, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&c, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Paths of a parent's certificate and key inside a PKI directory.
pub fn parent_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = dir.join("parents");
    (d.join(format!("{name}.pem")), d.join(format!("{name}.key")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_private_keys_0600_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["alice".into()]).unwrap();
        for k in ["ca.key", "server.key", "parents/alice.key"] {
            let mode = fs::metadata(d.path().join(k)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{k}");
        }
        assert!(matches!(init(d.path(), &[]), Err(PkiError::Exists(_))));
        add_parent(d.path(), "bob", false, None).unwrap();
        let before = fs::read(parent_files(d.path(), "bob").1).unwrap();
        assert!(matches!(
            add_parent(d.path(), "bob", false, None),
            Err(PkiError::ParentExists(_))
        ));
        assert_eq!(fs::read(parent_files(d.path(), "bob").1).unwrap(), before);
        add_parent(d.path(), "bob", true, None).unwrap();
        assert_ne!(fs::read(parent_files(d.path(), "bob").1).unwrap(), before);
        let mode = fs::metadata(d.path().join("parents"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let pem = fs::read(parent_files(d.path(), "bob").0).unwrap();
        let der = rustls_pem(&pem);
        assert_eq!(crate::identity::cert_parent(&der).unwrap(), "cert:bob");
        assert!(matches!(
            add_parent(d.path(), "no/slash", false, None),
            Err(PkiError::BadName(_))
        ));
    }

    #[test]
    fn sans_are_dns_names_or_ip_addresses() {
        for ok in ["broker.example", "10.0.0.7", "::1", "*.example.org", "a-b"] {
            validate_san(ok).unwrap();
        }
        for bad in ["", "a b", "-x.example", "a..b", "x/y"] {
            assert!(
                matches!(validate_san(bad), Err(PkiError::BadSan(_))),
                "{bad}"
            );
        }
    }

    fn rustls_pem(pem: &[u8]) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).unwrap();
        p.contents
    }
}
