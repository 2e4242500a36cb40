//! Results of awaits resumed on another broker reach the broker whose
//! trigger started the call: the resuming broker publishes the outcome
//! in its own queue (under the originating key) and also stores it,
//! encrypted, in the shared store (`store::frozen::await_results`) before
//! it marks the await ENDED; the originating broker's sweeper, finding
//! an ENDED await it froze with no result in its queue, copies that
//! outcome into its queue (once per key), so the owner reads it with
//! `GetResult` on the trigger it created. NATS triggers need none of
//! this: their results stream is shared. A direct call's answer is kept
//! the same way, read with `GetAwaitResult` by its owner's key.

use bubble_events::{Outcome, Results};
use tracing::{debug, info, warn};

use super::triggers::{queue_key, EventResult, SignedOutput};
use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::awaits::{AwaitOrigin, AwaitPhase, AwaitRecord};
use crate::store::registry::triggers::TriggerSource;

/// How often storing a result is tried before the await ends without it.
const RELAY_ATTEMPTS: u32 = 3;
/// The pause between those tries.
const RELAY_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The embedded origin of `a`: (subject, key), if it has one.
fn embedded_origin(a: &AwaitRecord) -> Option<(&str, &str)> {
    match &a.origin {
        AwaitOrigin::Event {
            subject,
            source: TriggerSource::Embedded,
            key,
            ..
        } => Some((subject, key)),
        _ => None,
    }
}

impl Broker {
    /// Before ending await `a` resumed here: if another broker froze it
    /// from an embedded trigger, stores its outcome for that broker.
    /// A direct call's answer is always stored there (read with
    /// [`Broker::await_result`] from any broker).
    pub(super) async fn relay_result(&self, a: &AwaitRecord, outcome: &Outcome) {
        let direct = matches!(a.origin, AwaitOrigin::Call);
        if !direct && (a.broker == self.broker_id || embedded_origin(a).is_none()) {
            return;
        }
        // The await is marked ENDED after this: a store error is retried
        // a few times first (the reader of an ENDED await without its
        // result gets a typed failure, never another await's answer).
        let body = outcome.encode();
        for attempt in 0..RELAY_ATTEMPTS {
            match self.frozen.put_await_result(a, &body).await {
                Ok(true) => return,
                Ok(false) => {
                    warn!(bubble = %a.bubble_id, "an await's result was kept already; the first stays");
                    return;
                }
                Err(e) if attempt + 1 == RELAY_ATTEMPTS => {
                    warn!(bubble = %a.bubble_id, error = %e, "could not relay a resumed call's result to its broker")
                }
                Err(e) => {
                    debug!(bubble = %a.bubble_id, error = %e, "relaying a result failed; retrying");
                    tokio::time::sleep(RELAY_RETRY).await;
                }
            }
        }
    }

    /// Sweeper: `a` is ENDED in the index. If this broker froze it from an
    /// embedded trigger and its queue has no result under the originating
    /// key, copies the relayed outcome there.
    pub(super) async fn collect_relayed(&self, a: &AwaitRecord) {
        if a.broker != self.broker_id {
            return;
        }
        let Some((subject, key)) = embedded_origin(a) else {
            return;
        };
        let Ok(q) = queue_key(&a.owner, subject, key) else {
            return;
        };
        match self.queue.result(&q).await {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "reading a result failed");
                return;
            }
        }
        let relayed = match self.frozen.get_await_result(a).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "reading a relayed result failed");
                return;
            }
        };
        match Outcome::decode(&relayed) {
            Ok(o) => match self.queue.publish_result(&q, &o).await {
                Ok(_) => {
                    info!(bubble = %a.bubble_id, parent = %a.owner, "the result of an await resumed on another broker is in this broker's queue")
                }
                Err(e) => {
                    warn!(bubble = %a.bubble_id, error = %e, "storing a relayed result failed")
                }
            },
            Err(e) => warn!(bubble = %a.bubble_id, error = %e, "a relayed result does not decode"),
        }
    }

    /// The answer of `parent`'s direct call that awaited `key`: pending
    /// while the await is live, the kept outcome once it ended.
    pub async fn await_result(&self, parent: &str, key: &str) -> Result<EventResult, BrokerError> {
        let Some(a) = self.find_await(parent, key).await? else {
            return Err(BrokerError::NotAccessible(key.to_string()));
        };
        if !matches!(a.origin, AwaitOrigin::Call) {
            return Err(BrokerError::NotAccessible(key.to_string()));
        }
        if a.phase != AwaitPhase::Ended {
            return Ok(EventResult::Pending);
        }
        // The answer of exactly this (ended) instance.
        match self.frozen.get_await_result(&a).await? {
            Some(b) => Ok(match Outcome::decode(&b)? {
                Outcome::Ok(b) => EventResult::Ok(
                    SignedOutput::decode(&b)
                        .ok_or(bubble_events::EventError::Corrupt("kept result"))?,
                ),
                Outcome::Refused(r) => EventResult::Refused(r),
                Outcome::Failed(r) => EventResult::Failed(r),
            }),
            // The answer is written before the await is marked ENDED: it
            // could not be written, or the store lost it.
            None => Ok(EventResult::Failed(
                "the answer of the awaited call was not kept".into(),
            )),
        }
    }
}
