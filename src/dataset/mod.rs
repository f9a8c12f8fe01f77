//! `dataset export`: a site's values (a labels CSV) joined to the series in
//! the node's own spool, written as the training layout that
//! `biomarker_training.train` reads.
//!
//! **Input.** A checked config (its `data_dir`: the series index and the
//! spool), the route table, a task (a model card's `task`) and a labels CSV
//! keyed by `accession_number`, `study_instance_uid` or
//! `series_instance_uid` ([`labels`]).
//!
//! **Output.** Under `DIR`: `labels.csv` (`series_dir,value`, relative
//! paths), `cases/<id>/volume.npy` (float32 HU `[S,R,C]`),
//! `cases/<id>/candidates.npy` (uint8, 1 = candidate), `cases/<id>/meta.json`
//! (geometry only), `dataset.json` and `export-report.txt`. The case id →
//! UID mapping goes to a separate file outside `DIR` (`DIR.mapping.csv` by
//! default). A [`Report`] says what became of every row.
//!
//! **Invariants.**
//! - What a model trains on is what it will see: each series goes through
//!   the route table ([`crate::routing`]), the job's volume loading, slice
//!   selection, Agatston slabs and input guard ([`crate::job::run::load_volume`],
//!   [`crate::job::run::model_input`]) and the aggregation's candidate mask
//!   ([`crate::biomarkers::model_candidates`]): the same functions, not copies.
//! - Nothing in `DIR` identifies a patient or a study: case ids are `c0001`…
//!   in the order of the CSV rows, the report names CSV lines, never keys,
//!   and reasons have anything shaped like a UID replaced by `<uid>`.
//! - Read-only on the node: the index is opened read-only, the spool only
//!   read, so an export can run beside `serve`.
//!
//! **Failure modes.** A whole-run problem is an [`ExportError`], each with
//! its exit code ([`ExportError::exit_code`]): an unusable CSV, a unit that
//! is not the task's, an unknown task, a non-empty `DIR`. A row that cannot
//! be exported is not an error: it is counted in the report with its reason
//! (unmatched, ambiguous, not routed, refused by the guard, failed).

pub mod labels;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::dicom::header::InstanceHeader;
use crate::inference::ModelCard;
use crate::job::run::{self as job_run, ModelInput};
use crate::routing::{RouteMatch, RouteTable, SeriesFacts};
use crate::series::{SeriesIndex, SeriesState, SeriesSummary};
use crate::volume::VolumeOptions;
use labels::{KeyKind, Labels, LabelsError, UnitMismatch};

/// The `format` of `dataset.json`.
pub const FORMAT: &str = "biomarker-node-export/1";

/// What `dataset export` is asked to do.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// A model card's `task` (e.g. `pma`).
    pub task: String,
    pub labels: PathBuf,
    pub out: PathBuf,
    /// Where the case id → UID mapping goes; default `DIR.mapping.csv`.
    pub mapping: Option<PathBuf>,
}

