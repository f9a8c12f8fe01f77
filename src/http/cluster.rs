//! The cluster-wide view: what every process of a cluster shows at
//! `/api/cluster`, in `/metrics` and on the status page's "Cluster" card,
//! whichever process is asked (docs/SCALE-OUT.md).
//!
//! Input: a [`SnapshotSource`] (`nats::JetStreamSource`, feature `cluster`:
//! the series and outbox KV buckets, the jobs work queue's consumer, the
//! dead-letter stream). Output: a [`Snapshot`] of counts with its age.
//!
//! Invariants:
//! - At most one refresh runs at a time, and none within [`REFRESH_EVERY`]
//!   of the last one: any number of pages and scrapers cost the NATS server
//!   one snapshot per 2 s.
//! - A request never waits longer than [`REQUEST_WAIT`] for a refresh: past
//!   that it gets the last snapshot with its age (the refresh goes on in the
//!   background and the next request sees it). Before any snapshot exists,
//!   the answer is 503.
//! - Counts only: no UIDs, no patient data.
//!
//! The receiver role runs no job store and no outbox, so it gets its own
//! small server ([`serve_receiver`]): health, readiness, metrics, this view
//! and a status page with the Cluster card only, under the same token and
//! browser rules as the main server (`guard`).
//!
//! Failure modes: NATS unreachable → the last snapshot, older, with the
//! refresh's error in `error`; a bucket or stream not created yet counts 0.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::HttpError;
use crate::telemetry::{Metrics, METRICS};

/// A snapshot younger than this is served as is.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// The longest a request waits for a refresh before it gets the last snapshot.
pub const REQUEST_WAIT: Duration = Duration::from_millis(1500);
/// A refresh that takes longer than this is abandoned (and logged).
pub const REFRESH_LIMIT: Duration = Duration::from_secs(30);

/// Cluster-wide counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Series in the series bucket by their `state` (`receiving`,
    /// `complete`, and any other state a value carries).
    pub series: BTreeMap<String, u64>,
    pub jobs: Jobs,
    /// Outbox claims by `state` (`sending`, `delivered`).
    pub outbox: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Jobs {
    /// In the work queue, not yet taken by a worker.
    pub waiting: u64,
    /// Taken by a worker, not yet acked (running, or waiting out `ack_wait`).
    pub running: u64,
    /// Dead letters.
    pub dead: u64,
}

impl Snapshot {
    /// The states every answer names, 0 when absent, so a page and a
    /// scraper see the same keys on an empty cluster.
    fn with_known_states(mut self) -> Snapshot {
        for s in ["receiving", "complete"] {
            self.series.entry(s.into()).or_insert(0);
        }
        for s in ["sending", "delivered"] {
            self.outbox.entry(s.into()).or_insert(0);
        }
        self
    }
}

/// Computes a snapshot from wherever the cluster keeps its state.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>>;
}

/// What a request gets: the last snapshot, its age, and the error of the
/// last refresh if it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub snapshot: Option<Snapshot>,
    pub age: Option<Duration>,
    pub error: Option<String>,
}

/// The cached cluster view of one process. Cheap to clone.
#[derive(Clone)]
pub struct ClusterView {
    inner: Arc<Inner>,
}

struct Inner {
    role: String,
    id: String,
    source: Box<dyn SnapshotSource>,
    last: Mutex<Last>,
    refreshing: AtomicBool,
    /// Bumped after every refresh, success or not.
    done: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Last {
    snapshot: Option<(Snapshot, Instant)>,
    error: Option<String>,
}

impl ClusterView {
    /// `role`: this process' role (`receiver`, `worker`); `id`: this
    /// process (`<host>-<pid>`).
    pub fn new(role: &str, id: String, source: Box<dyn SnapshotSource>) -> ClusterView {
        ClusterView {
            inner: Arc::new(Inner {
                role: role.to_owned(),
                id,
                source,
                last: Mutex::new(Last::default()),
                refreshing: AtomicBool::new(false),
                done: tokio::sync::watch::channel(0).0,
            }),
        }
    }

