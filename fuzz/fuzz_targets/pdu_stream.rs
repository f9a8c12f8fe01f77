//! PDU stream → framing → dicom-ul PDU parse → negotiation → PDV assembly →
//! DIMSE command decode → the spool's dataset check (for Deflated Explicit
//! VR LE: capped inflate, then the length walk) → dataset parse. Must never
//! panic, hang or allocate past the harness's dataset limit; the deflated_*
//! and deflate_* seeds lead it into the inflate path.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = biomarker_node::ingest::harness::drive(data, 16384);
});
