//! Triggers: a parent's mapping from a subject of its own to a portion
//! function, owned like a bubble (a trigger another parent owns is
//! refused exactly as a foreign bubble id is), persisted in the registry
//! before it runs, each run by its own dispatcher (`dispatch`).
//!
//! Subjects and keys are per parent: the embedded queue holds an event of
//! parent P on subject S under the queue subject `p<NS>.S` and the key
//! `<NS>:K`, where NS is 24 hex digits of SHA-256(P, S). Another parent
//! publishing S lands in its own namespace; its keys never collide with
//! (nor deduplicate away) P's, and results (stored per queue key) are
//! P's alone.

use std::sync::Arc;

use std::time::Duration;

use bubble_events::nats::{NatsConfig, NatsSource};
use bubble_events::{EventKey, Outcome, Published};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::info;

use super::{now_ms, Broker};
use crate::error::{invalid, BrokerError};
use crate::store::registry::triggers::{TriggerRecord, TriggerSource, TriggerTarget};
use crate::store::registry::PortionPolicy;

pub use super::event_result::{EventResult, SignedOutput};

/// Longest subject a parent may name (the namespace prefix takes 26).
pub const MAX_SUBJECT_LEN: usize = 200;
/// Longest event key a parent may give (the namespace prefix takes 25).
pub const MAX_KEY_LEN: usize = 96;

/// A trigger to register (validated by `crate::api`).
#[derive(Clone, Debug)]
pub struct NewTrigger {
    /// Its source.
    pub source: TriggerSource,
    /// The parent's subject.
    pub subject: String,
    /// What runs its events.
    pub target: TriggerTarget,
    /// Portion and function.
    pub portion: String,
    /// Function.
    pub function: String,
    /// Events fetched at once.
    pub batch_size: u32,
    /// Events in flight at once.
    pub max_concurrency: u32,
    /// Deliveries before dead-lettering.
    pub max_deliver: u32,
    /// Its security policy (`None`: the default for a pool, the bubble's
    /// for a named bubble).
    pub policy: Option<PortionPolicy>,
    /// Most events pending at once (0 for NATS: not bounded here).
    pub max_pending: u64,
    /// Seal results to this X25519 public key inside the bubble.
    pub seal_to: Option<[u8; 32]>,
}

/// The namespace of `owner`'s `subject`.
pub(crate) fn namespace(owner: &str, subject: &str) -> String {
    let mut h = Sha256::new();
    h.update((owner.len() as u64).to_le_bytes());
    h.update(owner.as_bytes());
    h.update(subject.as_bytes());
    hex::encode(&h.finalize()[..12])
}

/// The queue subject of `owner`'s `subject`.
pub(crate) fn queue_subject(owner: &str, subject: &str) -> String {
    format!("p{}.{subject}", namespace(owner, subject))
}

/// The queue key of `owner`'s event `key` on `subject`.
pub(crate) fn queue_key(owner: &str, subject: &str, key: &str) -> Result<EventKey, BrokerError> {
    if key.len() > MAX_KEY_LEN {
        return Err(invalid("key", format!("at most {MAX_KEY_LEN} bytes")));
    }
    EventKey::new(key).map_err(|e| invalid("key", e.to_string()))?;
    Ok(EventKey::new(&format!(
        "{}:{key}",
        namespace(owner, subject)
    ))?)
}

/// The key of an event of trigger `t` as its owner gave it (the
/// embedded queue's keys carry the subject's namespace).
pub(crate) fn owner_key<'a>(t: &TriggerRecord, key: &'a str) -> &'a str {
    match t.source {
        TriggerSource::Embedded => key
            .strip_prefix(namespace(&t.owner, &t.subject).as_str())
            .and_then(|k| k.strip_prefix(':'))
            .unwrap_or(key),
        TriggerSource::Nats => key,
    }
}

/// A parent's subject: dotted tokens, no wildcards, at most
/// [`MAX_SUBJECT_LEN`] bytes.
pub fn check_subject(subject: &str) -> Result<(), BrokerError> {
    if subject.len() > MAX_SUBJECT_LEN || bubble_events::check_subject(subject).is_err() {
        return Err(invalid(
            "subject",
            format!("must be 1-{MAX_SUBJECT_LEN} bytes of dotted tokens, no spaces or wildcards"),
        ));
    }
    Ok(())
}

/// A running trigger: its record, its dispatcher's stop switch and, for
/// a NATS trigger, its connection (set once connected).
pub(crate) struct Running {
    pub(crate) rec: TriggerRecord,
    stop: watch::Sender<bool>,
    nats: Arc<tokio::sync::OnceCell<NatsSource>>,
    /// The last event whose portion call started here: its key and when
    /// the CALL went to the VMM (`event_to_start`).
    pub(crate) last_start: Option<(String, std::time::Instant)>,
}