/// A problem with the whole export. Exit codes: see [`ExportError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("labels {path}: {source}")]
    Labels { path: PathBuf, source: LabelsError },
    #[error("labels {path}: {source}")]
    Unit { path: PathBuf, source: UnitMismatch },
    #[error("unknown task `{task}`: {why}")]
    UnknownTask { task: String, why: String },
    #[error("{0} exists and is not empty: export into a new or empty folder")]
    OutputNotEmpty(PathBuf),
    #[error("the mapping file {0} would be inside the export folder: it holds UIDs and must stay outside it")]
    MappingInside(PathBuf),
    #[error("no series index at {0}: has `serve` run with this config?")]
    NoIndex(PathBuf),
    #[error("no case was exported (see the report)")]
    NothingExported,
    #[error(transparent)]
    Series(#[from] crate::series::SeriesError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Npy {
        path: PathBuf,
        source: crate::npy::NpyError,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl ExportError {
    /// The process exit code `biomarker-node dataset export` ends with:
    /// 1 nothing exported, 3 unusable labels CSV, 4 unit mismatch, 5 unknown
    /// task, 6 output folder not empty; 2 for everything else (config, index,
    /// I/O), as for every other command. 0 is success (a case or more).
    pub fn exit_code(&self) -> u8 {
        match self {
            ExportError::NothingExported => 1,
            ExportError::Labels { .. } => 3,
            ExportError::Unit { .. } => 4,
            ExportError::UnknownTask { .. } => 5,
            ExportError::OutputNotEmpty(_) | ExportError::MappingInside(_) => 6,
            _ => 2,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What became of one CSV row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Written as a case.
    Exported,
    /// No usable series has the row's key.
    Unmatched,
    /// Several series of the key route to the task: which one the value is
    /// of is not known.
    Ambiguous,
    /// The key's series match no route of the task.
    NotRouted,
    /// The input guard (or the slice selection's landmark) refuses the series,
    /// as the job would.
    Refused,
    /// The series could not be read or is not exportable.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Exported,
        Outcome::Unmatched,
        Outcome::Ambiguous,
        Outcome::NotRouted,
        Outcome::Refused,
        Outcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Exported => "exported",
            Outcome::Unmatched => "unmatched",
            Outcome::Ambiguous => "ambiguous",
            Outcome::NotRouted => "not routed",
            Outcome::Refused => "refused by the input guard",
            Outcome::Failed => "failed",
        }
    }
}

/// One row's line in the report. Never a key or a UID.
#[derive(Debug, Clone, Serialize)]
pub struct RowReport {
    /// The CSV line (header = 1).
    pub line: usize,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// For a refusal: the guard check (`level`, `body_part`, …; `aortic_arch`
    /// when the slice selection found no arch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The export report: `dataset.json`'s `report`, and (as text) printed and
/// written to `export-report.txt`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub task: String,
    pub unit: String,
    pub key: &'static str,
    pub rows: usize,
    pub exported: usize,
    pub unmatched: usize,
    pub ambiguous: usize,
    pub not_routed: usize,
    pub refused: usize,
    pub failed: usize,
    /// Refusals by check.
    pub refused_by_check: BTreeMap<String, usize>,
    pub outcomes: Vec<RowReport>,
}

impl Report {
    fn count(&self, o: Outcome) -> usize {
        self.outcomes.iter().filter(|r| r.outcome == o).count()
    }

    fn tally(&mut self) {
        self.rows = self.outcomes.len();
        self.exported = self.count(Outcome::Exported);
        self.unmatched = self.count(Outcome::Unmatched);
        self.ambiguous = self.count(Outcome::Ambiguous);
        self.not_routed = self.count(Outcome::NotRouted);
        self.refused = self.count(Outcome::Refused);
        self.failed = self.count(Outcome::Failed);
        self.refused_by_check.clear();
        for r in &self.outcomes {
            if let (Outcome::Refused, Some(c)) = (r.outcome, &r.check) {
                *self.refused_by_check.entry(c.clone()).or_default() += 1;
            }
        }
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = format!(
            "dataset export: task {} (unit {}), {} label row(s) keyed by {}\n",
            self.task, self.unit, self.rows, self.key
        );
        for o in Outcome::ALL {
            s.push_str(&format!("  {:<28}{}\n", o.label(), self.count(o)));
        }
        for (check, n) in &self.refused_by_check {
            s.push_str(&format!("    refused by {check}: {n}\n"));
        }
        for r in &self.outcomes {
            let detail = match r.outcome {
                Outcome::Exported => format!(
                    "exported as {} (route {})",
                    r.case.as_deref().unwrap_or("?"),
                    r.route.as_deref().unwrap_or("?")
                ),
                Outcome::Refused => format!(
                    "{} ({}): {}",
                    Outcome::Refused.label(),
                    r.check.as_deref().unwrap_or("?"),
                    r.reason.as_deref().unwrap_or("")
                ),
                o => format!("{}: {}", o.label(), r.reason.as_deref().unwrap_or("")),
            };
            s.push_str(&format!("line {}: {detail}\n", r.line));
        }
        s
    }
}

/// Anything shaped like a UID (four or more dot-separated numbers) in a
/// reason, e.g. a spool path inside an error, becomes `<uid>`.
fn redact(text: &str) -> String {
    static UID: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"[0-9]+(\.[0-9]+){3,}").unwrap());
    UID.replace_all(text, "<uid>").into_owned()
}

