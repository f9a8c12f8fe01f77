//! Stage tests: the worker against real Storage SCPs on port 0-style free
//! ports: DCMTK `storescp` for the happy path and an outage, a pynetdicom
//! SCP for refusals. Skipped (with a note) when the tool is missing, unless
//! `CI` is set.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::part10::tests::{write_image, CT_IMAGE, SECONDARY_CAPTURE};
use super::*;

const STORESCP: &str = "/usr/bin/storescp";

/// Whether a tool is there; without it the test is skipped, or fails in CI.
fn have(tool: &str, ok: bool) -> bool {
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required in CI");
        }
        eprintln!("skipping: {tool} not available");
    }
    ok
}

fn have_storescp() -> bool {
    have("DCMTK storescp", Path::new(STORESCP).exists())
}

fn have_pynetdicom() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import pynetdicom"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    have("python3 with pynetdicom", ok)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, pass or fail.
struct Scp(Child);

impl Drop for Scp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "SCP on port {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// storescp with a small max PDU, so our datasets are split into PDVs.
fn storescp(port: u16, dir: &Path) -> Scp {
    storescp_with(port, dir, &[])
}

fn storescp_with(port: u16, dir: &Path, extra: &[&str]) -> Scp {
    let child = Command::new(STORESCP)
        .args(["-aet", "PACS", "--max-pdu", "4096"])
        .args(extra)
        .arg("-od")
        .arg(dir)
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp starts");
    let scp = Scp(child);
    wait_listening(port);
    scp
}

fn refusing_scp(port: u16, mode: &str) -> Scp {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/outbox/testdata/refusing_scp.py");
    let child = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg(mode)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 starts");
    let scp = Scp(child);
    wait_listening(port);
    scp
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect()
}

fn fast_cfg() -> OutboxConfig {
    OutboxConfig {
        retry_base_s: 0.1,
        retry_cap_s: 0.2,
        max_attempts: 50,
        connect_timeout_s: 2.0,
        dimse_timeout_s: 5.0,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<SqliteOutboxStore>,
    shutdown: CancellationToken,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("results")).unwrap();
        std::fs::create_dir_all(dir.path().join("received")).unwrap();
        let store = Arc::new(SqliteOutboxStore::open(&dir.path().join("outbox.sqlite")).unwrap());
        Fixture {
            dir,
            store,
            shutdown: CancellationToken::new(),
        }
    }

    fn received(&self) -> PathBuf {
        self.dir.path().join("received")
    }

    /// A result file as the report stage would leave it.
    fn result(&self, class: &str, sop: &str, side: u16) -> (PathBuf, Uid, Uid, Vec<u8>) {
        let p = self.dir.path().join("results").join(format!("{sop}.dcm"));
        let pixels = write_image(&p, class, sop, side);
        (
            p,
            Uid::parse(class).unwrap(),
            Uid::parse(sop).unwrap(),
            pixels,
        )
    }

    fn spawn(
        &self,
        ae: &str,
        port: u16,
        cfg: OutboxConfig,
    ) -> (OutboxHandle, tokio::task::JoinHandle<()>) {
        self.spawn_claims(ae, port, cfg, Arc::new(super::claims::NoClaims))
    }

    fn spawn_claims(
        &self,
        ae: &str,
        port: u16,
        cfg: OutboxConfig,
        claims: Arc<dyn super::claims::Claims>,
    ) -> (OutboxHandle, tokio::task::JoinHandle<()>) {
        let dests = HashMap::from([(
            "pacs".to_string(),
            Destination {
                ae_title: ae.into(),
                host: "127.0.0.1".into(),
                port,
                tls: None,
                stow: None,
            },
        )]);
        Outbox::spawn(
            self.store.clone(),
            dests,
            cfg,
            AeTitle::new("BIOMARKER"),
            claims,
            self.shutdown.clone(),
        )
        .unwrap()
    }

    async fn stop(&self, worker: tokio::task::JoinHandle<()>) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .expect("worker stops promptly on shutdown")
            .unwrap();
    }
}

