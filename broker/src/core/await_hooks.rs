//! The dispatcher's side of await and freeze (`awaits`): an event
//! whose key is awaited resumes the await, a call that awaits is frozen
//! and its event acked, and the sweeper times out awaits past their
//! deadline.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use bubble_abi::{self as abi, Resume};
use bubble_events::{Delivery, Outcome, Results};
use tracing::{debug, warn};

use super::awaits::{outcome_of, Resumed, FREEZING_RETRY, SWEEP_EVERY};
use super::triggers::owner_key;
use super::{now_ms, Broker};
use crate::error::BrokerError;
use crate::store::registry::awaits::{AwaitOrigin, AwaitPhase};
use crate::store::registry::triggers::{TriggerRecord, TriggerTarget};

impl Broker {
    /// The dispatcher's hook before an event runs: if its key is awaited,
    /// the event resumes that await (and is settled here: `None`);
    /// otherwise it is handed back to run as usual.
    pub(super) async fn resume_by_event<D: Delivery, R: Results>(
        self: &Arc<Self>,
        t: &TriggerRecord,
        d: D,
        results: &R,
    ) -> Option<D> {
        let ev = d.event();
        let key = owner_key(t, ev.key.as_str()).to_string();
        if abi::awaits::is_valid_await_key(key.as_bytes()) {
            let payload = ev.payload.clone();
            match self
                .resume_await(&t.owner, &key, Resume::Event(&payload[..]))
                .await
            {
                Ok(Resumed::NotAwaited) => {}
                Ok(Resumed::Done(outcome)) => {
                    // The resuming event gets the same outcome.
                    let _ = results.publish_result(&d.event().key, &outcome).await;
                    let _ = d.ack().await;
                    return None;
                }
                Ok(Resumed::Ended(outcome)) => {
                    // Published once per key: a duplicate of the event
                    // that resumed the await keeps that event's result.
                    if results
                        .publish_result(&d.event().key, &outcome)
                        .await
                        .is_ok()
                    {
                        let _ = d.ack().await;
                    } else {
                        let _ = d.retry(FREEZING_RETRY).await;
                    }
                    return None;
                }
                Ok(Resumed::Elsewhere | Resumed::AwaitsAgain) => {
                    let _ = d.ack().await;
                    return None;
                }
                Err(e) => {
                    debug!(trigger = %t.id, error = %e, "resuming an await failed; retrying the event");
                    let _ = d.retry(FREEZING_RETRY).await;
                    return None;
                }
            }
        }
        Some(d)
    }

    /// The dispatcher's hook when an event's call awaits: freezes the
    /// bubble (a pool bubble leaves the worker), acks the event; its
    /// result comes when the await ends. If the bubble cannot be frozen,
    /// the call is ended at once as timed out and that is its result.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn event_awaits<D: Delivery, R: Results>(
        self: &Arc<Self>,
        t: &TriggerRecord,
        bubble: &mut Option<String>,
        d: D,
        results: &R,
        bubble_id: String,
        key: String,
        timeout_ms: u32,
    ) {
        let pool = matches!(t.target, TriggerTarget::Pool { .. });
        let origin = AwaitOrigin::Event {
            trigger_id: t.id.clone(),
            subject: t.subject.clone(),
            source: t.source,
            key: owner_key(t, d.event().key.as_str()).to_string(),
            pool,
        };
        match self
            .freeze_awaiting(&t.owner, &bubble_id, &key, timeout_ms, true, origin)
            .await
        {
            Ok(_) => {
                if pool {
                    bubble.take();
                }
                let _ = d.ack().await;
            }
            Err(e) => {
                warn!(trigger = %t.id, bubble = %bubble_id, error = %e, "an awaiting call could not be frozen; timing it out");
                let r = self
                    .send_resume(&t.owner, &bubble_id, Resume::Timeout, true)
                    .await;
                let outcome = match r {
                    Err(BrokerError::Awaiting { .. }) => {
                        Outcome::Failed("the portion awaited again after a failed freeze".into())
                    }
                    r => outcome_of(&bubble_id, r),
                };
                if results
                    .publish_result(&d.event().key, &outcome)
                    .await
                    .is_ok()
                {
                    let _ = d.ack().await;
                } else {
                    let _ = d.retry(FREEZING_RETRY).await;
                }
            }
        }
    }

    /// Every [`SWEEP_EVERY`]: resumes, with the timeout, the awaits of
    /// the shared store (and this registry) whose deadline passed. Any
    /// broker may do it; the frozen copy's claim picks one.
    pub(super) async fn await_sweeper(me: Weak<Self>) {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let Some(b) = me.upgrade() else { return };
            if b.closing() {
                return;
            }
            let mut due = match b.frozen.list_awaits().await {
                Ok(v) => v,
                Err(e) => {
                    debug!(error = %e, "listing awaits failed");
                    Vec::new()
                }
            };
            due.extend(b.registry.awaits().unwrap_or_default());
            let now = now_ms();
            let mut seen = HashSet::new();
            for a in due {
                if a.phase == AwaitPhase::Ended || a.deadline_ms > now || !seen.insert(a.id.clone())
                {
                    continue;
                }
                let b = b.clone();
                tokio::spawn(async move {
                    let (owner, key) = (a.owner.clone(), a.key.clone());
                    // Re-read: the index is where brokers agree.
                    match b.find_await(&owner, &key).await {
                        Ok(Some(now))
                            if now.phase != AwaitPhase::Ended && now.deadline_ms <= now_ms() =>
                        {
                            if let Err(e) = b.resume_record(now, Resume::Timeout).await {
                                debug!(error = %e, "timing out an await failed; retrying");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "reading an await failed"),
                    }
                });
            }
        }
    }
}
