//! The dispatcher's side of await and freeze (`awaits`): an event
//! whose key is awaited resumes the await, a call that awaits is frozen
//! and its event acked, and the sweeper times out awaits past their
//! deadline.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use bubble_abi::{self as abi, Resume};
use bubble_events::{Delivery, Outcome, Results};
use tracing::{debug, warn};

use super::awaits::{outcome_of, Resumed, FREEZING_RETRY, SWEEP_EVERY};
use super::triggers::owner_key;
use super::{now_ms, Broker};
use crate::error::BrokerError;
use crate::store::frozen::awaits::IndexCache;
use crate::store::registry::awaits::{AwaitOrigin, AwaitPhase, AwaitRecord};
use crate::store::registry::triggers::{TriggerRecord, TriggerTarget};

/// Publishes an event's outcome and acks the event, or has it delivered
/// again shortly if the result could not be stored.
async fn settle<D: Delivery, R: Results>(d: D, results: &R, outcome: &Outcome) {
    if results
        .publish_result(&d.event().key, outcome)
        .await
        .is_ok()
    {
        let _ = d.ack().await;
    } else {
        let _ = d.retry(FREEZING_RETRY).await;
    }
}

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
                    settle(d, results, &outcome).await;
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
        // What the bubble signs (and seals to the trigger's key): kept
        // with the await so the resumed result says so.
        let frame = abi::ops::PortionCall {
            portion: &t.portion,
            function: &t.function,
            input: &d.event().payload,
        }
        .encode()
        .unwrap_or_default();
        let origin = AwaitOrigin::Event {
            trigger_id: t.id.clone(),
            subject: t.subject.clone(),
            source: t.source,
            key: owner_key(t, d.event().key.as_str()).to_string(),
            pool,
            sealed: t.seal_to.is_some(),
            input_sha256: bubble_keys::sha256(&frame),
        };
        let signed_as = origin.signed_as();
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
                    // Over the cap: the event's result says so.
                    _ if matches!(e, BrokerError::AwaitLimit { .. }) => {
                        Outcome::Failed(super::awaits::cut(&e))
                    }
                    Err(BrokerError::Awaiting { .. }) => {
                        Outcome::Failed("the portion awaited again after a failed freeze".into())
                    }
                    r => outcome_of(&bubble_id, signed_as, r),
                };
                settle(d, results, &outcome).await;
            }
        }
    }

    /// Every [`SWEEP_EVERY`]: resumes, with the timeout, the awaits of
    /// the shared store (and this registry) whose deadline passed (any
    /// broker may do it; the frozen copy's claim picks one), collects
    /// index entries ended more than `events.await_retention_ms` ago,
    /// and forgets registry entries the index says ended. The index is
    /// listed each time, but only new or changed entries are read
    /// ([`crate::store::frozen::awaits::IndexCache`]).
    pub(super) async fn await_sweeper(me: Weak<Self>) {
        let mut cache = IndexCache::default();
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let Some(b) = me.upgrade() else { return };
            if b.closing() {
                return;
            }
            b.sweep_awaits(&mut cache).await;
        }
    }

    async fn sweep_awaits(self: &Arc<Self>, cache: &mut IndexCache) {
        let index = match self.frozen.scan_awaits(cache).await {
            Ok((v, _)) => v,
            Err(e) => {
                debug!(error = %e, "listing awaits failed");
                Vec::new()
            }
        };
        let now = now_ms();
        let retention = self.cfg.events.await_retention_ms;
        let by_id: HashMap<&str, &AwaitRecord> = index.iter().map(|a| (a.id.as_str(), a)).collect();
        let mut due: Vec<AwaitRecord> = Vec::new();
        for a in &index {
            if a.phase == AwaitPhase::Ended {
                if a.ended_at_ms.saturating_add(retention) <= now {
                    // Only the entry read (this ended instance), and its
                    // result only if the entry went.
                    match self.frozen.delete_await(a).await {
                        Ok(true) => {
                            let _ = self.frozen.delete_await_result(a).await;
                        }
                        Ok(false) => {}
                        Err(e) => debug!(error = %e, "collecting an ended await failed"),
                    }
                } else {
                    self.collect_relayed(a).await;
                }
            } else if a.deadline_ms <= now {
                due.push(a.clone());
            }
        }
        for a in self.registry.awaits().unwrap_or_default() {
            match by_id.get(a.id.as_str()) {
                // Ended, or another await of the key now: forget it here.
                Some(i) if i.phase == AwaitPhase::Ended || i.generation != a.generation => {
                    let _ = self
                        .registry
                        .remove_await(&a.id, &a.bubble_id, a.generation);
                }
                Some(_) => {}
                // Only here (the index entry was lost): its deadline
                // still ends it.
                None if a.phase != AwaitPhase::Ended && a.deadline_ms <= now => due.push(a),
                None => {}
            }
        }
        let mut seen = HashSet::new();
        for a in due {
            if !seen.insert(a.id.clone()) {
                continue;
            }
            let b = self.clone();
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
