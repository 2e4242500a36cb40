//! End to end on real KVM: a bubble that touched more than 1 GiB of guest
//! memory suspends and restores with every page intact. Its snapshot is
//! larger than the largest control frame (1 GiB), so it can only travel
//! in pieces (VMM → broker) and in `RESTORE_DATA` frames or direct writes
//! (broker → VMM). Both ways back (direct writes, and the socket fallback
//! forced by `restore_over_socket`) keep the broker's peak RSS far below
//! the snapshot's size.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;

/// Each portion fills its 64 MiB of linear memory (the policy's largest)
/// with its own byte and stamps every 4 KiB with its index; `check`
/// counts the stamps and bytes that are not where `fill` put them.
const FILLER: &str = r#"
(module
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $pattern (param $b i32) (result i32)
    (i32.mul (local.get $b) (i32.const 0x01010101)))
  (func (export "fill") (result i32)
    (local $b i32) (local $i i32)
    (drop (call $input_read (i32.const 0) (i32.const 1)))
    (local.set $b (i32.load8_u (i32.const 0)))
    (if (i32.eq (memory.grow (i32.const 1023)) (i32.const -1))
      (then (return (i32.const 1))))
    (memory.fill (i32.const 0) (local.get $b) (i32.const 67108864))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 16384)))
        (i32.store (i32.shl (local.get $i) (i32.const 12))
          (i32.xor (local.get $i) (call $pattern (local.get $b))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))
  (func (export "check") (result i32)
    (local $b i32) (local $i i32) (local $bad i32) (local $saved i32)
    (if (i32.ne (memory.size) (i32.const 1024)) (then (return (i32.const 2))))
    (local.set $saved (i32.load (i32.const 0)))
    (drop (call $input_read (i32.const 0) (i32.const 1)))
    (local.set $b (i32.load8_u (i32.const 0)))
    (i32.store (i32.const 0) (local.get $saved))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 16384)))
        (if (i32.ne (i32.load (i32.shl (local.get $i) (i32.const 12)))
                    (i32.xor (local.get $i) (call $pattern (local.get $b))))
          (then (local.set $bad (i32.add (local.get $bad) (i32.const 1)))))
        (if (i32.ne (i32.load8_u (i32.add (i32.shl (local.get $i) (i32.const 12)) (i32.const 100)))
                    (local.get $b))
          (then (local.set $bad (i32.add (local.get $bad) (i32.const 1)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 8) (local.get $bad))
    (drop (call $output_write (i32.const 8) (i32.const 4)))
    (i32.store (i32.const 8) (call $pattern (local.get $b)))
    (i32.const 0))
)
"#;

/// Portions a bubble may hold: 16 × 64 MiB = 1 GiB of filled memory, plus
/// the image, heap and mailbox pages: more than 1 GiB touched.
const PORTIONS: u8 = 16;

/// Total bytes of the frozen copies' chunks under `dir`.
fn stored_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            // Consumed chunks are deleted in the background meanwhile.
            let Ok(m) = e.metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with("chunk-") {
                total += m.len();
            }
        }
    }
    total
}

async fn all_intact(c: &mut Client, id: &str) {
    for k in 0..PORTIONS {
        let out = c
            .call(portion_call(id, &format!("p{k}"), "check", &[0x11 + k]))
            .await
            .unwrap()
            .into_inner()
            .output;
        assert_eq!(out, 0u32.to_le_bytes(), "portion p{k}: pages out of place");
    }
}

/// One 1.5 GiB bubble at a time in this binary.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bubble_with_more_than_a_gib_of_memory_suspends_and_restores_intact() {
    large_bubble(false).await;
}

/// The same over the socket fallback (`restore_over_socket`, as on a host
/// that refuses direct writes): still bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bubble_with_more_than_a_gib_restores_over_the_socket_in_bounded_memory() {
    large_bubble(true).await;
}

async fn large_bubble(over_socket: bool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: over_socket.then(|| "restore_over_socket = true\n".to_string()),
            ..Default::default()
        },
    );
    let mut c = broker.client().await;
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(pb::SecurityPolicy {
                credential_rate: None,
                fuel_per_call: 50_000_000,
                memory_limit_bytes: 64 << 20,
                call_deadline_ms: 60_000,
                max_output_bytes: 64,
                grants: vec![],
            }),
            ..create_req(1536)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    let id = b.bubble_id;
    let module = wat::parse_str(FILLER).unwrap();
    for k in 0..PORTIONS {
        let name = format!("p{k}");
        c.load_portion(pb::LoadPortionRequest {
            bubble_id: id.clone(),
            name: name.clone(),
            module: module.clone(),
        })
        .await
        .unwrap();
        c.call(portion_call(&id, &name, "fill", &[0x11 + k]))
            .await
            .unwrap();
    }
    all_intact(&mut c, &id).await;

    let t = Instant::now();
    let r = c
        .suspend_bubble(suspend_req(&id, b""))
        .await
        .unwrap()
        .into_inner();
    let suspend = t.elapsed();
    assert_eq!(r.state, SUSPENDED);
    // Chunks are the snapshot plus 28 bytes each: over 1 GiB of it.
    let stored = stored_bytes(&dir.path().join("store"));
    assert!(stored > 1 << 30, "only {stored} bytes stored");

    let t = Instant::now();
    let r = c
        .restore_bubble(restore_req(&id, b"", 0))
        .await
        .unwrap()
        .into_inner();
    let restore = t.elapsed();
    assert_eq!(r.state, READY, "{}", r.failure_reason);
    all_intact(&mut c, &id).await;
    let out = c
        .call(call_req(&id, "echo", b"after"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"after");
    // The consumed copy is gone.
    wait_until(
        "the consumed copy deleted",
        Duration::from_secs(30),
        || stored_bytes(&dir.path().join("store")),
        |n| *n == 0,
    )
    .await;
    // The broker never held the snapshot: its peak resident memory over
    // the suspend and the restore stays far below the 1 GiB it is (it
    // holds a few 1 MiB chunks at a time each way).
    let hwm_kib = peak_rss_kib(broker.pid());
    // Each path is the one asked for: neither fell back (a refused direct
    // write would have been logged).
    let log = std::fs::read_to_string(dir.path().join("broker.log")).unwrap();
    assert!(
        !log.contains("refused; streaming"),
        "a restore fell back to the socket"
    );
    eprintln!(
        "large bubble (over socket: {over_socket}): {stored} bytes stored; suspend {} ms, restore {} ms; broker peak RSS {} MiB",
        suspend.as_millis(),
        restore.as_millis(),
        hwm_kib / 1024
    );
    assert!(
        hwm_kib < 256 * 1024,
        "the broker's peak RSS was {hwm_kib} KiB for a {stored}-byte copy"
    );
}

/// A process's peak resident set (`VmHWM`), KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}
