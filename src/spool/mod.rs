//! The durable spool: where every acknowledged instance lives.
//!
//! Input: the bytes of one dataset, streamed PDV by PDV as they arrive.
//! Output: a [`StoredFile`] once the instance is durable, or an error that
//! ingest maps to a DIMSE status, with its [`Fault`] (ours and transient, or
//! the dataset's and permanent).
//!
//! Invariants:
//! - Nothing is acknowledged before it is durable: [`SpoolWriter::commit`]
//!   fsyncs the file, links it into place and fsyncs every directory it
//!   created or changed. Only then does ingest answer 0x0000.
//! - A partial transfer lives only in `tmp/`, which is emptied at start-up,
//!   so a cut-off transfer never shows up as an instance. Where the file
//!   system has `O_TMPFILE` (ext4, xfs, btrfs, tmpfs), a partial has no
//!   name at all: it is an unnamed inode that a crash frees, and it gets its
//!   one name, the final one, by `linkat` after its fsync.
//! - Memory per instance is bounded, whatever its size: the writer streams
//!   to disk, and validation ([`check_dataset`]) walks the file, or inflates
//!   a deflated one as a stream capped at `Incoming::max_dataset_bytes`,
//!   holding only the few header attributes [`InstanceHeader`] needs.
//! - Layout: `spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`, made by
//!   [`crate::dicom::uid_path`] from UIDs valid by PS3.5 9.1, so no dataset
//!   can place a file outside `spool/`. Each is a
//!   Part 10 file: our file meta, then the dataset bytes exactly as
//!   received in the negotiated transfer syntax.
//! - Duplicates: ingest asks the series index first, so a SOP Instance UID
//!   already stored (in any series) is acknowledged without a second copy.
//!   Here, a copy racing into the same path loses: the first copy wins and
//!   stays byte-identical; the new copy is dropped and the store still
//!   succeeds. A hard link, not a rename, puts files in
//!   place, so two associations racing on one UID cannot overwrite each
//!   other.
//!
//! The [`Spool`] trait is the seam for an object store: ingest only needs
//! "begin, write, commit or abort". [`nats::NatsSpool`] (feature `cluster`)
//! is the other implementation: instances in a NATS JetStream Object Store.

#[cfg(feature = "cluster")]
pub mod nats;

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::meta::{FileMetaTable, FileMetaTableBuilder};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dicom::header::{HeaderError, InstanceHeader};
use crate::dicom::scan::{self, Layout, ScanError};
use crate::dicom::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION};
use crate::fault::Fault;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode file meta: {0}")]
    Meta(String),
    #[error("dataset cannot be parsed: {0}")]
    Unparseable(String),
    #[error("dataset: {0}")]
    Header(#[from] HeaderError),
    #[error("dataset SOP Class {dataset} differs from the command's {command}")]
    SopClassMismatch { command: String, dataset: String },
    #[error("dataset SOP Instance {dataset} differs from the command's {command}")]
    SopInstanceMismatch { command: String, dataset: String },
    #[error("dataset identifiers do not make a spool path: {0}")]
    Path(#[from] crate::dicom::PathEscape),
    /// Past `node.max_dataset_mb`, as received or once inflated.
    #[error("dataset {} more than node.max_dataset_mb ({} MiB)", if *.inflated { "inflates to" } else { "has" }, .limit_bytes >> 20)]
    TooLarge { limit_bytes: u64, inflated: bool },
    #[error("dataset has more than {0} elements and items")]
    TooManyElements(u64),
    /// The cluster's shared store (NATS JetStream) did not take or did not
    /// acknowledge the instance.
    #[error("shared store: {0}")]
    Shared(String),
}

impl SpoolError {
    /// Ours and may pass (disk full, an I/O error: `Transient`), or a
    /// dataset we will never accept (`Permanent`); ingest logs the first
    /// as our failure.
    pub fn fault(&self) -> Fault {
        match self {
            SpoolError::Io(_) | SpoolError::Meta(_) | SpoolError::Shared(_) => Fault::Transient,
            _ => Fault::Permanent,
        }
    }
}

/// What the C-STORE-RQ told us before any data arrived, and the size limit
/// its dataset is held to.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// `node.max_dataset_mb` in bytes: the writer's caller stops receiving
    /// past it, and validation stops inflating past it.
    pub max_dataset_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct StoredFile {
    /// Relative to the spool root.
    pub rel_path: PathBuf,
    pub header: InstanceHeader,
    pub size_bytes: u64,
    /// True when an earlier copy was kept and this one dropped.
    pub duplicate: bool,
}

pub trait Spool: Send + Sync + 'static {
    fn begin(&self, incoming: &Incoming) -> Result<Box<dyn SpoolWriter>, SpoolError>;
    /// Free bytes where new instances go, for the disk watermark.
    fn free_bytes(&self) -> Result<u64, SpoolError>;
    fn root(&self) -> &Path;
}

