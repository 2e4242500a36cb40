//! Calls into a bubble: plain and portion calls, signed and sealed results,
//! credential provisioning and portion loading. Every call holds its
//! bubble's permit; BUSY is the permit's lifetime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::commands::{Call, CallOutput, LoadPortion, PortionLoaded, Provision, Target};
use super::lifecycle::{self, State, Step};
use super::table::Permit;
use super::{now_ms, Broker};
use crate::config;
use crate::error::BrokerError;
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
        let (op, call_input, deadline) = match &cmd.target {
            Target::Builtin => (cmd.op.clone(), cmd.input, wait),
            Target::Portion(portion) => {
                let mut v = Vec::with_capacity(2 + portion.len() + cmd.op.len() + cmd.input.len());
                v.push(portion.len() as u8);
                v.extend(portion.as_bytes());
                v.push(cmd.op.len() as u8);
                v.extend(cmd.op.as_bytes());
                v.extend(&cmd.input);
                let cap = Duration::from_millis(u64::from(rec.policy.call_deadline_ms));
                let d = cmd.deadline.map_or(cap, |d| d.min(cap));
                ("portion".to_string(), v, d)
            }
        };
        if !cmd.sign && cmd.seal_to.is_none() {
            let (output, vmm_us) = self.invoke(permit, &op, &call_input, deadline).await?;
            return Ok(CallOutput {
                output,
                vmm_us,
                signed: None,
            });
        }
        // Signed (and maybe sealed) inside the bubble: `sign:<op>` with
        // `[id][seal_to][input]`; the answer is
        // `[call_id u64][sealed u8][signature 64][output]`.
        let seal_to: &[u8] = cmd.seal_to.as_ref().map_or(&[], |k| &k[..]);
        let mut input = Vec::with_capacity(2 + rec.id.len() + 32 + call_input.len());
        input.push(rec.id.len() as u8);
        input.extend(rec.id.as_bytes());
        input.push(seal_to.len() as u8);
        input.extend(seal_to);
        input.extend(&call_input);
        let op = format!("sign:{op}");
        let (raw, vmm_us) = self.invoke(permit, &op, &input, deadline).await?;
        if raw.len() < 73 {
            return Err(BrokerError::GuestRejected(
                "the bubble returned a malformed signed result".into(),
            ));
        }
        let mut call_id = [0u8; 8];
        call_id.copy_from_slice(&raw[..8]);
        Ok(CallOutput {
            output: raw[73..].to_vec(),
            vmm_us,
            signed: Some((u64::from_le_bytes(call_id), raw[9..73].to_vec())),
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
        let id = &permit.rec.id;
        let mut input = Vec::with_capacity(2 + id.len() + cmd.name.len() + cmd.sealed.len());
        input.push(id.len() as u8);
        input.extend(id.as_bytes());
        input.push(cmd.name.len() as u8);
        input.extend(cmd.name.as_bytes());
        input.extend(&cmd.sealed);
        self.invoke(permit, "provision", &input, deadline)
            .await
            .map(|_| ())
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
        let mut input = Vec::with_capacity(1 + cmd.name.len() + cmd.module.len());
        input.push(cmd.name.len() as u8);
        input.extend(cmd.name.as_bytes());
        input.extend(&cmd.module);
        let module_sha384 = sha2::Sha384::digest(&cmd.module).to_vec();
        let hex: String = module_sha384.iter().map(|b| format!("{b:02x}")).collect();
        let name = cmd.name.clone();
        let (digest, _) = self
            .invoke_then(permit, "load_portion", &input, deadline, |out, r| {
                // Recorded with the call's own state change, while the
                // permit is held: the list follows the guest's.
                if out.len() == 48 {
                    r.portions.push((name, hex));
                }
            })
            .await?;
        if digest.len() != 48 {
            return Err(BrokerError::GuestRejected(
                "malformed portions digest".into(),
            ));
        }
        let rec = self.table.get(&id);
        if let Some(r) = rec {
            self.registry.put(&r)?;
        }
        info!(bubble = %id, parent = %parent, portion = %cmd.name, "portion loaded");
        Ok(PortionLoaded {
            portions_digest: digest,
            module_sha384,
        })
    }

    /// Runs `op` in the bubble whose permit is held.
    pub(super) async fn invoke(
        self: &Arc<Self>,
        permit: Permit,
        op: &str,
        input: &[u8],
        deadline: Duration,
    ) -> Result<(Vec<u8>, u64), BrokerError> {
        self.invoke_then(permit, op, input, deadline, |_, _| {})
            .await
    }

    /// Like [`Broker::invoke`], and updates the record with the output
    /// when the call succeeds (in the same state change as READY).
    async fn invoke_then(
        self: &Arc<Self>,
        permit: Permit,
        op: &str,
        input: &[u8],
        deadline: Duration,
        on_ok: impl FnOnce(&[u8], &mut BubbleRecord),
    ) -> Result<(Vec<u8>, u64), BrokerError> {
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
        let result = live.vmm.call(op, input, deadline).await;
        let vmm_us = vmm_started.elapsed().as_micros() as u64;
        let bytes_in = input.len() as u64;
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
                Ok((out, vmm_us))
            }
            Err(CallFailure::Rejected(code, msg)) => {
                self.apply(&id, Step::CallEnded, "", |r| count(r, 0))?;
                Err(BrokerError::from_guest(code, msg))
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
                self.fail(&id, &reason);
                Err(BrokerError::DeadlineExceeded(msg))
            }
            Err(CallFailure::Failed(reason)) => {
                self.fail(&id, &reason);
                Err(BrokerError::BubbleFailed(reason.detail))
            }
        };
        drop(permit);
        self.metrics
            .call_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }
}
