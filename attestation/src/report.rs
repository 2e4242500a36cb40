//! The SEV-SNP `ATTESTATION_REPORT` (1184 bytes, versions 2–5): the fields
//! this project reads, parsed with bounds checks, plus the raw bytes.
//!
//! Layout (AMD SEV-SNP ABI, Table "ATTESTATION_REPORT"): the signed region
//! is bytes `0..0x2A0`; the ECDSA P-384 signature follows as `r` and `s`,
//! each 72 bytes little-endian.

/// Size of a report.
pub const REPORT_LEN: usize = 1184;
/// End of the signed region.
pub const SIGNED_LEN: usize = 0x2A0;
/// Prefix of `chip_id` that marks a report from the simulated PSP.
pub const SIM_CHIP_ID_PREFIX: &[u8] = b"BUBBLE-SIMULATED";

/// Errors parsing a report.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    /// Wrong size.
    #[error("report is {0} bytes; an SEV-SNP report is 1184")]
    Length(usize),
    /// Unsupported version.
    #[error("report version {0} is not supported (2 to 5)")]
    Version(u32),
    /// Not hex and not binary of the right size.
    #[error("report is neither 1184 raw bytes nor their hex")]
    Encoding,
}

/// A TCB version (security version numbers of the platform's firmware).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Tcb {
    /// PSP bootloader SVN.
    pub bootloader: u8,
    /// PSP OS (TEE) SVN.
    pub tee: u8,
    /// SNP firmware SVN.
    pub snp: u8,
    /// Microcode patch level.
    pub microcode: u8,
    /// FMC SVN (Turin only).
    pub fmc: Option<u8>,
}

impl Tcb {
    /// Decodes a TCB_VERSION (Turin has a different layout).
    pub fn decode(v: u64, turin: bool) -> Self {
        let b = v.to_le_bytes();
        if turin {
            Tcb {
                fmc: Some(b[0]),
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            }
        } else {
            Tcb {
                fmc: None,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            }
        }
    }

    /// Encodes a Milan/Genoa-layout TCB_VERSION.
    pub fn encode(&self) -> u64 {
        u64::from_le_bytes([
            self.bootloader,
            self.tee,
            0,
            0,
            0,
            0,
            self.snp,
            self.microcode,
        ])
    }

    /// Whether every component is at least `min`'s.
    pub fn at_least(&self, min: &Tcb) -> bool {
        self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
            && match (self.fmc, min.fmc) {
                (Some(a), Some(b)) => a >= b,
                (None, Some(_)) => false,
                _ => true,
            }
    }
}

/// A parsed report (the raw bytes stay available).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The 1184 bytes.
    pub raw: Vec<u8>,
    /// Format version.
    pub version: u32,
    /// Guest SVN.
    pub guest_svn: u32,
    /// Guest policy bits.
    pub policy: u64,
    /// VMPL of the requester.
    pub vmpl: u32,
    /// Signature algorithm (1 = ECDSA P-384 with SHA-384).
    pub sig_algo: u32,
    /// Platform info bits.
    pub platform_info: u64,
    /// Guest-chosen data (bubbles: the nonce/key binding).
    pub report_data: [u8; 64],
    /// Launch measurement.
    pub measurement: [u8; 48],
    /// Host data.
    pub host_data: [u8; 32],
    /// Reported TCB (raw).
    pub reported_tcb_raw: u64,
    /// Chip id.
    pub chip_id: [u8; 64],
    /// CPUID family (version ≥ 3; 0 otherwise).
    pub cpuid_fam: u8,
    /// CPUID model (version ≥ 3; 0 otherwise).
    pub cpuid_model: u8,
    /// CPUID stepping (version ≥ 3; 0 otherwise).
    pub cpuid_step: u8,
    /// KEY_INFO (offset 0x48): bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY,
    /// bits 4:2 SIGNING_KEY.
    pub key_info: u32,
    /// FAMILY_ID (guest-provided at launch).
    pub family_id: [u8; 16],
    /// IMAGE_ID (guest-provided at launch).
    pub image_id: [u8; 16],
    /// CURRENT_TCB (raw).
    pub current_tcb_raw: u64,
    /// COMMITTED_TCB (raw).
    pub committed_tcb_raw: u64,
    /// LAUNCH_TCB (raw).
    pub launch_tcb_raw: u64,
    /// SHA-384 of the ID public key (zero if none).
    pub id_key_digest: [u8; 48],
    /// SHA-384 of the author public key (zero if none).
    pub author_key_digest: [u8; 48],
    /// REPORT_ID.
    pub report_id: [u8; 32],
    /// Firmware version that is running: (major, minor, build).
    pub current_version: (u8, u8, u8),
    /// Committed firmware version: (major, minor, build).
    pub committed_version: (u8, u8, u8),
    /// LAUNCH_MIT_VECTOR (version ≥ 5; None otherwise).
    pub launch_mit_vector: Option<u64>,
    /// CURRENT_MIT_VECTOR (version ≥ 5; None otherwise).
    pub current_mit_vector: Option<u64>,
}

