//! [`Claims`] on a NATS JetStream KV bucket (`cluster.outbox_bucket`), so
//! that the workers of a cluster send each (destination, SOP Instance UID)
//! once (docs/SCALE-OUT.md, "Outbox").
//!
//! Input: the item's destination and SOP Instance UID. Output: a [`Claim`].
//! Key: [`claims::key`] (`<escaped destination>.<SOP Instance UID>`);
//! value: [`ClaimValue`] as JSON, `{"state": "sending"|"delivered",
//! "owner": <worker id>, "until_ms": <lease end, Unix ms>}`.
//!
//! Invariants:
//! - Every write is conditional: `create` (fails if the key exists) or
//!   `update` on the revision that was read (compare-and-set). Two workers
//!   racing for one key: one write wins, the other reads again and finds a
//!   live lease (held) or `delivered`.
//! - What to do with the entry read is [`claims::decide`] (pure, tested).
//! - Any error or timeout talking to NATS is [`Claim::Unavailable`]: the
//!   item waits and is asked about again; nothing is taken as delivered
//!   unless the bucket says so.
//!
//! Failure modes: a worker that dies holding a lease delays the item by at
//! most `cluster.outbox_lease_s`; one that dies after the destination
//! accepted but before `delivered` was recorded lets another worker send
//! the same SOP Instance once more (at-least-once, idempotent by UID). A
//! batch of many items is claimed as a whole before its association, so a
//! batch that takes longer than the lease may overlap a takeover: the
//! same outcome, one more identical instance at the destination.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};

use super::claims::{self, Claim, ClaimFuture, ClaimState, ClaimValue, Claims, Decision};
use crate::config::ClusterConfig;

/// Compare-and-set races lost in a row before the answer is "try later".
const MAX_RACES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error("cannot open the outbox claims bucket `{bucket}`: {reason}")]
    Bucket { bucket: String, reason: String },
}

/// The outbox claims of one worker on the cluster's KV bucket.
pub struct KvClaims {
    kv: kv::Store,
    /// This worker's id, written as `owner` (e.g. `<host>-<pid>`).
    owner: String,
    lease: Duration,
    /// Bound on each KV call, so an unreachable server delays a batch by
    /// this much, not forever.
    timeout: Duration,
}

