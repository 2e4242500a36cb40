//! What a verifier expects of a bubble besides a valid report: the
//! canonical security-policy encoding (whose digest REPORT_DATA binds; it
//! lives in `bubble-abi`) and HOST_DATA, which binds a report to its bubble
//! and owner.

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

/// A bubble's security policy for code portions, its wire form and its
/// digest: defined by the guest contract (`bubble-abi`), re-exported here so
/// verifiers compute the very digest the guest binds.
pub use bubble_abi::SecurityPolicy;

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
            credential_rate: None,
            grants: vec![("pay".into(), vec!["k".into()])],
            ..Default::default()
        };
        let e = p.encode();
        // fuel, memory, deadline, output, grant count, one grant.
        assert_eq!(e.len(), 8 + 4 + 4 + 4 + 2 + 1 + 3 + 1 + 1 + 1);
        assert_eq!(p.digest(), <[u8; 32]>::from(Sha256::digest(&e)));
    }
}
