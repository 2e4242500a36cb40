//! The security-policy file (`create --policy-file`, and what `provision`
//! and signed calls expect) and the idle settings of create and attach.
//!
//! The file is TOML; every key is optional and 0 (or absent) means the
//! broker's default:
//!
//! ```toml
//! fuel_per_call = 2000000
//! memory_limit_bytes = 1048576
//! call_deadline_ms = 2000
//! max_output_bytes = 16384
//! [credential_rate]            # optional: no limit without it
//! per_sec = 100
//! burst = 20
//! [[grants]]
//! portion = "payments"
//! credentials = ["tokenization_key"]
//! ```

use std::path::Path;

use anyhow::Context;
use bubble_proto::v1 as pb;
use clap::{Args, ValueEnum};
use serde::Deserialize;

/// A policy file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    fuel_per_call: u64,
    #[serde(default)]
    memory_limit_bytes: u32,
    #[serde(default)]
    call_deadline_ms: u32,
    #[serde(default)]
    max_output_bytes: u32,
    #[serde(default)]
    grants: Vec<GrantFile>,
    #[serde(default)]
    credential_rate: Option<RateFile>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFile {
    per_sec: u32,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    portion: String,
    #[serde(default)]
    credentials: Vec<String>,
}

fn read(path: &Path) -> anyhow::Result<PolicyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("policy file {}", path.display()))
}

/// The policy to send with a create request.
pub(super) fn to_pb(path: &Path) -> anyhow::Result<pb::SecurityPolicy> {
    let f = read(path)?;
    Ok(pb::SecurityPolicy {
        credential_rate: f.credential_rate.map(|r| pb::CredentialRate {
            per_sec: r.per_sec,
            burst: r.burst,
        }),
        fuel_per_call: f.fuel_per_call,
        memory_limit_bytes: f.memory_limit_bytes,
        call_deadline_ms: f.call_deadline_ms,
        max_output_bytes: f.max_output_bytes,
        grants: f
            .grants
            .into_iter()
            .map(|g| pb::CredentialGrant {
                portion: g.portion,
                credentials: g.credentials,
            })
            .collect(),
    })
}

/// The policy a bubble created with this file (or none: the default) runs
/// under, as its attestation binds it (zeros replaced by the defaults the
/// broker applies).
pub(super) fn expected(path: Option<&Path>) -> anyhow::Result<bubble_attestation::SecurityPolicy> {
    let mut p = bubble_attestation::SecurityPolicy::default();
    let Some(path) = path else { return Ok(p) };
    let f = read(path)?;
    if f.fuel_per_call > 0 {
        p.fuel_per_call = f.fuel_per_call;
    }
    if f.memory_limit_bytes > 0 {
        p.memory_limit_bytes = f.memory_limit_bytes;
    }
    if f.call_deadline_ms > 0 {
        p.call_deadline_ms = f.call_deadline_ms;
    }
    if f.max_output_bytes > 0 {
        p.max_output_bytes = f.max_output_bytes;
    }
    p.grants = f
        .grants
        .into_iter()
        .map(|g| (g.portion, g.credentials))
        .collect();
    p.credential_rate = f.credential_rate.map(|r| bubble_abi::CredentialRate {
        per_sec: r.per_sec,
        burst: r.burst,
    });
    Ok(p)
}

/// What the broker does with an idle bubble.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum IdleActionArg {
    /// Nothing.
    Stay,
    /// Suspend it to the store.
    Suspend,
    /// Delete it.
    Delete,
}

/// Idle settings of create and attach.
#[derive(Debug, Args)]
pub(super) struct IdleArgs {
    /// Seconds without calls before --idle-action is taken.
    #[arg(long, requires = "idle_action")]
    idle_timeout: Option<u32>,
    /// What to do with an idle bubble.
    #[arg(long, value_enum, requires = "idle_timeout")]
    idle_action: Option<IdleActionArg>,
}

impl IdleArgs {
    /// The idle policy to send (none: the broker's or the pool's).
    pub(super) fn to_pb(&self) -> Option<pb::IdlePolicy> {
        let (t, a) = (self.idle_timeout?, self.idle_action?);
        let action = match a {
            IdleActionArg::Stay => pb::IdleAction::Stay,
            IdleActionArg::Suspend => pb::IdleAction::Suspend,
            IdleActionArg::Delete => pb::IdleAction::Delete,
        };
        Some(pb::IdlePolicy {
            idle_timeout_s: t,
            action: action as i32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_fills_in_defaults_and_refuses_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("policy.toml");
        std::fs::write(
            &p,
            "fuel_per_call = 5\n[[grants]]\nportion = \"payments\"\ncredentials = [\"k\"]\n",
        )
        .unwrap();
        let pb = to_pb(&p).unwrap();
        assert_eq!(pb.fuel_per_call, 5);
        assert_eq!(pb.memory_limit_bytes, 0);
        let e = expected(Some(&p)).unwrap();
        assert_eq!(e.fuel_per_call, 5);
        assert_eq!(
            e.memory_limit_bytes,
            bubble_attestation::SecurityPolicy::default().memory_limit_bytes
        );
        assert_eq!(e.grants, vec![("payments".into(), vec!["k".into()])]);
        std::fs::write(&p, "fuel = 5\n").unwrap();
        assert!(to_pb(&p).is_err());
        assert_eq!(expected(Some(&p)).map(|e| e.credential_rate).ok(), None);
    }

    #[test]
    fn a_policy_file_carries_the_credential_rate() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("policy.toml");
        std::fs::write(&p, "[credential_rate]\nper_sec = 100\nburst = 20\n").unwrap();
        let pb = to_pb(&p).unwrap();
        assert_eq!(
            pb.credential_rate,
            Some(pb::CredentialRate {
                per_sec: 100,
                burst: 20
            })
        );
        let e = expected(Some(&p)).unwrap();
        assert_eq!(
            e.credential_rate,
            Some(bubble_abi::CredentialRate {
                per_sec: 100,
                burst: 20
            })
        );
        std::fs::write(&p, "fuel_per_call = 5\n").unwrap();
        assert_eq!(to_pb(&p).unwrap().credential_rate, None);
        std::fs::write(&p, "[credential_rate]\nper_sec = 1\n").unwrap();
        assert!(to_pb(&p).is_err(), "burst is required");
        std::fs::write(&p, "[credential_rate]\nper_sec = 1\nburst = 1\nx = 2\n").unwrap();
        assert!(to_pb(&p).is_err(), "unknown keys are refused");
    }
}