pub trait SpoolWriter: Send {
    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError>;
    /// Blocking (fsync): call from a blocking context.
    fn commit(self: Box<Self>) -> Result<StoredFile, SpoolError>;
    /// Drop the partial file; never fails the caller.
    fn abort(self: Box<Self>);
}

/// Local-disk spool under `<data_dir>/spool`, partials under `<data_dir>/tmp`.
pub struct DiskSpool {
    root: PathBuf,
    tmp: PathBuf,
    seq: AtomicU64,
    /// Partials are unnamed `O_TMPFILE` inodes (probed at open).
    unnamed_partials: bool,
    dir_sync: Arc<DirSync>,
}

impl DiskSpool {
    /// Creates the directories and discards partial transfers left by a crash.
    pub fn open(data_dir: &Path) -> Result<DiskSpool, SpoolError> {
        let root = data_dir.join("spool");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&root)?;
        let mut discarded = 0usize;
        if tmp.exists() {
            for e in fs::read_dir(&tmp)? {
                fs::remove_file(e?.path())?;
                discarded += 1;
            }
        }
        fs::create_dir_all(&tmp)?;
        if discarded > 0 {
            tracing::warn!(discarded, "discarded partial transfers from before the restart");
        }
        let unnamed_partials = probe_unnamed_partials(&tmp);
        tracing::debug!(unnamed_partials, "spool opened");
        Ok(DiskSpool {
            root,
            tmp,
            seq: AtomicU64::new(0),
            unnamed_partials,
            dir_sync: Arc::new(DirSync::default()),
        })
    }

    /// A new partial file: unnamed where the file system allows, else
    /// `tmp/<pid>-<n>.part`.
    fn create_partial(&self) -> io::Result<(File, Option<PathBuf>)> {
        if self.unnamed_partials {
            return open_unnamed(&self.tmp).map(|f| (f, None));
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}.part", std::process::id()));
        // Read too: validation walks the dataset through this handle.
        let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        Ok((file, Some(path)))
    }
}

