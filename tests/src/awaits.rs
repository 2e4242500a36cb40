//! Shared pieces of the await-and-freeze tests (`awaits.rs`,
//! `await_ends.rs`): a portion that awaits, triggers, results, and two
//! brokers on one store.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;

use crate::moto::{http, s3_env, start_moto, Moto};
use crate::*;

/// How long a test waits for a step.
pub const LIMIT: Duration = Duration::from_secs(30);
/// The SUSPENDED state.
pub const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;

/// `pay`: writes its input (the key it then awaits) to the output, awaits
/// that key (60 s; `pay_short`: 1.5 s), then writes `|` and the event's
/// payload, or `|timeout`. A key the host function refuses: status 3.
pub const AWAIT_WAT: &str = r#"
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "bubble_v1" "await_event" (func $await (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "|timeout")
  (data (i32.const 920) "|")
  (func $run (param $t i32) (result i32)
    (local $n i32) (local $r i32)
    (local.set $n (call $input_len))
    (if (i32.gt_s (local.get $n) (i32.const 800)) (then (return (i32.const 2))))
    (drop (call $input_read (i32.const 0) (local.get $n)))
    (drop (call $output_write (i32.const 0) (local.get $n)))
    (local.set $r (call $await (i32.const 0) (local.get $n) (local.get $t)
                            (i32.const 1024) (i32.const 4096)))
    (if (i32.eq (local.get $r) (i32.const -4))
      (then (drop (call $output_write (i32.const 900) (i32.const 8)))
            (return (i32.const 0))))
    (if (i32.lt_s (local.get $r) (i32.const 0)) (then (return (i32.const 3))))
    (drop (call $output_write (i32.const 920) (i32.const 1)))
    (drop (call $output_write (i32.const 1024) (local.get $r)))
    (i32.const 0))
  (func (export "pay") (result i32) (call $run (i32.const 60000)))
  (func (export "pay_short") (result i32) (call $run (i32.const 1500)))
)
"#;

/// A 16 MiB bubble with the await portion loaded as `aw`.
pub async fn await_bubble(c: &mut Client) -> String {
    let b = c
        .create_bubble(create_req(16))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        b.state,
        pb::BubbleState::Ready as i32,
        "{}",
        b.failure_reason
    );
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "aw".into(),
        module: wat::parse_str(AWAIT_WAT).unwrap(),
    })
    .await
    .expect("load portion");
    b.bubble_id
}

/// A signed direct call of the await portion's `function` with input
/// `key`, which must answer that it awaits `key`: the call's response.
pub async fn signed_await(
    c: &mut Client,
    bubble: &str,
    function: &str,
    key: &str,
) -> pb::CallResponse {
    let r = c
        .call(pb::CallRequest {
            portion: "aw".into(),
            sign: true,
            ..call_req(bubble, function, key.as_bytes())
        })
        .await
        .expect("call")
        .into_inner();
    assert_eq!(r.awaiting.as_ref().expect("awaiting").key, key);
    r
}
/// A trigger on `subject` running `aw.<function>` in `bubble`.
pub async fn trigger(c: &mut Client, subject: &str, bubble: &str, function: &str) -> String {
    c.create_trigger(pb::CreateTriggerRequest {
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "aw".into(),
        function: function.into(),
        ..Default::default()
    })
    .await
    .expect("create trigger")
    .into_inner()
    .trigger_id
}

/// The result of `key` (outcome "pending" until there is one).
pub async fn result(c: &mut Client, trigger: &str, key: &str) -> pb::EventResult {
    c.get_result(pb::GetResultRequest {
        trigger_id: trigger.into(),
        key: key.into(),
    })
    .await
    .expect("get result")
    .into_inner()
}

/// Waits for a result of `key` other than pending; fails after `limit`.
pub async fn wait_result(
    c: &mut Client,
    trigger: &str,
    key: &str,
    limit: Duration,
) -> pb::EventResult {
    wait_result_in(c, trigger, key, limit, None).await
}

