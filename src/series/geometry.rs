//! "Geometrically whole": the test that lets a series complete as soon as its
//! association is released instead of waiting for the quiet timer.
//!
//! Geometry comes from the Image Plane module (PS3.3 C.7.6.2). A series passes
//! when its slices form one evenly spaced stack with nothing missing. A false
//! "whole" is the costly error (an analysis of half a series), so anything
//! unusual (localizers mixed in, two acquisitions over the same positions,
//! several multi-frame instances) is *not whole* and left to the quiet timer,
//! which is always correct, merely slower.

use std::fmt;

use crate::dicom::header::InstanceHeader;
use crate::dicom::Uid;

/// Largest angle between two slice normals still called parallel.
///
/// Scanners write ImageOrientationPatient with ~6 decimals, so rounding alone
/// stays below 1e-5 rad; a gantry tilt or a second stack differs by degrees.
/// 1e-3 rad (0.06°) keeps well clear of both.
pub const MAX_NORMAL_ANGLE_RAD: f64 = 1e-3;

/// Two slices whose positions along the normal differ by less than this are
/// at the same position. Thin CT slices are ≥ 0.1 mm apart.
pub const SAME_POSITION_MM: f64 = 1e-3;

/// Absolute slack added to the relative spacing tolerance, so that a
/// tolerance of 0 still accepts positions written as rounded decimal strings.
const SPACING_SLACK_MM: f64 = 1e-4;

/// Why a set of instances is not (yet) a whole series.
#[derive(Debug, Clone, PartialEq)]
pub enum NotWhole {
    Empty,
    /// An instance lacks ImagePositionPatient / ImageOrientationPatient.
    NoGeometry {
        sop: Uid,
    },
    /// ImageOrientationPatient whose row and column cosines are collinear.
    DegenerateOrientation {
        sop: Uid,
    },
    NotParallel {
        sop: Uid,
        angle_rad: f64,
    },
    DuplicatePosition {
        position_mm: f64,
    },
    UnevenSpacing {
        expected_mm: f64,
        found_mm: f64,
    },
    CountMismatch {
        expected: u32,
        got: u32,
    },
    /// Multi-frame instances are whole only alone (one Enhanced CT instance);
    /// their per-frame geometry is not in the header summary.
    MultiFrameInSet {
        sop: Uid,
    },
}

impl fmt::Display for NotWhole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotWhole::Empty => f.write_str("no instances"),
            NotWhole::NoGeometry { sop } => {
                write!(f, "instance {sop} has no image position/orientation")
            }
            NotWhole::DegenerateOrientation { sop } => {
                write!(f, "instance {sop} has a degenerate image orientation")
            }
            NotWhole::NotParallel { sop, angle_rad } => write!(
                f,
                "instance {sop} is tilted {angle_rad:.4} rad from the first slice \
                 (limit {MAX_NORMAL_ANGLE_RAD} rad)"
            ),
            NotWhole::DuplicatePosition { position_mm } => {
                write!(f, "two slices at {position_mm:.3} mm along the normal")
            }
            NotWhole::UnevenSpacing {
                expected_mm,
                found_mm,
            } => write!(
                f,
                "slice gap of {found_mm:.3} mm where the median gap is {expected_mm:.3} mm \
                 (missing or extra slice)"
            ),
            NotWhole::CountMismatch { expected, got } => write!(
                f,
                "ImagesInAcquisition says {expected} images, {got} received"
            ),
            NotWhole::MultiFrameInSet { sop } => {
                write!(f, "multi-frame instance {sop} is one of several instances")
            }
        }
    }
}

