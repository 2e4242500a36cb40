//! End to end on real KVM, from `bubblectl` alone: the payments flow
//! (attest with expectations, provision from a private file and from the
//! environment, load a portion, signed portion calls, an over-limit
//! refusal), exit codes by gRPC status, `--json` error shapes, `-q`,
//! idempotency mismatches, a missing broker, and the PKI commands.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use bubble_e2e_tests::*;
use hmac::{Hmac, Mac};

const PAYMENTS: &str = include_str!("../../examples/payments/payments.wat");

fn ctl(socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(ctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs `bubblectl --json ARGS`, expects success, and parses its output.
fn ctl_json(socket: &Path, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut argv = vec!["--json"];
    argv.extend_from_slice(args);
    let out = ctl(socket, &argv, env);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `bubblectl --json ARGS`, expects failure with `exit` and the error
/// `code`, and returns the error's message.
fn ctl_fails(socket: &Path, args: &[&str], env: &[(&str, &str)], exit: i32, code: &str) -> String {
    let mut argv = vec!["--json"];
    argv.extend_from_slice(args);
    let out = ctl(socket, &argv, env);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(exit), "{args:?}: {v}");
    assert_eq!(v["error"]["code"], code, "{args:?}: {v}");
    assert_eq!(v["error"]["exit_code"], exit, "{args:?}: {v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn private_file(p: &Path, body: &[u8], mode: u32) {
    std::fs::write(p, body).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn payments_flow_from_the_cli_alone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let s = broker.socket.as_path();
    let d = dir.path();
    let ark = d.join("psp/ark.der");
    let policy = d.join("policy.toml");
    std::fs::write(
        &policy,
        "fuel_per_call = 2000000\ncall_deadline_ms = 2000\n\
         [credential_rate]\nper_sec = 1000\nburst = 100\n\
         [[grants]]\nportion = \"payments\"\ncredentials = [\"tokenization_key\", \"gateway_key\"]\n",
    )
    .unwrap();
    let wat = d.join("payments.wat");
    std::fs::write(&wat, PAYMENTS).unwrap();

    // The measurement, computed offline.
    let m = ctl_json(s, &["measure", "--memory-mib", "16"], &[]);
    let measurement = m["measurement"].as_str().unwrap().to_string();

    // Create with a policy and idle settings; -q prints the id alone.
    let out = ctl(
        s,
        &[
            "create",
            "--memory-mib",
            "16",
            "--policy-file",
            policy.to_str().unwrap(),
            "--idle-timeout",
            "3600",
            "--idle-action",
            "suspend",
            "--request-id",
            "pay-1",
            "-q",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("b-") && id.len() == 34, "{id:?}");

    // The same request id with other parameters: ALREADY_EXISTS naming the
    // field; with the same ones, the same bubble.
    let msg = ctl_fails(
        s,
        &[
            "create",
            "--memory-mib",
            "32",
            "--policy-file",
            policy.to_str().unwrap(),
            "--request-id",
            "pay-1",
        ],
        &[],
        16,
        "ALREADY_EXISTS",
    );
    assert!(msg.contains("memory_mib"), "{msg}");

    // Load the portion first (text is compiled by the CLI): attesting and
    // provisioning freeze the bubble's code.
    let v = ctl_json(
        s,
        &["portion", "load", &id, "payments", wat.to_str().unwrap()],
        &[],
    );
    assert_eq!(v["module_sha384_hex"].as_str().unwrap().len(), 96);
    let expect_portion = format!("payments={}", wat.display());
    let trust = [
        "--measurement",
        measurement.as_str(),
        "--allow-sim",
        "--ark",
        ark.to_str().unwrap(),
        "--expect-policy-file",
        policy.to_str().unwrap(),
        "--expect-portion",
        &expect_portion,
    ];
    let tok_key = "tokenization-key-of-the-parent-01";
    let key_file = d.join("tok.key");
    // A key file others can read is refused, without echoing the key.
    private_file(&key_file, tok_key.as_bytes(), 0o644);
    let mut args = vec![
        "provision",
        &id,
        "tokenization_key",
        "--from-file",
        key_file.to_str().unwrap(),
    ];
    args.extend_from_slice(&trust);
    let msg = ctl_fails(s, &args, &[], 1, "LOCAL");
    assert!(msg.contains("chmod 600") && !msg.contains(tok_key), "{msg}");
    // A wrong measurement: the attestation is refused, nothing is sent.
    let wrong = "00".repeat(48);
    let mut bad = args.clone();
    bad[6] = &wrong;
    private_file(&key_file, tok_key.as_bytes(), 0o600);
    let msg = ctl_fails(s, &bad, &[], 4, "VERIFICATION_FAILED");
    assert!(msg.contains("measurement"), "{msg}");
    // Right: sealed to the attested key and provisioned.
    let v = ctl_json(s, &args, &[]);
    assert_eq!(v["sealed_to_attested_key"], true);
    // From the environment too.
    let mut args = vec!["provision", &id, "gateway_key", "--from-env", "GW_SEED"];
    args.extend_from_slice(&trust);
    ctl_json(s, &args, &[("GW_SEED", &"*".repeat(32))]);

    // A signed portion call, verified against the attested key.
    let pan = "4111111111111111";
    let mut args = vec![
        "call",
        &id,
        "tokenize",
        "--portion",
        "payments",
        "--input",
        pan,
        "--sign",
        "--output",
        "hex",
    ];
    args.extend_from_slice(&trust);
    let out = ctl(s, &args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        hex(&mac_of(tok_key, pan))
    );
    // The input sealed explicitly (no --sign needed), and opted out of
    // with --plain-input: the same verified answer either way, and the
    // JSON says how the input travelled.
    let tokenized = hex(&mac_of(tok_key, pan));
    // A secret input from a file, not argv (local users read argv).
    let pan_file = d.join("pan.txt");
    std::fs::write(&pan_file, pan).unwrap();
    let pan_file = pan_file.to_str().unwrap();
    for (flags, sealed) in [
        (&["--sealed-input"][..], true),
        (&["--sign", "--plain-input"][..], false),
    ] {
        let mut args = vec!["call", &id, "tokenize", "--portion", "payments"];
        args.extend_from_slice(&["--input-file", pan_file]);
        args.extend_from_slice(flags);
        args.extend_from_slice(&trust);
        let v = ctl_json(s, &args, &[]);
        assert_eq!(v["output_hex"], tokenized.as_str(), "{flags:?}: {v}");
        assert_eq!(v["signature_verified"], true, "{flags:?}: {v}");
        assert_eq!(v["input_sealed"], sealed, "{flags:?}: {v}");
    }
    // Sealed to a recipient's key: the envelope holds no token, opens with
    // that key only, and keygen never overwrites a key.
    let (k1, k2, env) = (d.join("r1.key"), d.join("r2.key"), d.join("env.json"));
    let pk1 = ctl_json(s, &["keygen", "--out", k1.to_str().unwrap()], &[]);
    let pk1 = pk1["public_key"].as_str().unwrap().to_string();
    ctl_json(s, &["keygen", "--out", k2.to_str().unwrap()], &[]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&k1).unwrap().permissions().mode() & 0o777,
        0o600
    );
    ctl_fails(
        s,
        &["keygen", "--out", k1.to_str().unwrap()],
        &[],
        1,
        "LOCAL",
    );
    let mut args = vec!["call", &id, "tokenize", "--portion", "payments"];
    args.extend_from_slice(&["--input-file", pan_file, "--seal-to", &pk1]);
    args.extend_from_slice(&["--output-file", env.to_str().unwrap()]);
    args.extend_from_slice(&trust);
    let v = ctl_json(s, &args, &[]);
    assert_eq!(v["sealed"], true, "{v}");
    assert_eq!(v["signature_verified"], true, "{v}");
    let text = std::fs::read_to_string(&env).unwrap();
    assert!(!text.contains(&tokenized) && !text.contains(pan), "{text}");
    let open = |key: &Path| {
        ctl(
            s,
            &[
                "open",
                env.to_str().unwrap(),
                "--key-file",
                key.to_str().unwrap(),
                "--output",
                "hex",
            ],
            &[],
        )
    };
    let out = open(&k1);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), tokenized);
    let out = open(&k2);
    assert_eq!(
        out.status.code(),
        Some(1),
        "another key must not open it: {out:?}"
    );
    // A sealed input needs a portion (a usage error, exit 2).
    let out = ctl(s, &["call", &id, "echo", "--sealed-input"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Over the portion's limit: FAILED_PRECONDITION (exit 19).
    let big = format!(
        "{}6d65726368616e743d73686f702d31",
        hex(&200_000u64.to_le_bytes())
    );
    ctl_fails(
        s,
        &[
            "call",
            &id,
            "sign_charge",
            "--portion",
            "payments",
            "--input-hex",
            &big,
        ],
        &[],
        19,
        "FAILED_PRECONDITION",
    );
    // An unknown op lists the public ops only.
    let msg = ctl_fails(s, &["call", &id, "nonsense"], &[], 13, "INVALID_ARGUMENT");
    assert!(
        msg.contains("sha256") && !msg.contains("load_portion"),
        "{msg}"
    );
    // Internal guest ops are not reachable through `call`.
    let msg = ctl_fails(
        s,
        &["call", &id, "load_portion"],
        &[],
        13,
        "INVALID_ARGUMENT",
    );
    assert!(msg.contains("internal"), "{msg}");
    // Raw output is the bytes unchanged; text is stable and escaped.
    let out = ctl(
        s,
        &[
            "call",
            &id,
            "echo",
            "--input-hex",
            "1b5b324aff",
            "--output",
            "raw",
        ],
        &[],
    );
    assert_eq!(out.stdout, [0x1b, 0x5b, 0x32, 0x4a, 0xff]);
    let out = ctl(s, &["call", &id, "echo", "--input-hex", "1b5b324aff"], &[]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "\\x1b[2J\\xff\n");

    // list -q prints ids only.
    let out = ctl(s, &["list", "-q"], &[]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{id}\n"));
    let v = ctl_json(s, &["delete", &id], &[]);
    assert_eq!(v["state"], "DELETED");
    // An id that is not this parent's: PERMISSION_DENIED (17).
    let other = format!("b-{}", "0".repeat(32));
    ctl_fails(s, &["describe", &other], &[], 17, "PERMISSION_DENIED");
}

#[test]
fn a_missing_broker_says_where_to_look_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("nobody.sock");
    let out = ctl(&s, &["list"], &[]);
    assert_eq!(out.status.code(), Some(24));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("BUBBLED_SOCKET") && err.contains("--socket"),
        "{err}"
    );
    assert!(err.contains("nobody.sock"), "{err}");
    // Not a debug dump, and no cause said twice.
    assert!(!err.contains("Some(") && !err.contains("Custom {"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let msg = ctl_fails(&s, &["list"], &[], 24, "UNAVAILABLE");
    assert!(msg.contains("BUBBLED_SOCKET"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_sans_force_and_mtls_with_a_name_other_than_localhost() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    let none = dir.path().join("unused.sock");
    let v = ctl_json(
        &none,
        &[
            "pki",
            "init",
            p,
            "--parents",
            "parent-a",
            "--san",
            "broker.test",
            "--san",
            "127.0.0.3",
        ],
        &[],
    );
    assert_eq!(v["sans"][0], "broker.test");
    let mode = std::fs::metadata(&pki).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // add-parent never replaces a key silently.
    let key = pki.join("parents/parent-a.key");
    let before = std::fs::read(&key).unwrap();
    let msg = ctl_fails(
        &none,
        &["pki", "add-parent", p, "parent-a"],
        &[],
        1,
        "LOCAL",
    );
    assert!(msg.contains("--force"), "{msg}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    ctl_json(&none, &["pki", "add-parent", p, "parent-a", "--force"], &[]);
    assert_ne!(std::fs::read(&key).unwrap(), before);
    ctl_fails(
        &none,
        &["pki", "init", &format!("{p}2"), "--san", "a b"],
        &[],
        1,
        "LOCAL",
    );

    // A broker on every address, reached by the SAN 127.0.0.3 (which is
    // not localhost), and refused on 127.0.0.2, which no SAN names.
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec!["--tls-listen".into(), "0.0.0.0:0".into()],
            ..Default::default()
        },
    );
    let port = broker.tls.unwrap().port();
    let tls = |host: &str| {
        let url = format!("https://{host}:{port}");
        Command::new(ctl_bin())
            .args([
                "--json",
                "--endpoint",
                &url,
                "--pki",
                p,
                "--parent",
                "parent-a",
                "list",
            ])
            .output()
            .unwrap()
    };
    let ok = tls("127.0.0.3");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let refused = tls("127.0.0.2");
    assert_eq!(
        refused.status.code(),
        Some(24),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
}

#[test]
fn an_admin_lists_every_parent_and_nobody_else_may() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    bubbled::pki::init(&pki, &["shop".into()]).unwrap();
    // uid:<this process> is the admin; cert:shop is a parent over mTLS.
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = format!("uid:{}", unsafe { libc::getuid() });
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(format!(
                "admins = [\"{me}\"]\n[[pool]]\nname = \"warm\"\nmemory_mib = 8\nsize = 1\n"
            )),
            args: vec!["--tls-listen".into(), "127.0.0.1:0".into()],
            ..Default::default()
        },
    );
    let s = broker.socket.as_path();
    let url = format!("https://localhost:{}", broker.tls.unwrap().port());
    let p = pki.to_str().unwrap();
    let shop = |args: &[&str]| {
        Command::new(ctl_bin())
            .args(["--json", "--endpoint", &url, "--pki", p, "--parent", "shop"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = shop(&["create", "--memory-mib", "8", "-q"]);
    assert!(out.status.success(), "{out:?}");
    let shop_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mine = ctl_json(s, &["create", "--memory-mib", "8"], &[]);
    let mine = mine["bubble_id"].as_str().unwrap().to_string();
    // A parent sees its own only; the admin sees both parents' bubbles and
    // the pool's, each with its owner.
    let out = ctl(s, &["list", "-q"], &[]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{mine}\n"));
    let all = ctl_json(s, &["list", "--all-parents"], &[]);
    let owners: Vec<(String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["bubble_id"].as_str().unwrap().to_string(),
                b["owner"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(owners.contains(&(shop_id, "cert:shop".into())), "{all}");
    assert!(owners.contains(&(mine, me)), "{all}");
    // A non-admin parent asking for every parent's bubbles: refused.
    let out = shop(&["list", "--all-parents"]);
    assert_eq!(out.status.code(), Some(17), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "PERMISSION_DENIED");
}

/// HMAC-SHA256 of `data` under `key`: what the payments portion's
/// `tokenize` answers.
fn mac_of(key: &str, data: &str) -> Vec<u8> {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}
