//! A real S3-compatible server for the store tests: moto, from PyPI
//! (`.ci/run` installs it), on a free loopback port.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A moto S3 server on a loopback port, killed when dropped.
pub struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One plain HTTP/1.1 request to the server; the raw answer.
pub fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Starts moto on a free loopback port and waits until it answers.
pub fn start_moto() -> Result<(Moto, u16), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    start_moto_on(port).map(|m| (m, port))
}

/// Starts moto on `port` (e.g. again, after a test stopped it) and waits
/// until it answers.
pub fn start_moto_on(port: u16) -> Result<Moto, String> {
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
            return Ok(moto);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("moto did not start within 20 s (is `moto[server]` installed?)".into())
}

/// Environment for a broker that uses the moto store.
pub fn s3_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".to_string(), "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "test".to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ]
}
