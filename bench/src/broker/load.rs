//! `bubblectl load` against this broker over mutual TLS on loopback.

use bubbled::server;
use serde_json::json;

use super::Ctx;
use crate::stats::{stat, Stat};

/// 8 parents, each 10 rounds of attach/create, calls, delete, plus 500
/// steady calls on a bubble of its own; the steady calls are the samples.
pub(crate) async fn load_8_parents(x: &Ctx) -> anyhow::Result<Stat> {
    let pki = x.dir.join("pki");
    bubbled::pki::init(&pki, &[])?;
    let listener =
        x.bh.spawn(server::bind_tcp("127.0.0.1:0".parse()?))
            .await??;
    let port = listener.local_addr()?.port();
    let (tls_stop, tls_rx) = tokio::sync::oneshot::channel::<()>();
    let b = x.broker.clone();
    let files = server::TlsFiles::in_pki_dir(&pki);
    let tls = x.bh.spawn(async move {
        server::serve_tls(b, listener, &files, None, async {
            let _ = tls_rx.await;
        })
        .await
    });
    let rep = bubbled::load::run(bubbled::load::LoadSpec {
        endpoint: format!("https://localhost:{port}"),
        pki,
        parents: 8,
        rounds: 10,
        calls_per_round: 5,
        steady_calls: 500,
        profile: Some("warm".into()),
        memory_mib: 16,
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let _ = tls_stop.send(());
    let _ = tls.await;
    let mut s = stat(rep.latencies.get("steady").cloned().unwrap_or_default());
    s.extra.insert("samples".into(), json!("steady calls"));
    s.extra.insert("report".into(), rep.to_json());
    anyhow::ensure!(
        rep.error_count() == 0,
        "load run had errors: {}",
        rep.to_json()
    );
    Ok(s)
}
