//! JSON handlers. Each reads the stores on the blocking pool and answers
//! `{"error": ...}` with a 4xx/5xx status when it cannot.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::Shared;
use crate::job::{Job, JobResult, JobState};
use crate::outbox::{ItemState, OutboxItem};
use crate::series::{SeriesIndex, SeriesSummary};
use crate::telemetry::METRICS;

/// Largest DICOM file the route tester takes.
pub const MAX_UPLOAD: usize = 64 << 20;
const DEFAULT_LIMIT: usize = 200;

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// SQLite and file work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<usize>,
}

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready = the DICOM listener is up, the index opens, and there is disk
/// above the watermark (below it the node refuses new associations).
pub async fn readyz(State(st): State<Shared>) -> Response {
    let s = st.clone();
    let checks = blocking(move || {
        let index = SeriesIndex::open_readonly(&s.node.index_path).map(|_| ()).map_err(|e| e.to_string());
        let free = crate::spool::free_bytes(&s.node.data_dir).map_err(|e| e.to_string());
        let need = s.node.min_free_disk_mb.saturating_mul(1024 * 1024);
        let disk = match free {
            Ok(f) if f >= need => Ok(()),
            Ok(f) => Err(format!("{} MiB free, below node.min_free_disk_mb {}", f >> 20, s.node.min_free_disk_mb)),
            Err(e) => Err(e),
        };
        let listener = if s.is_ready() { Ok(()) } else { Err("not listening yet".to_owned()) };
        Ok(vec![("dicom_listener", listener), ("series_index", index), ("disk", disk)])
    })
    .await;
    let checks = match checks {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let body: BTreeMap<_, _> = checks
        .into_iter()
        .map(|(k, r)| (k, r.err().unwrap_or_else(|| "ok".into())))
        .collect();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({ "ready": ready, "checks": body, "models": model_providers(&st) }))).into_response()
}

/// Which execution provider each configured model actually runs on (after the
/// start-up check: a CUDA model whose provider failed runs on `cpu`), next to
/// the one requested. Informational: a CPU fallback is allowed unless the
/// model is `fail_hard`, in which case the node would not have started.
fn model_providers(st: &Shared) -> BTreeMap<String, Value> {
    st.model_config
        .iter()
        .map(|(name, cfg)| {
            let v = match st.models.get(name) {
                Ok(m) => json!({
                    "execution_provider": m.provider.as_str(),
                    "requested": cfg.execution_provider.as_str(),
                }),
                Err(e) => json!({
                    "execution_provider": null,
                    "requested": cfg.execution_provider.as_str(),
                    "error": e.reason,
                }),
            };
            (name.clone(), v)
        })
        .collect()
}

/// Counts by state of everything stored, for /metrics and /api/status.
struct StoredCounts {
    series: BTreeMap<String, i64>,
    jobs: BTreeMap<String, i64>,
    outbox: BTreeMap<String, i64>,
    free_disk_bytes: Option<u64>,
}

fn stored_counts(st: &Shared) -> Result<StoredCounts, ApiError> {
    let index = SeriesIndex::open_readonly(&st.node.index_path).map_err(internal)?;
    Ok(StoredCounts {
        series: index.count_by_state().map_err(internal)?.into_iter().collect(),
        jobs: st.jobs.count_by_state().map_err(internal)?.into_iter().collect(),
        outbox: st.outbox.count_by_state().map_err(internal)?.into_iter().collect(),
        free_disk_bytes: crate::spool::free_bytes(&st.node.data_dir).ok(),
    })
}

fn list_series(st: &Shared) -> Result<Vec<SeriesSummary>, ApiError> {
    let index = SeriesIndex::open_readonly(&st.node.index_path).map_err(internal)?;
    index.list_series().map_err(internal)
}