    pub fn role(&self) -> &str {
        &self.inner.role
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    fn cached(&self) -> Current {
        let last = self.inner.last.lock().unwrap_or_else(|p| p.into_inner());
        Current {
            snapshot: last.snapshot.as_ref().map(|(s, _)| s.clone()),
            age: last.snapshot.as_ref().map(|(_, t)| t.elapsed()),
            error: last.error.clone(),
        }
    }

    /// The snapshot, refreshed if older than [`REFRESH_EVERY`]; waits at
    /// most `wait` for that refresh.
    pub async fn current(&self, wait: Duration) -> Current {
        let mut done = self.inner.done.subscribe();
        let c = self.cached();
        if c.age.is_some_and(|a| a < REFRESH_EVERY) {
            return c;
        }
        self.start_refresh();
        let _ = tokio::time::timeout(wait, done.changed()).await;
        self.cached()
    }

    fn start_refresh(&self) {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let r = match tokio::time::timeout(REFRESH_LIMIT, inner.source.snapshot()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no snapshot within {REFRESH_LIMIT:?}")),
            };
            {
                let mut last = inner.last.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(s) => {
                        last.snapshot = Some((s.with_known_states(), Instant::now()));
                        last.error = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster view: cannot refresh the cluster-wide counts");
                        last.error = Some(e);
                    }
                }
            }
            inner.refreshing.store(false, Ordering::Release);
            inner.done.send_modify(|n| *n += 1);
        });
    }

    /// The `/api/cluster` answer: 200 with the counts and their age, or 503
    /// before any snapshot could be taken.
    pub async fn answer(&self) -> Response {
        let c = self.current(REQUEST_WAIT).await;
        let Some(s) = c.snapshot else {
            let error = c.error.unwrap_or_else(|| "no cluster snapshot yet".into());
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"role": self.role(), "id": self.id(), "error": error})),
            )
                .into_response();
        };
        let age_s = c.age.unwrap_or_default().as_secs_f64();
        Json(json!({
            "role": self.role(),
            "id": self.id(),
            "series": s.series,
            "jobs": s.jobs,
            "outbox": s.outbox,
            "age_s": (age_s * 10.0).round() / 10.0,
            "error": c.error,
        }))
        .into_response()
    }

    /// Sets the `cluster_*` gauges from the snapshot (left as they are
    /// when there is none yet).
    pub async fn set_metrics(&self) {
        let c = self.current(REQUEST_WAIT).await;
        let Some(s) = c.snapshot else { return };
        let m = &*METRICS;
        let n = |v: u64| v.min(i64::MAX as u64) as i64;
        Metrics::set_states(&m.cluster_series, s.series.iter().map(|(k, v)| (k.as_str(), n(*v))));
        Metrics::set_states(&m.cluster_outbox, s.outbox.iter().map(|(k, v)| (k.as_str(), n(*v))));
        let j = s.jobs;
        Metrics::set_states(
            &m.cluster_jobs,
            [
                ("waiting", n(j.waiting)),
                ("running", n(j.running)),
                ("dead", n(j.dead)),
            ],
        );
        m.cluster_snapshot_age.set(c.age.unwrap_or_default().as_secs_f64());
    }
}

/// `GET /api/cluster` of the main server: 404 on an embedded node.
pub async fn api_cluster(State(st): State<super::Shared>) -> Response {
    match &st.cluster {
        Some(view) => view.answer().await,
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not a cluster node"}))).into_response(),
    }
}

/// This process' id in the cluster: `<host name>-<pid>`.
pub fn process_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

// ---- the receiver's server ----

/// What the receiver's HTTP server reads.
pub struct ReceiverState {
    pub token: Option<String>,
    pub view: ClusterView,
    /// Set once the DICOM listeners are bound.
    pub ready: Arc<AtomicBool>,
}

