//! The checks serde cannot make: value ranges and cross-field rules, each
//! naming the offending key, and the positioned diagnostics they become.
//!
//! Every check runs and every problem is kept, so `check-config` lists all
//! of them at once instead of one per run. Each section is checked here and
//! nowhere else: the stages build from a config that passed, and do not
//! check it again (`outbox::Destination::build` trusts its section).
//! Checks that need the file system, the environment or the DICOM
//! dictionary (TLS files, secrets, route compilation) are the stages' own
//! and run in `node::check`; they report through [`ConfigDiagnostic`] too.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::locate::locate;
use super::{
    Config, ConfigError, ConfigSource, DestinationConfig, OutboxConfig, RetentionConfig, StowAuth, StowRsConfig,
    StowUrl,
};

/// One bad value: its key path (`destinations.pacs.port`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The problems found so far, in the order the checks run.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem::new(key, message));
    }
}

impl Config {
    /// Every problem of the config, or `Ok`; `path` is for the error.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Every problem of the config, in section order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if let Err(m) = check_ae(&self.node.ae_title) {
            p.push("node.ae_title", m);
        }
        outbox(&self.outbox, &mut p);
        for (i, c) in self.node.allowed_callers.iter().enumerate() {
            if let Err(m) = check_ae(&c.ae_title) {
                p.push(format!("node.allowed_callers[{i}].ae_title"), m);
            }
        }
        // PS3.8 D.1: the max length field is 32 bits; below 4 KiB no real peer works.
        if !(4096..=(1 << 24)).contains(&self.node.max_pdu) {
            p.push("node.max_pdu", format!("{} is outside 4096..=16777216", self.node.max_pdu));
        }
        if self.node.max_associations == 0 {
            p.push("node.max_associations", "must be at least 1");
        }
        if self.node.max_pending_connections == 0 {
            p.push("node.max_pending_connections", "must be at least 1");
        }
        if self.node.max_dataset_mb == 0 {
            p.push("node.max_dataset_mb", "must be at least 1");
        }
        if self.series.quiet_seconds.is_nan() || self.series.quiet_seconds <= 0.0 {
            p.push("series.quiet_seconds", "must be positive");
        }
        if !(0.0..1.0).contains(&self.series.spacing_tolerance) {
            p.push("series.spacing_tolerance", "must be in [0, 1)");
        }
        if !(self.jobs.timeout_s > 0.0 && self.jobs.timeout_s.is_finite()) {
            p.push("jobs.timeout_s", "must be a positive number of seconds");
        }
        if self.jobs.max_volume_mb == 0 {
            p.push("jobs.max_volume_mb", "must be at least 1");
        }
        retention(&self.retention, &mut p);
        if let Some(c) = &self.cluster {
            cluster(c, &mut p);
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            p.push("log.format", "must be `text` or `json`");
        }
        for (name, m) in &self.models {
            if m.max_concurrency == 0 {
                p.push(format!("models.{name}.max_concurrency"), "must be at least 1");
            }
        }
        if self.http.enabled && !self.http.listen.ip().is_loopback() && self.http.effective_token().is_none() {
            p.push(
                "http.token",
                format!("required when http.listen ({}) is not a loopback address", self.http.listen),
            );
        }
        for (name, d) in &self.destinations {
            destination(name, d, &mut p);
        }
        if let Some(t) = &self.node.tls {
            if t.plain && t.port == self.node.port && t.port != 0 {
                p.push(
                    "node.tls.port",
                    format!("{} is also node.port; the plain and TLS listeners need their own ports", t.port),
                );
            }
        }
        p.0
    }
}

