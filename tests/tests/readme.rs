//! Every command of the README's "Using it" block, run in order against a
//! real broker in a temp dir, so the README cannot drift from the code: a
//! documented command that fails (or a new kind of line this test does not
//! know how to run) fails the test.
//!
//! What the test supplies, and only this: `/var/lib/bubbled` is a temp
//! data dir; port 7443 is the port the broker got; `BUBBLE` is the bubble
//! the last `create` (or `attach`) made, and after `delete BUBBLE` a new
//! one; the files the README names but does not make are written first
//! (`policy.toml` with a grant to `payments`, `attest-policy.toml`
//! allowing the simulated PSP, `key.bin`, `card.txt` (the event published), `ark.der` from the broker's
//! simulated PSP, `examples/`); `bubbled` lines start the broker through
//! the test harness (with a warm pool `small` and this uid as admin in its
//! configuration); `watch` must still be streaming after a second. Not run:
//! `cargo` lines (builds; the demo, the suite and the checkout example have
//! their own tests).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;

/// The logical command lines of the indented block under `heading`.
fn commands(readme: &str, heading: &str) -> Vec<String> {
    let start = readme.find(heading).expect("heading") + heading.len();
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut started = false;
    for line in readme[start..].lines().skip(1) {
        let Some(code) = line.strip_prefix("    ") else {
            if started && !line.trim().is_empty() {
                break;
            }
            continue;
        };
        started = true;
        let code = code.trim();
        if code.starts_with('#') {
            continue;
        }
        // A comment after the command: two spaces then `#`.
        let code = match code.find("  #") {
            Some(i) => code[..i].trim_end(),
            None => code,
        };
        if let Some(head) = code.strip_suffix('\\') {
            cur.push_str(head.trim());
            cur.push(' ');
        } else {
            cur.push_str(code);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

struct Shell {
    path: String,
    work: std::path::PathBuf,
    data: std::path::PathBuf,
    port: u16,
    bubble: String,
    vars: Vec<(String, String)>,
}

impl Shell {
    fn expand(&self, line: &str) -> String {
        line.replace("/var/lib/bubbled", self.data.to_str().unwrap())
            .replace("7443", &self.port.to_string())
            .replace("BUBBLE", &self.bubble)
            // Optional parts shown in brackets are left out.
            .replace(" [--kek-file F]", "")
    }

    fn command(&self, line: &str) -> Command {
        let mut c = Command::new("bash");
        c.args(["-o", "pipefail", "-c", line])
            .current_dir(&self.work)
            .env("PATH", &self.path)
            .env("BUBBLED_SOCKET", self.data.join("bubbled.sock"))
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn run(&self, line: &str) -> String {
        let out = self.command(line).output().unwrap();
        assert!(
            out.status.success(),
            "README command failed: {line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The newest bubble of this parent.
    fn newest(&self) -> String {
        let ids = self.run("bubblectl list -q");
        ids.lines().last().expect("a bubble").to_string()
    }
}

#[test]
fn every_readme_command_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = commands(&readme, "## Using it");
    assert!(lines.len() > 20, "{lines:?}");

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let work = dir.path().join("work");
    let bin = dir.path().join("bin");
    for d in [&data, &work, &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(ctl_bin(), bin.join("bubblectl")).unwrap();
    let mut sh = Shell {
        path: format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        work: work.clone(),
        data: data.clone(),
        port: 0,
        bubble: String::new(),
        vars: Vec::new(),
    };
    // Files the README names but does not make.
    std::fs::write(
        work.join("policy.toml"),
        "fuel_per_call = 2000000\ncall_deadline_ms = 2000\n\
         [[grants]]\nportion = \"payments\"\ncredentials = [\"tokenization_key\"]\n",
    )
    .unwrap();
    std::fs::write(
        work.join("attest-policy.toml"),
        "allow_sim = true\nallow_any_measurement = true\n",
    )
    .unwrap();
    // The event the README publishes: a card number for `tokenize`.
    std::fs::write(work.join("card.txt"), "4111111111111111").unwrap();
    let key = work.join("key.bin");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir_all(work.join("examples/payments")).unwrap();
    std::fs::copy(
        root.join("examples/payments/payments.wat"),
        work.join("examples/payments/payments.wat"),
    )
    .unwrap();
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = format!("uid:{}", unsafe { libc::getuid() });
    let config =
        format!("admins = [\"{me}\"]\n[[pool]]\nname = \"small\"\nmemory_mib = 16\nsize = 1\n");

    let mut broker: Option<BrokerProc> = None;
    let mut ran = 0;
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("cargo") => continue,
            Some("bubbled") => {
                if let Some(mut b) = broker.take() {
                    b.terminate();
                }
                // --data-dir D is the harness's; the rest is the README's.
                let mut args = Vec::new();
                let mut it = words[1..].iter();
                while let Some(w) = it.next() {
                    match *w {
                        "--data-dir" => {
                            it.next();
                        }
                        "--tls-listen" => {
                            it.next();
                            args.extend(["--tls-listen".to_string(), "127.0.0.1:0".into()]);
                        }
                        other => args.push(other.to_string()),
                    }
                }
                let b = BrokerProc::start_with(
                    &data,
                    Opts {
                        config: Some(config.clone()),
                        args,
                        ..Default::default()
                    },
                );
                sh.port = b.tls.map_or(0, |a| a.port());
                broker = Some(b);
                // The simulated PSP's root, which a parent pins.
                let ark = data.join("psp/ark.der");
                if ark.exists() {
                    std::fs::copy(&ark, work.join("ark.der")).unwrap();
                }
            }
            Some("bubblectl") if words.get(1) == Some(&"watch") => {
                let mut child = sh
                    .command(&sh.expand(line))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let end = Instant::now() + Duration::from_secs(1);
                while Instant::now() < end {
                    if let Some(st) = child.try_wait().unwrap() {
                        panic!("README command ended ({st}): {line}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                child.kill().unwrap();
                child.wait().unwrap();
            }
            Some(w) if w.contains("=$(") => {
                let (name, _) = w.split_once('=').unwrap();
                let value = sh.run(&format!("{} && printf %s \"${name}\"", sh.expand(line)));
                sh.vars.push((name.to_string(), value));
            }
            Some("bubblectl") => {
                sh.run(&sh.expand(line));
                match words.get(1).copied() {
                    Some("create") | Some("attach") => sh.bubble = sh.newest(),
                    Some("delete") => {
                        sh.bubble = sh
                            .run("bubblectl create --memory-mib 16 -q")
                            .trim()
                            .to_string();
                    }
                    _ => {}
                }
            }
            _ => panic!("a README line this test cannot run: {line}"),
        }
        ran += 1;
    }
    assert!(ran > 20, "only {ran} commands ran");
}
