//! Verifying a bubble's attestation, failing closed: a report is accepted
//! only if it is genuine (chain, signature, KEY_INFO, SIGNATURE_ALGO) and
//! describes exactly what the parent expects: the measurement (or an
//! explicit allowlist), the security policy (its digest recomputed), the
//! portions, and HOST_DATA (the bubble id and owner), bound to the
//! parent's nonce and the bubble's keys by REPORT_DATA.

use bubble_attestation::{host_data, Policy, SecurityPolicy, Tcb};
use bubble_proto::v1 as pb;

use crate::{BubbleKeys, ClientError};

/// What a parent expects of the bubble it attests. Every field is checked;
/// [`Expectations::new`] gives the client library's defaults.
#[derive(Clone, Debug)]
pub struct Expectations {
    /// Appraisal of the report. Client defaults: the expected measurement
    /// only, VMPL 0, no debug, no migration agent, no simulation. An empty
    /// measurement list is refused unless `allow_any_measurement` is set
    /// explicitly; a hardware (non-simulated) report is refused unless
    /// `min_tcb` is set.
    pub appraisal: Policy,
    /// The security policy the bubble must run under; its digest is
    /// recomputed and compared with the one REPORT_DATA binds.
    pub security_policy: SecurityPolicy,
    /// The portions expected, in load order: (name, SHA-384 of the module).
    pub portions: Vec<(String, Vec<u8>)>,
    /// The HOST_DATA expected: [`host_data`]`(bubble_id, owner)`.
    pub host_data: [u8; 32],
}

impl Expectations {
    /// Expects `measurement`, the default security policy, no portions and
    /// the HOST_DATA of `bubble_id` and `owner` (the broker's name for the
    /// parent: `uid:<n>` on its Unix socket, the certificate's common name
    /// over mutual TLS).
    pub fn new(measurement: [u8; 48], bubble_id: &str, owner: &str) -> Self {
        Self {
            appraisal: Policy {
                allowed_measurements: vec![hex_of(&measurement)],
                max_vmpl: 0,
                ..Policy::default()
            },
            security_policy: SecurityPolicy::default(),
            portions: Vec::new(),
            host_data: host_data(bubble_id, owner),
        }
    }

    /// Accepts reports of the simulated PSP (no hardware protection).
    pub fn allow_sim(mut self) -> Self {
        self.appraisal.allow_sim = true;
        self
    }

    /// Expects this security policy.
    pub fn with_security_policy(mut self, p: SecurityPolicy) -> Self {
        self.security_policy = p;
        self
    }

    /// Expects portion `name` with this module next, in load order (the
    /// report must bind exactly the expected portions).
    pub fn with_portion(mut self, name: &str, module: &[u8]) -> Self {
        use sha2::{Digest, Sha384};
        self.portions
            .push((name.to_string(), Sha384::digest(module).to_vec()));
        self
    }

