//! One DICOM file as `analyze` and the HTTP route tester read it: the file
//! scan that groups instances into series (`series::scan::collect`),
//! the routing facts and every derived value, the default config's route
//! table on those facts, then the volume `analyze` would build from the
//! file (full read, pixel decode, HU, geometry) and the slice a route picks.
//! Must never panic, hang or allocate without bound.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use biomarker_node::config::Config;
use biomarker_node::routing::{Derived, RouteTable, SeriesFacts};
use biomarker_node::series::scan;
use biomarker_node::volume::{SliceSelection, Volume, VolumeOptions};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/node.yaml"));
        let cfg = Config::load(&path).expect("config/node.yaml loads");
        RouteTable::compile(&cfg).expect("config/node.yaml routes compile")
    })
}

/// libfuzzer-sys aborts on every panic, even one that the code under test
/// catches. `volume::decode` runs the pixel decoders under `catch_unwind`
/// on purpose (some codecs index out of bounds on malformed input; the
/// node turns that into `VolumeError::Decode`), so here a panic is only a
/// crash when it escapes: libfuzzer-sys still aborts on that. Each place
/// that panicked is printed once, so the run's log lists the decoder bugs.
fn panics_abort_only_when_uncaught() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        std::panic::set_hook(Box::new(move |info| {
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            if seen.lock().map(|mut s| s.insert(at.clone())).unwrap_or(true) {
                eprintln!("panic (caught by the node when inside a decoder) at {at}: {info}");
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    panics_abort_only_when_uncaught();
    let table = table();
    let path = common::scratch("in.dcm");
    std::fs::write(&path, data).expect("scratch file is writable");

    // The route tester (http::api::route_test) and `route`/`analyze`.
    let mut notes = Vec::new();
    let found = scan::collect(std::slice::from_ref(&path), &mut notes);
    let _ = scan::summarize(&notes);
    let Some(series) = found.into_iter().next() else { return };
    let Ok(facts) = SeriesFacts::load(&series.instances) else { return };
    for name in Derived::names() {
        if let Some(v) = Derived::parse(name).and_then(|d| facts.derived(d)) {
            let _ = v.to_string();
        }
    }
    let outcomes = table.evaluate(&facts);

    // `analyze` builds the volume of every matched series; build it for
    // every file that routing accepted, matched or not, to reach the decoder.
    let Ok(volume) = Volume::from_files_with(&[path], &VolumeOptions::default()) else { return };
    let mut selections = vec![SliceSelection::Single, SliceSelection::Middle, SliceSelection::Index(0), SliceSelection::AboveAorticArch];
    if let Some(z) = volume.positions.first().map(|p| p[2]) {
        selections.push(SliceSelection::ZMm(z));
    }
    selections.extend(outcomes.into_iter().filter_map(|o| o.matched?.slices));
    for s in &selections {
        if let Ok(i) = volume.select(s) {
            let _ = volume.slice(i).expect("a selected index is in the volume").sum();
        }
    }
});