/// Whether `headers` form a complete, evenly spaced stack of parallel slices.
///
/// Rules, in the order checked:
/// 1. at least one instance;
/// 2. a single multi-frame instance (NumberOfFrames > 1, e.g. Enhanced CT) is
///    whole; a multi-frame instance among others is not;
/// 3. every instance has geometry with a usable orientation;
/// 4. a single slice is whole unless ImagesInAcquisition > 1;
/// 5. all normals within [`MAX_NORMAL_ANGLE_RAD`] of the first (antiparallel
///    counts as parallel: the planes are the same);
/// 6. positions projected on the first normal, sorted, are distinct
///    ([`SAME_POSITION_MM`]);
/// 7. every gap is within `spacing_tolerance` (relative) of the median gap,
///    so one missing slice (a 2× gap) fails;
/// 8. every ImagesInAcquisition present equals the number of instances
///    (catches a missing first or last slice, which rule 7 cannot see).
pub fn check_whole(headers: &[&InstanceHeader], spacing_tolerance: f64) -> Result<(), NotWhole> {
    if headers.is_empty() {
        return Err(NotWhole::Empty);
    }
    if let Some(mf) = headers
        .iter()
        .find(|h| h.number_of_frames.is_some_and(|n| n > 1))
    {
        return if headers.len() == 1 {
            Ok(())
        } else {
            Err(NotWhole::MultiFrameInSet {
                sop: mf.sop_instance_uid.clone(),
            })
        };
    }
    let mut slices = Vec::with_capacity(headers.len());
    for h in headers {
        let g = h.geometry.as_ref().ok_or_else(|| NotWhole::NoGeometry {
            sop: h.sop_instance_uid.clone(),
        })?;
        let n = g.normal();
        if norm(n) < 0.5 {
            // normal() leaves a zero vector unnormalised; anything between
            // 0 and 1 means the cosines were not unit vectors to begin with.
            return Err(NotWhole::DegenerateOrientation {
                sop: h.sop_instance_uid.clone(),
            });
        }
        slices.push((*h, g.position, n));
    }
    let got = u32::try_from(headers.len()).unwrap_or(u32::MAX);
    let count_check = || match headers
        .iter()
        .filter_map(|h| h.images_in_acquisition)
        .find(|&n| n != got)
    {
        Some(expected) => Err(NotWhole::CountMismatch { expected, got }),
        None => Ok(()),
    };
    if slices.len() == 1 {
        return count_check();
    }

    let n0 = slices[0].2;
    for (h, _, n) in &slices[1..] {
        let angle = norm(cross(n0, *n)).atan2(dot(n0, *n).abs());
        if angle > MAX_NORMAL_ANGLE_RAD {
            return Err(NotWhole::NotParallel {
                sop: h.sop_instance_uid.clone(),
                angle_rad: angle,
            });
        }
    }

    let mut along: Vec<f64> = slices.iter().map(|(_, p, _)| dot(*p, n0)).collect();
    along.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
    if let Some(i) = gaps.iter().position(|&g| g < SAME_POSITION_MM) {
        return Err(NotWhole::DuplicatePosition {
            position_mm: along[i],
        });
    }
    let median = median(&gaps);
    let allowed = spacing_tolerance * median + SPACING_SLACK_MM;
    if let Some(&bad) = gaps.iter().find(|&&g| (g - median).abs() > allowed) {
        return Err(NotWhole::UnevenSpacing {
            expected_mm: median,
            found_mm: bad,
        });
    }
    count_check()
}