type ReceiverShared = Arc<ReceiverState>;

const RECEIVER_PAGE: &str = include_str!("assets/cluster.html");

/// The receiver's routes: `/healthz`, `/readyz`, `/metrics`, `/api/cluster`
/// and the status page with the Cluster card.
pub fn receiver_router(state: ReceiverShared) -> Router {
    let api = Router::new()
        .route("/metrics", get(receiver_metrics))
        .route(
            "/api/cluster",
            get(|State(s): State<ReceiverShared>| async move { s.view.answer().await }),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), receiver_token));
    Router::new()
        .route("/healthz", get(super::api::healthz))
        .route("/readyz", get(receiver_readyz))
        .route("/", get(|| async { Html(RECEIVER_PAGE) }))
        .route("/assets/{name}", get(super::assets::asset))
        .merge(api)
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "no such endpoint"}))) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), receiver_guard))
        .layer(axum::middleware::map_response(super::guard::security_headers))
        .with_state(state)
}

/// Binds `addr` now (a port clash fails start-up) and serves the receiver's
/// routes until `shutdown`.
pub async fn serve_receiver(
    addr: SocketAddr,
    state: ReceiverState,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    super::serve(addr, receiver_router(Arc::new(state)), shutdown).await
}

async fn receiver_readyz(State(st): State<ReceiverShared>) -> Response {
    let ready = st.ready.load(Ordering::Acquire);
    let listener = if ready { "ok" } else { "not listening yet" };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"ready": ready, "role": st.view.role(), "checks": {"dicom_listener": listener}})),
    )
        .into_response()
}

async fn receiver_metrics(State(st): State<ReceiverShared>) -> Response {
    st.view.set_metrics().await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        METRICS.encode(),
    )
        .into_response()
}

/// The bearer token, as on the main server.
async fn receiver_token(State(st): State<ReceiverShared>, req: Request, next: Next) -> Response {
    super::check_token(st.token.as_deref(), req, next).await
}

/// The main server's browser rules, for a server that has only GETs:
/// without a token every request but the probes must name a loopback host
/// (DNS rebinding); anything but GET and HEAD is refused outright.
async fn receiver_guard(State(st): State<ReceiverShared>, req: Request, next: Next) -> Response {
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz");
    if st.token.is_none() && !probe {
        if let Err(refusal) = super::guard::check_loopback_host(req.headers()) {
            tracing::warn!(path = %req.uri().path(), reason = %refusal, "HTTP request refused");
            return (StatusCode::FORBIDDEN, Json(json!({"error": refusal.to_string()}))).into_response();
        }
    }
    if !matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            Json(json!({"error": "this server answers GET only"})),
        )
            .into_response();
    }
    next.run(req).await
}

// ---- the JetStream source ----

#[cfg(feature = "cluster")]
pub use self::nats::JetStreamSource;

#[cfg(feature = "cluster")]
mod nats {
    use async_nats::jetstream::{self, context::GetStreamErrorKind, ErrorCode};
    use futures_util::StreamExt;

    use super::*;
    use crate::config::ClusterConfig;

    use crate::series::nats::JOBS_CONSUMER;
    /// KV reads in flight during one snapshot.
    const READS_IN_FLIGHT: usize = 32;

    /// Counts from the cluster's JetStream objects.
    ///
    /// Cost: one key listing plus one read per key of the series and outbox
    /// buckets (32 in flight), two stream infos and one consumer info per
    /// refresh. Fine for the thousands of keys a cluster holds at a time
    /// (a few hundred ms on loopback); at 10^5 keys and more, counts kept
    /// by the writers (a counter per state) would replace the listing.
    pub struct JetStreamSource {
        js: jetstream::Context,
        cfg: ClusterConfig,
    }