fn outbox(o: &OutboxConfig, p: &mut Problems) {
    let mut durations_ok = true;
    for (key, v) in [
        ("retry_base_s", o.retry_base_s),
        ("retry_cap_s", o.retry_cap_s),
        ("connect_timeout_s", o.connect_timeout_s),
        ("dimse_timeout_s", o.dimse_timeout_s),
    ] {
        // Also bounds Duration::from_secs_f64, which panics on huge values.
        if !(v > 0.0 && v <= 86_400.0 * 7.0) {
            p.push(format!("outbox.{key}"), format!("{v} is outside (0, 604800] seconds"));
            durations_ok = false;
        }
    }
    // Only meaningful when both are valid durations.
    if durations_ok && o.retry_cap_s < o.retry_base_s {
        p.push("outbox.retry_cap_s", "must be at least retry_base_s");
    }
    if o.max_attempts == 0 {
        p.push("outbox.max_attempts", "must be at least 1");
    }
}

fn cluster(c: &super::ClusterConfig, p: &mut Problems) {
    use super::cluster::{valid_name, valid_subject_prefix};
    if c.nats_url.split(',').any(|u| {
        let u = u.trim();
        !(u.starts_with("nats://") || u.starts_with("tls://")) || u.len() <= "nats://".len()
    }) {
        p.push("cluster.nats_url", format!("`{}` is not a nats:// or tls:// URL (several: comma separated)", c.nats_url));
    }
    if !valid_name(&c.instances_bucket) {
        p.push("cluster.instances_bucket", "must be 1-64 letters, digits, `-` or `_`");
    }
    if !valid_name(&c.instances_stream) {
        p.push("cluster.instances_stream", "must be 1-64 letters, digits, `-` or `_`");
    }
    if !valid_subject_prefix(&c.instances_subject) {
        p.push("cluster.instances_subject", "must be dot-separated tokens of letters, digits, `-` or `_`");
    }
    if !(1..=5).contains(&c.replicas) {
        p.push("cluster.replicas", "must be 1 to 5");
    }
    if !(c.ack_timeout_s > 0.0 && c.ack_timeout_s <= 600.0) {
        p.push("cluster.ack_timeout_s", "must be in (0, 600] seconds");
    }
    for (field, v) in [
        ("cluster.series_bucket", &c.series_bucket),
        ("cluster.jobs_stream", &c.jobs_stream),
        ("cluster.dead_stream", &c.dead_stream),
        ("cluster.outbox_bucket", &c.outbox_bucket),
    ] {
        if !valid_name(v) {
            p.push(field, "must be 1-64 letters, digits, `-` or `_`");
        }
    }
    for (field, v) in [("cluster.jobs_subject", &c.jobs_subject), ("cluster.dead_subject", &c.dead_subject)] {
        if !valid_subject_prefix(v) {
            p.push(field, "must be dot-separated tokens of letters, digits, `-` or `_`");
        }
    }
    if !(c.ack_wait_s >= 1.0 && c.ack_wait_s <= 3600.0) {
        p.push("cluster.ack_wait_s", "must be 1 to 3600 seconds");
    }
    if !(1..=100).contains(&c.max_deliver) {
        p.push("cluster.max_deliver", "must be 1 to 100");
    }
    if !(c.outbox_lease_s >= 1.0 && c.outbox_lease_s <= 3600.0) {
        p.push("cluster.outbox_lease_s", "must be 1 to 3600 seconds");
    }
}

fn retention(r: &RetentionConfig, p: &mut Problems) {
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    if r.after_days.is_some_and(|v| !ok(v)) {
        p.push("retention.after_days", "must be a number of days, 0 or more");
    }
    if r.max_spool_gb.is_some_and(|v| !ok(v)) {
        p.push("retention.max_spool_gb", "must be a number of GB, 0 or more");
    }
    if !(r.interval_s.is_finite() && r.interval_s > 0.0) {
        p.push("retention.interval_s", "must be a positive number of seconds");
    }
}

