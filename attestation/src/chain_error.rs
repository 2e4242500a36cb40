//! Why a report did not verify, and reading certificates as DER.

use crate::product::Product;
use crate::report::SigningKey;

/// Why a report did not verify (exit code 2 in the CLI).
#[derive(Clone, Debug, thiserror::Error)]
pub enum VerifyError {
    /// A certificate could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The chain does not verify.
    #[error("certificate chain invalid: {0}")]
    Chain(String),
    /// The endorsement key is not certified by AMD's CA for its kind.
    #[error("the {} {} did not sign the {}", product.name(), if *key == SigningKey::Vlek { "ASVK" } else { "ASK" }, key.name())]
    NotSignedByAmd {
        /// Product whose roots were used.
        product: Product,
        /// The key KEY_INFO names.
        key: SigningKey,
    },
    /// AMD's own roots could not be loaded or do not verify.
    #[error("AMD {} roots: {}", .0.name(), .1)]
    Roots(Product, String),
    /// The report signature does not verify.
    #[error("report signature invalid: {0}")]
    Signature(String),
    /// The endorsement key's extensions disagree with the report.
    #[error("endorsement key does not match the report: {0}")]
    Mismatch(String),
    /// The VCEK names no AMD product (and none was given).
    #[error("the VCEK is not issued by an AMD SEV product CA (Milan, Genoa, Turin); pass --product to force one")]
    UnknownProduct,
    /// SIGNATURE_ALGO is not ECDSA P-384 with SHA-384.
    #[error("SIGNATURE_ALGO is {0}, not 1 (ECDSA P-384 with SHA-384)")]
    SignatureAlgo(u32),
    /// KEY_INFO says no key signed the report.
    #[error("KEY_INFO.SIGNING_KEY is 7: the report is not signed")]
    Unsigned,
    /// KEY_INFO names a reserved signing key.
    #[error("KEY_INFO.SIGNING_KEY is the reserved value {0}")]
    ReservedKey(u8),
    /// The certificate is not the kind of key KEY_INFO names.
    #[error("KEY_INFO names a {} but the certificate is a {}", report.name(), cert.name())]
    KeyMismatch {
        /// What the report says signed it.
        report: SigningKey,
        /// What the certificate is.
        cert: SigningKey,
    },
    /// `--product` disagrees with the report's CPUID fields.
    #[error("the report's CPUID names {}, not {}", detected.name(), given.name())]
    ProductMismatch {
        /// The product the caller gave.
        given: Product,
        /// The product the report's CPUID family/model names.
        detected: Product,
    },
    /// The endorsement key certificate lacks a required extension.
    #[error("the {key} certificate lacks a valid extension {oid}")]
    MissingExtension {
        /// VCEK or VLEK.
        key: &'static str,
        /// The OID.
        oid: &'static str,
    },
}

/// Reads a certificate given as PEM or DER.
pub fn cert_der(bytes: &[u8]) -> Result<Vec<u8>, VerifyError> {
    if bytes.starts_with(b"-----") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
            .map_err(|e| VerifyError::Certificate(format!("PEM: {e}")))?;
        Ok(pem.contents)
    } else {
        Ok(bytes.to_vec())
    }
}