impl KvClaims {
    /// Opens `cluster.outbox_bucket`, creating it when absent (file storage,
    /// `cluster.replicas`, history 1). `owner` names this worker in the
    /// bucket; it must differ between live workers.
    pub async fn open(js: jetstream::Context, cfg: &ClusterConfig, owner: String) -> Result<KvClaims, ClaimsError> {
        let kv = crate::spool::nats::key_value(&js, &cfg.outbox_bucket, cfg.replicas)
            .await
            .map_err(|reason| ClaimsError::Bucket {
                bucket: cfg.outbox_bucket.clone(),
                reason,
            })?;
        Ok(KvClaims {
            kv,
            owner,
            lease: Duration::from_secs_f64(cfg.outbox_lease_s.max(1.0)),
            timeout: Duration::from_secs_f64(cfg.ack_timeout_s.max(0.5)),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn value(&self, state: ClaimState) -> bytes::Bytes {
        let until_ms = claims::unix_ms(SystemTime::now() + self.lease);
        let v = ClaimValue {
            state,
            owner: self.owner.clone(),
            until_ms,
        };
        serde_json::to_vec(&v).expect("a ClaimValue always serialises").into()
    }

    /// The current entry of `key`: `None` when absent or deleted.
    async fn read(&self, key: &str) -> Result<Option<(Result<ClaimValue, ()>, u64)>, String> {
        let e = bounded(self.timeout, self.kv.entry(key)).await?;
        Ok(e.filter(|e| e.operation == kv::Operation::Put).map(|e| {
            let v = serde_json::from_slice::<ClaimValue>(&e.value).map_err(|err| {
                tracing::warn!(key, error = %err, "outbox claims: an entry that does not parse is taken over");
            });
            (v, e.revision)
        }))
    }

    async fn try_claim(&self, destination: &str, sop: &str) -> Result<Claim, String> {
        let key = claims::key(destination, sop);
        for _ in 0..MAX_RACES {
            let current = self.read(&key).await?;
            let now = SystemTime::now();
            let current_ref = current.as_ref().map(|(v, r)| (v.as_ref().map_err(|_| ()), *r));
            match claims::decide(current_ref, &self.owner, claims::unix_ms(now)) {
                Decision::Delivered { owner } => return Ok(Claim::AlreadyDelivered { by: owner }),
                Decision::Held { owner, until_ms } => {
                    return Ok(Claim::HeldByOther {
                        owner,
                        retry_at: claims::retry_at_for_held(now, until_ms),
                    })
                }
                Decision::Create => {
                    match bounded_raw(self.timeout, self.kv.create(&key, self.value(ClaimState::Sending))).await? {
                        Ok(_) => return Ok(Claim::Proceed),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(format!("create {key}: {e}")),
                    }
                }
                Decision::Take { revision } => {
                    match bounded_raw(
                        self.timeout,
                        self.kv.update(&key, self.value(ClaimState::Sending), revision),
                    )
                    .await?
                    {
                        Ok(_) => return Ok(Claim::Proceed),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(format!("update {key}: {e}")),
                    }
                }
            }
        }
        Err(format!("{key}: lost {MAX_RACES} compare-and-set races in a row"))
    }

    async fn try_delivered(&self, destination: &str, sop: &str) -> Result<(), String> {
        let key = claims::key(destination, sop);
        for _ in 0..MAX_RACES {
            // Whatever the entry says now (even another worker's lease: it
            // would only send again), it is delivered.
            let r = match self.read(&key).await? {
                Some((Ok(v), _)) if v.state == ClaimState::Delivered => return Ok(()),
                Some((_, revision)) => bounded_raw(
                    self.timeout,
                    self.kv.update(&key, self.value(ClaimState::Delivered), revision),
                )
                .await?
                .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
                None => bounded_raw(self.timeout, self.kv.create(&key, self.value(ClaimState::Delivered)))
                    .await?
                    .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
            };
            match r {
                Ok(_) => return Ok(()),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(format!("{key}: {e}")),
            }
        }
        Err(format!("{key}: lost {MAX_RACES} compare-and-set races in a row"))
    }

    async fn try_release(&self, destination: &str, sop: &str) -> Result<(), String> {
        let key = claims::key(destination, sop);
        if let Some((Ok(v), revision)) = self.read(&key).await? {
            if v.state == ClaimState::Sending && v.owner == self.owner {
                let expired = ClaimValue { until_ms: 0, ..v };
                let value = serde_json::to_vec(&expired)
                    .expect("a ClaimValue always serialises")
                    .into();
                // A lost race means someone else took it: nothing to release.
                let _ = bounded_raw(self.timeout, self.kv.update(&key, value, revision)).await?;
            }
        }
        Ok(())
    }
}

impl Claims for KvClaims {
    fn claim<'a>(&'a self, destination: &'a str, sop_instance_uid: &'a str) -> ClaimFuture<'a, Claim> {
        Box::pin(async move {
            self.try_claim(destination, sop_instance_uid)
                .await
                .unwrap_or_else(|reason| Claim::Unavailable { reason })
        })
    }

    fn delivered<'a>(&'a self, destination: &'a str, sop_instance_uid: &'a str) -> ClaimFuture<'a, Result<(), String>> {
        Box::pin(self.try_delivered(destination, sop_instance_uid))
    }

    fn release<'a>(&'a self, destination: &'a str, sop_instance_uid: &'a str) -> ClaimFuture<'a, Result<(), String>> {
        Box::pin(self.try_release(destination, sop_instance_uid))
    }
}

