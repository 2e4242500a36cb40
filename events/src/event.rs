//! What every source hands out and takes back.

use std::future::Future;
use std::time::Duration;

use zeroize::Zeroizing;

/// Longest event key, bytes.
pub const MAX_KEY_LEN: usize = 128;
/// Largest event payload or result, bytes.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Longest refusal or failure reason, bytes.
pub const MAX_REASON_LEN: usize = 512;

/// An event's idempotency key: unique per event within a source. A
/// publisher that sends the same key twice (a retry) gets one event;
/// a result is published once per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey(String);

impl EventKey {
    /// A key: 1 to [`MAX_KEY_LEN`] bytes of `A-Z a-z 0-9 . _ : -`.
    pub fn new(key: &str) -> Result<Self, EventError> {
        let ok = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(EventKey(key.to_owned()))
        } else {
            Err(EventError::InvalidKey)
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for EventKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One delivery of an event. Its `Debug` form leaves the payload out.
pub struct SourceEvent {
    /// Its idempotency key.
    pub key: EventKey,
    /// The subject it was published on.
    pub subject: String,
    /// Its bytes (zeroized when dropped: events may carry card numbers).
    pub payload: Zeroizing<Vec<u8>>,
    /// Which delivery this is, from 1.
    pub attempt: u32,
    /// Its position in the source (a stream sequence), for checkpoints.
    pub position: u64,
}

impl std::fmt::Debug for SourceEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceEvent")
            .field("key", &self.key)
            .field("subject", &self.subject)
            .field("payload_len", &self.payload.len())
            .field("attempt", &self.attempt)
            .field("position", &self.position)
            .finish()
    }
}

/// How processing an event ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The portion answered (its signed result).
    Ok(Vec<u8>),
    /// The portion refused the event (not retried).
    Refused(String),
    /// Processing failed (bubble died, deadline) after the last attempt.
    Failed(String),
}

impl Outcome {
    /// Wire form: a tag byte (0 ok, 1 refused, 2 failed) and the bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, body) = match self {
            Outcome::Ok(b) => (0u8, b.as_slice()),
            Outcome::Refused(r) => (1, r.as_bytes()),
            Outcome::Failed(r) => (2, r.as_bytes()),
        };
        let mut v = Vec::with_capacity(1 + body.len());
        v.push(tag);
        v.extend_from_slice(body);
        v
    }

    /// Parses [`Outcome::encode`]'s form, bounds-checked.
    pub fn decode(b: &[u8]) -> Result<Self, EventError> {
        let (&tag, body) = b
            .split_first()
            .ok_or(EventError::Corrupt("empty outcome"))?;
        if body.len() > MAX_PAYLOAD {
            return Err(EventError::TooLarge);
        }
        let text = || {
            if body.len() > MAX_REASON_LEN {
                return Err(EventError::TooLarge);
            }
            String::from_utf8(body.to_vec()).map_err(|_| EventError::Corrupt("reason not UTF-8"))
        };
        match tag {
            0 => Ok(Outcome::Ok(body.to_vec())),
            1 => Ok(Outcome::Refused(text()?)),
            2 => Ok(Outcome::Failed(text()?)),
            _ => Err(EventError::Corrupt("unknown outcome tag")),
        }
    }

    /// Refuses an outcome whose output or reason is over its size limit
    /// ([`EventError::TooLarge`]).
    pub fn check(&self) -> Result<(), EventError> {
        let too_long = match self {
            Outcome::Ok(b) => b.len() > MAX_PAYLOAD,
            Outcome::Refused(r) | Outcome::Failed(r) => r.len() > MAX_REASON_LEN,
        };
        if too_long {
            Err(EventError::TooLarge)
        } else {
            Ok(())
        }
    }
}

/// What publishing did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The position the event (or result) holds in its stream.
    pub position: u64,
    /// The key was already there: nothing new was stored.
    pub duplicate: bool,
}

/// What [`Delivery::complete`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The result's position; `duplicate` if the key had one already (the
    /// first stays).
    pub result: Published,
    /// Whether the event was acked: false if this delivery had gone stale
    /// (the event was handed out again or settled); the result was still
    /// stored (or found) first.
    pub acked: bool,
}

