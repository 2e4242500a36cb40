//! The dispatcher of one trigger: fetch a batch of its subject's events
//! → run each in a bubble (the named one, or one attached from the
//! trigger's pool with its module loaded) → store the signed result once
//! per key → ack. The acked prefix of a batch is its checkpoint: events
//! not yet acked when a bubble or the broker fails are handed out again
//! (after a retry delay, or when their lease ends), never the acked ones.
//!
//! Ordering per event: the result is durable before the ack
//! (`Delivery::complete`: on the embedded queue both in one committed
//! redb transaction; on NATS the confirmed result, then the ack); an event
//! whose ack was lost is redelivered, the portion may run again, and the
//! second result is refused by the once-per-key results, so each key has
//! exactly one result.
//! An event that fails `max_deliver` times gets a `failed` result, goes
//! to the dead-letter table and raises a `dead_letter` security event
//! (streamed to the owner, counted, written to the audit log).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bubble_events::{Delivery, Outcome, Results, Source, MAX_REASON_LEN};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::commands::{Attach, Call, LoadPortion, Target};
use super::scale::Scale;
use super::security::{SecurityEvent, SecurityKind};
use super::triggers::SignedOutput;
use super::{now_ms, Broker};
use crate::error::BrokerError;
use crate::store::registry::triggers::{TriggerRecord, TriggerTarget};

/// How long one fetch waits for events before looking at the stop switch.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// How long an attach for a pool trigger waits for a pooled bubble.
const ATTACH_WAIT: Duration = Duration::from_secs(5);

/// A reason cut to what a result or dead letter may hold, on a char
/// boundary.
fn reason(e: &BrokerError) -> String {
    let mut s = e.to_string();
    let mut n = s.len().min(MAX_REASON_LEN.min(255));
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s.truncate(n);
    s
}

/// Whether an error means the bubble itself is gone or unusable (a pool
/// trigger then attaches a new one).
fn bubble_lost(e: &BrokerError) -> bool {
    matches!(
        e,
        BrokerError::BubbleFailed(_)
            | BrokerError::DeadlineExceeded(_)
            | BrokerError::NotAccessible(_)
            | BrokerError::WrongState { .. }
    )
}

