//! The cluster spool: received instances in a NATS JetStream Object Store
//! bucket, their metadata on a stream (docs/SCALE-OUT.md).
//!
//! Input: the bytes of one dataset, as for [`super::DiskSpool`].
//! Output: a [`StoredFile`] once the object store has acknowledged every
//! chunk and the object's metadata, and the stream has acknowledged the
//! instance's metadata message ([`InstanceMeta`], JSON, subject
//! `<instances_subject>.<study>.<series>` (UIDs with `_` for `.`), `Nats-Msg-Id` = SOP Instance UID).
//!
//! Invariants:
//! - Nothing is acknowledged before JetStream has acknowledged it: `commit`
//!   returns only after the put and the publish acks. With file storage an
//!   acked message is in the server's store files (it survives the server
//!   process being killed; surviving the loss of the machine needs
//!   replicas, see docs/SCALE-OUT.md).
//! - The object comes before its metadata message: a consumer of the stream
//!   always finds the object. A crash between the two leaves an object
//!   without a message; the peer got no success and sends it again, which
//!   finds the object (not uploaded again) and publishes the message.
//! - Partials stay local: the dataset streams to `<data_dir>/tmp/` (memory
//!   bounded as for the disk spool), is validated there by the same
//!   [`super::validate`], and is uploaded only when whole and valid.
//! - Object name = the disk spool's relative path
//!   (`<study>/<series>/<sop>.dcm`), from validated UIDs.
//! - Duplicates: an object already under that name is not uploaded again
//!   (`duplicate: true`), but its message is published again, so two
//!   receivers racing on one UID each store the same bytes at worst. The
//!   stream dedupes the message on the SOP Instance UID within its
//!   duplicate window (2 min); consumers dedupe on the UID.
//!
//! Failures: NATS unreachable, a missing ack or a timeout
//! (`cluster.ack_timeout_s`) are [`SpoolError::Shared`], transient: the
//! C-STORE fails with an out-of-resources status and the peer retries.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, object_store, stream};
use serde::{Deserialize, Serialize};

use super::{validate, write_part10_header, Incoming, Spool, SpoolError, SpoolWriter, StoredFile};
use crate::config::ClusterConfig;
use crate::dicom::header::InstanceHeader;

/// Object chunks: one message per 512 KiB, so a typical CT slice (~530 kB)
/// is two chunk acks plus the object's metadata, not five (the client's
/// default is 128 KiB). Below NATS' default max_payload of 1 MiB.
const CHUNK_BYTES: usize = 512 * 1024;

/// The message published to the instances stream for each stored instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceMeta {
    pub header: InstanceHeader,
    /// Object name in the instances bucket.
    pub object: String,
    pub transfer_syntax: String,
    pub size_bytes: u64,
}

/// Handles to the cluster's instance storage; cheap to clone.
#[derive(Clone)]
pub struct Shared {
    pub js: jetstream::Context,
    pub bucket: object_store::ObjectStore,
    pub cfg: ClusterConfig,
}

impl Shared {
    /// Connects and makes sure the bucket and the stream exist (created
    /// with file storage and `cluster.replicas` when absent).
    pub async fn connect(cfg: &ClusterConfig) -> Result<Shared, SpoolError> {
        let client = async_nats::connect(cfg.nats_url.as_str())
            .await
            .map_err(|e| shared("connect", &e))?;
        let js = jetstream::new(client);
        let bucket = match js.get_object_store(&cfg.instances_bucket).await {
            Ok(b) => b,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: cfg.instances_bucket.clone(),
                    storage: stream::StorageType::File,
                    num_replicas: cfg.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| shared("create the instances bucket", &e))?,
        };
        js.get_or_create_stream(stream::Config {
            name: cfg.instances_stream.clone(),
            subjects: vec![format!("{}.>", cfg.instances_subject)],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| shared("create the instances stream", &e))?;
        Ok(Shared { js, bucket, cfg: cfg.clone() })
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.ack_timeout_s)
    }

    /// Uploads one validated Part 10 file and publishes its metadata; both
    /// acknowledged before this returns. `Ok(true)`: the object was already
    /// there and was not uploaded again (its message is published anyway).
    async fn store(&self, path: &Path, meta: &InstanceMeta) -> Result<bool, SpoolError> {
        // An object already there is not uploaded again, but its message is
        // still published: the earlier attempt may have died between the two.
        let duplicate = self.bucket.info(&meta.object).await.is_ok();
        if !duplicate {
            let mut file = tokio::fs::File::open(path).await?;
            let object = object_store::ObjectMetadata {
                name: meta.object.clone(),
                chunk_size: Some(CHUNK_BYTES),
                ..Default::default()
            };
            self.bucket.put(object, &mut file).await.map_err(|e| shared("object put", &e))?;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", meta.header.sop_instance_uid.as_str());
        let body = serde_json::to_vec(meta).map_err(|e| SpoolError::Meta(e.to_string()))?;
        let subject = instance_subject(&self.cfg, meta.header.study_instance_uid.as_str(), meta.header.series_instance_uid.as_str());
        let ack = self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| shared("metadata publish", &e))?
            .await
            .map_err(|e| shared("metadata publish ack", &e))?;
        // A duplicate only when both were there already: an object without
        // its message is an earlier attempt that died in between, and this
        // one is the instance's first complete store.
        Ok(duplicate && ack.duplicate)
    }
}

