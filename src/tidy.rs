//! Checks on the shape of the source tree itself, in the manner of
//! rust-analyzer's `tidy` tests: what ARCHITECTURE.md promises about the
//! code, asserted, so that it stays true.
//!
//! - The top-level modules form no import cycle: data flows one way through
//!   the stages, and a stage never reaches back into one that feeds it.
//! - Every stage module starts with a `//!` header (input, output,
//!   invariants, failure modes).
//!
//! The import graph is read from the source text (`crate::x` paths outside
//! comments and `#[cfg(test)]` code), not from rustc: crude, but it needs no
//! tool that CI would have to install, and a false edge can only make the
//! check stricter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file relative to `src/`: `series/index.rs` →
/// `["series", "index"]`, `series/mod.rs` → `["series"]`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// Files that are compiled only for tests: declared as `#[cfg(test)] mod x;`
/// (or `#[cfg(any(test, ...))]`) in their parent.
fn test_only_modules(files: &[(Vec<String>, String)]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for (module, text) in files {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            let Some(name) = t
                .strip_prefix("pub(crate) mod ")
                .or_else(|| t.strip_prefix("pub mod "))
                .or_else(|| t.strip_prefix("mod "))
                .and_then(|r| r.strip_suffix(';'))
            else {
                continue;
            };
            if i > 0 && lines[i - 1].trim().starts_with("#[cfg(") && lines[i - 1].contains("test") {
                let mut m = module.clone();
                m.push(name.trim().to_string());
                out.insert(m);
            }
        }
    }
    out
}

/// The text with `//` comments and `#[cfg(test)]` items removed.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i64> = None;
    let mut depth: i64 = 0;
    let mut pending_cfg_test = false;
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        let t = code.trim();
        let opens = code.matches('{').count() as i64;
        let closes = code.matches('}').count() as i64;
        if skip_depth.is_none() && t.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        if pending_cfg_test && skip_depth.is_none() {
            if t.is_empty() || t.starts_with("#[") {
                continue;
            }
            pending_cfg_test = false;
            if opens > closes {
                skip_depth = Some(depth);
                depth += opens - closes;
                continue;
            }
            // A one-line item (`mod x;`, `use ...;`): drop it.
            continue;
        }
        depth += opens - closes;
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Top-level modules named by `crate::` paths in `code`.
fn referenced_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn import_graph() -> Graph {
    let root = src_dir();
    let mut paths = Vec::new();
    rust_files(&root, &mut paths);
    let files: Vec<(Vec<String>, String)> = paths
        .iter()
        .map(|p| (module_of(p.strip_prefix(&root).unwrap()), std::fs::read_to_string(p).unwrap()))
        .collect();
    let test_only = test_only_modules(&files);
    let top_level: BTreeSet<String> = files.iter().filter_map(|(m, _)| m.first().cloned()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &files {
        let Some(me) = module.first() else { continue }; // lib.rs, main.rs
        if (1..=module.len()).any(|n| test_only.contains(&module[..n])) {
            continue;
        }
        for target in referenced_modules(&production_code(text)) {
            if &target != me && top_level.contains(&target) {
                edges.entry(me.clone()).or_default().insert(target);
            }
        }
    }
    Graph { edges }
}

impl Graph {
    /// Strongly connected components with more than one module (Tarjan).
    fn cycles(&self) -> Vec<Vec<String>> {
        struct St<'a> {
            g: &'a BTreeMap<String, BTreeSet<String>>,
            index: BTreeMap<&'a str, usize>,
            low: BTreeMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on: BTreeSet<&'a str>,
            next: usize,
            out: Vec<Vec<String>>,
        }
        fn visit<'a>(s: &mut St<'a>, v: &'a str) {
            s.index.insert(v, s.next);
            s.low.insert(v, s.next);
            s.next += 1;
            s.stack.push(v);
            s.on.insert(v);
            let g = s.g;
            for w in g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if s.low[v] == s.index[v] {
                let mut comp = Vec::new();
                loop {
                    let w = s.stack.pop().unwrap();
                    s.on.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    s.out.push(comp);
                }
            }
        }
        let mut s = St {
            g: &self.edges,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on: BTreeSet::new(),
            next: 0,
            out: Vec::new(),
        };
        for v in self.edges.keys() {
            if !s.index.contains_key(v.as_str()) {
                visit(&mut s, v);
            }
        }
        s.out
    }

    fn render(&self) -> String {
        self.edges.iter().map(|(k, v)| format!("{k} -> {}\n", v.iter().cloned().collect::<Vec<_>>().join(" "))).collect()
    }
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let g = import_graph();
    let cycles = g.cycles();
    assert!(cycles.is_empty(), "import cycles between top-level modules: {cycles:?}\n{}", g.render());
    // Print the map for the record (`cargo test --lib tidy -- --nocapture`).
    println!("{}", g.render());
}

#[test]
fn the_checker_sees_a_cycle() {
    let mut g = Graph { edges: BTreeMap::new() };
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.edges.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(g.cycles(), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    let code = production_code(
        "use crate::x::Y;\n// crate::commented\n#[cfg(test)]\nmod tests {\n    use crate::z;\n}\nfn f() { crate::w::g() }\n",
    );
    assert_eq!(referenced_modules(&code), ["w", "x"].into_iter().map(String::from).collect());
}

/// The stages of the data flow, and the modules around them that ARCHITECTURE.md
/// describes: each one says what it takes, gives, keeps and how it fails.
const HEADED: &[&str] = &[
    "ingest/mod.rs",
    "spool/mod.rs",
    "series/mod.rs",
    "routing/mod.rs",
    "dataset/mod.rs",
    "job/mod.rs",
    "inference/mod.rs",
    "biomarkers/mod.rs",
    "report/mod.rs",
    "outbox/mod.rs",
    "retention.rs",
    "http/mod.rs",
    "node/mod.rs",
    "cli/mod.rs",
    "config/mod.rs",
    "dicom/mod.rs",
    "volume/mod.rs",
    "telemetry/mod.rs",
    "store.rs",
];

#[test]
fn every_stage_module_has_a_header() {
    let root = src_dir();
    let missing: Vec<&str> = HEADED
        .iter()
        .copied()
        .filter(|f| {
            let p = root.join(f);
            let alt = root.join(f.replace("/mod.rs", ".rs"));
            let text = std::fs::read_to_string(&p).or_else(|_| std::fs::read_to_string(&alt)).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(missing.is_empty(), "stage modules without a //! header (or missing): {missing:?}");
}