/// What [`select`] needs to know of one series that has a row's key.
#[derive(Debug, Clone)]
pub struct SeriesStatus<'a> {
    pub receiving: bool,
    /// Some of its instances are still in the spool.
    pub spooled: bool,
    /// The task's route it matches, or why none does.
    pub route: Result<&'a str, &'a str>,
}

/// Which series a row's value belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// The index into the series that have the key.
    One(usize),
    Unmatched(String),
    NotRouted(String),
    Ambiguous(String),
}

/// Choose the series a row's value is of, among the series with its key:
/// the one that routes to the task. Series still being received and series
/// whose instances retention deleted are not candidates; several series that
/// route to the task (a study or accession with two chest series, say) are
/// ambiguous, since the value is of one of them.
pub fn select(kind: KeyKind, task: &str, found: &[SeriesStatus]) -> Selection {
    if found.is_empty() {
        return Selection::Unmatched(format!("no series in the node's index has this {kind}"));
    }
    let usable: Vec<usize> = (0..found.len())
        .filter(|&i| !found[i].receiving && found[i].spooled)
        .collect();
    if usable.is_empty() {
        let why = if found.iter().any(|s| s.receiving) {
            "its series is still being received; export when it is complete"
        } else {
            "the instances of its series were deleted from the spool (retention); send the series again"
        };
        return Selection::Unmatched(why.into());
    }
    let routed: Vec<usize> = usable.iter().copied().filter(|&i| found[i].route.is_ok()).collect();
    match routed[..] {
        [] => {
            let why = found[usable[0]].route.err().unwrap_or_default();
            let of = if usable.len() > 1 { format!(" (nor do the other {} series)", usable.len() - 1) } else { String::new() };
            Selection::NotRouted(format!("its series matches no route of task {task}{of}: {why}"))
        }
        [i] => Selection::One(i),
        _ => Selection::Ambiguous(format!(
            "{} series with this {kind} route to task {task}: the value cannot be assigned to one; key the row by series_instance_uid",
            routed.len()
        )),
    }
}

/// One series of the index, as the export looks at it (loaded on demand).
struct SeriesView {
    summary: SeriesSummary,
    /// Spooled instances, paths absolute.
    instances: Vec<(PathBuf, InstanceHeader)>,
    accession: Option<String>,
    /// The first route of the task it matches, or why none does.
    route: Result<RouteMatch, String>,
}

/// The task's routes and the cards of their models.
struct TaskRoutes {
    names: Vec<String>,
    cards: HashMap<String, ModelCard>,
    unit: (String, String),
}

fn task_routes(cfg: &Config, table: &RouteTable, task: &str) -> Result<TaskRoutes, ExportError> {
    let mut cards = HashMap::new();
    let mut tasks = std::collections::BTreeSet::new();
    for (name, m) in &cfg.models {
        if let Ok(card) = ModelCard::load(&m.card) {
            tasks.insert(card.task.clone());
            if card.task == task {
                cards.insert(name.clone(), card);
            }
        }
    }
    if cards.is_empty() {
        let known = tasks.into_iter().collect::<Vec<_>>().join(", ");
        return Err(ExportError::UnknownTask {
            task: task.into(),
            why: format!("no model in the config has a card of this task (the tasks there: {known})"),
        });
    }
    let names: Vec<String> = table
        .routes
        .iter()
        .filter(|r| cards.contains_key(&r.model))
        .map(|r| r.name.clone())
        .collect();
    let Some(first) = table.routes.iter().find(|r| cards.contains_key(&r.model)) else {
        return Err(ExportError::UnknownTask {
            task: task.into(),
            why: "no route sends series to a model of this task".into(),
        });
    };
    let u = &cards[&first.model].biomarker.unit;
    let unit = (u.ucum.clone(), u.meaning.clone());
    Ok(TaskRoutes { names, cards, unit })
}

