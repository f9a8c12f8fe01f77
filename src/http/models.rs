//! The model versions over HTTP: how a shadow candidate agrees with the
//! active version, the Bland-Altman plot, the audit log, and promote and
//! rollback.
//!
//! Input: the job store (shadow and active runs) and the model store, both
//! through [`Shared`]. Output: JSON, an SVG, and role changes applied to the
//! running node at once ([`Models::refresh`]).
//!
//! Security: promote and rollback change what the PACS is told, so they need
//! the bearer token (`http.token`) even where the rest of the API does not:
//! without one they answer 403 and point to the CLI. The token in a header
//! is what no other page can forge (no CORS, so no cross-origin
//! `Authorization`), on top of the same-origin guard every POST passes. Each
//! change is audited with the remote address and that the token was used.
//!
//! [`Models::refresh`]: crate::inference::registry::Models::refresh

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{blocking, internal, ApiError};
use super::Shared;
use crate::inference::versions::{ModelStore, VersionsError};
use crate::job::shadow::{self, Agreement};

fn store(st: &Shared) -> Result<std::sync::Arc<ModelStore>, ApiError> {
    st.models
        .store()
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::SERVICE_UNAVAILABLE, "this node has no model store".into()))
}

fn known(st: &Shared, name: &str) -> Result<(), ApiError> {
    if st.model_config.contains_key(name) {
        Ok(())
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no model `{name}`")))
    }
}

fn store_error(e: VersionsError) -> ApiError {
    match e {
        VersionsError::UnknownVersion { .. } => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        VersionsError::NothingToRollBack(_) | VersionsError::AlreadyActive { .. } => {
            ApiError(StatusCode::CONFLICT, e.to_string())
        }
        e => internal(e),
    }
}

/// The roles and versions of one model, for `GET /api/models`.
pub fn versions_json(st: &Shared, name: &str) -> Value {
    let Some(store) = st.models.store() else {
        return json!({});
    };
    let roles = store.roles(name).unwrap_or_default();
    json!({
        "active_version": store.active_version(name).ok().flatten(),
        "candidate_version": st.models.candidate(name).map(|m| m.card.version.clone()),
        "previous_version": roles.previous,
        "versions": store.versions(name).unwrap_or_default(),
    })
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: Option<String>,
}

/// The agreement of `version`, else of the candidate, else of the version
/// that ran in shadow last (so the numbers stay visible after a promotion).
fn agreement_of(st: &Shared, name: &str, version: Option<String>) -> Result<Agreement, ApiError> {
    known(st, name)?;
    let jobs = st.jobs.list().map_err(internal)?;
    let version = version
        .or_else(|| st.models.candidate(name).map(|m| m.card.version.clone()))
        .or_else(|| shadow::shadow_versions(&jobs, name).into_iter().next())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("model `{name}` has no candidate and no shadow runs")))?;
    Ok(shadow::agreement(&jobs, name, &version))
}

/// `GET /api/models/{name}/agreement[?version=V]`.
pub async fn agreement(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Json<Value>, ApiError> {
    let a = blocking(move || agreement_of(&st, &name, q.version)).await?;
    let mut v = serde_json::to_value(&a).map_err(internal)?;
    // Both overlays of each discordant series, as the job API serves them.
    if let Some(worst) = v.get_mut("worst").and_then(Value::as_array_mut) {
        for (w, p) in worst.iter_mut().zip(&a.worst) {
            w["active_overlay"] = format!("/api/jobs/{}/overlay.png", p.active_job).into();
            w["candidate_overlay"] = format!("/api/jobs/{}/overlay.png", p.candidate_job).into();
        }
    }
    Ok(Json(v))
}

/// `GET /api/models/{name}/agreement.svg[?version=V]`: the Bland-Altman plot.
pub async fn agreement_svg(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Response, ApiError> {
    let a = blocking(move || agreement_of(&st, &name, q.version)).await?;
    let svg = super::plot::bland_altman(&a);
    Ok(([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "no-store")], svg).into_response())
}

/// `GET /api/models/audit`: every change, oldest first.
pub async fn audit(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let entries = blocking(move || store(&st)?.audit(None).map_err(store_error)).await?;
    Ok(Json(serde_json::to_value(entries).map_err(internal)?))
}

/// Who is asking: the remote address and whether the token was shown. Only
/// a request with the token gets this far (see the module header).
fn caller(st: &Shared, req: &Request) -> Result<String, ApiError> {
    if st.token.is_none() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "changing model versions over HTTP needs http.token; set one, or use `biomarker-node models` on the node"
                .into(),
        ));
    }
    if !super::guard::has_valid_token(st.token.as_deref(), req.headers()) {
        return Err(ApiError(StatusCode::UNAUTHORIZED, "a valid bearer token is required".into()));
    }
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    Ok(format!("http {addr} token=yes"))
}

#[derive(Deserialize)]
struct PromoteBody {
    version: String,
}

/// `POST /api/models/{name}/promote` with `{"version": "..."}`.
pub async fn promote(State(st): State<Shared>, Path(name): Path<String>, req: Request) -> Result<Json<Value>, ApiError> {
    let who = caller(&st, &req)?;
    let body = axum::body::to_bytes(req.into_body(), 64 << 10)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let PromoteBody { version } = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("expected {{\"version\": \"...\"}}: {e}")))?;
    switch(st, name, move |s, n| s.promote(n, &version, &who)).await
}

/// `POST /api/models/{name}/rollback`.
pub async fn rollback(State(st): State<Shared>, Path(name): Path<String>, req: Request) -> Result<Json<Value>, ApiError> {
    let who = caller(&st, &req)?;
    switch(st, name, move |s, n| s.rollback(n, &who)).await
}

async fn switch(
    st: Shared,
    name: String,
    op: impl FnOnce(&ModelStore, &str) -> Result<crate::inference::versions::Switch, VersionsError> + Send + 'static,
) -> Result<Json<Value>, ApiError> {
    let s = blocking(move || {
        known(&st, &name)?;
        let sw = op(&*store(&st)?, &name).map_err(store_error)?;
        // Applied now, not at the next poll: the answer says what runs.
        st.models.refresh().map_err(internal)?;
        let running = st.models.version(&name);
        Ok(json!({ "model": sw.model, "from": sw.from, "to": sw.to, "active_version": running }))
    })
    .await?;
    Ok(Json(s))
}
