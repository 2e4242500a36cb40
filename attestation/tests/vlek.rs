//! VLEK-signed reports and the KEY_INFO / SIGNATURE_ALGO checks, on
//! synthetic chains minted here (ARK → ASVK → VLEK, ARK → ASK → VCEK).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bubble_attestation::verify::{ChainLink, Mismatch};
use bubble_attestation::{verify_amd, verify_with_roots, Product, Report, SigningKey, VerifyError};
use common::*;

fn parse(b: &[u8]) -> Report {
    Report::parse(b).unwrap()
}

#[test]
fn vlek_report_verifies_through_the_asvk_and_shows_its_csp_id() {
    let w = world();
    let f = Fields {
        key_info: key_info(1),
        chip_id: [0; 64],
        ..Default::default()
    };
    let r = parse(&report(&f, &w.vlek_key));
    assert_eq!(r.signing_key(), SigningKey::Vlek);
    let v = verify_with_roots(&r, &w.vlek, &w.asvk.der, &w.ark.der).unwrap();
    assert_eq!(v.signing_key, SigningKey::Vlek);
    assert_eq!(v.csp_id.as_deref(), Some("example-cloud"));
    assert_eq!(v.tcb, TCB);
    // The VCEK path keeps working in the same world.
    let r = parse(&report(&Fields::default(), &w.vcek_key));
    let v = verify_with_roots(&r, &w.vcek, &w.ask.der, &w.ark.der).unwrap();
    assert_eq!(v.signing_key, SigningKey::Vcek);
    assert_eq!(v.csp_id, None);
}

#[test]
fn wrong_asvk_is_refused() {
    let w = world();
    let other = world();
    let f = Fields {
        key_info: key_info(1),
        ..Default::default()
    };
    let r = parse(&report(&f, &w.vlek_key));
    // An ASVK of another ARK.
    let e = verify_with_roots(&r, &w.vlek, &other.asvk.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Chain(ChainLink::IntermediateNotSignedByArk(SigningKey::Vlek))
        ),
        "{e}"
    );
    // The right ASVK under another (trusted) ARK.
    let e = verify_with_roots(&r, &w.vlek, &w.asvk.der, &other.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Chain(ChainLink::IntermediateNotSignedByArk(SigningKey::Vlek))
        ),
        "{e}"
    );
    // The ASK in place of the ASVK does not certify the VLEK.
    let e = verify_with_roots(&r, &w.vlek, &w.ask.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Chain(ChainLink::KeyNotSignedByIntermediate(SigningKey::Vlek))
        ),
        "{e}"
    );
}

#[test]
fn vcek_presented_as_vlek_is_refused() {
    let w = world();
    // KEY_INFO says VLEK; the report is signed by the VCEK and the VCEK is shown.
    let f = Fields {
        key_info: key_info(1),
        ..Default::default()
    };
    let r = parse(&report(&f, &w.vcek_key));
    // Through the ASVK: the VCEK is not certified by it.
    let e = verify_with_roots(&r, &w.vcek, &w.asvk.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Chain(ChainLink::KeyNotSignedByIntermediate(SigningKey::Vlek))
        ),
        "{e}"
    );
    // Even with a chain that holds, the kind of key is checked.
    let e = verify_with_roots(&r, &w.vcek, &w.ask.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::KeyMismatch {
                report: SigningKey::Vlek,
                cert: SigningKey::Vcek
            }
        ),
        "{e}"
    );
}

#[test]
fn key_info_naming_a_vcek_with_a_vlek_certificate_is_refused() {
    let w = world();
    let f = Fields {
        key_info: key_info(0),
        ..Default::default()
    };
    let r = parse(&report(&f, &w.vlek_key));
    let e = verify_with_roots(&r, &w.vlek, &w.asvk.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::KeyMismatch {
                report: SigningKey::Vcek,
                cert: SigningKey::Vlek
            }
        ),
        "{e}"
    );
}

