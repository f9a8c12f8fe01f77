//! Test-only access to data that lives outside the crate's sources: the real
//! CT at `../shared/realct` and the trained models under `models/`.
//!
//! On a developer machine without them a test that needs them prints why and
//! returns early. Under CI (`CI` set, to anything, as the other CI checks in
//! the tests read it) the same absence panics: CI lays the data out, so a test there must never
//! pass by not running.

use std::path::{Path, PathBuf};

/// Whether this run is CI, where missing test data is a failure.
pub(crate) fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// `path` when it exists; else None with a note, or a panic under CI.
/// `what` says what the path is, for the message.
pub(crate) fn require(path: impl Into<PathBuf>, what: &str) -> Option<PathBuf> {
    present_or_skip(path.into(), what, in_ci())
}

fn present_or_skip(path: PathBuf, what: &str, ci: bool) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if ci {
        panic!("{what} missing at {} (CI is set: tests that need it must run)", path.display());
    }
    eprintln!("skipping: {what} missing at {}", path.display());
    None
}

/// `../shared/realct` beside the checkout.
pub(crate) fn realct() -> Option<PathBuf> {
    require(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/realct"), "real CT test data")
}

/// `models/` of the checkout, or `BIOMARKER_MODELS_DIR` (a new training run
/// checked before it is shipped).
pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("BIOMARKER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The card of a shipped model (`models/<task>.yaml`) and its ONNX file.
pub(crate) fn model_card(task: &str) -> Option<PathBuf> {
    let card = require(models_dir().join(format!("{task}.yaml")), &format!("model card {task}"))?;
    require(models_dir().join(format!("{task}.onnx")), &format!("model {task} (ONNX)"))?;
    Some(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_path_is_returned_either_way() {
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(present_or_skip(here.clone(), "crate", true), Some(here.clone()));
        assert_eq!(present_or_skip(here.clone(), "crate", false), Some(here));
    }

    #[test]
    fn missing_path_skips_outside_ci() {
        assert_eq!(present_or_skip("/nonexistent/realct".into(), "real CT", false), None);
    }

    #[test]
    #[should_panic(expected = "CI is set")]
    fn missing_path_fails_under_ci() {
        present_or_skip("/nonexistent/realct".into(), "real CT", true);
    }
}