/// Why a source operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The key is empty, too long or has characters outside the set.
    #[error("event key must be 1-{MAX_KEY_LEN} bytes of A-Z a-z 0-9 . _ : -")]
    InvalidKey,
    /// A payload, result or reason is over its limit.
    #[error("event payload, result or reason over its size limit")]
    TooLarge,
    /// The subject is not a plain dotted name.
    #[error("subject must be 1-256 bytes of dotted tokens without spaces or wildcards")]
    InvalidSubject,
    /// This delivery is no longer the event's current one (its lease ran
    /// out and it was delivered again, or it was acked already): the ack,
    /// retry or dead-letter is refused and changes nothing.
    #[error("stale delivery: the event was delivered again or settled")]
    Stale,
    /// The subject already holds `limit` pending events: nothing was
    /// stored; publish again once some are processed.
    #[error("{pending} events of this subject are pending, the limit is {limit}; retry later")]
    Backlog {
        /// Events pending on the subject now.
        pending: u64,
        /// Its limit.
        limit: u64,
    },
    /// Stored bytes do not parse.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
    /// The embedded database failed.
    #[error("embedded queue storage ({op}): {source}")]
    Storage {
        /// What was being done.
        op: &'static str,
        /// The database's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// NATS failed.
    #[error("NATS ({op}): {source}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Checks a subject: dotted tokens of visible ASCII, no wildcards.
pub fn check_subject(s: &str) -> Result<(), EventError> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        });
    if ok {
        Ok(())
    } else {
        Err(EventError::InvalidSubject)
    }
}

/// Checks an event to publish: its subject, and its payload's size.
pub(crate) fn check_event(subject: &str, payload: &[u8]) -> Result<(), EventError> {
    check_subject(subject)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(EventError::TooLarge);
    }
    Ok(())
}

/// A place events come from.
pub trait Source: Send + Sync {
    /// One delivery, settled exactly once.
    type Delivery: Delivery;

    /// Up to `max` events ready now, waiting at most `wait` for the first.
    /// An empty vector means none arrived in time.
    fn fetch(
        &self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Self::Delivery>, EventError>> + Send;
}

/// A fetched event that must be settled: acked, retried or dead-lettered.
/// Dropping it unsettled leaves the event to be delivered again when its
/// lease runs out (what a crash does).
pub trait Delivery: Send + Sized {
    /// The event.
    fn event(&self) -> &SourceEvent;

    /// Done: the event is never delivered again. Call only once its
    /// result is durable.
    fn ack(self) -> impl Future<Output = Result<(), EventError>> + Send;

    /// Not done: deliver it again after `delay` (another attempt).
    fn retry(self, delay: Duration) -> impl Future<Output = Result<(), EventError>> + Send;

    /// Poison: move it to the dead-letter place with `reason`; it is never
    /// delivered again.
    fn dead_letter(self, reason: &str) -> impl Future<Output = Result<(), EventError>> + Send;

    /// Stores `outcome` as the event's result in its source's results
    /// (once per key: a key with a result keeps the first) and then acks
    /// the event; the result is durable before the ack. The embedded
    /// queue does both in one committed transaction. An error hands the
    /// delivery back, not acked (retry or drop it); the result may or may
    /// not be stored.
    fn complete(
        self,
        outcome: &Outcome,
    ) -> impl Future<Output = Result<Completed, (Self, EventError)>> + Send;
}

/// Where results go: once per event key.
pub trait Results: Send + Sync {
    /// Publishes `outcome` for `key`; a second call for the same key
    /// stores nothing and says `duplicate`.
    fn publish_result(
        &self,
        key: &EventKey,
        outcome: &Outcome,
    ) -> impl Future<Output = Result<Published, EventError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_subjects_and_outcomes_are_checked() {
        assert!(EventKey::new("order-1:a.b_c").is_ok());
        for bad in ["", "a b", "ü", "a/b", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert!(EventKey::new(bad).is_err(), "{bad:?}");
        }
        assert!(check_subject("payments.tokenize").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a"] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
        for o in [
            Outcome::Ok(vec![1, 2, 3]),
            Outcome::Refused("no".into()),
            Outcome::Failed("deadline".into()),
        ] {
            assert_eq!(Outcome::decode(&o.encode()).ok(), Some(o));
        }
        assert!(Outcome::decode(&[]).is_err());
        assert!(Outcome::decode(&[9]).is_err());
        assert!(Outcome::decode(&[1, 0xff]).is_err());
        let long = Outcome::Refused("r".repeat(MAX_REASON_LEN + 1));
        assert!(long.check().is_err());
        assert!(Outcome::decode(&long.encode()).is_err());
    }
}