pub async fn metrics(State(st): State<Shared>) -> Result<Response, ApiError> {
    let s = st.clone();
    let c = blocking(move || stored_counts(&s)).await?;
    let m = &*METRICS;
    fn pairs(map: &BTreeMap<String, i64>) -> impl Iterator<Item = (&str, i64)> {
        map.iter().map(|(k, v)| (k.as_str(), *v))
    }
    crate::telemetry::Metrics::set_states(&m.series, pairs(&c.series));
    crate::telemetry::Metrics::set_states(&m.jobs_by_state, pairs(&c.jobs));
    crate::telemetry::Metrics::set_states(&m.outbox_items, pairs(&c.outbox));
    if let Some(f) = c.free_disk_bytes {
        m.free_disk_bytes.set(f.min(i64::MAX as u64) as i64);
    }
    m.connections_open.set(st.gate.in_use() as i64);
    m.association_limit.set(st.gate.limit() as i64);
    if let Some(view) = &st.cluster {
        view.set_metrics().await;
    }
    Ok((
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        m.encode(),
    )
        .into_response())
}

pub async fn status(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let s = st.clone();
    let c = blocking(move || stored_counts(&s)).await?;
    let uptime = SystemTime::now().duration_since(st.node.started).unwrap_or_default().as_secs();
    Ok(Json(json!({
        "ae_title": st.node.ae_title,
        "dicom_port": st.node.dicom_port,
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": crate::store::rfc3339(st.node.started),
        "uptime_s": uptime,
        "ready": st.is_ready(),
        "series": c.series,
        "jobs": c.jobs,
        "outbox": c.outbox,
        "free_disk_bytes": c.free_disk_bytes,
        "dicom_connections": st.gate.in_use(),
        "association_limit": st.gate.limit(),
    })))
}

pub async fn series(State(st): State<Shared>, Query(q): Query<Limit>) -> Result<Json<Vec<SeriesSummary>>, ApiError> {
    let mut all = blocking(move || list_series(&st)).await?;
    all.truncate(q.limit.unwrap_or(DEFAULT_LIMIT));
    Ok(Json(all))
}

/// When each step of a job happened: receive → complete → inference →
/// delivered. RFC 3339 UTC; `None` for steps not reached.
#[derive(Debug, Serialize, PartialEq)]
pub struct Timeline {
    pub first_received_at: Option<String>,
    pub last_received_at: Option<String>,
    pub completed_at: Option<String>,
    pub queued_at: String,
    pub inference_started_at: Option<String>,
    pub inference_finished_at: Option<String>,
    pub reported_at: Option<String>,
    /// When the last of the job's reports reached every destination.
    pub delivered_at: Option<String>,
    /// `none` (no destination), `pending`, `delivered`, `dead` or `dismissed`.
    pub delivery: String,
    /// Last instance received → all reports delivered (or reported, when
    /// nothing is sent), in seconds.
    pub time_to_result_s: Option<f64>,
}

