//! Report versions 2, 3 and 5, product detection, the extended-report
//! certificate table, the `snpguest` certificate directory, and the CLI's
//! expectations and UNPINNED line, on real AMD data where there is some.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bubble_attestation::certs::{self, build_cert_table, guid, parse_cert_table, CertsError};
use bubble_attestation::cli::{verify_command, VerifyArgs, EXIT_INVALID, EXIT_OK, EXIT_POLICY};
use bubble_attestation::report::REPORT_LEN;
use bubble_attestation::{Product, Report, SigningKey};

fn testdata(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/snp-real")
        .join(name);
    assert!(p.exists(), "missing test data {}", p.display());
    p
}

fn run(args: &VerifyArgs) -> (i32, String) {
    let mut out = Vec::new();
    let code = verify_command(args, &mut out);
    (code, String::from_utf8(out).unwrap())
}

fn gcp_vcek_der() -> Vec<u8> {
    certs::read_cert(&testdata("gcp-milan-vcek.pem")).unwrap()
}

fn raw(version: u32, f: impl Fn(&mut Vec<u8>)) -> Report {
    let mut b = vec![0u8; REPORT_LEN];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    f(&mut b);
    Report::parse(&b).unwrap()
}

#[test]
fn versions_2_3_and_5_parse_their_own_fields() {
    let set = |b: &mut Vec<u8>| {
        b[0x188] = 0x19;
        b[0x189] = 0x11;
        b[0x18A] = 0x02;
        b[0x1F8..0x200].copy_from_slice(&0x5u64.to_le_bytes());
        b[0x200..0x208].copy_from_slice(&0x7u64.to_le_bytes());
        b[0x04] = 9; // GUEST_SVN
        b[0x40] = 0b11; // SMT_EN, TSME_EN
        b[0x48] = 0b111; // AUTHOR_KEY_EN, MASK_CHIP_KEY, SIGNING_KEY 1
        b[0xE0] = 0xAA; // ID key digest
        b[0x110] = 0xBB; // author key digest
        b[0x1E8] = 3; // build
        b[0x1E9] = 55; // minor
        b[0x1EA] = 1; // major
    };
    let v2 = raw(2, set);
    assert_eq!((v2.cpuid_fam, v2.cpuid_model, v2.cpuid_step), (0, 0, 0));
    assert_eq!(v2.cpuid_product(), None);
    assert_eq!(v2.launch_mit_vector, None);
    let v3 = raw(3, set);
    assert_eq!(
        (v3.cpuid_fam, v3.cpuid_model, v3.cpuid_step),
        (0x19, 0x11, 2)
    );
    assert_eq!(v3.cpuid_product(), Some(Product::Genoa));
    assert_eq!(v3.launch_mit_vector, None);
    let v5 = raw(5, set);
    assert_eq!(v5.launch_mit_vector, Some(5));
    assert_eq!(v5.current_mit_vector, Some(7));
    for r in [&v2, &v3, &v5] {
        assert_eq!(r.guest_svn, 9);
        assert_eq!(r.platform_flags(), vec!["SMT_EN", "TSME_EN"]);
        assert!(r.author_key_en() && r.mask_chip_key());
        assert_eq!(r.signing_key(), SigningKey::Vlek);
        assert_eq!(r.id_key_digest[0], 0xAA);
        assert_eq!(r.author_key_digest[0], 0xBB);
        assert_eq!(r.current_version, (1, 55, 3));
    }
    // The real reports: GCP is version 5 on Milan, the sev crate's is version 2.
    let gcp = Report::parse_any(&std::fs::read(testdata("gcp-milan-report.bin")).unwrap()).unwrap();
    assert_eq!(gcp.version, 5);
    assert_eq!(gcp.cpuid_product(), Some(Product::Milan));
    assert!(gcp.launch_mit_vector.is_some());
    assert_eq!(gcp.signing_key(), SigningKey::Vcek);
    let sc =
        Report::parse_any(&std::fs::read(testdata("sevcrate-milan-report.hex")).unwrap()).unwrap();
    assert_eq!(sc.version, 2);
    assert_eq!(sc.cpuid_product(), None);
}

