//! `bubble-bench`: measures bubbled against raw KVM floors in one run.
//!
//! ```text
//! cargo run --release -p bubble-bench -- [--json FILE] [--only METRIC...]
//! ```
//!
//! Floors (no broker): `raw_kvm_floor` (create VM + vCPU + memory, enter a
//! minimal CPL-3 guest, until its first exit) and `raw_exit_rtt` (one CPL-3
//! exit round trip, averaged over batches, 10,000 exits in all). Through the
//! broker (gRPC over its Unix socket): `create_to_ready` (cold
//! CreateBubble until READY) and `call_echo_64b` (Call round trip, 64-byte
//! echo; the same calls with the broker's answer polling off are the
//! baseline in the same run). Prints p50/p99 and the ratios to the floors;
//! `--json` writes an object keyed by metric with `p50_us`, `p99_us` and
//! `n`.
//!
//! The broker runs in this process on a runtime of its own (one worker per
//! core, as `bubbled` has) and the client on a current-thread runtime,
//! like a parent process of its own: sharing one runtime made client and
//! broker tasks compete for the same two threads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bubbled::client;

use anyhow::Context;
use bubble_proto::v1 as pb;
use bubbled::config::BrokerConfig;
use bubbled::core::Broker;
use bubbled::demo::percentile;
use bubbled::server;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "bubble-bench")]
struct Opts {
    /// Write results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these metrics (default: all).
    #[arg(long, num_args = 1..)]
    only: Vec<String>,
    /// Samples for create_to_ready.
    #[arg(long, default_value_t = 40)]
    creates: usize,
    /// Samples for call_echo_64b.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
}

/// One metric's samples summarized.
struct Stat {
    p50: Duration,
    p99: Duration,
    n: usize,
    extra: BTreeMap<String, Value>,
}

fn stat(mut v: Vec<Duration>) -> Stat {
    v.sort();
    Stat {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        n: v.len(),
        extra: BTreeMap::new(),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

const ALL: &[&str] = &[
    "raw_kvm_floor",
    "raw_exit_rtt",
    "verify_report",
    "get_attestation",
    "call_tokenize",
    "tokenize_4_parents",
    "attach_warm",
    "density_1000",
    "suspend_64m",
    "restore_64m",
    "suspend_512m",
    "restore_512m",
    "create_to_ready",
    "call_echo_64b",
    "load_8_parents",
];

fn main() -> anyhow::Result<()> {
    bubbled::vmm_entry_if_requested();
    let opts = Opts::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        bubbled::daemon::init_logging(false);
    }
    for m in &opts.only {
        anyhow::ensure!(
            ALL.contains(&m.as_str()),
            "unknown metric {m:?}; known: {ALL:?}"
        );
    }
    let want = |m: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == m);
    let mut results: BTreeMap<&str, Stat> = BTreeMap::new();

    if want("raw_kvm_floor") {
        // Warm up the page cache and KVM module paths first.
        for _ in 0..5 {
            bubble_vmm::floor::raw_kvm_floor()?;
        }
        let mut v = Vec::new();
        let mut prepared = Vec::new();
        for _ in 0..100 {
            v.push(bubble_vmm::floor::raw_kvm_floor()?);
            prepared.push(bubble_vmm::floor::raw_kvm_floor_prepared()?);
        }
        let mut s = stat(v);
        s.extra.insert(
            "prepared_p50_us".into(),
            json!(round(us(stat(prepared).p50))),
        );
        results.insert("raw_kvm_floor", s);
    }
    if want("raw_exit_rtt") {
        // 20 batches of 500 exits: 10,000 exits; each sample is a batch mean.
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(bubble_vmm::floor::raw_exit_rtt(500)?);
        }
        let mut s = stat(v);
        s.extra.insert("exits".into(), json!(10_000));
        results.insert("raw_exit_rtt", s);
    }
    if want("verify_report") {
        // Offline verification of the real Milan report from Google Cloud
        // with its VCEK against AMD's built-in roots.
        let data =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/snp-real");
        let report = std::fs::read(data.join("gcp-milan-report.bin"))?;
        let vcek =
            bubble_attestation::verify::cert_der(&std::fs::read(data.join("gcp-milan-vcek.pem"))?)?;
        let mut v = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            let r = bubble_attestation::Report::parse(&report)?;
            bubble_attestation::verify_amd(&r, &vcek, None)?;
            v.push(t.elapsed());
        }
        results.insert("verify_report", stat(v));
    }
    if [
        "create_to_ready",
        "call_echo_64b",
        "get_attestation",
        "call_tokenize",
        "tokenize_4_parents",
        "attach_warm",
        "density_1000",
        "suspend_64m",
        "restore_64m",
        "suspend_512m",
        "restore_512m",
        "load_8_parents",
    ]
    .iter()
    .any(|m| want(m))
    {
        // The broker runs on a runtime of its own (see EmbeddedBroker); the
        // parent (this client) on a current-thread runtime, as a separate
        // parent process would.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(through_broker(&opts, &want, &mut results))?;
    }

    print_results(&results);
    if let Some(path) = &opts.json {
        let mut obj = serde_json::Map::new();
        for (k, s) in &results {
            let mut m = serde_json::Map::new();
            m.insert("p50_us".into(), json!(round(us(s.p50))));
            m.insert("p99_us".into(), json!(round(us(s.p99))));
            m.insert("n".into(), json!(s.n));
            for (ek, ev) in &s.extra {
                m.insert(ek.clone(), ev.clone());
            }
            obj.insert(k.to_string(), Value::Object(m));
        }
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Value::Object(obj))? + "\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

