//! Claims: which of several workers sends one outbox item.
//!
//! Each worker has its own outbox (SQLite), and two workers can hold the
//! same item, (destination, SOP Instance UID), when a job was redelivered
//! and both produced the report (its UIDs derive from the job's key). A
//! [`Claims`] is asked before an item is sent and told after the peer
//! accepted it, so that across workers there is one delivery per key while
//! the workers live.
//!
//! Input: (destination, SOP Instance UID) of an item the local outbox has
//! claimed (`sending`). Output: a [`Claim`]: send it; it was delivered by
//! someone else (the local row becomes `delivered`, nothing is sent); or
//! not now (the local row is due again later without counting an attempt).
//!
//! Invariants:
//! - Only a positive answer from the shared state says "delivered by
//!   another worker"; an error reaching it is [`Claim::Unavailable`], a
//!   retry later, never a delivery. Nothing is lost by a claims outage, it
//!   only waits.
//! - A claim is a lease (`until_ms`): a worker that died after its claim
//!   lets the lease run out and another worker sends. The same SOP Instance
//!   UID goes again, which a PACS stores once, the embedded guarantee
//!   (at-least-once, idempotent by UID).
//! - The decision is a pure function of the current entry and the clock
//!   ([`decide`]), so it is tested without a server; the back end
//!   (`super::nats`, feature `cluster`) only reads and writes with
//!   compare-and-set.
//!
//! Failure modes: see [`Claim`]. [`NoClaims`] (the embedded node) always
//! answers [`Claim::Proceed`]; behaviour is then exactly that of one outbox.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A boxed future, so [`Claims`] stays object-safe.
pub type ClaimFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer to "may I send this item now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours until the lease ends: send it.
    Proceed,
    /// Another worker's send was accepted by the destination: record the
    /// item delivered here too, send nothing.
    AlreadyDelivered { by: String },
    /// Another worker holds a live lease on it: ask again at `retry_at`
    /// (the item stays ours to send if its holder dies).
    HeldByOther { owner: String, retry_at: SystemTime },
    /// The shared state could not be read or written (NATS down, a
    /// timeout): ask again later. Never taken as delivered.
    Unavailable { reason: String },
}

/// The seam between the outbox delivery loop and the shared delivery state.
pub trait Claims: Send + Sync + 'static {
    /// Before sending: take (or renew) the lease on this item.
    fn claim<'a>(&'a self, destination: &'a str, sop_instance_uid: &'a str) -> ClaimFuture<'a, Claim>;
    /// After the destination accepted the item: record it delivered. An
    /// error is logged by the caller; the item is delivered locally anyway
    /// (the lease then runs out and a racing worker may send once more).
    fn delivered<'a>(&'a self, destination: &'a str, sop_instance_uid: &'a str) -> ClaimFuture<'a, Result<(), String>>;
    /// The send did not happen or failed: end our lease now, so another
    /// worker need not wait it out. Best effort: an error only means the
    /// lease runs out by itself.
    fn release<'a>(&'a self, destination: &'a str, sop_instance_uid: &'a str) -> ClaimFuture<'a, Result<(), String>>;
}

/// The embedded node: one outbox, nobody to race with.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoClaims;

impl Claims for NoClaims {
    fn claim<'a>(&'a self, _: &'a str, _: &'a str) -> ClaimFuture<'a, Claim> {
        Box::pin(std::future::ready(Claim::Proceed))
    }
    fn delivered<'a>(&'a self, _: &'a str, _: &'a str) -> ClaimFuture<'a, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn release<'a>(&'a self, _: &'a str, _: &'a str) -> ClaimFuture<'a, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The shared value of one claim key (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimValue {
    pub state: ClaimState,
    /// The worker id that holds (or delivered) it.
    pub owner: String,
    /// End of the lease, Unix milliseconds (meaningless once delivered).
    pub until_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    Sending,
    Delivered,
}

/// What to do, given the current entry of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No entry (or a deleted one): `create` ours (fails if someone was first).
    Create,
    /// Ours already, or a lease that ran out, or a value we cannot read:
    /// compare-and-set ours over `revision`.
    Take { revision: u64 },
    /// Delivered by `owner`.
    Delivered { owner: String },
    /// Someone else's live lease.
    Held { owner: String, until_ms: i64 },
}

/// The claim decision. `current`: the entry's value (`None` when absent or
/// deleted; `Some(Err(..))` when it does not parse) and its revision.
///
/// An unreadable value is taken over rather than believed: only a readable
/// `delivered` stops a send, so a corrupt or foreign entry can delay nothing
/// beyond one compare-and-set.
pub fn decide(current: Option<(Result<&ClaimValue, ()>, u64)>, me: &str, now_ms: i64) -> Decision {
    let Some((value, revision)) = current else {
        return Decision::Create;
    };
    match value {
        Err(()) => Decision::Take { revision },
        Ok(v) => match v.state {
            ClaimState::Delivered => Decision::Delivered { owner: v.owner.clone() },
            ClaimState::Sending if v.owner == me || v.until_ms <= now_ms => Decision::Take { revision },
            ClaimState::Sending => Decision::Held {
                owner: v.owner.clone(),
                until_ms: v.until_ms,
            },
        },
    }
}

/// When to ask again about an item someone else holds: soon (their send
/// usually ends within seconds, and then the answer is "delivered"), but
/// never later than their lease, and not in a tight loop.
pub fn retry_at_for_held(now: SystemTime, until_ms: i64) -> SystemTime {
    let until = UNIX_EPOCH + Duration::from_millis(until_ms.max(0) as u64);
    let soon = now + HELD_RETRY;
    until.clamp(now + Duration::from_secs(1), soon)
}

/// How long an item held by another worker waits before it is asked about again.
pub const HELD_RETRY: Duration = Duration::from_secs(5);
/// How long an item waits after the shared state was unavailable.
pub const UNAVAILABLE_RETRY: Duration = Duration::from_secs(5);

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// The KV key of one item: `<destination>.<SOP Instance UID>`, valid for a
/// NATS KV key (`[-/_=.a-zA-Z0-9]`, no leading or trailing dot).
///
/// A destination name may hold any character, so it is escaped reversibly:
/// ASCII letters, digits and `-` stay, every other byte becomes `_XX`
/// (upper-case hex; `_` itself is `_5F`, `.` is `_2E`). The escaped name has
/// no dot, so the first dot of the key ends it. A SOP Instance UID is digits
/// and dots that neither start nor end it (PS3.5 9.1), already valid; an
/// empty destination is `_` so that the key never starts with a dot.
pub fn key(destination: &str, sop_instance_uid: &str) -> String {
    let mut k = String::with_capacity(destination.len() + sop_instance_uid.len() + 1);
    if destination.is_empty() {
        k.push('_');
    }
    for b in destination.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            k.push(b as char);
        } else {
            k.push_str(&format!("_{b:02X}"));
        }
    }
    k.push('.');
    k.push_str(sop_instance_uid);
    k
}