/// The JetStream layout of `owner`'s `subject`: its own events stream
/// (one subject), shared durable consumer, dead-letter and results
/// streams, all named by the namespace, so brokers whose triggers have the
/// same owner and subject share them and nobody else does.
pub(crate) fn nats_config(url: &str, owner: &str, subject: &str, ack_wait: Duration) -> NatsConfig {
    let ns = namespace(owner, subject);
    NatsConfig {
        url: url.to_string(),
        stream: format!("BUBBLE_EV_{ns}"),
        subjects: vec![nats_subject(owner, subject)],
        consumer: format!("brokers_{ns}"),
        ack_wait,
        // A backstop, as for the embedded queue: each trigger dead-letters
        // at its own max_deliver.
        max_deliver: 1000,
        dead_letter_subject: format!("bubble.dead.{ns}"),
        results_stream: format!("BUBBLE_RES_{ns}"),
        results_prefix: format!("bubble.res.{ns}"),
        dedup_window: Duration::from_secs(120),
        max_pending: None,
    }
}

/// The NATS subject of `owner`'s `subject`.
pub(crate) fn nats_subject(owner: &str, subject: &str) -> String {
    format!("bubble.ev.{}", namespace(owner, subject))
}

/// Most triggers one parent may have.
pub const MAX_TRIGGERS_PER_PARENT: usize = 64;

impl Broker {
    /// Registers a trigger for `parent` and starts its dispatcher.
    pub async fn create_trigger(
        self: &Arc<Self>,
        parent: &str,
        cmd: NewTrigger,
    ) -> Result<TriggerRecord, BrokerError> {
        if cmd.source == TriggerSource::Nats && self.cfg.events.nats_url.is_none() {
            return Err(BrokerError::SourceNotConfigured("nats"));
        }
        match &cmd.target {
            TriggerTarget::Bubble(id) => {
                let b = self.owned(parent, id)?;
                // The bubble's policy is fixed (and attested): a trigger
                // cannot run its events under another one.
                if let Some(p) = &cmd.policy {
                    if p.wire().digest() != b.policy.wire().digest() {
                        return Err(BrokerError::TriggerPolicyDiffers(id.clone()));
                    }
                }
            }
            TriggerTarget::Pool { profile, .. } => {
                if !self.cfg.pools.iter().any(|p| &p.name == profile) {
                    return Err(invalid(
                        "profile",
                        format!("no warm pool named {profile:?}"),
                    ));
                }
            }
        }
        let rec = TriggerRecord {
            id: format!("t-{}", uuid::Uuid::new_v4().simple()),
            owner: parent.to_string(),
            source: cmd.source,
            subject: cmd.subject,
            target: cmd.target,
            portion: cmd.portion,
            function: cmd.function,
            batch_size: cmd.batch_size,
            max_concurrency: cmd.max_concurrency,
            max_deliver: cmd.max_deliver,
            created_at_ms: now_ms(),
            policy: cmd.policy,
            max_pending: cmd.max_pending,
            seal_to: cmd.seal_to,
        };
        // Checked and reserved under the lock, written before it runs.
        {
            let mut t = self.triggers.lock();
            // Each trigger runs a dispatcher (and may hold a NATS
            // connection): a parent may not make them without bound.
            let mine = t.values().filter(|r| r.rec.owner == parent).count();
            if mine >= MAX_TRIGGERS_PER_PARENT {
                return Err(BrokerError::Quota(format!(
                    "{mine} triggers: at most {MAX_TRIGGERS_PER_PARENT} per parent"
                )));
            }
            if let Some(other) = t
                .values()
                .find(|r| r.rec.owner == parent && r.rec.subject == rec.subject)
            {
                return Err(BrokerError::TriggerExists(
                    rec.subject.clone(),
                    other.rec.id.clone(),
                ));
            }
            t.insert(
                rec.id.clone(),
                Running {
                    rec: rec.clone(),
                    stop: watch::channel(true).0,
                    nats: Default::default(),
                    last_start: None,
                },
            );
        }
        let b = self.clone();
        let stored = rec.clone();
        let written = tokio::task::spawn_blocking(move || b.registry.put_trigger(&stored))
            .await
            .map_err(|e| BrokerError::Spawn(format!("registry writer: {e}")))?;
        if let Err(e) = written {
            self.triggers.lock().remove(&rec.id);
            return Err(e.into());
        }
        info!(trigger = %rec.id, owner = %parent, subject = %rec.subject, "trigger created");
        self.run_trigger(rec.clone());
        Ok(rec)
    }

