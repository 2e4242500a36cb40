//! The parsing path of `bubblectl attest verify` on arbitrary bytes: the
//! report (raw or hex), the extended-report certificate table, every
//! certificate in it (PEM or DER), and verification against AMD's roots
//! and against roots taken from the input. Nothing may panic.
#![no_main]

use bubble_attestation::{certs, cli, verify, Report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, tail) = data.split_at(data.len().min(bubble_attestation::report::REPORT_LEN));
    let report = Report::parse(head).ok().or_else(|| Report::parse_any(data).ok());
    let table = certs::parse_cert_table(tail).ok();
    let pem_or_der = certs::to_der(tail, "input").ok();
    // The whole input as one extended-report file.
    if let Ok(Some(e)) = bubble_attestation::extended::split(data) {
        let _ = Report::parse(e.report);
    }
    if let Some(r) = &report {
        let _ = cli::describe(r, None);
        let _ = verify::precheck(r);
        let _ = r.cpuid_product();
        let _ = r.signature();
    }
    let mut ders: Vec<Vec<u8>> = Vec::new();
    if let Some(t) = table {
        ders.extend([t.vcek, t.vlek, t.ask, t.ark].into_iter().flatten());
    }
    ders.extend(pem_or_der);
    for der in &ders {
        let _ = verify::cert_kind(der);
        let _ = verify::vcek_tcb(der, true);
        let _ = verify::product_of(der);
        if let Some(r) = &report {
            let _ = verify::verify_amd(r, der, None);
            let _ = verify::resolve_product(r, None, der);
        }
    }
    if let (Some(r), [a, b, c, ..]) = (&report, ders.as_slice()) {
        let _ = verify::verify_with_roots(r, a, b, c);
    }
});
