//! `bubblectl demo`: a broker on embedded defaults in a temporary directory,
//! a few bubbles created, called and deleted, the payments flow (and its
//! await resumed on a second broker, [`crate::demo_await`]), and a short
//! timing table.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bubble_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::config::BrokerConfig;
use crate::core::Broker;
use crate::{client, server};

/// A broker serving its Unix socket (`DATA_DIR/bubbled.sock`) from threads
/// of its own, as the `bubbled` daemon does, while its caller acts as a
/// parent: the demo's and the benchmark's broker.
pub struct EmbeddedBroker {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Its Unix socket.
    pub socket: PathBuf,
    /// The broker's runtime (taken when shut down) and a handle on it.
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl EmbeddedBroker {
    /// Opens a broker for `cfg` on a runtime of its own (one worker per
    /// core, as `bubbled`'s) and serves it on its Unix socket.
    pub async fn start(cfg: BrokerConfig) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("bubbled-broker")
            .build()
            .context("starting the broker's runtime")?;
        let socket = cfg.data_dir.join("bubbled.sock");
        let opened = async {
            let broker = rt.spawn(Broker::open(cfg)).await??;
            let _rt = rt.enter();
            anyhow::Ok((broker, server::bind_unix(&socket)?))
        }
        .await;
        let (broker, listener) = match opened {
            Ok(x) => x,
            Err(e) => {
                // Dropping a runtime would block this async thread.
                rt.shutdown_background();
                return Err(e);
            }
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = rt.spawn(server::serve_unix(broker.clone(), listener, async {
            let _ = stop_rx.await;
        }));
        Ok(EmbeddedBroker {
            broker,
            socket,
            handle: rt.handle().clone(),
            rt: Some(rt),
            stop: Some(stop),
            serving: Some(serving),
        })
    }

    /// The broker's runtime, to run more of its work there.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Stops serving, stops every bubble, then the broker's threads.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            let _ = serving.await;
        }
        let b = self.broker.clone();
        self.handle
            .spawn(async move { b.shutdown_all().await })
            .await?;
        Ok(())
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed on an async
        // thread, where this is usually dropped.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Percentile (0-100) of a sorted slice of durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn row(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{:<22} {:>6} {:>11.1} {:>11.1}",
        name,
        v.len(),
        percentile(&v, 50.0).as_secs_f64() * 1e6,
        percentile(&v, 99.0).as_secs_f64() * 1e6
    );
}

