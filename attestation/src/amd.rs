//! AMD's roots: the ARK and ASK the `sev` crate ships, and AMD's ASVK
//! (the CA of VLEKs) embedded from `certs/` (see `certs/PROVENANCE.md`).
//!
//! Each product's root pair is checked once per process (ARK self-signed,
//! ARK signs ASK / ASVK) and cached; later verifications only check the
//! endorsement key (VCEK or VLEK) against it.

use std::sync::OnceLock;

use sev::certs::snp::{builtin, ca, Certificate, Verifiable};

use crate::chain_error::{CertRole, RootsFault, VerifyError};
use crate::product::Product;
use crate::report::SigningKey;

/// AMD's published ASK, ARK, ASVK chain of each product (PEM, in that order).
pub const MILAN_ASK_ARK_ASVK: &[u8] = include_bytes!("../certs/milan_ask_ark_asvk.pem");
/// See [`MILAN_ASK_ARK_ASVK`].
pub const GENOA_ASK_ARK_ASVK: &[u8] = include_bytes!("../certs/genoa_ask_ark_asvk.pem");
/// See [`MILAN_ASK_ARK_ASVK`].
pub const TURIN_ASK_ARK_ASVK: &[u8] = include_bytes!("../certs/turin_ask_ark_asvk.pem");

/// The DER certificates of a PEM bundle, in order (stops at the first
/// malformed block).
pub fn pem_bundle(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .map_while(Result::ok)
        .map(|p| p.contents)
        .collect()
}

/// The embedded (ASK, ARK, ASVK) of `product`, DER.
pub fn embedded_chain(product: Product) -> Result<[Vec<u8>; 3], VerifyError> {
    let pem = match product {
        Product::Milan => MILAN_ASK_ARK_ASVK,
        Product::Genoa => GENOA_ASK_ARK_ASVK,
        Product::Turin => TURIN_ASK_ARK_ASVK,
    };
    let v = pem_bundle(pem);
    match <[Vec<u8>; 3]>::try_from(v) {
        Ok(a) => Ok(a),
        Err(_) => Err(roots(product, RootsFault::EmbeddedBundle, None)),
    }
}

fn roots(product: Product, fault: RootsFault, detail: Option<String>) -> VerifyError {
    VerifyError::Roots {
        product,
        fault,
        detail,
    }
}

fn builtin_ark(product: Product) -> Result<Certificate, VerifyError> {
    match product {
        Product::Milan => builtin::milan::ark(),
        Product::Genoa => builtin::genoa::ark(),
        Product::Turin => builtin::turin::ark(),
    }
    .map_err(|e| roots(product, RootsFault::BuiltinArk, Some(e.to_string())))
}

fn intermediate(product: Product, key: SigningKey) -> Result<Certificate, VerifyError> {
    let ark = builtin_ark(product)?;
    let mid = match key {
        SigningKey::Vlek => {
            let [_, _, asvk] = embedded_chain(product)?;
            Certificate::from_der(&asvk)
                .map_err(|e| roots(product, RootsFault::EmbeddedAsvk, Some(e.to_string())))?
        }
        _ => match product {
            Product::Milan => builtin::milan::ask(),
            Product::Genoa => builtin::genoa::ask(),
            Product::Turin => builtin::turin::ask(),
        }
        .map_err(|e| roots(product, RootsFault::BuiltinAsk, Some(e.to_string())))?,
    };
    let chain = ca::Chain { ark, ask: mid };
    (&chain)
        .verify()
        .map_err(|e| roots(product, RootsFault::ArkDoesNotSignCa, Some(e.to_string())))?;
    Ok(chain.ask)
}

/// The checked ASK (for a VCEK) or ASVK (for a VLEK) of `product`.
fn amd_ca(product: Product, key: SigningKey) -> Result<&'static Certificate, VerifyError> {
    type Slot = OnceLock<Result<Certificate, VerifyError>>;
    static ASK: [Slot; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    static ASVK: [Slot; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = match product {
        Product::Milan => 0,
        Product::Genoa => 1,
        Product::Turin => 2,
    };
    let table = if key == SigningKey::Vlek { &ASVK } else { &ASK };
    let slot = table.get(i).ok_or(VerifyError::UnknownProduct)?;
    slot.get_or_init(|| intermediate(product, key))
        .as_ref()
        .map_err(Clone::clone)
}

/// Checks an endorsement key certificate (DER) against AMD's CA for
/// `key`: the ASK for a VCEK, the ASVK for a VLEK. Returns its SEC1
/// public key.
pub fn check_endorsement(
    cert_der: &[u8],
    product: Product,
    key: SigningKey,
) -> Result<Vec<u8>, VerifyError> {
    let ca = amd_ca(product, key)?;
    let cert = Certificate::from_der(cert_der).map_err(|e| VerifyError::Certificate {
        role: CertRole::Endorsement,
        detail: e.to_string(),
    })?;
    (ca, &cert)
        .verify()
        .map_err(|_| VerifyError::NotSignedByAmd { product, key })?;
    Ok(cert.public_key_sec1().to_vec())
}
