//! Cross-checks against the `sev` crate's own report parser and verifier:
//! the field offsets this crate reads, the serialization round trip, and
//! the signature decision agree on the real reports and on sim reports.

use std::path::{Path, PathBuf};

use bubble_attestation::{verify_amd, Report, ReportRequest, SimPsp, TeeBackend};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/snp-real")
        .join(name)
}

fn same_fields(ours: &Report) {
    let theirs = AttestationReport::from_bytes(&ours.raw).expect("sev parses the report");
    assert_eq!(theirs.version, ours.version);
    assert_eq!(theirs.guest_svn, ours.guest_svn);
    assert_eq!(u64::from(theirs.policy), ours.policy);
    assert_eq!(theirs.vmpl, ours.vmpl);
    assert_eq!(theirs.report_data, ours.report_data);
    assert_eq!(theirs.measurement, ours.measurement);
    assert_eq!(theirs.host_data, ours.host_data);
    assert_eq!(theirs.chip_id, ours.chip_id);
    let t = ours.reported_tcb();
    let r = theirs.reported_tcb;
    assert_eq!(
        (r.bootloader, r.tee, r.snp, r.microcode),
        (t.bootloader, t.tee, t.snp, t.microcode)
    );
    // sev's serializer reproduces the exact bytes (signed region included).
    let back = theirs.to_bytes().expect("sev serializes the report");
    assert_eq!(back.as_ref(), &ours.raw[..]);
}

fn sev_verifies(raw: &[u8], vcek_der: &[u8]) -> bool {
    use sev::certs::snp::{builtin, ca, Certificate, Chain, Verifiable};
    let Ok(report) = AttestationReport::from_bytes(raw) else {
        return false;
    };
    let chain = Chain {
        ca: ca::Chain {
            ark: builtin::milan::ark().unwrap(),
            ask: builtin::milan::ask().unwrap(),
        },
        vek: Certificate::from_der(vcek_der).unwrap(),
    };
    (&chain, &report).verify().is_ok()
}

#[test]
fn real_reports_agree_with_sev() {
    for (rep, vcek) in [
        ("gcp-milan-report.bin", "gcp-milan-vcek.pem"),
        ("sevcrate-milan-report.hex", "sevcrate-milan-vcek.der"),
    ] {
        let r = Report::parse_any(&std::fs::read(testdata(rep)).unwrap()).unwrap();
        let vcek =
            bubble_attestation::verify::cert_der(&std::fs::read(testdata(vcek)).unwrap()).unwrap();
        same_fields(&r);
        assert!(verify_amd(&r, &vcek, None).is_ok(), "{rep}");
        assert!(sev_verifies(&r.raw, &vcek), "{rep}");
        // Both refuse the same mutated copies (a sample across the region).
        for i in (0..0x2A0)
            .step_by(37)
            .chain([0x2A0, 0x2A0 + 47, 0x2A0 + 72])
        {
            let mut m = r.raw.clone();
            m[i] ^= 0x04;
            let ours = Report::parse(&m)
                .map(|p| verify_amd(&p, &vcek, None).is_ok())
                .unwrap_or(false);
            assert!(!ours, "{rep}: byte {i:#x}");
            assert!(!sev_verifies(&m, &vcek), "{rep}: sev accepted byte {i:#x}");
        }
    }
}

#[test]
fn sim_reports_parse_identically_in_sev() {
    let dir = tempfile::tempdir().unwrap();
    let psp = SimPsp::load_or_create(dir.path()).unwrap();
    let raw = psp
        .report(&ReportRequest {
            report_data: [0x5Au8; 64],
            measurement: [0xC3u8; 48],
            host_data: [0x0Fu8; 32],
        })
        .unwrap();
    let r = Report::parse(&raw).unwrap();
    assert!(r.is_simulated());
    same_fields(&r);
    // sev's own signature check accepts the sim report with the sim VCEK.
    let report = AttestationReport::from_bytes(&raw).unwrap();
    let vcek = sev::certs::snp::Certificate::from_der(&psp.cert_chain().unwrap().vcek).unwrap();
    use sev::certs::snp::Verifiable;
    (&vcek, &report)
        .verify()
        .expect("sev verifies the sim signature");
}