impl Broker {
    /// One worker of a trigger (see `scale`): runs until the trigger is
    /// deleted or the broker closes, or (not the `permanent` one) until
    /// it is not needed.
    pub(super) async fn dispatch_loop<S, R>(
        me: Weak<Self>,
        t: TriggerRecord,
        mut stop: watch::Receiver<bool>,
        scale: Arc<Scale>,
        permanent: bool,
        sub: S,
        results: R,
    ) where
        S: Source,
        R: Results,
    {
        let pool = matches!(t.target, TriggerTarget::Pool { .. });
        // The bubble a pool trigger's worker attached (kept across events).
        let mut bubble: Option<String> = None;
        let mut left = false;
        loop {
            if *stop.borrow() {
                break;
            }
            if !permanent && scale.try_leave(scale.wanted()) {
                left = true;
                break;
            }
            // A pool worker takes its bubble before any event: a refusal
            // (quota) then costs no event an attempt.
            if pool && bubble.is_none() {
                let Some(b) = me.upgrade() else { return };
                match b.trigger_bubble(&t, &mut bubble).await {
                    Ok(_) => {}
                    Err(BrokerError::Quota(q)) if !permanent => {
                        debug!(trigger = %t.id, quota = %q, "no more bubbles for this trigger");
                        scale.leave();
                        scale.quota_hit();
                        left = true;
                        break;
                    }
                    Err(e) => {
                        warn!(trigger = %t.id, error = %e, "no bubble for the trigger; retrying");
                        if let Some(old) = bubble.take() {
                            let _ = b.delete(&t.owner, &old).await;
                        }
                        drop(b);
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
            }
            let fetched = tokio::select! {
                r = sub.fetch(t.batch_size as usize, FETCH_WAIT) => r,
                _ = stop.changed() => break,
            };
            let Some(b) = me.upgrade() else { return };
            if b.closing() || !b.trigger_alive(&t.id) {
                break;
            }
            let batch = match fetched {
                Ok(v) => v,
                Err(e) => {
                    warn!(trigger = %t.id, error = %e, "fetching events failed; retrying");
                    drop(b);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if batch.is_empty() && !permanent && scale.try_leave(1) {
                // Idle: scale down.
                left = true;
                drop(b);
                break;
            }
            let mut batch = batch.into_iter();
            for d in batch.by_ref() {
                let started = std::time::Instant::now();
                b.process(&t, &mut bubble, d, &results).await;
                scale.observe(started.elapsed());
                if *stop.borrow() || b.closing() {
                    break;
                }
            }
            // Stopped mid-batch: hand the rest back at once.
            for d in batch {
                let _ = d.retry(Duration::ZERO).await;
            }
        }
        if !left && !permanent {
            scale.leave();
        }
        if let (Some(b), Some(id)) = (me.upgrade(), bubble) {
            if !b.closing() {
                if let Err(e) = b.delete(&t.owner, &id).await {
                    warn!(trigger = %t.id, bubble = %id, error = %e, "deleting the trigger's bubble failed");
                }
            }
        }
    }

    /// The key of the last event of trigger `id` whose portion call
    /// started on this broker, and when the CALL went to the VMM client
    /// (monotonic: comparable with `Instant`s of this process only).
    pub fn trigger_last_start(&self, id: &str) -> Option<(String, std::time::Instant)> {
        self.triggers.lock().get(id)?.last_start.clone()
    }

    /// The bubble that runs `t`'s next event.
    async fn trigger_bubble(
        self: &Arc<Self>,
        t: &TriggerRecord,
        bubble: &mut Option<String>,
    ) -> Result<String, BrokerError> {
        let (profile, module) = match &t.target {
            TriggerTarget::Bubble(id) => return Ok(id.clone()),
            TriggerTarget::Pool {
                profile, module, ..
            } => (profile, module),
        };
        if let Some(id) = bubble {
            return Ok(id.clone());
        }
        let rec = self
            .attach(
                &t.owner,
                Attach {
                    profile: profile.clone(),
                    client_request_id: String::new(),
                    idle: None,
                    wait: ATTACH_WAIT,
                    // The trigger's policy (none: the default one, as an
                    // attach without a policy gets).
                    policy: t.policy.clone().unwrap_or_default(),
                },
            )
            .await?;
        *bubble = Some(rec.id.clone());
        self.load_portion(
            &t.owner,
            LoadPortion {
                bubble_id: rec.id.clone(),
                name: t.portion.clone(),
                module: module.clone(),
            },
        )
        .await?;
        Ok(rec.id)
    }

    /// Runs one event and settles it.
    async fn process<D: Delivery, R: Results>(
        self: &Arc<Self>,
        t: &TriggerRecord,
        bubble: &mut Option<String>,
        d: D,
        results: &R,
    ) {
        // The event is the worker's (fetched, or handed over leased by
        // its publish), nothing of it has run.
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("event.taken").await;
        // An event whose key a frozen portion awaits resumes it (`awaits`).
        let Some(d) = self.resume_by_event(t, d, results).await else {
            return;
        };
        let ev = d.event();
        let (key, attempt) = (ev.key.clone(), ev.attempt);
        let ran = match self.trigger_bubble(t, bubble).await {
            Ok(id) => self
                .call(
                    &t.owner,
                    Call {
                        bubble_id: id.clone(),
                        op: t.function.clone(),
                        target: Target::Portion(t.portion.clone()),
                        input: ev.payload.to_vec(),
                        deadline: None,
                        sign: true,
                        seal_to: t.seal_to,
                    },
                )
                .await
                .map(|o| (id, o)),
            Err(e) => Err(e),
        };
        let outcome = match ran {
            Ok((bubble_id, o)) => {
                if let Some(at) = o.started {
                    if let Some(r) = self.triggers.lock().get_mut(&t.id) {
                        r.last_start = Some((key.to_string(), at));
                    }
                }
                let (call_id, signature) = o.signed.unwrap_or_default();
                // What the bubble signed: the portion-call frame's digest
                // (also the sealed box's AAD, so the owner can open it).
                let frame = bubble_abi::ops::PortionCall {
                    portion: &t.portion,
                    function: &t.function,
                    input: &ev.payload,
                }
                .encode()
                .unwrap_or_default();
                Outcome::Ok(
                    SignedOutput {
                        sealed: t.seal_to.is_some(),
                        input_sha256: bubble_keys::sha256(&frame),
                        bubble_id,
                        call_id,
                        signature,
                        output: o.output,
                    }
                    .encode(),
                )
            }
            Err(BrokerError::Awaiting {
                bubble_id,
                key: awaited,
                timeout_ms,
            }) => {
                return self
                    .event_awaits(t, bubble, d, results, bubble_id, awaited, timeout_ms)
                    .await;
            }
            // The portion refused, or the policy denied what it tried (a
            // credential not granted): no retry would change that.
            Err(e @ (BrokerError::GuestRefused(_) | BrokerError::GuestDenied(_))) => {
                Outcome::Refused(reason(&e))
            }
            Err(e) => {
                if bubble_lost(&e) {
                    if let Some(old) = bubble.take() {
                        let _ = self.delete(&t.owner, &old).await;
                    }
                }
                if attempt < t.max_deliver {
                    debug!(trigger = %t.id, key = %key, attempt, error = %e, "event failed; retrying");
                    let delay = Duration::from_millis(self.cfg.events.retry_delay_ms);
                    if let Err(e) = d.retry(delay).await {
                        warn!(trigger = %t.id, key = %key, error = %e, "retry not recorded");
                    }
                    return;
                }
                let why = reason(&e);
                return self.dead_letter(t, bubble, d, &why, results).await;
            }
        };
        // An output too large to store never will be: give it up now.
        if outcome.check().is_err() {
            let why = "the result is over the queue's size limit";
            return self.dead_letter(t, bubble, d, why, results).await;
        }
        // Durable result first, then the ack (see the module's docs); the
        // embedded queue commits both at once.
        match d.complete(&outcome).await {
            Ok(done) if !done.acked => {
                warn!(trigger = %t.id, key = %key, "ack refused (the event was delivered again, or the source did not confirm it)");
            }
            Ok(_) => {}
            Err((d, e)) => {
                warn!(trigger = %t.id, key = %key, error = %e, "storing the result failed; retrying");
                let _ = d.retry(Duration::from_millis(200)).await;
            }
        }
    }

    /// Gives an event up: a `failed` result, the dead-letter table, a
    /// security event for the owner.
    async fn dead_letter<D: Delivery, R: Results>(
        self: &Arc<Self>,
        t: &TriggerRecord,
        bubble: &Option<String>,
        d: D,
        why: &str,
        results: &R,
    ) {
        let key = d.event().key.clone();
        if let Err(e) = results
            .publish_result(&key, &Outcome::Failed(why.to_string()))
            .await
        {
            warn!(trigger = %t.id, key = %key, error = %e, "storing the failure failed; retrying");
            let _ = d.retry(Duration::from_millis(200)).await;
            return;
        }
        if let Err(e) = d.dead_letter(why).await {
            warn!(trigger = %t.id, key = %key, error = %e, "dead letter refused");
            return;
        }
        let bubble_id = match &t.target {
            TriggerTarget::Bubble(id) => id.clone(),
            TriggerTarget::Pool { .. } => bubble.clone().unwrap_or_default(),
        };
        self.raise(SecurityEvent {
            bubble_id,
            owner: t.owner.clone(),
            parent: String::new(),
            portion_digest: String::new(),
            kind: SecurityKind::DeadLetter,
            at_ms: now_ms(),
        });
    }
}
