//! Where `bubblectl` reads a parent's secrets (a key-encryption key, a
//! credential to provision) from: a private file, standard input or an
//! environment variable — never argv, which any user on the host can read
//! in `/proc/<pid>/cmdline`.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use zeroize::Zeroizing;

/// Environment variable holding a KEK in hex (used when no file is given).
pub const KEK_ENV: &str = "BUBBLECTL_KEK";

/// Reads the KEK: from `file` (`-` is standard input) if given, else from
/// [`KEK_ENV`] if set, else none (empty: the broker's own key). The text is
/// 64 hex digits or 32 raw bytes; a file must not be readable or writable by
/// group or others.
pub fn read_kek(file: Option<&Path>) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let raw = match file {
        Some(p) if p == Path::new("-") => read_stdin("the key-encryption key")?,
        Some(p) => read_private_file(p, "key-encryption key")?,
        None => match std::env::var_os(KEK_ENV) {
            Some(v) => Zeroizing::new(v.into_encoded_bytes()),
            None => return Ok(Zeroizing::new(Vec::new())),
        },
    };
    decode(&raw)
}

/// Reads all of standard input (`what` names it in errors).
pub fn read_stdin(what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {what} from standard input"))?;
    Ok(buf)
}

/// Reads a secret file (`what` names it in errors) that neither group nor
/// others may read or write; the error never holds its content.
pub fn read_private_file(p: &Path, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).with_context(|| format!("{what} file {}", p.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{what} file {} has mode {mode:03o}; make it private (chmod 600)",
        p.display()
    );
    let bytes = std::fs::read(p).with_context(|| format!("reading {what} file {}", p.display()))?;
    Ok(Zeroizing::new(bytes))
}

/// 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
fn decode(raw: &[u8]) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if raw.len() == 32 {
        return Ok(Zeroizing::new(raw.to_vec()));
    }
    let text = raw.trim_ascii();
    anyhow::ensure!(
        text.len() == 64,
        "a key-encryption key is 32 bytes or 64 hex digits"
    );
    let mut out = Zeroizing::new(Vec::with_capacity(32));
    for pair in text.chunks_exact(2) {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
            _ => anyhow::bail!("a key-encryption key is 32 bytes or 64 hex digits"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, body: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn private_file_in_hex_or_raw_is_read() {
        let d = tempfile::tempdir().unwrap();
        let hex = "ab".repeat(32) + "\n";
        let p = write(d.path(), "hex", hex.as_bytes(), 0o600);
        assert_eq!(&*read_kek(Some(&p)).unwrap(), &[0xab; 32]);
        let p = write(d.path(), "raw", &[7u8; 32], 0o400);
        assert_eq!(&*read_kek(Some(&p)).unwrap(), &[7u8; 32]);
    }

    #[test]
    fn readable_by_others_is_refused_without_echoing_the_key() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            let p = write(d.path(), "k", "cd".repeat(32).as_bytes(), mode);
            let e = read_kek(Some(&p)).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
            assert!(!e.contains("cdcd"), "the error must not contain the key");
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            b"".to_vec(),
            b"abcd".to_vec(),
            "zz".repeat(32).into_bytes(),
            "ab".repeat(33).into_bytes(),
            vec![1u8; 31],
        ] {
            let e = decode(&bad).unwrap_err().to_string();
            assert!(e.contains("32 bytes or 64 hex digits"), "{e}");
        }
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = read_kek(Some(Path::new("/nonexistent/kek"))).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/kek"));
    }
}