fn open_unnamed(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o666)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// Gives an unnamed file its name: `linkat` through `/proc/self/fd`, which
/// needs no capability (`AT_EMPTY_PATH` would need CAP_DAC_READ_SEARCH).
fn link_unnamed(file: &File, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: both are valid C strings; the fd is open for the call.
    let rc = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether unnamed partials work here, end to end: `O_TMPFILE` and linking
/// one through `/proc` (no `/proc`, an old kernel or another file system
/// answer no, and the spool names its partials instead).
fn probe_unnamed_partials(tmp: &Path) -> bool {
    let probe = tmp.join(format!("{}-probe.part", std::process::id()));
    let ok = open_unnamed(tmp).and_then(|f| link_unnamed(&f, &probe)).is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

impl Spool for DiskSpool {
    fn begin(&self, incoming: &Incoming) -> Result<Box<dyn SpoolWriter>, SpoolError> {
        let (file, tmp_path) = self.create_partial()?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
        let mut header = Vec::with_capacity(512);
        write_part10_header(&mut header, incoming)?;
        out.write_all(&header)?;
        Ok(Box::new(DiskWriter {
            root: self.root.clone(),
            tmp_path,
            out: Some(out),
            incoming: incoming.clone(),
            dataset_offset: header.len(),
            written: header.len() as u64,
            writeback_from: 0,
            dir_sync: self.dir_sync.clone(),
        }))
    }

    fn free_bytes(&self) -> Result<u64, SpoolError> {
        free_bytes(&self.root).map_err(SpoolError::from)
    }

    fn root(&self) -> &Path {
        &self.root
    }
}

fn write_part10_header(out: &mut impl Write, incoming: &Incoming) -> Result<(), SpoolError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(incoming.sop_class_uid.as_str())
        .media_storage_sop_instance_uid(incoming.sop_instance_uid.as_str())
        .transfer_syntax(incoming.transfer_syntax.as_str())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION)
        .build()
        .map_err(|e| SpoolError::Meta(e.to_string()))?;
    out.write_all(&[0u8; 128])?;
    out.write_all(b"DICM")?;
    meta.write(&mut *out).map_err(|e| SpoolError::Meta(e.to_string()))?;
    Ok(())
}

/// How much written data starts its writeback early.
const WRITEBACK_BYTES: u64 = 256 * 1024;

/// The write buffer gathers the file meta and small PDVs. It is smaller
/// than a typical PDV (DCMTK sends 131 kB ones; our max PDU is 256 KiB), so
/// those bypass it and go from the PDU buffer straight to the file: one
/// copy, not two.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

struct DiskWriter {
    root: PathBuf,
    /// The partial's name, when partials have one (no `O_TMPFILE`).
    tmp_path: Option<PathBuf>,
    out: Option<BufWriter<File>>,
    incoming: Incoming,
    /// Where the received dataset starts (after preamble and file meta).
    dataset_offset: usize,
    /// Bytes handed to `out` so far.
    written: u64,
    /// Start of the bytes whose writeback is not started yet.
    writeback_from: u64,
    dir_sync: Arc<DirSync>,
}

