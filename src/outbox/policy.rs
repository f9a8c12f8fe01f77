//! Retry policy: pure functions from "what happened" to "what next", so the
//! schedule is testable without a network or a clock.

use std::time::Duration;

use crate::fault::Fault;

/// What a C-STORE-RSP status means for the item (PS3.4 B.2.3, PS3.7 C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// Success or warning: the peer kept the instance.
    Stored,
    Failed(Fault),
}

pub fn classify_status(code: u16) -> StatusClass {
    if crate::dicom::dimse::Status::from_code(code).is_success_or_warning() {
        return StatusClass::Stored;
    }
    match code {
        // Refused: out of resources (PS3.4 B.2.3).
        0xA700..=0xA7FF => StatusClass::Failed(Fault::Transient),
        // Resource limitation, duplicate invocation (PS3.7 C.5.x): the
        // peer is busy, not refusing this instance.
        0x0213 | 0x0210 => StatusClass::Failed(Fault::Transient),
        // Everything else is a refusal of this instance: 0x0122 SOP class
        // not supported, 0x0124 not authorized, 0xA9xx dataset does not
        // match SOP class, 0xCxxx cannot understand, 0x0110 processing
        // failure, and codes we do not know.
        _ => StatusClass::Failed(Fault::Permanent),
    }
}

/// Delay before the attempt after the `attempts`-th failed one:
/// `base * 2^(attempts-1)`, at most `cap`. No jitter: items of one
/// destination are retried together on one association anyway.
pub fn backoff(attempts: u32, base: Duration, cap: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(31);
    base.checked_mul(1u32 << exp).unwrap_or(cap).min(cap)
}

/// After a transient failure of attempt number `attempts` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    RetryIn(Duration),
    DeadLetter,
}

pub fn after_transient_failure(
    attempts: u32,
    max_attempts: u32,
    base: Duration,
    cap: Duration,
) -> AfterFailure {
    if attempts >= max_attempts {
        AfterFailure::DeadLetter
    } else {
        AfterFailure::RetryIn(backoff(attempts, base, cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_up_to_cap() {
        let s = Duration::from_secs;
        let sched: Vec<_> = (1..=10)
            .map(|n| backoff(n, s(2), s(300)).as_secs())
            .collect();
        assert_eq!(sched, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        // no overflow at absurd attempt counts
        assert_eq!(backoff(u32::MAX, s(2), s(300)), s(300));
        assert_eq!(backoff(0, s(2), s(300)), s(2));
    }

    #[test]
    fn dead_letter_after_max_attempts() {
        let s = Duration::from_secs;
        assert_eq!(
            after_transient_failure(1, 3, s(2), s(60)),
            AfterFailure::RetryIn(s(2))
        );
        assert_eq!(
            after_transient_failure(2, 3, s(2), s(60)),
            AfterFailure::RetryIn(s(4))
        );
        assert_eq!(
            after_transient_failure(3, 3, s(2), s(60)),
            AfterFailure::DeadLetter
        );
    }

    #[test]
    fn statuses_split_into_stored_transient_permanent() {
        use StatusClass::*;
        assert_eq!(classify_status(0x0000), Stored);
        assert_eq!(classify_status(0xB000), Stored);
        assert_eq!(classify_status(0xB007), Stored);
        assert_eq!(classify_status(0x0107), Stored);
        assert_eq!(classify_status(0xA700), Failed(Fault::Transient));
        assert_eq!(classify_status(0xA7FF), Failed(Fault::Transient));
        assert_eq!(classify_status(0x0213), Failed(Fault::Transient));
        assert_eq!(classify_status(0x0122), Failed(Fault::Permanent));
        assert_eq!(classify_status(0xA900), Failed(Fault::Permanent));
        assert_eq!(classify_status(0xC000), Failed(Fault::Permanent));
        assert_eq!(classify_status(0xC123), Failed(Fault::Permanent));
        assert_eq!(classify_status(0x0110), Failed(Fault::Permanent));
    }
}
