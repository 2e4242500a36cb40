//! The client fails closed: an attestation from the simulated PSP, built
//! here as the broker builds it, verifies only against the expected
//! measurement, security policy, portions and HOST_DATA.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_attestation::{host_data, ReportRequest, SecurityPolicy, SimPsp, TeeBackend};
use bubble_client::{verify_attestation, ClientError, Expectations};
use bubble_proto::v1 as pb;

const ID: &str = "b-test";
const OWNER: &str = "uid:1000";
const MEASUREMENT: [u8; 48] = [0x5A; 48];
const NONCE: [u8; 32] = [0x11; 32];

fn policy() -> SecurityPolicy {
    SecurityPolicy {
        credential_rate: None,
        grants: vec![("payments".into(), vec!["k".into()])],
        ..Default::default()
    }
}

/// An attestation as the broker returns it, for `hd` as HOST_DATA.
fn attestation(psp: &SimPsp, hd: [u8; 32]) -> pb::Attestation {
    let (kem, sig) = ([3u8; 32], [4u8; 32]);
    let portions_digest = [0u8; 48];
    let policy_digest = policy().digest();
    let mut bound = NONCE.to_vec();
    bound.extend(portions_digest);
    bound.extend(policy_digest);
    let report = psp
        .report(&ReportRequest {
            report_data: bubble_keys::report_data(&bound, &kem, &sig),
            measurement: MEASUREMENT,
            host_data: hd,
        })
        .unwrap();
    let chain = psp.cert_chain().unwrap();
    pb::Attestation {
        bubble_id: ID.into(),
        report,
        tee: "sim".into(),
        ark_der: chain.ark,
        ask_der: chain.ask,
        vcek_der: chain.vcek,
        kem_public_key: kem.to_vec(),
        sig_public_key: sig.to_vec(),
        portions_digest: portions_digest.to_vec(),
        policy_digest: policy_digest.to_vec(),
        portions: vec![],
    }
}

fn refused(r: Result<bubble_client::Attested, ClientError>, why: &str) {
    match r {
        Err(ClientError::Attestation(m)) => assert!(m.contains(why), "{why}: {m}"),
        other => panic!("{why}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn only_the_expected_bubble_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let psp = SimPsp::load_or_create(dir.path()).unwrap();
    let ark = psp.cert_chain().unwrap().ark;
    let a = attestation(&psp, host_data(ID, OWNER));
    let right = Expectations::new(MEASUREMENT, ID, OWNER)
        .allow_sim()
        .with_security_policy(policy());
    let ok = verify_attestation(&a, &NONCE, &right, Some(&ark)).unwrap();
    assert_eq!(ok.measurement, MEASUREMENT);
    assert_eq!(ok.policy_digest, policy().digest());
    assert_eq!(ok.host_data, host_data(ID, OWNER));
    assert!(ok.simulated);

    // Wrong measurement.
    let e = Expectations::new([0; 48], ID, OWNER)
        .allow_sim()
        .with_security_policy(policy());
    refused(
        verify_attestation(&a, &NONCE, &e, Some(&ark)),
        "not an allowed measurement",
    );
    // No measurement pinned, unless written explicitly.
    let mut e = right.clone();
    e.appraisal.allowed_measurements.clear();
    refused(verify_attestation(&a, &NONCE, &e, Some(&ark)), "not pinned");
    e.appraisal.allow_any_measurement = true;
    assert!(verify_attestation(&a, &NONCE, &e, Some(&ark)).is_ok());
    // Wrong security policy (the default one, and another one).
    let e = Expectations::new(MEASUREMENT, ID, OWNER).allow_sim();
    refused(
        verify_attestation(&a, &NONCE, &e, Some(&ark)),
        "security policy",
    );
    let e = right.clone().with_security_policy(SecurityPolicy {
        credential_rate: None,
        grants: vec![("payments".into(), vec!["k".into(), "k2".into()])],
        ..Default::default()
    });
    refused(
        verify_attestation(&a, &NONCE, &e, Some(&ark)),
        "security policy",
    );
    // Wrong HOST_DATA: another owner, another bubble.
    for (id, owner) in [(ID, "uid:0"), ("b-other", OWNER)] {
        let e = Expectations::new(MEASUREMENT, id, owner)
            .allow_sim()
            .with_security_policy(policy());
        refused(verify_attestation(&a, &NONCE, &e, Some(&ark)), "HOST_DATA");
    }
    // A report with zero HOST_DATA (a broker that does not bind it).
    let zero = attestation(&psp, [0; 32]);
    refused(
        verify_attestation(&zero, &NONCE, &right, Some(&ark)),
        "HOST_DATA",
    );
    // Unexpected portions.
    let mut e = right.clone();
    e.portions = vec![("payments".into(), vec![1; 48])];
    refused(verify_attestation(&a, &NONCE, &e, Some(&ark)), "portions");
    // Simulation not allowed by default; VMPL 0 by default.
    let e = Expectations::new(MEASUREMENT, ID, OWNER).with_security_policy(policy());
    refused(verify_attestation(&a, &NONCE, &e, Some(&ark)), "SIMULATED");
    assert_eq!(right.appraisal.max_vmpl, 0);
}
