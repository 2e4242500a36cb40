//! Certificates as other tools hand them over: the extended-report
//! certificate table (GHCB `SNP_GET_EXT_REPORT`, what `snpguest report
//! --extended`-style tools save) and the directory layout `snpguest`
//! writes (`ark`, `ask`/`asvk`, `vcek` or `vlek`, PEM or DER, with or
//! without `.pem`/`.der`/`.crt`/`.cer`).
//!
//! Everything is bounds-checked: a table entry is 24 bytes (GUID, u32 LE
//! offset, u32 LE length, offsets from the start of the table), the table
//! ends with an all-zero entry, and every certificate must lie after the
//! table, inside the buffer, without overlapping another.

use std::path::Path;

/// Size of one table entry.
pub const ENTRY_LEN: usize = 24;
/// Most entries accepted (AMD defines five kinds).
pub const MAX_ENTRIES: usize = 16;
/// Largest certificate file or table accepted.
pub const MAX_CERT_BYTES: usize = 64 << 10;

/// GUIDs of the certificate table (RFC 4122 byte order).
pub mod guid {
    /// ARK.
    pub const ARK: [u8; 16] = uuid(0xc0b406a4, 0xa803, 0x4952, 0x9743_3fb6014cd0ae);
    /// ASK (or ASVK, in a VLEK table).
    pub const ASK: [u8; 16] = uuid(0x4ab7b379, 0xbbac, 0x4fe4, 0xa02f_05aef327c782);
    /// VCEK.
    pub const VCEK: [u8; 16] = uuid(0x63da758d, 0xe664, 0x4564, 0xadc5_f4b93be8accd);
    /// VLEK.
    pub const VLEK: [u8; 16] = uuid(0xa8074bc2, 0xa25a, 0x483e, 0xaae6_39c045a0b8a1);
    /// CRL (kept, not used).
    pub const CRL: [u8; 16] = uuid(0x92f81bc3, 0x5811, 0x4d3d, 0x97ff_d19f88dc67ea);

    const fn uuid(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
        let a = a.to_be_bytes();
        let b = b.to_be_bytes();
        let c = c.to_be_bytes();
        let d = d.to_be_bytes();
        [
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ]
    }
}

/// Why certificates could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertsError {
    /// The table ends before its zero terminator.
    #[error("certificate table is truncated (no zero terminator entry)")]
    Truncated,
    /// Too many entries.
    #[error("certificate table has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// An entry points outside the buffer or into the table.
    #[error("certificate table entry {0} is out of range")]
    OutOfRange(usize),
    /// Two entries overlap.
    #[error("certificate table entries {0} and {1} overlap")]
    Overlap(usize, usize),
    /// The same kind appears twice.
    #[error("certificate table names the {0} twice")]
    Duplicate(&'static str),
    /// An entry is empty.
    #[error("certificate table entry {0} is empty")]
    Empty(usize),
    /// A file could not be read.
    #[error("{path}: {detail}")]
    Io {
        /// The file or directory.
        path: String,
        /// Cause.
        detail: String,
    },
    /// Too big.
    #[error("{0}: larger than {MAX_CERT_BYTES} bytes")]
    TooLarge(String),
    /// Neither PEM nor DER.
    #[error("{0}: not a PEM or DER certificate")]
    Encoding(String),
    /// Two files for one role.
    #[error("{0}: more than one file for this certificate")]
    Ambiguous(String),
    /// No endorsement key.
    #[error("no VCEK or VLEK certificate found")]
    NoEndorsementKey,
}

/// Certificates gathered from a table or directory (DER).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertSet {
    /// ARK.
    pub ark: Option<Vec<u8>>,
    /// ASK (for a VCEK) or ASVK (for a VLEK).
    pub ask: Option<Vec<u8>>,
    /// VCEK.
    pub vcek: Option<Vec<u8>>,
    /// VLEK.
    pub vlek: Option<Vec<u8>>,
}

fn set(slot: &mut Option<Vec<u8>>, v: Vec<u8>, name: &'static str) -> Result<(), CertsError> {
    if slot.is_some() {
        return Err(CertsError::Duplicate(name));
    }
    *slot = Some(v);
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    let a: [u8; 4] = s.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(a)).ok()
}