async fn through_broker(
    opts: &Opts,
    want: &dyn Fn(&str) -> bool,
    results: &mut BTreeMap<&'static str, Stat>,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("bubble-bench-").tempdir()?;
    let mut cfg = BrokerConfig::new(dir.path().to_path_buf())?;
    cfg.quota.max_bubbles_per_parent = 2000;
    cfg.quota.max_memory_mib_per_parent = 1 << 20;
    cfg.pools = vec![bubbled::config::PoolProfile {
        name: "warm".into(),
        memory_mib: 16,
        size: if want("attach_warm") { 4 } else { 0 },
        image: "shim".into(),
        idle_timeout_s: 0,
        idle_action: Default::default(),
    }];
    let answer_poll_us = cfg.answer_poll_us;
    let embedded = bubbled::demo::EmbeddedBroker::start(cfg).await?;
    let (broker, sock, bh) = (
        embedded.broker.clone(),
        embedded.socket.clone(),
        embedded.handle(),
    );
    let mut c = client::connect_unix(&sock).await?;
    let create = pb::CreateBubbleRequest {
        idle: None,
        policy: None,
        client_request_id: String::new(),
        memory_mib: 64,
        vcpus: 1,
        image: String::new(),
    };
    if want("create_to_ready") {
        if want("attach_warm") {
            wait_pool(&broker, 4).await;
        }
        let mut v = Vec::new();
        for _ in 0..opts.creates {
            let t = Instant::now();
            let b = c.create_bubble(create.clone()).await?.into_inner();
            v.push(t.elapsed());
            anyhow::ensure!(
                b.state == pb::BubbleState::Ready as i32,
                "{}",
                b.failure_reason
            );
            c.delete_bubble(pb::BubbleRef {
                bubble_id: b.bubble_id,
            })
            .await?;
        }
        results.insert("create_to_ready", stat(v));
    }
    if want("call_echo_64b") {
        let b = c.create_bubble(create.clone()).await?.into_inner();
        let req = pb::CallRequest {
            bubble_id: b.bubble_id.clone(),
            op: "echo".into(),
            input: vec![0xa5; 64],
            deadline_ms: 0,
            ..Default::default()
        };
        // Baseline in the same run: the same calls with the broker's answer
        // polling off (its thread sleeps until the VMM answers).
        bubble_vmm_client::set_answer_poll(Duration::ZERO);
        let sleeping = stat(time_calls(&mut c, &req, opts.calls, 64).await?);
        bubble_vmm_client::set_answer_poll(Duration::from_micros(u64::from(answer_poll_us)));
        let m0 = broker.scrape();
        let mut s = stat(time_calls(&mut c, &req, opts.calls, 64).await?);
        s.extra.insert(
            "answer_poll_off_p50_us".into(),
            json!(round(us(sleeping.p50))),
        );
        s.extra.insert(
            "answer_poll_off_p99_us".into(),
            json!(round(us(sleeping.p99))),
        );
        let m = broker.scrape();
        let delta = |k: &str| metric_value(&m, k) - metric_value(&m0, k);
        let broker_mean =
            delta("bubbled_call_seconds_sum") / delta("bubbled_call_seconds_count").max(1.0);
        s.extra.insert(
            "broker_side_mean_us".into(),
            json!(round(broker_mean * 1e6)),
        );
        results.insert("call_echo_64b", s);
        c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id,
        })
        .await?;
    }
    if want("get_attestation") {
        let b = c.create_bubble(create.clone()).await?.into_inner();
        let mut v = Vec::new();
        for i in 0..200u32 {
            let t = Instant::now();
            let a = c
                .get_attestation(pb::GetAttestationRequest {
                    bubble_id: b.bubble_id.clone(),
                    nonce: [i.to_le_bytes(); 8].concat(),
                })
                .await?
                .into_inner();
            v.push(t.elapsed());
            anyhow::ensure!(a.report.len() == 1184);
        }
        results.insert("get_attestation", stat(v));
        c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id,
        })
        .await?;
    }
    if want("call_tokenize") || want("tokenize_4_parents") {
        let one = payments_bubble(&c, &create).await?;
        if want("call_tokenize") {
            let req = tokenize_req(&one);
            results.insert(
                "call_tokenize",
                stat(time_calls(&mut c, &req, opts.calls, 32).await?),
            );
        }
        if want("tokenize_4_parents") {
            // Four parents, each with its own connection and bubble,
            // tokenizing concurrently for a fixed count.
            let mut ids = vec![one.clone()];
            for _ in 0..3 {
                ids.push(payments_bubble(&c, &create).await?);
            }
            let per = 1000usize;
            let start = Instant::now();
            let mut tasks = Vec::new();
            for id in ids.clone() {
                let sock = sock.clone();
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
                c.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
            }
        }
        c.delete_bubble(pb::BubbleRef { bubble_id: one }).await?;
    }
    if want("attach_warm") {
        let mut v = Vec::new();
        let mut idle_first = Vec::new();
        for _ in 0..100 {
            // Let the pool refill so that every sample is a warm attach.
            wait_pool(&broker, 4).await;
            let t0 = Instant::now();
            c.list_bubbles(pb::ListBubblesRequest {
                include_deleted: false,
                ..Default::default()
            })
            .await?;
            idle_first.push(t0.elapsed());
            let t = Instant::now();
            let b = c
                .attach_bubble(pb::AttachBubbleRequest {
                    profile: "warm".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            v.push(t.elapsed());
            anyhow::ensure!(b.state == pb::BubbleState::Ready as i32);
            c.delete_bubble(pb::BubbleRef {
                bubble_id: b.bubble_id,
            })
            .await?;
        }
        let mut s = stat(v);
        let m = broker.scrape();
        s.extra.insert(
            "pool_misses".into(),
            json!(metric_value(&m, "bubbled_pool_misses_total")),
        );
        let server_mean = metric_value(&m, "bubbled_attach_seconds_sum")
            / metric_value(&m, "bubbled_attach_seconds_count").max(1.0);
        s.extra.insert(
            "broker_side_mean_us".into(),
            json!(round(server_mean * 1e6)),
        );
        s.extra.insert(
            "first_rpc_after_idle_p50_us".into(),
            json!(round(us(stat(idle_first).p50))),
        );
        results.insert("attach_warm", s);
    }
    for (mem, touch, sname, rname) in [
        (64u32, 3u32, "suspend_64m", "restore_64m"),
        (512, 62, "suspend_512m", "restore_512m"),
    ] {
        if !(want(sname) || want(rname)) {
            continue;
        }
        // A bubble with `touch` MiB of touched memory (a portion writes one
        // byte per page of its grown linear memory).
        let mut c2 = c.clone();
        let b = c2
            .create_bubble(pb::CreateBubbleRequest {
                memory_mib: mem,
                policy: Some(pb::SecurityPolicy {
                    memory_limit_bytes: (touch + 2) << 20,
                    fuel_per_call: 100_000_000,
                    ..Default::default()
                }),
                ..create.clone()
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
        let samples = if mem == 64 { 30 } else { 10 };
        for _ in 0..samples {
            let t = Instant::now();
            c2.suspend_bubble(pb::SuspendBubbleRequest {
                bubble_id: id.clone(),
                kek: vec![],
            })
            .await?;
            sv.push(t.elapsed());
            bytes = dir_size(&dir.path().join("store/frozen").join(&id));
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
            results.insert(name, s);
        }
        c2.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
    }
    if want("density_1000") {
        let n = 1000usize;
        let small = pb::CreateBubbleRequest {
            memory_mib: 4,
            ..create.clone()
        };
        let start = Instant::now();
        let mut ids = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let b = c.create_bubble(small.clone()).await?.into_inner();
            v.push(t.elapsed());
            anyhow::ensure!(
                b.state == pb::BubbleState::Ready as i32,
                "{}",
                b.failure_reason
            );
            ids.push((b.bubble_id, b.vmm_pid));
        }
        let created_s = start.elapsed().as_secs_f64();
        // Every bubble still answers.
        for (id, _) in ids.iter().step_by(50) {
            c.call(pb::CallRequest {
                bubble_id: id.clone(),
                op: "echo".into(),
                input: b"alive".to_vec(),
                ..Default::default()
            })
            .await?;
        }
        let (mut rss, mut guest, mut guest_pss) = (0u64, 0u64, 0u64);
        for (_, pid) in &ids {
            let (r, g, gp) = rss_kib(*pid, 4 << 10);
            rss += r;
            guest += g;
            guest_pss += gp;
        }
        let mut s = stat(v);
        s.extra.insert("bubbles".into(), json!(n));
        s.extra
            .insert("create_all_s".into(), json!(round(created_s)));
        s.extra
            .insert("rss_per_bubble_kib".into(), json!(rss / n as u64));
        s.extra
            .insert("rss_measure".into(), json!("PSS of each VMM process"));
        s.extra.insert(
            "guest_touched_per_bubble_kib".into(),
            json!(guest / n as u64),
        );
        s.extra.insert(
            "guest_pss_per_bubble_kib".into(),
            json!(guest_pss / n as u64),
        );
        // What a bubble costs beyond its guest pages: the process's PSS
        // minus the PSS of its guest memory (shared image pages count as
        // their share in both).
        s.extra.insert(
            "rss_beyond_guest_per_bubble_kib".into(),
            json!(rss.saturating_sub(guest_pss) / n as u64),
        );
        results.insert("density_1000", s);
        for (id, _) in ids {
            c.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
        }
    }
    if want("load_8_parents") {
        // `bubblectl load` against this broker over mutual TLS on loopback:
        // 8 parents, each 10 rounds of attach/create, calls, delete, plus
        // 500 steady calls on a bubble of its own.
        let pki = dir.path().join("pki");
        bubbled::pki::init(&pki, &[])?;
        let listener = bh.spawn(server::bind_tcp("127.0.0.1:0".parse()?)).await??;
        let port = listener.local_addr()?.port();
        let (tls_stop, tls_rx) = tokio::sync::oneshot::channel::<()>();
        let b = broker.clone();
        let files = server::TlsFiles::in_pki_dir(&pki);
        let tls = bh.spawn(async move {
            server::serve_tls(b, listener, &files, async {
                let _ = tls_rx.await;
            })
            .await
        });
        let rep = bubbled::load::run(bubbled::load::LoadSpec {
            endpoint: format!("https://localhost:{port}"),
            pki,
            parents: 8,
            rounds: 10,
            calls_per_round: 5,
            steady_calls: 500,
            profile: Some("warm".into()),
            memory_mib: 16,
        })
        .await
        .map_err(anyhow::Error::msg)?;
        let _ = tls_stop.send(());
        let _ = tls.await;
        let mut s = stat(rep.latencies.get("steady").cloned().unwrap_or_default());
        s.extra.insert("samples".into(), json!("steady calls"));
        s.extra.insert("report".into(), rep.to_json());
        anyhow::ensure!(
            rep.error_count() == 0,
            "load run had errors: {}",
            rep.to_json()
        );
        results.insert("load_8_parents", s);
    }
    embedded.stop().await
}

const PAYMENTS_WAT: &str = include_str!("../../examples/payments/payments.wat");
const TOUCH_WAT: &str = include_str!("../../examples/payments/touch.wat");

/// Total size of the files under `dir` (bytes).
fn dir_size(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        n += if p.is_dir() {
            dir_size(&p)
        } else {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    n
}

/// 200 warm-up calls, then `n` timed calls of `req`, each checked to
/// return `out_len` bytes.
async fn time_calls(
    c: &mut client::Client,
    req: &pb::CallRequest,
    n: usize,
    out_len: usize,
) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..200 {
        c.call(req.clone()).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = c.call(req.clone()).await?.into_inner();
        v.push(t.elapsed());
        anyhow::ensure!(r.output.len() == out_len);
    }
    Ok(v)
}

/// A bubble with the payments portion and a provisioned tokenization key.
async fn payments_bubble(
    c: &client::Client,
    create: &pb::CreateBubbleRequest,
) -> anyhow::Result<String> {
    let mut c = c.clone();
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(pb::SecurityPolicy {
                grants: vec![pb::CredentialGrant {
                    portion: "payments".into(),
                    credentials: vec!["tokenization_key".into(), "gateway_key".into()],
                }],
                ..Default::default()
            }),
            ..create.clone()
        })
        .await?
        .into_inner();
    let parent = bubble_client::Parent::from_client(c.clone());
    let mut bubble = parent.bubble(&b.bubble_id);
    let keys = bubble.fetch_keys_unverified().await?;
    bubble.trust_keys(keys);
    bubble.provision("tokenization_key", &[0x5a; 32]).await?;
    bubble
        .load_portion("payments", &wat::parse_str(PAYMENTS_WAT)?)
        .await?;
    Ok(b.bubble_id)
}

