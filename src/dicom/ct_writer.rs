//! CT Image Storage instances written from HU arrays (PS3.3 A.3, CT Image IOD).
//!
//! Input: one [`CtSeriesSpec`] (patient, study, series, frame of reference,
//! equipment and pixel encoding, shared by every slice) and, per slice, a
//! [`CtSliceSpec`] (SOP instance UID, instance number, position and HU).
//! Output: a Part 10 file in explicit VR little endian with a file meta group.
//!
//! Invariants: stored values map back to HU exactly through
//! `HU = raw * RescaleSlope + RescaleIntercept` with slope 1 and intercept
//! 0 (signed) or -1024 (unsigned); HU outside what the encoding can carry is
//! clamped, which the phantom generator avoids by construction. The
//! orientation is always axial (1\0\0\0\1\0), so InstanceNumber order is
//! position order along the normal when the caller numbers by ascending z.
//!
//! Failure modes: an I/O or encoding error from dicom-object; nothing else.

use std::path::Path;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

/// Attributes shared by every slice of a series.
#[derive(Debug, Clone)]
pub struct CtSeriesSpec {
    pub patient_name: String,
    pub patient_id: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub frame_of_reference_uid: String,
    pub study_id: String,
    pub accession_number: String,
    /// DA, YYYYMMDD.
    pub study_date: String,
    /// TM, HHMMSS.
    pub study_time: String,
    pub series_number: i32,
    pub series_description: String,
    pub body_part_examined: String,
    pub rows: u16,
    pub columns: u16,
    /// PixelSpacing: between rows, between columns (mm).
    pub pixel_spacing: [f64; 2],
    pub slice_thickness: f64,
    pub kvp: f64,
    pub tube_current_ma: i32,
    pub convolution_kernel: String,
    /// Total number of slices (ImagesInAcquisition).
    pub images_in_acquisition: u32,
    /// PixelRepresentation 1 (two's complement, intercept 0) or 0 (unsigned,
    /// intercept -1024).
    pub signed: bool,
    /// HU that marks pixels outside the reconstruction circle; written as
    /// PixelPaddingValue in the stored (raw) domain.
    pub padding_hu: Option<i32>,
    pub window_center: f64,
    pub window_width: f64,
}

/// One slice.
#[derive(Debug, Clone)]
pub struct CtSliceSpec<'a> {
    pub sop_instance_uid: String,
    pub instance_number: i32,
    /// ImagePositionPatient: centre of the first pixel, patient mm (LPS).
    pub position: [f64; 3],
    /// Row-major HU, rows × columns.
    pub hu: &'a [i16],
}

#[derive(Debug, thiserror::Error)]
pub enum CtWriteError {
    #[error("slice has {got} pixels, the series geometry needs {want}")]
    PixelCount { got: usize, want: usize },
    #[error("building the file meta group: {0}")]
    Meta(String),
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
}

impl CtSeriesSpec {
    /// RescaleIntercept that goes with the pixel representation.
    pub fn rescale_intercept(&self) -> i32 {
        if self.signed {
            0
        } else {
            -1024
        }
    }

    /// HU to the stored value (as the 16 bits that go on disk).
    fn raw(&self, hu: i32) -> u16 {
        let v = hu - self.rescale_intercept();
        if self.signed {
            v.clamp(i16::MIN as i32, i16::MAX as i32) as i16 as u16
        } else {
            v.clamp(0, u16::MAX as i32) as u16
        }
    }
}

