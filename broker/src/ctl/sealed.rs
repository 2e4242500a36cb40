//! Results sealed to a recipient's key (`call --seal-to`): `keygen` makes
//! the recipient's X25519 key pair, `open` opens a sealed result where the
//! private key is. The sealed result travels as a JSON envelope holding
//! what the seal binds (bubble id, call id, input digest) and the box.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use zeroize::Zeroizing;

use super::output::{hex, unhex, write_output, OutputFormat};
use crate::kek_input::read_private_file;

#[derive(Debug, Args)]
pub(super) struct KeygenArgs {
    /// Where to write the private key (64 hex digits, mode 0600; an
    /// existing file is never overwritten).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub(super) struct OpenArgs {
    /// The sealed result: the JSON envelope `call --seal-to` printed or
    /// wrote with --output-file.
    envelope: PathBuf,
    /// The recipient's private key (from `bubblectl keygen`; 0600).
    #[arg(long)]
    key_file: PathBuf,
    /// How to print the plaintext: text, hex or raw.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// `keygen --out FILE`: a fresh X25519 key pair for sealed results.
pub(super) fn keygen(a: KeygenArgs, j: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let kp = bubble_keys::KemKeyPair::generate(&mut bubble_keys::OsRng);
    let secret = Zeroizing::new(hex(kp.secret_bytes().as_ref()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .with_context(|| format!("creating {} (never overwritten)", a.out.display()))?;
    f.write_all(secret.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", a.out.display()))?;
    let public = hex(&kp.public_key());
    if j {
        println!("{}", json!({"key_file": a.out, "public_key": public}));
    } else {
        println!("{public}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A recipient's public key: 64 hex digits, or a file holding 32 bytes or
/// 64 hex digits.
pub(super) fn recipient_key(arg: &str) -> anyhow::Result<[u8; 32]> {
    let text = if arg.len() == 64 && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
        arg.as_bytes().to_vec()
    } else {
        std::fs::read(arg).with_context(|| format!("reading public key file {arg}"))?
    };
    let raw = if text.len() == 32 {
        text
    } else {
        unhex(std::str::from_utf8(text.trim_ascii()).unwrap_or(""))
            .ok()
            .filter(|b| b.len() == 32)
            .context("a public key is 32 bytes or 64 hex digits")?
    };
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&raw);
    Ok(pk)
}

/// The envelope of a verified sealed result.
pub(super) fn envelope(r: &bubble_client::SealedResult, recipient: &[u8; 32]) -> Vec<u8> {
    json!({
        "bubble_id": r.bubble_id,
        "call_id": r.call_id,
        "input_sha256": hex(&r.input_sha256),
        "recipient": hex(recipient),
        "sealed": hex(&r.sealed),
        "signature_verified": true,
    })
    .to_string()
    .into_bytes()
}

fn private_key(p: &Path) -> anyhow::Result<bubble_keys::KemKeyPair> {
    let raw = read_private_file(p, "sealing key")?;
    let bytes: Zeroizing<Vec<u8>> = if raw.len() == 32 {
        Zeroizing::new(raw.to_vec())
    } else {
        Zeroizing::new(
            unhex(std::str::from_utf8(raw.trim_ascii()).unwrap_or(""))
                .ok()
                .filter(|b| b.len() == 32)
                .context("a sealing key file holds 32 bytes or 64 hex digits")?,
        )
    };
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(&bytes);
    bubble_keys::KemKeyPair::from_secret_bytes(&secret).context("not an X25519 private key")
}

/// `open ENVELOPE --key-file K`: the plaintext of a sealed result.
pub(super) fn open(a: OpenArgs) -> anyhow::Result<ExitCode> {
    let kp = private_key(&a.key_file)?;
    let text = std::fs::read(&a.envelope)
        .with_context(|| format!("reading envelope {}", a.envelope.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).context("the envelope is not JSON from `call --seal-to`")?;
    let field = |k: &str| {
        v[k].as_str()
            .with_context(|| format!("the envelope has no {k:?}"))
    };
    let bubble_id = field("bubble_id")?;
    let call_id = v["call_id"]
        .as_u64()
        .context("the envelope has no \"call_id\"")?;
    let digest: [u8; 32] = unhex(field("input_sha256")?)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("input_sha256 is not 32 bytes"))?;
    let sealed = bubble_keys::SealedBox::decode(&unhex(field("sealed")?)?)
        .context("the sealed box does not decode")?;
    let plain = bubble_keys::open_result(&kp, bubble_id, call_id, &digest, &sealed).context(
        "the sealed result does not open with this key (another recipient's, or altered)",
    )?;
    write_output(plain.expose(), a.output)?;
    Ok(ExitCode::SUCCESS)
}
