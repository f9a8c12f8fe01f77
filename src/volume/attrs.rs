//! Small typed accessors over an in-memory data set, including the
//! functional-group lookup of multi-frame objects (PS3.3 C.7.6.16).

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// Trimmed text value; `None` when absent or empty.
pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok()??.to_str().ok()?;
    let v = v.trim_end_matches(['\0', ' ']).trim_start();
    (!v.is_empty()).then(|| v.to_owned())
}

pub(crate) fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let v = obj.element_opt(tag).ok()??.to_multi_float64().ok()?;
    (!v.is_empty()).then_some(v)
}

pub(crate) fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok()??.to_int::<i64>().ok()
}

/// Items of a sequence; empty when absent.
pub(crate) fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .unwrap_or(&[])
}

/// The first item of functional group macro `group` that holds `attr`, looked
/// up first in the frame's Per-Frame item, then in the Shared item, as PS3.3
/// C.7.6.16 prescribes.
pub(crate) fn functional(obj: &InMemDicomObject, frame: usize, group: Tag, attr: Tag) -> Option<&InMemDicomObject> {
    let per_frame = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).get(frame);
    let shared = items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
    [per_frame, shared]
        .into_iter()
        .flatten()
        .filter_map(|fg| items(fg, group).first())
        .find(|item| item.element_opt(attr).ok().flatten().is_some())
}

/// Multi-frame objects that describe their geometry in functional groups.
pub(crate) fn has_functional_groups(obj: &InMemDicomObject) -> bool {
    !items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).is_empty()
        || !items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).is_empty()
}

/// Plane geometry of one frame: (position, orientation).
pub(crate) fn frame_plane(obj: &InMemDicomObject, frame: usize) -> (Option<[f64; 3]>, Option<[f64; 6]>) {
    let (pos, ori) = if has_functional_groups(obj) {
        (
            functional(obj, frame, tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
                .and_then(|i| floats(i, tags::IMAGE_POSITION_PATIENT)),
            functional(obj, frame, tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
                .and_then(|i| floats(i, tags::IMAGE_ORIENTATION_PATIENT)),
        )
    } else {
        (
            floats(obj, tags::IMAGE_POSITION_PATIENT),
            floats(obj, tags::IMAGE_ORIENTATION_PATIENT),
        )
    };
    (
        pos.filter(|p| p.len() == 3).map(|p| [p[0], p[1], p[2]]),
        ori.filter(|o| o.len() == 6).map(|o| [o[0], o[1], o[2], o[3], o[4], o[5]]),
    )
}

/// A frame-level attribute from a functional group, or the top-level data set
/// for single-frame objects.
pub(crate) fn frame_floats(obj: &InMemDicomObject, frame: usize, group: Tag, attr: Tag) -> Option<Vec<f64>> {
    if has_functional_groups(obj) {
        functional(obj, frame, group, attr).and_then(|i| floats(i, attr))
    } else {
        floats(obj, attr)
    }
}

/// Number of frames; 1 when NumberOfFrames is absent.
pub(crate) fn frame_count(obj: &InMemDicomObject) -> usize {
    int(obj, tags::NUMBER_OF_FRAMES)
        .filter(|n| *n > 0)
        .map(|n| n as usize)
        .unwrap_or(1)
}

pub(crate) fn normal(o: &[f64; 6]) -> [f64; 3] {
    let (r, c) = (&o[0..3], &o[3..6]);
    let n = [
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    ];
    let len = dot(&n, &n).sqrt();
    if len == 0.0 {
        return n;
    }
    [n[0] / len, n[1] / len, n[2] / len]
}

pub(crate) fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