impl SeriesView {
    fn load(
        index: &SeriesIndex,
        spool: &Path,
        table: &RouteTable,
        task: &TaskRoutes,
        summary: &SeriesSummary,
        need_accession: bool,
    ) -> Result<SeriesView, ExportError> {
        let instances: Vec<(PathBuf, InstanceHeader)> = index
            .series_instances(&summary.series_instance_uid)?
            .into_iter()
            .map(|(p, h)| (spool.join(p), h))
            .collect();
        let mut accession = None;
        let route = if instances.is_empty() {
            Err("no instances in the spool".to_owned())
        } else {
            match SeriesFacts::load(&instances) {
                Err(e) => Err(redact(&format!("cannot read its first instance: {e}"))),
                Ok(facts) => {
                    if need_accession {
                        if let Some(crate::routing::FactValue::Text(v)) =
                            facts.attribute(dicom_dictionary_std::tags::ACCESSION_NUMBER)
                        {
                            accession = v.into_iter().next();
                        }
                    }
                    let outcomes = table.evaluate(&facts);
                    let mut why = Vec::new();
                    let mut found = None;
                    for o in outcomes.into_iter().filter(|o| task.names.contains(&o.route)) {
                        match o.matched {
                            Some(m) => {
                                found = Some(m);
                                break;
                            }
                            // The condition's path, not its text: the text quotes
                            // header values (descriptions, any keyword a route
                            // tests), which stay out of the export folder.
                            // `biomarker-node route` shows them.
                            None => why.push(format!("route {}: {} does not hold", o.route, o.verdict.at)),
                        }
                    }
                    found.ok_or_else(|| redact(&why.join("; ")))
                }
            }
        };
        Ok(SeriesView {
            summary: summary.clone(),
            instances,
            accession,
            route,
        })
    }
}