/// The key that signed a report (KEY_INFO.SIGNING_KEY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SigningKey {
    /// Versioned Chip Endorsement Key (per chip, certified by the ASK).
    Vcek,
    /// Versioned Loaded Endorsement Key (per cloud provider, certified by the ASVK).
    Vlek,
    /// No key: the report is not signed.
    None,
    /// A reserved value.
    Reserved(u8),
}

impl SigningKey {
    /// Name for output.
    pub fn name(&self) -> String {
        match self {
            SigningKey::Vcek => "VCEK".into(),
            SigningKey::Vlek => "VLEK".into(),
            SigningKey::None => "none (unsigned)".into(),
            SigningKey::Reserved(v) => format!("reserved ({v})"),
        }
    }
}

/// SIGNATURE_ALGO of ECDSA P-384 with SHA-384 (the only one defined).
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// PLATFORM_INFO bits and their names.
pub const PLATFORM_INFO_BITS: [(u32, &str); 7] = [
    (0, "SMT_EN"),
    (1, "TSME_EN"),
    (2, "ECC_EN"),
    (3, "RAPL_DIS"),
    (4, "CIPHERTEXT_HIDING_EN"),
    (5, "ALIAS_CHECK_COMPLETE"),
    (7, "TIO_EN"),
];

/// `N` bytes at `at` (zeros if out of range; `parse` checks the length first).
fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = at.checked_add(N).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    a
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(arr(b, at))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(arr(b, at))
}

