//! Watching what the host side sees: a recording proxy in front of the
//! broker's socket, and searching files for a secret.

// The test harness: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Unix-socket proxy in front of the broker that records every byte of
/// the gRPC traffic in both directions.
pub async fn recording_proxy(
    broker_sock: std::path::PathBuf,
    at: std::path::PathBuf,
) -> Arc<Mutex<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = tokio::net::UnixListener::bind(&at).unwrap();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((c, _)) = l.accept().await else { return };
            let b = tokio::net::UnixStream::connect(&broker_sock).await.unwrap();
            let (mut cr, mut cw) = c.into_split();
            let (mut br, mut bw) = b.into_split();
            let (up, down) = (s2.clone(), s2.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || bw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    up.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = br.read(&mut buf).await {
                    if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    down.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    seen
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}