fn median(sorted_or_not: &[f64]) -> f64 {
    let mut v = sorted_or_not.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dicom::header::SliceGeometry;

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    /// A CT slice of series `series` at z = `z` mm (axial).
    pub(crate) fn slice(series: &str, i: u32, z: f64) -> InstanceHeader {
        InstanceHeader {
            sop_class_uid: Uid::parse("1.2.840.10008.5.1.4.1.1.2").unwrap(),
            sop_instance_uid: Uid::parse(&format!("{series}.{i}")).unwrap(),
            study_instance_uid: Uid::parse("1.2.826.0.1.99").unwrap(),
            series_instance_uid: Uid::parse(series).unwrap(),
            modality: Some("CT".into()),
            instance_number: Some(i as i32),
            acquisition_number: Some(1),
            images_in_acquisition: None,
            number_of_frames: None,
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            series_description: Some("Chest 1.0".into()),
            geometry: Some(SliceGeometry {
                position: [-200.0, -200.0, z],
                orientation: AXIAL,
                pixel_spacing: Some([0.7, 0.7]),
                slice_thickness: Some(1.0),
                rows: Some(512),
                columns: Some(512),
            }),
        }
    }

    /// Slices at 0, 2.5, 5, … for each index in `present`.
    pub(crate) fn stack(
        series: &str,
        present: impl IntoIterator<Item = u32>,
    ) -> Vec<InstanceHeader> {
        present
            .into_iter()
            .map(|i| slice(series, i + 1, i as f64 * 2.5))
            .collect()
    }

    fn check(v: &[InstanceHeader]) -> Result<(), NotWhole> {
        check_whole(&v.iter().collect::<Vec<_>>(), 0.1)
    }

    #[test]
    fn even_stack_is_whole() {
        assert_eq!(check(&stack("1.2.3", 0..20)), Ok(()));
    }

    #[test]
    fn reversed_order_is_whole() {
        assert_eq!(check(&stack("1.2.3", (0..20).rev())), Ok(()));
    }

    #[test]
    fn missing_middle_slice_is_uneven() {
        let v = stack("1.2.3", (0..20).filter(|&i| i != 7));
        match check(&v) {
            Err(NotWhole::UnevenSpacing {
                expected_mm,
                found_mm,
            }) => {
                assert!((expected_mm - 2.5).abs() < 1e-9);
                assert!((found_mm - 5.0).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jittered_spacing_within_tolerance_passes_beyond_fails() {
        let mut v = stack("1.2.3", 0..10);
        v[4].geometry.as_mut().unwrap().position[2] += 0.1; // 4% of 2.5 mm
        assert_eq!(check(&v), Ok(()));
        v[4].geometry.as_mut().unwrap().position[2] += 0.4; // 20%
        assert!(
            matches!(check(&v), Err(NotWhole::UnevenSpacing { .. })),
            "{:?}",
            check(&v)
        );
    }

    #[test]
    fn duplicate_position_fails() {
        let mut v = stack("1.2.3", 0..10);
        v.push(slice("1.2.3", 99, 5.0));
        let e = check(&v).unwrap_err();
        assert_eq!(e, NotWhole::DuplicatePosition { position_mm: 5.0 });
        assert!(e.to_string().contains("5.000 mm"), "{e}");
    }

    #[test]
    fn tilted_slice_is_not_parallel() {
        let mut v = stack("1.2.3", 0..10);
        // Localizer-like: coronal.
        v[3].geometry.as_mut().unwrap().orientation = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0];
        assert!(matches!(check(&v), Err(NotWhole::NotParallel { .. })));
        // Rounding noise is fine; so is the flipped (antiparallel) normal.
        let mut v = stack("1.2.3", 0..10);
        v[3].geometry.as_mut().unwrap().orientation = [1.0, 0.0, 0.0, 0.0, 0.999_999_9, 0.000_2];
        v[5].geometry.as_mut().unwrap().orientation = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0];
        assert_eq!(check(&v), Ok(()));
    }

    #[test]
    fn images_in_acquisition_mismatch_fails() {
        // Missing last slice: spacing is still even, only the count shows it.
        let mut v = stack("1.2.3", 0..9);
        for h in &mut v {
            h.images_in_acquisition = Some(10);
        }
        assert_eq!(
            check(&v),
            Err(NotWhole::CountMismatch {
                expected: 10,
                got: 9
            })
        );
        v.extend(stack("1.2.3", 9..10).into_iter().map(|mut h| {
            h.images_in_acquisition = Some(10);
            h
        }));
        assert_eq!(check(&v), Ok(()));
    }

    #[test]
    fn single_slice_is_whole_unless_more_announced() {
        let mut v = stack("1.2.3", 0..1);
        assert_eq!(check(&v), Ok(()));
        v[0].images_in_acquisition = Some(1);
        assert_eq!(check(&v), Ok(()));
        v[0].images_in_acquisition = Some(120);
        assert_eq!(
            check(&v),
            Err(NotWhole::CountMismatch {
                expected: 120,
                got: 1
            })
        );
    }

    #[test]
    fn missing_geometry_names_the_instance() {
        let mut v = stack("1.2.3", 0..3);
        v[1].geometry = None;
        assert_eq!(
            check(&v),
            Err(NotWhole::NoGeometry {
                sop: Uid::parse("1.2.3.2").unwrap()
            })
        );
        v[1] = slice("1.2.3", 2, 2.5);
        v[1].geometry.as_mut().unwrap().orientation = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        assert!(matches!(
            check(&v),
            Err(NotWhole::DegenerateOrientation { .. })
        ));
    }

    #[test]
    fn multi_frame_alone_is_whole_in_a_set_is_not() {
        let mut one = stack("1.2.3", 0..1);
        one[0].number_of_frames = Some(300);
        one[0].geometry = None; // Enhanced CT keeps geometry per frame
        assert_eq!(check(&one), Ok(()));
        let mut two = stack("1.2.3", 0..2);
        two[1].number_of_frames = Some(300);
        assert!(matches!(check(&two), Err(NotWhole::MultiFrameInSet { .. })));
    }

    #[test]
    fn empty_is_not_whole() {
        assert_eq!(check(&[]), Err(NotWhole::Empty));
    }
}
