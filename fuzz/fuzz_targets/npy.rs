//! The `.npy` reader (golden set, maps, training exchange).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = biomarker_node::npy::parse_f64(data) {
        // The shape the reader returned must describe the values it holds.
        assert_eq!(a.len(), a.shape().iter().product::<usize>());
    }
});
