//! The STOW-RS client: results to a DICOMweb origin server (PS3.18 10.5).
//!
//! Input: claimed items of one `stow_rs` destination. Output: one
//! [`Outcome`] per item, reported as soon as it is known, like the Storage
//! SCU's; the outbox applies the same retry and dead-letter policy.
//!
//! One `POST {url}/studies` per item, each a `multipart/related;
//! type="application/dicom"` body with one part (the Part-10 file as it is
//! on disk), on one HTTP/1.1 connection per batch. One instance per request
//! keeps the answer per SOP Instance UID unambiguous; a re-sent instance
//! (after a crash while `sending`) has the same SOP Instance UID, which an
//! origin server stores once.
//!
//! Invariants:
//! - Secrets (password, token) are read once at start-up from the
//!   environment or a file, and never logged or printed ([`Secret`]).
//! - HTTPS trusts only the PEM roots in `ca`, never a system store.
//!
//! Failure modes ([`classify`]): 200 without a FailedSOPSequence entry →
//! delivered; a FailedSOPSequence entry → its FailureReason through
//! [`classify_status`] (0xA7xx, 0x0210, 0x0213 retry; the instance's fault
//! → dead); 202 naming the instance as stored → delivered with a warning;
//! 408, 429, 5xx, connection errors, timeouts → retry; other 4xx, 3xx →
//! dead letter. Every reason carries the HTTP status and a body excerpt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use tokio_util::sync::CancellationToken;

use super::policy::{classify_status, StatusClass};
use crate::fault::Fault;
use super::scu::Outcome;
use super::store::OutboxItem;
use crate::config::{Problem, StowAuth, StowRsConfig, StowUrl};

/// A password or token: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A checked `stow_rs` section with its secrets and TLS roots loaded: what
/// the outbox sends with.
#[derive(Clone)]
pub struct StowTarget {
    url: String,
    base: StowUrl,
    authorization: Option<Secret>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for StowTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StowTarget")
            .field("url", &self.url)
            .field("authorization", &self.authorization.is_some())
            .finish_non_exhaustive()
    }
}

/// One built target per destination, so identity is enough (rustls configs
/// cannot be compared).
impl PartialEq for StowTarget {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
            && self.authorization == other.authorization
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}
impl Eq for StowTarget {}

fn read_secret(env: &Option<String>, file: &Option<PathBuf>, key: &dyn Fn(&str) -> String, what: &str) -> Result<Secret, Problem> {
    let v = match (env, file) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| Problem::new(key(&format!("{what}_env")), format!("environment variable `{var}` is not set")))?,
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| Problem::new(key(&format!("{what}_file")), format!("cannot read {}: {e}", p.display())))?,
        (None, None) => unreachable!("validate requires one of them"),
    };
    // A trailing newline in a secret file is an editor's, not the secret's.
    let v = v.trim_end_matches(['\r', '\n']).to_owned();
    if v.is_empty() {
        let k = if env.is_some() { "env" } else { "file" };
        return Err(Problem::new(key(&format!("{what}_{k}")), format!("the {what} is empty")));
    }
    Ok(Secret(v))
}

