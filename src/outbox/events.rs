//! Typed outbox events: one structured log line and one counter each.
//! UIDs, AE titles, statuses and counts only, never patient data.

use std::time::Duration;

use crate::telemetry::{DeliveryLabels, METRICS};

fn count(destination: &str, outcome: &str) {
    METRICS
        .outbox_attempts
        .get_or_create(&DeliveryLabels {
            destination: destination.into(),
            outcome: outcome.into(),
        })
        .inc();
}

/// What became of one item after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Delivered,
    RetryIn(Duration),
    Dead,
}

/// One per item per attempt.
pub struct Delivery<'a> {
    pub destination: &'a str,
    pub called_ae: &'a str,
    pub sop_instance_uid: &'a str,
    /// 1-based attempt number.
    pub attempt: u32,
    /// The C-STORE-RSP status, when one came back.
    pub status: Option<u16>,
    pub disposition: Disposition,
    /// Why it failed, or a warning's comment.
    pub reason: Option<&'a str>,
}

impl Delivery<'_> {
    pub fn emit(self) {
        let status = self.status.map(|s| format!("0x{s:04X}"));
        let status = status.as_deref().unwrap_or("none");
        let reason = self.reason.unwrap_or("");
        match self.disposition {
            Disposition::Delivered => {
                count(self.destination, "delivered");
                tracing::info!(
                    destination = self.destination,
                    called_ae = self.called_ae,
                    sop_instance_uid = self.sop_instance_uid,
                    attempt = self.attempt,
                    status,
                    reason,
                    "outbox: delivered"
                );
            }
            Disposition::RetryIn(d) => {
                count(self.destination, "retry");
                tracing::warn!(
                    destination = self.destination,
                    called_ae = self.called_ae,
                    sop_instance_uid = self.sop_instance_uid,
                    attempt = self.attempt,
                    status,
                    reason,
                    retry_in_s = d.as_secs_f64(),
                    "outbox: delivery failed, will retry"
                );
            }
            Disposition::Dead => {
                count(self.destination, "dead");
                tracing::error!(
                    destination = self.destination,
                    called_ae = self.called_ae,
                    sop_instance_uid = self.sop_instance_uid,
                    attempt = self.attempt,
                    status,
                    reason,
                    "outbox: dead letter"
                );
            }
        }
    }
}

/// The shared claims kept an item from being sent by this worker
/// (`claims`): delivered by another worker, or held by one, or the shared
/// state could not be reached. No attempt is counted.
pub struct NotClaimed<'a> {
    pub destination: &'a str,
    pub sop_instance_uid: &'a str,
    /// `delivered_elsewhere`, `held` or `unavailable`.
    pub outcome: &'a str,
    /// The other worker's id, or why the claims were unavailable.
    pub detail: &'a str,
}

impl NotClaimed<'_> {
    pub fn emit(self) {
        count(self.destination, self.outcome);
        let (destination, sop_instance_uid, detail) = (self.destination, self.sop_instance_uid, self.detail);
        match self.outcome {
            "unavailable" => tracing::warn!(destination, sop_instance_uid, reason = detail,
                "outbox: shared delivery state unavailable, will retry"),
            "held" => tracing::info!(destination, sop_instance_uid, owner = detail,
                "outbox: another worker is sending this item, will check again"),
            _ => tracing::info!(destination, sop_instance_uid, owner = detail,
                "outbox: delivered by another worker; not sent again"),
        }
    }
}

/// An association to a destination could not be used at all; the items of
/// the batch each get their own [`Delivery`] event as well.
pub struct AssociationFailed<'a> {
    pub destination: &'a str,
    pub called_ae: &'a str,
    pub items: usize,
    pub reason: &'a str,
}

impl AssociationFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            called_ae = self.called_ae,
            items = self.items,
            reason = self.reason,
            "outbox: association failed"
        );
    }
}
