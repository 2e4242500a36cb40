//! End to end on real KVM: pool profiles that carry a security policy.
//! The refiller boots every pooled bubble with the profile's policy, so an
//! attach asking for exactly that policy takes one with no call into the
//! guest; an attach asking for any other policy (one byte apart, none at
//! all) never receives such a bubble. Every attached bubble's attestation
//! (the guest's own answer) and DescribeBubble show the policy asked for.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_client::Parent;
use bubble_e2e_tests::payments::{grants, PAYMENTS};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};
use tonic::Code;

/// The payments policy the `pay` pool carries, and the `pay1` pool's,
/// which differs from it in one byte of its canonical form (fuel + 1).
const FUEL: u64 = 1_000_000;

/// Two pools with policies one byte apart, a pool without one; every
/// attach through the install path (`set_policy` at attach) fails, so an
/// attach that succeeds from a pool made no such call.
fn config() -> String {
    let pool = |name: &str, fuel: u64, size: u32| {
        format!(
            "[[pool]]\nname = \"{name}\"\nmemory_mib = 16\nsize = {size}\n\
             [pool.policy]\nfuel_per_call = {fuel}\n\
             [[pool.policy.grants]]\nportion = \"payments\"\n\
             credentials = [\"tokenization_key\", \"gateway_key\"]\n"
        )
    };
    format!(
        "{}{}[[pool]]\nname = \"plain\"\nmemory_mib = 16\nsize = 2\n",
        pool("pay", FUEL, 3),
        pool("pay1", FUEL + 1, 3)
    )
}

fn policy(fuel: u64) -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        credential_rate: None,
        fuel_per_call: fuel,
        grants: grants()
            .into_iter()
            .map(|(portion, credentials)| pb::CredentialGrant {
                portion,
                credentials,
            })
            .collect(),
        ..Default::default()
    }
}

/// The digest a bubble's attestation binds for the policy `fuel` names
/// (`None`: the default policy, all zero).
fn digest(fuel: Option<u64>) -> Vec<u8> {
    match fuel {
        None => bubble_attestation::SecurityPolicy::default().digest(),
        Some(fuel) => bubble_attestation::SecurityPolicy {
            credential_rate: None,
            fuel_per_call: fuel,
            grants: grants(),
            ..Default::default()
        }
        .digest(),
    }
    .to_vec()
}

fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

