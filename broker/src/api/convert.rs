//! gRPC requests into validated core commands, core results into gRPC
//! messages. Every field a parent sends is checked here; the core receives
//! only typed, bounded values.

use std::time::Duration;

use bubble_proto::v1 as pb;

use crate::config::{self, BrokerConfig};
use crate::core::{
    Attach, AttestationBundle, Call, Event, LoadPortion, NewBubble, Provision, Restore, State,
    Suspend, Target, UsageFacts,
};
use crate::error::{invalid, BrokerError};
use crate::store::registry::{BubbleRecord, IdleAction, IdleRule, PortionPolicy};
use crate::vmm::ImageSpec;

/// Guest ops only the broker sends: a parent's raw `Call` of one would
/// change the policy after it was attested, load a portion the broker's
/// list (and so the attestation) does not show, or bypass the checks of
/// ProvisionCredential, or resume an awaiting call with a payload of its
/// choosing instead of the awaited event.
const RESERVED_OPS: [&str; 7] = [
    bubble_abi::OP_RESUME,
    bubble_abi::ops::OP_SET_POLICY,
    bubble_abi::ops::OP_LOAD_PORTION,
    bubble_abi::ops::OP_PROVISION,
    bubble_abi::ops::OP_PORTION,
    bubble_abi::ops::OP_PORTION_SEALED,
    bubble_abi::OP_PORTION_SESSION,
];

/// Longest an attach may wait for a pooled bubble.
const MAX_ATTACH_WAIT_MS: u64 = 60_000;

pub(crate) const NAME_RULE: &str = "must be 1 to 64 characters of A-Z a-z 0-9 . _ -";

/// Proto state of a lifecycle state.
pub fn state_to_pb(s: State) -> pb::BubbleState {
    match s {
        State::Booting => pb::BubbleState::Booting,
        State::Ready => pb::BubbleState::Ready,
        State::Busy => pb::BubbleState::Busy,
        State::Suspended => pb::BubbleState::Suspended,
        State::Failed => pb::BubbleState::Failed,
        State::Deleted => pb::BubbleState::Deleted,
    }
}

/// A record as the API shows it.
pub fn bubble_to_pb(r: &BubbleRecord) -> pb::Bubble {
    pb::Bubble {
        bubble_id: r.id.clone(),
        owner: r.owner.clone(),
        state: state_to_pb(r.state) as i32,
        failure_reason: r.failure_reason.clone(),
        memory_mib: r.memory_mib,
        vcpus: r.vcpus,
        image: r.image.clone(),
        client_request_id: r.client_request_id.clone(),
        created_at_ms: r.created_at_ms,
        boot_us: r.boot_us,
        vmm_pid: r.vmm_pid,
        calls: r.calls,
        profile: r.profile.clone(),
        idle: Some(idle_to_pb(r.idle)),
        generation: r.generation,
        health: String::new(),
        jail_warning: r.jail_warning.clone(),
        policy_digest: r.policy.wire().digest().to_vec(),
    }
}

/// An event as watchers see it.
pub fn event_to_pb(e: &Event) -> pb::BubbleEvent {
    pb::BubbleEvent {
        bubble_id: e.bubble_id.clone(),
        state: state_to_pb(e.state) as i32,
        reason: e.reason.clone(),
        at_ms: e.at_ms,
        security: e.security.as_ref().map(super::audit::security_to_pb),
    }
}

fn idle_to_pb(i: IdleRule) -> pb::IdlePolicy {
    pb::IdlePolicy {
        idle_timeout_s: i.timeout_s,
        action: match i.action {
            IdleAction::Stay => pb::IdleAction::Stay,
            IdleAction::Suspend => pb::IdleAction::Suspend,
            IdleAction::Delete => pb::IdleAction::Delete,
        } as i32,
    }
}