    impl JetStreamSource {
        pub fn new(js: jetstream::Context, cfg: &ClusterConfig) -> JetStreamSource {
            JetStreamSource { js, cfg: cfg.clone() }
        }

        /// A stream's info, `None` when the stream does not exist (yet).
        async fn stream(&self, name: &str) -> Result<Option<jetstream::stream::Stream>, String> {
            match self.js.get_stream(name).await {
                Ok(s) => Ok(Some(s)),
                Err(e) => match e.kind() {
                    GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
                    _ => Err(format!("stream {name}: {e}")),
                },
            }
        }

        /// Keys of a KV bucket by the `state` field of their JSON value.
        async fn states(&self, bucket: &str) -> Result<BTreeMap<String, u64>, String> {
            let mut out = BTreeMap::new();
            if self.stream(&format!("KV_{bucket}")).await?.is_none() {
                return Ok(out);
            }
            let store = self
                .js
                .get_key_value(bucket)
                .await
                .map_err(|e| format!("bucket {bucket}: {e}"))?;
            let keys = store.keys().await.map_err(|e| format!("bucket {bucket}: {e}"))?;
            let keys: Vec<String> = keys
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .map_err(|e| format!("bucket {bucket}: {e}"))?;
            let store = &store;
            let mut values = futures_util::stream::iter(keys)
                .map(|k| async move { store.get(k).await })
                .buffer_unordered(READS_IN_FLIGHT);
            while let Some(v) = values.next().await {
                // Deleted since the listing: not counted.
                let Some(v) = v.map_err(|e| format!("bucket {bucket}: {e}"))? else {
                    continue;
                };
                let state = serde_json::from_slice::<serde_json::Value>(&v)
                    .ok()
                    .and_then(|j| j.get("state").and_then(|s| s.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "unknown".into());
                *out.entry(state).or_insert(0) += 1;
            }
            Ok(out)
        }

        /// (waiting, running) on the jobs stream.
        async fn jobs(&self) -> Result<(u64, u64), String> {
            let name = &self.cfg.jobs_stream;
            let Some(stream) = self.stream(name).await? else {
                return Ok((0, 0));
            };
            match stream.consumer_info(JOBS_CONSUMER).await {
                Ok(c) => Ok((c.num_pending, c.num_ack_pending as u64)),
                // No worker has started yet: everything in the work queue waits.
                Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                    Ok((stream.cached_info().state.messages, 0))
                }
                Err(e) => Err(format!("consumer {JOBS_CONSUMER} on {name}: {e}")),
            }
        }

        async fn take(&self) -> Result<Snapshot, String> {
            let series = self.states(&self.cfg.series_bucket).await?;
            let outbox = self.states(&self.cfg.outbox_bucket).await?;
            let (waiting, running) = self.jobs().await?;
            let dead = self
                .stream(&self.cfg.dead_stream)
                .await?
                .map_or(0, |s| s.cached_info().state.messages);
            Ok(Snapshot {
                series,
                jobs: Jobs { waiting, running, dead },
                outbox,
            })
        }
    }

    impl SnapshotSource for JetStreamSource {
        fn snapshot(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>> {
            Box::pin(self.take())
        }
    }

    impl ClusterView {
        /// The view of the cluster that `cfg` names, on a client of its
        /// own. Fails only when NATS cannot be reached now.
        pub async fn connect(cfg: &ClusterConfig, role: &str, id: String) -> Result<ClusterView, String> {
            let client = async_nats::connect(cfg.nats_url.as_str())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Self::on(jetstream::new(client), cfg, role, id))
        }

        /// The view on an existing JetStream context.
        pub fn on(js: jetstream::Context, cfg: &ClusterConfig, role: &str, id: String) -> ClusterView {
            ClusterView::new(role, id, Box::new(JetStreamSource::new(js, cfg)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its calls; `delay` each.
    struct Fake {
        calls: Arc<AtomicUsize>,
        delay: Duration,
        fail: Arc<AtomicBool>,
    }

    impl SnapshotSource for Fake {
        fn snapshot(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err("nats down".into());
                }
                Ok(Snapshot {
                    series: [("complete".to_owned(), n)].into(),
                    jobs: Jobs {
                        waiting: 1,
                        running: 2,
                        dead: 3,
                    },
                    outbox: BTreeMap::new(),
                })
            })
        }
    }