/// Run the export: see the module doc. Returns the report, also when nothing
/// was exported (the caller turns that into [`ExportError::NothingExported`]
/// after printing it).
pub fn export(cfg: &Config, table: &RouteTable, req: &ExportRequest) -> Result<Report, ExportError> {
    let task = task_routes(cfg, table, &req.task)?;
    let text = std::fs::read_to_string(&req.labels).map_err(io(&req.labels))?;
    let labels: Labels = labels::parse(&text).map_err(|source| ExportError::Labels {
        path: req.labels.clone(),
        source,
    })?;
    labels::check_units(&labels, &task.unit.0, &task.unit.1).map_err(|source| ExportError::Unit {
        path: req.labels.clone(),
        source,
    })?;
    let mapping_path = match &req.mapping {
        Some(p) => p.clone(),
        None => default_mapping(&req.out)?,
    };
    let index_path = cfg.index_path();
    if !index_path.exists() {
        return Err(ExportError::NoIndex(index_path));
    }
    let index = SeriesIndex::open_readonly(&index_path)?;
    prepare_out(&req.out, &mapping_path)?;
    let spool = cfg.spool_dir();
    let summaries = index.list_series()?;
    let opts = VolumeOptions {
        spacing_tolerance: cfg.series.spacing_tolerance,
        ..Default::default()
    };

    let need_accession = labels.key == KeyKind::AccessionNumber;
    let mut views: HashMap<String, SeriesView> = HashMap::new();
    let view = |views: &mut HashMap<String, SeriesView>, s: &SeriesSummary| -> Result<(), ExportError> {
        if !views.contains_key(s.series_instance_uid.as_str()) {
            let v = SeriesView::load(&index, &spool, table, &task, s, need_accession)?;
            views.insert(s.series_instance_uid.as_str().to_owned(), v);
        }
        Ok(())
    };
    // Which series have each key. Accession numbers are in the instances,
    // not the index: every series' first instance is read once.
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for s in &summaries {
        let key = match labels.key {
            KeyKind::SeriesInstanceUid => s.series_instance_uid.as_str().to_owned(),
            KeyKind::StudyInstanceUid => s.study_instance_uid.as_str().to_owned(),
            KeyKind::AccessionNumber => {
                view(&mut views, s)?;
                match &views[s.series_instance_uid.as_str()].accession {
                    Some(a) => a.clone(),
                    None => continue,
                }
            }
        };
        by_key
            .entry(key)
            .or_default()
            .push(s.series_instance_uid.as_str().to_owned());
    }
    for uids in by_key.values_mut() {
        uids.sort();
    }
    let summary_of: HashMap<&str, &SeriesSummary> =
        summaries.iter().map(|s| (s.series_instance_uid.as_str(), s)).collect();

    let mut report = Report {
        task: req.task.clone(),
        unit: task.unit.0.clone(),
        key: labels.key.column(),
        rows: 0,
        exported: 0,
        unmatched: 0,
        ambiguous: 0,
        not_routed: 0,
        refused: 0,
        failed: 0,
        refused_by_check: BTreeMap::new(),
        outcomes: Vec::new(),
    };
    let mut exported: HashMap<String, usize> = HashMap::new(); // series → first line
    let mut cases: Vec<(String, f64)> = Vec::new();
    let mut mapping = String::from("case_id,csv_line,key_column,key,study_instance_uid,series_instance_uid,route\n");
    let mut routes_used = std::collections::BTreeSet::new();
    for row in &labels.rows {
        let uids = by_key.get(&row.key).cloned().unwrap_or_default();
        for u in &uids {
            view(&mut views, summary_of[u.as_str()])?;
        }
        let found: Vec<&SeriesView> = uids.iter().map(|u| &views[u.as_str()]).collect();
        let status: Vec<SeriesStatus> = found
            .iter()
            .map(|v| SeriesStatus {
                receiving: v.summary.state == SeriesState::Receiving,
                spooled: !v.instances.is_empty(),
                route: v.route.as_ref().map(|m| m.route.as_str()).map_err(|e| e.as_str()),
            })
            .collect();
        let mut out = RowReport {
            line: row.line,
            outcome: Outcome::Unmatched,
            case: None,
            route: None,
            check: None,
            reason: None,
        };
        let v = match select(labels.key, &req.task, &status) {
            Selection::One(i) => found[i],
            Selection::Unmatched(why) => {
                report.outcomes.push(RowReport {
                    reason: Some(why),
                    ..out
                });
                continue;
            }
            Selection::NotRouted(why) => {
                report.outcomes.push(RowReport {
                    outcome: Outcome::NotRouted,
                    reason: Some(why),
                    ..out
                });
                continue;
            }
            Selection::Ambiguous(why) => {
                report.outcomes.push(RowReport {
                    outcome: Outcome::Ambiguous,
                    reason: Some(why),
                    ..out
                });
                continue;
            }
        };
        let uid = v.summary.series_instance_uid.as_str();
        if let Some(first) = exported.get(uid) {
            out.reason = Some(format!("the same series as line {first}"));
            report.outcomes.push(out);
            continue;
        }
        let Ok(m) = &v.route else {
            unreachable!("select() chose a routed series")
        };
        out.route = Some(m.route.clone());
        let card = &task.cards[&m.model];
        let files: Vec<PathBuf> = v.instances.iter().map(|(p, _)| p.clone()).collect();
        // `None`: a route that measures a volume slice by slice, whose value
        // (a volume) is not what one model input gives.
        let input = job_run::load_volume(&files, &opts).and_then(|vol| {
            if job_run::is_volume_route(card, m.slices.as_ref(), &vol) {
                return Ok(None);
            }
            job_run::model_input(card, m.slices.as_ref(), std::sync::Arc::new(vol)).map(Some)
        });
        let mi = match input {
            Ok(Some(mi)) => mi,
            Ok(None) => {
                out.outcome = Outcome::Failed;
                out.reason = Some(format!(
                    "route {} measures a volume slice by slice (slices: all): its value is not one model input's, so it is not exported",
                    m.route
                ));
                report.outcomes.push(out);
                continue;
            }
            Err(e) => {
                out.outcome = if e.refused_by().is_some() {
                    Outcome::Refused
                } else {
                    Outcome::Failed
                };
                out.check = e.refused_by().map(str::to_owned);
                out.reason = Some(redact(&e.to_string()));
                report.outcomes.push(out);
                continue;
            }
        };
        let case = format!("c{:04}", cases.len() + 1);
        write_case(&req.out.join("cases").join(&case), card, &mi, &m.route)?;
        exported.insert(uid.to_owned(), row.line);
        cases.push((case.clone(), row.value));
        routes_used.insert(m.route.clone());
        mapping.push_str(&csv_line(&[
            &case,
            &row.line.to_string(),
            labels.key.column(),
            &row.key,
            v.summary.study_instance_uid.as_str(),
            uid,
            &m.route,
        ]));
        report.outcomes.push(RowReport {
            outcome: Outcome::Exported,
            case: Some(case),
            ..out
        });
    }
    report.tally();

    let mut labels_csv = String::from("series_dir,value\n");
    for (case, value) in &cases {
        labels_csv.push_str(&format!("cases/{case},{value}\n"));
    }
    write_file(&req.out.join("labels.csv"), labels_csv.as_bytes())?;
    let dataset = serde_json::json!({
        "format": FORMAT,
        "task": req.task,
        "unit": task.unit.0,
        "route": routes_used.iter().cloned().collect::<Vec<_>>().join(","),
        "node_version": env!("CARGO_PKG_VERSION"),
        "cases": cases.len(),
        "report": &report,
    });
    write_file(
        &req.out.join("dataset.json"),
        serde_json::to_string_pretty(&dataset)?.as_bytes(),
    )?;
    write_file(&req.out.join("export-report.txt"), report.text().as_bytes())?;
    write_mapping(&mapping_path, mapping.as_bytes())?;
    Ok(report)
}