fn tokenize_req(id: &str) -> pb::CallRequest {
    pb::CallRequest {
        bubble_id: id.to_string(),
        op: "tokenize".into(),
        input: b"4111111111111111".to_vec(),
        portion: "payments".into(),
        ..Default::default()
    }
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the warm pool holds `depth` READY bubbles. (Waiting also
/// for the spare VMM processes, so that nothing else runs, made attach
/// slower on this VM: idle vCPUs wake up slowly. See docs/performance.md.)
async fn wait_pool(broker: &Broker, depth: usize) {
    for _ in 0..2000 {
        let m = broker.scrape();
        if metric_value(&m, "bubbled_pool_depth{profile=\"warm\"}") >= depth as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Memory of a VMM process, KiB: (PSS of the whole process, RSS of guest
/// memory, PSS of guest memory). PSS shares pages mapped by several
/// processes (binary, libraries, the shared shim image) among them. Guest
/// memory is `guest_kib` of contiguous address space: one anonymous
/// mapping, or an anonymous mapping split by the shared image mapped
/// copy-on-write inside it (`/memfd:bubble-image`).
fn rss_kib(pid: u32, guest_kib: u64) -> (u64, u64, u64) {
    struct Vma {
        start: u64,
        end: u64,
        name: String,
        rss: u64,
        pss: u64,
    }
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut vmas: Vec<Vma> = Vec::new();
    for l in smaps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some(first) = f.first() else { continue };
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                vmas.push(Vma {
                    start,
                    end,
                    name: f.get(5..).map(|n| n.join(" ")).unwrap_or_default(),
                    rss: 0,
                    pss: 0,
                });
                continue;
            }
        }
        let val = || f.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if let Some(v) = vmas.last_mut() {
            match *first {
                "Rss:" => v.rss = val(),
                "Pss:" => v.pss = val(),
                _ => {}
            }
        }
    }
    let pss_total: u64 = vmas.iter().map(|v| v.pss).sum();
    let size = guest_kib * 1024;
    // Guest memory: a run of adjacent mappings spanning exactly its size,
    // either one anonymous mapping or anonymous + image + anonymous.
    for (i, v) in vmas.iter().enumerate() {
        let mut end = v.end;
        let mut k = i;
        while end - v.start < size && k + 1 < vmas.len() && vmas[k + 1].start == end {
            k += 1;
            end = vmas[k].end;
        }
        let run = &vmas[i..=k];
        let anon = |m: &Vma| m.name.is_empty() || m.name.contains("memfd:bubble-image");
        if end - v.start == size
            && run.iter().all(anon)
            && (run.len() == 1 || run.iter().any(|m| !m.name.is_empty()))
        {
            let rss = run.iter().map(|m| m.rss).sum();
            let pss = run.iter().map(|m| m.pss).sum();
            return (pss_total, rss, pss);
        }
    }
    (pss_total, 0, 0)
}

fn print_results(results: &BTreeMap<&str, Stat>) {
    println!(
        "{:<18} {:>7} {:>11} {:>11}  ratio",
        "metric", "n", "p50 (µs)", "p99 (µs)"
    );
    let floor = results.get("raw_kvm_floor").map(|s| s.p50);
    let rtt = results.get("raw_exit_rtt").map(|s| s.p50);
    let extra = |s: &Stat, k: &str| s.extra.get(k).map(|v| v.to_string()).unwrap_or_default();
    for (k, s) in results {
        let ratio = match (*k, floor, rtt) {
            ("create_to_ready", Some(f), _) => {
                let mut t = format!(
                    "{:.2} × raw_kvm_floor (target ≤ 3)",
                    s.p50.as_secs_f64() / f.as_secs_f64()
                );
                if let Some(p) = results
                    .get("raw_kvm_floor")
                    .and_then(|f| f.extra.get("prepared_p50_us"))
                    .and_then(Value::as_f64)
                {
                    t += &format!("; {:.2} × the prepared floor", us(s.p50) / p);
                }
                t
            }
            ("call_echo_64b", _, Some(r)) => format!(
                "raw_exit_rtt + {:.1} µs (target ≤ +150); answer polling off: p50 {} µs",
                us(s.p50) - us(r),
                extra(s, "answer_poll_off_p50_us")
            ),
            ("call_tokenize", _, Some(r)) => {
                format!("raw_exit_rtt + {:.1} µs (target ≤ +300)", us(s.p50) - us(r))
            }
            ("attach_warm", _, _) => "target p50 ≤ 300 µs".to_string(),
            ("suspend_64m" | "restore_64m" | "suspend_512m" | "restore_512m", _, _) => format!(
                "{} MB frozen, {} MB/s{}",
                extra(s, "frozen_mb"),
                extra(s, "mb_per_s"),
                if *k == "restore_64m" {
                    " (target p50 ≤ 10 ms)"
                } else {
                    ""
                }
            ),
            ("tokenize_4_parents", _, _) => format!("{} calls/s", extra(s, "per_sec")),
            ("density_1000", _, _) => format!(
                "PSS/bubble {} KiB, beyond guest pages {} KiB (target ≤ 1024)",
                extra(s, "rss_per_bubble_kib"),
                extra(s, "rss_beyond_guest_per_bubble_kib")
            ),
            _ => String::new(),
        };
        println!(
            "{:<18} {:>7} {:>11.1} {:>11.1}  {}",
            k,
            s.n,
            us(s.p50),
            us(s.p99),
            ratio
        );
    }
}
