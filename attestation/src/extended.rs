//! A single extended-report file: the attestation report followed by the
//! certificate table the host hands out with it (`SNP_GET_EXT_REPORT`),
//! as tools save the two in one file, optionally behind the 32-byte
//! `MSG_REPORT_RSP` header the firmware puts in front of the report
//! (status u32, report size u32, 24 reserved bytes; SEV-SNP ABI, "Guest
//! Messages", `MSG_REPORT_RSP`).
//!
//! Layouts recognised, all bounds-checked:
//! - `report` (1184 bytes) — a plain report;
//! - `report ‖ table` — the table (see [`crate::certs::parse_cert_table`])
//!   starts right after the report;
//! - `report ‖ zeros` — a report in a zero-padded response buffer;
//! - the same three behind a `MSG_REPORT_RSP` header.
//!
//! Anything else (for example hex text) is not an extended report and is
//! left to [`crate::Report::parse_any`].

use crate::certs::{parse_cert_table, CertSet, CertsError};
use crate::report::REPORT_LEN;

/// Length of the `MSG_REPORT_RSP` header.
pub const RSP_HEADER_LEN: usize = 32;

/// A binary report file, split.
#[derive(Debug, PartialEq, Eq)]
pub struct Extended<'a> {
    /// The report's 1184 bytes.
    pub report: &'a [u8],
    /// The certificates of the table that followed it, if one did.
    pub certs: Option<CertSet>,
}

/// Why a binary report file could not be split.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtendedError {
    /// The response header carries a firmware error.
    #[error("MSG_REPORT_RSP status is {0:#x}, not 0: the firmware refused the request")]
    Status(u32),
    /// The response header announces a report of another size.
    #[error("MSG_REPORT_RSP announces a {0}-byte report, not {REPORT_LEN}")]
    ReportSize(u32),
    /// The header's reserved bytes are not zero.
    #[error("MSG_REPORT_RSP reserved bytes are not zero")]
    Reserved,
    /// The file ends inside the report.
    #[error("the file ends inside the report ({0} bytes after the header)")]
    Truncated(usize),
    /// Bytes follow the report and are not a certificate table.
    #[error("{len} bytes follow the report and are not a certificate table: {source}")]
    Table {
        /// How many bytes follow the report.
        len: usize,
        /// Why the table does not parse.
        source: CertsError,
    },
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Splits a binary report file. `Ok(None)`: not binary report data (a
/// report's first field is its version, never 0, and a response header
/// starts with status 0 and size 1184); leave it to the text parser.
pub fn split(b: &[u8]) -> Result<Option<Extended<'_>>, ExtendedError> {
    let (Some(first), Some(second)) = (u32_le(b, 0), u32_le(b, 4)) else {
        return Ok(None);
    };
    let body = if matches!(first, 2..=5) && b.len() >= REPORT_LEN {
        b
    } else if second == REPORT_LEN as u32 && b.len() >= RSP_HEADER_LEN {
        if first != 0 {
            return Err(ExtendedError::Status(first));
        }
        if b.get(8..RSP_HEADER_LEN)
            .is_some_and(|r| r.iter().any(|&x| x != 0))
        {
            return Err(ExtendedError::Reserved);
        }
        b.get(RSP_HEADER_LEN..).unwrap_or(&[])
    } else if first == 0 && b.len() >= RSP_HEADER_LEN && second != 0 && second < 0x1_0000 {
        return Err(ExtendedError::ReportSize(second));
    } else {
        return Ok(None);
    };
    let (Some(report), Some(rest)) = (body.get(..REPORT_LEN), body.get(REPORT_LEN..)) else {
        return Err(ExtendedError::Truncated(body.len()));
    };
    let certs = if rest.iter().all(|&x| x == 0) {
        None
    } else {
        Some(
            parse_cert_table(rest).map_err(|source| ExtendedError::Table {
                len: rest.len(),
                source,
            })?,
        )
    };
    Ok(Some(Extended { report, certs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(version: u32) -> Vec<u8> {
        let mut r = vec![0u8; REPORT_LEN];
        r[..4].copy_from_slice(&version.to_le_bytes());
        r
    }

    fn header(status: u32, size: u32) -> Vec<u8> {
        let mut h = vec![0u8; RSP_HEADER_LEN];
        h[..4].copy_from_slice(&status.to_le_bytes());
        h[4..8].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn plain_padded_and_headed_reports_split() {
        let r = report(3);
        let e = split(&r).ok().flatten();
        assert_eq!(e.map(|e| e.report.len()), Some(REPORT_LEN));
        let mut padded = r.clone();
        padded.resize(4000, 0);
        let e = split(&padded).ok().flatten();
        assert_eq!(e.map(|e| (e.report == &r[..], e.certs)), Some((true, None)));
        let mut headed = header(0, REPORT_LEN as u32);
        headed.extend(&r);
        let e = split(&headed).ok().flatten();
        assert_eq!(e.map(|e| e.report == &r[..]), Some(true));
    }

    #[test]
    fn hostile_headers_and_tails_are_refused_by_name() {
        let mut h = header(0x16, REPORT_LEN as u32);
        h.extend(report(2));
        assert_eq!(split(&h), Err(ExtendedError::Status(0x16)));
        let mut h = header(0, 1000);
        h.extend(report(2));
        assert_eq!(split(&h), Err(ExtendedError::ReportSize(1000)));
        let mut h = header(0, REPORT_LEN as u32);
        h[20] = 1;
        h.extend(report(2));
        assert_eq!(split(&h), Err(ExtendedError::Reserved));
        let h = header(0, REPORT_LEN as u32);
        assert_eq!(split(&h), Err(ExtendedError::Truncated(0)));
        let mut r = report(5);
        r.extend([7u8; 10]);
        assert!(matches!(
            split(&r),
            Err(ExtendedError::Table { len: 10, .. })
        ));
    }

    #[test]
    fn text_and_short_input_are_not_binary_reports() {
        assert_eq!(split(b"0300000000000000"), Ok(None));
        assert_eq!(split(b""), Ok(None));
        assert_eq!(split(&[3, 0, 0]), Ok(None));
        // Every prefix of a headed report either splits, is refused, or
        // is left to the text parser; none panics.
        let mut h = header(0, REPORT_LEN as u32);
        h.extend(report(2));
        for n in 0..h.len() {
            let _ = split(&h[..n]);
        }
    }
}