/// A UID as one subject token: UIDs are digits and dots, and a dot
/// separates tokens, so dots become `_` (reversible: `_` is not in a UID).
pub fn uid_token(uid: &str) -> String {
    uid.replace('.', "_")
}

/// `<prefix>.<study>.<series>`, so a worker can read one series' messages.
pub fn instance_subject(cfg: &ClusterConfig, study: &str, series: &str) -> String {
    format!("{}.{}.{}", cfg.instances_subject, uid_token(study), uid_token(series))
}

/// The KV bucket `bucket`, created when absent (file storage, history 1).
/// Two processes creating it at once both end with the same bucket.
///
/// Made as the client's `create_key_value` makes it (stream `KV_<bucket>`,
/// subjects `$KV.<bucket>.>`, roll-ups, no deletes of messages, direct
/// gets, discard new), but through `get_or_create_stream`: the client's own
/// call first queries the account info, whose 2.9.10 answer it cannot parse.
pub async fn key_value(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<jetstream::kv::Store, String> {
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create the KV bucket {bucket}: {e}"))?;
    js.get_key_value(bucket).await.map_err(|e| format!("open the KV bucket {bucket}: {e}"))
}

fn shared(what: &str, e: &dyn std::fmt::Display) -> SpoolError {
    SpoolError::Shared(format!("{what}: {e}"))
}

/// [`Spool`] over the cluster's object store: partials in `<data_dir>/tmp`,
/// instances in the bucket. `root()` is `<data_dir>/spool`, where nothing is
/// kept in this role.
pub struct NatsSpool {
    shared: Shared,
    root: PathBuf,
    tmp: PathBuf,
    seq: AtomicU64,
    rt: tokio::runtime::Handle,
}

impl NatsSpool {
    /// Call inside the runtime that will drive the uploads.
    pub fn open(data_dir: &Path, shared: Shared) -> Result<NatsSpool, SpoolError> {
        let root = data_dir.join("spool");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&root)?;
        if tmp.exists() {
            for e in fs::read_dir(&tmp)? {
                fs::remove_file(e?.path())?;
            }
        }
        fs::create_dir_all(&tmp)?;
        Ok(NatsSpool {
            shared,
            root,
            tmp,
            seq: AtomicU64::new(0),
            rt: tokio::runtime::Handle::current(),
        })
    }
}

impl Spool for NatsSpool {
    fn begin(&self, incoming: &Incoming) -> Result<Box<dyn SpoolWriter>, SpoolError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self.tmp.join(format!("{}-{n}.part", std::process::id()));
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(&tmp_path)?);
        let mut header = Vec::with_capacity(512);
        write_part10_header(&mut header, incoming)?;
        out.write_all(&header)?;
        Ok(Box::new(NatsWriter {
            shared: self.shared.clone(),
            rt: self.rt.clone(),
            tmp_path,
            out: Some(out),
            incoming: incoming.clone(),
            dataset_offset: header.len() as u64,
        }))
    }

    /// Of the local staging directory: partials are the only local bytes.
    fn free_bytes(&self) -> Result<u64, SpoolError> {
        super::free_bytes(&self.tmp).map_err(SpoolError::from)
    }

    fn root(&self) -> &Path {
        &self.root
    }
}

struct NatsWriter {
    shared: Shared,
    rt: tokio::runtime::Handle,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    incoming: Incoming,
    dataset_offset: u64,
}

impl SpoolWriter for NatsWriter {
    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let out = self.out.as_mut().expect("writer is present until commit or abort");
        out.write_all(data)?;
        Ok(())
    }

    /// Blocking: runs the upload on the node's runtime from the blocking
    /// thread ingest calls it on.
    fn commit(mut self: Box<Self>) -> Result<StoredFile, SpoolError> {
        let result = self.commit_inner();
        let _ = fs::remove_file(&self.tmp_path);
        result
    }

    fn abort(mut self: Box<Self>) {
        self.out.take();
        let _ = fs::remove_file(&self.tmp_path);
    }
}

