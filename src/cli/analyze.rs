//! `biomarker-node analyze --config F --out DIR PATH...`: the same routing
//! and analysis as `serve`, on files, without a node.
//!
//! Input: DICOM files grouped into series by [`crate::series::scan`].
//! Output: one JSON line per (series, matching route) on stdout, and the
//! outputs and reports of each job under `DIR/<series UID>/<route>/`.
//! Failures: a series or job that fails is reported on stderr and the others
//! still run; the command exits non-zero when there is nothing usable or a
//! job failed. A job refused for its input (`refused: ...`, e.g. no aortic
//! arch for a slice chosen above it) is a note, not a failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

// The analysis entry points `serve`'s job worker runs too.
use crate::inference::registry::Models;
use crate::job::run::{load_volume, run_on_volume, JobError};
use crate::volume::Volume;
use crate::report::write::{device_info, write_outputs, write_reports};
use crate::routing::SeriesFacts;
use crate::series::scan;

pub fn analyze(config_path: &Path, out: &Path, paths: &[PathBuf]) -> anyhow::Result<()> {
    let (cfg, table) = crate::node::check::checked(config_path)?;
    {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let mut notes = Vec::new();
    let series = scan::collect(paths, &mut notes);
    for n in scan::summarize(&notes) {
        eprintln!("note: {n}");
    }
    if series.is_empty() {
        anyhow::bail!("no usable DICOM series under the given paths");
    }
    let models = Models::load(&cfg)?;
    let opts = crate::node::volume_options(&cfg);
    let mut failures = 0usize;
    let mut jobs = 0usize;
    for s in &series {
        let facts = match SeriesFacts::load(&s.instances) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: series {}: {e}", s.uid);
                failures += 1;
                continue;
            }
        };
        let files: Vec<_> = s.instances.iter().map(|(p, _)| p.clone()).collect();
        // Decoded once for all the series' routes, as `serve`'s worker shares
        // it (job::volumes): a 300-slice chest has three routes, and each
        // decoded the whole volume again. The last route takes it, so that
        // what it no longer needs (the original slices, once CAC has its
        // 3 mm slabs) goes as before. A series that fails to load is tried
        // again by each route, so each reports its own error, as before.
        let mut volume: Option<Arc<Volume>> = None;
        let matched = table.matches(&facts);
        let last = matched.len().saturating_sub(1);
        for (k, m) in matched.into_iter().enumerate() {
            jobs += 1;
            let t0 = Instant::now();
            let result = (|| -> Result<_, JobError> {
                let model = models.get(&m.model)?;
                let vol = match volume.take() {
                    Some(v) => v,
                    None => Arc::new(load_volume(&files, &opts)?),
                };
                if k < last {
                    volume = Some(vol.clone());
                }
                run_on_volume(&model, &s.uid, &(&m).into(), vol, t0)
            })();
            match result {
                Ok(a) => {
                    let uid = crate::dicom::Uid::parse(&s.uid)?;
                    let dir = crate::dicom::uid_path(out, &[&uid], &[&m.route])?;
                    write_outputs(&a.line, &a.report_source(), &dir)?;
                    let seed = format!("{}|{}|{}|analyze", s.uid, m.route, a.line.model_version);
                    let model = models.get(&m.model)?;
                    let device = device_info(&cfg.node.ae_title);
                    write_reports(&a.report_source(), &model, &seed, time::OffsetDateTime::now_utc(), device, &dir)?;
                    println!("{}", serde_json::to_string(&a.line)?);
                }
                // A refusal is the route's answer for this input (e.g. no
                // aortic arch in the series), not a failure of the command.
                Err(e @ JobError::Refused { .. }) => {
                    eprintln!("note: series {} route {}: {e}", s.uid, m.route);
                }
                Err(e) => {
                    eprintln!("error: series {} route {}: {e}", s.uid, m.route);
                    failures += 1;
                }
            }
        }
    }
    if jobs == 0 {
        eprintln!("note: no route matched any of the {} series", series.len());
    }
    if failures > 0 {
        anyhow::bail!("{failures} job(s) failed");
    }
    Ok(())
}
