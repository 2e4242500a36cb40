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

pub use crate::chain_error::{cert_der, CertRole, ChainLink, Mismatch, RootsFault, VerifyError};
pub use crate::product::Product;
use crate::report::{Report, SigningKey, Tcb, SIG_ALGO_ECDSA_P384_SHA384};

/// What a successful verification established.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Product line (None for simulated reports).
    pub product: Option<Product>,
    /// The TCB the endorsement key certifies.
    pub tcb: Tcb,
    /// Whether the report came from the simulated PSP.
    pub simulated: bool,
    /// The key that signed the report (VCEK or VLEK).
    pub signing_key: SigningKey,
    /// A VLEK's cloud-provider id (extension 1.3.6.1.4.1.3704.1.5), if any.
    pub csp_id: Option<String>,
}

fn parse_as(der: &[u8], role: CertRole) -> Result<X509Certificate<'_>, VerifyError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| VerifyError::Certificate {
            role,
            detail: e.to_string(),
        })
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, VerifyError> {
    parse_as(der, CertRole::Endorsement)
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

const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";
const OID_CSP_ID: &str = "1.3.6.1.4.1.3704.1.5";

/// The TCB certified by an endorsement key's (VCEK or VLEK) extensions.
pub fn vcek_tcb(vcek_der: &[u8], turin: bool) -> Result<Tcb, VerifyError> {
    let c = parse(vcek_der)?;
    let key = if ext_value(&c, OID_HWID).is_some() {
        "VCEK"
    } else {
        "VLEK"
    };
    let get = |oid: &'static str| ext_u8(&c, oid).ok_or(VerifyError::MissingExtension { key, oid });
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

/// What kind of endorsement key a certificate is: a VCEK carries a
/// hardware id; a VLEK carries none (it may carry a CSP id, and AMD names
/// it `SEV-VLEK`).
pub fn cert_kind(der: &[u8]) -> Result<SigningKey, VerifyError> {
    let c = parse(der)?;
    let vlek_name = c.subject().to_string().contains("VLEK");
    Ok(
        if ext_value(&c, OID_HWID).is_some() && !vlek_name && ext_value(&c, OID_CSP_ID).is_none() {
            SigningKey::Vcek
        } else {
            SigningKey::Vlek
        },
    )
}

/// A VLEK's CSP id extension as text (a DER string, or raw bytes).
fn csp_id(der: &[u8]) -> Option<String> {
    let c = parse(der).ok()?;
    let v = ext_value(&c, OID_CSP_ID)?;
    let text = match v {
        [0x0C | 0x13 | 0x16, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => v,
    };
    Some(
        text.iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '?'
                }
            })
            .collect(),
    )
}

/// The checks every report gets before its chain: SIGNATURE_ALGO and the
/// signing key KEY_INFO names (VCEK or VLEK; no key or a reserved one is
/// refused).
pub fn precheck(report: &Report) -> Result<SigningKey, VerifyError> {
    if report.sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(VerifyError::SignatureAlgo(report.sig_algo));
    }
    match report.signing_key() {
        SigningKey::None => Err(VerifyError::Unsigned),
        SigningKey::Reserved(v) => Err(VerifyError::ReservedKey(v)),
        k => Ok(k),
    }
}

/// The product to verify against: the report's CPUID (version ≥ 3) wins
/// and a different `given` is refused; otherwise `given`, otherwise the
/// certificate's issuer.
pub fn resolve_product(
    report: &Report,
    given: Option<Product>,
    cert_der: &[u8],
) -> Result<Product, VerifyError> {
    match (given, report.cpuid_product()) {
        (Some(given), Some(detected)) if given != detected => {
            Err(VerifyError::ProductMismatch { given, detected })
        }
        (Some(p), _) | (None, Some(p)) => Ok(p),
        (None, None) => product_of(cert_der).ok_or(VerifyError::UnknownProduct),
    }
}

/// Checks the endorsement key's extensions against the report: TCB
/// components equal REPORTED_TCB; a VCEK's hardware id equals CHIP_ID
/// (its first 8 bytes on Turin); a VLEK has no hardware id (KEY_INFO and
/// certificate must agree on the kind of key).
fn check_extensions(
    report: &Report,
    cert_der: &[u8],
    turin: bool,
    key: SigningKey,
) -> Result<(Tcb, Option<String>), VerifyError> {
    let kind = cert_kind(cert_der)?;
    if kind != key {
        return Err(VerifyError::KeyMismatch {
            report: key,
            cert: kind,
        });
    }
    let tcb = vcek_tcb(cert_der, turin)?;
    let reported = Tcb::decode(report.reported_tcb_raw, turin);
    if tcb != reported {
        return Err(VerifyError::Mismatch(Mismatch::Tcb {
            key,
            certified: tcb,
            reported,
        }));
    }
    if key == SigningKey::Vlek {
        return Ok((tcb, csp_id(cert_der)));
    }
    let c = parse(cert_der)?;
    let hwid = ext_value(&c, OID_HWID).ok_or(VerifyError::MissingExtension {
        key: "VCEK",
        oid: OID_HWID,
    })?;
    let want = if turin {
        report.chip_id.get(..8).unwrap_or(&[])
    } else {
        &report.chip_id[..]
    };
    if !ext_is(hwid, want) {
        return Err(VerifyError::Mismatch(Mismatch::HardwareId));
    }
    Ok((tcb, None))
}

