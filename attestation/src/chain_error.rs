//! Why a report did not verify, and reading certificates as DER.
//!
//! Every variant says *what* failed in a form a caller can match on; the
//! only free text is the third-party parser's own message in `detail`
//! fields, which is for people and never to be matched.

use crate::product::Product;
use crate::report::{SigningKey, Tcb};

/// Which certificate of a chain a problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    /// The endorsement key (VCEK or VLEK) that signed the report.
    Endorsement,
    /// The intermediate CA (ASK or ASVK).
    Intermediate,
    /// The root (ARK).
    Root,
}

impl CertRole {
    /// The role's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            CertRole::Endorsement => "endorsement key (VCEK/VLEK)",
            CertRole::Intermediate => "intermediate CA (ASK/ASVK)",
            CertRole::Root => "root (ARK)",
        }
    }
}

/// Which link of an explicitly rooted chain does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainLink {
    /// The trusted ARK does not verify its own signature.
    ArkNotSelfSigned,
    /// The intermediate (ASK for a VCEK, ASVK for a VLEK) is not signed
    /// by the trusted ARK.
    IntermediateNotSignedByArk(SigningKey),
    /// The endorsement key is not signed by the intermediate.
    KeyNotSignedByIntermediate(SigningKey),
}

impl std::fmt::Display for ChainLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainLink::ArkNotSelfSigned => f.write_str("ARK is not self-signed"),
            ChainLink::IntermediateNotSignedByArk(k) => {
                write!(f, "{} is not signed by the trusted ARK", ca_name(*k))
            }
            ChainLink::KeyNotSignedByIntermediate(k) => {
                write!(f, "{} is not signed by the {}", k.name(), ca_name(*k))
            }
        }
    }
}

/// The CA that certifies `key`: the ASVK for a VLEK, the ASK otherwise.
pub fn ca_name(key: SigningKey) -> &'static str {
    if key == SigningKey::Vlek {
        "ASVK"
    } else {
        "ASK"
    }
}

/// What is wrong with AMD's own (built-in or embedded) roots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootsFault {
    /// The embedded PEM bundle is not ASK, ARK, ASVK.
    EmbeddedBundle,
    /// The built-in ARK does not parse.
    BuiltinArk,
    /// The built-in ASK does not parse.
    BuiltinAsk,
    /// The embedded ASVK does not parse.
    EmbeddedAsvk,
    /// The ARK does not sign the ASK or ASVK.
    ArkDoesNotSignCa,
}

impl std::fmt::Display for RootsFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RootsFault::EmbeddedBundle => "embedded chain is not ASK, ARK, ASVK",
            RootsFault::BuiltinArk => "built-in ARK",
            RootsFault::BuiltinAsk => "built-in ASK",
            RootsFault::EmbeddedAsvk => "embedded ASVK",
            RootsFault::ArkDoesNotSignCa => "ARK does not sign the CA",
        })
    }
}

/// Which fact in the endorsement key's extensions disagrees with the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The certified TCB is not REPORTED_TCB.
    Tcb {
        /// VCEK or VLEK.
        key: SigningKey,
        /// What the certificate certifies.
        certified: Tcb,
        /// What the report says.
        reported: Tcb,
    },
    /// The VCEK's hardware id is not CHIP_ID.
    HardwareId,
    /// A report checked against a simulated chain lacks the SIMULATED
    /// chip id.
    NotSimulated,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Tcb {
                key,
                certified,
                reported,
            } => write!(
                f,
                "{} certifies TCB {certified:?}, report says {reported:?}",
                key.name()
            ),
            Mismatch::HardwareId => f.write_str("VCEK hardware id differs from CHIP_ID"),
            Mismatch::NotSimulated => f.write_str(
                "a report checked against a simulated chain must carry the SIMULATED chip id",
            ),
        }
    }
}

/// Why a report did not verify (exit code 2 in the CLI).
#[derive(Clone, Debug, thiserror::Error)]
pub enum VerifyError {
    /// A certificate could not be parsed.
    #[error("certificate ({}): {detail}", role.name())]
    Certificate {
        /// Which certificate.
        role: CertRole,
        /// The parser's message (for people; never matched).
        detail: String,
    },
    /// The endorsement key's public key is not a P-384 point.
    #[error("endorsement public key: {detail}")]
    EndorsementKey {
        /// The parser's message (for people; never matched).
        detail: String,
    },
    /// The chain does not verify.
    #[error("certificate chain invalid: {0}")]
    Chain(ChainLink),
    /// The endorsement key is not certified by AMD's CA for its kind.
    #[error("the {} {} did not sign the {}", product.name(), ca_name(*key), key.name())]
    NotSignedByAmd {
        /// Product whose roots were used.
        product: Product,
        /// The key KEY_INFO names.
        key: SigningKey,
    },
    /// AMD's own roots could not be loaded or do not verify.
    #[error("AMD {} roots: {fault}{}", product.name(), detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Roots {
        /// The product whose roots failed.
        product: Product,
        /// What failed.
        fault: RootsFault,
        /// The parser's message, if one (for people; never matched).
        detail: Option<String>,
    },
    /// The report's signature field is not a valid ECDSA signature.
    #[error("report signature invalid: malformed signature")]
    MalformedSignature,
    /// The endorsement key did not sign this report.
    #[error("report signature invalid: the {} did not sign this report", .0.name())]
    BadSignature(SigningKey),
    /// The endorsement key's extensions disagree with the report.
    #[error("endorsement key does not match the report: {0}")]
    Mismatch(Mismatch),
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
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(bytes).map_err(|e| VerifyError::Certificate {
                role: CertRole::Endorsement,
                detail: format!("PEM: {e}"),
            })?;
        Ok(pem.contents)
    } else {
        Ok(bytes.to_vec())
    }
}
