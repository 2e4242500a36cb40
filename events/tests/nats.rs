//! NATS JetStream as the distributed source, attacked with two brokers on
//! one stream: each event goes to exactly one of them; a broker that dies
//! holding events loses them to the other; results are stored once per
//! key whoever publishes; poison events are dead-lettered; a publisher's
//! retry is dropped. A real `nats-server -js` on a free loopback port in a
//! temp dir; under `CI=true` its absence fails the test.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bubble_events::nats::{NatsConfig, NatsSource};
use bubble_events::{Delivery, EventKey, Outcome, Results, Source};
use tokio::sync::Mutex;

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `nats-server -js`, or says why not: under CI=true a missing
/// server fails; elsewhere the test says NOT RUN.
fn start() -> Option<Server> {
    let found = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("nats-server is not installed (CI=true): .ci/run installs it with apt");
        }
        eprintln!(
            "NOT RUN: nats-server is not installed (apt install nats-server); CI=true fails here"
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        url: format!("nats://127.0.0.1:{port}"),
        _dir: dir,
    };
    // Ready when it accepts a connection (deadline fails the test).
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not start listening"
        );
        std::thread::yield_now();
    }
    Some(server)
}

fn cfg(url: &str, ack_wait: Duration, max_deliver: u32) -> NatsConfig {
    NatsConfig {
        url: url.to_owned(),
        stream: "EVENTS".into(),
        subjects: vec!["pay.>".into()],
        consumer: "brokers".into(),
        ack_wait,
        max_deliver,
        dead_letter_subject: "dead.pay".into(),
        results_stream: "RESULTS".into(),
        results_prefix: "result.pay".into(),
        dedup_window: Duration::from_secs(120),
        max_pending: None,
    }
}

fn key(s: &str) -> EventKey {
    EventKey::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_on_one_stream_each_event_goes_to_exactly_one() {
    let Some(srv) = start() else { return };
    let c = cfg(&srv.url, Duration::from_secs(60), 5);
    let a = NatsSource::connect(c.clone()).await.unwrap();
    let b = NatsSource::connect(c).await.unwrap();
    for i in 0..200 {
        let r = a
            .publish("pay.tokenize", &key(&format!("e{i}")), b"4111")
            .await
            .unwrap();
        assert!(!r.duplicate);
    }
    // A publisher's retry of an existing key is dropped by the server.
    assert!(
        b.publish("pay.tokenize", &key("e7"), b"4111")
            .await
            .unwrap()
            .duplicate
    );
    let seen: Arc<Mutex<HashMap<String, Vec<&'static str>>>> = Arc::default();
    let mut tasks = Vec::new();
    for (name, src) in [("a", a), ("b", b)] {
        let seen = Arc::clone(&seen);
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if seen.lock().await.len() == 200 {
                    return;
                }
                assert!(Instant::now() < deadline, "events missing");
                for d in src.fetch(10, Duration::from_millis(300)).await.unwrap() {
                    seen.lock()
                        .await
                        .entry(d.event().key.to_string())
                        .or_default()
                        .push(name);
                    src.publish_result(&d.event().key, &Outcome::Ok(b"tok".to_vec()))
                        .await
                        .unwrap();
                    d.ack().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 200);
    assert!(
        seen.values().all(|v| v.len() == 1),
        "an event went to two brokers"
    );
    let by_a = seen.values().filter(|v| v[0] == "a").count();
    eprintln!("broker a took {by_a}, broker b {}", 200 - by_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_s_events_go_to_the_other() {
    let Some(srv) = start() else { return };
    let c = cfg(&srv.url, Duration::from_secs(1), 5);
    let a = NatsSource::connect(c.clone()).await.unwrap();
    let b = NatsSource::connect(c).await.unwrap();
    for i in 0..5 {
        a.publish("pay.x", &key(&format!("k{i}")), b"v")
            .await
            .unwrap();
    }
    let held = a.fetch(5, Duration::from_secs(5)).await.unwrap();
    assert_eq!(held.len(), 5);
    drop(held);
    drop(a); // broker a dies without acking
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 5 {
        assert!(Instant::now() < deadline, "held events never redelivered");
        for d in b.fetch(5, Duration::from_secs(2)).await.unwrap() {
            assert_eq!(d.event().attempt, 2);
            got.push(d.event().key.to_string());
            d.ack().await.unwrap();
        }
    }
    got.sort();
    assert_eq!(got, ["k0", "k1", "k2", "k3", "k4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_stored_once_per_key_across_brokers() {
    let Some(srv) = start() else { return };
    let c = cfg(&srv.url, Duration::from_secs(30), 5);
    let a = NatsSource::connect(c.clone()).await.unwrap();
    let b = NatsSource::connect(c).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let src = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            src.publish_result(&key("order-9"), &Outcome::Ok(vec![i]))
                .await
                .unwrap()
        }));
    }
    let mut first = 0;
    for t in tasks {
        first += usize::from(!t.await.unwrap().duplicate);
    }
    assert_eq!(first, 1, "exactly one result per key");
    // Much later (outside any duplicate window) it is still refused.
    assert!(
        a.publish_result(&key("order-9"), &Outcome::Refused("x".into()))
            .await
            .unwrap()
            .duplicate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered() {
    let Some(srv) = start() else { return };
    let c = cfg(&srv.url, Duration::from_secs(30), 2);
    let src = NatsSource::connect(c).await.unwrap();
    src.publish("pay.x", &key("poison"), b"boom").await.unwrap();
    src.publish("pay.x", &key("bad"), b"?").await.unwrap();
    let mut naks = 0;
    let mut explicit = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while naks < 2 || !explicit {
        assert!(Instant::now() < deadline, "poison event kept coming");
        for d in src.fetch(5, Duration::from_millis(500)).await.unwrap() {
            if d.event().key.as_str() == "bad" {
                d.dead_letter("refused by the portion").await.unwrap();
                explicit = true;
            } else {
                naks += 1;
                d.retry(Duration::ZERO).await.unwrap();
            }
        }
    }
    // The third delivery of the poison event is dead-lettered by the
    // source, never handed out.
    let more = src.fetch(5, Duration::from_secs(1)).await.unwrap();
    assert!(more.is_empty(), "{more:?}");
    let client = async_nats::connect(srv.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut dead = js.get_stream("EVENTS_DEAD").await.unwrap();
    let info = dead.info().await.unwrap();
    assert_eq!(info.state.messages, 2);
}
