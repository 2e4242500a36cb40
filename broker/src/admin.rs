//! The admin HTTP endpoint: Prometheus `/metrics` and `/healthz` (the
//! broker's dependencies, see `obs::health`). It is unauthenticated and
//! read-only: `/metrics` carries per-parent gauges that name every parent,
//! so the daemon binds it to a loopback address unless told otherwise
//! (`--admin-listen-public`). Operator actions (quarantine list and lift)
//! are admin gRPC RPCs checked against the configured admin identities.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::core::Broker;

async fn metrics(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.scrape(),
    )
}

/// 200 `ok` while every dependency checks out, else 503 naming each
/// broken one (`obs::health`).
async fn healthz(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    let h = b.health().borrow().clone();
    let code = if h.serving() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{}\n", h.describe()))
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(broker);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
