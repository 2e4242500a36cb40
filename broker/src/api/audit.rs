//! Security events and audit records, rendered for the wire.

use bubble_audit::{CredentialAction, Outcome, Record, What};
use bubble_proto::v1 as pb;

use crate::core::{SecurityEvent, ANOTHER_PARENT};
use crate::error::{invalid, BrokerError};

/// The page token of a `ListAudit` page starting at sequence number `seq`.
pub fn page_token(seq: u64) -> String {
    format!("a{seq}")
}

/// The sequence number a page token names (empty: 0). Any number is
/// safe: the log is read from its own index, never from an offset the
/// caller gives.
pub fn parse_page_token(t: &str) -> Result<u64, BrokerError> {
    if t.is_empty() {
        return Ok(0);
    }
    t.strip_prefix('a')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| invalid("page_token", "not a token from a previous page"))
}

/// A security event as its owner sees it (another parent's identity is
/// blanked).
pub fn security_to_pb(e: &SecurityEvent) -> pb::SecurityEvent {
    pb::SecurityEvent {
        kind: e.kind.label().to_string(),
        parent: if e.parent.is_empty() || e.parent == e.owner {
            e.parent.clone()
        } else {
            ANOTHER_PARENT.to_string()
        },
        portion_digest: e.portion_digest.clone(),
    }
}

/// An audit record (already filtered and blanked for its viewer).
pub fn record_to_pb(r: Record) -> pb::AuditRecord {
    let mut out = pb::AuditRecord {
        seq: r.seq,
        at_ms: r.entry.at_ms,
        bubble_id: r.entry.bubble,
        owner: r.entry.owner,
        parent: r.entry.parent,
        portion_digest: r.entry.portion_digest,
        ..Default::default()
    };
    match r.what {
        What::Lifecycle { state, reason } => {
            out.r#type = "lifecycle".into();
            (out.state, out.reason) = (state, reason);
        }
        What::Credential {
            action,
            name,
            outcome,
        } => {
            out.r#type = "credential".into();
            out.credential_action = match action {
                CredentialAction::Provision => "provision",
                CredentialAction::Use => "use",
            }
            .into();
            out.credential_name = name;
            out.outcome = match outcome {
                Outcome::Ok => "ok",
                Outcome::Denied => "denied",
                Outcome::Failed => "failed",
            }
            .into();
        }
        What::Security { kind } => {
            out.r#type = "security".into();
            out.security_kind = kind;
        }
        What::Admin { action } => {
            out.r#type = "admin".into();
            out.admin_action = action;
        }
        What::Checkpoint { .. } => out.r#type = "checkpoint".into(),
    }
    out
}
