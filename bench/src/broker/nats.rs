//! A `nats-server` with JetStream for the NATS metrics: on a free
//! loopback port, its store in the bench's temporary directory, killed
//! when dropped. Its absence is an error (the metric cannot be measured).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running `nats-server -js`.
pub(crate) struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub(crate) url: String,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NatsServer {
    /// Starts one with its store under `dir` and waits (10 s at most) until
    /// it accepts connections.
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let store = dir.join("nats");
        std::fs::create_dir_all(&store)?;
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server (apt install nats-server)")?;
        let server = NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not listen in 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(server)
    }
}