impl StowTarget {
    /// Read the secret and the CA of a section `config::Config::validate`
    /// passed: what start-up and `check-config` run, so a missing variable
    /// or file names its key. The section's shape is not checked again.
    pub fn build(name: &str, cfg: &StowRsConfig) -> Result<StowTarget, Problem> {
        let key = |k: &str| format!("destinations.{name}.stow_rs.{k}");
        // Parses: validation refused a URL that does not.
        let base = StowUrl::parse(&cfg.url).map_err(|m| Problem::new(key("url"), m))?;
        let authorization = match cfg.auth {
            StowAuth::None => None,
            StowAuth::Basic => {
                let pw = read_secret(&cfg.password_env, &cfg.password_file, &key, "password")?;
                let user = cfg.username.as_deref().unwrap_or_default();
                Some(Secret(format!("Basic {}", base64(format!("{user}:{}", pw.0).as_bytes()))))
            }
            StowAuth::Bearer => {
                let t = read_secret(&cfg.token_env, &cfg.token_file, &key, "token")?;
                Some(Secret(format!("Bearer {}", t.0)))
            }
        };
        if let Some(a) = &authorization {
            HeaderValue::from_str(&a.0).map_err(|_| {
                let k = if cfg.auth == StowAuth::Basic { "password_env" } else { "token_env" };
                Problem::new(key(k), "the secret has characters an HTTP header cannot carry")
            })?;
        }
        let tls = match &cfg.ca {
            None => None,
            Some(ca) => {
                let t = crate::config::DestinationTlsConfig {
                    ca: ca.clone(),
                    certificate: None,
                    private_key: None,
                    server_name: None,
                };
                // The TLS errors name `tls.ca`; ours is `stow_rs.ca`.
                Some(crate::tls::client_config(name, &t).map_err(|e| Problem::new(key("ca"), e.to_string()))?)
            }
        };
        Ok(StowTarget {
            url: cfg.url.clone(),
            base,
            authorization,
            tls,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn studies_path(&self) -> String {
        format!("{}/studies", self.base.path)
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { A[(n >> shift) as usize & 63] as char } else { '=' });
        }
    }
    out
}

/// The request body: one `application/dicom` part (PS3.18 8.6.1.2).
/// Returns the body and its boundary, which does not occur in `file`.
pub fn multipart_body(file: &[u8]) -> (Vec<u8>, String) {
    let mut boundary = format!("bmn-{}", uuid::Uuid::new_v4().simple());
    while file.windows(boundary.len()).any(|w| w == boundary.as_bytes()) {
        boundary = format!("bmn-{}", uuid::Uuid::new_v4().simple());
    }
    let mut body = Vec::with_capacity(file.len() + 2 * boundary.len() + 64);
    body.extend_from_slice(format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes());
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (body, boundary)
}

/// How much of a response body goes into a reason.
const EXCERPT: usize = 300;
/// Most of a response body we read; a STOW response is a small dataset.
const MAX_RESPONSE: usize = 1 << 20;

fn excerpt(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(EXCERPT * 4)]);
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(EXCERPT)
        .collect();
    if s.chars().count() > EXCERPT || body.len() > EXCERPT * 4 {
        out.push('…');
    }
    out.trim().to_owned()
}

/// What the STOW response dataset says about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mention {
    /// In the FailedSOPSequence, with its FailureReason.
    Failed(Option<u16>),
    /// In the ReferencedSOPSequence, with its WarningReason.
    Stored(Option<u16>),
    Absent,
}

/// DICOM JSON (PS3.18 F.2): the response is one dataset, some servers send
/// it as a one-element array.
fn mention(body: &[u8], sop_instance_uid: &str) -> Mention {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Mention::Absent;
    };
    let ds = match &v {
        serde_json::Value::Array(a) => a.first().cloned().unwrap_or_default(),
        _ => v,
    };
    let items = |tag: &str| -> Vec<serde_json::Value> {
        ds.get(tag)
            .and_then(|e| e.get("Value"))
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let uid_of = |it: &serde_json::Value| {
        it.get("00081155")
            .and_then(|e| e.get("Value"))
            .and_then(|v| v.get(0))
            .and_then(|v| v.as_str())
            .map(|s| s.trim_end_matches('\0').trim().to_owned())
    };
    let us = |it: &serde_json::Value, tag: &str| {
        it.get(tag)
            .and_then(|e| e.get("Value"))
            .and_then(|v| v.get(0))
            .and_then(|v| v.as_u64())
            .and_then(|n| u16::try_from(n).ok())
    };
    let failed = items("00081198");
    // An entry without a UID can only be about the one instance we sent.
    if let Some(it) = failed
        .iter()
        .find(|it| uid_of(it).is_none_or(|u| u == sop_instance_uid))
    {
        return Mention::Failed(us(it, "00081197"));
    }
    if let Some(it) = items("00081199")
        .iter()
        .find(|it| uid_of(it).as_deref() == Some(sop_instance_uid))
    {
        return Mention::Stored(us(it, "00081196"));
    }
    Mention::Absent
}

