//! Await and freeze (resumable executions): a portion that calls
//! `await_event(key, timeout)` makes its bubble answer the pending call
//! with AWAITING (`bubble_abi::awaits`). The broker then
//!
//! 1. records the await — in the registry and as an index object in the
//!    shared store (`awaits/<id>`, created only if no live await holds the
//!    id) — in phase FREEZING,
//! 2. suspends the bubble through the normal lifecycle (frozen copy,
//!    claim, SUSPENDED), and marks the await FROZEN at that generation;
//! 3. when an event with that key reaches any broker sharing the store
//!    (a trigger's dispatcher, either source), or the deadline passes
//!    (the sweeper of any broker), that broker restores the frozen copy —
//!    the copy's claim lets exactly one broker do so — sends RESUME with
//!    the event's payload (or the timeout), and the portion continues
//!    inside the same call; its answer is published once under the
//!    originating event's key, and the await is marked ENDED.
//!
//! The await id is SHA-256 over the owner and the key: keys are per
//! parent, as event subjects are, so no parent can resume (or block)
//! another's await.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bubble_abi::ops::SignedResult;
use bubble_abi::{self as abi, Resume, OP_RESUME};
use bubble_events::{EventKey, Outcome, Results, MAX_REASON_LEN};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::commands::{CallOutput, Restore};
use super::triggers::{nats_config, queue_key, SignedOutput};
use super::{now_ms, Broker};
use crate::error::{invalid, BrokerError};
use crate::store::frozen::IndexError;
use crate::store::registry::awaits::{AwaitOrigin, AwaitPhase, AwaitRecord};
use crate::store::registry::triggers::TriggerSource;

/// How often each broker looks for awaits past their deadline.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How long a resume waits behind other operations on its bubble.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// Retry delay of an event that found its await still freezing.
pub(super) const FREEZING_RETRY: Duration = Duration::from_millis(100);

/// The await id of `owner`'s key `key`.
pub(crate) fn await_id(owner: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"bubbled await v1");
    h.update((owner.len() as u64).to_le_bytes());
    h.update(owner.as_bytes());
    h.update(key.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Whether `x` and `y` are the same await instance (the id, the frozen
/// generation and the creation time; the phase may differ).
pub(super) fn same_instance(x: &AwaitRecord, y: &AwaitRecord) -> bool {
    x.id == y.id && x.generation == y.generation && x.created_at_ms == y.created_at_ms
}

/// Awaits this broker is resuming right now (one task per await here;
/// across brokers, the frozen copy's claim decides).
#[derive(Default)]
pub(crate) struct Resuming(parking_lot::Mutex<HashSet<String>>);

/// Holds an await id in [`Resuming`] until dropped.
pub(super) struct Held<'a>(&'a Resuming, String);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().remove(&self.1);
    }
}

impl Resuming {
    pub(super) fn hold(&self, id: &str) -> Option<Held<'_>> {
        self.0
            .lock()
            .insert(id.to_string())
            .then(|| Held(self, id.to_string()))
    }
}

/// What an attempt to resume did.
#[derive(Debug)]
pub(crate) enum Resumed {
    /// No live await has that key.
    NotAwaited,
    /// Another broker or task resumes it (or did): nothing to do here.
    Elsewhere,
    /// Resumed here; the call ended with this outcome (published under the
    /// originating event's key).
    Done(Outcome),
    /// Resumed here, and the portion awaits again (frozen again).
    AwaitsAgain,
    /// The await on the key has ended (resumed, timed out or cancelled):
    /// the event resumes nothing and gets this typed outcome.
    Ended(Outcome),
}

/// A reason cut to what a result may hold.
pub(super) fn cut(e: &BrokerError) -> String {
    let mut s = e.to_string();
    let mut n = s.len().min(MAX_REASON_LEN.min(255));
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s.truncate(n);
    s
}

