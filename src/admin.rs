//! The admin HTTP server: `/livez` (the process serves), `/readyz` (CRDs are
//! installed and the caches have synced) and `/metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::telemetry::Metrics;

/// Why the operator is not ready yet, or `None` once it is.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<Option<String>>>);

impl Readiness {
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Self(Arc::new(Mutex::new(Some(reason.into()))))
    }
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.0.lock().expect("readiness lock") = Some(reason.into());
    }
    pub fn set_ready(&self) {
        *self.0.lock().expect("readiness lock") = None;
    }
    pub fn reason(&self) -> Option<String> {
        self.0.lock().expect("readiness lock").clone()
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

pub fn router(readiness: Readiness, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness, metrics })
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.readiness.reason() {
        None => (StatusCode::OK, "ok\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics_text(State(state): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening");
    axum::serve(listener, router(readiness, metrics)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(readiness: &Readiness, path: &str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(readiness.clone(), Arc::new(Metrics::default()));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.unwrap();
        server.abort();
        let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, buf)
    }

    #[tokio::test]
    async fn readyz_reports_reason_until_ready() {
        let readiness = Readiness::not_ready("CRDs missing");
        let (code, body) = get_status(&readiness, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("CRDs missing"));
        assert_eq!(get_status(&readiness, "/livez").await.0, 200);
        readiness.set_ready();
        assert_eq!(get_status(&readiness, "/readyz").await.0, 200);
        let (code, body) = get_status(&readiness, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("# EOF"), "{body}");
    }
}