/// Parses an extended-report certificate table (the table followed by
/// the certificates it points at). Unknown GUIDs and the CRL are skipped
/// (still bounds- and overlap-checked).
pub fn parse_cert_table(buf: &[u8]) -> Result<CertSet, CertsError> {
    if buf.len() > MAX_CERT_BYTES * 8 {
        return Err(CertsError::TooLarge("certificate table".into()));
    }
    let mut entries: Vec<([u8; 16], usize, usize)> = Vec::new();
    let mut at = 0usize;
    loop {
        let e = buf.get(at..at + ENTRY_LEN).ok_or(CertsError::Truncated)?;
        if e.iter().all(|&b| b == 0) {
            break;
        }
        if entries.len() == MAX_ENTRIES {
            return Err(CertsError::TooManyEntries);
        }
        let mut g = [0u8; 16];
        g.copy_from_slice(e.get(..16).ok_or(CertsError::Truncated)?);
        let off = u32_at(e, 16).ok_or(CertsError::Truncated)?;
        let len = u32_at(e, 20).ok_or(CertsError::Truncated)?;
        entries.push((g, off, len));
        at += ENTRY_LEN;
    }
    let table_end = at + ENTRY_LEN;
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (i, &(_, off, len)) in entries.iter().enumerate() {
        if len == 0 {
            return Err(CertsError::Empty(i));
        }
        let end = off.checked_add(len).ok_or(CertsError::OutOfRange(i))?;
        if off < table_end || end > buf.len() {
            return Err(CertsError::OutOfRange(i));
        }
        if let Some(j) = ranges.iter().position(|&(s, e)| off < e && s < end) {
            return Err(CertsError::Overlap(j, i));
        }
        ranges.push((off, end));
    }
    let mut out = CertSet::default();
    for (g, off, len) in entries {
        let Some(der) = buf.get(off..off + len) else {
            continue;
        };
        let der = der.to_vec();
        match g {
            guid::ARK => set(&mut out.ark, der, "ARK")?,
            guid::ASK => set(&mut out.ask, der, "ASK")?,
            guid::VCEK => set(&mut out.vcek, der, "VCEK")?,
            guid::VLEK => set(&mut out.vlek, der, "VLEK")?,
            _ => {}
        }
    }
    Ok(out)
}

/// Builds a table (for tests and tools): entries in order, certificates
/// after the terminator.
pub fn build_cert_table(certs: &[([u8; 16], &[u8])]) -> Vec<u8> {
    let mut off = (certs.len() + 1) * ENTRY_LEN;
    let mut table = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    for (g, der) in certs {
        table.extend(g);
        table.extend((off as u32).to_le_bytes());
        table.extend((der.len() as u32).to_le_bytes());
        body.extend_from_slice(der);
        off += der.len();
    }
    table.extend([0u8; ENTRY_LEN]);
    table.extend(body);
    table
}

/// A certificate file's bytes as DER (PEM with any label, or DER as is;
/// DER must start with a SEQUENCE tag).
pub fn to_der(bytes: &[u8], what: &str) -> Result<Vec<u8>, CertsError> {
    let trimmed = bytes.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        return x509_parser::pem::parse_x509_pem(trimmed)
            .map(|(_, p)| p.contents)
            .map_err(|_| CertsError::Encoding(what.into()));
    }
    if bytes.first() == Some(&0x30) {
        Ok(bytes.to_vec())
    } else {
        Err(CertsError::Encoding(what.into()))
    }
}

/// Reads a certificate file (PEM or DER), size-limited.
pub fn read_cert(path: &Path) -> Result<Vec<u8>, CertsError> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| CertsError::Io {
        path: what.clone(),
        detail: e.to_string(),
    })?;
    if meta.len() > MAX_CERT_BYTES as u64 {
        return Err(CertsError::TooLarge(what));
    }
    let b = std::fs::read(path).map_err(|e| CertsError::Io {
        path: what.clone(),
        detail: e.to_string(),
    })?;
    to_der(&b, &what)
}

/// Reads the directory `snpguest fetch` writes: `ark`, `ask` (or `asvk`),
/// `vcek` and/or `vlek`, each optionally with `.pem`, `.der`, `.crt` or
/// `.cer`, PEM or DER. A `certs.bin` / `cert_table.bin` there is parsed as
/// an extended-report certificate table and fills roles not found as files.
pub fn read_cert_dir(dir: &Path) -> Result<CertSet, CertsError> {
    let mut out = CertSet::default();
    for (stems, slot) in [
        (&["ark"][..], &mut out.ark),
        (&["ask", "asvk"][..], &mut out.ask),
        (&["vcek"][..], &mut out.vcek),
        (&["vlek"][..], &mut out.vlek),
    ] {
        let mut found: Option<std::path::PathBuf> = None;
        for stem in stems {
            for ext in ["", ".pem", ".der", ".crt", ".cer"] {
                let p = dir.join(format!("{stem}{ext}"));
                if p.is_file() {
                    if found.is_some() {
                        return Err(CertsError::Ambiguous(p.display().to_string()));
                    }
                    found = Some(p);
                }
            }
        }
        if let Some(p) = found {
            *slot = Some(read_cert(&p)?);
        }
    }
    for name in ["certs.bin", "cert_table.bin"] {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        let b = std::fs::read(&p).map_err(|e| CertsError::Io {
            path: p.display().to_string(),
            detail: e.to_string(),
        })?;
        let t = parse_cert_table(&b)?;
        out.ark = out.ark.take().or(t.ark);
        out.ask = out.ask.take().or(t.ask);
        out.vcek = out.vcek.take().or(t.vcek);
        out.vlek = out.vlek.take().or(t.vlek);
    }
    if out.vcek.is_none() && out.vlek.is_none() {
        return Err(CertsError::NoEndorsementKey);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_match_the_spec_strings() {
        assert_eq!(hex::encode(guid::VCEK), "63da758de6644564adc5f4b93be8accd");
        assert_eq!(
            hex::encode(guid::ARK),
            "c0b406a4a80349529743".to_owned() + "3fb6014cd0ae"
        );
    }
}
