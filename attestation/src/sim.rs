//! TEE backends: the virtual PSP (`sim`) and the real AMD SP (`snp`).
//!
//! **The `sim` backend gives no hardware protection.** It exists so that
//! the whole attestation flow runs on hosts without SEV-SNP (like this
//! project's CI). Its reports have the SNP layout and are signed by a VCEK
//! of the operator's own ARK → ASK → VCEK chain (P-384, generated at first
//! start, private keys 0600). Every sim report says so itself: its CHIP_ID
//! starts with `BUBBLE-SIMULATED`, and the sim VCEK's subject is
//! `CN=bubbled SIMULATED VCEK`. Verifiers print SIMULATED and the default
//! policy refuses such reports.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SigningKey, PKCS_ECDSA_P384_SHA384,
};
use sha2::{Digest, Sha384};

use crate::report::{Tcb, REPORT_LEN, SIGNED_LEN, SIM_CHIP_ID_PREFIX};

/// Errors of a TEE backend.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    /// The backend cannot run on this host.
    #[error("TEE backend {0} is not available on this host: {1}")]
    Unsupported(&'static str, String),
    /// Key or certificate files could not be used.
    #[error("virtual PSP files in {path}: {detail}")]
    Files {
        /// Directory.
        path: PathBuf,
        /// Cause.
        detail: String,
    },
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
}

/// What the guest and host contribute to a report.
#[derive(Clone, Debug)]
pub struct ReportRequest {
    /// Guest-chosen REPORT_DATA.
    pub report_data: [u8; 64],
    /// Launch measurement of the guest.
    pub measurement: [u8; 48],
    /// Host data bound at launch.
    pub host_data: [u8; 32],
}

/// The certificate chain, DER.
#[derive(Clone, Debug)]
pub struct CertChain {
    /// Root.
    pub ark: Vec<u8>,
    /// Intermediate.
    pub ask: Vec<u8>,
    /// Report-signing key.
    pub vcek: Vec<u8>,
}

/// A source of attestation reports.
pub trait TeeBackend: Send + Sync {
    /// `"sim"` or `"snp"`.
    fn name(&self) -> &'static str;
    /// A signed 1184-byte report.
    fn report(&self, req: &ReportRequest) -> Result<Vec<u8>, TeeError>;
    /// The chain that verifies the reports.
    fn cert_chain(&self) -> Result<CertChain, TeeError>;
}

/// The TCB the virtual PSP reports (and certifies in its VCEK).
pub const SIM_TCB: Tcb = Tcb {
    bootloader: 1,
    tee: 0,
    snp: 1,
    microcode: 0,
    fmc: None,
};

/// Guest policy in sim reports: SMT allowed, reserved bit 17 set, ABI 0.0;
/// debug and migration agent not allowed.
pub const SIM_GUEST_POLICY: u64 = (1 << 16) | (1 << 17);

/// The virtual PSP.
pub struct SimPsp {
    vcek_key: KeyPair,
    chain: CertChain,
    chip_id: [u8; 64],
}

fn files_err(path: &Path, e: impl std::fmt::Display) -> TeeError {
    TeeError::Files {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TeeError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| files_err(path, e))?;
    f.write_all(data).map_err(|e| files_err(path, e))
}