/// What an HTTP response to one instance's STOW request means for it.
pub fn classify(status: u16, body: &[u8], sop_instance_uid: &str) -> Outcome {
    let reason = |what: &str| {
        let canonical = hyper::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let ex = excerpt(body);
        if ex.is_empty() {
            format!("HTTP {status} {canonical}{what}")
        } else {
            format!("HTTP {status} {canonical}{what}: {ex}")
        }
    };
    let failed = |fault: Fault, status: Option<u16>, what: &str| Outcome::Failed {
        fault,
        status,
        reason: reason(what),
    };
    let by_failure_reason = |code: Option<u16>| match code {
        Some(c) => match classify_status(c) {
            StatusClass::Failed(f) => failed(f, Some(c), &format!(", FailureReason 0x{c:04X}")),
            // A "failure" with a success code is a confused server: try again.
            StatusClass::Stored => failed(Fault::Transient, Some(c), &format!(", FailureReason 0x{c:04X}")),
        },
        // Listed as failed without saying why: the instance's fault
        // cannot be told from the server's, so it is retried.
        None => failed(Fault::Transient, None, ", failed without a FailureReason"),
    };
    match (status, mention(body, sop_instance_uid)) {
        (_, Mention::Failed(code)) if (200..300).contains(&status) || status == 409 => by_failure_reason(code),
        (200, _) => Outcome::Stored {
            status: 0,
            comment: None,
        },
        (202, Mention::Stored(w)) => Outcome::Stored {
            status: w.unwrap_or(0xB000),
            comment: Some(reason(", stored with warnings")),
        },
        (202, _) => failed(Fault::Transient, None, ", the response does not list the instance as stored"),
        (408 | 429, _) => failed(Fault::Transient, None, ""),
        (500..=599, _) => failed(Fault::Transient, None, ""),
        _ => failed(Fault::Permanent, None, ""),
    }
}

/// What a connection runs over: TCP, or TLS on TCP.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(target: &StowTarget, connect_timeout: Duration) -> Result<Sender, String> {
    let b = &target.base;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((b.host.as_str(), b.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", b.host, b.port))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Stream> = match &target.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(b.host.clone())
                    .map_err(|e| format!("`{}` is not a TLS server name: {e}", b.host))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}:{}: {e}", b.host, b.port))?;
                Box::new(tls)
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        // Ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok::<_, String>(sender)
    };
    tokio::time::timeout(connect_timeout, work)
        .await
        .map_err(|_| format!("cannot connect to {}:{} within {connect_timeout:?}", b.host, b.port))?
}