#[test]
fn product_detection_covers_every_family_and_model_range() {
    let p = |fam: u8, model: u8| {
        raw(3, |b| {
            b[0x188] = fam;
            b[0x189] = model;
        })
        .cpuid_product()
    };
    assert_eq!(p(0x19, 0x00), Some(Product::Milan));
    assert_eq!(p(0x19, 0x0F), Some(Product::Milan));
    assert_eq!(p(0x19, 0x10), Some(Product::Genoa));
    assert_eq!(p(0x19, 0xA0), Some(Product::Genoa));
    assert_eq!(p(0x1A, 0x00), Some(Product::Turin));
    assert_eq!(p(0x1A, 0x11), Some(Product::Turin));
    assert_eq!(p(0x1A, 0x12), None);
    assert_eq!(p(0x17, 0x01), None);
    assert_eq!(p(0x19, 0x20), None);
}

#[test]
fn product_is_optional_for_v3_and_a_wrong_one_is_refused() {
    let a = VerifyArgs {
        report: testdata("gcp-milan-report.bin"),
        vcek: Some(testdata("gcp-milan-vcek.pem")),
        ..Default::default()
    };
    let (code, out) = run(&a);
    assert_eq!(code, EXIT_OK, "{out}");
    assert!(
        out.contains("Milan") && out.contains("family 0x19"),
        "{out}"
    );
    for (p, code) in [
        ("milan", EXIT_OK),
        ("genoa", EXIT_INVALID),
        ("turin", EXIT_INVALID),
    ] {
        let (c, out) = run(&VerifyArgs {
            product: Some(p.into()),
            ..a.clone()
        });
        assert_eq!(c, code, "{p}: {out}");
        if code == EXIT_INVALID {
            assert!(out.contains("CPUID names Milan"), "{out}");
        }
    }
}

#[test]
fn unpinned_is_said_and_expectations_pin() {
    let gcp = Report::parse_any(&std::fs::read(testdata("gcp-milan-report.bin")).unwrap()).unwrap();
    let a = VerifyArgs {
        report: testdata("gcp-milan-report.bin"),
        vcek: Some(testdata("gcp-milan-vcek.pem")),
        ..Default::default()
    };
    let (code, out) = run(&a);
    assert_eq!(code, EXIT_OK);
    assert!(out.contains("UNPINNED"), "{out}");
    let m = hex::encode(gcp.measurement);
    let pinned = VerifyArgs {
        expect_measurement: Some(m.clone()),
        expect_host_data: Some(hex::encode(gcp.host_data)),
        expect_report_data: Some(hex::encode(gcp.report_data)),
        ..a.clone()
    };
    let (code, out) = run(&pinned);
    assert_eq!(code, EXIT_OK, "{out}");
    assert!(!out.contains("UNPINNED"), "{out}");
    let (code, out) = run(&VerifyArgs {
        expect_measurement: Some("00".repeat(48)),
        ..a.clone()
    });
    assert_eq!(code, EXIT_POLICY, "{out}");
    let (code, out) = run(&VerifyArgs {
        expect_host_data: Some("11".repeat(32)),
        ..a.clone()
    });
    assert_eq!(code, EXIT_POLICY, "{out}");
    assert!(out.contains("HOST_DATA differs"), "{out}");
    let (code, _) = run(&VerifyArgs {
        expect_report_data: Some("11".repeat(64)),
        ..a.clone()
    });
    assert_eq!(code, EXIT_POLICY);
    // Malformed expectations are usage errors.
    let (code, _) = run(&VerifyArgs {
        expect_measurement: Some("abc".into()),
        ..a.clone()
    });
    assert_eq!(code, 1);
    // JSON says it too.
    let (_, out) = run(&VerifyArgs { json: true, ..a });
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pinned"], false);
    assert_eq!(v["signing_key"], "VCEK");
    assert_eq!(v["signature_algo"], 1);
}

