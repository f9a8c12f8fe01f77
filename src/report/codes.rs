//! Fixed coded concepts the report uses, with where each comes from.
//!
//! Verified: every DCM, SCT and LN code below was checked in this session
//! against the PS3.16 tables as shipped in pydicom 3.0.2's `codedict`
//! (`codes.DCM.*`, `codes.SCT.*`, `codes.cid7005`) and, for the report
//! skeleton, against a dcmqi TID 1500 (`shared/realct/sr-tid1500-example`).
//! Not standard: the `99BMN` private codes (PS3.16 8.2 private coding
//! scheme); they are declared in the Coding Scheme Identification Sequence.

use super::content::Code;

// TID 1500 Measurement Report, CID 7021.
pub const IMAGING_MEASUREMENT_REPORT: Code =
    Code::fixed("126000", "DCM", "Imaging Measurement Report");
pub const IMAGING_MEASUREMENTS: Code = Code::fixed("126010", "DCM", "Imaging Measurements");
pub const MEASUREMENT_GROUP: Code = Code::fixed("125007", "DCM", "Measurement Group");
pub const PROCEDURE_REPORTED: Code = Code::fixed("121058", "DCM", "Procedure reported");

// TID 1204 Language of Content Item and Descendants. RFC 5646 tag "en"
// (CID 5000 lists language tags by RFC5646).
pub const LANGUAGE_OF_CONTENT: Code =
    Code::fixed("121049", "DCM", "Language of Content Item and Descendants");
pub const ENGLISH: Code = Code::fixed("en", "RFC5646", "English");

// TID 1002 Observer Context / TID 1004 Device Observer Identifying Attributes.
pub const OBSERVER_TYPE: Code = Code::fixed("121005", "DCM", "Observer Type");
pub const DEVICE: Code = Code::fixed("121007", "DCM", "Device");
pub const DEVICE_OBSERVER_UID: Code = Code::fixed("121012", "DCM", "Device Observer UID");
pub const DEVICE_OBSERVER_NAME: Code = Code::fixed("121013", "DCM", "Device Observer Name");
pub const DEVICE_OBSERVER_MANUFACTURER: Code =
    Code::fixed("121014", "DCM", "Device Observer Manufacturer");
pub const DEVICE_OBSERVER_MODEL_NAME: Code =
    Code::fixed("121015", "DCM", "Device Observer Model Name");

// TID 1600 Image Library.
pub const IMAGE_LIBRARY: Code = Code::fixed("111028", "DCM", "Image Library");
pub const IMAGE_LIBRARY_GROUP: Code = Code::fixed("126200", "DCM", "Image Library Group");
pub const MODALITY: Code = Code::fixed("121139", "DCM", "Modality");
/// CID 29 Acquisition Modality.
pub const MODALITY_CT: Code = Code::fixed("CT", "DCM", "Computed Tomography");

/// CID 100 Quantitative Diagnostic Imaging Procedures allows SCT procedure
/// codes; this is the generic CT procedure.
pub const COMPUTED_TOMOGRAPHY: Code = Code::fixed("77477000", "SCT", "Computed tomography");

// TID 1501 / TID 4108 tracking, TID 300 finding site.
pub const TRACKING_IDENTIFIER: Code = Code::fixed("112039", "DCM", "Tracking Identifier");
pub const TRACKING_UID: Code = Code::fixed("112040", "DCM", "Tracking Unique Identifier");
pub const FINDING_SITE: Code = Code::fixed("363698007", "SCT", "Finding Site");

// TID 4019 Algorithm Identification.
pub const ALGORITHM_NAME: Code = Code::fixed("111001", "DCM", "Algorithm Name");
pub const ALGORITHM_VERSION: Code = Code::fixed("111003", "DCM", "Algorithm Version");

/// CID 7005 Contributing Equipment Purposes.
pub const PROCESSING_EQUIPMENT: Code = Code::fixed("109102", "DCM", "Processing Equipment");

/// Lesion count for CAC (SCT observable entity).
pub const NUMBER_OF_LESIONS: Code = Code::fixed("246206008", "SCT", "Number of lesions");

// Per-lesion detail (TID 1501 groups, one per CAC lesion).
pub const FINDING: Code = Code::fixed("121071", "DCM", "Finding");
// TID 1411 Volumetric ROI Measurements: the SEG segment measured on.
pub const REFERENCED_SEGMENT: Code = Code::fixed("121191", "DCM", "Referenced Segment");
pub const SOURCE_SERIES_FOR_SEGMENTATION: Code =
    Code::fixed("121232", "DCM", "Source series for segmentation");
