//! Typed operational events: each emits one structured log line and bumps
//! one counter, so call sites never format log lines themselves and the
//! metrics endpoint (later) reads the same numbers the logs report.
//!
//! Events carry UIDs, AE titles and counts only, never patient data.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counters {
    pub associations_accepted: AtomicU64,
    pub associations_rejected: AtomicU64,
    pub associations_aborted: AtomicU64,
    pub instances_stored: AtomicU64,
    pub instances_duplicate: AtomicU64,
    pub instances_failed: AtomicU64,
    pub bytes_received: AtomicU64,
    pub series_completed: AtomicU64,
    pub tls_handshakes_failed: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    associations_accepted: AtomicU64::new(0),
    associations_rejected: AtomicU64::new(0),
    associations_aborted: AtomicU64::new(0),
    instances_stored: AtomicU64::new(0),
    instances_duplicate: AtomicU64::new(0),
    instances_failed: AtomicU64::new(0),
    bytes_received: AtomicU64::new(0),
    series_completed: AtomicU64::new(0),
    tls_handshakes_failed: AtomicU64::new(0),
};

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub struct AssociationAccepted<'a> {
    pub contexts: usize,
    pub calling_ae: &'a str,
}
impl AssociationAccepted<'_> {
    pub fn emit(self) {
        bump(&COUNTERS.associations_accepted, 1);
        tracing::info!(calling_ae = self.calling_ae, contexts = self.contexts, "association accepted");
    }
}

pub struct AssociationRejected<'a> {
    pub calling_ae: &'a str,
    pub called_ae: &'a str,
    pub reason: &'a str,
}
impl AssociationRejected<'_> {
    pub fn emit(self) {
        bump(&COUNTERS.associations_rejected, 1);
        tracing::warn!(
            calling_ae = self.calling_ae,
            called_ae = self.called_ae,
            reason = self.reason,
            "association rejected"
        );
    }
}

pub struct AssociationAborted<'a> {
    pub by: &'static str,
    pub reason: &'a str,
}
impl AssociationAborted<'_> {
    pub fn emit(self) {
        bump(&COUNTERS.associations_aborted, 1);
        tracing::warn!(by = self.by, reason = self.reason, "association aborted");
    }
}

/// A connection to the TLS port that never became a TLS session: a plain
/// DICOM client, an untrusted or missing client certificate, a timeout.
pub struct TlsHandshakeFailed<'a> {
    pub peer: std::net::SocketAddr,
    pub reason: &'a str,
}
impl TlsHandshakeFailed<'_> {
    pub fn emit(self) {
        bump(&COUNTERS.tls_handshakes_failed, 1);
        tracing::warn!(peer = %self.peer, reason = self.reason, "TLS handshake failed");
    }
}

pub struct InstanceStored<'a> {
    pub sop_instance_uid: &'a str,
    pub series_instance_uid: &'a str,
    pub bytes: u64,
    pub duplicate: bool,
}
impl InstanceStored<'_> {
    pub fn emit(self) {
        bump(&COUNTERS.bytes_received, self.bytes);
        if self.duplicate {
            bump(&COUNTERS.instances_duplicate, 1);
            tracing::info!(
                sop_instance_uid = self.sop_instance_uid,
                series_instance_uid = self.series_instance_uid,
                "duplicate instance: first copy kept"
            );
        } else {
            bump(&COUNTERS.instances_stored, 1);
            tracing::debug!(
                sop_instance_uid = self.sop_instance_uid,
                series_instance_uid = self.series_instance_uid,
                bytes = self.bytes,
                "instance stored"
            );
        }
    }
}

pub struct StoreFailed<'a> {
    pub sop_instance_uid: &'a str,
    pub status: u16,
    pub reason: &'a str,
}
impl StoreFailed<'_> {
    pub fn emit(self) {
        bump(&COUNTERS.instances_failed, 1);
        tracing::warn!(
            sop_instance_uid = self.sop_instance_uid,
            status = format_args!("0x{:04X}", self.status),
            reason = self.reason,
            "C-STORE failed"
        );
    }
}