#[test]
fn snpguest_directory_layout_in_pem_and_der() {
    let der = gcp_vcek_der();
    let pem = std::fs::read(testdata("gcp-milan-vcek.pem")).unwrap();
    let [ask, ark, _asvk] = bubble_attestation::amd::embedded_chain(Product::Milan).unwrap();
    for (name, bytes) in [
        ("vcek.pem", pem.clone()),
        ("vcek.der", der.clone()),
        ("vcek", der.clone()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(name), &bytes).unwrap();
        std::fs::write(dir.path().join("ark.der"), &ark).unwrap();
        std::fs::write(dir.path().join("ask.der"), &ask).unwrap();
        std::fs::copy(
            testdata("gcp-milan-report.bin"),
            dir.path().join("report.bin"),
        )
        .unwrap();
        let set = certs::read_cert_dir(dir.path()).unwrap();
        assert_eq!(set.vcek.as_deref(), Some(&der[..]), "{name}");
        let (code, out) = run(&VerifyArgs {
            report: dir.path().join("report.bin"),
            certs: Some(dir.path().to_path_buf()),
            ..Default::default()
        });
        assert_eq!(code, EXIT_OK, "{name}: {out}");
    }
    // Two files for one role, no endorsement key, garbage: refused.
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        certs::read_cert_dir(dir.path()),
        Err(CertsError::NoEndorsementKey)
    );
    std::fs::write(dir.path().join("vcek.pem"), &pem).unwrap();
    std::fs::write(dir.path().join("vcek.der"), &der).unwrap();
    assert!(matches!(
        certs::read_cert_dir(dir.path()),
        Err(CertsError::Ambiguous(_))
    ));
    std::fs::remove_file(dir.path().join("vcek.der")).unwrap();
    std::fs::write(dir.path().join("vlek.pem"), b"not a certificate").unwrap();
    assert!(matches!(
        certs::read_cert_dir(dir.path()),
        Err(CertsError::Encoding(_))
    ));
}