impl SpoolWriter for DiskWriter {
    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let out = self.out.as_mut().expect("writer is present until commit or abort");
        out.write_all(data)?;
        self.written += data.len() as u64;
        // Start writing back what reached the file while the rest of the
        // dataset is still on the wire, so the fsync at commit waits for the
        // tail only. SYNC_FILE_RANGE_WRITE queues the I/O and returns; it
        // promises nothing about durability (the fsync does that), so an
        // error here only loses the head start.
        let in_file = self.written - out.buffer().len() as u64;
        if in_file - self.writeback_from >= WRITEBACK_BYTES {
            // SAFETY: a valid fd and range; the call only schedules writeback.
            unsafe {
                libc::sync_file_range(
                    out.get_ref().as_raw_fd(),
                    self.writeback_from as libc::off64_t,
                    (in_file - self.writeback_from) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.writeback_from = in_file;
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<StoredFile, SpoolError> {
        let result = self.commit_inner();
        if let Some(tmp) = &self.tmp_path {
            // Placed or not, the partial's name goes (the placed file keeps
            // its final name).
            let _ = fs::remove_file(tmp);
        }
        result
    }

    fn abort(mut self: Box<Self>) {
        self.out.take();
        if let Some(tmp) = &self.tmp_path {
            let _ = fs::remove_file(tmp);
        }
    }
}

impl DiskWriter {
    fn commit_inner(&mut self) -> Result<StoredFile, SpoolError> {
        let out = self.out.take().expect("writer is present until commit or abort");
        let file = out.into_inner().map_err(|e| e.into_error())?;
        let size_bytes = file.metadata()?.len();
        // Parse before fsync: a dataset we refuse costs no disk flush.
        let header = validate(&file, self.dataset_offset as u64, &self.incoming)?;
        file.sync_all()?;

        let final_path = crate::dicom::uid_path(
            &self.root,
            &[&header.study_instance_uid, &header.series_instance_uid],
            &[&format!("{}.dcm", header.sop_instance_uid)],
        )?;
        let rel_path = final_path
            .strip_prefix(&self.root)
            .expect("uid_path builds under its root")
            .to_path_buf();
        let series_dir = final_path.parent().expect("uid_path adds components").to_path_buf();
        let created = create_dirs_durably(&self.root, rel_path.parent().expect("three components"))?;
        // The file's bytes and inode are durable (fsync above) before it has
        // its final name: a crash can leave a partial in tmp/ (or an unnamed
        // inode), never a torn file under spool/.
        let linked = match &self.tmp_path {
            Some(tmp) => fs::hard_link(tmp, &final_path),
            None => link_unnamed(&file, &final_path),
        };
        drop(file);
        let duplicate = match linked {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
            Err(e) => return Err(e.into()),
        };
        if !duplicate || created {
            // The new entry (or, for a duplicate, the dirs we made: cannot
            // happen, the dir had the first copy, but keep them durable) is
            // durable once the series directory is fsync'd after the link.
            // Concurrent stores into one series share that fsync (DirSync).
            self.dir_sync.sync(&series_dir)?;
        }
        Ok(StoredFile {
            rel_path,
            header,
            size_bytes,
            duplicate,
        })
    }
}

/// Check of the received dataset before anything is acknowledged: a
/// truncated dataset or an element whose length overruns fails here, and
/// so does one past `max_dataset_bytes` (inflated, if deflated). Streams:
/// the length walk of [`crate::dicom::scan`] reads the file (or inflates
/// it) through a fixed buffer, skipping values, and keeps only the
/// attributes [`InstanceHeader`] needs; dicom-rs parses just those.
fn validate(mut file: &File, dataset_offset: u64, incoming: &Incoming) -> Result<InstanceHeader, SpoolError> {
    let len = file.metadata()?.len().saturating_sub(dataset_offset);
    file.seek(SeekFrom::Start(dataset_offset))?;
    check_dataset(file, len, incoming)
}

/// The checks [`SpoolWriter::commit`] makes, over a dataset of `len` bytes
/// at `dataset`'s position: also the fuzz harness's way in.
pub fn check_dataset<R: Read + Seek>(dataset: R, len: u64, incoming: &Incoming) -> Result<InstanceHeader, SpoolError> {
    let layout = Layout::of(&incoming.transfer_syntax);
    let scanned = scan::scan(dataset, len, layout, incoming.max_dataset_bytes, &InstanceHeader::reads)?;
    let header = parse_header(&scanned.kept, layout)?;
    if header.sop_class_uid.as_str() != incoming.sop_class_uid.trim_end_matches(['\0', ' ']) {
        return Err(SpoolError::SopClassMismatch {
            command: incoming.sop_class_uid.clone(),
            dataset: header.sop_class_uid.to_string(),
        });
    }
    if header.sop_instance_uid.as_str() != incoming.sop_instance_uid.trim_end_matches(['\0', ' ']) {
        return Err(SpoolError::SopInstanceMismatch {
            command: incoming.sop_instance_uid.clone(),
            dataset: header.sop_instance_uid.to_string(),
        });
    }
    Ok(header)
}

/// Parse the header elements a walk kept (a few kB at most).
fn parse_header(kept: &[u8], layout: Layout) -> Result<InstanceHeader, SpoolError> {
    let ts = TransferSyntaxRegistry
        .get(layout.encoding.transfer_syntax())
        .expect("the native transfer syntaxes are built into dicom-rs");
    let obj = InMemDicomObject::read_dataset_with_ts(kept, ts)
        .map_err(|e| SpoolError::Unparseable(crate::error_chain(&e)))?;
    Ok(InstanceHeader::from_dataset(&obj)?)
}

impl From<ScanError> for SpoolError {
    fn from(e: ScanError) -> SpoolError {
        match e {
            ScanError::Io { kind, message } => SpoolError::Io(io::Error::new(kind, message)),
            ScanError::TooLarge { limit, inflated } => SpoolError::TooLarge { limit_bytes: limit, inflated },
            ScanError::TooManyElements(n) => SpoolError::TooManyElements(n),
            e => SpoolError::Unparseable(e.to_string()),
        }
    }
}

/// Create `root/rel` one level at a time, fsyncing each parent whose
/// entries changed, so a new directory survives a crash. Returns whether
/// anything was created. `rel` comes from [`crate::dicom::uid_path`].
fn create_dirs_durably(root: &Path, rel: &Path) -> io::Result<bool> {
    let mut dir = root.to_path_buf();
    let mut created_any = false;
    for p in rel.components() {
        let next = dir.join(p);
        match fs::create_dir(&next) {
            Ok(()) => {
                fsync_dir(&dir)?;
                created_any = true;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        dir = next;
    }
    Ok(created_any)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Group commit of directory fsyncs: stores that linked a file into the
/// same directory share one fsync instead of one each.
///
/// Why it keeps the guarantee: a store asks for the sync only after its
/// `linkat` returned, and takes a ticket (`requested`) under the lock. An
/// fsync of a directory makes durable every entry the directory holds when
/// the fsync starts. The syncer reads `requested` under the lock just before
/// it starts its fsync, so every ticket up to that number belongs to a link
/// already made, and is covered once that fsync returns: then `synced`
/// moves to it and those stores may answer. A store whose ticket came later
/// waits for the next fsync (which it may run itself). A failed fsync moves
/// nothing, so its waiters run their own and get its error or success
/// honestly. Nothing is acknowledged on an fsync that started before its
/// link.
#[derive(Default)]
struct DirSync {
    dirs: Mutex<HashMap<PathBuf, Arc<DirState>>>,
}

#[derive(Default)]
struct DirState {
    tickets: Mutex<Tickets>,
    done: Condvar,
}

#[derive(Default)]
struct Tickets {
    requested: u64,
    synced: u64,
    syncing: bool,
}

impl DirSync {
    fn sync(&self, dir: &Path) -> io::Result<()> {
        let state = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dir.to_path_buf())
            .or_default()
            .clone();
        let result = state.sync(dir);
        // Forget a directory nobody else is syncing: the map stays as small
        // as the number of series being received at once.
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&state) == 2 {
            let t = state.tickets.lock().unwrap_or_else(|p| p.into_inner());
            if !t.syncing && t.synced == t.requested {
                drop(t);
                dirs.remove(dir);
            }
        }
        result
    }
}

impl DirState {
    fn sync(&self, dir: &Path) -> io::Result<()> {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        t.requested += 1;
        let mine = t.requested;
        loop {
            if t.synced >= mine {
                return Ok(());
            }
            if t.syncing {
                t = self.done.wait(t).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            t.syncing = true;
            let covers = t.requested;
            drop(t);
            let r = fsync_dir(dir);
            t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
            t.syncing = false;
            if r.is_ok() {
                t.synced = t.synced.max(covers);
            }
            self.done.notify_all();
            r?;
        }
    }
}

/// Free bytes available to us (not root's reserve) on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Read the header summary of a spooled file (recovery, tools), with the
/// same bounded walk as ingest: a file of any size costs a fixed buffer.
pub fn read_header(path: &Path) -> Result<InstanceHeader, SpoolError> {
    let mut file = BufReader::new(File::open(path)?);
    let len = file.get_ref().metadata()?.len();
    file.seek(SeekFrom::Start(128))?;
    let meta = FileMetaTable::from_reader(&mut file).map_err(|e| SpoolError::Unparseable(crate::error_chain(&e)))?;
    let offset = file.stream_position()?;
    let layout = Layout::of(meta.transfer_syntax());
    // Already accepted once: the limit here only has to bound the walk.
    let scanned = scan::scan(file, len.saturating_sub(offset), layout, u64::MAX, &InstanceHeader::reads)?;
    parse_header(&scanned.kept, layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const ELE: &str = "1.2.840.10008.1.2.1";

    fn dataset_bytes(sop: &str) -> Vec<u8> {
        dataset_bytes_in(sop, "1.2.3", "1.2.3.4")
    }

    fn dataset_bytes_in(sop: &str, study: &str, series: &str) -> Vec<u8> {
        let mut o = InMemDicomObject::new_empty();
        for (t, vr, v) in [
            (tags::SOP_CLASS_UID, VR::UI, CT),
            (tags::SOP_INSTANCE_UID, VR::UI, sop),
            (tags::STUDY_INSTANCE_UID, VR::UI, study),
            (tags::SERIES_INSTANCE_UID, VR::UI, series),
            (tags::MODALITY, VR::CS, "CT"),
        ] {
            o.put(DataElement::new(t, vr, PrimitiveValue::from(v)));
        }
        let mut out = Vec::new();
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(ELE)
            .expect("explicit VR LE is built in");
        o.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    }

    use dicom_encoding::TransferSyntaxIndex;

    fn incoming(sop: &str) -> Incoming {
        Incoming {
            sop_class_uid: CT.into(),
            sop_instance_uid: sop.into(),
            transfer_syntax: ELE.into(),
            max_dataset_bytes: 1 << 30,
        }
    }

    #[test]
    fn commit_places_a_readable_part10_file_and_first_copy_wins() {
        let d = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(d.path()).unwrap();
        let bytes = dataset_bytes("1.2.3.4.5");
        let mut w = spool.begin(&incoming("1.2.3.4.5")).unwrap();
        // arbitrary fragmentation
        for chunk in bytes.chunks(7) {
            w.write(chunk).unwrap();
        }
        let s = w.commit().unwrap();
        assert!(!s.duplicate);
        assert_eq!(s.rel_path, Path::new("1.2.3/1.2.3.4/1.2.3.4.5.dcm"));
        let path = spool.root().join(&s.rel_path);
        let first = fs::read(&path).unwrap();
        assert_eq!(read_header(&path).unwrap().sop_instance_uid.as_str(), "1.2.3.4.5");

        let mut w = spool.begin(&incoming("1.2.3.4.5")).unwrap();
        w.write(&bytes).unwrap();
        assert!(w.commit().unwrap().duplicate);
        assert_eq!(fs::read(&path).unwrap(), first);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    /// Named partials (no O_TMPFILE) and unnamed ones place the same file,
    /// and many stores into one series at once (sharing directory fsyncs)
    /// all land whole, with nothing left in tmp/.
    #[test]
    fn concurrent_commits_into_one_series_with_named_and_unnamed_partials() {
        for unnamed in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let mut spool = DiskSpool::open(d.path()).unwrap();
            if unnamed && !spool.unnamed_partials {
                eprintln!("no O_TMPFILE here: the unnamed case is the named one");
            }
            spool.unnamed_partials &= unnamed;
            let spool = Arc::new(spool);
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let spool = spool.clone();
                    std::thread::spawn(move || {
                        for i in 0..12 {
                            let sop = format!("1.2.3.4.{t}.{i}");
                            let mut w = spool.begin(&incoming(&sop)).unwrap();
                            for chunk in dataset_bytes(&sop).chunks(100) {
                                w.write(chunk).unwrap();
                            }
                            let s = w.commit().unwrap();
                            assert!(!s.duplicate);
                            assert_eq!(read_header(&spool.root().join(&s.rel_path)).unwrap().sop_instance_uid.as_str(), sop);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(fs::read_dir(spool.root().join("1.2.3/1.2.3.4")).unwrap().count(), 96, "unnamed: {unnamed}");
            assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
            assert!(spool.dir_sync.dirs.lock().unwrap().is_empty(), "idle directories are forgotten");
        }
    }

    #[test]
    fn truncated_and_mismatched_datasets_are_refused_and_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(d.path()).unwrap();
        let bytes = dataset_bytes("1.2.3.4.6");
        let mut w = spool.begin(&incoming("1.2.3.4.6")).unwrap();
        w.write(&bytes[..bytes.len() - 3]).unwrap();
        let e = w.commit().unwrap_err();
        assert_eq!(e.fault(), Fault::Permanent, "{e}");

        let mut inc = incoming("1.2.3.4.6");
        inc.sop_class_uid = "1.2.840.10008.5.1.4.1.1.7".into();
        let mut w = spool.begin(&inc).unwrap();
        w.write(&bytes).unwrap();
        assert!(matches!(w.commit(), Err(SpoolError::SopClassMismatch { .. })));

        let mut w = spool.begin(&incoming("9.9")).unwrap();
        w.write(&bytes).unwrap();
        assert!(matches!(w.commit(), Err(SpoolError::SopInstanceMismatch { .. })));

        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(spool.root()).unwrap().count(), 0);
    }

    #[test]
    fn uids_that_would_leave_the_spool_are_refused_and_nothing_is_written() {
        let outer = tempfile::tempdir().unwrap();
        let data = outer.path().join("data");
        let spool = DiskSpool::open(&data).unwrap();
        for (study, series) in [("..", ".."), (".", "."), ("..", "1.2"), ("1.2", ".."), ("1..2", "1.2"), ("01.2", "1.2")] {
            let mut w = spool.begin(&incoming("1.2.3.4.8")).unwrap();
            w.write(&dataset_bytes_in("1.2.3.4.8", study, series)).unwrap();
            match w.commit() {
                Err(SpoolError::Header(HeaderError::BadUid { attribute, .. })) => {
                    assert!(attribute.ends_with("InstanceUID"), "{attribute}")
                }
                other => panic!("{study}/{series}: {other:?}"),
            }
        }
        assert_eq!(fs::read_dir(data.join("tmp")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(spool.root()).unwrap().count(), 0);
        // next to data_dir: only data_dir itself
        let beside: Vec<_> = fs::read_dir(outer.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(beside, vec![std::ffi::OsString::from("data")]);
        let mut names: Vec<_> = fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("spool"), std::ffi::OsString::from("tmp")]);
    }

    #[test]
    fn partials_are_discarded_at_open() {
        let d = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(d.path()).unwrap();
        let mut w = spool.begin(&incoming("1.2.3.4.7")).unwrap();
        w.write(b"partial").unwrap();
        std::mem::forget(w); // simulate a crash mid-transfer
        DiskSpool::open(d.path()).unwrap();
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    fn full_dataset(sop: &str) -> InMemDicomObject {
        use dicom_core::value::DataSetSequence;
        let mut o = InMemDicomObject::new_empty();
        for (t, vr, v) in [
            (tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
            (tags::SOP_CLASS_UID, VR::UI, CT),
            (tags::SOP_INSTANCE_UID, VR::UI, sop),
            (tags::MODALITY, VR::CS, "CT"),
            (tags::SERIES_DESCRIPTION, VR::LO, "Thorax \u{fc}berblick"),
            (tags::SLICE_THICKNESS, VR::DS, "2.5"),
            (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
            (tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4"),
            (tags::ACQUISITION_NUMBER, VR::IS, "2"),
            (tags::INSTANCE_NUMBER, VR::IS, "17"),
            (tags::IMAGES_IN_ACQUISITION, VR::IS, "40"),
            (tags::NUMBER_OF_FRAMES, VR::IS, "3"),
        ] {
            o.put(DataElement::new(t, vr, PrimitiveValue::from(v)));
        }
        // multi-valued attributes as dicom-rs holds them after parsing a file
        for (t, vr, v) in [
            (tags::IMAGE_TYPE, VR::CS, &["ORIGINAL", "PRIMARY", "AXIAL"][..]),
            (tags::IMAGE_POSITION_PATIENT, VR::DS, &["-100", "-120.5", "33"][..]),
            (tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &["1", "0", "0", "0", "1", "0"][..]),
            (tags::PIXEL_SPACING, VR::DS, &["0.7", "0.7"][..]),
        ] {
            let strs = v.iter().map(|s| s.to_string()).collect();
            o.put(DataElement::new(t, vr, PrimitiveValue::Strs(strs)));
        }
        o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(4u16)));
        o.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(4u16)));
        let mut item = InMemDicomObject::new_empty();
        // nested attributes with header tags must not replace the top-level ones
        item.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("9.9.9")));
        item.put(DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("MR")));
        o.put(DataElement::new(
            tags::REFERENCED_IMAGE_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        ));
        o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(vec![7u16; 48].into())));
        o
    }

    fn encode(o: &InMemDicomObject, ts: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(ts).unwrap();
        o.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    }

    fn deflate(raw: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(raw).unwrap();
        e.finish().unwrap()
    }

    /// What validation reads from the walk's few kept elements is what a
    /// full dicom-rs parse of the dataset gives, in every encoding.
    #[test]
    fn the_walk_reads_the_same_header_as_a_full_parse() {
        let o = full_dataset("1.2.3.4.8");
        let want = InstanceHeader::from_dataset(&o).unwrap();
        assert_eq!(want.series_description.as_deref(), Some("Thorax \u{fc}berblick"));
        assert_eq!(want.modality.as_deref(), Some("CT"));
        assert!(want.geometry.is_some());
        assert_eq!(want.image_type, ["ORIGINAL", "PRIMARY", "AXIAL"]);
        let mut datasets: Vec<(&str, Vec<u8>)> = ["1.2.840.10008.1.2", ELE, "1.2.840.10008.1.2.2"]
            .into_iter()
            .map(|ts| (ts, encode(&o, ts)))
            .collect();
        datasets.push((scan::DEFLATED, deflate(&encode(&o, ELE))));
        for (ts, bytes) in datasets {
            let mut inc = incoming("1.2.3.4.8");
            inc.transfer_syntax = ts.into();
            let got = check_dataset(io::Cursor::new(&bytes), bytes.len() as u64, &inc).unwrap();
            assert_eq!(got, want, "{ts}");
        }
    }

    /// A deflated instance is stored as received and its header read back
    /// with the same walk; one that inflates past the limit is refused as
    /// too large (0xA700 at ingest) and leaves nothing behind.
    #[test]
    fn deflated_datasets_are_stored_and_a_bomb_is_refused_as_too_large() {
        let d = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(d.path()).unwrap();
        let mut inc = incoming("1.2.3.4.9");
        inc.transfer_syntax = scan::DEFLATED.into();
        let z = deflate(&encode(&full_dataset("1.2.3.4.9"), ELE));
        let mut w = spool.begin(&inc).unwrap();
        w.write(&z).unwrap();
        let s = w.commit().unwrap();
        let path = spool.root().join(&s.rel_path);
        assert_eq!(read_header(&path).unwrap(), s.header);
        assert_eq!(s.header.number_of_frames, Some(3));

        let mut big = full_dataset("1.2.3.4.10");
        big.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(vec![0u8; 8 << 20].into())));
        let bomb = deflate(&encode(&big, ELE));
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        let mut inc = incoming("1.2.3.4.10");
        inc.transfer_syntax = scan::DEFLATED.into();
        inc.max_dataset_bytes = 4 << 20;
        let mut w = spool.begin(&inc).unwrap();
        w.write(&bomb).unwrap();
        let e = w.commit().unwrap_err();
        assert!(matches!(e, SpoolError::TooLarge { inflated: true, .. }), "{e}");
        assert_eq!(e.to_string(), "dataset inflates to more than node.max_dataset_mb (4 MiB)");
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(count_files(spool.root()), 1);
    }

    fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                if p.is_dir() { count_files(&p) } else { 1 }
            })
            .sum()
    }
}