/// One destination: either C-STORE keys or `stow_rs`, never both.
fn destination(name: &str, d: &DestinationConfig, p: &mut Problems) {
    let key = |k: &str| format!("destinations.{name}.{k}");
    if let Some(s) = &d.stow_rs {
        let given = [
            ("ae_title", !d.ae_title.is_empty()),
            ("host", !d.host.is_empty()),
            ("port", d.port != 0),
            ("tls", d.tls.is_some()),
        ];
        for (k, _) in given.iter().filter(|(_, g)| *g) {
            p.push(key(k), "is for C-STORE; a `stow_rs` destination takes only `stow_rs`");
        }
        stow_rs(name, s, p);
        return;
    }
    // Defaulted for `stow_rs`; missing ones say so here, not as "empty".
    let required = "is required for a C-STORE destination (or give `stow_rs`)";
    if d.ae_title.is_empty() {
        p.push(key("ae_title"), required);
    } else if let Err(m) = check_ae(&d.ae_title) {
        p.push(key("ae_title"), m);
    }
    if d.host.is_empty() {
        p.push(key("host"), required);
    } else if d.host.trim().is_empty() {
        p.push(key("host"), "is empty");
    }
    if d.port == 0 {
        p.push(key("port"), required);
    }
    if let Some(t) = &d.tls {
        if t.certificate.is_some() != t.private_key.is_some() {
            let missing = if t.certificate.is_some() { "private_key" } else { "certificate" };
            p.push(
                key(&format!("tls.{missing}")),
                "client authentication needs both `certificate` and `private_key`",
            );
        }
        if let Some(sn) = &t.server_name {
            if rustls::pki_types::ServerName::try_from(sn.as_str()).is_err() {
                p.push(key("tls.server_name"), format!("`{sn}` is not a DNS name or IP address"));
            }
        }
    }
}

/// The `stow_rs` checks that need no file or environment (those are
/// `outbox::stow::StowTarget::build`'s, when it reads the secrets).
fn stow_rs(name: &str, s: &StowRsConfig, p: &mut Problems) {
    let key = |k: &str| format!("destinations.{name}.stow_rs.{k}");
    match StowUrl::parse(&s.url) {
        Err(m) => p.push(key("url"), m),
        Ok(base) => match (base.https, &s.ca) {
            (true, None) => p.push(key("ca"), "an https URL needs `ca` (PEM roots)"),
            (false, Some(_)) => p.push(key("ca"), "only for an https URL"),
            _ => {}
        },
    }
    let given = |k: &'static str, v: bool| v.then_some(k);
    let basic = [
        given("username", s.username.is_some()),
        given("password_env", s.password_env.is_some()),
        given("password_file", s.password_file.is_some()),
    ];
    let bearer = [given("token_env", s.token_env.is_some()), given("token_file", s.token_file.is_some())];
    match s.auth {
        StowAuth::None => {
            for k in basic.iter().chain(&bearer).flatten() {
                p.push(key(k), "needs `auth: basic` or `auth: bearer`");
            }
        }
        StowAuth::Basic => {
            for k in bearer.iter().flatten() {
                p.push(key(k), "is for `auth: bearer`");
            }
            match &s.username {
                None => p.push(key("username"), "`auth: basic` needs `username`"),
                Some(u) if u.contains(':') => p.push(key("username"), "a basic-auth user name cannot contain `:`"),
                _ => {}
            }
            if s.password_env.is_some() == s.password_file.is_some() {
                p.push(
                    key("password_env"),
                    "`auth: basic` needs exactly one of `password_env` and `password_file`",
                );
            }
        }
        StowAuth::Bearer => {
            for k in basic.iter().flatten() {
                p.push(key(k), "is for `auth: basic`");
            }
            if s.token_env.is_some() == s.token_file.is_some() {
                p.push(key("token_env"), "`auth: bearer` needs exactly one of `token_env` and `token_file`");
            }
        }
    }
}

/// PS3.5 6.2: AE is 1-16 chars of the default repertoire, no backslash or
/// control characters, and not all spaces.
pub fn check_ae(ae: &str) -> Result<(), String> {
    let t = ae.trim();
    if t.is_empty() {
        return Err("AE title is empty".into());
    }
    if ae.len() > 16 {
        return Err(format!("AE title `{ae}` is longer than 16 characters"));
    }
    if ae.chars().any(|c| !c.is_ascii() || c.is_ascii_control() || c == '\\') {
        return Err(format!("AE title `{ae}` has a character outside the AE repertoire"));
    }
    Ok(())
}

