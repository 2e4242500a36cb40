//! `security_accounting`: what the security manager adds to each call,
//! measured directly in this process (the guest and the gRPC path are
//! not in it).
//!
//! The accounting cannot be switched off, so instead of comparing calls
//! with and without it, this times the accounting's own steps, exactly as
//! the call path runs them, for a real bubble of the embedded broker with
//! a portion loaded: the throttle check of the caller, then
//! `observe_call` of a successful outcome
//! (`Broker::time_call_accounting`). The p50 and p99 are of portion
//! calls; a built-in `hmac` (a credential use, which also queues one audit
//! record) is an extra. Security *events* (a refused call) cost more (a
//! registry commit for the strike), but they are not per call.

use bubble_proto::v1 as pb;
use bubbled::core::security::AccountedCall;
use serde_json::json;

use super::Ctx;
use crate::stats::{round, stat, us, Stat};

const PORTION: &str = "(module (memory (export \"memory\") 1) \
    (func (export \"f\") (result i32) (i32.const 0)))";

/// Timed portion-call accountings (after a warm-up of a tenth as many).
const N: usize = 100_000;
/// Timed `hmac` accountings (each queues an audit record).
const N_HMAC: usize = 20_000;

pub(crate) async fn security_accounting(x: &mut Ctx) -> anyhow::Result<Stat> {
    let b =
        x.c.create_bubble(pb::CreateBubbleRequest {
            memory_mib: 16,
            ..x.create.clone()
        })
        .await?
        .into_inner();
    x.c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "p".into(),
        module: wat::parse_str(PORTION)?,
    })
    .await?;
    let broker = x.broker.clone();
    let id = b.bubble_id.clone();
    let (portion, hmac) =
        x.bh.spawn_blocking(move || {
            let time = |which, n| broker.time_call_accounting(&id, "p", which, n);
            time(AccountedCall::Portion, N / 10);
            let p = time(AccountedCall::Portion, N);
            let h = time(AccountedCall::Hmac, N_HMAC);
            (p, h)
        })
        .await?;
    let (Some(portion), Some(hmac)) = (portion, hmac) else {
        anyhow::bail!("the bench bubble vanished");
    };
    let mean = |v: &[std::time::Duration]| {
        us(v.iter().sum::<std::time::Duration>()) / v.len().max(1) as f64
    };
    let portion_mean = mean(&portion);
    let hmac_mean = mean(&hmac);
    let h = stat(hmac);
    let mut s = stat(portion);
    s.extra.insert("mean_us".into(), json!(round(portion_mean)));
    s.extra
        .insert("hmac_p50_us".into(), json!(round(us(h.p50))));
    s.extra
        .insert("hmac_p99_us".into(), json!(round(us(h.p99))));
    s.extra
        .insert("hmac_mean_us".into(), json!(round(hmac_mean)));
    x.c.delete_bubble(pb::BubbleRef {
        bubble_id: b.bubble_id,
    })
    .await?;
    Ok(s)
}
