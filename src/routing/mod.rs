//! Routing: decides which models run on a completed series.
//!
//! **Input.** A [`RouteTable`] compiled from the config's `routes`, `models`
//! and `destinations` sections, and the [`SeriesFacts`] of one completed
//! series (its first instance's header plus values derived from all its
//! instances).
//!
//! **Output.** One [`RouteOutcome`] per route, in config order: a
//! [`RouteMatch`] (model, destinations, slice selection) when the route's
//! `match` condition holds, and otherwise the first condition that failed,
//! with a human explanation. Several routes may match one series; each match
//! is one job.
//!
//! **Condition language** (full reference: docs/ROUTING.md):
//! ```yaml
//! match:
//!   all:
//!     - {derived: sop_class, one_of: [CT Image Storage, Enhanced CT Image Storage]}
//!     - {derived: axial, equals: true}
//!     - {derived: image_type, contains: ORIGINAL}
//!     - {not: {keyword: ImageType, regex: "LOCALIZER|SCOUT"}}
//!     - {derived: slice_thickness, range: {min: 0.5, max: 5}}
//! ```
//! A condition is `all: [..]`, `any: [..]`, `not: {..}`, or a test: one
//! subject (`keyword:` any PS3.6 keyword, or `derived:` one of
//! [`Derived::names`]) and exactly one operator (`equals`, `one_of`, `regex`,
//! `range`, `contains`, `present`, `absent`), or `covers: liver`: the series
//! covers the liver as an abdominal CT does, judged from HU
//! ([`crate::volume::coverage`]) on a sparse stack of its slices. Only that
//! test decodes pixels, only when evaluation reaches it (`all` and `any`
//! stop at the first deciding child), and once per series.
//!
//! **Invariants.** [`RouteTable::compile`] is pure and checks everything it
//! can before a series arrives — unknown model or destination, bad regex,
//! unknown keyword, impossible range, duplicate route name — so a reload can
//! refuse a bad config and keep the running table. Evaluation never fails: a
//! missing attribute makes a test false, with a reason.
//!
//! **Failure modes.** Only reading the first instance's header can fail
//! ([`FactsError`]); an I/O error there is retryable, a missing or
//! unparseable file is not. In `serve`, [`stage`] sets a series whose
//! routing fails for good aside as `unroutable`, so it never holds the queue.

mod condition;
pub mod stage;
mod facts;

use std::collections::HashMap;

use serde::Serialize;

pub use condition::{Condition, Op, Region, Scalar, Subject, Verdict};
pub use facts::{Derived, FactValue, FactsError, SeriesFacts, ANATOMY_MAX_SLICES, ANATOMY_STEP_MM, AXIAL_MAX_DEG};

use crate::config::{Config, ConfigDiagnostic, SliceMode, SliceSelectionConfig};
use crate::volume::SliceSelection;

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub condition: Condition,
    pub model: String,
    pub send_to: Vec<String>,
    pub slices: Option<SliceSelection>,
    /// The `match` tree as configured, for the API and the status page.
    pub spec: crate::config::ConditionSpec,
}

/// The routes of one config, ready to evaluate.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
}

/// A route that matched: the job to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteMatch {
    pub route: String,
    pub model: String,
    pub send_to: Vec<String>,
    #[serde(serialize_with = "ser_slices")]
    pub slices: Option<SliceSelection>,
}

impl From<&RouteMatch> for crate::job::ResolvedRoute {
    fn from(m: &RouteMatch) -> Self {
        crate::job::ResolvedRoute {
            route: m.route.clone(),
            model: m.model.clone(),
            send_to: m.send_to.clone(),
            slices: m.slices.clone(),
            shadow: false,
        }
    }
}

fn ser_slices<S: serde::Serializer>(v: &Option<SliceSelection>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(sel) => s.serialize_some(&sel.to_string()),
        None => s.serialize_none(),
    }
}

/// The result of one route on one series.
#[derive(Debug, Clone)]
pub struct RouteOutcome {
    pub route: String,
    /// `Some` when the route matched.
    pub matched: Option<RouteMatch>,
    /// For a non-match: the first condition that failed (`at` is relative to
    /// the route, e.g. `match.all[3]`) and why.
    pub verdict: Verdict,
}