fn u8_at(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

impl Report {
    /// Parses 1184 raw bytes.
    pub fn parse(b: &[u8]) -> Result<Self, ReportError> {
        if b.len() != REPORT_LEN {
            return Err(ReportError::Length(b.len()));
        }
        let version = u32_at(b, 0);
        if !(2..=5).contains(&version) {
            return Err(ReportError::Version(version));
        }
        let v3 = version >= 3;
        let v5 = version >= 5;
        Ok(Report {
            raw: b.to_vec(),
            version,
            guest_svn: u32_at(b, 4),
            policy: u64_at(b, 8),
            vmpl: u32_at(b, 0x30),
            sig_algo: u32_at(b, 0x34),
            platform_info: u64_at(b, 0x40),
            report_data: arr(b, 0x50),
            measurement: arr(b, 0x90),
            host_data: arr(b, 0xC0),
            reported_tcb_raw: u64_at(b, 0x180),
            chip_id: arr(b, 0x1A0),
            cpuid_fam: if v3 { u8_at(b, 0x188) } else { 0 },
            cpuid_model: if v3 { u8_at(b, 0x189) } else { 0 },
            cpuid_step: if v3 { u8_at(b, 0x18A) } else { 0 },
            key_info: u32_at(b, 0x48),
            family_id: arr(b, 0x10),
            image_id: arr(b, 0x20),
            current_tcb_raw: u64_at(b, 0x38),
            committed_tcb_raw: u64_at(b, 0x1E0),
            launch_tcb_raw: u64_at(b, 0x1F0),
            id_key_digest: arr(b, 0xE0),
            author_key_digest: arr(b, 0x110),
            report_id: arr(b, 0x140),
            current_version: (u8_at(b, 0x1EA), u8_at(b, 0x1E9), u8_at(b, 0x1E8)),
            committed_version: (u8_at(b, 0x1EE), u8_at(b, 0x1ED), u8_at(b, 0x1EC)),
            launch_mit_vector: v5.then(|| u64_at(b, 0x1F8)),
            current_mit_vector: v5.then(|| u64_at(b, 0x200)),
        })
    }

    /// Parses raw bytes or hex text (whitespace ignored).
    pub fn parse_any(b: &[u8]) -> Result<Self, ReportError> {
        if b.len() == REPORT_LEN {
            return Self::parse(b);
        }
        let text: String = std::str::from_utf8(b)
            .map_err(|_| ReportError::Encoding)?
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let bytes = hex::decode(text).map_err(|_| ReportError::Encoding)?;
        Self::parse(&bytes)
    }

    /// REPORTED_TCB decoded (Turin layout when CPUID family is 0x1A).
    pub fn reported_tcb(&self) -> Tcb {
        Tcb::decode(self.reported_tcb_raw, self.cpuid_fam == 0x1A)
    }

    /// The signing key KEY_INFO names.
    pub fn signing_key(&self) -> SigningKey {
        match (self.key_info >> 2) & 0x7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            v => SigningKey::Reserved(v as u8),
        }
    }

    /// KEY_INFO.AUTHOR_KEY_EN: an author key signed the ID key.
    pub fn author_key_en(&self) -> bool {
        self.key_info & 1 != 0
    }

    /// KEY_INFO.MASK_CHIP_KEY: the chip key is masked (CHIP_ID zero).
    pub fn mask_chip_key(&self) -> bool {
        self.key_info & 2 != 0
    }

    /// The product the CPUID fields name (version ≥ 3); None for older
    /// reports and unknown family/model.
    pub fn cpuid_product(&self) -> Option<crate::product::Product> {
        use crate::product::Product;
        if self.version < 3 {
            return None;
        }
        match (self.cpuid_fam, self.cpuid_model) {
            (0x19, 0x00..=0x0F) => Some(Product::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Product::Genoa),
            (0x1A, 0x00..=0x11) => Some(Product::Turin),
            _ => None,
        }
    }

    /// Names of the PLATFORM_INFO bits that are set.
    pub fn platform_flags(&self) -> Vec<&'static str> {
        PLATFORM_INFO_BITS
            .iter()
            .filter(|(bit, _)| self.platform_info & (1u64 << bit) != 0)
            .map(|(_, n)| *n)
            .collect()
    }

    /// Whether this report comes from the simulated PSP.
    pub fn is_simulated(&self) -> bool {
        self.chip_id.starts_with(SIM_CHIP_ID_PREFIX)
    }

    /// The signed region.
    ///
    /// Empty (so nothing verifies) if `raw` was replaced by something
    /// shorter than a report after parsing.
    pub fn signed_bytes(&self) -> &[u8] {
        self.raw.get(..SIGNED_LEN).unwrap_or(&[])
    }

    /// The report's bytes (serialized form; identical to what was parsed).
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The signature as a P-384 ECDSA signature (r, s big-endian).
    ///
    /// `None` unless the SIGNATURE field is canonical: R and S are 72-byte
    /// little-endian fields whose top 24 bytes, and the 368 reserved bytes
    /// after them, must be zero. So no bit of the report can change without
    /// the verifier noticing.
    pub fn signature(&self) -> Option<p384::ecdsa::Signature> {
        let sig = self.raw.get(SIGNED_LEN..REPORT_LEN)?;
        let (r_field, rest) = sig.split_at(72);
        let (s_field, reserved) = rest.split_at(72);
        if r_field[48..]
            .iter()
            .chain(&s_field[48..])
            .chain(reserved)
            .any(|&b| b != 0)
        {
            return None;
        }
        let mut r = r_field[..48].to_vec();
        let mut s = s_field[..48].to_vec();
        r.reverse();
        s.reverse();
        p384::ecdsa::Signature::from_scalars(
            *p384::FieldBytes::from_slice(&r),
            *p384::FieldBytes::from_slice(&s),
        )
        .ok()
    }

    /// Guest policy: debug allowed.
    pub fn debug_allowed(&self) -> bool {
        self.policy & (1 << 19) != 0
    }

    /// Guest policy: SMT allowed.
    pub fn smt_allowed(&self) -> bool {
        self.policy & (1 << 16) != 0
    }

    /// Guest policy: migration agent allowed.
    pub fn migrate_ma_allowed(&self) -> bool {
        self.policy & (1 << 18) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes_versions_and_encodings_without_panics() {
        assert_eq!(Report::parse(&[0u8; 10]), Err(ReportError::Length(10)));
        let mut b = vec![0u8; REPORT_LEN];
        assert_eq!(Report::parse(&b), Err(ReportError::Version(0)));
        b[0] = 2;
        assert!(Report::parse(&b).is_ok());
        assert_eq!(Report::parse_any(b"zz"), Err(ReportError::Encoding));
        for n in [0, 1, 100, 1183, 1185, 2368] {
            let _ = Report::parse_any(&vec![b'a'; n]);
        }
        let mut r = Report::parse(&b).unwrap();
        assert_eq!(r.as_bytes(), &b[..]);
        r.raw.truncate(10);
        assert!(r.signed_bytes().is_empty() && r.signature().is_none());
    }

    #[test]
    fn tcb_round_trips_and_orders() {
        let t = Tcb {
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
            fmc: None,
        };
        assert_eq!(Tcb::decode(t.encode(), false), t);
        assert!(t.at_least(&Tcb::default()));
        assert!(!Tcb::default().at_least(&t));
    }
}