/// One problem in a config file, positioned for a human:
/// `path/to/file.yaml:LINE:COL: routes[1].model: unknown model "foo"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigDiagnostic {
    pub file: PathBuf,
    /// 1-based; `None` when the key could not be found in the text.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, e.g. `routes[2].match.all[0].keyword`; empty for a
    /// syntax error.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl ConfigDiagnostic {
    /// A diagnostic for `key`, positioned by finding that key path in the
    /// source text when there is one.
    pub fn at(source: Option<&ConfigSource>, key: &str, message: String) -> ConfigDiagnostic {
        let pos = source.and_then(|s| locate(&s.text, key));
        ConfigDiagnostic {
            file: source.map(|s| s.path.clone()).unwrap_or_default(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            key: key.to_owned(),
            message,
        }
    }
}

impl ConfigError {
    /// The load error as positioned diagnostics: one for a read or syntax
    /// error, one per problem for a config that parsed but is invalid.
    pub fn diagnostics(&self, text: Option<&str>) -> Vec<ConfigDiagnostic> {
        match self {
            ConfigError::Read { path, source } => vec![ConfigDiagnostic {
                file: path.clone(),
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read: {source}"),
            }],
            ConfigError::Parse { path, source } => {
                let loc = source.location();
                let mut message = source.to_string();
                // serde_yaml repeats the position at the end; it is already
                // in front.
                if loc.is_some() {
                    if let Some(i) = message.rfind(" at line ") {
                        message.truncate(i);
                    }
                }
                vec![ConfigDiagnostic {
                    file: path.clone(),
                    line: loc.as_ref().map(|l| l.line()),
                    column: loc.as_ref().map(|l| l.column()),
                    key: String::new(),
                    message,
                }]
            }
            ConfigError::Invalid { path, problems } => problems
                .iter()
                .map(|p| {
                    let pos = text.and_then(|t| locate(t, &p.key));
                    ConfigDiagnostic {
                        file: path.clone(),
                        line: pos.map(|p| p.0),
                        column: pos.map(|p| p.1),
                        key: p.key.clone(),
                        message: p.message.clone(),
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "node:\n  ae_title: BIOMARKER\n  data_dir: data\n";

    fn keys(y: &str) -> Vec<String> {
        match Config::parse(y, Path::new("t.yaml")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems.into_iter().map(|p| p.key).collect(),
            Err(e) => panic!("{y}: not a validation error: {e}"),
        }
    }

    #[test]
    fn two_independent_errors_are_both_reported_with_their_positions() {
        let y = "node:\n  ae_title: ABCDEFGHIJKLMNOPQ\n  data_dir: d\n  max_pdu: 100\nseries:\n  quiet_seconds: 0\n";
        let e = Config::parse(y, Path::new("t.yaml")).unwrap_err();
        let d: Vec<String> = e.diagnostics(Some(y)).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            d,
            [
                "t.yaml:2:3: node.ae_title: AE title `ABCDEFGHIJKLMNOPQ` is longer than 16 characters",
                "t.yaml:4:3: node.max_pdu: 100 is outside 4096..=16777216",
                "t.yaml:6:3: series.quiet_seconds: must be positive",
            ]
        );
        // The error's own text lists them all too (what `serve` prints).
        let text = e.to_string();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.starts_with("t.yaml: `node.ae_title`: AE title"), "{text}");
    }

    #[test]
    fn long_ae_is_refused_with_key() {
        let y = "node:\n  ae_title: ABCDEFGHIJKLMNOPQ\n  data_dir: d\n";
        let e = Config::parse(y, Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains("node.ae_title"), "{e}");
    }

    #[test]
    fn tls_mistakes_name_their_key() {
        let cases = [
            (format!("{MIN}  port: 2762\n  tls: {{certificate: a, private_key: b}}\n"), "node.tls.port"),
            (
                format!("{MIN}destinations:\n  pacs: {{ae_title: P, host: h, port: 1, tls: {{ca: c, certificate: x}}}}\n"),
                "destinations.pacs.tls.private_key",
            ),
            (
                format!("{MIN}destinations:\n  pacs: {{ae_title: P, host: h, port: 1, tls: {{ca: c, server_name: 'a b'}}}}\n"),
                "destinations.pacs.tls.server_name",
            ),
        ];
        for (y, key) in cases {
            assert_eq!(keys(&y), [key], "{y}");
        }
        let y = format!("{MIN}  tls: {{certificate: a, private_key: b, colour: red}}\n");
        let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{y}: {e}");
        // TLS-only on the plain port is fine: there is one listener.
        let y = format!("{MIN}  port: 2762\n  tls: {{certificate: a, private_key: b, plain: false}}\n");
        Config::parse(&y, Path::new("t.yaml")).unwrap();
    }

    #[test]
    fn destination_mistakes_name_their_key() {
        let cases: [(&str, &[&str]); 11] = [
            ("{stow_rs: {url: 'http://h/'}, host: h}", &["destinations.web.host"]),
            ("{stow_rs: {url: 'http://h/'}, ae_title: P}", &["destinations.web.ae_title"]),
            (
                "{stow_rs: {url: 'http://h/'}, ae_title: P, port: 104}",
                &["destinations.web.ae_title", "destinations.web.port"],
            ),
            ("{stow_rs: {url: 'http://h/', auth: basic}}", &["destinations.web.stow_rs.username", "destinations.web.stow_rs.password_env"]),
            ("{stow_rs: {url: 'h/x'}}", &["destinations.web.stow_rs.url"]),
            ("{host: h, port: 104}", &["destinations.web.ae_title"]),
            ("{ae_title: P, port: 104}", &["destinations.web.host"]),
            ("{ae_title: P, host: ' ', port: 104}", &["destinations.web.host"]),
            ("{ae_title: ABCDEFGHIJKLMNOPQ, host: h}", &["destinations.web.ae_title", "destinations.web.port"]),
            ("{ae_title: 'A\\B', host: h, port: 1}", &["destinations.web.ae_title"]),
            ("{ae_title: PACS, host: pacs.local, port: 104}", &[]),
        ];
        for (d, want) in cases {
            let y = format!("{MIN}destinations:\n  web: {d}\n");
            assert_eq!(keys(&y), want, "{y}");
        }
        let y = format!("{MIN}destinations:\n  web: {{stow_rs: {{url: 'http://h/', colour: red}}}}\n");
        let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{y}: {e}");
    }

    #[test]
    fn stow_rs_mistakes_name_their_key() {
        for (y, key) in [
            ("url: ftp://x/", "url"),
            ("url: 'http://u:p@x/'", "url"),
            ("url: https://x/dicom-web", "ca"),
            ("{url: http://x/, ca: c.pem}", "ca"),
            ("{url: http://x/, username: u}", "username"),
            ("{url: http://x/, auth: basic, password_env: P}", "username"),
            ("{url: http://x/, auth: basic, username: u}", "password_env"),
            ("{url: http://x/, auth: basic, username: u, password_env: P, password_file: f}", "password_env"),
            ("{url: http://x/, auth: bearer}", "token_env"),
            ("{url: http://x/, auth: bearer, token_env: T, username: u}", "username"),
        ] {
            let s: StowRsConfig = serde_yaml::from_str(y).unwrap();
            let mut p = Problems::default();
            stow_rs("web", &s, &mut p);
            let got: Vec<String> = p.0.into_iter().map(|p| p.key).collect();
            assert_eq!(got, [format!("destinations.web.stow_rs.{key}")], "{y}");
        }
        let s: StowRsConfig =
            serde_yaml::from_str("{url: 'http://127.0.0.1:8042/dicom-web/', auth: basic, username: u, password_file: p}")
                .unwrap();
        let mut p = Problems::default();
        stow_rs("web", &s, &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
    }

    #[test]
    fn outbox_ranges_are_checked() {
        let c: OutboxConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, OutboxConfig::default());
        assert_eq!((c.retry_base_s, c.retry_cap_s, c.max_attempts), (2.0, 300.0, 10));
        assert!(serde_yaml::from_str::<OutboxConfig>("retry_bsae_s: 1").is_err());
        let check = |o: OutboxConfig| {
            let mut p = Problems::default();
            outbox(&o, &mut p);
            p.0.into_iter().map(|p| p.key).collect::<Vec<_>>()
        };
        assert!(check(c.clone()).is_empty());
        assert_eq!(check(OutboxConfig { retry_cap_s: 1.0, ..c.clone() }), ["outbox.retry_cap_s"]);
        assert_eq!(check(OutboxConfig { dimse_timeout_s: f64::NAN, ..c.clone() }), ["outbox.dimse_timeout_s"]);
        assert_eq!(
            check(OutboxConfig { retry_base_s: -1.0, max_attempts: 0, ..c }),
            ["outbox.retry_base_s", "outbox.max_attempts"]
        );
        let y = format!("{MIN}outbox:\n  max_attempts: 0\n");
        assert_eq!(keys(&y), ["outbox.max_attempts"]);
    }

    #[test]
    fn check_file_reports_a_missing_stow_secret_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        let y = format!(
            "{MIN}destinations:\n  web:\n    stow_rs:\n      url: http://h/dicom-web\n      auth: basic\n      \
             username: u\n      password_env: BMN_CONFIG_TEST_UNSET_PW_41\n"
        );
        std::fs::write(&p, y).unwrap();
        let diags = crate::node::check::check_file(&p).unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].key, "destinations.web.stow_rs.password_env");
        assert_eq!(diags[0].line, Some(10), "{diags:?}");
        assert!(diags[0].message.contains("BMN_CONFIG_TEST_UNSET_PW_41"));
    }

