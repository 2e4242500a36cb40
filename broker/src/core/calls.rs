//! Calls into a bubble: plain and portion calls (with plaintext or sealed
//! inputs, single-shot or in a sealed session), signed and sealed results,
//! credential provisioning and portion loading. Every call holds its
//! bubble's permit; BUSY is the permit's lifetime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bubble_abi::ops::{
    PortionCall, SealedPortionCall, SignedResult, OP_PORTION, OP_PORTION_SEALED,
};
use bubble_abi::{self as abi, SessionCall, Signing, OP_PORTION_SESSION};
use tracing::info;

use super::commands::{Call, CallOutput, LoadPortion, PortionLoaded, Provision, Target};
use super::lifecycle::{self, State, Step};
use super::table::Permit;
use super::{now_ms, Broker};
use crate::config;
use crate::error::{invalid, BrokerError};
use crate::store::registry::BubbleRecord;
use crate::vmm::{CallFailure, FailureKind, FailureReason};

impl Broker {
    /// Calls `op` in one of `parent`'s bubbles.
    pub async fn call(
        self: &Arc<Self>,
        parent: &str,
        cmd: Call,
    ) -> Result<CallOutput, BrokerError> {
        let wait = cmd.deadline.unwrap_or(config::DEFAULT_CALL_DEADLINE);
        let permit = self.permit_owned(parent, &cmd.bubble_id, wait).await?;
        let rec = &permit.rec;
        // A portion call runs function `op` of portion `portion`, under the
        // policy's deadline unless the caller asks for a shorter one.
        let cap = Duration::from_millis(u64::from(rec.policy.call_deadline_ms));
        let portion_deadline = cmd.deadline.map_or(cap, |d| d.min(cap));
        let (op, call_input, deadline) = match &cmd.target {
            Target::Builtin => (cmd.op.as_str(), cmd.input, wait),
            Target::Portion(portion) => {
                let frame = PortionCall {
                    portion,
                    function: &cmd.op,
                    input: &cmd.input,
                }
                .encode()
                .map_err(|e| invalid("portion", e.to_string()))?;
                (OP_PORTION, frame, portion_deadline)
            }
            // The broker relays the ciphertext; the bubble opens it.
            Target::SealedPortion { portion, seq } => {
                let frame = SealedPortionCall {
                    bubble_id: &rec.id,
                    portion,
                    function: &cmd.op,
                    seq: *seq,
                    sealed: &cmd.input,
                }
                .encode()
                .map_err(|e| invalid("sealed_input", e.to_string()))?;
                (OP_PORTION_SEALED, frame, portion_deadline)
            }
            Target::SessionPortion {
                portion,
                session_id,
                seq,
                setup,
            } => {
                let frame = SessionCall {
                    bubble_id: &rec.id,
                    portion,
                    function: &cmd.op,
                    session_id: *session_id,
                    seq: *seq,
                    setup,
                    ciphertext: &cmd.input,
                }
                .encode()
                .map_err(|e| invalid("session_input", e.to_string()))?;
                (OP_PORTION_SESSION, frame, portion_deadline)
            }
        };
        // Signed (and maybe sealed) inside the bubble: the SIGN and SEAL
        // flags of the CALL, with the bubble id and `seal_to`; the op name
        // stays as it is.
        let bubble_id = rec.id.clone();
        let sign = (cmd.sign || cmd.seal_to.is_some()).then(|| Signing {
            bubble_id: &bubble_id,
            seal_to: cmd.seal_to,
        });
        let call = abi::Call {
            op,
            sign,
            input: &call_input,
        };
        if sign.is_none() {
            let (output, vmm_us, started) =
                self.invoke_then(permit, &call, deadline, |_, _| {}).await?;
            return Ok(CallOutput {
                output,
                vmm_us,
                signed: None,
                started: Some(started),
            });
        }
        let (raw, vmm_us, started) = self.invoke_then(permit, &call, deadline, |_, _| {}).await?;
        let r = SignedResult::decode(&raw).map_err(|e| {
            BrokerError::GuestRejected(format!(
                "the bubble returned a malformed signed result: {e}"
            ))
        })?;
        Ok(CallOutput {
            output: r.output.to_vec(),
            vmm_us,
            signed: Some((r.call_id, r.signature.to_vec())),
            started: Some(started),
        })
    }

    /// Relays a sealed credential into one of `parent`'s bubbles.
    pub async fn provision(
        self: &Arc<Self>,
        parent: &str,
        cmd: Provision,
    ) -> Result<(), BrokerError> {
        let deadline = config::DEFAULT_CALL_DEADLINE;
        let permit = self.permit_owned(parent, &cmd.bubble_id, deadline).await?;
        let input = abi::ops::Provision {
            bubble_id: &permit.rec.id,
            name: &cmd.name,
            sealed: &cmd.sealed,
        }
        .encode()
        .map_err(|e| invalid("name", e.to_string()))?;
        let call = abi::Call::plain(abi::ops::OP_PROVISION, &input);
        let rec = permit.rec.clone();
        let r = self.invoke(permit, &call, deadline).await.map(|_| ());
        self.audit_provision(&rec, parent, &cmd.name, &r);
        r
    }