    /// Starts (or restarts) the dispatcher of a stored trigger.
    pub(super) fn run_trigger(self: &Arc<Self>, rec: TriggerRecord) {
        let (stop, stopped) = watch::channel(false);
        let nats: Arc<tokio::sync::OnceCell<NatsSource>> = Default::default();
        self.triggers.lock().insert(
            rec.id.clone(),
            Running {
                rec: rec.clone(),
                stop,
                nats: nats.clone(),
                last_start: None,
            },
        );
        tokio::spawn(Self::scale_loop(Arc::downgrade(self), rec, stopped, nats));
    }

    /// Connects a NATS trigger (retrying until connected or stopped).
    pub(super) async fn connect_nats(
        &self,
        t: &TriggerRecord,
        cell: &tokio::sync::OnceCell<NatsSource>,
    ) -> Option<NatsSource> {
        let url = self.cfg.events.nats_url.clone()?;
        let ack_wait = Duration::from_millis(self.cfg.events.ack_wait_ms.max(1));
        loop {
            if self.closing() || !self.trigger_alive(&t.id) {
                return None;
            }
            let cfg = NatsConfig {
                max_pending: Some(match t.max_pending {
                    0 => self.cfg.events.max_pending.max(1),
                    n => n,
                }),
                ..nats_config(&url, &t.owner, &t.subject, ack_wait)
            };
            match NatsSource::connect(cfg).await {
                Ok(s) => return Some(cell.get_or_init(|| async { s }).await.clone()),
                Err(e) => {
                    tracing::warn!(trigger = %t.id, error = %e, "connecting to NATS failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Restarts every stored trigger's dispatcher (broker start).
    pub(super) fn resume_triggers(self: &Arc<Self>) -> Result<(), BrokerError> {
        for rec in self.registry.triggers()? {
            self.run_trigger(rec);
        }
        Ok(())
    }

    /// `parent`'s triggers, oldest first.
    pub fn list_triggers(&self, parent: &str) -> Vec<TriggerRecord> {
        let mut v: Vec<TriggerRecord> = self
            .triggers
            .lock()
            .values()
            .filter(|r| r.rec.owner == parent)
            .map(|r| r.rec.clone())
            .collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    /// One of `parent`'s triggers, or the same refusal as for a bubble
    /// that is not the parent's.
    pub fn owned_trigger(&self, parent: &str, id: &str) -> Result<TriggerRecord, BrokerError> {
        match self.triggers.lock().get(id) {
            Some(r) if r.rec.owner == parent => Ok(r.rec.clone()),
            _ => Err(BrokerError::NotAccessible(id.to_string())),
        }
    }

    /// Removes one of `parent`'s triggers (durably) and stops its
    /// dispatcher; unprocessed events stay in the queue.
    pub async fn delete_trigger(
        self: &Arc<Self>,
        parent: &str,
        id: &str,
    ) -> Result<TriggerRecord, BrokerError> {
        let rec = self.owned_trigger(parent, id)?;
        let b = self.clone();
        let tid = id.to_string();
        tokio::task::spawn_blocking(move || b.registry.remove_trigger(&tid))
            .await
            .map_err(|e| BrokerError::Spawn(format!("registry writer: {e}")))??;
        if let Some(r) = self.triggers.lock().remove(id) {
            let _ = r.stop.send(true);
        }
        info!(trigger = %id, owner = %parent, "trigger deleted");
        Ok(rec)
    }

    /// Whether the trigger still runs (its dispatcher checks between
    /// events).
    pub(super) fn trigger_alive(&self, id: &str) -> bool {
        self.triggers.lock().contains_key(id)
    }

    /// Publishes `payload` on `parent`'s `subject` into the embedded queue.
    pub async fn publish_event(
        &self,
        parent: &str,
        subject: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<Published, BrokerError> {
        check_subject(subject)?;
        let limit = self.cfg.max_payload.min(bubble_events::MAX_PAYLOAD);
        if payload.len() > limit {
            return Err(BrokerError::InvalidArgument {
                field: "payload",
                reason: format!(
                    "{} bytes is over max_payload ({limit} bytes)",
                    payload.len()
                ),
            });
        }
        let qkey = queue_key(parent, subject, key)?;
        // Only into a subject one of the parent's triggers consumes: the
        // queue holds no events nobody will take.
        let consumer = self
            .triggers
            .lock()
            .values()
            .find(|r| r.rec.owner == parent && r.rec.subject == subject)
            .map(|r| (r.rec.source, r.nats.clone(), r.rec.max_pending));
        let Some((source, nats, max_pending)) = consumer else {
            return Err(BrokerError::NoTrigger(subject.to_string()));
        };
        if source == TriggerSource::Nats {
            let src = nats
                .get()
                .ok_or(BrokerError::Unavailable("not connected to NATS yet".into()))?;
            let key = EventKey::new(key)?;
            return match src
                .publish(&nats_subject(parent, subject), &key, payload)
                .await
            {
                Err(bubble_events::EventError::Backlog { pending, limit }) => {
                    Err(BrokerError::Backlog {
                        pending,
                        limit,
                        retry_after_ms: self.cfg.events.target_latency_ms,
                    })
                }
                r => Ok(r?),
            };
        }
        let limit = match max_pending {
            0 => self.cfg.events.max_pending.max(1),
            n => n,
        };
        match self
            .queue
            .publish_bounded(&queue_subject(parent, subject), &qkey, payload, Some(limit))
            .await
        {
            Err(bubble_events::EventError::Backlog { pending, limit }) => {
                Err(BrokerError::Backlog {
                    pending,
                    limit,
                    retry_after_ms: self.cfg.events.target_latency_ms,
                })
            }
            r => Ok(r?),
        }
    }

    /// Events of trigger `t` pending now (embedded: one counter lookup;
    /// NATS: 0, not counted here).
    pub async fn trigger_pending(&self, t: &TriggerRecord) -> Result<u64, BrokerError> {
        match t.source {
            TriggerSource::Embedded => Ok(self
                .queue
                .depth_of(&queue_subject(&t.owner, &t.subject))
                .await?),
            TriggerSource::Nats => Ok(0),
        }
    }

    /// The result of event `key` of one of `parent`'s triggers.
    pub async fn event_result(
        &self,
        parent: &str,
        trigger_id: &str,
        key: &str,
    ) -> Result<EventResult, BrokerError> {
        let t = self.owned_trigger(parent, trigger_id)?;
        let qkey = queue_key(&t.owner, &t.subject, key)?;
        let stored = if t.source == TriggerSource::Nats {
            let nats = self
                .triggers
                .lock()
                .get(trigger_id)
                .map(|r| r.nats.clone())
                .ok_or_else(|| BrokerError::NotAccessible(trigger_id.to_string()))?;
            let src = nats
                .get()
                .ok_or(BrokerError::Unavailable("not connected to NATS yet".into()))?
                .clone();
            src.result(&EventKey::new(key)?).await?
        } else {
            self.queue.result(&qkey).await?
        };
        Ok(match stored {
            None => EventResult::Pending,
            Some(Outcome::Ok(b)) => EventResult::Ok(
                SignedOutput::decode(&b)
                    .ok_or(bubble_events::EventError::Corrupt("stored result"))?,
            ),
            Some(Outcome::Refused(r)) => EventResult::Refused(r),
            Some(Outcome::Failed(r)) => EventResult::Failed(r),
        })
    }

    /// The NATS connection of `owner`'s running trigger on `subject`, if
    /// one runs here and is connected.
    pub(super) fn nats_of(&self, owner: &str, subject: &str) -> Option<NatsSource> {
        self.triggers
            .lock()
            .values()
            .find(|r| r.rec.owner == owner && r.rec.subject == subject)
            .and_then(|r| r.nats.get().cloned())
    }

    /// Stops every dispatcher (broker shutdown).
    pub(super) fn stop_triggers(&self) {
        for r in self.triggers.lock().values() {
            let _ = r.stop.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_separate_parents_and_subjects() {
        assert_ne!(queue_subject("uid:1", "a"), queue_subject("uid:2", "a"));
        assert_ne!(queue_subject("uid:1", "a"), queue_subject("uid:1", "b"));
        // The owner's length is hashed in: no ("ab","c") / ("a","bc") clash.
        assert_ne!(namespace("ab", "c"), namespace("a", "bc"));
        let long = "k".repeat(MAX_KEY_LEN);
        assert!(queue_key("uid:1", "a", &long).is_ok());
        assert!(queue_key("uid:1", "a", &format!("{long}k")).is_err());
        assert!(queue_key("uid:1", "a", "a b").is_err());
        assert!(check_subject(&"s".repeat(MAX_SUBJECT_LEN)).is_ok());
        assert!(bubble_events::check_subject(&queue_subject("uid:1", &"s".repeat(200))).is_ok());
        assert!(check_subject("a.*").is_err());
    }
}