/// A KV call within `timeout`; both a timeout and the call's error are
/// the message.
async fn bounded<T, E: std::fmt::Display>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    bounded_raw(timeout, fut).await?.map_err(|e| e.to_string())
}

/// A KV call within `timeout`, its own error kept for the caller to match.
async fn bounded_raw<T>(timeout: Duration, fut: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer from NATS within {timeout:?}"))
}

/// A throwaway `nats-server -js` for tests; skipped (None, with a note)
/// where none is installed, except in CI (`CI` set), where
/// scripts/install-deps.sh installs it and a missing one is a failure.
#[cfg(test)]
pub(crate) mod test_server {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct NatsServer {
        child: Child,
        pub url: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for NatsServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl NatsServer {
        pub fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn start() -> Option<NatsServer> {
        let bin = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(std::env::var_os("CI").is_none(), "nats-server not installed (scripts/install-deps.sh installs it)");
            eprintln!("skipping: nats-server not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// A cluster section on `url` with a short lease and timeout.
    pub fn config(url: &str) -> crate::config::ClusterConfig {
        let mut c: crate::config::ClusterConfig =
            serde_json::from_value(serde_json::json!({ "nats_url": url })).unwrap();
        c.outbox_lease_s = 1.0;
        c.ack_timeout_s = 1.0;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_on_a_real_nats_server() {
        let Some(mut server) = test_server::start() else { return };
        let cfg = test_server::config(&server.url);
        let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
        let a = KvClaims::open(js.clone(), &cfg, "worker-a".into()).await.unwrap();
        // The second opens the bucket the first created.
        let b = KvClaims::open(js.clone(), &cfg, "worker-b".into()).await.unwrap();
        let sop = "1.2.826.0.1.3680043.10.9.5";

        assert_eq!(a.claim("my.pacs", sop).await, Claim::Proceed);
        assert_eq!(a.claim("my.pacs", sop).await, Claim::Proceed, "renewing our own lease");
        assert!(matches!(b.claim("my.pacs", sop).await, Claim::HeldByOther { owner, .. } if owner == "worker-a"));
        // Another destination is another key.
        assert_eq!(b.claim("other", sop).await, Claim::Proceed);
        a.delivered("my.pacs", sop).await.unwrap();
        assert_eq!(
            b.claim("my.pacs", sop).await,
            Claim::AlreadyDelivered { by: "worker-a".into() }
        );
        let kv = js.get_key_value(&cfg.outbox_bucket).await.unwrap();
        let v: ClaimValue =
            serde_json::from_slice(&kv.get(claims::key("my.pacs", sop)).await.unwrap().unwrap()).unwrap();
        assert_eq!((v.state, v.owner.as_str()), (ClaimState::Delivered, "worker-a"));

        // A lease that runs out is taken over; release hands it back at once.
        let sop2 = "1.2.826.0.1.3680043.10.9.6";
        assert_eq!(a.claim("p", sop2).await, Claim::Proceed);
        assert!(matches!(b.claim("p", sop2).await, Claim::HeldByOther { .. }));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(b.claim("p", sop2).await, Claim::Proceed, "worker-a's lease ran out");
        a.release("p", sop2).await.unwrap(); // not a's any more: nothing happens
        assert!(matches!(a.claim("p", sop2).await, Claim::HeldByOther { owner, .. } if owner == "worker-b"));
        b.release("p", sop2).await.unwrap();
        assert_eq!(
            a.claim("p", sop2).await,
            Claim::Proceed,
            "released: no need to wait out the lease"
        );

        // NATS gone: "try later", never "delivered".
        server.kill();
        let started = std::time::Instant::now();
        assert!(matches!(b.claim("my.pacs", "1.2.3.4").await, Claim::Unavailable { .. }));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(b.delivered("my.pacs", "1.2.3.4").await.is_err());
    }
}
