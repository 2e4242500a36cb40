//! Security policies and warm pools: which policies an attach may ask for,
//! the policy a pool profile's bubbles are booted with, and how an attach
//! asking for a policy gets a pooled bubble carrying exactly it.
//!
//! The one rule: a parent never receives a bubble carrying a policy other
//! than the one it asked for. Policies are compared by their canonical
//! bytes (what the guest's `set_policy` takes and the attestation's policy
//! digest is the SHA-256 of), never by a name.

use bubble_proto::v1 as pb;

use crate::config::PoolProfile;
use crate::error::{invalid, BrokerError};
use crate::store::registry::PortionPolicy;

/// Refuses a policy that the guest would refuse (its own decoder must give
/// it back unchanged) or that breaks the broker's rules on names and
/// counts, before any pooled bubble is touched (INVALID_ARGUMENT). The
/// default policy is never installed, so it needs no check.
pub(crate) fn check_policy(p: &PortionPolicy) -> Result<(), BrokerError> {
    if *p == PortionPolicy::default() {
        return Ok(());
    }
    let name = |s: &str| bubble_abi::is_valid_name(s, bubble_abi::MAX_NAME_LEN);
    let names_ok = p.grants.len() <= 16
        && p.grants
            .iter()
            .all(|(n, c)| name(n) && c.len() <= 16 && c.iter().all(|c| name(c)));
    if !names_ok {
        return Err(invalid(
            "policy.grants",
            "at most 16 grants of at most 16 credentials, names of 1 to 64 characters of \
             A-Z a-z 0-9 . _ -",
        ));
    }
    let wire = p.wire();
    if bubble_abi::SecurityPolicy::decode(&wire.encode()).ok() != Some(wire) {
        return Err(invalid(
            "policy",
            "the bubble's guest would refuse this policy",
        ));
    }
    Ok(())
}

/// The policy every bubble of `profile`'s pool is booted with, validated
/// exactly as a parent's request would be (the same zeros-mean-default
/// rules, so a parent asking for the same policy gets the same bytes).
pub(crate) fn profile_policy(
    profile: &PoolProfile,
    max_payload: usize,
) -> Result<PortionPolicy, BrokerError> {
    let Some(c) = &profile.policy else {
        return Ok(PortionPolicy::default());
    };
    let asked = pb::SecurityPolicy {
        fuel_per_call: c.fuel_per_call,
        memory_limit_bytes: c.memory_limit_bytes,
        call_deadline_ms: c.call_deadline_ms,
        max_output_bytes: c.max_output_bytes,
        grants: c
            .grants
            .iter()
            .map(|g| pb::CredentialGrant {
                portion: g.portion.clone(),
                credentials: g.credentials.clone(),
            })
            .collect(),
        credential_rate: c.credential_rate.map(|r| pb::CredentialRate {
            per_sec: r.per_sec,
            burst: r.burst,
        }),
    };
    let policy = crate::api::convert::policy_from_pb(Some(&asked), max_payload)?;
    check_policy(&policy)?;
    Ok(policy)
}

/// How an attach gets its bubble from a profile's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PoolRoute {
    /// The pooled bubbles already carry the policy asked for (installed
    /// and bound to their attestation when they booted): take one, with no
    /// call into the guest.
    Take,
    /// The pooled bubbles carry the default policy and another was asked
    /// for: install it in one (a `set_policy` call) before handing it over.
    Install,
    /// The pooled bubbles carry a policy other than the one asked for, and
    /// a policy once installed is never replaced: none of them may be
    /// handed over; boot a bubble with the asked policy (a pool miss).
    Boot,
}