fn failures(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("bubbled_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_pools(broker: &BrokerProc, pools: &[(&str, f64)]) {
    wait_until(
        "the warm pools to fill",
        Duration::from_secs(60),
        || {
            let m = broker.admin_get("/metrics");
            pools
                .iter()
                .map(|(p, _)| {
                    metric(&m, &format!("bubbled_pool_depth{{profile=\"{p}\"}} ")).unwrap_or(-1.0)
                })
                .collect::<Vec<_>>()
        },
        |depths| depths.iter().zip(pools).all(|(d, (_, want))| d >= want),
    )
    .await;
}

async fn attested_digest(c: &mut Client, id: &str) -> Vec<u8> {
    c.get_attestation(pb::GetAttestationRequest {
        bubble_id: id.into(),
        nonce: vec![9; 32],
    })
    .await
    .unwrap()
    .into_inner()
    .policy_digest
}

/// One attach of the attack mix: which pool, which policy (by fuel), and
/// whether the pool may serve it as it is.
#[derive(Clone, Copy, Debug)]
struct Ask {
    profile: &'static str,
    fuel: Option<u64>,
    from_pool: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_only_ever_gets_the_policy_it_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            config: Some(config()),
            env: vec![("BUBBLED_TEST_FAIL".into(), "attach.set_policy".into())],
            ..Opts::default()
        },
    );
    wait_pools(&broker, &[("pay", 3.0), ("pay1", 3.0), ("plain", 2.0)]).await;
    let a = broker.tls_client("parent-a").await;
    let b = broker.tls_client("parent-b").await;

    // Concurrently, from two parents: each pool's own policy (served from
    // the pool), the other pool's policy one byte apart, and no policy at
    // a pool that carries one (never served from that pool).
    let asks = [
        Ask {
            profile: "pay",
            fuel: Some(FUEL),
            from_pool: true,
        },
        Ask {
            profile: "pay",
            fuel: Some(FUEL),
            from_pool: true,
        },
        Ask {
            profile: "pay1",
            fuel: Some(FUEL + 1),
            from_pool: true,
        },
        Ask {
            profile: "pay1",
            fuel: Some(FUEL + 1),
            from_pool: true,
        },
        Ask {
            profile: "pay",
            fuel: Some(FUEL + 1),
            from_pool: false,
        },
        Ask {
            profile: "pay1",
            fuel: Some(FUEL),
            from_pool: false,
        },
        Ask {
            profile: "pay",
            fuel: None,
            from_pool: false,
        },
        Ask {
            profile: "pay1",
            fuel: None,
            from_pool: false,
        },
        Ask {
            profile: "plain",
            fuel: None,
            from_pool: true,
        },
    ];
    let mut tasks = Vec::new();
    for (i, ask) in asks.iter().copied().enumerate() {
        let mut c = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let got = c
                .attach_bubble(pb::AttachBubbleRequest {
                    profile: ask.profile.into(),
                    policy: ask.fuel.map(policy),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{ask:?}: {e:?}"))
                .into_inner();
            (ask, got, c)
        }));
    }
    for t in tasks {
        let (ask, got, mut c) = t.await.unwrap();
        assert_eq!(got.state, pb::BubbleState::Ready as i32, "{ask:?}: {got:?}");
        assert_eq!(got.profile, ask.profile, "{ask:?}");
        // The guest's own answer, and the broker's record.
        let want = digest(ask.fuel);
        assert_eq!(
            attested_digest(&mut c, &got.bubble_id).await,
            want,
            "{ask:?}"
        );
        assert_eq!(got.policy_digest, want, "{ask:?}");
        assert_eq!(
            describe(&mut c, &got.bubble_id).await.policy_digest,
            want,
            "{ask:?}"
        );
    }
    let m = broker.admin_get("/metrics");
    let booted = asks.iter().filter(|a| !a.from_pool).count() as f64;
    assert_eq!(
        metric(&m, "bubbled_pool_misses_total "),
        Some(booted),
        "only the mismatches were booted: {m}"
    );
    // No attach went through `set_policy` (every one would have failed).
    assert_eq!(failures(&m), 0.0, "{m}");

    // Credentials provisioned after the attach work under the grant (the
    // pool's third bubble, or a refilled one: never a miss).
    let id = a
        .clone()
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "pay".into(),
            policy: Some(policy(FUEL)),
            wait_ms: 30_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    let m = broker.admin_get("/metrics");
    assert_eq!(
        metric(&m, "bubbled_pool_misses_total "),
        Some(booted),
        "{m}"
    );
    let parent = Parent::from_client(a.clone());
    let mut bubble = parent.bubble(&id);
    bubble
        .load_portion("payments", &wat::parse_str(PAYMENTS).unwrap())
        .await
        .unwrap();
    let (_, code) = bubble.trust_unverified().await.unwrap();
    assert_eq!(code.policy_digest.to_vec(), digest(Some(FUEL)));
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
    bubble.provision("tokenization_key", &key).await.unwrap();
    let pan = b"4111111111111111";
    let token = bubble
        .call_verified_portion("payments", "tokenize", pan)
        .await
        .unwrap();
    let mut h = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    h.update(pan);
    assert_eq!(token, h.finalize().into_bytes().to_vec());

    // A retry of a request id with the policy one byte apart is refused
    // naming the policy; with the same policy it is the same bubble.
    let mut a2 = a.clone();
    let first = a2
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "pay".into(),
            policy: Some(policy(FUEL)),
            client_request_id: "r-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = a2
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "pay".into(),
            policy: Some(policy(FUEL + 1)),
            client_request_id: "r-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("policy"), "{e:?}");
    let again = a2
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "pay".into(),
            policy: Some(policy(FUEL)),
            client_request_id: "r-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.bubble_id, first.bubble_id);
}