    fn view(delay: Duration) -> (ClusterView, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let v = ClusterView::new(
            "worker",
            "host-1".into(),
            Box::new(Fake {
                calls: calls.clone(),
                delay,
                fail: fail.clone(),
            }),
        );
        (v, calls, fail)
    }

    #[tokio::test]
    async fn one_refresh_per_interval_and_known_states_always_named() {
        let (v, calls, _) = view(Duration::ZERO);
        let c = v.current(REQUEST_WAIT).await;
        let s = c.snapshot.unwrap();
        assert_eq!(s.series, [("complete".into(), 1), ("receiving".into(), 0)].into());
        assert_eq!(s.outbox, [("delivered".into(), 0), ("sending".into(), 0)].into());
        for _ in 0..5 {
            v.current(REQUEST_WAIT).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "cached for {REFRESH_EVERY:?}");
    }

    #[tokio::test]
    async fn a_slow_or_failing_source_gives_the_last_snapshot_with_its_age() {
        let (v, calls, fail) = view(Duration::from_millis(300));
        // Nothing yet, and the refresh outlasts the wait: no snapshot.
        let c = v.current(Duration::from_millis(10)).await;
        assert_eq!(c.snapshot, None);
        // It finishes in the background.
        let c = v.current(Duration::from_secs(2)).await;
        assert!(c.snapshot.is_some());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the second request joined the first refresh"
        );
        // Later, NATS is down: the old snapshot, older, with the error.
        fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(REFRESH_EVERY).await;
        let c = v.current(Duration::from_secs(2)).await;
        assert_eq!(c.snapshot.unwrap().series["complete"], 1);
        assert!(c.age.unwrap() >= REFRESH_EVERY);
        assert_eq!(c.error.as_deref(), Some("nats down"));
    }

    #[tokio::test]
    async fn the_answer_and_the_gauges() {
        let (v, _, _) = view(Duration::ZERO);
        let r = v.answer().await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["role"], "worker");
        assert_eq!(j["id"], "host-1");
        assert_eq!(j["series"], json!({"complete": 1, "receiving": 0}));
        assert_eq!(j["jobs"], json!({"waiting": 1, "running": 2, "dead": 3}));
        assert_eq!(j["outbox"], json!({"sending": 0, "delivered": 0}));
        assert!(j["age_s"].as_f64().unwrap() < 2.0);
        v.set_metrics().await;
        let text = METRICS.encode();
        assert!(
            text.contains(r#"biomarker_node_cluster_jobs{state="running"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"biomarker_node_cluster_series{state="complete"} 1"#),
            "{text}"
        );
    }