fn parse(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

fn seconds_between(a: Option<&str>, b: Option<&str>) -> Option<f64> {
    let (a, b) = (parse(a?)?, parse(b?)?);
    Some(((b - a).as_seconds_f64() * 1000.0).round() / 1000.0)
}

/// The report SOP Instance UIDs a finished job produced.
fn report_uids(result: Option<&JobResult>) -> Vec<&str> {
    result.map(|r| r.reports.iter().map(|f| f.sop_instance_uid.as_str()).collect()).unwrap_or_default()
}

pub fn timeline(job: &Job, series: Option<&SeriesSummary>, outbox: &HashMap<String, Vec<&OutboxItem>>) -> Timeline {
    let result = job.typed_result();
    let items: Vec<&OutboxItem> = report_uids(result.as_ref())
        .into_iter()
        .flat_map(|u| outbox.get(u).cloned().unwrap_or_default())
        .collect();
    let all = |s: ItemState| !items.is_empty() && items.iter().all(|i| i.state == s);
    let delivery = if items.is_empty() {
        "none"
    } else if all(ItemState::Delivered) {
        "delivered"
    } else if items.iter().any(|i| i.state == ItemState::Dead) {
        "dead"
    } else if items.iter().any(|i| i.state == ItemState::Dismissed) {
        "dismissed"
    } else {
        "pending"
    };
    let delivered_at = (delivery == "delivered")
        .then(|| items.iter().filter_map(|i| i.delivered_at).max())
        .flatten()
        .map(crate::store::rfc3339);
    let inference_finished_at = result.map(|r| r.inference_finished_at);
    let reported_at = (job.state == JobState::Done).then(|| job.finished_at.clone()).flatten();
    let last_received_at = series.map(|s| s.last_received_at.clone());
    let end = if delivery == "none" { reported_at.as_deref() } else { delivered_at.as_deref() };
    Timeline {
        first_received_at: series.map(|s| s.first_received_at.clone()),
        time_to_result_s: seconds_between(last_received_at.as_deref(), end),
        last_received_at,
        completed_at: series.and_then(|s| s.completed_at.clone()),
        queued_at: job.created_at.clone(),
        inference_started_at: job.started_at.clone(),
        inference_finished_at,
        reported_at,
        delivered_at,
        delivery: delivery.into(),
    }
}

#[derive(Serialize)]
pub struct JobView {
    #[serde(flatten)]
    job: Job,
    timeline: Timeline,
    /// URL of a PNG of the first overlay image, when the job made one.
    overlay: Option<String>,
    /// A candidate version's shadow run: kept, never sent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow: bool,
}

fn overlay_path(job: &Job) -> Option<PathBuf> {
    job.typed_result()?.reports.into_iter().map(|r| r.path).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("sc-"))
    })
}

fn job_views(st: &Shared, jobs: Vec<Job>) -> Result<Vec<JobView>, ApiError> {
    let series: HashMap<String, SeriesSummary> = list_series(st)?
        .into_iter()
        .map(|s| (s.series_instance_uid.as_str().to_owned(), s))
        .collect();
    let items = st.outbox.list().map_err(internal)?;
    let mut by_uid: HashMap<String, Vec<&OutboxItem>> = HashMap::new();
    for i in &items {
        by_uid.entry(i.sop_instance_uid.clone()).or_default().push(i);
    }
    Ok(jobs
        .into_iter()
        .map(|job| {
            let timeline = timeline(&job, series.get(&job.key.series_instance_uid), &by_uid);
            let overlay = overlay_path(&job).map(|_| format!("/api/jobs/{}/overlay.png", job.id));
            let shadow = job.resolved.as_ref().is_some_and(|r| r.shadow);
            JobView { job, timeline, overlay, shadow }
        })
        .collect())
}

/// Newest first.
pub async fn jobs(State(st): State<Shared>, Query(q): Query<Limit>) -> Result<Json<Vec<JobView>>, ApiError> {
    let views = blocking(move || {
        let recent = st.jobs.recent(q.limit.unwrap_or(DEFAULT_LIMIT)).map_err(internal)?;
        job_views(&st, recent)
    })
    .await?;
    Ok(Json(views))
}

fn not_found(what: &str, id: i64) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no {what} {id}"))
}

pub async fn job(State(st): State<Shared>, Path(id): Path<i64>) -> Result<Json<JobView>, ApiError> {
    let view = blocking(move || {
        let job = st.jobs.get(id).map_err(internal)?.ok_or_else(|| not_found("job", id))?;
        Ok(job_views(&st, vec![job])?.pop())
    })
    .await?;
    view.map(Json).ok_or_else(|| not_found("job", id))
}

pub async fn job_retry(State(st): State<Shared>, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    let s = st.clone();
    let ok = blocking(move || {
        s.jobs.get(id).map_err(internal)?.ok_or_else(|| not_found("job", id))?;
        s.jobs.retrigger(id).map_err(internal)
    })
    .await?;
    if !ok {
        return Err(ApiError(StatusCode::CONFLICT, format!("job {id} is not finished (done, failed or refused)")));
    }
    st.jobs.wake();
    tracing::info!(job = id, "job re-run requested over HTTP");
    Ok(Json(json!({ "id": id, "state": "pending" })))
}

