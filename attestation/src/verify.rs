//! Offline verification of a report: signature, certificate chain, and the
//! VCEK's TCB and hardware-id extensions against the report.
//!
//! - AMD SEV-SNP: VCEK → ASK → ARK, with the AMD roots for Milan, Genoa and
//!   Turin that the `sev` crate ships; the report's ECDSA P-384 signature
//!   over bytes `0..0x2A0` with the VCEK. `sev` does not compare the VCEK's
//!   X.509 extensions with the report, so this module does: the TCB
//!   components (OIDs 1.3.6.1.4.1.3704.1.3.{1,2,3,8} and .9 on Turin) must
//!   equal the report's REPORTED_TCB, and the hardware id (…1.4) must equal
//!   CHIP_ID (its first 8 bytes on Turin).
//! - Simulated (virtual PSP): the same checks against the operator's own
//!   ARK, which the verifier must be given explicitly.

use sha2::{Digest, Sha384};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::report::{Report, Tcb};

/// AMD product lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    /// EPYC 7003.
    Milan,
    /// EPYC 9004.
    Genoa,
    /// EPYC 9005.
    Turin,
}

impl Product {
    /// Parses `milan`, `genoa`, `turin`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "milan" => Some(Product::Milan),
            "genoa" => Some(Product::Genoa),
            "turin" => Some(Product::Turin),
            _ => None,
        }
    }

    /// Name for output.
    pub fn name(&self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }
}

/// Why a report did not verify (exit code 2 in the CLI).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A certificate could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The chain does not verify.
    #[error("certificate chain invalid: {0}")]
    Chain(String),
    /// The report signature does not verify.
    #[error("report signature invalid: {0}")]
    Signature(String),
    /// The VCEK's extensions disagree with the report.
    #[error("VCEK does not match the report: {0}")]
    Mismatch(String),
    /// The VCEK names no AMD product (and none was given).
    #[error("the VCEK is not issued by an AMD SEV product CA (Milan, Genoa, Turin); pass --product to force one")]
    UnknownProduct,
}

/// What a successful verification established.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Product line (None for simulated reports).
    pub product: Option<Product>,
    /// The TCB the VCEK certifies.
    pub tcb: Tcb,
    /// Whether the report came from the simulated PSP.
    pub simulated: bool,
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

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, VerifyError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| VerifyError::Certificate(e.to_string()))
}

/// The product named by a VCEK's issuer (`SEV-Milan`, ...).
pub fn product_of(vcek_der: &[u8]) -> Option<Product> {
    let c = parse(vcek_der).ok()?;
    let issuer = c.issuer().to_string();
    [Product::Milan, Product::Genoa, Product::Turin]
        .into_iter()
        .find(|p| issuer.contains(p.name()))
}

fn ext_value<'a>(c: &'a X509Certificate<'_>, oid: &str) -> Option<&'a [u8]> {
    c.extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
        .map(|e| e.value)
}

/// A TCB component: a DER INTEGER in 0..=255 (`02 01 xx`, or `02 02 00 xx`
/// for xx ≥ 0x80); anything else is refused.
fn ext_u8(c: &X509Certificate<'_>, oid: &str) -> Option<u8> {
    der_small_uint(ext_value(c, oid)?)
}

fn der_small_uint(v: &[u8]) -> Option<u8> {
    match v {
        [0x02, 0x01, v] if *v < 0x80 => Some(*v),
        [0x02, 0x02, 0x00, v] if *v >= 0x80 => Some(*v),
        _ => None,
    }
}

/// Whether an extension value is `want`, raw (as AMD issues the hwID) or
/// wrapped in a DER OCTET STRING.
fn ext_is(value: &[u8], want: &[u8]) -> bool {
    value == want
        || (want.len() < 0x80
            && value.len() == want.len() + 2
            && value[0] == 0x04
            && usize::from(value[1]) == want.len()
            && &value[2..] == want)
}

/// The TCB certified by a VCEK's extensions.
pub fn vcek_tcb(vcek_der: &[u8], turin: bool) -> Result<Tcb, VerifyError> {
    let c = parse(vcek_der)?;
    let get = |o: &str| {
        ext_u8(&c, o).ok_or_else(|| {
            VerifyError::Certificate(format!("VCEK lacks a valid TCB extension {o}"))
        })
    };
    Ok(Tcb {
        bootloader: get("1.3.6.1.4.1.3704.1.3.1")?,
        tee: get("1.3.6.1.4.1.3704.1.3.2")?,
        snp: get("1.3.6.1.4.1.3704.1.3.3")?,
        microcode: get("1.3.6.1.4.1.3704.1.3.8")?,
        fmc: if turin {
            Some(get("1.3.6.1.4.1.3704.1.3.9")?)
        } else {
            None
        },
    })
}

fn check_extensions(report: &Report, vcek_der: &[u8], turin: bool) -> Result<Tcb, VerifyError> {
    let tcb = vcek_tcb(vcek_der, turin)?;
    let reported = Tcb::decode(report.reported_tcb_raw, turin);
    if tcb != reported {
        return Err(VerifyError::Mismatch(format!(
            "VCEK certifies TCB {tcb:?}, report says {reported:?}"
        )));
    }
    let c = parse(vcek_der)?;
    let hwid = ext_value(&c, "1.3.6.1.4.1.3704.1.4")
        .ok_or_else(|| VerifyError::Certificate("VCEK lacks the hardware id".into()))?;
    let want = if turin {
        &report.chip_id[..8]
    } else {
        &report.chip_id[..]
    };
    if !ext_is(hwid, want) {
        return Err(VerifyError::Mismatch(
            "VCEK hardware id differs from CHIP_ID".into(),
        ));
    }
    Ok(tcb)
}