/// `DIR.mapping.csv`, beside `DIR`.
fn default_mapping(out: &Path) -> Result<PathBuf, ExportError> {
    let abs = std::path::absolute(out).map_err(io(out))?;
    let name = abs.file_name().ok_or_else(|| ExportError::Io {
        path: out.to_owned(),
        source: std::io::Error::other("the export folder needs a name of its own (or give --mapping)"),
    })?;
    Ok(abs.with_file_name(format!("{}.mapping.csv", name.to_string_lossy())))
}

/// Create `DIR` (empty or new), and check the mapping stays outside it.
fn prepare_out(out: &Path, mapping: &Path) -> Result<(), ExportError> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(io(out))?;
        if entries.next().is_some() {
            return Err(ExportError::OutputNotEmpty(out.to_owned()));
        }
    }
    let abs_out = std::path::absolute(out).map_err(io(out))?;
    let abs_map = std::path::absolute(mapping).map_err(io(mapping))?;
    if abs_map.starts_with(&abs_out) {
        return Err(ExportError::MappingInside(mapping.to_owned()));
    }
    std::fs::create_dir_all(out.join("cases")).map_err(io(out))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    std::fs::write(path, bytes).map_err(io(path))
}

/// The mapping holds UIDs and the site's keys: readable by its owner only.
fn write_mapping(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// One CSV record; fields with a comma, quote or line break are quoted.
fn csv_line(fields: &[&str]) -> String {
    let cells: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                (*f).to_owned()
            }
        })
        .collect();
    cells.join(",") + "\n"
}

/// `meta.json` of a case: geometry only.
#[derive(Debug, Serialize)]
struct CaseMeta<'a> {
    pixel_spacing_mm: [f64; 2],
    slice_thickness_mm: f64,
    /// Patient z of each exported slice, in the order of `volume.npy`.
    z_mm: Vec<f64>,
    rows: usize,
    cols: usize,
    route: &'a str,
    model_version: &'a str,
}