pub async fn job_overlay(State(st): State<Shared>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    let png = blocking(move || {
        let job = st.jobs.get(id).map_err(internal)?.ok_or_else(|| not_found("job", id))?;
        let path = overlay_path(&job).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("job {id} has no overlay")))?;
        super::thumbnail::png_from_sc(&path, 256).map_err(internal)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "max-age=3600")], png).into_response())
}

pub async fn outbox(State(st): State<Shared>, Query(q): Query<Limit>) -> Result<Json<Vec<OutboxItem>>, ApiError> {
    let mut items = blocking(move || st.outbox.list().map_err(internal)).await?;
    items.reverse();
    items.truncate(q.limit.unwrap_or(DEFAULT_LIMIT));
    Ok(Json(items))
}

async fn outbox_op(st: Shared, id: i64, op: &'static str) -> Result<Json<Value>, ApiError> {
    let item = blocking(move || {
        let item = st.outbox.get(id).map_err(internal)?.ok_or_else(|| not_found("outbox item", id))?;
        let ok = match op {
            "retry" => st.outbox.retry(id),
            _ => st.outbox.dismiss(id),
        }
        .map_err(internal)?;
        if !ok {
            let allowed = if op == "retry" { "a dead letter or a pending item" } else { "a dead letter" };
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("outbox item {id} is {}, only {allowed} can be {op}ed", item.state.as_str()),
            ));
        }
        st.outbox.get(id).map_err(internal)?.ok_or_else(|| not_found("outbox item", id))
    })
    .await?;
    tracing::info!(item = id, op, sop_instance_uid = %item.sop_instance_uid, "outbox operation over HTTP");
    Ok(Json(serde_json::to_value(item).map_err(internal)?))
}

pub async fn outbox_retry(State(st): State<Shared>, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    outbox_op(st, id, "retry").await
}

pub async fn outbox_dismiss(State(st): State<Shared>, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    outbox_op(st, id, "dismiss").await
}

pub async fn routes(State(st): State<Shared>) -> Json<Value> {
    let table = st.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
    Json(Value::Array(
        table
            .routes
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "model": r.model,
                    "send_to": r.send_to,
                    "slices": r.slices.as_ref().map(|s| s.to_string()),
                    "match": r.spec,
                })
            })
            .collect(),
    ))
}

/// Route one uploaded DICOM file as if it were a whole series: which routes
/// match and what the input guard says of each (header and pixels), and for
/// the others the first condition that failed.
pub async fn route_test(State(st): State<Shared>, body: Bytes) -> Result<Json<Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "send one DICOM file as the request body".into()));
    }
    let table = st.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
    let tmp = st.node.data_dir.join("tmp");
    let models = st.models.clone();
    blocking(move || {
        use crate::routing::{Derived, SeriesFacts};
        use crate::series::scan;
        std::fs::create_dir_all(&tmp).map_err(internal)?;
        let path = tmp.join(format!("route-test-{}.dcm", uuid::Uuid::new_v4()));
        std::fs::write(&path, &body).map_err(internal)?;
        let _cleanup = RemoveOnDrop(path.clone());
        let mut notes = Vec::new();
        let found = scan::collect(std::slice::from_ref(&path), &mut notes);
        let unusable = |why: String| ApiError(StatusCode::UNPROCESSABLE_ENTITY, why);
        let Some(series) = found.into_iter().next() else {
            let why = notes.first().map(|n| n.reason.clone()).unwrap_or_else(|| "not a DICOM file".into());
            return Err(unusable(format!("the node would not accept this file: {why}")));
        };
        let facts = SeriesFacts::load(&series.instances).map_err(|e| unusable(e.to_string()))?;
        let derived: BTreeMap<&str, Option<String>> = Derived::names()
            .into_iter()
            .map(|n| (n, Derived::parse(n).and_then(|d| facts.derived(d)).map(|v| v.to_string())))
            .collect();
        let files = [path.clone()];
        Ok(Json(json!({
            "series_instance_uid": series.uid,
            "derived": derived,
            "routes": route_outcomes(&table, &facts, &files, &models),
        })))
    })
    .await
}

