//! The VMM process through its control protocol: spawn, calls, deadline,
//! suspend to a snapshot and restore into a new process.

use std::time::Duration;

use bubble_vmm::client::{spawn, CallError, GuestImage, HostileKind, SpawnConfig};

fn cfg(dir: &std::path::Path, id: &str, image: GuestImage, restore: bool) -> SpawnConfig {
    SpawnConfig {
        bubble_id: id.into(),
        memory_mib: 16,
        vcpus: 1,
        image,
        dir: dir.join(id),
        program: env!("CARGO_BIN_EXE_bubble-vmm").into(),
        program_args_prefix: vec![],
        max_payload: 1 << 20,
        restore,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_call_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let c = spawn(&cfg(dir.path(), "b-1", GuestImage::Shim, false))
        .await
        .unwrap();
    c.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        c.call("echo", b"hi", Duration::from_secs(5)).await.unwrap(),
        b"hi"
    );
    let st = c.status().await.unwrap();
    assert!(st.ready && st.vcpu_us > 0);
    c.shutdown(Duration::from_secs(2)).await;

    let s = spawn(&cfg(
        dir.path(),
        "b-2",
        GuestImage::Hostile(HostileKind::Spin),
        false,
    ))
    .await
    .unwrap();
    s.wait_ready(Duration::from_secs(10)).await.unwrap();
    let e = s
        .call("echo", b"x", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::DeadlineExceeded(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_restore_continue_identically() {
    use bubble_keys::OsRng;
    let dir = tempfile::tempdir().unwrap();
    let a = spawn(&cfg(dir.path(), "b-s", GuestImage::Shim, false))
        .await
        .unwrap();
    a.wait_ready(Duration::from_secs(10)).await.unwrap();
    let d = Duration::from_secs(5);
    let keys = a.call("keys", b"", d).await.unwrap();
    let kem: [u8; 32] = keys[..32].try_into().unwrap();
    let secret = b"credential that must survive";
    let aad = bubble_keys::credential_aad("b-s", "k");
    let sealed =
        bubble_keys::seal_credential(&mut OsRng, &kem, bubble_keys::INFO_CREDENTIAL, &aad, secret)
            .unwrap()
            .encode();
    let mut req = vec![3u8];
    req.extend(b"b-s");
    req.push(1);
    req.extend(b"k");
    req.extend(&sealed);
    a.call("provision", &req, d).await.unwrap();
    let mut h = vec![1u8, b'k'];
    h.extend(b"data");
    let mac = a.call("hmac", &h, d).await.unwrap();

    let snap = a.suspend(Duration::from_secs(10)).await.unwrap();
    assert!(snap.len() > 4096);
    a.shutdown(Duration::from_secs(2)).await;

    let b = spawn(&cfg(dir.path(), "b-s2", GuestImage::Shim, true))
        .await
        .unwrap();
    b.restore(snap.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    b.wait_ready(Duration::from_secs(5)).await.unwrap();
    // Same keys, same credential, same answers.
    assert_eq!(b.call("keys", b"", d).await.unwrap(), keys);
    assert_eq!(b.call("hmac", &h, d).await.unwrap(), mac);
    assert_eq!(b.call("echo", b"after", d).await.unwrap(), b"after");
    b.shutdown(Duration::from_secs(2)).await;

    // A corrupted snapshot is refused and starts nothing.
    let c = spawn(&cfg(dir.path(), "b-s3", GuestImage::Shim, true))
        .await
        .unwrap();
    let mut bad = snap;
    bad.truncate(100);
    assert!(c.restore(bad, Duration::from_secs(5)).await.is_err());
    c.kill();
}