/// Decimal String (PS3.5 6.2, at most 16 bytes): fixed precision, trailing
/// zeros trimmed.
pub fn ds(v: f64) -> String {
    for prec in (0..=6).rev() {
        let s = format!("{v:.prec$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        };
        let s = if s == "-0" { "0".to_owned() } else { s };
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{v:.0}")
}

fn ds_multi(vs: &[f64]) -> String {
    vs.iter().map(|v| ds(*v)).collect::<Vec<_>>().join("\\")
}

fn put_str(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}

/// Writes one CT Image Storage file.
pub fn write_ct_slice(
    path: &Path,
    series: &CtSeriesSpec,
    slice: &CtSliceSpec<'_>,
) -> Result<(), CtWriteError> {
    let want = series.rows as usize * series.columns as usize;
    if slice.hu.len() != want {
        return Err(CtWriteError::PixelCount {
            got: slice.hu.len(),
            want,
        });
    }
    let mut o = InMemDicomObject::new_empty();
    // SOP Common (C.12.1)
    put_str(&mut o, tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE);
    put_str(&mut o, tags::SOP_INSTANCE_UID, VR::UI, &slice.sop_instance_uid);
    // Patient (C.7.1.1)
    put_str(&mut o, tags::PATIENT_NAME, VR::PN, &series.patient_name);
    put_str(&mut o, tags::PATIENT_ID, VR::LO, &series.patient_id);
    put_str(&mut o, tags::PATIENT_BIRTH_DATE, VR::DA, "");
    put_str(&mut o, tags::PATIENT_SEX, VR::CS, "O");
    // General Study (C.7.2.1)
    put_str(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, &series.study_instance_uid);
    put_str(&mut o, tags::STUDY_DATE, VR::DA, &series.study_date);
    put_str(&mut o, tags::STUDY_TIME, VR::TM, &series.study_time);
    put_str(&mut o, tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
    put_str(&mut o, tags::STUDY_ID, VR::SH, &series.study_id);
    put_str(&mut o, tags::ACCESSION_NUMBER, VR::SH, &series.accession_number);
    put_str(&mut o, tags::STUDY_DESCRIPTION, VR::LO, "Synthetic phantom");
    // General Series (C.7.3.1)
    put_str(&mut o, tags::MODALITY, VR::CS, "CT");
    put_str(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, &series.series_instance_uid);
    o.put(DataElement::new(
        tags::SERIES_NUMBER,
        VR::IS,
        PrimitiveValue::from(series.series_number.to_string()),
    ));
    put_str(&mut o, tags::SERIES_DESCRIPTION, VR::LO, &series.series_description);
    put_str(&mut o, tags::BODY_PART_EXAMINED, VR::CS, &series.body_part_examined);
    put_str(&mut o, tags::PATIENT_POSITION, VR::CS, "HFS");
    put_str(&mut o, tags::SERIES_DATE, VR::DA, &series.study_date);
    put_str(&mut o, tags::SERIES_TIME, VR::TM, &series.study_time);
    // Frame of Reference (C.7.4.1)
    put_str(&mut o, tags::FRAME_OF_REFERENCE_UID, VR::UI, &series.frame_of_reference_uid);
    put_str(&mut o, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
    // General Equipment (C.7.5.1)
    put_str(&mut o, tags::MANUFACTURER, VR::LO, "biomarker-node phantom");
    put_str(&mut o, tags::MANUFACTURER_MODEL_NAME, VR::LO, "phantom");
    put_str(&mut o, tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION"));
    if let Some(p) = series.padding_hu {
        let raw = series.raw(p);
        if series.signed {
            o.put(DataElement::new(
                tags::PIXEL_PADDING_VALUE,
                VR::SS,
                PrimitiveValue::I16(smallvec_of(raw as i16)),
            ));
        } else {
            o.put(DataElement::new(
                tags::PIXEL_PADDING_VALUE,
                VR::US,
                PrimitiveValue::U16(smallvec_of(raw)),
            ));
        }
    }
    // General Acquisition / General Image (C.7.6.1)
    o.put(DataElement::new(
        tags::ACQUISITION_NUMBER,
        VR::IS,
        PrimitiveValue::from("1"),
    ));
    o.put(DataElement::new(
        tags::INSTANCE_NUMBER,
        VR::IS,
        PrimitiveValue::from(slice.instance_number.to_string()),
    ));
    o.put(DataElement::new(
        tags::IMAGES_IN_ACQUISITION,
        VR::IS,
        PrimitiveValue::from(series.images_in_acquisition.to_string()),
    ));
    put_str(&mut o, tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL");
    put_str(&mut o, tags::CONTENT_DATE, VR::DA, &series.study_date);
    put_str(&mut o, tags::CONTENT_TIME, VR::TM, &series.study_time);
    put_str(&mut o, tags::ACQUISITION_DATE, VR::DA, &series.study_date);
    put_str(&mut o, tags::ACQUISITION_TIME, VR::TM, &series.study_time);
    put_str(&mut o, tags::BURNED_IN_ANNOTATION, VR::CS, "NO");
    // Image Plane (C.7.6.2)
    put_str(
        &mut o,
        tags::PIXEL_SPACING,
        VR::DS,
        &ds_multi(&series.pixel_spacing),
    );
    put_str(&mut o, tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0");
    put_str(&mut o, tags::IMAGE_POSITION_PATIENT, VR::DS, &ds_multi(&slice.position));
    put_str(&mut o, tags::SLICE_THICKNESS, VR::DS, &ds(series.slice_thickness));
    put_str(&mut o, tags::SLICE_LOCATION, VR::DS, &ds(slice.position[2]));
    // Image Pixel (C.7.6.3) and CT Image (C.8.2.1)
    o.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)));
    put_str(&mut o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(series.rows)));
    o.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(series.columns)));
    o.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)));
    o.put(DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16)));
    o.put(DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)));
    o.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(u16::from(series.signed)),
    ));
    put_str(
        &mut o,
        tags::RESCALE_INTERCEPT,
        VR::DS,
        &series.rescale_intercept().to_string(),
    );
    put_str(&mut o, tags::RESCALE_SLOPE, VR::DS, "1");
    put_str(&mut o, tags::RESCALE_TYPE, VR::LO, "HU");
    put_str(&mut o, tags::WINDOW_CENTER, VR::DS, &ds(series.window_center));
    put_str(&mut o, tags::WINDOW_WIDTH, VR::DS, &ds(series.window_width));
    put_str(&mut o, tags::KVP, VR::DS, &ds(series.kvp));
    o.put(DataElement::new(
        tags::X_RAY_TUBE_CURRENT,
        VR::IS,
        PrimitiveValue::from(series.tube_current_ma.to_string()),
    ));
    put_str(&mut o, tags::CONVOLUTION_KERNEL, VR::SH, &series.convolution_kernel);
    let fov = series.pixel_spacing[1] * series.columns as f64;
    put_str(&mut o, tags::RECONSTRUCTION_DIAMETER, VR::DS, &ds(fov));
    let mut bytes = Vec::with_capacity(want * 2);
    for &h in slice.hu {
        bytes.extend_from_slice(&series.raw(h as i32).to_le_bytes());
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U8(bytes.into()),
    ));

    let file = o
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_version_name("BIOMARKERNODE"),
        )
        .map_err(|e| CtWriteError::Meta(e.to_string()))?;
    file.write_to_file(path).map_err(|e| CtWriteError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn smallvec_of<T: Clone>(v: T) -> dicom_core::value::C<T> {
    std::iter::once(v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ds_fits_sixteen_bytes() {
        assert_eq!(ds(0.703125), "0.703125");
        assert_eq!(ds(-180.1234567891), "-180.123457");
        assert_eq!(ds(3.0), "3");
        assert!(ds(-123456.123456789).len() <= 16);
    }
}