async fn wait_until(
    h: &OutboxHandle,
    id: i64,
    what: &str,
    pred: impl Fn(&OutboxItem) -> bool,
) -> OutboxItem {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let it = h.get(id).unwrap().expect("item exists");
        if pred(&it) {
            return it;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {it:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_to_storescp_once_including_an_item_interrupted_by_a_crash() {
    if !have_storescp() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let _scp = storescp(port, &fx.received());

    // A previous run crashed with this item on the wire.
    let (p0, c0, s0, _) = fx.result(CT_IMAGE, "1.2.826.0.1.3680043.10.9.1", 8);
    let crashed = fx
        .store
        .enqueue(
            &NewItem {
                destination: "pacs".into(),
                path: p0,
                sop_class_uid: c0,
                sop_instance_uid: s0,
            },
            SystemTime::now(),
        )
        .unwrap()
        .id();
    assert_eq!(
        fx.store
            .claim_due(SystemTime::now(), &[], 10)
            .unwrap()
            .len(),
        1
    );

    let (h, worker) = fx.spawn("PACS", port, fast_cfg());
    // 64×64 pixels: the dataset needs two PDVs at storescp's 4096-byte PDU.
    let (p, class, sop, pixels) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.2", 64);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap();
    assert!(matches!(id, Enqueued::New(_)));
    assert_eq!(
        h.enqueue("pacs", &p, &class, &sop).unwrap(),
        Enqueued::Existing(id.id())
    );
    assert!(matches!(
        h.enqueue("nowhere", &p, &class, &sop),
        Err(OutboxError::UnknownDestination(_))
    ));

    let it = wait_until(&h, id.id(), "delivery", |i| i.state == ItemState::Delivered).await;
    assert_eq!(it.attempts, 1);
    assert!(it.delivered_at.is_some());
    let again = wait_until(&h, crashed, "requeued delivery", |i| {
        i.state == ItemState::Delivered
    })
    .await;
    assert_eq!(again.attempts, 2, "the crashed attempt still counts");

    fx.stop(worker).await;
    let files = files_in(&fx.received());
    assert_eq!(files.len(), 2, "{files:?}");
    let sc = files
        .iter()
        .find(|f| f.to_string_lossy().contains(sop.as_str()))
        .expect("storescp names files by SOP instance UID");
    let obj = dicom_object::open_file(sc).unwrap();
    let got = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(&got[..], &pixels[..], "dataset arrives intact across PDVs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_down_retries_then_delivers_exactly_once() {
    if !have_storescp() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port(); // nothing listens yet
    let (h, worker) = fx.spawn("PACS", port, fast_cfg());
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.3", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();

    let it = wait_until(&h, id, "two failed attempts", |i| {
        i.attempts >= 2 && i.state == ItemState::Pending
    })
    .await;
    let err = it.last_error.unwrap_or_default();
    assert!(err.to_lowercase().contains("refused"), "{err}");

    let _scp = storescp(port, &fx.received());
    let it = wait_until(&h, id, "delivery after the outage", |i| {
        i.state == ItemState::Delivered
    })
    .await;
    assert!(it.attempts >= 3);
    fx.stop(worker).await;
    assert_eq!(files_in(&fx.received()).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_attempts_then_operator_retries_and_dismisses() {
    let fx = Fixture::new();
    let cfg = OutboxConfig {
        retry_base_s: 0.05,
        retry_cap_s: 0.05,
        max_attempts: 3,
        ..fast_cfg()
    };
    let (h, worker) = fx.spawn("PACS", free_port(), cfg);
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.4", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();

    let it = wait_until(&h, id, "dead letter", |i| i.state == ItemState::Dead).await;
    assert_eq!(it.attempts, 3);
    let err = it.last_error.unwrap_or_default();
    assert!(err.starts_with("gave up after 3 attempts"), "{err}");
    assert!(!h.dismiss(id + 100).unwrap());

    assert!(h.retry(id).unwrap());
    let it = wait_until(&h, id, "dead again", |i| i.state == ItemState::Dead).await;
    assert_eq!(it.attempts, 3, "retry gives a fresh set of attempts");
    assert!(h.dismiss(id).unwrap());
    assert_eq!(h.get(id).unwrap().unwrap().state, ItemState::Dismissed);
    fx.stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_status_is_a_dead_letter_at_once() {
    if !have_pynetdicom() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let _scp = refusing_scp(port, "status");
    let (h, worker) = fx.spawn("REFUSER", port, fast_cfg());
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.5", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();

    let it = wait_until(&h, id, "dead letter", |i| i.state == ItemState::Dead).await;
    assert_eq!(it.attempts, 1, "a refusal is not retried");
    let err = it.last_error.unwrap_or_default();
    assert!(err.contains("0xA900"), "{err}");
    fx.stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_context_kills_only_that_sop_class() {
    if !have_pynetdicom() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let _scp = refusing_scp(port, "context");
    // Both go on one association: CT is accepted, Secondary Capture is not.
    let (pc, cc, sc, _) = fx.result(CT_IMAGE, "1.2.826.0.1.3680043.10.9.6", 8);
    let (ps, cs, ss, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.7", 8);
    // Enqueued before the worker starts, so its first claim takes both.
    let enqueue = |path: PathBuf, class: Uid, sop: Uid| {
        let item = NewItem {
            destination: "pacs".into(),
            path,
            sop_class_uid: class,
            sop_instance_uid: sop,
        };
        fx.store.enqueue(&item, SystemTime::now()).unwrap().id()
    };
    let ct = enqueue(pc, cc, sc);
    let sec = enqueue(ps, cs, ss);
    let (h, worker) = fx.spawn("REFUSER", port, fast_cfg());

    wait_until(&h, ct, "CT delivered", |i| i.state == ItemState::Delivered).await;
    let it = wait_until(&h, sec, "SC dead", |i| i.state == ItemState::Dead).await;
    assert_eq!(it.attempts, 1);
    let err = it.last_error.unwrap_or_default();
    assert!(err.contains("rejected the presentation context"), "{err}");
    fx.stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_does_not_match_its_item_is_never_sent() {
    let fx = Fixture::new();
    let (h, worker) = fx.spawn("PACS", free_port(), fast_cfg());
    let (p, class, _, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.8", 8);
    let other = Uid::parse("1.2.826.0.1.3680043.10.9.9").unwrap();
    let id = h.enqueue("pacs", &p, &class, &other).unwrap().id();
    let missing = h
        .enqueue(
            "pacs",
            &fx.dir.path().join("gone.dcm"),
            &class,
            &Uid::parse("1.2.3.99").unwrap(),
        )
        .unwrap()
        .id();
    let it = wait_until(&h, id, "dead letter", |i| i.state == ItemState::Dead).await;
    assert!(it.last_error.unwrap_or_default().contains("file meta"));
    let it = wait_until(&h, missing, "dead letter", |i| i.state == ItemState::Dead).await;
    assert!(it.last_error.unwrap_or_default().contains("cannot read"));
    fx.stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcodes_for_a_peer_that_accepts_only_implicit_vr() {
    if !have_storescp() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let _scp = storescp_with(port, &fx.received(), &["+xi"]);
    let (h, worker) = fx.spawn("PACS", port, fast_cfg());
    let (p, class, sop, pixels) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.10", 64);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();
    wait_until(&h, id, "delivery", |i| i.state == ItemState::Delivered).await;
    fx.stop(worker).await;
    let files = files_in(&fx.received());
    assert_eq!(files.len(), 1);
    let obj = dicom_object::open_file(&files[0]).unwrap();
    assert_eq!(obj.meta().transfer_syntax(), part10::IMPLICIT_VR_LE);
    let got = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(&got[..], &pixels[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn association_rejected_permanently_is_a_dead_letter() {
    if !have_storescp() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let _scp = storescp_with(port, &fx.received(), &["--refuse"]);
    let (h, worker) = fx.spawn("PACS", port, fast_cfg());
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.11", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();
    let it = wait_until(&h, id, "dead letter", |i| i.state == ItemState::Dead).await;
    assert_eq!(it.attempts, 1);
    let err = it.last_error.unwrap_or_default();
    assert!(err.contains("association rejected (permanent)"), "{err}");
    fx.stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimse_timeout_aborts_and_retries_the_rest_of_the_batch() {
    if !have_pynetdicom() {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let _scp = refusing_scp(port, "slow");
    let mut ids = Vec::new();
    for sop in ["1.2.826.0.1.3680043.10.9.14", "1.2.826.0.1.3680043.10.9.15"] {
        let (path, class, sop, _) = fx.result(SECONDARY_CAPTURE, sop, 8);
        let item = NewItem {
            destination: "pacs".into(),
            path,
            sop_class_uid: class,
            sop_instance_uid: sop,
        };
        ids.push(fx.store.enqueue(&item, SystemTime::now()).unwrap().id());
    }
    let cfg = OutboxConfig {
        dimse_timeout_s: 0.5,
        retry_base_s: 30.0,
        retry_cap_s: 30.0,
        ..fast_cfg()
    };
    let (h, worker) = fx.spawn("REFUSER", port, cfg);
    let first = wait_until(&h, ids[0], "retry", |i| {
        i.state == ItemState::Pending && i.attempts == 1
    })
    .await;
    let second = wait_until(&h, ids[1], "retry", |i| {
        i.state == ItemState::Pending && i.attempts == 1
    })
    .await;
    let e1 = first.last_error.unwrap_or_default();
    let e2 = second.last_error.unwrap_or_default();
    assert!(e1.contains("no C-STORE-RSP"), "{e1}");
    assert!(e2.starts_with("not sent, association lost"), "{e2}");
    fx.stop(worker).await;
}

/// Accepts TCP (the kernel completes the handshake from the backlog) but
/// never answers the A-ASSOCIATE-RQ.
fn silent_peer() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_and_is_retried() {
    let fx = Fixture::new();
    let (_l, port) = silent_peer();
    let cfg = OutboxConfig {
        dimse_timeout_s: 0.3,
        retry_base_s: 30.0,
        retry_cap_s: 30.0,
        ..fast_cfg()
    };
    let (h, worker) = fx.spawn("PACS", port, cfg);
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.12", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();
    let it = wait_until(&h, id, "retry scheduled", |i| {
        i.state == ItemState::Pending && i.attempts == 1
    })
    .await;
    let err = it.last_error.unwrap_or_default();
    assert!(err.contains("timed out"), "{err}");
    let wait = it
        .next_attempt_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        wait > Duration::from_secs(25),
        "base delay applies: {wait:?}"
    );
    fx.stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_association_gives_the_attempt_back() {
    let fx = Fixture::new();
    let (_l, port) = silent_peer();
    let (h, worker) = fx.spawn("PACS", port, fast_cfg()); // 5 s DIMSE timeout
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.13", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();
    wait_until(&h, id, "sending", |i| i.state == ItemState::Sending).await;
    let t0 = Instant::now();
    fx.stop(worker).await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "did not wait for the peer"
    );
    let it = h.get(id).unwrap().unwrap();
    assert_eq!((it.state, it.attempts), (ItemState::Pending, 0));
}

/// A storescp with TLS (`+tls`), requiring our client certificate.
fn tls_storescp(port: u16, dir: &Path, pki: &crate::tls::testpki::Pki) -> Scp {
    let (key, cert, ca) = (pki.key.to_str().unwrap(), pki.cert.to_str().unwrap(), pki.ca.to_str().unwrap());
    storescp_with(port, dir, &["+tls", key, cert, "+cf", ca])
}

fn tls_destination(port: u16, pki: &crate::tls::testpki::Pki) -> Destination {
    let cfg = crate::config::DestinationTlsConfig {
        ca: pki.ca.clone(),
        certificate: Some(pki.cert.clone()),
        private_key: Some(pki.key.clone()),
        server_name: None,
    };
    Destination {
        ae_title: "PACS".into(),
        host: "127.0.0.1".into(),
        port,
        tls: Some(ClientTls {
            config: crate::tls::client_config("pacs", &cfg).unwrap(),
            server_name: "127.0.0.1".into(),
        }),
        stow: None,
    }
}

fn spawn_with(fx: &Fixture, dest: Destination) -> (OutboxHandle, tokio::task::JoinHandle<()>) {
    Outbox::spawn(
        fx.store.clone(),
        HashMap::from([("pacs".to_string(), dest)]),
        fast_cfg(),
        AeTitle::new("BIOMARKER"),
        Arc::new(super::claims::NoClaims),
        fx.shutdown.clone(),
    )
    .unwrap()
}

/// A throwaway PKI (openssl) and DCMTK's storescp; None, with a note, without them.
fn tls_prereqs() -> Option<(tempfile::TempDir, crate::tls::testpki::Pki)> {
    let dir = tempfile::tempdir().unwrap();
    let Some(pki) = crate::tls::testpki::make(dir.path()) else {
        have("openssl", false);
        return None;
    };
    have_storescp().then_some((dir, pki))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_over_tls_with_a_client_certificate() {
    let Some((_pki_dir, pki)) = tls_prereqs() else { return };
    let fx = Fixture::new();
    let port = free_port();
    let _scp = tls_storescp(port, &fx.received(), &pki);
    let (h, worker) = spawn_with(&fx, tls_destination(port, &pki));
    // 64×64: several PDVs at storescp's 4096-byte PDU, all inside TLS records.
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.40", 64);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();
    wait_until(&h, id, "delivery over TLS", |i| i.state == ItemState::Delivered).await;
    fx.stop(worker).await;
    assert_eq!(files_in(&fx.received()).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_destination_on_a_tls_port_is_a_transient_failure() {
    let Some((_pki_dir, pki)) = tls_prereqs() else { return };
    let fx = Fixture::new();
    let port = free_port();
    let _scp = tls_storescp(port, &fx.received(), &pki);
    let (h, worker) = fx.spawn("PACS", port, fast_cfg());
    let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, "1.2.826.0.1.3680043.10.9.41", 8);
    let id = h.enqueue("pacs", &p, &class, &sop).unwrap().id();
    let it = wait_until(&h, id, "a failed attempt", |i| {
        i.attempts >= 1 && i.state == ItemState::Pending
    })
    .await;
    let err = it.last_error.unwrap_or_default();
    assert!(err.contains("no A-ASSOCIATE response"), "{err}");
    fx.stop(worker).await;
    assert!(files_in(&fx.received()).is_empty());
}

/// The shared claims of several workers in one process: a map with
/// revisions, behind the same [`claims::decide`] as the KV back end.
#[derive(Default)]
struct MemoryKv {
    entries: std::sync::Mutex<HashMap<String, (claims::ClaimValue, u64)>>,
    revision: std::sync::atomic::AtomicU64,
}

struct MemoryClaims {
    kv: Arc<MemoryKv>,
    owner: String,
    lease: Duration,
    /// Answer `Unavailable` to everything (NATS down).
    down: bool,
    /// Claims asked.
    asked: std::sync::atomic::AtomicUsize,
}

impl MemoryClaims {
    fn write(&self, key: &str, state: claims::ClaimState, expect: Option<u64>) -> bool {
        let mut m = self.kv.entries.lock().unwrap();
        if m.get(key).map(|(_, r)| *r) != expect {
            return false;
        }
        let rev = self.kv.revision.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let until_ms = claims::unix_ms(SystemTime::now() + self.lease);
        m.insert(key.to_owned(), (claims::ClaimValue { state, owner: self.owner.clone(), until_ms }, rev));
        true
    }
}

impl claims::Claims for MemoryClaims {
    fn claim<'a>(&'a self, destination: &'a str, sop: &'a str) -> claims::ClaimFuture<'a, claims::Claim> {
        Box::pin(async move {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.down {
                return claims::Claim::Unavailable { reason: "test: down".into() };
            }
            let key = claims::key(destination, sop);
            loop {
                let cur = self.kv.entries.lock().unwrap().get(&key).cloned();
                let now = SystemTime::now();
                let d = claims::decide(cur.as_ref().map(|(v, r)| (Ok(v), *r)), &self.owner, claims::unix_ms(now));
                match d {
                    claims::Decision::Create if self.write(&key, claims::ClaimState::Sending, None) => {
                        return claims::Claim::Proceed
                    }
                    claims::Decision::Take { revision }
                        if self.write(&key, claims::ClaimState::Sending, Some(revision)) =>
                    {
                        return claims::Claim::Proceed
                    }
                    claims::Decision::Create | claims::Decision::Take { .. } => continue,
                    claims::Decision::Delivered { owner } => return claims::Claim::AlreadyDelivered { by: owner },
                    claims::Decision::Held { owner, until_ms } => {
                        return claims::Claim::HeldByOther { owner, retry_at: claims::retry_at_for_held(now, until_ms) }
                    }
                }
            }
        })
    }
    fn delivered<'a>(&'a self, destination: &'a str, sop: &'a str) -> claims::ClaimFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let key = claims::key(destination, sop);
            let rev = self.kv.entries.lock().unwrap().get(&key).map(|(_, r)| *r);
            assert!(self.write(&key, claims::ClaimState::Delivered, rev));
            Ok(())
        })
    }
    fn release<'a>(&'a self, _: &'a str, _: &'a str) -> claims::ClaimFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_the_same_item_deliver_it_once() {
    if !have_storescp() {
        return;
    }
    let kv = Arc::new(MemoryKv::default());
    let port = free_port();
    let (a, b) = (Fixture::new(), Fixture::new());
    let _scp = storescp(port, &a.received());
    let claims = |owner: &str| -> Arc<dyn claims::Claims> {
        Arc::new(MemoryClaims {
            kv: kv.clone(),
            owner: owner.into(),
            lease: Duration::from_secs(60),
            down: false,
            asked: Default::default(),
        })
    };
    let sop = "1.2.826.0.1.3680043.10.9.77";
    let mut ids = Vec::new();
    let mut workers = Vec::new();
    for (fx, owner) in [(&a, "worker-a"), (&b, "worker-b")] {
        let (h, w) = fx.spawn_claims("PACS", port, fast_cfg(), claims(owner));
        let (p, class, uid, _) = fx.result(SECONDARY_CAPTURE, sop, 8);
        ids.push((h.clone(), h.enqueue("pacs", &p, &class, &uid).unwrap().id()));
        workers.push(w);
    }
    let mut notes = Vec::new();
    for (h, id) in &ids {
        let it = wait_until(h, *id, "delivered", |i| i.state == ItemState::Delivered).await;
        notes.push(it.last_error.unwrap_or_default());
    }
    for (fx, w) in [&a, &b].into_iter().zip(workers) {
        fx.stop(w).await;
    }
    assert_eq!(files_in(&a.received()).len(), 1, "one delivery for two workers");
    assert_eq!(
        notes.iter().filter(|n| n.contains("delivered by another worker")).count(),
        1,
        "{notes:?}"
    );
    let (v, _) = kv.entries.lock().unwrap().get(&claims::key("pacs", sop)).cloned().unwrap();
    assert_eq!(v.state, claims::ClaimState::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_claims_send_nothing_and_spend_no_attempt() {
    let fx = Fixture::new();
    let port = free_port(); // nothing would be reached anyway
    let kv = Arc::new(MemoryKv::default());
    let down = Arc::new(MemoryClaims {
        kv,
        owner: "w".into(),
        lease: Duration::from_secs(60),
        down: true,
        asked: Default::default(),
    });
    // Three items in one batch: enqueued before the worker starts.
    let mut ids = Vec::new();
    for n in 0..3 {
        let (p, class, sop, _) = fx.result(SECONDARY_CAPTURE, &format!("1.2.826.0.1.3680043.10.9.8{n}"), 8);
        let item = NewItem { destination: "pacs".into(), path: p, sop_class_uid: class, sop_instance_uid: sop };
        ids.push(fx.store.enqueue(&item, SystemTime::now()).unwrap().id());
    }
    let (h, worker) = fx.spawn_claims("PACS", port, fast_cfg(), down.clone());
    for id in ids {
        let it = wait_until(&h, id, "deferred", |i| {
            i.last_error.as_deref().is_some_and(|e| e.contains("unavailable"))
        })
        .await;
        assert_eq!(it.state, ItemState::Pending);
        assert_eq!(it.attempts, 0, "a claims outage is no delivery attempt");
        assert!(it.next_attempt_at > SystemTime::now() + Duration::from_secs(2), "due again later, not now");
    }
    assert_eq!(
        down.asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one unanswered claim per batch, not one per item"
    );
    fx.stop(worker).await;
}
