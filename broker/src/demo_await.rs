//! The await part of `bubblectl demo`: the payments portion authorises a
//! charge on broker A, awaits the gateway's capture notification (its
//! bubble frozen to the store with the call pending), and a second broker
//! B sharing that store (and its key-encryption key) receives the
//! notification, restores the bubble and finishes the same call: the
//! settlement is signed with the gateway key neither parent nor broker
//! ever held.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bubble_proto::v1 as pb;

use crate::client;
use crate::config::BrokerConfig;
use crate::demo::EmbeddedBroker;

/// How long the demo waits for each step before it fails.
const STEP: Duration = Duration::from_secs(30);

/// The payments bubble the demo's payments part left running on A.
pub(crate) struct Payments {
    pub bubble_id: String,
    /// The gateway key's public half (the custodian's).
    pub gateway_pk: [u8; 32],
    /// The bubble's attested result-signing key.
    pub sig_pk: [u8; 32],
}

/// Runs the await part against broker `a` (data dir `a_dir`), with a
/// broker B of its own; returns the time from the capture notification
/// to the settled result. Deletes the payments bubble.
pub(crate) async fn run(
    a: &EmbeddedBroker,
    a_dir: &Path,
    p: Payments,
) -> anyhow::Result<Vec<Duration>> {
    println!();
    println!("await: the portion authorises a charge on broker A, awaits the gateway's capture, settles on broker B");
    let b_dir = tempfile::Builder::new()
        .prefix("bubbled-demo-b-")
        .tempdir()
        .context("creating a temp dir")?;
    // B shares A's store and key-encryption key (as brokers on two hosts
    // share an S3 bucket and a KEK).
    let kek = b_dir.path().join("kek");
    std::fs::copy(a_dir.join("kek"), &kek).context("copying the KEK")?;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600))?;
    let mut cfg = BrokerConfig::new(b_dir.path().to_path_buf())?;
    cfg.store_dir = BrokerConfig::new(a_dir.to_path_buf())?.store_dir;
    let b = EmbeddedBroker::start(cfg).await?;
    println!(
        "broker B: data dir {}, the same frozen store as A",
        b_dir.path().display()
    );
    let r = settle(a, &b, &p).await;
    let stopped = b.stop().await;
    let t = r?;
    stopped?;
    Ok(vec![t])
}

async fn settle(a: &EmbeddedBroker, b: &EmbeddedBroker, p: &Payments) -> anyhow::Result<Duration> {
    let mut ca = client::connect_unix(&a.socket).await?;
    let mut cb = client::connect_unix(&b.socket).await?;
    let trigger = |subject: &str, bubble: &str| pb::CreateTriggerRequest {
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "payments".into(),
        function: "authorize_capture".into(),
        ..Default::default()
    };
    let ta = ca
        .create_trigger(trigger("orders", &p.bubble_id))
        .await?
        .into_inner()
        .trigger_id;
    // B consumes the same subject with a bubble of its own (which never
    // runs here: the capture resumes the frozen call before anything
    // would).
    let spare = cb
        .create_bubble(pb::CreateBubbleRequest {
            memory_mib: 16,
            vcpus: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    cb.load_portion(pb::LoadPortionRequest {
        bubble_id: spare.bubble_id.clone(),
        name: "payments".into(),
        module: wat::parse_str(crate::demo::PAYMENTS_WAT)?,
    })
    .await?;
    let tb = cb
        .create_trigger(trigger("orders", &spare.bubble_id))
        .await?
        .into_inner()
        .trigger_id;

    let mut order = 4_999u64.to_le_bytes().to_vec();
    order.extend_from_slice(b"order-1003");
    publish(&mut ca, "auth-1003", &order).await?;
    let end = Instant::now() + STEP;
    loop {
        let d = ca
            .describe_bubble(pb::BubbleRef {
                bubble_id: p.bubble_id.clone(),
            })
            .await?
            .into_inner();
        if d.state == pb::BubbleState::Suspended as i32 {
            break;
        }
        anyhow::ensure!(Instant::now() < end, "the awaiting bubble did not freeze");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "A: authorised 49.99 EUR for order-1003; the call awaits the capture: {} frozen to the store",
        p.bubble_id
    );

    let capture = 4_999u64.to_le_bytes();
    let t = Instant::now();
    publish(&mut cb, "order-1003", &capture).await?;
    let r = loop {
        let r = cb
            .get_result(pb::GetResultRequest {
                trigger_id: tb.clone(),
                key: "auth-1003".into(),
            })
            .await?
            .into_inner();
        if r.outcome != "pending" {
            break r;
        }
        anyhow::ensure!(Instant::now() < end + STEP, "no settlement on broker B");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let took = t.elapsed();
    anyhow::ensure!(r.outcome == "ok", "the settlement failed: {}", r.reason);
    anyhow::ensure!(r.bubble_id == p.bubble_id, "another bubble answered");
    // The bubble signed the whole call (the authorisation's frame) ...
    let frame = bubble_abi::ops::PortionCall {
        portion: "payments",
        function: "authorize_capture",
        input: &order,
    }
    .encode()
    .map_err(|e| anyhow::anyhow!("encoding the call frame: {e:?}"))?;
    let out = bubble_keys::verify_and_open_result(
        &p.sig_pk,
        &r.bubble_id,
        r.call_id,
        &frame,
        &r.output,
        &r.signature,
        None,
    )?;
    // ... and its output is the authorisation and the settlement, both
    // signed with the gateway key.
    let out = out.expose();
    anyhow::ensure!(out.len() == 128, "unexpected output length {}", out.len());
    {
        use ed25519_dalek::Verifier;
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&p.gateway_pk)?;
        vk.verify(&order, &ed25519_dalek::Signature::from_slice(&out[..64])?)?;
        let mut settled = order.clone();
        settled.extend_from_slice(&capture);
        vk.verify(&settled, &ed25519_dalek::Signature::from_slice(&out[64..])?)?;
    }
    println!(
        "B: the capture notification restored {} and the same call went on: settlement signed with the gateway key in {:.1} ms; bubble's signature and both gateway signatures verify",
        p.bubble_id,
        took.as_secs_f64() * 1e3
    );
    // The owner reads it on A too, where its trigger is (relayed through
    // the shared store, encrypted).
    let ra = loop {
        let ra = ca
            .get_result(pb::GetResultRequest {
                trigger_id: ta.clone(),
                key: "auth-1003".into(),
            })
            .await?
            .into_inner();
        if ra.outcome != "pending" {
            break ra;
        }
        anyhow::ensure!(
            Instant::now() < end + STEP,
            "the settlement never reached A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    anyhow::ensure!(ra == r, "A's copy of the settlement differs from B's");
    println!("A: the owner reads the same settlement on A, where its trigger is (relayed through the store, encrypted)");
    cb.delete_bubble(pb::BubbleRef {
        bubble_id: p.bubble_id.clone(),
    })
    .await?;
    cb.delete_bubble(pb::BubbleRef {
        bubble_id: spare.bubble_id,
    })
    .await?;
    Ok(took)
}

async fn publish(c: &mut client::Client, key: &str, payload: &[u8]) -> anyhow::Result<()> {
    c.publish_event(pb::PublishEventRequest {
        subject: "orders".into(),
        key: key.into(),
        payload: payload.to_vec(),
    })
    .await?;
    Ok(())
}
