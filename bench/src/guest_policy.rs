//! `set_policy_guest`: where the cost of an attach with a policy goes,
//! without a broker: the guest shim booted in this process (no jail, no
//! VMM process, no gRPC), then its `set_policy` call timed on a freshly
//! booted bubble (what an attach from the pool does) and on one whose
//! portion runtime was created first (by a `portion` call naming no loaded
//! portion, which answers UNKNOWN_OP and changes nothing else). An `echo`
//! on the same bubble is the call floor.

use std::time::{Duration, Instant};

use anyhow::Context;
use bubble_vmm::abi::{self, ops};
use bubble_vmm::bubble::{Answer, Bubble};
use bubble_vmm::images::GuestImage;
use bubble_vmm::process::build_vm;
use serde_json::json;

use crate::stats::{round, stat, us, Stat};

fn booted() -> anyhow::Result<Bubble> {
    let vm = build_vm(&GuestImage::Shim, 16 << 20, 1 << 20, None).context("vm")?;
    let mut b = Bubble::new(vm);
    b.boot(&mut |_| {}).context("boot")?;
    Ok(b)
}

fn timed(b: &mut Bubble, op: &str, input: &[u8]) -> anyhow::Result<(Duration, Answer)> {
    let t = Instant::now();
    let a = b.call(op, input, &mut |_| {}).context(op.to_string())?;
    Ok((t.elapsed(), a))
}

pub(crate) fn set_policy_guest() -> anyhow::Result<Stat> {
    let policy = abi::SecurityPolicy {
        grants: vec![(
            "payments".into(),
            vec!["tokenization_key".into(), "gateway_key".into()],
        )],
        ..Default::default()
    }
    .encode();
    let probe = ops::PortionCall {
        portion: "none",
        function: "f",
        input: &[],
    }
    .encode()
    .map_err(|e| anyhow::anyhow!("probe frame: {e:?}"))?;
    let (mut fresh, mut echo, mut prewarm, mut after) = (vec![], vec![], vec![], vec![]);
    for _ in 0..50 {
        let mut b = booted()?;
        echo.push(timed(&mut b, ops::OP_ECHO, &[0; 64])?.0);
        let (d, a) = timed(&mut b, ops::OP_SET_POLICY, &policy)?;
        anyhow::ensure!(matches!(a, Answer::Output(_)), "set_policy: {a:?}");
        fresh.push(d);

        let mut b = booted()?;
        let (d, a) = timed(&mut b, ops::OP_PORTION, &probe)?;
        anyhow::ensure!(matches!(a, Answer::Rejected(..)), "probe: {a:?}");
        prewarm.push(d);
        let (d, a) = timed(&mut b, ops::OP_SET_POLICY, &policy)?;
        anyhow::ensure!(matches!(a, Answer::Output(_)), "set_policy: {a:?}");
        after.push(d);
    }
    let mut s = stat(fresh);
    for (k, v) in [
        ("echo_p50_us", echo),
        ("runtime_creation_p50_us", prewarm),
        ("set_policy_prewarmed_p50_us", after),
    ] {
        s.extra.insert(k.into(), json!(round(us(stat(v).p50))));
    }
    Ok(s)
}