/// The inverse of [`key`]: (destination, SOP Instance UID); `None` for a key
/// [`key`] does not make.
pub fn parse_key(k: &str) -> Option<(String, String)> {
    let (dest, sop) = k.split_once('.')?;
    if dest == "_" {
        return Some((String::new(), sop.to_owned()));
    }
    let mut out = Vec::with_capacity(dest.len());
    let b = dest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = dest.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some((String::from_utf8(out).ok()?, sop.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_kv_key(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || b"-/_=.".contains(&c))
    }

    #[test]
    fn keys_are_valid_and_reversible() {
        let sop = "1.2.826.0.1.3680043.10.9.2";
        for dest in [
            "pacs",
            "PACS-2",
            "my_pacs",
            "a.b",
            "",
            "ünïcode",
            "sp ace",
            "_",
            "_2E",
            "x/y=z",
            ".",
            "*>",
        ] {
            let k = key(dest, sop);
            assert!(valid_kv_key(&k), "{dest:?} → {k:?}");
            assert_eq!(
                parse_key(&k),
                Some((dest.to_owned(), sop.to_owned())),
                "{dest:?} → {k:?}"
            );
        }
        assert_eq!(key("pacs", sop), format!("pacs.{sop}"));
        assert_eq!(key("a.b", "1.2"), "a_2Eb.1.2");
        assert_eq!(key("my_pacs", "1.2"), "my_5Fpacs.1.2");
        // distinct names never share a key
        assert_ne!(key("a_2E", "1"), key("a.", "1"));
        assert_eq!(parse_key("nodot"), None);
        assert_eq!(parse_key("bad_Z.1"), None);
    }

    fn sending(owner: &str, until_ms: i64) -> ClaimValue {
        ClaimValue {
            state: ClaimState::Sending,
            owner: owner.into(),
            until_ms,
        }
    }

    #[test]
    fn the_claim_decision() {
        let now = 1_000_000;
        assert_eq!(decide(None, "w1", now), Decision::Create);
        let delivered = ClaimValue {
            state: ClaimState::Delivered,
            owner: "w2".into(),
            until_ms: 0,
        };
        assert_eq!(
            decide(Some((Ok(&delivered), 7)), "w1", now),
            Decision::Delivered { owner: "w2".into() }
        );
        // delivered by ourselves earlier (a crash before the local commit): still delivered
        let mine = ClaimValue {
            owner: "w1".into(),
            ..delivered.clone()
        };
        assert_eq!(
            decide(Some((Ok(&mine), 7)), "w1", now),
            Decision::Delivered { owner: "w1".into() }
        );
        // someone else's live lease
        let held = sending("w2", now + 1);
        assert_eq!(
            decide(Some((Ok(&held), 3)), "w1", now),
            Decision::Held {
                owner: "w2".into(),
                until_ms: now + 1
            }
        );
        // their lease ran out: take it over with compare-and-set
        assert_eq!(
            decide(Some((Ok(&sending("w2", now)), 3)), "w1", now),
            Decision::Take { revision: 3 }
        );
        // ours: renew
        assert_eq!(
            decide(Some((Ok(&sending("w1", now + 60_000)), 4)), "w1", now),
            Decision::Take { revision: 4 }
        );
        // unreadable: taken over, never believed delivered
        assert_eq!(decide(Some((Err(()), 5)), "w1", now), Decision::Take { revision: 5 });
    }

    #[test]
    fn the_value_is_the_documented_json() {
        let v = sending("host-42", 17);
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"state": "sending", "owner": "host-42", "until_ms": 17})
        );
        let d: ClaimValue = serde_json::from_str(r#"{"state":"delivered","owner":"w","until_ms":0}"#).unwrap();
        assert_eq!(d.state, ClaimState::Delivered);
        assert!(serde_json::from_str::<ClaimValue>(r#"{"state":"pending","owner":"w","until_ms":0}"#).is_err());
    }

    #[test]
    fn held_items_are_asked_about_again_soon_but_not_in_a_loop() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let ms = unix_ms(now);
        assert_eq!(retry_at_for_held(now, ms + 60_000), now + HELD_RETRY);
        assert_eq!(retry_at_for_held(now, ms + 2_000), now + Duration::from_secs(2));
        assert_eq!(retry_at_for_held(now, ms), now + Duration::from_secs(1));
    }
}