#[test]
fn extended_report_certificate_table() {
    let der = gcp_vcek_der();
    let table = build_cert_table(&[(guid::VCEK, &der), (guid::ARK, b"\x30ark")]);
    let set = parse_cert_table(&table).unwrap();
    assert_eq!(set.vcek.as_deref(), Some(&der[..]));
    assert_eq!(set.ark.as_deref(), Some(&b"\x30ark"[..]));
    // Through the CLI, as a file and as certs.bin in a directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("certs.bin"), &table).unwrap();
    let a = VerifyArgs {
        report: testdata("gcp-milan-report.bin"),
        cert_table: Some(dir.path().join("certs.bin")),
        ..Default::default()
    };
    assert_eq!(run(&a).0, EXIT_OK);
    let a = VerifyArgs {
        report: testdata("gcp-milan-report.bin"),
        certs: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    assert_eq!(run(&a).0, EXIT_OK);

    // Truncated anywhere before the terminator's end.
    for cut in [0, 10, 24, 47] {
        assert_eq!(
            parse_cert_table(&table[..cut]),
            Err(CertsError::Truncated),
            "{cut}"
        );
    }
    // Cut inside the certificates: the entries point outside.
    assert!(matches!(
        parse_cert_table(&table[..table.len() - 1]),
        Err(CertsError::OutOfRange(_))
    ));
    let entry = |g: [u8; 16], off: u32, len: u32| {
        let mut e = g.to_vec();
        e.extend(off.to_le_bytes());
        e.extend(len.to_le_bytes());
        e
    };
    let body = vec![0x30u8; 100];
    let mk = |entries: &[Vec<u8>]| {
        let mut t: Vec<u8> = entries.concat();
        t.extend([0u8; 24]);
        t.extend(&body);
        t
    };
    let start = 3 * 24;
    // Overlapping.
    let t = mk(&[
        entry(guid::VCEK, start, 50),
        entry(guid::ASK, start + 49, 10),
    ]);
    assert_eq!(parse_cert_table(&t), Err(CertsError::Overlap(0, 1)));
    // Out of range: past the end, into the table, u32 overflow.
    let t = mk(&[
        entry(guid::VCEK, start, 101),
        entry(guid::ASK, start + 200, 1),
    ]);
    assert_eq!(parse_cert_table(&t), Err(CertsError::OutOfRange(0)));
    let t = mk(&[entry(guid::VCEK, 0, 10), entry(guid::ASK, start, 1)]);
    assert_eq!(parse_cert_table(&t), Err(CertsError::OutOfRange(0)));
    let t = mk(&[
        entry(guid::VCEK, u32::MAX, u32::MAX),
        entry(guid::ASK, start, 1),
    ]);
    assert_eq!(parse_cert_table(&t), Err(CertsError::OutOfRange(0)));
    // Empty and duplicated entries.
    let t = mk(&[entry(guid::VCEK, start, 0), entry(guid::ASK, start, 1)]);
    assert_eq!(parse_cert_table(&t), Err(CertsError::Empty(0)));
    let t = mk(&[
        entry(guid::VCEK, start, 10),
        entry(guid::VCEK, start + 10, 10),
    ]);
    assert_eq!(parse_cert_table(&t), Err(CertsError::Duplicate("VCEK")));
    // Unknown GUIDs are skipped; the CRL too.
    let t = mk(&[entry([7; 16], start, 10), entry(guid::CRL, start + 10, 10)]);
    assert_eq!(parse_cert_table(&t), Ok(certs::CertSet::default()));
    // Too many entries.
    let many: Vec<Vec<u8>> = (0..17)
        .map(|i| entry([i as u8 + 1; 16], 10_000, 1))
        .collect();
    assert_eq!(
        parse_cert_table(&mk(&many)),
        Err(CertsError::TooManyEntries)
    );
}

#[test]
fn one_file_holding_report_and_certificate_table() {
    let der = gcp_vcek_der();
    let report = std::fs::read(testdata("gcp-milan-report.bin")).unwrap();
    let table = build_cert_table(&[(guid::VCEK, &der)]);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, parts: &[&[u8]]| {
        let p = dir.path().join(name);
        std::fs::write(&p, parts.concat()).unwrap();
        VerifyArgs {
            report: p,
            ..Default::default()
        }
    };
    let mut header = vec![0u8; 32];
    header[4..8].copy_from_slice(&(REPORT_LEN as u32).to_le_bytes());
    // Report then table, with and without the MSG_REPORT_RSP header.
    assert_eq!(run(&file("ext.bin", &[&report, &table])).0, EXIT_OK);
    assert_eq!(
        run(&file("rsp.bin", &[&header, &report, &table])).0,
        EXIT_OK
    );
    // A zero-padded response buffer carries no table: the VCEK must come
    // from elsewhere, and does.
    let mut padded = file("pad.bin", &[&header, &report, &[0u8; 2000]]);
    let (code, out) = run(&padded);
    assert_eq!(code, 1, "{out}");
    padded.vcek = Some(testdata("gcp-milan-vcek.pem"));
    assert_eq!(run(&padded).0, EXIT_OK);
    // The signed report inside still fails on a flipped bit.
    let mut flipped = report.clone();
    flipped[0x90] ^= 1;
    assert_eq!(run(&file("flip.bin", &[&flipped, &table])).0, EXIT_INVALID);
    // A firmware error in the header and a tail that is not a table are
    // usage errors that say which.
    let mut bad = header.clone();
    bad[0] = 0x16;
    let (code, out) = run(&file("status.bin", &[&bad, &report, &table]));
    assert_eq!(code, 1);
    assert!(out.contains("status is 0x16"), "{out}");
    let (code, out) = run(&file("tail.bin", &[&report, b"garbage!"]));
    assert_eq!(code, 1);
    assert!(out.contains("not a certificate table"), "{out}");
    // An explicit --cert-table wins over the one in the file.
    let other = build_cert_table(&[(guid::VCEK, b"\x30\x03\x02\x01\x00")]);
    std::fs::write(dir.path().join("other.bin"), &other).unwrap();
    let mut a = file("ext2.bin", &[&report, &table]);
    a.cert_table = Some(dir.path().join("other.bin"));
    assert_eq!(run(&a).0, EXIT_INVALID);
}
