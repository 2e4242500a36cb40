//! Fault injection for crash tests (built only with the `fault-injection`
//! feature, which only the end-to-end tests enable): named points where the
//! broker pauses, logs that it got there, and so lets a test kill it at
//! exactly that step.
//!
//! `BUBBLED_TEST_PAUSE=point=ms[,point=ms…]`; the points are
//! `create.booted` (a create's record durable and its guest READY, its
//! security policy not yet installed),
//! `suspend.stored` (frozen copy durable, registry not yet SUSPENDED) and
//! `suspend.committed` (registry SUSPENDED, VMM not yet stopped),
//! `restore.claimed` (the frozen copy's claim taken, nothing started) and
//! `restore.loaded` (the copy is in a new VMM, whose pid the log line
//! names; the claim is not yet committed), `restore.committed` (the
//! claim committed, the registry not yet READY), `event.taken` (a
//! trigger's worker holds an event, fetched or handed over by its
//! publish, and has run nothing of it), `await.restored` (an await's
//! frozen copy restored and READY here, RESUME not yet sent), `await.read`
//! (an event read its key's await, before it takes the await here).
//!
//! `BUBBLED_TEST_FAIL=point[,point…]` makes a step fail instead
//! ([`fails`]): `attach.set_policy` (installing an attaching parent's
//! policy in a pooled bubble).

use std::time::Duration;

/// Pauses at `point` if the test asked for it.
pub async fn pause(point: &str) {
    let Ok(spec) = std::env::var("BUBBLED_TEST_PAUSE") else {
        return;
    };
    let ms = spec.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == point).then(|| v.parse::<u64>().ok()).flatten()
    });
    if let Some(ms) = ms {
        tracing::warn!(point, ms, "fault point reached");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Pauses at `point` like [`pause`], naming a VMM's pid in the log line.
pub async fn pause_pid(point: &str, vmm_pid: u32) {
    if std::env::var("BUBBLED_TEST_PAUSE").is_ok_and(|s| s.contains(point)) {
        tracing::warn!(point, vmm_pid, "fault point at a VMM");
    }
    pause(point).await;
}

/// Whether the test asked step `point` to fail.
pub fn fails(point: &str) -> bool {
    std::env::var("BUBBLED_TEST_FAIL").is_ok_and(|s| s.split(',').any(|p| p == point))
}