/// The usage document the broker signs.
pub fn usage_to_pb(u: UsageFacts) -> pb::Usage {
    pb::Usage {
        bubble_id: u.bubble_id,
        owner: u.owner,
        vcpu_us: u.vcpu_us,
        memory_mib_seconds: u.memory_mib_seconds,
        calls: u.calls,
        bytes_in: u.bytes_in,
        bytes_out: u.bytes_out,
        from_ms: u.from_ms,
        to_ms: u.to_ms,
    }
}

/// An attestation as the API shows it.
pub fn attestation_to_pb(a: AttestationBundle) -> pb::Attestation {
    pb::Attestation {
        bubble_id: a.bubble_id,
        report: a.report,
        tee: a.tee,
        ark_der: a.chain.ark,
        ask_der: a.chain.ask,
        vcek_der: a.chain.vcek,
        kem_public_key: a.binding.kem_pk.to_vec(),
        sig_public_key: a.binding.sig_pk.to_vec(),
        portions_digest: a.binding.portions_digest.to_vec(),
        policy_digest: a.binding.policy_digest.to_vec(),
        portions: a
            .portions
            .into_iter()
            .map(|(name, module_sha384)| pb::PortionRef {
                name,
                module_sha384,
            })
            .collect(),
    }
}

/// Validates an idle policy from a request (`None`: not given).
fn idle_from_pb(p: Option<&pb::IdlePolicy>) -> Result<Option<IdleRule>, BrokerError> {
    let Some(p) = p else { return Ok(None) };
    let action = match pb::IdleAction::try_from(p.action) {
        Ok(pb::IdleAction::Unspecified | pb::IdleAction::Stay) => IdleAction::Stay,
        Ok(pb::IdleAction::Delete) => IdleAction::Delete,
        Ok(pb::IdleAction::Suspend) => IdleAction::Suspend,
        Err(_) => {
            return Err(invalid(
                "idle.action",
                format!("unknown value {}", p.action),
            ))
        }
    };
    if action != IdleAction::Stay && p.idle_timeout_s == 0 {
        return Err(invalid(
            "idle.idle_timeout_s",
            "must be > 0 when an idle action is set",
        ));
    }
    Ok(Some(IdleRule {
        timeout_s: p.idle_timeout_s,
        action,
    }))
}

/// A portion, credential or grant name.
pub fn valid_name(s: &str) -> bool {
    bubble_abi::is_valid_name(s, bubble_abi::MAX_NAME_LEN)
}

/// Validates a requested security policy (`None`: the default).
pub(crate) fn policy_from_pb(
    p: Option<&pb::SecurityPolicy>,
    max_payload: usize,
) -> Result<PortionPolicy, BrokerError> {
    let mut out = PortionPolicy::default();
    let Some(p) = p else { return Ok(out) };
    if p.fuel_per_call > 0 {
        out.fuel_per_call = p.fuel_per_call;
    }
    if p.memory_limit_bytes > 0 {
        if p.memory_limit_bytes > 64 << 20 {
            return Err(invalid("policy.memory_limit_bytes", "at most 64 MiB"));
        }
        out.memory_limit_bytes = p.memory_limit_bytes;
    }
    if p.call_deadline_ms > 0 {
        if u128::from(p.call_deadline_ms) > config::MAX_CALL_DEADLINE.as_millis() {
            return Err(invalid(
                "policy.call_deadline_ms",
                format!("at most {} ms", config::MAX_CALL_DEADLINE.as_millis()),
            ));
        }
        out.call_deadline_ms = p.call_deadline_ms;
    }
    if p.max_output_bytes > 0 {
        if p.max_output_bytes as usize > max_payload {
            return Err(invalid(
                "policy.max_output_bytes",
                format!("at most the payload limit of {max_payload} bytes"),
            ));
        }
        out.max_output_bytes = p.max_output_bytes;
    }
    if p.grants.len() > 16 {
        return Err(invalid("policy.grants", "at most 16 grants"));
    }
    for g in &p.grants {
        if !valid_name(&g.portion) {
            return Err(invalid("policy.grants.portion", NAME_RULE));
        }
        if g.credentials.len() > 16 || !g.credentials.iter().all(|c| valid_name(c)) {
            return Err(invalid(
                "policy.grants.credentials",
                "at most 16 names of 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        out.grants.push((g.portion.clone(), g.credentials.clone()));
    }
    if let Some(r) = &p.credential_rate {
        const MAX_RATE: u32 = 1_000_000;
        if !(1..=MAX_RATE).contains(&r.per_sec) || !(1..=MAX_RATE).contains(&r.burst) {
            return Err(invalid(
                "policy.credential_rate",
                format!("per_sec and burst must be 1 to {MAX_RATE}"),
            ));
        }
        out.credential_rate = Some((r.per_sec, r.burst));
    }
    Ok(out)
}

/// A parent-supplied key-encryption key (empty: none).
fn kek_from_pb(b: &[u8]) -> Result<Option<bubble_keys::Kek>, BrokerError> {
    match b.len() {
        0 => Ok(None),
        32 => Ok(Some(
            bubble_keys::Kek::from_slice(b).map_err(|_| invalid("kek", "must be 32 bytes"))?,
        )),
        _ => Err(invalid("kek", "must be 32 bytes")),
    }
}

/// A module digest: SHA-384 as 96 lowercase hex digits.
pub fn validate_digest(field: &'static str, d: &str) -> Result<(), BrokerError> {
    if d.len() == 96
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(invalid(
            field,
            "must be a SHA-384 digest: 96 lowercase hex digits",
        ))
    }
}

/// Checks a bubble id's shape (`b-` + 32 lowercase hex digits).
pub fn validate_bubble_id(id: &str) -> Result<(), BrokerError> {
    let ok = id.len() == 34
        && id.starts_with("b-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "bubble_id",
            "must be 'b-' followed by 32 hex digits",
        ))
    }
}