    /// Requires at least this TCB.
    pub fn with_min_tcb(mut self, t: Tcb) -> Self {
        self.appraisal.min_tcb = Some(t);
        self
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a verified attestation established.
#[derive(Clone, Debug)]
pub struct Attested {
    /// The bubble's keys, bound by REPORT_DATA.
    pub keys: BubbleKeys,
    /// The launch measurement.
    pub measurement: [u8; 48],
    /// Whether the report came from the simulated PSP (no hardware protection).
    pub simulated: bool,
    /// The portions the report binds, in load order: (name, SHA-384 of module).
    pub portions: Vec<(String, Vec<u8>)>,
    /// The portions digest the report binds (credentials are sealed to it).
    pub portions_digest: [u8; 48],
    /// The security-policy digest the report binds (equal to the expected one).
    pub policy_digest: [u8; 32],
    /// HOST_DATA (equal to the expected one).
    pub host_data: [u8; 32],
    /// The TCB the endorsement key certifies.
    pub tcb: Tcb,
}

/// Verifies an attestation for `nonce` against `expect`: chain and
/// signature (AMD roots, or `trusted_sim_ark` for simulated reports), the
/// appraisal policy, HOST_DATA, the REPORT_DATA binding of nonce, portions,
/// security policy and keys, the security-policy digest against the
/// expected policy, and the portions list against the bound digest and the
/// expected portions.
pub fn verify_attestation(
    a: &pb::Attestation,
    nonce: &[u8],
    expect: &Expectations,
    trusted_sim_ark: Option<&[u8]>,
) -> Result<Attested, ClientError> {
    use sha2::{Digest, Sha384};
    let refuse = |m: String| ClientError::Attestation(m);
    let report = bubble_attestation::Report::parse(&a.report).map_err(|e| refuse(e.to_string()))?;
    let verified = if report.is_simulated() {
        let ark = trusted_sim_ark
            .ok_or_else(|| refuse("SIMULATED report and no trusted simulation ARK given".into()))?;
        bubble_attestation::verify_sim(&report, &a.vcek_der, &a.ask_der, ark)
    } else {
        bubble_attestation::verify_amd(&report, &a.vcek_der, None)
    }
    .map_err(|e| refuse(e.to_string()))?;
    let mut problems = expect.appraisal.violations(&report, &verified.tcb);
    if !verified.simulated && expect.appraisal.min_tcb.is_none() {
        problems.push("no minimum TCB given for a hardware report".into());
    }
    if report.host_data != expect.host_data {
        problems.push(format!(
            "HOST_DATA {} is not the expected {} (another bubble or owner)",
            hex_of(&report.host_data),
            hex_of(&expect.host_data)
        ));
    }
    if !problems.is_empty() {
        return Err(refuse(problems.join("; ")));
    }
    let key = |v: &[u8]| -> Result<[u8; 32], ClientError> {
        v.try_into()
            .map_err(|_| refuse("malformed public key".into()))
    };
    let keys = BubbleKeys {
        kem_pk: key(&a.kem_public_key)?,
        sig_pk: key(&a.sig_public_key)?,
    };
    let policy_digest: [u8; 32] = a
        .policy_digest
        .as_slice()
        .try_into()
        .map_err(|_| refuse("malformed digests".into()))?;
    if a.portions_digest.len() != 48 {
        return Err(refuse("malformed digests".into()));
    }
    let mut bound = nonce.to_vec();
    bound.extend(&a.portions_digest);
    bound.extend(policy_digest);
    if bubble_keys::report_data(&bound, &keys.kem_pk, &keys.sig_pk) != report.report_data {
        return Err(refuse(
            "REPORT_DATA does not bind this nonce, these portions, this policy and these keys"
                .into(),
        ));
    }
    if policy_digest != expect.security_policy.digest() {
        return Err(refuse(format!(
            "the bubble's security policy (digest {}) is not the expected one ({})",
            hex_of(&policy_digest),
            hex_of(&expect.security_policy.digest())
        )));
    }
    let mut d = [0u8; 48];
    let portions_digest: [u8; 48] = a
        .portions_digest
        .as_slice()
        .try_into()
        .map_err(|_| refuse("malformed digests".into()))?;
    for p in &a.portions {
        let mut h = Sha384::new();
        h.update(d);
        h.update((p.name.len() as u64).to_le_bytes());
        h.update(p.name.as_bytes());
        h.update(&p.module_sha384);
        d = h.finalize().into();
    }
    if d != portions_digest {
        return Err(refuse(
            "the portions list does not match the bound portions digest".into(),
        ));
    }
    let portions: Vec<(String, Vec<u8>)> = a
        .portions
        .iter()
        .map(|p| (p.name.clone(), p.module_sha384.clone()))
        .collect();
    if portions != expect.portions {
        return Err(refuse(format!(
            "the bubble runs portions {:?}, not the expected {:?}",
            portions.iter().map(|p| &p.0).collect::<Vec<_>>(),
            expect.portions.iter().map(|p| &p.0).collect::<Vec<_>>()
        )));
    }
    Ok(Attested {
        keys,
        measurement: report.measurement,
        simulated: verified.simulated,
        portions,
        portions_digest,
        policy_digest,
        host_data: report.host_data,
        tcb: verified.tcb,
    })
}
