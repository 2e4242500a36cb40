//! Triggers, events and results: requests to typed commands and back.

use bubble_proto::v1 as pb;
use sha2::{Digest, Sha384};

use super::convert::{policy_from_pb, valid_name, validate_bubble_id, validate_op, NAME_RULE};
use crate::config::BrokerConfig;
use crate::core::triggers::{check_subject, EventResult, NewTrigger};
use crate::error::{invalid, BrokerError};
use crate::store::registry::triggers::{TriggerRecord, TriggerSource, TriggerTarget};
use crate::store::registry::PortionPolicy;

/// Largest batch a trigger may fetch.
pub const MAX_BATCH: u32 = 256;
/// Most events of one trigger in flight.
pub const MAX_CONCURRENCY: u32 = 64;
/// Most deliveries of one event.
pub const MAX_DELIVER: u32 = 100;

fn bounded(field: &'static str, v: u32, default: u32, max: u32) -> Result<u32, BrokerError> {
    match v {
        0 => Ok(default),
        v if v <= max => Ok(v),
        _ => Err(invalid(
            field,
            format!("must be 0 (default {default}) to {max}"),
        )),
    }
}

/// A trigger id: `t-` and 32 hex digits.
pub fn validate_trigger_id(id: &str) -> Result<(), BrokerError> {
    let ok =
        id.len() == 34 && id.starts_with("t-") && id[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "trigger_id",
            "must be t- followed by 32 hex digits",
        ))
    }
}