fn validate_request_id(id: &str) -> Result<(), BrokerError> {
    if id.len() > 128 {
        return Err(invalid("client_request_id", "longer than 128 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
    {
        return Err(invalid(
            "client_request_id",
            "may only contain A-Z a-z 0-9 . _ : -",
        ));
    }
    Ok(())
}

/// One limit for op names everywhere: the guest contract's MAX_OP_LEN
/// (SIGN and SEAL are flags of the CALL and never lengthen the op).
pub(crate) fn validate_op(op: &str) -> Result<(), BrokerError> {
    if op.is_empty() || op.len() > bubble_abi::MAX_OP_LEN {
        return Err(invalid(
            "op",
            format!("must be 1 to {} characters", bubble_abi::MAX_OP_LEN),
        ));
    }
    if !op
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid("op", "may only contain A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// CreateBubble.
pub fn create(req: pb::CreateBubbleRequest, cfg: &BrokerConfig) -> Result<NewBubble, BrokerError> {
    validate_request_id(&req.client_request_id)?;
    if !(config::MIN_MEMORY_MIB..=config::MAX_MEMORY_MIB).contains(&req.memory_mib) {
        return Err(invalid(
            "memory_mib",
            format!(
                "must be {}..={} MiB, got {}",
                config::MIN_MEMORY_MIB,
                config::MAX_MEMORY_MIB,
                req.memory_mib
            ),
        ));
    }
    if req.vcpus > 1 {
        return Err(invalid(
            "vcpus",
            format!("only 1 vCPU is supported, got {}", req.vcpus),
        ));
    }
    let image = ImageSpec::parse(&req.image, cfg.allow_test_images)
        .map_err(|reason| invalid("image", reason))?;
    Ok(NewBubble {
        client_request_id: req.client_request_id,
        memory_mib: req.memory_mib,
        image,
        idle: idle_from_pb(req.idle.as_ref())?.unwrap_or_default(),
        policy: policy_from_pb(req.policy.as_ref(), cfg.max_payload)?,
    })
}

/// AttachBubble.
pub fn attach(req: pb::AttachBubbleRequest, cfg: &BrokerConfig) -> Result<Attach, BrokerError> {
    validate_request_id(&req.client_request_id)?;
    if u64::from(req.wait_ms) > MAX_ATTACH_WAIT_MS {
        return Err(invalid(
            "wait_ms",
            format!("at most {MAX_ATTACH_WAIT_MS} ms"),
        ));
    }
    Ok(Attach {
        idle: idle_from_pb(req.idle.as_ref())?,
        profile: req.profile,
        client_request_id: req.client_request_id,
        wait: Duration::from_millis(u64::from(req.wait_ms)),
        policy: policy_from_pb(req.policy.as_ref(), cfg.max_payload)?,
    })
}

/// Call.
pub fn call(req: pb::CallRequest, cfg: &BrokerConfig) -> Result<Call, BrokerError> {
    validate_bubble_id(&req.bubble_id)?;
    validate_op(&req.op)?;
    if req.input.len() > cfg.max_payload {
        return Err(invalid(
            "input",
            format!(
                "{} bytes exceeds the broker's max_payload of {} bytes",
                req.input.len(),
                cfg.max_payload
            ),
        ));
    }
    let deadline = match req.deadline_ms {
        0 => None,
        ms => Some(Duration::from_millis(u64::from(ms))),
    };
    if deadline.is_some_and(|d| d > config::MAX_CALL_DEADLINE) {
        return Err(invalid(
            "deadline_ms",
            format!(
                "at most {} ms, got {}",
                config::MAX_CALL_DEADLINE.as_millis(),
                req.deadline_ms
            ),
        ));
    }
    let seal_to = match req.seal_to.len() {
        0 => None,
        32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&req.seal_to);
            Some(k)
        }
        _ => {
            return Err(invalid(
                "seal_to",
                "must be an X25519 public key of 32 bytes",
            ))
        }
    };
    let target = if req.portion.is_empty() {
        if req.sealed_input.is_some() {
            return Err(invalid(
                "sealed_input",
                "only portion calls take a sealed input",
            ));
        }
        if req.session_input.is_some() {
            return Err(invalid(
                "session_input",
                "only portion calls take a session input",
            ));
        }
        if RESERVED_OPS.contains(&req.op.as_str()) {
            return Err(invalid(
                "op",
                format!(
                    "{:?} is internal to the broker (use ProvisionCredential, LoadPortion, \
                     the security policy at create, or the portion field)",
                    req.op
                ),
            ));
        }
        Target::Builtin
    } else if !valid_name(&req.portion) {
        return Err(invalid("portion", NAME_RULE));
    } else if let Some(s) = &req.session_input {
        session_input(&req, s, cfg)?;
        Target::SessionPortion {
            portion: req.portion,
            session_id: s.session_id,
            seq: s.seq,
            setup: s.setup.clone(),
        }
    } else if let Some(s) = &req.sealed_input {
        sealed_input(&req.input, s, cfg)?;
        Target::SealedPortion {
            portion: req.portion,
            seq: s.seq,
        }
    } else {
        Target::Portion(req.portion)
    };
    let input = match (req.session_input, req.sealed_input) {
        (Some(s), _) => s.ciphertext,
        (None, Some(s)) => s.sealed,
        (None, None) => req.input,
    };
    Ok(Call {
        bubble_id: req.bubble_id,
        op: req.op,
        target,
        input,
        deadline,
        sign: req.sign,
        seal_to,
    })
}

/// Checks a sealed input's shape: a sequence number, a sealed box that
/// fits the payload limit with the frame's bubble id and `seq`, and no
/// plaintext input beside it.
fn sealed_input(plain: &[u8], s: &pb::SealedInput, cfg: &BrokerConfig) -> Result<(), BrokerError> {
    if !plain.is_empty() {
        return Err(invalid("input", "must be empty when sealed_input is set"));
    }
    if s.seq == 0 {
        return Err(invalid("sealed_input.seq", "must be > 0"));
    }
    // The frame adds the bubble id (1 + 34 bytes) and `seq` (8).
    let max = cfg.max_payload.saturating_sub(43);
    if s.sealed.len() < bubble_keys::hpke::SEALED_BOX_MIN_LEN || s.sealed.len() > max {
        return Err(invalid(
            "sealed_input.sealed",
            format!(
                "must be a sealed box of {} to {max} bytes",
                bubble_keys::hpke::SEALED_BOX_MIN_LEN
            ),
        ));
    }
    Ok(())
}

/// Checks a session input's shape (the bubble checks the rest): ids > 0,
/// a ciphertext holding at least a tag, a setup that is empty or a sealed
/// box of at most `bubble_abi::session::MAX_SETUP_LEN` bytes, everything
/// within the payload limit, and no other input beside it.
fn session_input(
    req: &pb::CallRequest,
    s: &pb::SessionInput,
    cfg: &BrokerConfig,
) -> Result<(), BrokerError> {
    if !req.input.is_empty() || req.sealed_input.is_some() {
        return Err(invalid(
            "session_input",
            "input and sealed_input must be empty when session_input is set",
        ));
    }
    if s.session_id == 0 {
        return Err(invalid("session_input.session_id", "must be > 0"));
    }
    if s.seq == 0 {
        return Err(invalid("session_input.seq", "must be > 0"));
    }
    let max_setup = bubble_abi::session::MAX_SETUP_LEN;
    if !s.setup.is_empty()
        && (s.setup.len() < bubble_keys::hpke::SEALED_BOX_MIN_LEN || s.setup.len() > max_setup)
    {
        return Err(invalid(
            "session_input.setup",
            format!(
                "must be empty or a sealed box of {} to {max_setup} bytes",
                bubble_keys::hpke::SEALED_BOX_MIN_LEN
            ),
        ));
    }
    // The frame adds the bubble id (1 + 34 bytes), the ids (16) and the
    // setup's length (2) and bytes.
    let max = cfg.max_payload.saturating_sub(53 + s.setup.len());
    if s.ciphertext.len() < 16 || s.ciphertext.len() > max {
        return Err(invalid(
            "session_input.ciphertext",
            format!("must be 16 to {max} bytes (the input and its tag)"),
        ));
    }
    Ok(())
}

/// ProvisionCredential.
pub fn provision(req: pb::ProvisionCredentialRequest) -> Result<Provision, BrokerError> {
    validate_bubble_id(&req.bubble_id)?;
    if !valid_name(&req.name) {
        return Err(invalid("name", NAME_RULE));
    }
    if req.sealed.is_empty() || req.sealed.len() > 64 * 1024 {
        return Err(invalid(
            "sealed",
            "must be a sealed box of 1 byte to 64 KiB",
        ));
    }
    Ok(Provision {
        bubble_id: req.bubble_id,
        name: req.name,
        sealed: req.sealed,
    })
}

/// LoadPortion.
pub fn load_portion(
    req: pb::LoadPortionRequest,
    cfg: &BrokerConfig,
) -> Result<LoadPortion, BrokerError> {
    validate_bubble_id(&req.bubble_id)?;
    if !valid_name(&req.name) {
        return Err(invalid("name", NAME_RULE));
    }
    if req.module.is_empty() || req.module.len() + 66 > cfg.max_payload {
        return Err(invalid(
            "module",
            format!(
                "must be 1 byte to the payload limit ({} bytes)",
                cfg.max_payload
            ),
        ));
    }
    Ok(LoadPortion {
        bubble_id: req.bubble_id,
        name: req.name,
        module: req.module,
    })
}

/// SuspendBubble.
pub fn suspend(req: pb::SuspendBubbleRequest) -> Result<Suspend, BrokerError> {
    validate_bubble_id(&req.bubble_id)?;
    Ok(Suspend {
        kek: kek_from_pb(&req.kek)?,
        bubble_id: req.bubble_id,
    })
}

/// RestoreBubble.
pub fn restore(req: pb::RestoreBubbleRequest) -> Result<Restore, BrokerError> {
    let kek = kek_from_pb(&req.kek)?;
    validate_bubble_id(&req.bubble_id)?;
    Ok(Restore {
        bubble_id: req.bubble_id,
        generation: req.generation,
        kek,
    })
}

#[cfg(test)]
mod tests;