/// Every route's verdict on a series: for a match, the model, destinations,
/// slice selection and what the model's input guard says (header and pixel
/// checks, as the job would run them: `job::verdict`); for the others the
/// first condition that failed.
fn route_outcomes(
    table: &crate::routing::RouteTable,
    facts: &crate::routing::SeriesFacts,
    files: &[PathBuf],
    models: &crate::inference::registry::Models,
) -> Vec<Value> {
    table
        .evaluate(facts)
        .into_iter()
        .map(|o| match &o.matched {
            Some(m) => {
                let model = models.get(&m.model).ok();
                let guard =
                    crate::job::verdict::guard_verdict(model.as_ref().map(|m| &m.card), m.slices.as_ref(), files, true);
                json!({"route": o.route, "matched": true, "model": m.model, "send_to": m.send_to,
                       "slices": m.slices.as_ref().map(|s| s.to_string()), "guard": guard})
            }
            None => json!({"route": o.route, "matched": false, "failed_at": o.verdict.at, "reason": o.verdict.why}),
        })
        .collect()
}

/// Route a stored series as the routing stage would, with the guard's
/// verdict for every match: the route tester for a whole volume, whose
/// level and HU checks need every slice. Decodes the series; nothing is
/// stored or queued. 404 when the series is not in the spool.
pub async fn series_routes(State(st): State<Shared>, Path(uid): Path<String>) -> Result<Json<Value>, ApiError> {
    let table = st.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
    let s = st.clone();
    blocking(move || {
        let not_found = || ApiError(StatusCode::NOT_FOUND, format!("series {uid} is not in the spool"));
        let parsed = crate::dicom::Uid::parse(&uid).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
        let index = SeriesIndex::open_readonly(&s.node.index_path).map_err(internal)?;
        let instances = index.series_instances(&parsed).map_err(internal)?;
        if instances.is_empty() {
            return Err(not_found());
        }
        let facts = crate::routing::SeriesFacts::load_spooled(&s.node.spool_root, &instances)
            .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        let files: Vec<PathBuf> = instances.into_iter().map(|(p, _)| s.node.spool_root.join(p)).collect();
        Ok(Json(json!({
            "series_instance_uid": uid,
            "instances": files.len(),
            "routes": route_outcomes(&table, &facts, &files, &s.models),
        })))
    })
    .await
}

/// tmp/ is also emptied at start-up, so a crash leaves nothing behind.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn models(State(st): State<Shared>) -> Json<Value> {
    let list: Vec<Value> = st
        .model_config
        .iter()
        .map(|(name, cfg)| match st.models.get(name) {
            Ok(m) => merge(json!({
                "name": name,
                "status": "loaded",
                "card": m.card.name,
                "version": m.card.version,
                "task": m.card.task,
                "sha256": m.card.sha256,
                "execution_provider_requested": cfg.execution_provider.as_str(),
                "execution_provider": m.provider.as_str(),
                "max_concurrency": cfg.max_concurrency,
            }), super::models::versions_json(&st, name)),
            Err(e) => json!({
                "name": name,
                "status": "unavailable",
                "error": e.to_string(),
                "execution_provider_requested": cfg.execution_provider.as_str(),
            }),
        })
        .collect();
    Json(Value::Array(list))
}

/// `a` with `b`'s keys added.
fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

