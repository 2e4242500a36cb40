//! Suspend and restore of a 64 MiB and a 512 MiB bubble.

use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;
use serde_json::json;

use super::helpers::{dir_size, TOUCH_WAT};
use super::{Ctx, Results};
use crate::stats::{round, stat};
use crate::Opts;

/// `suspend_*` and `restore_*`, as wanted.
pub(crate) async fn suspend_restore(
    x: &mut Ctx,
    want: &dyn Fn(&str) -> bool,
    opts: &Opts,
    results: &mut Results,
) -> anyhow::Result<()> {
    for (mem, touch, sname, rname) in [
        (64u32, 3u32, "suspend_64m", "restore_64m"),
        (512, 62, "suspend_512m", "restore_512m"),
    ] {
        if !(want(sname) || want(rname)) {
            continue;
        }
        // A bubble with `touch` MiB of touched memory (a portion writes one
        // byte per page of its grown linear memory).
        let mut c2 = x.c.clone();
        let b = c2
            .create_bubble(pb::CreateBubbleRequest {
                memory_mib: mem,
                policy: Some(pb::SecurityPolicy {
                    credential_rate: None,
                    memory_limit_bytes: (touch + 2) << 20,
                    fuel_per_call: 100_000_000,
                    ..Default::default()
                }),
                ..x.create.clone()
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            b.state == pb::BubbleState::Ready as i32,
            "{}",
            b.failure_reason
        );
        let id = b.bubble_id.clone();
        c2.load_portion(pb::LoadPortionRequest {
            bubble_id: id.clone(),
            name: "touch".into(),
            module: wat::parse_str(TOUCH_WAT)?,
        })
        .await?;
        c2.call(pb::CallRequest {
            bubble_id: id.clone(),
            op: "touch".into(),
            portion: "touch".into(),
            input: touch.to_le_bytes().to_vec(),
            ..Default::default()
        })
        .await?;
        let (mut sv, mut rv) = (Vec::new(), Vec::new());
        let mut bytes = 0u64;
        let samples = if mem == 64 { opts.restores } else { 10 };
        for _ in 0..samples {
            let t = Instant::now();
            c2.suspend_bubble(pb::SuspendBubbleRequest {
                bubble_id: id.clone(),
                kek: vec![],
            })
            .await?;
            sv.push(t.elapsed());
            bytes = dir_size(&x.dir.join("store/frozen").join(&id));
            // A parent restores later, not in the same millisecond: let the
            // suspend's background work (store writeback, spare VMM refill)
            // finish first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = Instant::now();
            let r = c2
                .restore_bubble(pb::RestoreBubbleRequest {
                    bubble_id: id.clone(),
                    kek: vec![],
                    generation: 0,
                })
                .await?
                .into_inner();
            rv.push(t.elapsed());
            anyhow::ensure!(r.state == pb::BubbleState::Ready as i32);
        }
        let mb = bytes as f64 / 1e6;
        for (name, v) in [(sname, sv), (rname, rv)] {
            let mut s = stat(v);
            s.extra.insert("frozen_mb".into(), json!(round(mb)));
            s.extra
                .insert("mb_per_s".into(), json!(round(mb / s.p50.as_secs_f64())));
            s.extra.insert("touched_mib".into(), json!(touch));
            s.extra
                .insert("over_socket".into(), json!(opts.restore_over_socket));
            results.insert(name, s);
        }
        c2.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
    }
    Ok(())
}