/// One instance: the request, and the response status and body.
async fn post(sender: &mut Sender, target: &StowTarget, file: Vec<u8>) -> Result<(u16, Vec<u8>), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    let (body, boundary) = multipart_body(&file);
    drop(file);
    let mut req = hyper::Request::post(target.studies_path())
        .header(HOST, &target.base.authority)
        .header(
            CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(ACCEPT, "application/dicom+json")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    if let Some(a) = &target.authorization {
        let mut v = HeaderValue::from_str(&a.0).map_err(|_| "unusable secret".to_owned())?;
        v.set_sensitive(true);
        req.headers_mut().insert(AUTHORIZATION, v);
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP request failed: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("HTTP {status}: cannot read the response body: {e}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

fn transient(reason: String) -> Outcome {
    Outcome::Failed {
        fault: Fault::Transient,
        status: None,
        reason,
    }
}

/// Deliver `items` (all of one destination), reusing one connection while
/// the server keeps it open. `record` is called exactly once per item.
pub async fn send_batch(
    target: &StowTarget,
    connect_timeout: Duration,
    request_timeout: Duration,
    items: &[OutboxItem],
    cancel: &CancellationToken,
    record: &mut (dyn FnMut(&OutboxItem, Outcome) + Send),
) {
    let mut sender: Option<Sender> = None;
    let mut rest = items.iter();
    while let Some(it) = rest.next() {
        if cancel.is_cancelled() {
            record(it, Outcome::NotAttempted);
            continue;
        }
        if let Err(reason) = super::scu::check_file(it) {
            record(it, Outcome::Failed { fault: Fault::Permanent, status: None, reason });
            continue;
        }
        let file = match tokio::fs::read(&it.path).await {
            Ok(f) => f,
            Err(e) => {
                let reason = format!("cannot read {}: {e}", it.path.display());
                record(it, Outcome::Failed { fault: Fault::Permanent, status: None, reason });
                continue;
            }
        };
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let c = tokio::select! {
                _ = cancel.cancelled() => {
                    record(it, Outcome::NotAttempted);
                    continue;
                }
                c = connect(target, connect_timeout) => c,
            };
            match c {
                Ok(s) => sender = Some(s),
                Err(reason) => {
                    // The server is unreachable: the rest of the batch shares it.
                    record(it, transient(reason.clone()));
                    for other in rest.by_ref() {
                        record(other, transient(reason.clone()));
                    }
                    return;
                }
            }
        }
        let s = sender.as_mut().expect("connected above");
        let r = tokio::select! {
            // The request may have reached the server: a re-send is the
            // same SOP Instance UID, stored once.
            _ = cancel.cancelled() => {
                record(it, Outcome::NotAttempted);
                continue;
            }
            r = tokio::time::timeout(request_timeout, post(s, target, file)) => r,
        };
        match r {
            Ok(Ok((status, body))) => record(it, classify(status, &body, &it.sop_instance_uid)),
            Ok(Err(reason)) => {
                sender = None;
                record(it, transient(reason));
            }
            Err(_) => {
                sender = None;
                record(it, transient(format!("no HTTP response within {request_timeout:?}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1.2.826.0.1.3680043.10.1.42";

    fn fault(o: &Outcome) -> Option<Fault> {
        match o {
            Outcome::Failed { fault, .. } => Some(*fault),
            _ => None,
        }
    }

    fn reason(o: &Outcome) -> &str {
        match o {
            Outcome::Failed { reason, .. } => reason,
            Outcome::Stored { comment, .. } => comment.as_deref().unwrap_or(""),
            Outcome::NotAttempted => "",
        }
    }

    #[test]
    fn multipart_body_is_one_dicom_part_between_boundaries() {
        let file = b"\0\0DICM-preamble-and-dataset\r\n--not-a-boundary".to_vec();
        let (body, b) = multipart_body(&file);
        let head = format!("--{b}\r\nContent-Type: application/dicom\r\n\r\n");
        let tail = format!("\r\n--{b}--\r\n");
        assert!(body.starts_with(head.as_bytes()));
        assert!(body.ends_with(tail.as_bytes()));
        assert_eq!(&body[head.len()..body.len() - tail.len()], &file[..]);
        // RFC 2046 5.1.1: 1-70 characters, none that needs quoting.
        assert!(b.len() <= 70 && b.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        // The boundary occurs only as the two delimiters.
        let n = body.windows(b.len()).filter(|w| *w == b.as_bytes()).count();
        assert_eq!(n, 2);
    }

    #[test]
    fn multipart_boundaries_differ_per_request() {
        assert_ne!(multipart_body(b"x").1, multipart_body(b"x").1);
    }

    #[test]
    fn ok_without_failures_is_delivered() {
        let body = format!(
            r#"{{"00081190":{{"vr":"UR","Value":["http://x/studies/1"]}},"00081199":{{"vr":"SQ","Value":[{{"00081150":{{"vr":"UI","Value":["1.2"]}},"00081155":{{"vr":"UI","Value":["{UID}"]}}}}]}}}}"#
        );
        assert_eq!(classify(200, body.as_bytes(), UID), Outcome::Stored { status: 0, comment: None });
        // Orthanc's array form, and an empty body.
        assert!(matches!(classify(200, format!("[{body}]").as_bytes(), UID), Outcome::Stored { status: 0, .. }));
        assert!(matches!(classify(200, b"", UID), Outcome::Stored { status: 0, .. }));
    }

    fn failed_body(code: u16) -> String {
        format!(
            r#"{{"00081198":{{"vr":"SQ","Value":[{{"00081150":{{"vr":"UI","Value":["1.2"]}},"00081155":{{"vr":"UI","Value":["{UID}"]}},"00081197":{{"vr":"US","Value":[{code}]}}}}]}}}}"#
        )
    }

    #[test]
    fn failed_sop_sequence_decides_by_failure_reason() {
        for status in [200, 202, 409] {
            // 0xA900: the dataset does not match the SOP class: our fault.
            let o = classify(status, failed_body(0xA900).as_bytes(), UID);
            assert_eq!(fault(&o), Some(Fault::Permanent), "{status}: {o:?}");
            assert!(reason(&o).contains(&format!("HTTP {status}")) && reason(&o).contains("0xA900"), "{o:?}");
            // 0xA700: out of resources: the server's state.
            let o = classify(status, failed_body(0xA700).as_bytes(), UID);
            assert_eq!(fault(&o), Some(Fault::Transient), "{status}: {o:?}");
            let o = classify(status, failed_body(0x0110).as_bytes(), UID);
            assert_eq!(fault(&o), Some(Fault::Permanent));
            let o = classify(status, failed_body(0x0213).as_bytes(), UID);
            assert_eq!(fault(&o), Some(Fault::Transient));
        }
        // Another instance's failure is not ours.
        let other = failed_body(0xA900).replace(UID, "1.2.3");
        assert!(matches!(classify(200, other.as_bytes(), UID), Outcome::Stored { .. }));
    }

    #[test]
    fn accepted_with_warnings_or_without_the_instance() {
        let stored = format!(
            r#"{{"00081199":{{"vr":"SQ","Value":[{{"00081155":{{"vr":"UI","Value":["{UID}"]}},"00081196":{{"vr":"US","Value":[45063]}}}}]}}}}"#
        );
        match classify(202, stored.as_bytes(), UID) {
            Outcome::Stored { status, comment } => {
                assert_eq!(status, 0xB007);
                assert!(comment.unwrap().starts_with("HTTP 202"));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(fault(&classify(202, b"{}", UID)), Some(Fault::Transient));
    }

    #[test]
    fn http_statuses_split_into_dead_and_retry() {
        for s in [400, 401, 403, 404, 405, 409, 413, 415, 301] {
            let o = classify(s, b"{\"Message\": \"no\"}", UID);
            assert_eq!(fault(&o), Some(Fault::Permanent), "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(fault(&classify(s, b"", UID)), Some(Fault::Transient), "{s}");
        }
    }

    #[test]
    fn reasons_carry_status_and_a_bounded_body_excerpt() {
        let o = classify(404, b"Unknown resource\n", UID);
        assert_eq!(reason(&o), "HTTP 404 Not Found: Unknown resource");
        let long = "x".repeat(10_000);
        let r = reason(&classify(500, long.as_bytes(), UID)).to_owned();
        assert!(r.starts_with("HTTP 500 Internal Server Error: xxx") && r.chars().count() < EXCERPT + 50, "{r}");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    /// Reads one HTTP/1.1 request (headers and a Content-Length body).
    async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(String, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.ok()?;
            assert!(n > 0, "body cut short");
            buf.extend_from_slice(&chunk[..n]);
        }
        Some((head, buf[head_end..head_end + len].to_vec()))
    }

    /// A real HTTPS round trip: TLS against `ca`, the request line and
    /// headers of PS3.18 10.5, the file as the one part, two requests on one
    /// connection, and each answer classified for its own item.
    #[tokio::test]
    async fn https_batch_sends_stow_requests_on_one_connection() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let Some(pki) = crate::tls::testpki::make(dir.path()) else {
            assert!(std::env::var_os("CI").is_none(), "openssl is required in CI");
            eprintln!("skipping: openssl not available");
            return;
        };
        let server = crate::tls::server_config(&crate::config::NodeTlsConfig {
            port: 0,
            certificate: pki.cert.clone(),
            private_key: pki.key.clone(),
            client_ca: None,
            plain: true,
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let srv = tokio::spawn(async move {
            let mut connections = 0;
            let mut got = Vec::new();
            while got.len() < 2 {
                let (tcp, _) = listener.accept().await.unwrap();
                connections += 1;
                let mut tls = tokio_rustls::TlsAcceptor::from(server.clone()).accept(tcp).await.unwrap();
                while let Some((head, body)) = read_request(&mut tls).await {
                    let resp: &[u8] = if got.is_empty() {
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 415 Unsupported Media Type\r\nContent-Length: 7\r\n\r\nno such"
                    };
                    tls.write_all(resp).await.unwrap();
                    got.push((head, body));
                    if got.len() == 2 {
                        break;
                    }
                }
            }
            (connections, got)
        });

        let mut items = Vec::new();
        let mut files = Vec::new();
        for (i, uid) in ["1.2.826.0.1.3680043.10.1.7001", "1.2.826.0.1.3680043.10.1.7002"].iter().enumerate() {
            let path = dir.path().join(format!("{i}.dcm"));
            crate::outbox::part10::tests::write_image(&path, crate::outbox::part10::tests::SECONDARY_CAPTURE, uid, 4);
            files.push(std::fs::read(&path).unwrap());
            let now = std::time::SystemTime::now();
            items.push(OutboxItem {
                id: i as i64 + 1,
                destination: "web".into(),
                path,
                sop_class_uid: crate::outbox::part10::tests::SECONDARY_CAPTURE.into(),
                sop_instance_uid: (*uid).into(),
                state: crate::outbox::ItemState::Sending,
                attempts: 1,
                next_attempt_at: now,
                last_error: None,
                created_at: now,
                delivered_at: None,
            });
        }
        let tok = dir.path().join("token");
        std::fs::write(&tok, "tok-123\n").unwrap();
        let mut c = cfg(&format!("{{url: 'https://127.0.0.1:{port}/dicom-web/', auth: bearer, token_file: t, ca: c}}"));
        c.token_file = Some(tok);
        c.ca = Some(pki.ca.clone());
        let target = StowTarget::build("web", &c).unwrap();
        let mut outcomes = Vec::new();
        let mut record = |it: &OutboxItem, o: Outcome| outcomes.push((it.sop_instance_uid.clone(), o));
        let s = Duration::from_secs(10);
        send_batch(&target, s, s, &items, &CancellationToken::new(), &mut record).await;
        let (connections, got) = tokio::time::timeout(s, srv).await.unwrap().unwrap();

        assert_eq!(connections, 1, "the batch reuses one connection");
        assert_eq!(outcomes[0], (items[0].sop_instance_uid.clone(), Outcome::Stored { status: 0, comment: None }));
        assert_eq!(outcomes[1].0, items[1].sop_instance_uid);
        assert_eq!(fault(&outcomes[1].1), Some(Fault::Permanent));
        assert_eq!(reason(&outcomes[1].1), "HTTP 415 Unsupported Media Type: no such");
        for ((head, body), file) in got.iter().zip(&files) {
            let lower = head.to_ascii_lowercase();
            assert!(head.starts_with("POST /dicom-web/studies HTTP/1.1\r\n"), "{head}");
            assert!(lower.contains(&format!("host: 127.0.0.1:{port}\r\n")), "{head}");
            assert!(lower.contains("accept: application/dicom+json\r\n"), "{head}");
            assert!(head.contains("authorization: Bearer tok-123\r\n"), "{head}");
            let ct = head
                .lines()
                .find_map(|l| l.strip_prefix("content-type: "))
                .expect("a content-type header");
            let boundary = ct
                .strip_prefix("multipart/related; type=\"application/dicom\"; boundary=")
                .expect(ct);
            let want = [
                format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes(),
                file.clone(),
                format!("\r\n--{boundary}--\r\n").into_bytes(),
            ]
            .concat();
            assert!(body == &want, "the body is not the one part holding the file");
        }
    }

    fn cfg(y: &str) -> StowRsConfig {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn secrets_load_from_env_or_file_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret-token\n").unwrap();
        let mut c = cfg("{url: 'http://h:8042/dicom-web/', auth: bearer, token_file: x}");
        c.token_file = Some(p);
        let t = StowTarget::build("web", &c).unwrap();
        assert_eq!(t.authorization.as_ref().unwrap().0, "Bearer s3cret-token");
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(t.studies_path(), "/dicom-web/studies");
        assert_eq!((t.base.host.as_str(), t.base.port), ("h", 8042));

        let var = "BMN_STOW_TEST_PASSWORD_UNSET_9f2";
        let c = cfg(&format!("{{url: 'http://h', auth: basic, username: node, password_env: {var}}}"));
        let e = StowTarget::build("web", &c).unwrap_err();
        assert_eq!(e.key, "destinations.web.stow_rs.password_env");
        assert!(e.message.contains(var));
    }
}