/// The route for an attach asking for `asked` from a pool whose bubbles
/// carry `pooled`.
pub(crate) fn route(pooled: &PortionPolicy, asked: &PortionPolicy) -> PoolRoute {
    let pooled = pooled.encode();
    if pooled == asked.encode() {
        PoolRoute::Take
    } else if pooled == PortionPolicy::default().encode() {
        PoolRoute::Install
    } else {
        PoolRoute::Boot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The core refuses what the guest would (not only the API layer):
    /// bad names, too many grants or credentials, zero limits.
    #[test]
    fn policies_the_guest_would_refuse_are_invalid_arguments() {
        let ok = PortionPolicy {
            grants: vec![("payments".into(), vec!["k".into()])],
            ..PortionPolicy::default()
        };
        assert!(check_policy(&ok).is_ok());
        assert!(check_policy(&PortionPolicy::default()).is_ok());
        let bad = [
            PortionPolicy {
                grants: vec![("no spaces".into(), vec![])],
                ..ok.clone()
            },
            PortionPolicy {
                grants: vec![("p".into(), vec!["x".repeat(65)])],
                ..ok.clone()
            },
            PortionPolicy {
                grants: (0..17).map(|i| (format!("p{i}"), vec![])).collect(),
                ..ok.clone()
            },
            PortionPolicy {
                grants: vec![("p".into(), (0..17).map(|i| format!("c{i}")).collect())],
                ..ok.clone()
            },
            PortionPolicy {
                fuel_per_call: 0,
                ..ok.clone()
            },
            PortionPolicy {
                max_output_bytes: 0,
                ..ok.clone()
            },
            PortionPolicy {
                credential_rate: Some((0, 1)),
                ..ok.clone()
            },
            PortionPolicy {
                credential_rate: Some((1, 0)),
                ..ok.clone()
            },
        ];
        assert!(check_policy(&PortionPolicy {
            credential_rate: Some((1, 1)),
            ..ok.clone()
        })
        .is_ok());
        for p in bad {
            assert!(
                matches!(check_policy(&p), Err(BrokerError::InvalidArgument { .. })),
                "{p:?}"
            );
        }
    }

    fn pay() -> PortionPolicy {
        PortionPolicy {
            grants: vec![("payments".into(), vec!["tokenization_key".into()])],
            ..PortionPolicy::default()
        }
    }

    /// Only identical bytes take a pooled bubble as it is; a policy
    /// differing in one byte (fuel + 1) or only in grant order never does;
    /// a pool carrying a policy is never handed over to any other.
    #[test]
    fn an_attach_takes_a_pooled_bubble_only_with_identical_policy_bytes() {
        let default = PortionPolicy::default();
        let p = pay();
        let one_byte = PortionPolicy {
            fuel_per_call: p.fuel_per_call + 1,
            ..p.clone()
        };
        let diff = p
            .encode()
            .iter()
            .zip(one_byte.encode())
            .filter(|(a, b)| **a != *b)
            .count();
        assert_eq!(diff, 1, "the two policies differ in one byte");
        let mut reordered = PortionPolicy {
            grants: vec![("a".into(), vec![]), ("b".into(), vec![])],
            ..default.clone()
        };
        let ordered = reordered.clone();
        reordered.grants.reverse();

        assert_eq!(route(&default, &default), PoolRoute::Take);
        assert_eq!(route(&p, &p.clone()), PoolRoute::Take);
        assert_eq!(route(&default, &p), PoolRoute::Install);
        assert_eq!(route(&p, &one_byte), PoolRoute::Boot);
        assert_eq!(route(&one_byte, &p), PoolRoute::Boot);
        assert_eq!(route(&p, &default), PoolRoute::Boot);
        assert_eq!(route(&ordered, &reordered), PoolRoute::Boot);
    }

    /// A profile's policy is canonicalised as a request's is (zeros are
    /// the defaults), so the same policy asked for by a parent matches; a
    /// policy a request could not carry is refused at start.
    #[test]
    fn a_profile_policy_is_validated_and_canonical_as_a_request() {
        use crate::config::{GrantConfig, PolicyConfig};
        let mut profile = PoolProfile {
            name: "pay".into(),
            memory_mib: 16,
            size: 1,
            image: "shim".into(),
            idle_timeout_s: 0,
            idle_action: Default::default(),
            policy: None,
        };
        assert_eq!(
            profile_policy(&profile, 1 << 20).unwrap(),
            PortionPolicy::default()
        );
        profile.policy = Some(PolicyConfig {
            grants: vec![GrantConfig {
                portion: "payments".into(),
                credentials: vec!["tokenization_key".into()],
            }],
            ..PolicyConfig::default()
        });
        let got = profile_policy(&profile, 1 << 20).unwrap();
        assert_eq!(got.encode(), pay().encode());
        let asked = crate::api::convert::policy_from_pb(
            Some(&pb::SecurityPolicy {
                grants: vec![pb::CredentialGrant {
                    portion: "payments".into(),
                    credentials: vec!["tokenization_key".into()],
                }],
                ..Default::default()
            }),
            1 << 20,
        )
        .unwrap();
        assert_eq!(route(&got, &asked), PoolRoute::Take);
        for bad in [
            PolicyConfig {
                memory_limit_bytes: 1 << 30,
                ..PolicyConfig::default()
            },
            PolicyConfig {
                grants: vec![GrantConfig {
                    portion: "no spaces".into(),
                    credentials: vec![],
                }],
                ..PolicyConfig::default()
            },
        ] {
            profile.policy = Some(bad);
            assert!(matches!(
                profile_policy(&profile, 1 << 20),
                Err(BrokerError::InvalidArgument { .. })
            ));
        }
    }
}
