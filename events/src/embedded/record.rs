//! The embedded queue's stored records, bounds-checked both ways.

use crate::event::{EventError, EventKey, MAX_KEY_LEN, MAX_PAYLOAD};

/// One queued event as stored.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// Deliveries so far.
    pub attempts: u32,
    /// Not to be handed out before this time (ms since the epoch): the
    /// current lease's end, or a retry's delay.
    pub not_before: u64,
    /// When it was published (ms since the epoch).
    pub published: u64,
    pub key: EventKey,
    pub subject: String,
    pub payload: Vec<u8>,
}

const HEAD: usize = 4 + 8 + 8 + 1 + 2;

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let key = self.key.as_str().as_bytes();
        let subject = self.subject.as_bytes();
        let mut v = Vec::with_capacity(HEAD + key.len() + subject.len() + self.payload.len());
        v.extend(self.attempts.to_le_bytes());
        v.extend(self.not_before.to_le_bytes());
        v.extend(self.published.to_le_bytes());
        // Lengths are checked before a record is made: key ≤ 128 bytes
        // (EventKey), subject ≤ 256 (check_subject).
        v.push(u8::try_from(key.len()).unwrap_or(u8::MAX));
        v.extend(
            u16::try_from(subject.len())
                .unwrap_or(u16::MAX)
                .to_le_bytes(),
        );
        v.extend(key);
        v.extend(subject);
        v.extend(&self.payload);
        v
    }

    /// The subject's bytes of an encoded record, without copying the rest.
    pub fn subject_of(b: &[u8]) -> Result<&[u8], EventError> {
        let head = b
            .get(..HEAD)
            .ok_or(EventError::Corrupt("queued event header"))?;
        let key_len = usize::from(head[20]);
        let subject_len = usize::from(u16::from_le_bytes([head[21], head[22]]));
        b.get(HEAD + key_len..HEAD + key_len + subject_len)
            .ok_or(EventError::Corrupt("queued event subject"))
    }

    pub fn decode(b: &[u8]) -> Result<Self, EventError> {
        let (head, rest) = b
            .split_at_checked(HEAD)
            .ok_or(EventError::Corrupt("queued event header"))?;
        let key_len = usize::from(head[20]);
        let subject_len = usize::from(u16::from_le_bytes([head[21], head[22]]));
        if key_len > MAX_KEY_LEN || subject_len > 256 {
            return Err(EventError::Corrupt("queued event lengths"));
        }
        let (key, rest) = rest
            .split_at_checked(key_len)
            .ok_or(EventError::Corrupt("queued event key"))?;
        let (subject, payload) = rest
            .split_at_checked(subject_len)
            .ok_or(EventError::Corrupt("queued event subject"))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(EventError::TooLarge);
        }
        let key = std::str::from_utf8(key).map_err(|_| EventError::Corrupt("key"))?;
        Ok(Record {
            attempts: u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
            not_before: le_u64(&head[4..12]),
            published: le_u64(&head[12..20]),
            key: EventKey::new(key)?,
            subject: String::from_utf8(subject.to_vec())
                .map_err(|_| EventError::Corrupt("subject"))?,
            payload: payload.to_vec(),
        })
    }
}

/// A key's dedup entry: the event's position and publish time.
pub(crate) fn encode_seen(position: u64, published: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&position.to_le_bytes());
    a[8..].copy_from_slice(&published.to_le_bytes());
    a
}

/// Parses [`encode_seen`].
pub(crate) fn decode_seen(b: &[u8]) -> Result<(u64, u64), EventError> {
    if b.len() != 16 {
        return Err(EventError::Corrupt("dedup entry"));
    }
    Ok((le_u64(&b[..8]), le_u64(&b[8..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_every_truncation_is_refused() {
        let r = Record {
            attempts: 3,
            not_before: 7,
            published: 9,
            key: EventKey::new("k-1").unwrap_or_else(|_| unreachable!()),
            subject: "a.b".into(),
            payload: vec![1, 2, 3],
        };
        let b = r.encode();
        assert_eq!(Record::subject_of(&b).ok(), Some(&b"a.b"[..]));
        assert!(Record::subject_of(&b[..HEAD + 4]).is_err());
        assert_eq!(Record::decode(&b).ok(), Some(r));
        // Up to the end of the subject, every cut is refused.
        for n in 0..HEAD + 6 {
            assert!(Record::decode(&b[..n]).is_err(), "{n}");
        }
        let mut bad = b.clone();
        bad[20] = 200;
        assert!(Record::decode(&bad).is_err());
        assert_eq!(decode_seen(&encode_seen(5, 6)).ok(), Some((5, 6)));
        assert!(decode_seen(&[0; 15]).is_err());
    }
}