/// Verifies the report's signature with a P-384 public key (SEC1 bytes).
pub fn check_signature(report: &Report, sec1: &[u8]) -> Result<(), VerifyError> {
    use p384::ecdsa::signature::DigestVerifier;
    let vk = p384::ecdsa::VerifyingKey::from_sec1_bytes(sec1).map_err(|e| {
        VerifyError::EndorsementKey {
            detail: e.to_string(),
        }
    })?;
    let sig = report.signature().ok_or(VerifyError::MalformedSignature)?;
    let digest = Sha384::new_with_prefix(report.signed_bytes());
    vk.verify_digest(digest, &sig)
        .map_err(|_| VerifyError::BadSignature(report.signing_key()))
}

/// Checks a VCEK (DER) against the built-in AMD ASK and ARK of `product`
/// (or of the product its issuer names); returns the product and the
/// VCEK's SEC1 public key.
pub fn check_amd_chain(
    vcek_der: &[u8],
    product: Option<Product>,
) -> Result<(Product, Vec<u8>), VerifyError> {
    let product = product
        .or_else(|| product_of(vcek_der))
        .ok_or(VerifyError::UnknownProduct)?;
    let sec1 = crate::amd::check_endorsement(vcek_der, product, SigningKey::Vcek)?;
    Ok((product, sec1))
}

/// Verifies an AMD report against AMD's roots. `cert_der` is the
/// endorsement key KEY_INFO names: a VCEK (chain VCEK → ASK → ARK) or a
/// VLEK (VLEK → ASVK → ARK, with AMD's ASVK embedded in this crate).
/// `product` is optional for version ≥ 3 reports (CPUID names it) and
/// refused if it disagrees with CPUID.
pub fn verify_amd(
    report: &Report,
    cert_der: &[u8],
    product: Option<Product>,
) -> Result<Verified, VerifyError> {
    let key = precheck(report)?;
    let product = resolve_product(report, product, cert_der)?;
    let sec1 = crate::amd::check_endorsement(cert_der, product, key)?;
    check_signature(report, &sec1)?;
    let (tcb, csp_id) = check_extensions(report, cert_der, product == Product::Turin, key)?;
    Ok(Verified {
        product: Some(product),
        tcb,
        simulated: false,
        signing_key: key,
        csp_id,
    })
}

/// Verifies a report against an explicitly trusted root: chain
/// `cert_der` (VCEK or VLEK, as KEY_INFO says) → `intermediate_der`
/// (ASK or ASVK) → `trusted_ark_der` (all DER, ECDSA or RSA signatures
/// as `x509-parser` checks them), then signature and extensions. For
/// operator-run roots (the simulated PSP) and tests.
pub fn verify_with_roots(
    report: &Report,
    cert_der: &[u8],
    intermediate_der: &[u8],
    trusted_ark_der: &[u8],
) -> Result<Verified, VerifyError> {
    let key = precheck(report)?;
    let ark = parse_as(trusted_ark_der, CertRole::Root)?;
    let ca = parse_as(intermediate_der, CertRole::Intermediate)?;
    let cert = parse(cert_der)?;
    ark.verify_signature(None)
        .map_err(|_| VerifyError::Chain(ChainLink::ArkNotSelfSigned))?;
    ca.verify_signature(Some(ark.public_key()))
        .map_err(|_| VerifyError::Chain(ChainLink::IntermediateNotSignedByArk(key)))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| VerifyError::Chain(ChainLink::KeyNotSignedByIntermediate(key)))?;
    check_signature(report, &cert.public_key().subject_public_key.data)?;
    let product = report.cpuid_product();
    let (tcb, csp_id) = check_extensions(report, cert_der, product == Some(Product::Turin), key)?;
    Ok(Verified {
        product,
        tcb,
        simulated: report.is_simulated(),
        signing_key: key,
        csp_id,
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
        return Err(VerifyError::Mismatch(Mismatch::NotSimulated));
    }
    let mut v = verify_with_roots(report, vcek_der, ask_der, trusted_ark_der)?;
    v.product = None;
    v.simulated = true;
    Ok(v)
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