    async fn get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        (code, out)
    }

    #[cfg(feature = "cluster")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_from_a_real_nats_server() {
        use async_nats::jetstream::{self, consumer, stream};
        use futures_util::StreamExt;

        use crate::outbox::claims::Claims;

        let Some(server) = crate::outbox::nats::test_server::start() else {
            return;
        };
        let cfg = crate::outbox::nats::test_server::config(&server.url);
        let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
        let view = ClusterView::on(js.clone(), &cfg, "receiver", "h-1".into());
        // Nothing created yet: zeros, not an error.
        let c = view.current(Duration::from_secs(10)).await;
        assert_eq!(c.error, None);
        let zero = Snapshot::default().with_known_states();
        assert_eq!(c.snapshot, Some(zero));

        let series = crate::spool::nats::key_value(&js, &cfg.series_bucket, 1)
            .await
            .unwrap();
        for (k, state) in [("1.2.1", "receiving"), ("1.2.2", "complete"), ("1.2.3", "complete")] {
            let v = json!({"state": state, "generation": 1, "instances": 3, "open": []});
            series.put(k, serde_json::to_vec(&v).unwrap().into()).await.unwrap();
        }
        let jobs = js
            .create_stream(stream::Config {
                name: cfg.jobs_stream.clone(),
                subjects: vec![format!("{}.>", cfg.jobs_subject)],
                retention: stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await
            .unwrap();
        for i in 0..3 {
            js.publish(format!("{}.series", cfg.jobs_subject), format!("{i}").into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let dead = js
            .create_stream(stream::Config {
                name: cfg.dead_stream.clone(),
                subjects: vec![format!("{}.>", cfg.dead_subject)],
                ..Default::default()
            })
            .await
            .unwrap();
        js.publish(format!("{}.series", cfg.dead_subject), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        drop(dead);
        let claims = crate::outbox::nats::KvClaims::open(js.clone(), &cfg, "w".into())
            .await
            .unwrap();
        assert_eq!(
            claims.claim("pacs", "1.9.1").await,
            crate::outbox::claims::Claim::Proceed
        );
        assert_eq!(
            claims.claim("pacs", "1.9.2").await,
            crate::outbox::claims::Claim::Proceed
        );
        claims.delivered("pacs", "1.9.2").await.unwrap();

        // No worker yet: all three jobs wait.
        tokio::time::sleep(REFRESH_EVERY).await;
        let s = view.current(Duration::from_secs(10)).await.snapshot.unwrap();
        assert_eq!(
            s.jobs,
            Jobs {
                waiting: 3,
                running: 0,
                dead: 1
            }
        );
        assert_eq!(s.series, [("complete".into(), 2), ("receiving".into(), 1)].into());
        assert_eq!(s.outbox, [("delivered".into(), 1), ("sending".into(), 1)].into());

        // A worker takes one and has not acked it.
        let c: consumer::PullConsumer = jobs
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bn-workers".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = c.fetch().max_messages(1).messages().await.unwrap();
        let _taken = batch.next().await.unwrap().unwrap();
        tokio::time::sleep(REFRESH_EVERY).await;
        let s = view.current(Duration::from_secs(10)).await.snapshot.unwrap();
        assert_eq!(
            s.jobs,
            Jobs {
                waiting: 2,
                running: 1,
                dead: 1
            }
        );
    }

    #[tokio::test]
    async fn the_receiver_server() {
        let (v, _, _) = view(Duration::ZERO);
        let ready = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let state = ReceiverState {
            token: Some("t0k".into()),
            view: v,
            ready: ready.clone(),
        };
        let (addr, task) = serve_receiver("127.0.0.1:0".parse().unwrap(), state, stop.clone())
            .await
            .unwrap();
        assert_eq!(get(addr, "/healthz", "").await.0, 200);
        assert_eq!(get(addr, "/readyz", "").await.0, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(get(addr, "/readyz", "").await.0, 200);
        assert_eq!(get(addr, "/api/cluster", "").await.0, 401);
        let (code, body) = get(addr, "/api/cluster", "Authorization: Bearer t0k\r\n").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""role":"worker""#), "{body}");
        let (code, body) = get(addr, "/metrics", "Authorization: Bearer t0k\r\n").await;
        assert_eq!(code, 200);
        assert!(body.contains("biomarker_node_cluster_jobs"), "{body}");
        let (code, page) = get(addr, "/", "").await;
        assert_eq!(code, 200);
        assert!(
            page.contains("/assets/cluster.js") && page.contains("content-security-policy"),
            "{page}"
        );
        assert_eq!(get(addr, "/assets/cluster.js", "").await.0, 200);
        assert_eq!(get(addr, "/api/jobs", "Authorization: Bearer t0k\r\n").await.0, 404);
        stop.cancel();
        task.await.unwrap();
    }
}
