//! Helpers for portion and frozen-copy tests.

use std::path::Path;

use bubble_proto::v1 as pb;

use crate::{restore_req, suspend_req, Client, Opts};

/// A call of `function` in portion `portion`.
pub fn portion_call(id: &str, portion: &str, function: &str, input: &[u8]) -> pb::CallRequest {
    pb::CallRequest {
        bubble_id: id.into(),
        op: function.into(),
        input: input.to_vec(),
        portion: portion.into(),
        ..Default::default()
    }
}

/// Options for a broker whose frozen-copy store is the local directory
/// `store` (shared with other brokers).
pub fn shared_store(store: &Path) -> Opts {
    Opts {
        args: vec!["--store".into(), store.display().to_string()],
        ..Default::default()
    }
}

/// Suspends a bubble under the broker's key, then restores it; fails the
/// test unless they answer SUSPENDED and then READY.
pub async fn suspend_and_restore(c: &mut Client, id: &str) {
    let s = c.suspend_bubble(suspend_req(id, b"")).await;
    let s = s
        .unwrap_or_else(|e| panic!("suspend {id}: {e:?}"))
        .into_inner();
    assert_eq!(
        s.state,
        pb::BubbleState::Suspended as i32,
        "{}",
        s.failure_reason
    );
    let r = c.restore_bubble(restore_req(id, b"", 0)).await;
    let r = r
        .unwrap_or_else(|e| panic!("restore {id}: {e:?}"))
        .into_inner();
    assert_eq!(
        r.state,
        pb::BubbleState::Ready as i32,
        "{}",
        r.failure_reason
    );
}