    #[test]
    fn check_file_reports_unreadable_tls_files_at_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        std::fs::write(&p, format!("{MIN}  tls:\n    certificate: nope.pem\n    private_key: nope.key\n")).unwrap();
        let diags = crate::node::check::check_file(&p).unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].key, "node.tls.certificate");
        assert_eq!(diags[0].line, Some(5), "{diags:?}");
    }

    #[test]
    fn check_file_reports_every_validation_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        std::fs::write(&p, format!("{MIN}  max_associations: 0\nlog:\n  format: xml\n")).unwrap();
        let diags = crate::node::check::check_file(&p).unwrap_err();
        let got: Vec<_> = diags.iter().map(|d| (d.key.as_str(), d.line)).collect();
        assert_eq!(got, [("node.max_associations", Some(4)), ("log.format", Some(6))], "{diags:?}");
    }

    #[test]
    fn bad_destination_ae_names_the_key_and_line() {
        let y = format!("{MIN}destinations:\n  pacs:\n    ae_title: ABCDEFGHIJKLMNOPQ\n    host: h\n    port: 1\n");
        let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
        let d = e.diagnostics(Some(&y));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_string().split(": ").next(), Some("t.yaml:6:5"), "{}", d[0]);
        assert_eq!(d[0].key, "destinations.pacs.ae_title");
    }

    #[test]
    fn parse_error_carries_its_position() {
        let y = format!("{MIN}routes:\n  - name: a\n    colour: red\n");
        let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
        let d = &e.diagnostics(Some(&y))[0];
        assert_eq!(d.line, Some(6), "{d}");
        assert!(d.to_string().starts_with("t.yaml:6:5: routes[0]: unknown field `colour`"), "{d}");
        assert!(!d.message.contains("at line"), "{d}");
    }
}
