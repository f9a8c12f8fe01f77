//! Conditions: compiled from [`ConditionSpec`] once, evaluated per series.
//!
//! Evaluation never fails: a missing attribute makes a test false, with a
//! reason. Each verdict carries a human explanation and the key path of the
//! condition that decided it, so `route` can say *why* a route did not match.

use std::fmt;

use dicom_core::dictionary::DataDictionary;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use regex::Regex;

use super::facts::{Derived, FactValue, SeriesFacts};
use crate::config::ConditionSpec;

/// What a test looks at.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A top-level attribute of the series' first instance.
    Keyword { keyword: String, tag: Tag },
    Derived(Derived),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Keyword { keyword, .. } => f.write_str(keyword),
            Subject::Derived(d) => f.write_str(d.name()),
        }
    }
}

/// A literal from the config.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Text(String),
    Number(f64),
    Bool(bool),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Text(s) => f.write_str(s),
            Scalar::Number(n) => write!(f, "{n}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    Equals(Scalar),
    OneOf(Vec<Scalar>),
    Regex(Regex),
    Range { min: Option<f64>, max: Option<f64> },
    Contains(String),
    /// `present: true` / `absent: false` → true; the opposite → false.
    Present(bool),
}

/// A body region whose coverage a series can be tested for from HU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// [`crate::volume::coverage`]: an abdominal scan covering most of the liver.
    Liver,
}

impl Region {
    const ALL: [Region; 1] = [Region::Liver];

    pub fn name(self) -> &'static str {
        match self {
            Region::Liver => "liver",
        }
    }

    pub fn parse(s: &str) -> Option<Region> {
        Region::ALL.into_iter().find(|r| r.name() == s)
    }
}

#[derive(Debug, Clone)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Test { subject: Subject, op: Op },
    /// `covers: liver`: judged from pixels, only when evaluation reaches it
    /// (put it after cheaper header tests in an `any`/`all`).
    Covers(Region),
}

/// The outcome of one condition, with the path of the condition that
/// decided it and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub holds: bool,
    /// Key path below the route, e.g. `match.all[2].not`.
    pub at: String,
    pub why: String,
}

/// A problem found while compiling: key path (relative to the condition)
/// and message.
pub type CompileError = (String, String);

const OPERATORS: &str = "equals, one_of, regex, range, contains, present, absent";

