//! The frozen-bubble store on a real S3-compatible server (moto, started
//! here on loopback). Skipped, with the reason printed, where moto cannot
//! start (`.ci/run` installs it from PyPI).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn start_moto() -> Result<(Moto, u16), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    let moto = Moto(child);
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if http(port, "GET", "/").is_some() {
            return Ok((moto, port));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("moto did not start within 20 s (is `moto[server]` installed?)".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_restore_through_s3() {
    let (moto, port) = match start_moto() {
        Ok(m) => m,
        Err(e) => {
            missing_dependency(&format!("no S3-compatible server: {e}"));
            return;
        }
    };
    let created = http(port, "PUT", "/bubbles").unwrap_or_default();
    assert!(created.starts_with("HTTP/1.1 200"), "{created}");
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "test".to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec![
                "--store".into(),
                format!("s3://bubbles/host-a?endpoint=http://127.0.0.1:{port}"),
            ],
            env,
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id.clone();
    c.call(call_req(&id, "echo", &vec![7u8; 100_000]))
        .await
        .unwrap();
    let s = c
        .suspend_bubble(pb::SuspendBubbleRequest {
            bubble_id: id.clone(),
            kek: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::BubbleState::Suspended as i32);
    // The objects are in the bucket.
    let listing = http(port, "GET", "/bubbles?list-type=2").unwrap_or_default();
    assert!(
        listing.contains(&format!("host-a/frozen/{id}/g1/manifest")),
        "{listing}"
    );
    assert!(listing.contains("chunk-0"));
    let r = c
        .restore_bubble(pb::RestoreBubbleRequest {
            bubble_id: id.clone(),
            kek: vec![],
            generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::BubbleState::Ready as i32);
    let out = c
        .call(call_req(&id, "echo", b"back from S3"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"back from S3");
    // Consumed: the manifest is gone from the bucket.
    let listing = http(port, "GET", "/bubbles?list-type=2").unwrap_or_default();
    assert!(!listing.contains("manifest"), "{listing}");
    drop(broker);
    drop(moto);
}