/// Runs the demo.
pub async fn run(bubbles: usize, calls: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("bubbled-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    println!("bubbled demo: broker data dir {}", dir.path().display());
    // The broker gets threads of its own, as the `bubbled` daemon has;
    // this demo's client keeps the caller's.
    let mut cfg = BrokerConfig::new(dir.path().to_path_buf())?;
    // The payments flow attaches from a warm pool whose bubbles carry its
    // policy (installed when they boot): no guest call at attach.
    cfg.pools = vec![crate::config::PoolProfile {
        name: PAYMENTS_POOL.into(),
        memory_mib: 32,
        size: 1,
        image: "shim".into(),
        idle_timeout_s: 0,
        idle_action: Default::default(),
        policy: Some(crate::config::PolicyConfig {
            fuel_per_call: 1_000_000,
            max_output_bytes: 1024,
            grants: vec![crate::config::GrantConfig {
                portion: "payments".into(),
                credentials: vec!["tokenization_key".into(), "gateway_key".into()],
            }],
            ..Default::default()
        }),
    }];
    let broker = EmbeddedBroker::start(cfg).await?;
    // Let the pool boot before the creates are timed (they would compete).
    let ready = format!("bubbled_pool_depth{{profile=\"{PAYMENTS_POOL}\"}} 1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.broker.scrape().contains(&ready) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = client::connect_unix(&broker.socket).await?;

    let mut creates = Vec::new();
    let mut ids = Vec::new();
    for i in 0..bubbles {
        let t = Instant::now();
        let b = c
            .create_bubble(pb::CreateBubbleRequest {
                idle: None,
                policy: None,
                client_request_id: format!("demo-{i}"),
                memory_mib: 64,
                vcpus: 1,
                image: String::new(),
            })
            .await?
            .into_inner();
        creates.push(t.elapsed());
        anyhow::ensure!(
            b.state == pb::BubbleState::Ready as i32,
            "bubble {} did not become ready: {}",
            b.bubble_id,
            b.failure_reason
        );
        println!(
            "created {} (guest boot {:.2} ms)",
            b.bubble_id,
            b.boot_us as f64 / 1e3
        );
        ids.push(b.bubble_id);
    }

    let mut echo = Vec::new();
    let mut sha = Vec::new();
    let payload = vec![0x5au8; 64];
    for id in &ids {
        for _ in 0..calls {
            let t = Instant::now();
            let r = c
                .call(pb::CallRequest {
                    bubble_id: id.clone(),
                    op: "echo".into(),
                    input: payload.clone(),
                    deadline_ms: 0,
                    ..Default::default()
                })
                .await?
                .into_inner();
            echo.push(t.elapsed());
            anyhow::ensure!(r.output == payload, "echo returned other bytes");
        }
        let input = format!("hello from the parent to {id}").into_bytes();
        let t = Instant::now();
        let r = c
            .call(pb::CallRequest {
                bubble_id: id.clone(),
                op: "sha256".into(),
                input: input.clone(),
                deadline_ms: 0,
                ..Default::default()
            })
            .await?
            .into_inner();
        sha.push(t.elapsed());
        anyhow::ensure!(
            r.output == Sha256::digest(&input).as_slice(),
            "sha256 computed in the guest differs from the host's"
        );
    }
    println!("sha256 computed inside each bubble matches the host's");

    let (pay, held) = payments(&c, dir.path()).await?;
    let settle = crate::demo_await::run(&broker, dir.path(), held).await?;

    let mut deletes = Vec::new();
    for id in &ids {
        let t = Instant::now();
        c.delete_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await?;
        deletes.push(t.elapsed());
    }

    println!();
    println!(
        "{:<22} {:>6} {:>11} {:>11}",
        "operation", "n", "p50 (µs)", "p99 (µs)"
    );
    row("create to READY", creates);
    row("call echo 64 B", echo);
    row("call sha256", sha);
    row("delete", deletes);
    row("attest + verify", pay.attest);
    row("portion tokenize", pay.tokenize);
    row("portion sign_charge", pay.sign);
    row("capture -> settled (B)", settle);
    println!();
    println!("(numbers from this demo are indicative; see docs/performance.md and bubble-bench)");

    broker.stop().await
}

/// Timings of the payments part of the demo.
struct PaymentTimes {
    attest: Vec<Duration>,
    tokenize: Vec<Duration>,
    sign: Vec<Duration>,
}

pub(crate) const PAYMENTS_WAT: &str = include_str!("../../examples/payments/payments.wat");

/// The warm pool the payments flow attaches from.
const PAYMENTS_POOL: &str = "payments";

/// The payments flow: a bubble with a security policy (attached from a
/// warm pool whose bubbles carry exactly that policy) loads the payments
/// portion and is attested (which freezes its code), a key custodian seals
/// two credentials to it and that code, and the parent tokenizes a card
/// (sealed to the bubble: the broker sees ciphertext only) and gets a
/// charge signed, verifying every result. The parent never holds either
/// key. The bubble is left running for the await part
/// ([`crate::demo_await`]).
async fn payments(
    c: &client::Client,
    data_dir: &std::path::Path,
) -> anyhow::Result<(PaymentTimes, crate::demo_await::Payments)> {
    use bubble_keys::RngCore;
    println!();
    println!("payments: a bubble holds the tokenization and gateway keys; the parent never does");
    let mut grpc = c.clone();
    let b = grpc
        .attach_bubble(pb::AttachBubbleRequest {
            profile: PAYMENTS_POOL.into(),
            // Booted at start; a miss would boot one with the policy.
            wait_ms: 10_000,
            policy: Some(pb::SecurityPolicy {
                credential_rate: None,
                fuel_per_call: 1_000_000,
                max_output_bytes: 1024,
                grants: vec![pb::CredentialGrant {
                    portion: "payments".into(),
                    credentials: vec!["tokenization_key".into(), "gateway_key".into()],
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        b.state == pb::BubbleState::Ready as i32,
        "{}",
        b.failure_reason
    );
    println!(
        "attached {} from warm pool {:?} (its policy installed when it booted)",
        b.bubble_id, b.profile
    );
    let parent = bubble_client::Parent::from_client(c.clone());
    let mut bubble = parent.bubble(&b.bubble_id);

    // The code first: attesting freezes it.
    let module = wat::parse_str(PAYMENTS_WAT)?;
    let digest = bubble.load_portion("payments", &module).await?;
    println!(
        "loaded portion payments (portions digest {}…)",
        &hex::encode(&digest)[..16]
    );

    // Attest: what runs in the bubble must be the measured shim, and the
    // report must bind our nonce and the bubble's keys. This host has no
    // SEV-SNP: the report is SIMULATED and only a policy that allows
    // simulation accepts it.
    let expected = crate::attest::expected_measurement(
        &bubble_vmm::images::GuestImage::Shim,
        32,
        crate::config::DEFAULT_MAX_PAYLOAD,
    )?
    .digest();
    let owner = {
        use std::os::unix::fs::MetadataExt;
        format!("uid:{}", std::fs::metadata("/proc/self")?.uid())
    };
    let expect = bubble_client::Expectations::new(expected, &b.bubble_id, &owner)
        .allow_sim()
        .with_security_policy(bubble_attestation::SecurityPolicy {
            credential_rate: None,
            fuel_per_call: 1_000_000,
            max_output_bytes: 1024,
            grants: vec![(
                "payments".into(),
                vec!["tokenization_key".into(), "gateway_key".into()],
            )],
            ..Default::default()
        })
        .with_portion("payments", &module);
    let ark = std::fs::read(data_dir.join("psp/ark.der"))?;
    let t = Instant::now();
    let att = bubble.attest(&expect, Some(&ark)).await?;
    let attest = vec![t.elapsed()];
    println!(
        "attested {} ({}): measurement {}…",
        b.bubble_id,
        if att.simulated {
            "SIMULATED TEE: no hardware protection on this host"
        } else {
            "AMD SEV-SNP"
        },
        &hex::encode(att.measurement)[..16]
    );

    // A key custodian (not the checkout) seals the credentials to the
    // attested bubble and its code; the broker relays only ciphertext.
    let mut tok_key = zeroize::Zeroizing::new([0u8; 32]);
    let mut gw_seed = zeroize::Zeroizing::new([0u8; 32]);
    bubble_keys::OsRng.fill_bytes(&mut tok_key[..]);
    bubble_keys::OsRng.fill_bytes(&mut gw_seed[..]);
    let gateway_pk = bubble_keys::SigningKeyPair::from_secret_bytes(&gw_seed).public_key();
    bubble.provision("tokenization_key", &tok_key[..]).await?;
    bubble.provision("gateway_key", &gw_seed[..]).await?;
    println!(
        "custodian sealed tokenization_key and gateway_key to the bubble and its attested code (HPKE)"
    );

    let payments = bubble.portion("payments");
    let pan = b"4111111111111111";
    let mut tokenize = Vec::new();
    let mut token = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        token = payments.call("tokenize", pan).await?;
        tokenize.push(t.elapsed());
    }
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&tok_key[..])?;
    hmac::Mac::update(&mut mac, pan);
    anyhow::ensure!(hmac::Mac::finalize(mac).into_bytes().as_slice() == token.as_slice());
    println!(
        "tokenized 4111…1111 -> {}… (card sealed to the bubble; result signed by it, verified)",
        &hex::encode(&token)[..16]
    );

    let mut sign = Vec::new();
    let mut charge = 4_999u64.to_le_bytes().to_vec();
    charge.extend(b"merchant=demo-shop;currency=EUR;order=1001");
    let mut sig = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        sig = payments.call("sign_charge", &charge).await?;
        sign.push(t.elapsed());
    }
    {
        use ed25519_dalek::Verifier;
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&gateway_pk)?;
        vk.verify(&charge, &ed25519_dalek::Signature::from_slice(&sig)?)?;
    }
    println!("charge of 49.99 EUR signed with the gateway key; signature verifies");
    let mut big = 250_000u64.to_le_bytes().to_vec();
    big.extend(b"merchant=demo-shop;currency=EUR;order=1002");
    match payments.call("sign_charge", &big).await {
        Err(e) => println!("charge of 2500.00 EUR refused by the portion: {e}"),
        Ok(_) => anyhow::bail!("the portion signed a charge over its limit"),
    }
    Ok((
        PaymentTimes {
            attest,
            tokenize,
            sign,
        },
        crate::demo_await::Payments {
            bubble_id: b.bubble_id.clone(),
            gateway_pk,
            sig_pk: att.keys.sig_pk,
        },
    ))
}
