//! Dead letters of a trigger, for its owner: list them, and put one back
//! into the queue (after fixing what poisoned it, or to run it again).
//! Embedded triggers read the queue's dead letters of their subject (an
//! index by subject: never another tenant's rows); NATS triggers their
//! `BUBBLE_EV_<NS>_DEAD` stream (one per owner and subject).

use tracing::info;

use super::triggers::{namespace, queue_key, queue_subject};
use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::triggers::{TriggerRecord, TriggerSource};

/// One dead-lettered event, as its owner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The key as the owner published it.
    pub key: String,
    /// Deliveries it had.
    pub attempts: u32,
    /// Why it was given up.
    pub reason: String,
}

impl Broker {
    /// The dead letters of one of `parent`'s triggers, oldest first.
    pub async fn dead_letters(
        &self,
        parent: &str,
        trigger_id: &str,
    ) -> Result<Vec<DeadLetterInfo>, BrokerError> {
        let t = self.owned_trigger(parent, trigger_id)?;
        if t.source == TriggerSource::Nats {
            let src = self.nats_connection(&t)?;
            return Ok(src
                .dead_letters()
                .await?
                .into_iter()
                .map(|d| DeadLetterInfo {
                    key: d.key.to_string(),
                    attempts: d.attempts,
                    reason: d.reason,
                })
                .collect());
        }
        let prefix = format!("{}:", namespace(&t.owner, &t.subject));
        Ok(self
            .queue
            .dead_letters_of(&queue_subject(&t.owner, &t.subject))
            .await?
            .into_iter()
            .map(|d| DeadLetterInfo {
                key: d
                    .key
                    .as_str()
                    .strip_prefix(&prefix)
                    .unwrap_or(d.key.as_str())
                    .to_string(),
                attempts: d.attempts,
                reason: d.reason,
            })
            .collect())
    }

    /// Puts dead letter `key` of one of `parent`'s triggers back into its
    /// queue (its `failed` result dropped); its new position.
    pub async fn replay_dead_letter(
        &self,
        parent: &str,
        trigger_id: &str,
        key: &str,
    ) -> Result<u64, BrokerError> {
        let t = self.owned_trigger(parent, trigger_id)?;
        if t.source == TriggerSource::Nats {
            let src = self.nats_connection(&t)?;
            let position = src
                .replay(&bubble_events::EventKey::new(key)?)
                .await?
                .ok_or_else(|| BrokerError::NoDeadLetter(key.to_string()))?;
            info!(trigger = %t.id, key = %key, "dead letter replayed (NATS)");
            return Ok(position);
        }
        let qkey = queue_key(&t.owner, &t.subject, key)?;
        let position = self
            .queue
            .replay(&queue_subject(&t.owner, &t.subject), &qkey)
            .await?
            .ok_or_else(|| BrokerError::NoDeadLetter(key.to_string()))?;
        info!(trigger = %t.id, key = %key, "dead letter replayed");
        Ok(position)
    }
}

impl Broker {
    /// The connection of NATS trigger `t` (UNAVAILABLE until connected).
    fn nats_connection(
        &self,
        t: &TriggerRecord,
    ) -> Result<bubble_events::nats::NatsSource, BrokerError> {
        self.nats_of(&t.owner, &t.subject)
            .ok_or(BrokerError::Unavailable("not connected to NATS yet".into()))
    }
}
