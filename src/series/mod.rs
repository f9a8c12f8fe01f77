//! Series tracker — interface stub until the tracker branch merges.
use std::path::PathBuf;

use crate::dicom::header::InstanceHeader;

pub struct StoredInstance {
    pub header: InstanceHeader,
    pub rel_path: PathBuf,
    pub transfer_syntax: String,
    pub size_bytes: u64,
    pub association_id: u64,
    pub calling_ae: String,
}

#[derive(Debug, thiserror::Error)]
#[error("series tracker unavailable")]
pub struct SeriesError;

#[derive(Clone)]
pub struct TrackerHandle;

impl TrackerHandle {
    pub async fn instance_stored(&self, _inst: StoredInstance) -> Result<(), SeriesError> {
        Ok(())
    }
    pub async fn association_released(&self, _id: u64) {}
    pub async fn association_aborted(&self, _id: u64) {}
}
