//! A parent's view of the audit log: the records of its bubbles and of its
//! own requests, with any other parent's identity blanked.

use std::sync::Arc;

use bubble_audit::{Record, What};

use super::Broker;
use crate::error::BrokerError;

/// Shown instead of another parent's identity.
pub const ANOTHER_PARENT: &str = "(another parent)";

/// Which records a parent asks for.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// Only this bubble (empty: all).
    pub bubble_id: String,
    /// Only records at or after this Unix time, ms.
    pub since_ms: u64,
}

/// `r` as `parent` may see it, if it may see it at all: records of its
/// bubbles and of its own requests; checkpoints are not shown.
pub fn visible_to(parent: &str, q: &AuditQuery, mut r: Record) -> Option<Record> {
    if matches!(r.what, What::Checkpoint { .. })
        || r.entry.at_ms < q.since_ms
        || (!q.bubble_id.is_empty() && r.entry.bubble != q.bubble_id)
        || (r.entry.owner != parent && r.entry.parent != parent)
    {
        return None;
    }
    if r.entry.owner != parent {
        // Its request on a bubble it does not own: whose it is (if
        // anyone's) is not its business.
        r.entry.owner.clear();
    }
    if !r.entry.parent.is_empty() && r.entry.parent != parent {
        r.entry.parent = ANOTHER_PARENT.to_string();
    }
    Some(r)
}

/// Most records one page returns.
pub const MAX_AUDIT_PAGE: usize = 1000;
/// Records one page returns when the caller gives no size.
pub const DEFAULT_AUDIT_PAGE: usize = 500;
/// Records of the log one request reads at most.
pub const AUDIT_SCAN: usize = 20_000;

/// One page of a parent's audit records.
pub struct AuditPage {
    /// Oldest first.
    pub records: Vec<Record>,
    /// Where the next page starts (`None`: the end of the log).
    pub next: Option<u64>,
}

impl Broker {
    /// A page of `parent`'s audit records from sequence number `from`
    /// (read after a flush, so every record made before the request is
    /// included): at most `size` of them (0: the default), reading at most
    /// [`AUDIT_SCAN`] records of the log from its index, never the whole
    /// file.
    pub async fn audit_records(
        self: &Arc<Self>,
        parent: &str,
        q: AuditQuery,
        from: u64,
        size: usize,
    ) -> Result<AuditPage, BrokerError> {
        let size = match size {
            0 => DEFAULT_AUDIT_PAGE,
            n => n.min(MAX_AUDIT_PAGE),
        };
        let b = self.clone();
        let parent = parent.to_string();
        tokio::task::spawn_blocking(move || {
            let page = b
                .audit
                .page(from, size, AUDIT_SCAN, |r| visible_to(&parent, &q, r))
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            Ok(AuditPage {
                records: page.items,
                next: page.next,
            })
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("audit reader: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bubble_audit::Entry;

    fn rec(owner: &str, parent: &str) -> Record {
        Record {
            seq: 0,
            prev: [0; 32],
            entry: Entry {
                bubble: "b-1".into(),
                owner: owner.into(),
                parent: parent.into(),
                portion_digest: String::new(),
                at_ms: 10,
            },
            what: What::Security {
                kind: "foreign_access".into(),
            },
        }
    }

    #[test]
    fn each_side_sees_its_record_without_the_other_party() {
        let q = AuditQuery::default();
        // The owner sees the probe, not who probed.
        let o = visible_to("alice", &q, rec("alice", "mallory")).unwrap();
        assert_eq!(o.entry.parent, ANOTHER_PARENT);
        // The prober sees its request, not whose bubble it was.
        let m = visible_to("mallory", &q, rec("alice", "mallory")).unwrap();
        assert_eq!(
            (m.entry.owner.as_str(), m.entry.parent.as_str()),
            ("", "mallory")
        );
        // A third parent sees nothing.
        assert!(visible_to("carol", &q, rec("alice", "mallory")).is_none());
        // Filters.
        let later = AuditQuery {
            since_ms: 11,
            ..AuditQuery::default()
        };
        assert!(visible_to("alice", &later, rec("alice", "alice")).is_none());
        let other = AuditQuery {
            bubble_id: "b-2".into(),
            ..AuditQuery::default()
        };
        assert!(visible_to("alice", &other, rec("alice", "alice")).is_none());
    }
}
