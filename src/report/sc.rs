//! stub
pub struct ScOptions;
pub fn build_sc() {}
