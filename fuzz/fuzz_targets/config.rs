//! The YAML config as `check-config` (and a SIGHUP/API reload) reads it:
//! parse, validate, compile the route table, and position every diagnostic
//! in the text. File-system checks that need real files (TLS certificates,
//! model cards) are left to their own tests; a card path only gets a stat.
#![no_main]
use std::path::Path;

use biomarker_node::config::Config;
use biomarker_node::routing::RouteTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/nonexistent/fuzz/node.yaml");
    match Config::parse(text, path) {
        Err(e) => {
            for d in e.diagnostics(Some(text)) {
                let _ = d.to_string();
            }
        }
        Ok(cfg) => {
            if let Err(diags) = RouteTable::compile(&cfg) {
                for d in diags {
                    let _ = d.to_string();
                }
            }
        }
    }
});