impl Condition {
    /// Compile one spec; `at` is its key path, used in every error.
    pub fn compile(spec: &ConditionSpec, at: &str, errors: &mut Vec<CompileError>) -> Option<Condition> {
        let combinators = [spec.all.is_some(), spec.any.is_some(), spec.not.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        let subjects = [spec.keyword.is_some(), spec.derived.is_some()].iter().filter(|b| **b).count();
        let covers = usize::from(spec.covers.is_some());
        let ops = [
            spec.equals.is_some(),
            spec.one_of.is_some(),
            spec.regex.is_some(),
            spec.range.is_some(),
            spec.contains.is_some(),
            spec.present.is_some(),
            spec.absent.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if combinators + subjects + covers == 0 {
            errors.push((
                at.into(),
                "empty condition: give `all`, `any`, `not`, `covers`, or a `keyword`/`derived` subject with an operator".into(),
            ));
            return None;
        }
        if combinators + covers > 1 || (combinators + covers == 1 && subjects + ops > 0) {
            errors.push((
                at.into(),
                "a condition is one of `all`, `any`, `not`, `covers`, or a test; nest them to combine".into(),
            ));
            return None;
        }
        if let Some(region) = &spec.covers {
            return match Region::parse(region) {
                Some(r) => Some(Condition::Covers(r)),
                None => {
                    let known: Vec<&str> = Region::ALL.iter().map(|r| r.name()).collect();
                    errors.push((
                        format!("{at}.covers"),
                        format!("unknown region \"{region}\" (known: {})", known.join(", ")),
                    ));
                    None
                }
            };
        }
        let children = |list: &Vec<ConditionSpec>, name: &str, errors: &mut Vec<CompileError>| {
            if list.is_empty() {
                errors.push((format!("{at}.{name}"), format!("`{name}` needs at least one condition")));
            }
            let compiled: Vec<Option<Condition>> = list
                .iter()
                .enumerate()
                .map(|(i, c)| Condition::compile(c, &format!("{at}.{name}[{i}]"), errors))
                .collect();
            compiled.into_iter().collect::<Option<Vec<_>>>()
        };
        if let Some(list) = &spec.all {
            return children(list, "all", errors).map(Condition::All);
        }
        if let Some(list) = &spec.any {
            return children(list, "any", errors).map(Condition::Any);
        }
        if let Some(inner) = &spec.not {
            return Condition::compile(inner, &format!("{at}.not"), errors).map(|c| Condition::Not(Box::new(c)));
        }
        if subjects > 1 {
            errors.push((at.into(), "give either `keyword` or `derived`, not both".into()));
            return None;
        }
        if ops != 1 {
            errors.push((
                at.into(),
                format!("a test needs exactly one operator ({OPERATORS}), found {ops}"),
            ));
            return None;
        }
        let subject = match (&spec.keyword, &spec.derived) {
            (Some(k), _) => match keyword_tag(k) {
                Ok(tag) => Subject::Keyword {
                    keyword: k.clone(),
                    tag,
                },
                Err(m) => {
                    errors.push((format!("{at}.keyword"), m));
                    return None;
                }
            },
            (_, Some(d)) => match Derived::parse(d) {
                Some(d) => Subject::Derived(d),
                None => {
                    errors.push((
                        format!("{at}.derived"),
                        format!("unknown derived value \"{d}\" (known: {})", Derived::names().join(", ")),
                    ));
                    return None;
                }
            },
            _ => unreachable!("subjects == 1 was checked above"),
        };
        let kind = subject_kind(&subject);
        let mut op = compile_op(spec, at, &subject, kind, errors)?;
        if matches!(subject, Subject::Derived(Derived::SopClass)) {
            // The fact carries the PS3.6 name; accept UIDs in the config too.
            let name = |s: &mut Scalar| {
                if let Scalar::Text(t) = s {
                    *t = super::facts::sop_class_name(t);
                }
            };
            match &mut op {
                Op::Equals(s) => name(s),
                Op::OneOf(list) => list.iter_mut().for_each(name),
                _ => {}
            }
        }
        Some(Condition::Test { subject, op })
    }

    pub fn evaluate(&self, facts: &SeriesFacts, at: &str) -> Verdict {
        match self {
            Condition::All(list) => {
                for (i, c) in list.iter().enumerate() {
                    let v = c.evaluate(facts, &format!("{at}.all[{i}]"));
                    if !v.holds {
                        return v;
                    }
                }
                Verdict {
                    holds: true,
                    at: format!("{at}.all"),
                    why: format!("all {} conditions held", list.len()),
                }
            }
            Condition::Any(list) => {
                let mut failures = Vec::new();
                for (i, c) in list.iter().enumerate() {
                    let v = c.evaluate(facts, &format!("{at}.any[{i}]"));
                    if v.holds {
                        return v;
                    }
                    failures.push(v.why);
                }
                Verdict {
                    holds: false,
                    at: format!("{at}.any"),
                    why: format!("none held: {}", failures.join("; ")),
                }
            }
            Condition::Not(inner) => {
                let v = inner.evaluate(facts, &format!("{at}.not"));
                Verdict {
                    holds: !v.holds,
                    at: format!("{at}.not"),
                    why: format!("{} under not", v.why),
                }
            }
            Condition::Test { subject, op } => {
                let (holds, why) = test(facts, subject, op);
                Verdict {
                    holds,
                    at: at.to_owned(),
                    why,
                }
            }
            Condition::Covers(Region::Liver) => {
                let (holds, why) = match facts.liver_coverage() {
                    Ok(c) => (c.covered, c.to_string()),
                    Err(e) => (false, format!("liver coverage not judged: {e}")),
                };
                Verdict {
                    holds,
                    at: format!("{at}.covers"),
                    why,
                }
            }
        }
    }
}

/// Look a keyword up in the standard dictionary (PS3.6).
fn keyword_tag(keyword: &str) -> Result<Tag, String> {
    match StandardDataDictionary.by_name(keyword) {
        Some(e) => match e.tag {
            dicom_core::dictionary::TagRange::Single(t) => Ok(t),
            _ => Err(format!("\"{keyword}\" is a repeating-group attribute; give a single tag")),
        },
        None => Err(format!("unknown DICOM keyword \"{keyword}\" (not in the PS3.6 dictionary; keywords are case-sensitive, e.g. SeriesDescription)")),
    }
}

/// What kind of value a subject yields, for compile-time checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    Bool,
    /// A keyword: text, but numeric operators parse it (DS, IS, US, ...).
    Attribute { numeric: bool },
}

fn subject_kind(subject: &Subject) -> Kind {
    match subject {
        Subject::Derived(d) => match d.value_kind() {
            FactValue::Text(_) => Kind::Text,
            FactValue::Number(_) => Kind::Number,
            FactValue::Bool(_) => Kind::Bool,
        },
        Subject::Keyword { tag, .. } => {
            let vr = StandardDataDictionary
                .by_tag(*tag)
                .map(|e| e.vr.relaxed())
                .unwrap_or(VR::UN);
            Kind::Attribute {
                numeric: matches!(
                    vr,
                    VR::DS | VR::IS | VR::US | VR::SS | VR::UL | VR::SL | VR::FL | VR::FD | VR::SV | VR::UV
                ),
            }
        }
    }
}

fn scalar(v: &serde_yaml::Value) -> Option<Scalar> {
    match v {
        serde_yaml::Value::String(s) => Some(Scalar::Text(s.clone())),
        serde_yaml::Value::Number(n) => n.as_f64().map(Scalar::Number),
        serde_yaml::Value::Bool(b) => Some(Scalar::Bool(*b)),
        _ => None,
    }
}

fn compile_op(
    spec: &ConditionSpec,
    at: &str,
    subject: &Subject,
    kind: Kind,
    errors: &mut Vec<CompileError>,
) -> Option<Op> {
    let mut fail = |key: &str, msg: String| {
        errors.push((format!("{at}.{key}"), msg));
        None
    };
    let check_scalar = |s: &Scalar| -> Result<Scalar, String> {
        match (kind, s) {
            (Kind::Bool, Scalar::Bool(_)) => Ok(s.clone()),
            (Kind::Bool, _) => Err(format!("{subject} is true or false, not \"{s}\"")),
            (_, Scalar::Bool(_)) => Err(format!("{subject} is not a boolean; quote \"{s}\" if you mean text")),
            (Kind::Number, Scalar::Text(t)) => t
                .trim()
                .parse()
                .map(Scalar::Number)
                .map_err(|_| format!("{subject} is a number, not \"{t}\"")),
            (Kind::Text, Scalar::Number(n)) => Ok(Scalar::Text(n.to_string())),
            _ => Ok(s.clone()),
        }
    };
    if let Some(v) = &spec.equals {
        let Some(s) = scalar(v) else {
            return fail("equals", "must be a single text, number or boolean".into());
        };
        return match check_scalar(&s) {
            Ok(s) => Some(Op::Equals(s)),
            Err(m) => fail("equals", m),
        };
    }
    if let Some(list) = &spec.one_of {
        if list.is_empty() {
            return fail("one_of", "needs at least one value".into());
        }
        let mut out = Vec::new();
        for (i, v) in list.iter().enumerate() {
            match scalar(v).ok_or_else(|| "must be a text, number or boolean".to_string()).and_then(|s| check_scalar(&s)) {
                Ok(s) => out.push(s),
                Err(m) => return fail(&format!("one_of[{i}]"), m),
            }
        }
        return Some(Op::OneOf(out));
    }
    if let Some(r) = &spec.regex {
        if matches!(kind, Kind::Bool | Kind::Number) {
            return fail("regex", format!("{subject} is not text; use equals or range"));
        }
        return match Regex::new(r) {
            Ok(re) => Some(Op::Regex(re)),
            Err(e) => fail(
                "regex",
                format!("bad regex: {}", e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")),
            ),
        };
    }
    if let Some(r) = &spec.range {
        if matches!(kind, Kind::Bool | Kind::Text | Kind::Attribute { numeric: false }) {
            return fail("range", format!("{subject} is not numeric"));
        }
        if r.min.is_none() && r.max.is_none() {
            return fail("range", "give `min`, `max` or both".into());
        }
        if r.min.is_some_and(|v| !v.is_finite()) || r.max.is_some_and(|v| !v.is_finite()) {
            return fail("range", "bounds must be finite numbers".into());
        }
        if let (Some(a), Some(b)) = (r.min, r.max) {
            if a > b {
                return fail("range", format!("min {a} is greater than max {b}"));
            }
        }
        return Some(Op::Range { min: r.min, max: r.max });
    }
    if let Some(c) = &spec.contains {
        if matches!(kind, Kind::Bool | Kind::Number) {
            return fail("contains", format!("{subject} is not text"));
        }
        return Some(Op::Contains(c.clone()));
    }
    if let Some(p) = spec.present {
        return Some(Op::Present(p));
    }
    if let Some(a) = spec.absent {
        return Some(Op::Present(!a));
    }
    unreachable!("exactly one operator was checked by the caller")
}

fn numbers_of(v: &FactValue) -> Option<Vec<f64>> {
    match v {
        FactValue::Number(n) => Some(n.clone()),
        FactValue::Text(t) => t.iter().map(|s| s.trim().parse::<f64>().ok()).collect(),
        FactValue::Bool(_) => None,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

fn equals(value: &FactValue, want: &Scalar) -> bool {
    match (value, want) {
        (FactValue::Bool(a), Scalar::Bool(b)) => a == b,
        (_, Scalar::Number(n)) => numbers_of(value).is_some_and(|v| v.len() == 1 && close(v[0], *n)),
        (FactValue::Text(t), Scalar::Text(s)) => t.join("\\") == *s || (t.len() == 1 && t[0] == *s),
        (FactValue::Number(v), Scalar::Text(s)) => s.parse::<f64>().is_ok_and(|n| v.len() == 1 && close(v[0], n)),
        _ => false,
    }
}

fn test(facts: &SeriesFacts, subject: &Subject, op: &Op) -> (bool, String) {
    let value = match subject {
        Subject::Keyword { tag, .. } => facts.attribute(*tag),
        Subject::Derived(d) => facts.derived(*d),
    };
    let Some(value) = value else {
        return match op {
            Op::Present(want) => (!*want, format!("{subject} is absent")),
            _ => (false, format!("{subject} is absent")),
        };
    };
    let shown = value.to_string();
    match op {
        Op::Present(want) => (*want, format!("{subject} is present ({subject} = {shown})")),
        Op::Equals(s) => {
            let ok = equals(&value, s);
            (ok, format!("{subject} = {shown} {} {s}", if ok { "equals" } else { "does not equal" }))
        }
        Op::OneOf(list) => {
            let ok = list.iter().any(|s| equals(&value, s));
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            (
                ok,
                format!("{subject} = {shown} {} [{}]", if ok { "is one of" } else { "is not one of" }, list.join(", ")),
            )
        }
        Op::Regex(re) => {
            let text = match &value {
                FactValue::Text(t) => t.join("\\"),
                other => other.to_string(),
            };
            let ok = re.is_match(&text);
            (
                ok,
                format!("{subject} = {shown} {} regex {}", if ok { "matched" } else { "did not match" }, re.as_str()),
            )
        }
        Op::Range { min, max } => {
            let bounds = format!(
                "{}..{}",
                min.map(|v| v.to_string()).unwrap_or_default(),
                max.map(|v| v.to_string()).unwrap_or_default()
            );
            match numbers_of(&value) {
                Some(v) if !v.is_empty() => {
                    let ok = v
                        .iter()
                        .all(|x| min.is_none_or(|m| *x >= m - 1e-9) && max.is_none_or(|m| *x <= m + 1e-9));
                    (ok, format!("{subject} = {shown} is {} {bounds}", if ok { "within" } else { "outside" }))
                }
                _ => (false, format!("{subject} = {shown} is not a number")),
            }
        }
        Op::Contains(c) => {
            let ok = matches!(&value, FactValue::Text(t) if t.iter().any(|v| v == c));
            (ok, format!("{subject} = {shown} {} {c}", if ok { "contains" } else { "does not contain" }))
        }
    }
}