fn der_u8(v: u8) -> Vec<u8> {
    if v >= 0x80 {
        vec![0x02, 0x02, 0x00, v]
    } else {
        vec![0x02, 0x01, v]
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "bubbled virtual PSP (SIMULATED)");
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl SimPsp {
    /// Loads the chain from `dir`, or creates it there on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, TeeError> {
        std::fs::create_dir_all(dir).map_err(|e| files_err(dir, e))?;
        let f = |n: &str| dir.join(n);
        if !f("vcek.key").exists() {
            Self::create(dir)?;
        }
        let read = |n: &str| std::fs::read(f(n)).map_err(|e| files_err(&f(n), e));
        let key_pem = zeroize::Zeroizing::new(
            String::from_utf8(read("vcek.key")?).map_err(|e| files_err(dir, e))?,
        );
        let vcek_key = KeyPair::from_pem(&key_pem).map_err(|e| files_err(dir, e))?;
        let chain = CertChain {
            ark: read("ark.der")?,
            ask: read("ask.der")?,
            vcek: read("vcek.der")?,
        };
        let mut chip_id = [0u8; 64];
        chip_id[..SIM_CHIP_ID_PREFIX.len()].copy_from_slice(SIM_CHIP_ID_PREFIX);
        let h = Sha384::digest(vcek_key.public_key_raw());
        chip_id[SIM_CHIP_ID_PREFIX.len()..].copy_from_slice(&h[..64 - SIM_CHIP_ID_PREFIX.len()]);
        Ok(Self {
            vcek_key,
            chain,
            chip_id,
        })
    }

    fn create(dir: &Path) -> Result<(), TeeError> {
        let e = |x: rcgen::Error| files_err(dir, x);
        let ark_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(e)?;
        let ark = ca_params("bubbled SIMULATED ARK")
            .self_signed(&ark_key)
            .map_err(e)?;
        let ask_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(e)?;
        let ark_issuer = Issuer::new(ca_params("bubbled SIMULATED ARK"), &ark_key);
        let ask = ca_params("bubbled SIMULATED ASK")
            .signed_by(&ask_key, &ark_issuer)
            .map_err(e)?;
        let vcek_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(e)?;
        let mut chip_id = [0u8; 64];
        chip_id[..SIM_CHIP_ID_PREFIX.len()].copy_from_slice(SIM_CHIP_ID_PREFIX);
        let h = Sha384::digest(vcek_key.public_key_raw());
        chip_id[SIM_CHIP_ID_PREFIX.len()..].copy_from_slice(&h[..64 - SIM_CHIP_ID_PREFIX.len()]);
        let mut vp = CertificateParams::default();
        vp.distinguished_name = name("bubbled SIMULATED VCEK");
        vp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let oid = |last: u64| vec![1, 3, 6, 1, 4, 1, 3704, 1, 3, last];
        vp.custom_extensions = vec![
            CustomExtension::from_oid_content(&oid(1), der_u8(SIM_TCB.bootloader)),
            CustomExtension::from_oid_content(&oid(2), der_u8(SIM_TCB.tee)),
            CustomExtension::from_oid_content(&oid(3), der_u8(SIM_TCB.snp)),
            CustomExtension::from_oid_content(&oid(8), der_u8(SIM_TCB.microcode)),
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 3704, 1, 4], chip_id.to_vec()),
        ];
        let ask_issuer = Issuer::new(ca_params("bubbled SIMULATED ASK"), &ask_key);
        let vcek = vp.signed_by(&vcek_key, &ask_issuer).map_err(e)?;
        // Private keys 0600; the ARK and ASK keys are kept so the operator
        // can re-issue, but only the VCEK key is used to sign reports.
        for (n, k) in [
            ("ark.key", &ark_key),
            ("ask.key", &ask_key),
            ("vcek.key", &vcek_key),
        ] {
            let pem = zeroize::Zeroizing::new(k.serialize_pem());
            write_private(&dir.join(n), pem.as_bytes())?;
        }
        for (n, c) in [("ark.der", &ark), ("ask.der", &ask), ("vcek.der", &vcek)] {
            std::fs::write(dir.join(n), c.der()).map_err(|x| files_err(dir, x))?;
        }
        Ok(())
    }
}

/// Launch parameters a sim report states besides the request: in real SNP
/// they come from the guest's launch (guest policy) and the requesting
/// VMPL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimLaunch {
    /// VMPL of the requester (0..=3).
    pub vmpl: u32,
    /// Guest policy (SNP_LAUNCH_START POLICY bits).
    pub guest_policy: u64,
}

impl Default for SimLaunch {
    fn default() -> Self {
        Self {
            vmpl: 0,
            guest_policy: SIM_GUEST_POLICY,
        }
    }
}