impl RouteTable {
    /// Check and compile the routing sections. Every problem is reported,
    /// not just the first, each positioned in the config text when the
    /// config was loaded from a file.
    pub fn compile(cfg: &Config) -> Result<RouteTable, Vec<ConfigDiagnostic>> {
        let source = cfg.source.as_ref();
        let mut diags = Vec::new();
        let mut diag = |key: String, message: String| diags.push(ConfigDiagnostic::at(source, &key, message));

        for (name, m) in &cfg.models {
            if !m.card.is_file() {
                diag(
                    format!("models.{name}.card"),
                    format!("model card {} does not exist", m.card.display()),
                );
            }
        }
        let known = |keys: Vec<&String>| {
            if keys.is_empty() {
                "none are defined".to_owned()
            } else {
                format!("known: {}", keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "))
            }
        };
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut routes = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if r.name.trim().is_empty() {
                diag(format!("{at}.name"), "route name is empty".into());
            } else if !is_path_safe_name(&r.name) {
                // The name is a directory of every result the route writes
                // (results/<series>/<route>/g<n>), so it must be one plain
                // file name: refused here rather than when a job runs.
                diag(
                    format!("{at}.name"),
                    format!("route name \"{}\" must be one plain file name (no '/', '\\', control characters, '.' or '..')", r.name.escape_default()),
                );
            } else if let Some(first) = seen.insert(r.name.as_str(), i) {
                diag(
                    format!("{at}.name"),
                    format!("duplicate route name \"{}\" (also routes[{first}])", r.name),
                );
            }
            if !cfg.models.contains_key(&r.model) {
                diag(
                    format!("{at}.model"),
                    format!("unknown model \"{}\" ({})", r.model, known(cfg.models.keys().collect())),
                );
            }
            for (k, d) in r.send_to.iter().enumerate() {
                if !cfg.destinations.contains_key(d) {
                    diag(
                        format!("{at}.send_to[{k}]"),
                        format!("unknown destination \"{d}\" ({})", known(cfg.destinations.keys().collect())),
                    );
                }
            }
            let slices = match &r.slices {
                None => None,
                Some(s) => match slice_selection(s) {
                    Ok(s) => Some(s),
                    Err((key, m)) => {
                        diag(format!("{at}.slices{key}"), m);
                        None
                    }
                },
            };
            let mut errors = Vec::new();
            let condition = Condition::compile(&r.condition, &format!("{at}.match"), &mut errors);
            for (key, m) in errors {
                diag(key, m);
            }
            if let Some(condition) = condition {
                routes.push(Route {
                    name: r.name.clone(),
                    condition,
                    model: r.model.clone(),
                    send_to: r.send_to.clone(),
                    slices,
                    spec: r.condition.clone(),
                });
            }
        }
        if diags.is_empty() {
            Ok(RouteTable { routes })
        } else if source.is_some() {
            diags.sort_by_key(|d| (d.line.unwrap_or(usize::MAX), d.column));
            Err(diags)
        } else {
            Err(diags)
        }
    }

    /// Every route's outcome on one series, in config order.
    pub fn evaluate(&self, facts: &SeriesFacts) -> Vec<RouteOutcome> {
        self.routes
            .iter()
            .map(|r| {
                let verdict = r.condition.evaluate(facts, "match");
                RouteOutcome {
                    route: r.name.clone(),
                    matched: verdict.holds.then(|| RouteMatch {
                        route: r.name.clone(),
                        model: r.model.clone(),
                        send_to: r.send_to.clone(),
                        slices: r.slices.clone(),
                    }),
                    verdict,
                }
            })
            .collect()
    }

    /// The jobs for one series: every matching route.
    pub fn matches(&self, facts: &SeriesFacts) -> Vec<RouteMatch> {
        self.evaluate(facts).into_iter().filter_map(|o| o.matched).collect()
    }
}

/// `(key suffix, message)` on error.
fn slice_selection(s: &SliceSelectionConfig) -> Result<SliceSelection, (String, String)> {
    let stray = |key: &str, mode: &str| Err((format!(".{key}"), format!("`{key}` is only used with `mode: {mode}`")));
    match s.mode {
        SliceMode::Index => match s.index {
            Some(i) if s.z_mm.is_none() => Ok(SliceSelection::Index(i)),
            Some(_) => stray("z_mm", "z_mm"),
            None => Err((String::new(), "`mode: index` needs `index: N`".into())),
        },
        SliceMode::ZMm => match s.z_mm {
            Some(z) if !z.is_finite() => Err((".z_mm".into(), "must be a finite number".into())),
            Some(z) if s.index.is_none() => Ok(SliceSelection::ZMm(z)),
            Some(_) => stray("index", "index"),
            None => Err((String::new(), "`mode: z_mm` needs `z_mm: Z`".into())),
        },
        mode => {
            if s.index.is_some() {
                return stray("index", "index");
            }
            if s.z_mm.is_some() {
                return stray("z_mm", "z_mm");
            }
            Ok(match mode {
                SliceMode::Single => SliceSelection::Single,
                SliceMode::AboveAorticArch => SliceSelection::AboveAorticArch,
                SliceMode::All => SliceSelection::All,
                _ => SliceSelection::Middle,
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// One plain path component on every platform we write to.
fn is_path_safe_name(name: &str) -> bool {
    name != "." && name != ".." && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}
