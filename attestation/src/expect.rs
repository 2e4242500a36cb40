//! What a verifier expects of a bubble besides a valid report: the
//! canonical security-policy encoding (whose digest REPORT_DATA binds) and
//! HOST_DATA, which binds a report to its bubble and owner.

use sha2::{Digest, Sha256};

/// Domain separator of [`host_data`].
pub const HOST_DATA_DOMAIN: &[u8] = b"bubble-host-data-v1\0";

/// HOST_DATA of a bubble:
/// `SHA-256("bubble-host-data-v1\0" ‖ u16 LE len(id) ‖ id ‖ u16 LE len(owner) ‖ owner)`.
///
/// Lengths above 65535 bytes are clamped to 65535 in the prefix (bubble
/// ids and owners are short; the broker refuses long ones).
pub fn host_data(bubble_id: &str, owner: &str) -> [u8; 32] {
    let len = |s: &str| u16::try_from(s.len()).unwrap_or(u16::MAX).to_le_bytes();
    let mut h = Sha256::new();
    h.update(HOST_DATA_DOMAIN);
    h.update(len(bubble_id));
    h.update(bubble_id.as_bytes());
    h.update(len(owner));
    h.update(owner.as_bytes());
    h.finalize().into()
}

/// A bubble's security policy for code portions, as the broker applies it
/// (`bubble.v1.SecurityPolicy` after validation and defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityPolicy {
    /// Fuel per call.
    pub fuel_per_call: u64,
    /// Linear-memory limit, bytes.
    pub memory_limit_bytes: u32,
    /// Wall-clock deadline per portion call, ms (not part of the encoding:
    /// the host enforces it).
    pub call_deadline_ms: u32,
    /// Largest output, bytes.
    pub max_output_bytes: u32,
    /// (portion, credentials it may use).
    pub grants: Vec<(String, Vec<String>)>,
}

impl Default for SecurityPolicy {
    fn default() -> Self {
        Self {
            fuel_per_call: 10_000_000,
            memory_limit_bytes: 1 << 20,
            call_deadline_ms: 10_000,
            max_output_bytes: 64 << 10,
            grants: Vec::new(),
        }
    }
}

impl SecurityPolicy {
    /// The canonical encoding: the bytes the guest's `set_policy` op takes
    /// (`u64 LE fuel ‖ u32 LE memory ‖ u32 LE max output ‖ u16 LE n ‖ n ×
    /// (u8 len ‖ portion ‖ u8 count ‖ count × (u8 len ‖ credential))`).
    /// Names longer than 255 bytes and more than 255 credentials are
    /// truncated, as the broker never sends them (it refuses them first).
    pub fn encode(&self) -> Vec<u8> {
        fn short(v: &mut Vec<u8>, s: &str) {
            let b = s.as_bytes();
            let b = b.get(..255).unwrap_or(b);
            v.push(b.len() as u8);
            v.extend(b);
        }
        let mut v = Vec::new();
        v.extend(self.fuel_per_call.to_le_bytes());
        v.extend(self.memory_limit_bytes.to_le_bytes());
        v.extend(self.max_output_bytes.to_le_bytes());
        let grants = self
            .grants
            .get(..usize::from(u16::MAX))
            .unwrap_or(&self.grants);
        v.extend((grants.len() as u16).to_le_bytes());
        for (p, creds) in grants {
            short(&mut v, p);
            let creds = creds.get(..255).unwrap_or(creds);
            v.push(creds.len() as u8);
            for c in creds {
                short(&mut v, c);
            }
        }
        v
    }

    /// The policy digest REPORT_DATA binds: all zero for the default policy
    /// (the broker then sets none), else SHA-256 of [`Self::encode`].
    pub fn digest(&self) -> [u8; 32] {
        if *self == Self::default() {
            [0u8; 32]
        } else {
            Sha256::digest(self.encode()).into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_data_is_the_documented_hash() {
        let mut m = b"bubble-host-data-v1\0".to_vec();
        m.extend([3, 0]);
        m.extend(b"b-1");
        m.extend([5, 0]);
        m.extend(b"uid:0");
        assert_eq!(
            host_data("b-1", "uid:0"),
            <[u8; 32]>::from(Sha256::digest(&m))
        );
        assert_ne!(host_data("b-1", "uid:0"), host_data("b-1u", "id:0"));
    }

    #[test]
    fn default_policy_digest_is_zero_and_others_hash_the_encoding() {
        assert_eq!(SecurityPolicy::default().digest(), [0u8; 32]);
        let p = SecurityPolicy {
            grants: vec![("pay".into(), vec!["k".into()])],
            ..Default::default()
        };
        let e = p.encode();
        assert_eq!(e.len(), 8 + 4 + 4 + 2 + 1 + 3 + 1 + 1 + 1);
        assert_eq!(p.digest(), <[u8; 32]>::from(Sha256::digest(&e)));
    }
}
