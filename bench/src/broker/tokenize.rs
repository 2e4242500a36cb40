//! The payments portion's tokenize call: one parent with a plaintext and
//! with a sealed input (in a sealed session), and four parents at once.

use std::time::Instant;

use bubble_proto::v1 as pb;
use bubbled::client;
use serde_json::json;

use super::helpers::{payments_bubble, time_calls, tokenize_req};
use super::{Ctx, Results};
use crate::stats::{round, stat};

/// `call_tokenize` and `call_tokenize_sealed` (`calls` calls each) and
/// `tokenize_4_parents`, as wanted.
pub(crate) async fn run(
    x: &mut Ctx,
    want: &dyn Fn(&str) -> bool,
    calls: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let bubble = payments_bubble(&x.c, &x.create).await?;
    let one = bubble.id().to_string();
    if want("call_tokenize") {
        let req = tokenize_req(&one);
        results.insert(
            "call_tokenize",
            stat(time_calls(&mut x.c, &req, calls, 32).await?),
        );
    }
    if want("call_tokenize_sealed") {
        results.insert(
            "call_tokenize_sealed",
            time_sealed_calls(&mut x.c, &bubble, calls).await?,
        );
    }
    if want("tokenize_4_parents") {
        // Four parents, each with its own connection and bubble,
        // tokenizing concurrently for a fixed count.
        let mut ids = vec![one.clone()];
        for _ in 0..3 {
            ids.push(payments_bubble(&x.c, &x.create).await?.id().to_string());
        }
        let per = 1000usize;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for id in ids.clone() {
            let sock = x.sock.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client::connect_unix(&sock).await?;
                let req = tokenize_req(&id);
                let mut v = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    c.call(req.clone()).await?;
                    v.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(v)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let secs = start.elapsed().as_secs_f64();
        let mut s = stat(all);
        s.extra
            .insert("per_sec".into(), json!(round(s.n as f64 / secs)));
        s.extra.insert("parents".into(), json!(4));
        results.insert("tokenize_4_parents", s);
        for id in ids.into_iter().skip(1) {
            x.c.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
        }
    }
    x.c.delete_bubble(pb::BubbleRef { bubble_id: one }).await?;
    Ok(())
}

/// 200 warm-up calls, then `n` timed tokenize calls whose card number the
/// client encrypts for the bubble in its sealed session (one HPKE setup on
/// the first call, then an AES-256-GCM seal and a fresh sequence number per
/// call, inside the timing: the cost a parent pays). The sealing alone is
/// reported as `seal_p50_us`.
async fn time_sealed_calls(
    c: &mut client::Client,
    bubble: &bubble_client::Bubble,
    n: usize,
) -> anyhow::Result<crate::stats::Stat> {
    let pan = b"4111111111111111";
    let (mut v, mut seals) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..(200 + n) {
        let t = Instant::now();
        let sealed = bubble.seal_session_input("payments", "tokenize", pan)?;
        let sealed_at = t.elapsed();
        let session = sealed.session_id;
        let r = c
            .call(pb::CallRequest {
                bubble_id: bubble.id().to_string(),
                op: "tokenize".into(),
                portion: "payments".into(),
                session_input: Some(sealed),
                ..Default::default()
            })
            .await?
            .into_inner();
        bubble.session_accepted(session);
        if i >= 200 {
            v.push(t.elapsed());
            seals.push(sealed_at);
        }
        anyhow::ensure!(r.output.len() == 32);
    }
    let mut s = stat(v);
    let seal = stat(seals);
    s.extra.insert(
        "seal_p50_us".into(),
        json!(round(crate::stats::us(seal.p50))),
    );
    Ok(s)
}
