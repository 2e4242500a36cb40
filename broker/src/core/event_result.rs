//! An event's result as its owner reads it, and the stored form of a
//! portion's signed output (kept per key by either event source).

/// One event's result as its owner reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventResult {
    /// No result yet.
    Pending,
    /// The portion answered; signed by the bubble.
    Ok(SignedOutput),
    /// The portion refused the event.
    Refused(String),
    /// Processing failed `max_deliver` times (dead-lettered).
    Failed(String),
}

/// A portion's output with the bubble's signature over (bubble id, call
/// id, SHA-256 of the portion-call frame, output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedOutput {
    /// Whether `output` is a sealed box to the trigger's `seal_to` key.
    pub sealed: bool,
    /// SHA-256 of the portion-call frame the bubble signed (all zero in
    /// results stored before it was kept).
    pub input_sha256: [u8; 32],
    /// The bubble that ran it.
    pub bubble_id: String,
    /// The bubble's call id.
    pub call_id: u64,
    /// Ed25519 signature.
    pub signature: Vec<u8>,
    /// The output.
    pub output: Vec<u8>,
}

/// First byte of the stored form with `sealed` and `input_sha256` (the
/// older form starts with the id's length, which is never 255).
const V2: u8 = 0xFF;

impl SignedOutput {
    /// Stored form: 0xFF, sealed (1 byte), input SHA-256 (32), id length
    /// (1 byte), id, call id (LE u64), signature length (LE u16),
    /// signature, output.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.bubble_id.as_bytes();
        let mut v = Vec::with_capacity(45 + id.len() + self.signature.len() + self.output.len());
        v.push(V2);
        v.push(u8::from(self.sealed));
        v.extend(self.input_sha256);
        v.push(u8::try_from(id.len()).unwrap_or(u8::MAX - 1));
        v.extend(id);
        v.extend(self.call_id.to_le_bytes());
        v.extend(
            u16::try_from(self.signature.len())
                .unwrap_or(u16::MAX)
                .to_le_bytes(),
        );
        v.extend(&self.signature);
        v.extend(&self.output);
        v
    }

    /// Parses [`SignedOutput::encode`] (or the older form without its
    /// first 34 bytes), bounds-checked.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let (sealed, input_sha256, b) = match b.split_first()? {
            (&V2, rest) => {
                let (flags, rest) = rest.split_first()?;
                let (h, rest) = rest.split_at_checked(32)?;
                (*flags == 1, h.try_into().ok()?, rest)
            }
            _ => (false, [0u8; 32], b),
        };
        let (&n, rest) = b.split_first()?;
        let (id, rest) = rest.split_at_checked(usize::from(n))?;
        let (call, rest) = rest.split_at_checked(8)?;
        let (len, rest) = rest.split_at_checked(2)?;
        let (sig, out) =
            rest.split_at_checked(usize::from(u16::from_le_bytes([len[0], len[1]])))?;
        Some(Self {
            sealed,
            input_sha256,
            bubble_id: String::from_utf8(id.to_vec()).ok()?,
            call_id: u64::from_le_bytes(call.try_into().ok()?),
            signature: sig.to_vec(),
            output: out.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_outputs_round_trip_and_truncations_are_refused() {
        let s = SignedOutput {
            sealed: true,
            input_sha256: [5; 32],
            bubble_id: "b-1".into(),
            call_id: 7,
            signature: vec![9; 64],
            output: b"out".to_vec(),
        };
        assert_eq!(SignedOutput::decode(&s.encode()), Some(s.clone()));
        let b = s.encode();
        for n in 0..b.len() - 3 {
            assert!(SignedOutput::decode(&b[..n]).is_none(), "{n}");
        }
        // The older form (no flags, no digest) still reads.
        let old = b[34..].to_vec();
        let o = SignedOutput::decode(&old).unwrap_or_else(|| unreachable!());
        assert_eq!(
            (o.sealed, o.input_sha256, o.output),
            (false, [0; 32], s.output)
        );
    }
}