/// The outcome a call's end is published as; `signed_as`: whether the
/// bubble sealed the output, and the digest of the frame it signed.
pub(super) fn outcome_of(
    bubble_id: &str,
    signed_as: (bool, [u8; 32]),
    r: Result<CallOutput, BrokerError>,
) -> Outcome {
    match r {
        Ok(o) => {
            let (call_id, signature) = o.signed.unwrap_or_default();
            let (sealed, input_sha256) = signed_as;
            Outcome::Ok(
                SignedOutput {
                    sealed,
                    input_sha256,
                    bubble_id: bubble_id.to_string(),
                    call_id,
                    signature,
                    output: o.output,
                }
                .encode(),
            )
        }
        Err(e @ BrokerError::GuestRefused(_)) => Outcome::Refused(cut(&e)),
        Err(e) => Outcome::Failed(cut(&e)),
    }
}

/// How a direct call that awaited ended for its caller.
#[derive(Debug)]
pub enum CallEnd {
    /// The call ended (its freeze failed, so it was timed out at once).
    Done(CallOutput),
    /// The bubble is frozen with the call pending.
    Frozen(Box<AwaitRecord>),
}

impl Broker {
    /// A parent's direct call awaits: freezes the bubble with the call
    /// pending (its answer, once resumed, is kept for `GetAwaitResult`:
    /// see docs/awaits.md); if that fails, ends the call as timed out and
    /// returns how it ended.
    pub async fn call_awaits(
        self: &Arc<Self>,
        parent: &str,
        bubble_id: &str,
        key: &str,
        timeout_ms: u32,
        signed: bool,
    ) -> Result<CallEnd, BrokerError> {
        match self
            .freeze_awaiting(
                parent,
                bubble_id,
                key,
                timeout_ms,
                signed,
                AwaitOrigin::Call,
            )
            .await
        {
            Ok(a) => Ok(CallEnd::Frozen(Box::new(a))),
            Err(e) => {
                warn!(bubble = %bubble_id, error = %e, "an awaiting call could not be frozen; timing it out");
                let ended = self
                    .send_resume(parent, bubble_id, Resume::Timeout, signed)
                    .await;
                // Over the cap: the call is ended (timed out) so that the
                // bubble takes calls again, and the caller is told why.
                if let BrokerError::AwaitLimit { .. } = e {
                    return Err(e);
                }
                match ended {
                    Ok(o) => Ok(CallEnd::Done(o)),
                    Err(BrokerError::Awaiting { .. }) => Err(BrokerError::GuestRefused(
                        "the portion awaited again after a failed freeze".into(),
                    )),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// A call of `owner`'s bubble answered AWAITING: records the await
    /// (FREEZING), suspends the bubble, marks the await FROZEN. On an
    /// error the bubble still runs, its call still pending.
    pub(super) async fn freeze_awaiting(
        self: &Arc<Self>,
        owner: &str,
        bubble_id: &str,
        key: &str,
        timeout_ms: u32,
        signed: bool,
        origin: AwaitOrigin,
    ) -> Result<AwaitRecord, BrokerError> {
        let permit = self
            .permit_owned(owner, bubble_id, super::freeze::SUSPEND_WAIT)
            .await?;
        // A bubble restored with its parent's key must never be frozen
        // under the broker's (any broker sharing that key could restore
        // it): it cannot wait frozen, so its await ends as timed out.
        if permit.rec.parent_keyed {
            return Err(BrokerError::ParentKeyedAwait(bubble_id.to_string()));
        }
        let slot = self.reserve_await(owner)?;
        let now = now_ms();
        let mut a = AwaitRecord {
            id: await_id(owner, key),
            owner: owner.to_string(),
            key: key.to_string(),
            bubble_id: bubble_id.to_string(),
            // What the suspend below commits (the permit is held).
            generation: permit.rec.generation + 1,
            deadline_ms: now + u64::from(timeout_ms),
            signed,
            origin,
            broker: self.broker_id.clone(),
            created_at_ms: now,
            phase: AwaitPhase::Freezing,
            ended_at_ms: 0,
        };
        match self.frozen.put_await(&a).await {
            Ok(()) => {}
            Err(IndexError::Taken) => return Err(BrokerError::AwaitTaken(key.to_string())),
            Err(IndexError::Store(e)) => return Err(e),
        }
        let end = |a: &AwaitRecord| {
            let mut e = a.clone();
            e.phase = AwaitPhase::Ended;
            e.ended_at_ms = now_ms();
            e
        };
        if let Err(e) = self.registry.put_await(&a) {
            let _ = self.frozen.update_await(&end(&a)).await;
            return Err(e.into());
        }
        // Counted in the registry from here.
        drop(slot);
        if let Err(e) = self.suspend_held(permit, None).await {
            let _ = self.frozen.update_await(&end(&a)).await;
            let _ = self
                .registry
                .remove_await(&a.id, &a.bubble_id, a.generation);
            return Err(e);
        }
        a.phase = AwaitPhase::Frozen;
        if !self.frozen.update_await(&a).await? {
            warn!(bubble = %bubble_id, "the await index changed while its bubble froze");
        }
        let _ = self.registry.put_await(&a);
        info!(bubble = %bubble_id, parent = %owner, generation = a.generation, deadline_ms = a.deadline_ms, "portion awaits an event: bubble frozen");
        Ok(a)
    }

    /// Sends RESUME to `owner`'s running bubble whose call awaits; returns
    /// how the call ended (`Err(Awaiting)` if it awaits again).
    pub(super) async fn send_resume(
        self: &Arc<Self>,
        owner: &str,
        bubble_id: &str,
        resume: Resume<'_>,
        signed: bool,
    ) -> Result<CallOutput, BrokerError> {
        let permit = self.permit_owned(owner, bubble_id, RESUME_WAIT).await?;
        let mut input = vec![0u8; resume.encoded_len()];
        resume
            .encode_into(&mut input)
            .map_err(|e| invalid("payload", e.to_string()))?;
        let deadline = Duration::from_millis(u64::from(permit.rec.policy.call_deadline_ms));
        let call = abi::Call::plain(OP_RESUME, &input);
        let (raw, vmm_us) = self.invoke(permit, &call, deadline).await?;
        if !signed {
            return Ok(CallOutput {
                output: raw,
                vmm_us,
                signed: None,
                started: None,
            });
        }
        let r = SignedResult::decode(&raw).map_err(|e| {
            BrokerError::GuestRejected(format!(
                "the bubble returned a malformed signed result: {e}"
            ))
        })?;
        Ok(CallOutput {
            output: r.output.to_vec(),
            vmm_us,
            signed: Some((r.call_id, r.signature.to_vec())),
            started: None,
        })
    }

    /// The live await of `owner`'s `key`: the shared store's index first
    /// (where every broker agrees), else this broker's registry.
    pub(super) async fn find_await(
        &self,
        owner: &str,
        key: &str,
    ) -> Result<Option<AwaitRecord>, BrokerError> {
        let id = await_id(owner, key);
        let found = match self.frozen.get_await(&id).await? {
            Some(a) => Some(a),
            None => self.registry.get_await(&id)?,
        };
        Ok(found.filter(|a| a.owner == owner && a.key == key))
    }

    /// An event of `owner` with key `key` arrived: resumes the await on
    /// that key, if there is one, with `resume`.
    pub(crate) async fn resume_await(
        self: &Arc<Self>,
        owner: &str,
        key: &str,
        resume: Resume<'_>,
    ) -> Result<Resumed, BrokerError> {
        match self.find_await(owner, key).await? {
            None => Ok(Resumed::NotAwaited),
            Some(a) => {
                #[cfg(feature = "fault-injection")]
                crate::fault::pause("await.read").await;
                self.resume_record(a, resume).await
            }
        }
    }

    /// Resumes await `a` here, if this broker wins its frozen copy.
    pub(super) async fn resume_record(
        self: &Arc<Self>,
        a: AwaitRecord,
        resume: Resume<'_>,
    ) -> Result<Resumed, BrokerError> {
        let ended = |a: &AwaitRecord| {
            Ok(Resumed::Ended(Outcome::Failed(cut(
                &BrokerError::AwaitEnded(a.key.clone()),
            ))))
        };
        if a.phase == AwaitPhase::Ended {
            return ended(&a);
        }
        let Some(_held) = self.awaits.hold(&a.id) else {
            return Ok(Resumed::Elsewhere);
        };
        // `a` was read before the hold: another task here may have resumed
        // and ended it since (and dropped the hold). Go on only with the
        // same await instance, not ended, as the index has it now.
        let a = match self.find_await(&a.owner, &a.key).await? {
            Some(now) if same_instance(&now, &a) => now,
            // Gone, or another await on the key now: not this one to resume.
            _ => return Ok(Resumed::Elsewhere),
        };
        if a.phase == AwaitPhase::Ended {
            return ended(&a);
        }
        // FREEZING: the freezing broker may have stored and committed the
        // copy and died before marking the await FROZEN, so the restore is
        // tried; until it works (the copy is not stored yet, or is still
        // claimed by the freezer), every failure means "try again later".
        let freezing = a.phase == AwaitPhase::Freezing;
        // This broker already restored the copy for this await (it died
        // before RESUME and re-adopted the bubble on restart, or the
        // owner restored it): the call is pending in the running bubble.
        if self.restored_here(&a) {
            info!(bubble = %a.bubble_id, parent = %a.owner, "an await's bubble runs here, restored and not resumed; resuming its call");
            let ended = self
                .send_resume(&a.owner, &a.bubble_id, resume, a.signed)
                .await;
            return self.settle(a, ended).await;
        }
        let restored = self
            .restore(
                &a.owner,
                Restore {
                    bubble_id: a.bubble_id.clone(),
                    generation: a.generation,
                    kek: None,
                },
            )
            .await;
        match restored {
            Ok(_) => {}
            Err(e) if freezing => {
                debug!(bubble = %a.bubble_id, error = %e, "the await is still freezing; will retry");
                return Err(e);
            }
            // Another broker holds the claim: it resumes the call, or it
            // died and its lease runs out; the caller tries again later
            // (the event is redelivered, the sweeper comes back).
            Err(e @ (BrokerError::ClaimedElsewhere(_) | BrokerError::ClaimLost(_))) => {
                debug!(bubble = %a.bubble_id, error = %e, "the await's copy is claimed elsewhere; will retry");
                return Err(e);
            }
            // Another broker consumed the copy (or it is gone): that
            // broker resumes the call.
            Err(
                BrokerError::NotAccessible(_)
                | BrokerError::FrozenMissing
                | BrokerError::WrongState { .. },
            ) => {
                debug!(bubble = %a.bubble_id, "await resumed elsewhere");
                if self
                    .frozen
                    .get_await(&a.id)
                    .await?
                    .is_none_or(|n| n.generation != a.generation || n.phase == AwaitPhase::Ended)
                {
                    let _ = self
                        .registry
                        .remove_await(&a.id, &a.bubble_id, a.generation);
                }
                return Ok(Resumed::Elsewhere);
            }
            Err(e) => return Err(e),
        }
        info!(bubble = %a.bubble_id, parent = %a.owner, timeout = matches!(resume, Resume::Timeout), "frozen await restored; resuming its call");
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("await.restored").await;
        let ended = self
            .send_resume(&a.owner, &a.bubble_id, resume, a.signed)
            .await;
        self.settle(a, ended).await
    }

    /// The resumed call of `a` ended (`ended`): publishes its outcome,
    /// or freezes it again if it awaits again; ends the await.
    pub(super) async fn settle(
        self: &Arc<Self>,
        a: AwaitRecord,
        ended: Result<CallOutput, BrokerError>,
    ) -> Result<Resumed, BrokerError> {
        let mut done = a.clone();
        done.phase = AwaitPhase::Ended;
        let ended = match ended {
            Err(BrokerError::Awaiting {
                bubble_id,
                key,
                timeout_ms,
            }) => {
                self.end_await(&done).await;
                let again = self
                    .freeze_awaiting(
                        &a.owner,
                        &bubble_id,
                        &key,
                        timeout_ms,
                        a.signed,
                        a.origin.clone(),
                    )
                    .await;
                match again {
                    Ok(_) => return Ok(Resumed::AwaitsAgain),
                    Err(e) => {
                        // It cannot wait here: end the call as timed out.
                        warn!(bubble = %bubble_id, error = %e, "a resumed portion awaits again but cannot be frozen; timing it out");
                        match self
                            .send_resume(&a.owner, &bubble_id, Resume::Timeout, a.signed)
                            .await
                        {
                            Err(BrokerError::Awaiting { .. }) => Err(BrokerError::GuestRefused(
                                "the portion awaited again after a failed freeze".into(),
                            )),
                            r => r,
                        }
                    }
                }
            }
            r => r,
        };
        let outcome = outcome_of(&a.bubble_id, a.origin.signed_as(), ended);
        self.publish_origin(&a, &outcome).await;
        self.relay_result(&a, &outcome).await;
        self.end_await(&done).await;
        if matches!(a.origin, AwaitOrigin::Event { pool: true, .. }) {
            if let Err(e) = self.delete(&a.owner, &a.bubble_id).await {
                warn!(bubble = %a.bubble_id, error = %e, "deleting a resumed pool bubble failed");
            }
        }
        Ok(Resumed::Done(outcome))
    }

    /// Marks `done` (phase ENDED) in the store and forgets it here.
    pub(super) async fn end_await(&self, done: &AwaitRecord) {
        let mut done = done.clone();
        done.ended_at_ms = now_ms();
        let done = &done;
        if let Err(e) = self.frozen.update_await(done).await {
            warn!(bubble = %done.bubble_id, error = %e, "could not mark an await ended in the store");
        }
        let _ = self
            .registry
            .remove_await(&done.id, &done.bubble_id, done.generation);
    }

    /// Publishes the outcome of `a`'s call where its origin's results go
    /// (once per key: a second publish stores nothing).
    pub(super) async fn publish_origin(&self, a: &AwaitRecord, outcome: &Outcome) {
        let AwaitOrigin::Event {
            subject,
            source,
            key,
            ..
        } = &a.origin
        else {
            info!(bubble = %a.bubble_id, "a resumed direct call ended (its result is not kept)");
            return;
        };
        let r = match source {
            TriggerSource::Embedded => match queue_key(&a.owner, subject, key) {
                Ok(q) => self.queue.publish_result(&q, outcome).await.map(|_| ()),
                Err(e) => {
                    warn!(error = %e, "bad origin key");
                    return;
                }
            },
            TriggerSource::Nats => {
                let src = match self.nats_of(&a.owner, subject) {
                    Some(s) => Some(s),
                    None => match &self.cfg.events.nats_url {
                        Some(url) => {
                            let wait = Duration::from_millis(self.cfg.events.ack_wait_ms.max(1));
                            bubble_events::nats::NatsSource::connect(nats_config(
                                url, &a.owner, subject, wait,
                            ))
                            .await
                            .ok()
                        }
                        None => None,
                    },
                };
                match (src, EventKey::new(key)) {
                    (Some(s), Ok(k)) => s.publish_result(&k, outcome).await.map(|_| ()),
                    _ => {
                        warn!(bubble = %a.bubble_id, "no NATS connection for a resumed call's result");
                        return;
                    }
                }
            }
        };
        if let Err(e) = r {
            warn!(bubble = %a.bubble_id, error = %e, "publishing a resumed call's result failed");
        }
    }
}

#[cfg(test)]
#[path = "awaits_tests.rs"]
mod tests;
