use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pair() -> (UnixConn, UnixConn) {
    let (a, b) = StdUnixStream::pair().expect("socketpair");
    (
        UnixConn::from_std(a).expect("a"),
        UnixConn::from_std(b).expect("b"),
    )
}

#[tokio::test]
async fn bytes_go_both_ways() {
    let (mut a, mut b) = pair();
    a.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong!").await.unwrap();
    let mut buf = [0u8; 5];
    a.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong!");
}

#[tokio::test]
async fn vectored_writes_keep_order() {
    let (a, mut b) = pair();
    let (_, mut w) = a.into_split();
    let parts = [io::IoSlice::new(b"head"), io::IoSlice::new(b"-body")];
    let n = w.write_vectored(&parts).await.unwrap();
    assert_eq!(n, 9);
    let mut buf = [0u8; 9];
    b.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"head-body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_larger_than_the_socket_buffer_waits_for_the_reader() {
    let (a, b) = pair();
    let (_, mut w) = a.into_split();
    let (mut r, _) = b.into_split();
    // 8 MiB: far beyond a Unix socket's buffer, so the writer blocks many
    // times and must be woken by the reader's progress.
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        assert!(
            w.waiter.is_none(),
            "write readiness is dropped once written"
        );
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 3000];
    loop {
        let n = r.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        if got.len() % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    writer.await.unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "bytes arrive intact and in order");
}

#[tokio::test]
async fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
    let (mut a, b) = pair();
    drop(b);
    let e = a.write_all(b"anyone?").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn the_peer_closing_reads_as_end_of_stream() {
    let (mut a, b) = pair();
    let (_, mut w) = b.into_split();
    w.write_all(b"last").await.unwrap();
    w.shutdown().await.unwrap();
    let mut all = Vec::new();
    a.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"last");
}

#[tokio::test]
async fn dropping_the_writing_half_ends_the_peers_stream() {
    let (a, mut b) = pair();
    let (_reader_lives_on, w) = a.into_split();
    drop(w);
    let mut all = Vec::new();
    b.read_to_end(&mut all).await.unwrap();
    assert!(all.is_empty());
}

#[tokio::test]
async fn connect_keeps_the_peer_credentials() {
    let dir = std::env::temp_dir().join(format!("bubble-uds-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let (c, s) = tokio::join!(UnixConn::connect(&path), l.accept());
    let mut c = c.unwrap();
    let mut s = UnixConn::from_tokio(s.unwrap().0).unwrap();
    // SAFETY: getuid/getpid have no preconditions.
    let (uid, pid) = unsafe { (libc::getuid(), libc::getpid()) };
    let cred = s.peer_cred().expect("credentials");
    assert_eq!(cred.uid(), uid);
    assert_eq!(cred.pid(), Some(pid));
    c.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Event masks with which `fd` is registered in this process's epoll
/// instances (from /proc/self/fdinfo).
fn epoll_masks(fd: i32) -> Vec<u32> {
    let mut masks = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_epoll = std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().contains("eventpoll"))
            .unwrap_or(false);
        if !is_epoll {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        for line in info.lines() {
            // "tfd:        7 events:       19 data: ..."
            let mut it = line.split_whitespace();
            if it.next() != Some("tfd:") || it.next() != Some(&fd.to_string()) {
                continue;
            }
            if let (Some("events:"), Some(m)) = (it.next(), it.next()) {
                masks.push(u32::from_str_radix(m, 16).unwrap());
            }
        }
    }
    masks
}

/// The point of the crate: the socket is registered without EPOLLOUT, so
/// the peer reading never wakes this side (a tokio `UnixStream` is).
#[tokio::test]
async fn the_socket_is_registered_for_reading_only() {
    let (mut a, mut b) = pair();
    a.write_all(&[1u8; 4096]).await.unwrap();
    let mut buf = vec![0u8; 4096];
    b.read_exact(&mut buf).await.unwrap();
    let fd = a.read.io.get_ref().as_raw_fd();
    let masks = epoll_masks(fd);
    // (Tests run in parallel, each with its own runtime: another epoll
    // instance may list a socket that had this number a moment ago.)
    assert!(!masks.is_empty());
    for m in &masks {
        assert_eq!(m & libc::EPOLLOUT as u32, 0, "{masks:x?}");
        assert_ne!(m & libc::EPOLLIN as u32, 0, "{masks:x?}");
    }

    // A tokio stream, for contrast, is registered for writing too.
    let (c, _d) = tokio::net::UnixStream::pair().unwrap();
    let m = epoll_masks(c.as_raw_fd());
    assert!(m.iter().any(|m| m & libc::EPOLLOUT as u32 != 0), "{m:x?}");
}