/// Write one case folder: the model input's HU, the aggregation's
/// candidates on it, the geometry.
fn write_case(dir: &Path, card: &ModelCard, mi: &ModelInput, route: &str) -> Result<(), ExportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (s, r, c) = mi.hu.view().dim();
    let shape = [s, r, c];
    let cand = crate::biomarkers::model_candidates(mi.hu.view(), mi.geom, &card.candidates, &card.aggregation);
    let npy = |name: &str| dir.join(name);
    let p = npy("volume.npy");
    crate::npy::write(&p, &shape, mi.hu.view().iter().copied()).map_err(|source| ExportError::Npy {
        path: p.clone(),
        source,
    })?;
    let p = npy("candidates.npy");
    crate::npy::write(&p, &shape, cand.iter().map(|&b| b as u8)).map_err(|source| ExportError::Npy {
        path: p.clone(),
        source,
    })?;
    let meta = CaseMeta {
        pixel_spacing_mm: mi.geom.pixel_spacing,
        slice_thickness_mm: mi.geom.slice_thickness_mm,
        z_mm: mi.idx.iter().map(|&i| mi.vol.positions[i][2]).collect(),
        rows: r,
        cols: c,
        route,
        model_version: &card.version,
    };
    write_file(&dir.join("meta.json"), serde_json::to_string_pretty(&meta)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(receiving: bool, spooled: bool, route: Result<&'static str, &'static str>) -> SeriesStatus<'static> {
        SeriesStatus {
            receiving,
            spooled,
            route,
        }
    }

    #[test]
    fn a_key_with_one_routed_series_selects_it_among_others() {
        let found = [
            st(false, true, Err("route pma: match.all[1]: no")),
            st(false, true, Ok("pma")),
        ];
        assert_eq!(select(KeyKind::StudyInstanceUid, "pma", &found), Selection::One(1));
    }

    #[test]
    fn every_row_that_is_not_exported_says_why() {
        let k = KeyKind::StudyInstanceUid;
        let Selection::Unmatched(why) = select(k, "pma", &[]) else {
            panic!()
        };
        assert!(why.contains("no series") && why.contains("study_instance_uid"), "{why}");
        let Selection::Unmatched(why) = select(k, "pma", &[st(true, true, Ok("pma"))]) else {
            panic!()
        };
        assert!(why.contains("still being received"), "{why}");
        let Selection::Unmatched(why) = select(k, "pma", &[st(false, false, Err("no instances"))]) else {
            panic!()
        };
        assert!(why.contains("retention"), "{why}");
        let Selection::NotRouted(why) = select(
            k,
            "pma",
            &[st(
                false,
                true,
                Err("route pma: match.all[2]: BodyPartExamined is HEAD"),
            )],
        ) else {
            panic!()
        };
        assert!(why.contains("task pma") && why.contains("HEAD"), "{why}");
        let Selection::Ambiguous(why) = select(k, "pma", &[st(false, true, Ok("a")), st(false, true, Ok("b"))]) else {
            panic!()
        };
        assert!(
            why.starts_with("2 series") && why.contains("series_instance_uid"),
            "{why}"
        );
        // A series still receiving does not make a complete one ambiguous.
        assert_eq!(
            select(k, "pma", &[st(true, true, Ok("a")), st(false, true, Ok("a"))]),
            Selection::One(1)
        );
    }

    #[test]
    fn reasons_lose_their_uids() {
        let r = redact("volume: /data/spool/1.2.826.0.1.3680043/2.25.12345678.9.1/3.4.5.6.dcm: bad, 1.5 mm");
        assert_eq!(r, "volume: /data/spool/<uid>/<uid>/<uid>.dcm: bad, 1.5 mm");
    }

    #[test]
    fn exit_codes_tell_the_errors_apart() {
        let lab = ExportError::Labels {
            path: "l.csv".into(),
            source: LabelsError::NoValue,
        };
        let codes = [
            ExportError::NothingExported.exit_code(),
            lab.exit_code(),
            ExportError::UnknownTask {
                task: "x".into(),
                why: String::new(),
            }
            .exit_code(),
            ExportError::OutputNotEmpty("d".into()).exit_code(),
            ExportError::NoIndex("i".into()).exit_code(),
        ];
        assert_eq!(codes, [1, 3, 5, 6, 2]);
    }

    #[test]
    fn the_mapping_goes_beside_the_folder_and_never_inside() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("export");
        assert_eq!(default_mapping(&out).unwrap(), d.path().join("export.mapping.csv"));
        assert!(matches!(
            prepare_out(&out, &out.join("m.csv")),
            Err(ExportError::MappingInside(_))
        ));
        prepare_out(&out, &d.path().join("m.csv")).unwrap();
        assert!(out.join("cases").is_dir());
        std::fs::write(out.join("x"), "").unwrap();
        assert!(matches!(
            prepare_out(&out, &d.path().join("m.csv")),
            Err(ExportError::OutputNotEmpty(_))
        ));
    }
}