impl NatsWriter {
    fn commit_inner(&mut self) -> Result<StoredFile, SpoolError> {
        let out = self.out.take().expect("writer is present until commit or abort");
        let file = out.into_inner().map_err(|e| e.into_error())?;
        let size_bytes = file.metadata()?.len();
        drop(file);
        let header = validate(&fs::File::open(&self.tmp_path)?, self.dataset_offset, &self.incoming)?;
        let rel_path = crate::dicom::uid_path(
            Path::new(""),
            &[&header.study_instance_uid, &header.series_instance_uid],
            &[&format!("{}.dcm", header.sop_instance_uid)],
        )?;
        let object = rel_path.to_str().ok_or_else(|| SpoolError::Meta("non-UTF-8 path".into()))?.to_owned();
        let meta = InstanceMeta {
            header,
            object,
            transfer_syntax: self.incoming.transfer_syntax.trim_end_matches(['\0', ' ']).to_owned(),
            size_bytes,
        };
        let timeout = self.shared.ack_timeout();
        let duplicate = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, self.shared.store(&self.tmp_path, &meta)).await })
            .map_err(|_| SpoolError::Shared(format!("no JetStream ack within {timeout:?}")))??;
        Ok(StoredFile {
            rel_path,
            header: meta.header,
            size_bytes,
            duplicate,
        })
    }
}

impl Shared {
    /// Every instance message of one series, oldest first, deduplicated on
    /// the SOP Instance UID: an ephemeral consumer filtered on the series'
    /// subject, read until it has nothing pending.
    pub async fn series_instances(&self, study: &str, series: &str) -> Result<Vec<InstanceMeta>, SpoolError> {
        use futures_util::StreamExt;
        use jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        let stream = self
            .js
            .get_stream(&self.cfg.instances_stream)
            .await
            .map_err(|e| shared("open the instances stream", &e))?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .create_consumer(pull::Config {
                filter_subject: instance_subject(&self.cfg, study, series),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| shared("create a series consumer", &e))?;
        let total = consumer.get_info().await.map_err(|e| shared("series consumer info", &e))?.num_pending as usize;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(total);
        let mut read = 0usize;
        while read < total {
            let mut batch = consumer
                .fetch()
                .max_messages((total - read).min(512))
                .expires(self.ack_timeout())
                .messages()
                .await
                .map_err(|e| shared("fetch series messages", &e))?;
            let before = read;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| shared("series messages", &e))?;
                read += 1;
                match serde_json::from_slice::<InstanceMeta>(&m.payload) {
                    Ok(meta) => {
                        if seen.insert(meta.header.sop_instance_uid.clone()) {
                            out.push(meta);
                        }
                    }
                    Err(e) => tracing::warn!(subject = %m.subject, error = %e, "not an instance message; skipped"),
                }
            }
            if read == before {
                return Err(SpoolError::Shared(format!("the series' messages stopped at {read} of {total}")));
            }
        }
        let _ = stream.delete_consumer(&consumer.cached_info().name).await;
        Ok(out)
    }

    /// Copies the instance's object into `disk` (the worker's local spool:
    /// same layout, same fsyncs and checks as a C-STORE into an embedded
    /// node), streaming, without holding the object in memory. The object's
    /// own Part 10 header is replaced by the disk spool's, as on ingest.
    pub async fn materialize(
        &self,
        meta: &InstanceMeta,
        disk: &std::sync::Arc<super::DiskSpool>,
        max_dataset_bytes: u64,
    ) -> Result<StoredFile, SpoolError> {
        use tokio::io::AsyncReadExt;
        let mut object = self
            .bucket
            .get(&meta.object)
            .await
            .map_err(|e| shared(&format!("get object {}", meta.object), &e))?;
        // Preamble, `DICM`, then (0002,0000) UL: its value is the length of
        // the rest of the file meta group.
        let mut head = [0u8; 144];
        object.read_exact(&mut head).await?;
        if &head[128..132] != b"DICM" || head[132..138] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
            return Err(SpoolError::Unparseable(format!("object {} is not a Part 10 file", meta.object)));
        }
        let mut skip = u32::from_le_bytes(head[140..144].try_into().expect("4 bytes")) as u64;
        let incoming = Incoming {
            sop_class_uid: meta.header.sop_class_uid.to_string(),
            sop_instance_uid: meta.header.sop_instance_uid.to_string(),
            transfer_syntax: meta.transfer_syntax.clone(),
            max_dataset_bytes,
        };
        let mut writer = disk.begin(&incoming)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        let copied: Result<(), SpoolError> = async {
            loop {
                let n = object.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                let mut chunk = &buf[..n];
                let s = skip.min(chunk.len() as u64) as usize;
                chunk = &chunk[s..];
                skip -= s as u64;
                written += chunk.len() as u64;
                if written > max_dataset_bytes {
                    return Err(SpoolError::TooLarge { limit_bytes: max_dataset_bytes, inflated: false });
                }
                writer.write(chunk)?;
            }
        }
        .await;
        if let Err(e) = copied {
            writer.abort();
            return Err(e);
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| SpoolError::Io(std::io::Error::other(e.to_string())))?
    }
}