/// CreateTrigger.
pub fn create(
    req: pb::CreateTriggerRequest,
    cfg: &BrokerConfig,
) -> Result<NewTrigger, BrokerError> {
    let source = match req.source.as_str() {
        "" | "embedded" => TriggerSource::Embedded,
        "nats" => TriggerSource::Nats,
        _ => return Err(invalid("source", "must be embedded or nats")),
    };
    check_subject(&req.subject)?;
    let target = match (req.bubble_id.is_empty(), req.profile.is_empty()) {
        (false, true) => {
            validate_bubble_id(&req.bubble_id)?;
            if !req.module.is_empty() {
                return Err(invalid(
                    "module",
                    "only with profile (a named bubble has its portions loaded)",
                ));
            }
            TriggerTarget::Bubble(req.bubble_id)
        }
        (true, false) => {
            if !valid_name(&req.profile) {
                return Err(invalid("profile", NAME_RULE));
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
            let module_sha384 = hex::encode(Sha384::digest(&req.module));
            TriggerTarget::Pool {
                profile: req.profile,
                module: req.module,
                module_sha384,
            }
        }
        _ => {
            return Err(invalid(
                "bubble_id",
                "give exactly one of bubble_id and profile",
            ))
        }
    };
    if !valid_name(&req.portion) {
        return Err(invalid("portion", NAME_RULE));
    }
    validate_op(&req.function).map_err(|_| invalid("function", NAME_RULE))?;
    let ceiling = cfg.events.max_pending.max(1);
    let max_pending = match req.max_pending {
        0 => ceiling,
        n if n <= ceiling => n,
        _ => {
            return Err(invalid(
                "max_pending",
                format!("must be 0 (default {ceiling}) to {ceiling}"),
            ))
        }
    };
    let policy = match &req.policy {
        Some(p) => Some(policy_from_pb(Some(p), cfg.max_payload)?),
        None => None,
    };
    let seal_to = match req.seal_to.len() {
        0 => None,
        32 => Some(
            <[u8; 32]>::try_from(req.seal_to.as_slice())
                .map_err(|_| invalid("seal_to", "must be empty or a 32-byte X25519 public key"))?,
        ),
        _ => {
            return Err(invalid(
                "seal_to",
                "must be empty or a 32-byte X25519 public key",
            ))
        }
    };
    Ok(NewTrigger {
        policy,
        max_pending,
        seal_to,
        source,
        subject: req.subject,
        target,
        portion: req.portion,
        function: req.function,
        batch_size: bounded("batch_size", req.batch_size, 1, MAX_BATCH)?,
        max_concurrency: bounded("max_concurrency", req.max_concurrency, 1, MAX_CONCURRENCY)?,
        max_deliver: bounded("max_deliver", req.max_deliver, 5, MAX_DELIVER)?,
    })
}

/// A trigger as the API shows it (never the module's bytes).
pub fn trigger_to_pb(t: &TriggerRecord) -> pb::Trigger {
    let policy_digest = match (&t.target, &t.policy) {
        (_, Some(p)) => p.wire().digest().to_vec(),
        (TriggerTarget::Pool { .. }, None) => PortionPolicy::default().wire().digest().to_vec(),
        (TriggerTarget::Bubble(_), None) => Vec::new(),
    };
    let (bubble_id, profile, module_sha384) = match &t.target {
        TriggerTarget::Bubble(id) => (id.clone(), String::new(), String::new()),
        TriggerTarget::Pool {
            profile,
            module_sha384,
            ..
        } => (String::new(), profile.clone(), module_sha384.clone()),
    };
    pb::Trigger {
        trigger_id: t.id.clone(),
        owner: t.owner.clone(),
        source: t.source.label().to_string(),
        subject: t.subject.clone(),
        bubble_id,
        profile,
        portion: t.portion.clone(),
        function: t.function.clone(),
        batch_size: t.batch_size,
        max_concurrency: t.max_concurrency,
        max_deliver: t.max_deliver,
        created_at_ms: t.created_at_ms,
        module_sha384,
        policy_digest,
        seal_to: t.seal_to.map(|k| k.to_vec()).unwrap_or_default(),
        max_pending: t.max_pending,
        // Filled in by the caller that reads the queue.
        pending: 0,
    }
}

/// A result as the API shows it.
pub fn result_to_pb(key: String, r: EventResult) -> pb::EventResult {
    let mut out = pb::EventResult {
        key,
        ..Default::default()
    };
    match r {
        EventResult::Pending => out.outcome = "pending".into(),
        EventResult::Ok(s) => {
            out.outcome = "ok".into();
            out.sealed = s.sealed;
            out.input_sha256 = s.input_sha256.to_vec();
            out.output = s.output;
            out.bubble_id = s.bubble_id;
            out.call_id = s.call_id;
            out.signature = s.signature;
        }
        EventResult::Refused(r) => {
            out.outcome = "refused".into();
            out.reason = r;
        }
        EventResult::Failed(r) => {
            out.outcome = "failed".into();
            out.reason = r;
        }
    }
    out
}

impl super::BrokerService {
    /// A trigger as the API shows it, with its pending count.
    pub(super) async fn trigger_pb(
        &self,
        t: &crate::store::registry::triggers::TriggerRecord,
    ) -> Result<pb::Trigger, tonic::Status> {
        let mut out = trigger_to_pb(t);
        out.pending = self.broker.trigger_pending(t).await?;
        Ok(out)
    }

    /// `GetResult`: the result of one event of the caller's trigger.
    pub(super) async fn get_result_rpc(
        &self,
        request: tonic::Request<pb::GetResultRequest>,
    ) -> Result<tonic::Response<pb::EventResult>, tonic::Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        validate_trigger_id(&req.trigger_id)?;
        let r = self
            .broker
            .event_result(&parent, &req.trigger_id, &req.key)
            .await
            .map_err(|e| self.deny(&parent, &req.trigger_id, e))?;
        Ok(tonic::Response::new(result_to_pb(req.key, r)))
    }

    /// `GetAwaitResult`: the kept answer of the caller's direct call that
    /// awaited a key.
    pub(super) async fn await_result_rpc(
        &self,
        request: tonic::Request<pb::GetAwaitResultRequest>,
    ) -> Result<tonic::Response<pb::EventResult>, tonic::Status> {
        let parent = self.parent(&request)?;
        let key = request.into_inner().key;
        if !bubble_abi::awaits::is_valid_await_key(key.as_bytes()) {
            return Err(invalid("key", "not a valid await key").into());
        }
        let r = self
            .broker
            .await_result(&parent, &key)
            .await
            .map_err(|e| self.deny(&parent, &key, e))?;
        Ok(tonic::Response::new(result_to_pb(key, r)))
    }
}