/// [`wait_result`], showing the log of the broker on `dir` on failure.
pub async fn wait_result_in(
    c: &mut Client,
    trigger: &str,
    key: &str,
    limit: Duration,
    dir: Option<&Path>,
) -> pb::EventResult {
    let end = Instant::now() + limit;
    loop {
        let r = result(c, trigger, key).await;
        if r.outcome != "pending" {
            return r;
        }
        assert!(
            Instant::now() < end,
            "no result for {key} within {limit:?}; broker log:\n{}",
            dir.map(|d| std::fs::read_to_string(d.join("broker.log")).unwrap_or_default())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks an ok result: signed by the bubble (key `pk`) over the original
/// call (`aw.<function>` with `input`), output `want`.
pub fn verify(pk: &[u8; 32], r: &pb::EventResult, function: &str, input: &[u8], want: &[u8]) {
    assert_eq!(r.outcome, "ok", "{r:?}");
    let frame = bubble_abi::ops::PortionCall {
        portion: "aw",
        function,
        input,
    }
    .encode()
    .unwrap();
    let plain = bubble_keys::verify_and_open_result(
        pk,
        &r.bubble_id,
        r.call_id,
        &frame,
        &r.output,
        &r.signature,
        None,
    )
    .expect("the resumed result's signature verifies");
    assert_eq!(plain.expose(), want);
}

/// Waits until `bubble` is SUSPENDED and no VMM runs under `dir`.
pub async fn wait_frozen(c: &mut Client, dir: &Path, bubble: &str) {
    let b = wait_for(c, bubble, LIMIT, |b| b.state == SUSPENDED).await;
    assert!(
        no_vmms_within(dir, LIMIT).await,
        "the awaiting bubble's VMM still runs"
    );
    // The suspend is over once its claim is given back (logged right
    // after): a broker killed before that keeps the copy its own until it
    // restarts (a suspend claim never expires for other brokers).
    let generation = format!("generation={}", b.generation);
    log_line(dir, &["bubble suspended", bubble, &generation]).await;
}

/// A moto S3 server with bucket `awaits`, or `None` after reporting the
/// missing dependency.
pub fn moto() -> Option<(Moto, u16)> {
    match start_moto() {
        Ok((m, port)) => {
            let created = http(port, "PUT", "/awaits").unwrap_or_default();
            assert!(created.starts_with("HTTP/1.1 200"), "{created}");
            Some((m, port))
        }
        Err(e) => {
            missing_dependency(&format!("no S3-compatible server: {e}"));
            None
        }
    }
}

/// Two brokers on one moto store, sharing the key-encryption key (B gets a
/// copy of A's), each with the same trigger on `pay` (B's on a bubble of
/// its own, which never sees the await).
pub struct Pair {
    /// The S3 server (none: a local store directory).
    pub _moto: Option<Moto>,
    /// The store directory of a local pair.
    pub _store: Option<tempfile::TempDir>,
    /// The brokers' data dirs.
    pub dirs: [tempfile::TempDir; 2],
    /// The brokers.
    pub brokers: [BrokerProc; 2],
    /// How to start either broker again (no fault point).
    pub opts: Opts,
}

/// [`pair_on`] on moto, no fault point.
pub fn pair() -> Option<Pair> {
    pair_with(None)
}

/// [`pair_on`] on moto, broker A pausing at fault point `pause_a`
/// (`point=ms`).
pub fn pair_with(pause_a: Option<&str>) -> Option<Pair> {
    pair_on(true, [pause_a, None], "")
}

/// Two brokers on one store — moto (`s3`) or a local directory — sharing
/// the key-encryption key (B gets a copy of A's), with a 3 s claim lease,
/// `pause[i]` as broker i's fault points and `config` added to both
/// configurations. `None` after reporting a missing moto.
pub fn pair_on(s3: bool, pause: [Option<&str>; 2], config: &str) -> Option<Pair> {
    let (moto, store, url) = if s3 {
        let (moto, port) = moto()?;
        (
            Some(moto),
            None,
            format!("s3://awaits/shared?endpoint=http://127.0.0.1:{port}"),
        )
    } else {
        let store = tempfile::tempdir().unwrap();
        let url = store.path().join("store").display().to_string();
        (None, Some(store), url)
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let opts = || Opts {
        args: vec!["--store".into(), url.clone()],
        env: if s3 { s3_env() } else { Vec::new() },
        config: Some(format!("claim_lease_ms = 3000\n{config}")),
        ..Default::default()
    };
    let with_pause = |i: usize| {
        let mut o = opts();
        if let Some(p) = pause[i] {
            o.env.push(("BUBBLED_TEST_PAUSE".into(), p.into()));
        }
        o
    };
    let a = BrokerProc::start_with(dirs[0].path(), with_pause(0));
    let kek = dirs[1].path().join("kek");
    std::fs::copy(dirs[0].path().join("kek"), &kek).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let b = BrokerProc::start_with(dirs[1].path(), with_pause(1));
    Some(Pair {
        _moto: moto,
        _store: store,
        dirs,
        brokers: [a, b],
        opts: opts(),
    })
}

/// The first line of the broker log on `dir` with every one of `words`;
/// waits for it (fails the test after 30 s).
pub async fn log_line(dir: &Path, words: &[&str]) -> String {
    let until = Instant::now() + LIMIT;
    loop {
        let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return l.to_string();
        }
        assert!(Instant::now() < until, "the broker never logged {words:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