pub const SOURCE_OF_MEASUREMENT: Code = Code::fixed("121112", "DCM", "Source of Measurement");
pub const CALCIFIED_ATHEROMATOUS_PLAQUE: Code =
    Code::fixed("29483008", "SCT", "calcified atheromatous plaque");
pub const AREA: Code = Code::fixed("42798000", "SCT", "Area");
pub const ATTENUATION_COEFFICIENT: Code = Code::fixed("112031", "DCM", "Attenuation Coefficient");
pub const DERIVATION: Code = Code::fixed("121401", "DCM", "Derivation");
pub const MAXIMUM: Code = Code::fixed("56851009", "SCT", "Maximum");
pub const UNIT_MM2: Code = Code::fixed("mm2", "UCUM", "square millimeter");
pub const UNIT_HU: Code = Code::fixed("[hnsf'U]", "UCUM", "Hounsfield unit");
// A tumour burden over a volume (route `slices: all`). Volume is
// pydicom 3.0.2 codedict SCT.Volume (CID 7472 Volume Measurement). The unit
// is UCUM `ml` as DICOM's unit tables write milliliters (e.g. CID 7181,
// 7462); pydicom's codedict has no keyword for it (it lists `cm3`).
pub const VOLUME: Code = Code::fixed("118565006", "SCT", "Volume");
pub const UNIT_ML: Code = Code::fixed("ml", "UCUM", "milliliter");

// Calcium scoring (TID 300 rows in the CAC measurement groups). The score
// concept itself comes from the model card: models/cac.yaml uses
// (450360000, SCT, "Coronary artery calcium score"), CID 6142.
/// TID 300 row 2 concept name; value from the template's $Method.
pub const MEASUREMENT_METHOD: Code = Code::fixed("370129005", "SCT", "Measurement Method");
/// CID 6140 Calculation Method.
pub const AGATSTON_SCORING_METHOD: Code = Code::fixed("112055", "DCM", "Agatston scoring method");

/// Private scheme of this node (PS3.16 8.2: "99" prefix).
pub const PRIVATE_SCHEME: &str = "99BMN";
pub const PRIVATE_SCHEME_NAME: &str = "biomarker-node private codes";

/// CAC risk category as a qualitative evaluation (TID 1501 row 13, CODE).
/// PS3.16 has no concept for the Agatston band and no value set for the
/// 0 / 1-10 / 11-100 / 101-400 / >400 bands (checked: CID 3118 Level of
/// Risk, CID 3716 Severity, CID 6140, CID 6142, CID 7041/7042; see
/// docs/CONFORMANCE.md), so both name and values stay private.
pub const CAC_RISK_CATEGORY: Code = Code::fixed(
    "CAC-RISK",
    PRIVATE_SCHEME,
    "Coronary artery calcium risk category",
);

/// UCUM units (PS3.16 CID 7181 style: the UCUM expression is the value).
pub const UNIT_LESIONS: Code = Code::fixed("{lesions}", "UCUM", "lesions");

/// CID 7202 Source Image Purposes of Reference: a derived image (overlay,
/// segmentation frame) names the slice it was computed from.
pub const SOURCE_FOR_PROCESSING: Code = Code::fixed("121322", "DCM", "Source image for image processing operation");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_code_passes_the_boundary_checks() {
        for c in [
            IMAGING_MEASUREMENT_REPORT,
            IMAGING_MEASUREMENTS,
            MEASUREMENT_GROUP,
            PROCEDURE_REPORTED,
            LANGUAGE_OF_CONTENT,
            ENGLISH,
            OBSERVER_TYPE,
            DEVICE,
            DEVICE_OBSERVER_UID,
            DEVICE_OBSERVER_NAME,
            DEVICE_OBSERVER_MANUFACTURER,
            DEVICE_OBSERVER_MODEL_NAME,
            IMAGE_LIBRARY,
            IMAGE_LIBRARY_GROUP,
            MODALITY,
            MODALITY_CT,
            COMPUTED_TOMOGRAPHY,
            TRACKING_IDENTIFIER,
            TRACKING_UID,
            FINDING_SITE,
            ALGORITHM_NAME,
            ALGORITHM_VERSION,
            PROCESSING_EQUIPMENT,
            NUMBER_OF_LESIONS,
            CAC_RISK_CATEGORY,
            UNIT_LESIONS,
            FINDING,
            SOURCE_OF_MEASUREMENT,
            CALCIFIED_ATHEROMATOUS_PLAQUE,
            AREA,
            ATTENUATION_COEFFICIENT,
            DERIVATION,
            MEASUREMENT_METHOD,
            AGATSTON_SCORING_METHOD,
            MAXIMUM,
            UNIT_MM2,
            UNIT_HU,
        ] {
            Code::new(c.value(), c.scheme(), c.meaning()).unwrap();
        }
    }
}