/// A pool policy a parent could not ask for refuses the broker's start,
/// naming the pool.
#[test]
fn a_pool_policy_a_request_could_not_carry_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bubbled.toml"),
        "[[pool]]\nname = \"bad\"\nmemory_mib = 16\nsize = 1\n\
         [pool.policy]\nmemory_limit_bytes = 1073741824\n",
    )
    .unwrap();
    let out = std::process::Command::new(broker_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--config")
        .arg(dir.path().join("bubbled.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"bad\"") && err.contains("memory_limit_bytes"),
        "{err}"
    );
}

/// Concurrent creates with one request id and policies one byte apart
/// (none on disk yet when they start): each answer carries the policy its
/// own request asked for, or is refused with ALREADY_EXISTS; exactly one
/// bubble is made. (The loser of the record insert used to be handed the
/// winner's bubble without any comparison.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_request_id_never_swap_policies() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let c = broker.client().await;
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let mut c = c.clone();
        let fuel = FUEL + i % 2;
        tasks.push(tokio::spawn(async move {
            let mut req = create_req(16);
            req.client_request_id = "same-id".into();
            req.policy = Some(policy(fuel));
            (fuel, c.create_bubble(req).await)
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (fuel, r) = t.await.unwrap();
        match r {
            Ok(b) => {
                let b = b.into_inner();
                assert_eq!(b.policy_digest.to_vec(), digest(Some(fuel)), "{b:?}");
                ids.insert(b.bubble_id);
            }
            Err(st) => assert_eq!(st.code(), Code::AlreadyExists, "{st:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "one bubble for one request id: {ids:?}");
    let mut c = c;
    let id = ids.into_iter().next().unwrap();
    let b = describe(&mut c, &id).await;
    assert_eq!(attested_digest(&mut c, &id).await, b.policy_digest.to_vec());
}

/// A broker killed between a created bubble's guest READY and the
/// installation of its policy (the record, with the policy, is on disk;
/// READY is not): restarted, it re-adopts the bubble only with the policy
/// its record names installed, so the retried create's answer, its
/// DescribeBubble and its attestation agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bubble_readopted_before_its_policy_was_installed_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |pause: bool| Opts {
        env: if pause {
            vec![("BUBBLED_TEST_PAUSE".into(), "create.booted=60000".into())]
        } else {
            Vec::new()
        },
        ..Opts::default()
    };
    let req = || {
        let mut r = create_req(16);
        r.client_request_id = "paid".into();
        r.policy = Some(policy(FUEL));
        r
    };
    let mut broker = BrokerProc::start_with(dir.path(), opts(true));
    let mut c = broker.client().await;
    let mut c2 = c.clone();
    let create = tokio::spawn(async move { c2.create_bubble(req()).await });
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.path().join("broker.log"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("fault point reached") && l.contains("create.booted"))
    {
        assert!(
            std::time::Instant::now() < until,
            "never reached create.booted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.kill();
    assert!(create.await.unwrap().is_err(), "the broker died mid-create");
    drop(c);
    let broker = BrokerProc::start_with(dir.path(), opts(false));
    c = broker.client().await;
    let b = c.create_bubble(req()).await.unwrap().into_inner();
    assert_eq!(b.state, pb::BubbleState::Ready as i32, "{b:?}");
    assert_eq!(b.policy_digest.to_vec(), digest(Some(FUEL)));
    assert_eq!(
        attested_digest(&mut c, &b.bubble_id).await,
        digest(Some(FUEL))
    );
}
