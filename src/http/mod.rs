//! The administrator's HTTP interface: health and readiness, Prometheus
//! metrics, a JSON API over the stores, and the status page.
//!
//! Input: requests on `http.listen`. Output: reads of the series index, job
//! store and outbox, and the few operations an administrator needs (retry,
//! dismiss, reload, route test). Every store call is blocking SQLite, so
//! handlers run it on the blocking pool.
//!
//! Security: loopback by default; a bearer token is required for all but
//! health, readiness and the page's static files whenever one is set, and
//! config validation refuses a non-loopback listener without one. Without a
//! token, state-changing requests need a same-origin proof and every host
//! name but a loopback one is refused (`guard`); every response carries a
//! strict Content-Security-Policy and no CORS header. Responses carry UIDs,
//! AE titles, states and values, never patient names or IDs.

mod api;
mod assets;
pub mod cluster;
mod guard;
mod models;
mod plot;
mod thumbnail;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::inference::registry::Models;
use crate::config::ModelConfig;
use crate::job::JobQueue;
use crate::outbox::OutboxHandle;
use crate::routing::stage::SharedRoutes;

/// Re-read the config and swap the routes in: the number of routes now in
/// force, or the problems that refused the new config. Built by `node`,
/// which owns the config file and the routes.
pub type Reload = Box<dyn Fn() -> Result<usize, Vec<String>> + Send + Sync>;

/// What the handlers read and operate on; built once by `node`.
pub struct AppState {
    pub token: Option<String>,
    /// `POST /api/config/reload`: the same reload as SIGHUP.
    pub reload: Reload,
    pub node: NodeInfo,
    pub jobs: JobQueue,
    pub outbox: OutboxHandle,
    pub routes: SharedRoutes,
    pub models: Arc<Models>,
    /// The models as configured (requested execution provider).
    pub model_config: BTreeMap<String, ModelConfig>,
    /// Set once the DICOM listener is bound: readiness means "can receive".
    pub ready: Arc<AtomicBool>,
    /// The DICOM association limit, to report slots in use.
    pub gate: Arc<crate::ingest::Gate>,
    /// Cluster mode: the cluster-wide counts (`/api/cluster`, the
    /// `cluster_*` metrics); `None` on an embedded node.
    pub cluster: Option<cluster::ClusterView>,
}

/// This node as status and readiness report it: fixed for the life of the
/// process (changing any of it needs a restart).
pub struct NodeInfo {
    pub ae_title: String,
    pub dicom_port: u16,
    pub data_dir: PathBuf,
    pub index_path: PathBuf,
    /// Where the spooled instances are (the index holds paths relative to it).
    pub spool_root: PathBuf,
    pub min_free_disk_mb: u64,
    pub started: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/metrics", get(api::metrics))
        .route("/api/status", get(api::status))
        .route("/api/series", get(api::series))
        .route("/api/series/{uid}/routes", get(api::series_routes))
        .route("/api/jobs", get(api::jobs))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/retry", post(api::job_retry))
        .route("/api/jobs/{id}/overlay.png", get(api::job_overlay))
        .route("/api/outbox", get(api::outbox))
        .route("/api/outbox/{id}/retry", post(api::outbox_retry))
        .route("/api/outbox/{id}/dismiss", post(api::outbox_dismiss))
        .route("/api/routes", get(api::routes))
        .route(
            "/api/routes/test",
            post(api::route_test).layer(axum::extract::DefaultBodyLimit::max(api::MAX_UPLOAD)),
        )
        .route("/api/models", get(api::models))
        .route("/api/models/audit", get(models::audit))
        .route("/api/models/{name}/agreement", get(models::agreement))
        .route("/api/models/{name}/agreement.svg", get(models::agreement_svg))
        .route("/api/models/{name}/promote", post(models::promote))
        .route("/api/models/{name}/rollback", post(models::rollback))
        .route("/api/config/reload", post(api::reload))
        .route("/api/cluster", get(cluster::api_cluster))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/", get(assets::index))
        .route("/assets/{name}", get(assets::asset))
        .merge(api)
        .fallback(|| async { (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"error": "no such endpoint"}))) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::same_origin_guard))
        .layer(axum::middleware::map_response(guard::security_headers))
        .with_state(state)
}

/// Bind now (so a port clash fails start-up), serve until `shutdown`.
pub async fn bind(
    addr: SocketAddr,
    state: Shared,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    serve(addr, router(state), shutdown).await
}

/// Binds `addr` now and serves `app` until `shutdown`: the node's server and
/// a receiver's ([`cluster::serve_receiver`]).
async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    let task = tokio::spawn(async move {
        // The peer address, for the audit log of model changes.
        let r = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((local, task))
}

async fn require_token(State(state): State<Shared>, req: Request, next: Next) -> Response {
    check_token(state.token.as_deref(), req, next).await
}

/// The API's bearer-token rule, for the node's server and a receiver's: no
/// token configured lets every request through.
async fn check_token(token: Option<&str>, req: Request, next: Next) -> Response {
    if token.is_none() || guard::has_valid_token(token, req.headers()) {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), "HTTP request without a valid bearer token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({"error": "a valid bearer token is required"})),
    )
        .into_response()
}

/// Token comparison whose time does not depend on where the first
/// difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