    /// Loads a WebAssembly portion into one of `parent`'s bubbles.
    pub async fn load_portion(
        self: &Arc<Self>,
        parent: &str,
        cmd: LoadPortion,
    ) -> Result<PortionLoaded, BrokerError> {
        use sha2::Digest;
        let deadline = config::DEFAULT_CALL_DEADLINE;
        let permit = self.permit_owned(parent, &cmd.bubble_id, deadline).await?;
        let id = permit.rec.id.clone();
        let input = abi::ops::LoadPortion {
            name: &cmd.name,
            module: &cmd.module,
        }
        .encode()
        .map_err(|e| invalid("name", e.to_string()))?;
        let call = abi::Call::plain(abi::ops::OP_LOAD_PORTION, &input);
        let module_sha384 = sha2::Sha384::digest(&cmd.module).to_vec();
        let hex: String = module_sha384.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(why) = self.quarantined(&permit.rec.owner, &hex) {
            return Err(BrokerError::Quarantined(why));
        }
        let name = cmd.name.clone();
        let (digest, _, _) = self
            .invoke_then(permit, &call, deadline, |out, r| {
                // Recorded with the call's own state change, while the
                // permit is held: the list follows the guest's.
                if out.len() == abi::PORTIONS_DIGEST_LEN {
                    r.portions.push((name, hex));
                }
            })
            .await?;
        if digest.len() != abi::PORTIONS_DIGEST_LEN {
            return Err(BrokerError::GuestRejected(
                "malformed portions digest".into(),
            ));
        }
        {
            // The record as it is now, under the step lock (see `apply`).
            let _serial = self.apply_serial.lock();
            if let Some(r) = self.table.get(&id) {
                self.registry.put(&r)?;
            }
        }
        info!(bubble = %id, parent = %parent, portion = %cmd.name, "portion loaded");
        Ok(PortionLoaded {
            portions_digest: digest,
            module_sha384,
        })
    }

    /// Runs `call` in the bubble whose permit is held.
    pub(super) async fn invoke(
        self: &Arc<Self>,
        permit: Permit,
        call: &abi::Call<'_>,
        deadline: Duration,
    ) -> Result<(Vec<u8>, u64), BrokerError> {
        let (out, vmm_us, _) = self.invoke_then(permit, call, deadline, |_, _| {}).await?;
        Ok((out, vmm_us))
    }

    /// Like [`Broker::invoke`], and updates the record with the output
    /// when the call succeeds (in the same state change as READY); also
    /// answers when the CALL went to the VMM client.
    async fn invoke_then(
        self: &Arc<Self>,
        permit: Permit,
        call: &abi::Call<'_>,
        deadline: Duration,
        on_ok: impl FnOnce(&[u8], &mut BubbleRecord),
    ) -> Result<(Vec<u8>, u64, Instant), BrokerError> {
        let started = Instant::now();
        let id = permit.rec.id.clone();
        let live = match (permit.rec.state, permit.live.clone()) {
            (State::Ready, Some(l)) => l,
            (state, _) => {
                return Err(BrokerError::WrongState {
                    id,
                    state: lifecycle::name(state),
                    detail: if permit.rec.failure_reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", permit.rec.failure_reason)
                    },
                });
            }
        };
        self.apply(&id, Step::CallBegan, "", |_| {})?;
        let vmm_started = Instant::now();
        let result = live.vmm.call_with(call, deadline).await;
        let vmm_us = vmm_started.elapsed().as_micros() as u64;
        let seen = self.observe_call(&permit.rec, call, &result);
        let quarantine = seen.quarantine.clone();
        let bytes_in = call.input.len() as u64;
        let count = |r: &mut BubbleRecord, out: u64| {
            r.calls += 1;
            r.usage.bytes_in += bytes_in;
            r.usage.bytes_out += out;
            r.last_active_ms = now_ms();
        };
        let max = self.cfg.max_payload;
        // A call that ends after its bubble failed finds it FAILED: the
        // step is refused and the caller gets the failure.
        let r = match result {
            Ok(out) if out.len() > max => {
                self.apply(&id, Step::CallEnded, "", |r| count(r, 0))?;
                Err(BrokerError::OutputTooLarge(out.len(), max))
            }
            Ok(out) => {
                let n = out.len() as u64;
                self.apply(&id, Step::CallEnded, "", |r| {
                    count(r, n);
                    on_ok(&out, r);
                })?;
                Ok((out, vmm_us, vmm_started))
            }
            Err(CallFailure::Rejected(code, msg)) => {
                self.apply(&id, Step::CallEnded, "", |r| count(r, 0))?;
                Err(BrokerError::from_guest(code, msg))
            }
            Err(CallFailure::Awaiting { key, timeout_ms }) => {
                // Pending inside the bubble: the caller records the await
                // and freezes the bubble (`awaits`).
                self.apply(&id, Step::CallEnded, "", |r| count(r, 0))?;
                Err(BrokerError::Awaiting {
                    bubble_id: id.clone(),
                    key,
                    timeout_ms,
                })
            }
            Err(CallFailure::Refused(msg)) => {
                // A request the VMM would not take: the guest never saw it.
                self.apply(&id, Step::CallEnded, "", |r| count(r, 0))?;
                Err(BrokerError::VmmRefused(msg))
            }
            Err(CallFailure::Deadline(msg)) => {
                let reason = FailureReason::new(
                    FailureKind::Deadline,
                    format!("call deadline exceeded: {msg}"),
                );
                self.fail_seen(&id, &reason, seen);
                Err(BrokerError::DeadlineExceeded(msg))
            }
            Err(CallFailure::Failed(reason)) => {
                self.fail_seen(&id, &reason, seen);
                Err(BrokerError::BubbleFailed(reason.detail))
            }
        };
        drop(permit);
        if let Some(why) = quarantine {
            self.fail(&id, &FailureReason::new(FailureKind::Internal, why));
        }
        self.metrics
            .call_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }
}