impl SimPsp {
    /// A signed report with explicit launch parameters
    /// ([`TeeBackend::report`] uses [`SimLaunch::default`]).
    pub fn report_with(
        &self,
        req: &ReportRequest,
        launch: &SimLaunch,
    ) -> Result<Vec<u8>, TeeError> {
        let mut b = vec![0u8; REPORT_LEN];
        b[0..4].copy_from_slice(&2u32.to_le_bytes()); // version
        b[8..16].copy_from_slice(&launch.guest_policy.to_le_bytes());
        b[0x30..0x34].copy_from_slice(&launch.vmpl.to_le_bytes());
        b[0x34..0x38].copy_from_slice(&1u32.to_le_bytes()); // ECDSA P-384 SHA-384
        let tcb = SIM_TCB.encode().to_le_bytes();
        for at in [0x38, 0x180, 0x1E0, 0x1F0] {
            b[at..at + 8].copy_from_slice(&tcb); // current, reported, committed, launch
        }
        b[0x50..0x90].copy_from_slice(&req.report_data);
        b[0x90..0xC0].copy_from_slice(&req.measurement);
        b[0xC0..0xE0].copy_from_slice(&req.host_data);
        b[0x1A0..0x1E0].copy_from_slice(&self.chip_id);
        let der = self
            .vcek_key
            .sign(&b[..SIGNED_LEN])
            .map_err(|e| TeeError::Sign(e.to_string()))?;
        let sig =
            p384::ecdsa::Signature::from_der(&der).map_err(|e| TeeError::Sign(e.to_string()))?;
        let (r, s) = sig.split_bytes();
        let (mut r, mut s) = (r.to_vec(), s.to_vec());
        r.reverse();
        s.reverse();
        b[SIGNED_LEN..SIGNED_LEN + 48].copy_from_slice(&r);
        b[SIGNED_LEN + 72..SIGNED_LEN + 72 + 48].copy_from_slice(&s);
        Ok(b)
    }
}

impl TeeBackend for SimPsp {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn report(&self, req: &ReportRequest) -> Result<Vec<u8>, TeeError> {
        self.report_with(req, &SimLaunch::default())
    }

    fn cert_chain(&self) -> Result<CertChain, TeeError> {
        Ok(self.chain.clone())
    }
}

/// The real AMD secure processor, through `/dev/sev-guest` (the `sev`
/// crate's guest firmware API).
///
/// This asks the SP of the SEV-SNP guest *this process runs in*: the
/// hardware fills in MEASUREMENT, HOST_DATA, guest policy and TCB, so
/// `ReportRequest::measurement` and `host_data` are not used (only
/// `report_data`). A bubble's own report therefore has to come from inside
/// the bubble when bubbles are SNP guests (the shim's `MSG_REPORT_REQ`
/// through the GHCB); on a host without SEV-SNP, like this project's CI
/// (KVM has no SNP VM type here), [`SnpBackend::open`] returns
/// [`TeeError::Unsupported`] and nothing pretends otherwise.
pub struct SnpBackend {
    fw: std::sync::Mutex<sev::firmware::guest::Firmware>,
    vmpl: u32,
}

/// Path of the SEV-SNP guest device.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

impl SnpBackend {
    /// Opens `/dev/sev-guest`; reports will be requested at `vmpl`.
    pub fn open(vmpl: u32) -> Result<Self, TeeError> {
        if vmpl > 3 {
            return Err(TeeError::Unsupported(
                "snp",
                format!("VMPL {vmpl} (0 to 3)"),
            ));
        }
        let fw = sev::firmware::guest::Firmware::open().map_err(|e| {
            TeeError::Unsupported(
                "snp",
                format!(
                    "{SEV_GUEST_DEVICE}: {e} (this process is not in an SEV-SNP guest; \
                     use the sim backend, which is marked SIMULATED)"
                ),
            )
        })?;
        Ok(Self {
            fw: std::sync::Mutex::new(fw),
            vmpl,
        })
    }
}

