//! PDU stream → framing → dicom-ul PDU parse → negotiation → PDV assembly →
//! DIMSE command decode → dataset parse. Must never panic or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = biomarker_node::ingest::harness::drive(data, 16384);
});
