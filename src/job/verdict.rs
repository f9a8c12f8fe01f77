//! What a job would say about its input before it runs: the verdict of the
//! model's input guard on a routed series, for the route testers (the CLI's
//! `route`, the HTTP API's `/api/routes/test` and `/api/series/{uid}/routes`).
//!
//! Input: the model's card (if it loaded), the route's slice selection and
//! the series' files. Output: a [`GuardVerdict`]: `pass`, `refused` with the
//! check and the reason the job would end with, or `unchecked`.
//!
//! Invariants: the verdict is the job's own answer: the header checks of
//! `inference::guard`, then (with `pixels`) the slices the model would see
//! and the pixel checks through [`run::model_slices`] and [`run::check_input`],
//! the functions the job itself calls. A refusal's `reason` is the text the
//! job would be stored with.
//!
//! Failure modes: none; a series whose volume cannot be assembled is
//! `unchecked` with the volume error as its reason (its job would fail).

use std::path::PathBuf;

use serde::Serialize;

use super::run::{self, JobError};
use crate::inference::guard::{self, HeaderFacts};
use crate::inference::ModelCard;
use crate::volume::acquisition::Acquisition;
use crate::volume::{SliceSelection, Volume, VolumeOptions};

/// What the input guard says about one matched (series, route).
#[derive(Debug, Serialize, PartialEq)]
pub struct GuardVerdict {
    /// `pass`, `refused`, or `unchecked` (no card, or a card without
    /// `validated_input`).
    pub verdict: &'static str,
    /// `header` or `header+pixels`: which checks ran.
    pub checks: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The guard of `card` on `files` as the route's model would see them
/// (`slices`: the route's selection). `pixels` also decodes the series and
/// runs the pixel checks (HU calibration, level, the CAC contrast check).
pub fn guard_verdict(
    card: Option<&ModelCard>,
    slices: Option<&SliceSelection>,
    files: &[PathBuf],
    pixels: bool,
) -> GuardVerdict {
    let checks = if pixels { "header+pixels" } else { "header" };
    let unchecked = GuardVerdict { verdict: "unchecked", checks, check: None, reason: None };
    let Some(card) = card else { return unchecked };
    let Some(v) = &card.validated_input else { return unchecked };
    let refused = |check: &str, reason: String| GuardVerdict {
        verdict: "refused",
        checks,
        check: Some(check.to_owned()),
        reason: Some(reason),
    };
    let header = files.first().and_then(|f| Acquisition::read(f).ok()).unwrap_or_default();
    if let Err(r) = guard::check_header(v, &HeaderFacts::from_acquisition(header)) {
        let (check, e) = (r.check.as_str(), JobError::from(r));
        return refused(check, e.to_string());
    }
    if pixels {
        let vol = match Volume::from_files_with(files, &VolumeOptions::default()) {
            Ok(v) => v,
            Err(e) => return GuardVerdict { reason: Some(format!("volume: {e}")), ..unchecked },
        };
        let checked = run::model_slices(card, slices, &vol).and_then(|idx| run::check_input(card, &vol, &idx));
        match checked {
            Ok(_) => {}
            Err(e @ JobError::Refused { check, .. }) => return refused(check, e.to_string()),
            Err(e) => return GuardVerdict { reason: Some(e.to_string()), ..unchecked },
        }
    }
    GuardVerdict { verdict: "pass", checks, check: None, reason: None }
}