/// Verifies the report's signature with a P-384 public key (SEC1 bytes).
pub fn check_signature(report: &Report, sec1: &[u8]) -> Result<(), VerifyError> {
    use p384::ecdsa::signature::DigestVerifier;
    let vk = p384::ecdsa::VerifyingKey::from_sec1_bytes(sec1)
        .map_err(|e| VerifyError::Certificate(format!("VCEK public key: {e}")))?;
    let sig = report
        .signature()
        .ok_or_else(|| VerifyError::Signature("malformed signature".into()))?;
    let digest = Sha384::new_with_prefix(report.signed_bytes());
    vk.verify_digest(digest, &sig)
        .map_err(|_| VerifyError::Signature("the VCEK did not sign this report".into()))
}

/// The built-in AMD ASK of `product`, checked once per process (ARK
/// self-signed, ARK signs ASK) and cached; the roots are constants, so
/// later verifications only check the VCEK against it.
fn amd_ask(product: Product) -> Result<&'static sev::certs::snp::Certificate, VerifyError> {
    use sev::certs::snp::{builtin, ca, Certificate, Verifiable};
    use std::sync::OnceLock;
    static CACHE: [OnceLock<Result<Certificate, String>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let (slot, ark, ask) = match product {
        Product::Milan => (0, builtin::milan::ark(), builtin::milan::ask()),
        Product::Genoa => (1, builtin::genoa::ark(), builtin::genoa::ask()),
        Product::Turin => (2, builtin::turin::ark(), builtin::turin::ask()),
    };
    CACHE[slot]
        .get_or_init(|| {
            let ark = ark.map_err(|e| format!("built-in ARK: {e}"))?;
            let ask = ask.map_err(|e| format!("built-in ASK: {e}"))?;
            let chain = ca::Chain { ark, ask };
            (&chain)
                .verify()
                .map_err(|e| format!("built-in AMD roots: {e}"))?;
            Ok(chain.ask)
        })
        .as_ref()
        .map_err(|e| VerifyError::Chain(e.clone()))
}

/// Checks a VCEK (DER) against the built-in AMD ASK and ARK of `product`
/// (or of the product its issuer names); returns the product and the
/// VCEK's SEC1 public key.
pub fn check_amd_chain(
    vcek_der: &[u8],
    product: Option<Product>,
) -> Result<(Product, Vec<u8>), VerifyError> {
    use sev::certs::snp::{Certificate, Verifiable};
    let product = product
        .or_else(|| product_of(vcek_der))
        .ok_or(VerifyError::UnknownProduct)?;
    let ask = amd_ask(product)?;
    let vek =
        Certificate::from_der(vcek_der).map_err(|e| VerifyError::Certificate(e.to_string()))?;
    (ask, &vek).verify().map_err(|e| {
        VerifyError::Chain(format!(
            "the {} ASK did not sign the VCEK: {e}",
            product.name()
        ))
    })?;
    Ok((product, vek.public_key_sec1().to_vec()))
}

/// Verifies an AMD report with its VCEK (DER) against the built-in AMD roots.
pub fn verify_amd(
    report: &Report,
    vcek_der: &[u8],
    product: Option<Product>,
) -> Result<Verified, VerifyError> {
    let (product, sec1) = check_amd_chain(vcek_der, product)?;
    check_signature(report, &sec1)?;
    let tcb = check_extensions(report, vcek_der, product == Product::Turin)?;
    Ok(Verified {
        product: Some(product),
        tcb,
        simulated: false,
    })
}

/// Verifies a simulated report: chain VCEK → ASK → `trusted_ark` (all DER),
/// then signature and extensions.
pub fn verify_sim(
    report: &Report,
    vcek_der: &[u8],
    ask_der: &[u8],
    trusted_ark_der: &[u8],
) -> Result<Verified, VerifyError> {
    if !report.is_simulated() {
        return Err(VerifyError::Mismatch(
            "a report checked against a simulated chain must carry the SIMULATED chip id".into(),
        ));
    }
    let ark = parse(trusted_ark_der)?;
    let ask = parse(ask_der)?;
    let vcek = parse(vcek_der)?;
    ark.verify_signature(None)
        .map_err(|_| VerifyError::Chain("ARK is not self-signed".into()))?;
    ask.verify_signature(Some(ark.public_key()))
        .map_err(|_| VerifyError::Chain("ASK is not signed by the trusted ARK".into()))?;
    vcek.verify_signature(Some(ask.public_key()))
        .map_err(|_| VerifyError::Chain("VCEK is not signed by the ASK".into()))?;
    check_signature(report, &vcek.public_key().subject_public_key.data)?;
    let tcb = check_extensions(report, vcek_der, false)?;
    Ok(Verified {
        product: None,
        tcb,
        simulated: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcb_integers_are_strict() {
        let ok = der_small_uint;
        assert_eq!(ok(&[2, 1, 0x1b]), Some(0x1b));
        assert_eq!(ok(&[2, 2, 0, 0xde]), Some(0xde));
        assert_eq!(ok(&[2, 2, 1, 0xde]), None);
        assert_eq!(ok(&[2, 1, 0x80]), None);
        assert_eq!(ok(&[4, 1, 3]), None);
        assert!(ext_is(&[1, 2, 3], &[1, 2, 3]));
        assert!(ext_is(&[4, 3, 1, 2, 3], &[1, 2, 3]));
        assert!(!ext_is(&[4, 3, 1, 2, 4], &[1, 2, 3]));
        assert!(!ext_is(&[1, 2], &[1, 2, 3]));
    }
}