#[test]
fn vlek_without_a_tcb_extension_or_with_another_tcb_is_refused() {
    let w = world();
    let (k, der) = leaf(
        &Leaf {
            cn: "SEV-VLEK",
            tcb: TCB,
            hwid: None,
            csp_id: None,
            omit: &[3],
        },
        &w.asvk,
    );
    let f = Fields {
        key_info: key_info(1),
        ..Default::default()
    };
    let r = parse(&report(&f, &k));
    let e = verify_with_roots(&r, &der, &w.asvk.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::MissingExtension {
                key: "VLEK",
                oid: "1.3.6.1.4.1.3704.1.3.3"
            }
        ),
        "{e}"
    );
    let mut lower = TCB;
    lower.snp -= 1;
    let (k, der) = leaf(
        &Leaf {
            cn: "SEV-VLEK",
            tcb: lower,
            hwid: None,
            csp_id: None,
            omit: &[],
        },
        &w.asvk,
    );
    let r = parse(&report(&f, &k));
    let e = verify_with_roots(&r, &der, &w.asvk.der, &w.ark.der).unwrap_err();
    assert!(
        matches!(e, VerifyError::Mismatch(Mismatch::Tcb { key: SigningKey::Vlek, certified, reported })
            if certified.snp + 1 == reported.snp),
        "{e}"
    );
}

#[test]
fn signature_algo_other_than_1_and_unsigned_or_reserved_key_info_are_refused() {
    let w = world();
    for algo in [0u32, 2, 0xFFFF_FFFF] {
        let f = Fields {
            sig_algo: algo,
            ..Default::default()
        };
        let r = parse(&report(&f, &w.vcek_key));
        let e = verify_with_roots(&r, &w.vcek, &w.ask.der, &w.ark.der).unwrap_err();
        assert!(
            matches!(e, VerifyError::SignatureAlgo(a) if a == algo),
            "{e}"
        );
        // The AMD path refuses it before any chain work, too.
        assert!(matches!(
            verify_amd(&r, &w.vcek, Some(Product::Milan)),
            Err(VerifyError::SignatureAlgo(_))
        ));
    }
    let f = Fields {
        key_info: key_info(7),
        ..Default::default()
    };
    let r = parse(&report(&f, &w.vcek_key));
    assert_eq!(r.signing_key(), SigningKey::None);
    let e = verify_with_roots(&r, &w.vcek, &w.ask.der, &w.ark.der).unwrap_err();
    assert!(matches!(e, VerifyError::Unsigned), "{e}");
    assert!(matches!(
        verify_amd(&r, &w.vcek, Some(Product::Milan)),
        Err(VerifyError::Unsigned)
    ));
    for k in 2..7 {
        let f = Fields {
            key_info: key_info(k),
            ..Default::default()
        };
        let r = parse(&report(&f, &w.vcek_key));
        let e = verify_with_roots(&r, &w.vcek, &w.ask.der, &w.ark.der).unwrap_err();
        assert!(
            matches!(e, VerifyError::ReservedKey(v) if u32::from(v) == k),
            "{e}"
        );
    }
}

#[test]
fn amd_roots_check_a_vlek_against_the_embedded_asvk() {
    // A VLEK of our own is refused by AMD's ASVK (which the built-in ARK
    // signs: the error is about the VLEK, not the roots).
    let w = world();
    for (p, cpuid) in [
        (Product::Milan, (0x19, 0x01, 0x01)),
        (Product::Genoa, (0x19, 0x11, 0x01)),
        (Product::Turin, (0x1A, 0x02, 0x01)),
    ] {
        let f = Fields {
            key_info: key_info(1),
            cpuid,
            ..Default::default()
        };
        let r = parse(&report(&f, &w.vlek_key));
        assert_eq!(r.cpuid_product(), Some(p));
        let e = verify_amd(&r, &w.vlek, None).unwrap_err();
        assert!(
            matches!(e, VerifyError::NotSignedByAmd { product, key: SigningKey::Vlek } if product == p),
            "{p:?}: {e}"
        );
        assert!(e.to_string().contains("ASVK"), "{e}");
    }
}

#[test]
fn embedded_amd_chains_hold_the_built_in_ark() {
    use bubble_attestation::amd::embedded_chain;
    use sev::certs::snp::builtin;
    for (p, ark) in [
        (Product::Milan, builtin::milan::ark().unwrap()),
        (Product::Genoa, builtin::genoa::ark().unwrap()),
        (Product::Turin, builtin::turin::ark().unwrap()),
    ] {
        let [ask, embedded_ark, asvk] = embedded_chain(p).unwrap();
        assert_eq!(embedded_ark, ark.to_der().unwrap(), "{p:?}");
        let name = |der: &[u8]| {
            x509_parser::parse_x509_certificate(der)
                .unwrap()
                .1
                .subject()
                .to_string()
        };
        assert!(name(&asvk).contains(&format!("SEV-VLEK-{}", p.name())));
        assert!(name(&ask).contains(&format!("SEV-{}", p.name())));
    }
}
