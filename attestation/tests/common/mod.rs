//! Synthetic AMD-shaped chains minted in the test (P-384 throughout):
//! ARK → ASK → VCEK and ARK → ASVK → VLEK, and reports signed by them.
#![allow(dead_code)]

use bubble_attestation::report::{REPORT_LEN, SIGNED_LEN};
use bubble_attestation::Tcb;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SigningKey, PKCS_ECDSA_P384_SHA384,
};

pub const TCB: Tcb = Tcb {
    bootloader: 4,
    tee: 0,
    snp: 22,
    microcode: 213,
    fmc: None,
};

pub struct Ca {
    pub key: KeyPair,
    pub params: CertificateParams,
    pub der: Vec<u8>,
}

fn params(cn: &str, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    } else {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    p
}

fn key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap()
}

pub fn ark(cn: &str) -> Ca {
    let key = key();
    let params = params(cn, true);
    let der = params.clone().self_signed(&key).unwrap().der().to_vec();
    Ca { key, params, der }
}

pub fn ca_signed_by(cn: &str, parent: &Ca) -> Ca {
    let key = key();
    let params = params(cn, true);
    let issuer = Issuer::new(parent.params.clone(), &parent.key);
    let der = params
        .clone()
        .signed_by(&key, &issuer)
        .unwrap()
        .der()
        .to_vec();
    Ca { key, params, der }
}

fn der_u8(v: u8) -> Vec<u8> {
    if v < 0x80 {
        vec![2, 1, v]
    } else {
        vec![2, 2, 0, v]
    }
}

/// What to put in an endorsement key certificate.
pub struct Leaf<'a> {
    pub cn: &'a str,
    pub tcb: Tcb,
    pub hwid: Option<[u8; 64]>,
    pub csp_id: Option<&'a str>,
    /// TCB OID suffixes to leave out.
    pub omit: &'a [u64],
}

pub fn leaf(spec: &Leaf<'_>, parent: &Ca) -> (KeyPair, Vec<u8>) {
    let key = key();
    let mut p = params(spec.cn, false);
    let oid = |last: u64| vec![1, 3, 6, 1, 4, 1, 3704, 1, 3, last];
    for (last, v) in [
        (1, spec.tcb.bootloader),
        (2, spec.tcb.tee),
        (3, spec.tcb.snp),
        (8, spec.tcb.microcode),
    ] {
        if !spec.omit.contains(&last) {
            p.custom_extensions
                .push(CustomExtension::from_oid_content(&oid(last), der_u8(v)));
        }
    }
    if let Some(h) = spec.hwid {
        p.custom_extensions.push(CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 3704, 1, 4],
            h.to_vec(),
        ));
    }
    if let Some(c) = spec.csp_id {
        let mut v = vec![0x16, c.len() as u8];
        v.extend(c.as_bytes());
        p.custom_extensions.push(CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 3704, 1, 5],
            v,
        ));
    }
    let issuer = Issuer::new(parent.params.clone(), &parent.key);
    let der = p.signed_by(&key, &issuer).unwrap().der().to_vec();
    (key, der)
}

pub const CHIP_ID: [u8; 64] = [0xC1; 64];

/// Report fields the tests vary.
pub struct Fields {
    pub version: u32,
    pub key_info: u32,
    pub sig_algo: u32,
    pub tcb: Tcb,
    pub chip_id: [u8; 64],
    pub cpuid: (u8, u8, u8),
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            version: 3,
            key_info: 0,
            sig_algo: 1,
            tcb: TCB,
            chip_id: CHIP_ID,
            cpuid: (0, 0, 0),
        }
    }
}

/// KEY_INFO with SIGNING_KEY = `k`.
pub fn key_info(k: u32) -> u32 {
    k << 2
}

pub fn report(f: &Fields, signer: &KeyPair) -> Vec<u8> {
    let mut b = vec![0u8; REPORT_LEN];
    b[0..4].copy_from_slice(&f.version.to_le_bytes());
    b[0x34..0x38].copy_from_slice(&f.sig_algo.to_le_bytes());
    b[0x48..0x4C].copy_from_slice(&f.key_info.to_le_bytes());
    b[0x180..0x188].copy_from_slice(&f.tcb.encode().to_le_bytes());
    b[0x188] = f.cpuid.0;
    b[0x189] = f.cpuid.1;
    b[0x18A] = f.cpuid.2;
    b[0x1A0..0x1E0].copy_from_slice(&f.chip_id);
    let der = signer.sign(&b[..SIGNED_LEN]).unwrap();
    let sig = p384::ecdsa::Signature::from_der(&der).unwrap();
    let (r, s) = sig.split_bytes();
    let (mut r, mut s) = (r.to_vec(), s.to_vec());
    r.reverse();
    s.reverse();
    b[SIGNED_LEN..SIGNED_LEN + 48].copy_from_slice(&r);
    b[SIGNED_LEN + 72..SIGNED_LEN + 72 + 48].copy_from_slice(&s);
    b
}

/// A complete synthetic world: one ARK with an ASK (VCEK) and an ASVK (VLEK).
pub struct World {
    pub ark: Ca,
    pub ask: Ca,
    pub asvk: Ca,
    pub vcek_key: KeyPair,
    pub vcek: Vec<u8>,
    pub vlek_key: KeyPair,
    pub vlek: Vec<u8>,
}

pub fn world() -> World {
    let ark = ark("ARK-Test");
    let ask = ca_signed_by("SEV-Test", &ark);
    let asvk = ca_signed_by("SEV-VLEK-Test", &ark);
    let (vcek_key, vcek) = leaf(
        &Leaf {
            cn: "SEV-VCEK",
            tcb: TCB,
            hwid: Some(CHIP_ID),
            csp_id: None,
            omit: &[],
        },
        &ask,
    );
    let (vlek_key, vlek) = leaf(
        &Leaf {
            cn: "SEV-VLEK",
            tcb: TCB,
            hwid: None,
            csp_id: Some("example-cloud"),
            omit: &[],
        },
        &asvk,
    );
    World {
        ark,
        ask,
        asvk,
        vcek_key,
        vcek,
        vlek_key,
        vlek,
    }
}
