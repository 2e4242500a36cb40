//! A NATS source's dead letters, for its owner: list them (the dead-letter
//! stream `<stream>_DEAD`, one per owner and subject, so nobody else's) and
//! put one back into the events stream.
//!
//! A replay, in this order, each step safe to repeat: (1) a `failed`
//! result of the key is purged from the results stream (the next run's
//! result can then be stored; any other outcome stays); (2) the event is
//! published again with its key in [`KEY_HEADER`] and `Nats-Msg-Id`
//! `replay:<key>:<dead-letter sequence>` (a repeated replay of the same
//! dead letter within the duplicate window stores it once); (3) the dead
//! letter is deleted. A broker that dies between steps leaves the dead
//! letter listed; replaying it again finishes the job.

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;

use crate::event::{EventError, EventKey, Outcome};
use crate::nats::{nats_err, NatsSource, ATTEMPTS_HEADER, KEY_HEADER, REASON_HEADER};

/// Most dead letters one listing reads (the newest).
pub const MAX_LISTED: u64 = 1000;

/// One dead-lettered event in NATS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsDeadLetter {
    /// Its key.
    pub key: EventKey,
    /// Deliveries it had (0 if the dead letter predates the header).
    pub attempts: u32,
    /// Why it was given up.
    pub reason: String,
    /// Its sequence in the dead-letter stream.
    pub sequence: u64,
    payload: Vec<u8>,
}

impl NatsSource {
    /// The dead letters, oldest first (at most [`MAX_LISTED`], the newest).
    pub async fn dead_letters(&self) -> Result<Vec<NatsDeadLetter>, EventError> {
        let stream = self
            .js()
            .get_stream(self.dead_stream())
            .await
            .map_err(nats_err("dead-letter stream"))?;
        let state = stream
            .get_info()
            .await
            .map_err(nats_err("dead-letter stream info"))?
            .state;
        if state.messages == 0 {
            return Ok(Vec::new());
        }
        let first = state
            .first_sequence
            .max(state.last_sequence.saturating_sub(MAX_LISTED - 1));
        let mut out = Vec::new();
        for seq in first..=state.last_sequence {
            let m = match stream.get_raw_message(seq).await {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
                Err(e) => return Err(nats_err("read dead letter")(e)),
            };
            let h = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
            let Some(key) = h(KEY_HEADER).and_then(|k| EventKey::new(&k).ok()) else {
                continue;
            };
            out.push(NatsDeadLetter {
                key,
                attempts: h(ATTEMPTS_HEADER).and_then(|a| a.parse().ok()).unwrap_or(0),
                reason: h(REASON_HEADER).unwrap_or_default(),
                sequence: seq,
                payload: m.payload.to_vec(),
            });
        }
        Ok(out)
    }

    /// Puts dead letter `key` back into the events stream (see the
    /// module's docs); its new stream position, or `None` if `key` is not
    /// dead-lettered.
    pub async fn replay(&self, key: &EventKey) -> Result<Option<u64>, EventError> {
        let Some(d) = self
            .dead_letters()
            .await?
            .into_iter()
            .find(|d| d.key == *key)
        else {
            return Ok(None);
        };
        if let Some(Outcome::Failed(_)) = self.result(key).await? {
            let results = self
                .js()
                .get_stream(&self.config().results_stream)
                .await
                .map_err(nats_err("results stream"))?;
            results
                .purge()
                .filter(self.result_subject(key))
                .await
                .map_err(nats_err("purge failed result"))?;
        }
        let mut h = HeaderMap::new();
        h.insert(KEY_HEADER, key.as_str());
        h.insert(
            NATS_MESSAGE_ID,
            format!("replay:{key}:{}", d.sequence).as_str(),
        );
        let subject = self
            .config()
            .subjects
            .first()
            .cloned()
            .ok_or(EventError::InvalidSubject)?;
        let ack = self
            .js()
            .publish_with_headers(subject, h, d.payload.clone().into())
            .await
            .map_err(nats_err("replay"))?
            .await
            .map_err(nats_err("replay ack"))?;
        let dead = self
            .js()
            .get_stream(self.dead_stream())
            .await
            .map_err(nats_err("dead-letter stream"))?;
        dead.delete_message(d.sequence)
            .await
            .map_err(nats_err("delete dead letter"))?;
        Ok(Some(ack.sequence))
    }
}