impl TeeBackend for SnpBackend {
    fn name(&self) -> &'static str {
        "snp"
    }

    fn report(&self, req: &ReportRequest) -> Result<Vec<u8>, TeeError> {
        let mut fw = self
            .fw
            .lock()
            .map_err(|_| TeeError::Sign("sev-guest handle poisoned".into()))?;
        let raw = fw
            .get_report(None, Some(req.report_data), Some(self.vmpl))
            .map_err(|e| TeeError::Sign(format!("SNP_GET_REPORT: {e}")))?;
        if raw.len() != REPORT_LEN {
            return Err(TeeError::Sign(format!(
                "SNP_GET_REPORT returned {} bytes",
                raw.len()
            )));
        }
        Ok(raw)
    }

    fn cert_chain(&self) -> Result<CertChain, TeeError> {
        use sev::firmware::host::CertType;
        let mut fw = self
            .fw
            .lock()
            .map_err(|_| TeeError::Sign("sev-guest handle poisoned".into()))?;
        let (_, certs) = fw
            .get_ext_report(None, Some([0u8; 64]), Some(self.vmpl))
            .map_err(|e| TeeError::Sign(format!("SNP_GET_EXT_REPORT: {e}")))?;
        let no_vcek = || {
            TeeError::Unsupported(
                "snp",
                "the host supplied no VCEK; fetch it for this chip and TCB from AMD KDS".into(),
            )
        };
        let certs = certs.ok_or_else(no_vcek)?;
        let vcek = certs
            .iter()
            .find(|c| c.cert_type == CertType::VCEK)
            .map(|c| c.data.clone())
            .ok_or_else(no_vcek)?;
        let find = |t: CertType| {
            certs
                .iter()
                .find(|c| c.cert_type == t)
                .map(|c| c.data.clone())
        };
        let (ark, ask) = match (find(CertType::ARK), find(CertType::ASK)) {
            (Some(ark), Some(ask)) => (ark, ask),
            _ => builtin_ca_der(&vcek)?,
        };
        Ok(CertChain { ark, ask, vcek })
    }
}

/// The built-in AMD ARK and ASK (DER) for the product that issued `vcek`.
fn builtin_ca_der(vcek: &[u8]) -> Result<(Vec<u8>, Vec<u8>), TeeError> {
    use crate::product::Product;
    use sev::certs::snp::builtin;
    let e = |x: std::io::Error| TeeError::Sign(format!("built-in AMD certificates: {x}"));
    let (ark, ask) = match crate::verify::product_of(vcek) {
        Some(Product::Milan) => (builtin::milan::ark(), builtin::milan::ask()),
        Some(Product::Genoa) => (builtin::genoa::ark(), builtin::genoa::ask()),
        Some(Product::Turin) => (builtin::turin::ark(), builtin::turin::ask()),
        None => {
            return Err(TeeError::Unsupported(
                "snp",
                "the VCEK names no known AMD product".into(),
            ))
        }
    };
    Ok((
        ark.map_err(e)?.to_der().map_err(e)?,
        ask.map_err(e)?.to_der().map_err(e)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host is not an SNP guest: opening the real backend must fail
    /// with a clear `Unsupported`, never yield a backend.
    #[test]
    fn snp_backend_refuses_without_sev_guest() {
        if Path::new(SEV_GUEST_DEVICE).exists() {
            return; // a real SNP guest: nothing to assert here
        }
        match SnpBackend::open(0) {
            Err(TeeError::Unsupported("snp", m)) => assert!(m.contains(SEV_GUEST_DEVICE), "{m}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("snp backend opened without {SEV_GUEST_DEVICE}"),
        }
        assert!(matches!(
            SnpBackend::open(4),
            Err(TeeError::Unsupported(..))
        ));
    }

    #[test]
    fn builtin_ca_matches_vcek_issuer() {
        let turin = include_bytes!("../../../shared/testdata/snp-real/sevcrate-turin-vcek.der");
        let (ark, ask) = builtin_ca_der(turin).unwrap();
        let (_, ark) = x509_parser::parse_x509_certificate(&ark).unwrap();
        let (_, ask) = x509_parser::parse_x509_certificate(&ask).unwrap();
        assert!(ark.subject().to_string().contains("ARK-Turin"));
        assert!(ask.subject().to_string().contains("SEV-Turin"));
    }
}