pub async fn reload(State(st): State<Shared>) -> Response {
    let s = st.clone();
    let r = blocking(move || Ok((s.reload)())).await;
    match r {
        Ok(Ok(n)) => Json(json!({ "reloaded": true, "routes": n })).into_response(),
        Ok(Err(problems)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "reloaded": false, "problems": problems, "note": "the previous config stays in force" })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobKey;

    fn job(state: JobState, reports: &[&str]) -> Job {
        Job {
            id: 1,
            key: JobKey {
                series_instance_uid: "1.2.3".into(),
                route: "r".into(),
                model: "m".into(),
                model_version: "1".into(),
                generation: 1,
            },
            state,
            attempts: 1,
            error: None,
            result: Some(json!({
                "series_instance_uid": "1.2.3", "route": "r", "model": "m", "model_version": "1",
                "biomarker": "cac", "value": 1.0, "unit": "1", "execution_provider": "cpu",
                "slices": 1, "elapsed_ms": 1.0,
                "inference_finished_at": "2026-01-01T00:00:02.500Z",
                "reports": reports.iter().map(|u| json!({"path": format!("/x/{u}.dcm"), "sop_instance_uid": u})).collect::<Vec<_>>(),
            })),
            created_at: "2026-01-01T00:00:01Z".into(),
            started_at: Some("2026-01-01T00:00:02Z".into()),
            finished_at: Some("2026-01-01T00:00:03Z".into()),
            resolved: None,
        }
    }

    fn series() -> SeriesSummary {
        SeriesSummary {
            series_instance_uid: crate::dicom::Uid::parse("1.2.3").unwrap(),
            study_instance_uid: crate::dicom::Uid::parse("1.2").unwrap(),
            modality: Some("CT".into()),
            state: crate::series::SeriesState::Analyzed,
            instances: 1,
            completion_reason: Some("association released".into()),
            generation: 1,
            first_received_at: "2026-01-01T00:00:00Z".into(),
            last_received_at: "2026-01-01T00:00:00.500Z".into(),
            completed_at: Some("2026-01-01T00:00:00.600Z".into()),
            series_description: None,
            state_reason: None,
            purged_at: None,
            purged_instances: 0,
        }
    }

    fn item(uid: &str, state: ItemState, delivered_s: Option<u64>) -> OutboxItem {
        let t = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600 + s);
        OutboxItem {
            id: 1,
            destination: "pacs".into(),
            path: PathBuf::from("/x"),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
            sop_instance_uid: uid.into(),
            state,
            attempts: 1,
            next_attempt_at: t(0),
            last_error: None,
            created_at: t(3),
            delivered_at: delivered_s.map(t),
        }
    }

    #[test]
    fn timeline_runs_from_last_instance_to_last_delivery() {
        let j = job(JobState::Done, &["1.9.1", "1.9.2"]);
        let s = series();
        let (a, b) = (item("1.9.1", ItemState::Delivered, Some(4)), item("1.9.2", ItemState::Delivered, Some(5)));
        let map: HashMap<String, Vec<&OutboxItem>> =
            [("1.9.1".to_owned(), vec![&a]), ("1.9.2".to_owned(), vec![&b])].into();
        let t = timeline(&j, Some(&s), &map);
        assert_eq!(t.delivery, "delivered");
        assert_eq!(t.delivered_at.as_deref(), Some("2026-01-01T00:00:05.000Z"));
        assert_eq!(t.inference_finished_at.as_deref(), Some("2026-01-01T00:00:02.500Z"));
        assert_eq!(t.time_to_result_s, Some(4.5));
    }

    #[test]
    fn one_undelivered_report_keeps_the_job_pending_and_a_dead_one_shows() {
        let j = job(JobState::Done, &["1.9.1", "1.9.2"]);
        let a = item("1.9.1", ItemState::Delivered, Some(4));
        let b = item("1.9.2", ItemState::Pending, None);
        let mut map: HashMap<String, Vec<&OutboxItem>> =
            [("1.9.1".to_owned(), vec![&a]), ("1.9.2".to_owned(), vec![&b])].into();
        let t = timeline(&j, Some(&series()), &map);
        assert_eq!((t.delivery.as_str(), t.delivered_at, t.time_to_result_s), ("pending", None, None));
        let d = item("1.9.2", ItemState::Dead, None);
        map.insert("1.9.2".into(), vec![&d]);
        assert_eq!(timeline(&j, Some(&series()), &map).delivery, "dead");
    }

    #[test]
    fn without_destinations_the_result_time_ends_at_the_report() {
        let j = job(JobState::Done, &[]);
        let t = timeline(&j, Some(&series()), &HashMap::new());
        assert_eq!(t.delivery, "none");
        assert_eq!(t.time_to_result_s, Some(2.5));
    }
}
