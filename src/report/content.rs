//! SR content items (PS3.3 C.17.3), one type per value type we emit:
//! CONTAINER, CODE, NUM, TEXT, UIDREF, IMAGE.
//!
//! Each type checks its value where it is built, so a tree of them always
//! encodes to a valid Content Sequence. Tree structure lives in
//! [`ContentNode`]: a relationship to its parent (PS3.3 C.17.3.2.4), an item,
//! and children. Items are plain data; `to_dataset` is the only encoder.

use std::borrow::Cow;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::{seq_elem, sop_ref, str_elem, ReportError};
use crate::dicom::Uid;

/// A coded concept (PS3.3 8.8, Code Sequence Macro Table 8.8-1).
///
/// Values longer than 16 characters (SH) go to Long Code Value (UC), as the
/// macro requires; meanings are LO (64 characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    value: Cow<'static, str>,
    scheme: Cow<'static, str>,
    meaning: Cow<'static, str>,
}

impl Code {
    /// For constants in [`super::codes`]; a unit test checks them all
    /// through [`Code::new`].
    pub const fn fixed(value: &'static str, scheme: &'static str, meaning: &'static str) -> Code {
        Code {
            value: Cow::Borrowed(value),
            scheme: Cow::Borrowed(scheme),
            meaning: Cow::Borrowed(meaning),
        }
    }

    /// A code from outside data (a model card): checked here.
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Result<Code, ReportError> {
        let bad = |reason: String| ReportError::InvalidCode {
            field: "code",
            reason,
        };
        let value = value.trim();
        let scheme = scheme.trim();
        let meaning = meaning.trim();
        for (what, v, max) in [
            ("value", value, 64),
            ("scheme designator", scheme, 16),
            ("meaning", meaning, 64),
        ] {
            if v.is_empty() {
                return Err(bad(format!("{what} is empty")));
            }
            if v.chars().count() > max {
                return Err(bad(format!("{what} `{v}` is longer than {max} characters")));
            }
            if v.contains('\\') || v.chars().any(|c| c.is_control()) {
                return Err(bad(format!(
                    "{what} `{v}` has a backslash or control character"
                )));
            }
        }
        Ok(Code {
            value: Cow::Owned(value.to_owned()),
            scheme: Cow::Owned(scheme.to_owned()),
            meaning: Cow::Owned(meaning.to_owned()),
        })
    }

    pub fn value(&self) -> &str {
        &self.value
    }
    pub fn scheme(&self) -> &str {
        &self.scheme
    }
    pub fn meaning(&self) -> &str {
        &self.meaning
    }

    /// One Code Sequence item.
    pub fn to_item(&self) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        if self.value.chars().count() > 16 {
            o.put(str_elem(
                tags::LONG_CODE_VALUE,
                VR::UC,
                self.value.to_string(),
            ));
        } else {
            o.put(str_elem(tags::CODE_VALUE, VR::SH, self.value.to_string()));
        }
        o.put(str_elem(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            self.scheme.to_string(),
        ));
        o.put(str_elem(
            tags::CODE_MEANING,
            VR::LO,
            self.meaning.to_string(),
        ));
        o
    }
}

impl TryFrom<&crate::inference::card::Code> for Code {
    type Error = ReportError;
    fn try_from(c: &crate::inference::card::Code) -> Result<Code, ReportError> {
        Code::new(&c.value, &c.scheme, &c.meaning)
    }
}

/// A unit of measure: a UCUM code (CID 82 "Units of Measurement"), whose
/// value is the UCUM expression itself (e.g. `cm2`, `{Agatston}`, `1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UcumUnit(Code);

impl UcumUnit {
    pub fn new(expression: &str, meaning: &str) -> Result<UcumUnit, ReportError> {
        if expression.contains(' ') {
            return Err(ReportError::InvalidCode {
                field: "unit",
                reason: format!("UCUM expression `{expression}` has a space"),
            });
        }
        Ok(UcumUnit(Code::new(expression, "UCUM", meaning)?))
    }

    /// For units in [`super::codes`] already checked by their test.
    pub const fn fixed(code: Code) -> UcumUnit {
        UcumUnit(code)
    }

    pub fn code(&self) -> &Code {
        &self.0
    }
}

/// Relationship Type (PS3.3 C.17.3.2.4), source → target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relationship {
    Contains,
    HasObsContext,
    HasAcqContext,
    HasConceptMod,
    HasProperties,
    InferredFrom,
    SelectedFrom,
}

impl Relationship {
    pub fn as_str(self) -> &'static str {
        match self {
            Relationship::Contains => "CONTAINS",
            Relationship::HasObsContext => "HAS OBS CONTEXT",
            Relationship::HasAcqContext => "HAS ACQ CONTEXT",
            Relationship::HasConceptMod => "HAS CONCEPT MOD",
            Relationship::HasProperties => "HAS PROPERTIES",
            Relationship::InferredFrom => "INFERRED FROM",
            Relationship::SelectedFrom => "SELECTED FROM",
        }
    }
}

/// CONTAINER (C.17.3.2.2): a heading, optionally the root of a template.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerItem {
    pub name: Code,
    /// TID number for the Content Template Sequence (DCMR), when this
    /// container is where a template starts.
    pub template: Option<&'static str>,
}

impl ContainerItem {
    pub fn new(name: Code, template: Option<&'static str>) -> ContainerItem {
        ContainerItem { name, template }
    }
}

/// CODE: a coded name with a coded value.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeItem {
    pub name: Code,
    pub value: Code,
}

impl CodeItem {
    pub fn new(name: Code, value: Code) -> CodeItem {
        CodeItem { name, value }
    }
}

/// NUM (C.18.1): a finite number with a UCUM unit.
#[derive(Debug, Clone, PartialEq)]
pub struct NumItem {
    pub name: Code,
    value: f64,
    pub unit: UcumUnit,
}

impl NumItem {
    pub fn new(name: Code, value: f64, unit: UcumUnit) -> Result<NumItem, ReportError> {
        if !value.is_finite() {
            return Err(ReportError::NonFinite {
                what: "NUM value",
                value,
            });
        }
        Ok(NumItem { name, value, unit })
    }
    pub fn value(&self) -> f64 {
        self.value
    }
}

/// TEXT: free text (UT), non-empty.
#[derive(Debug, Clone, PartialEq)]
pub struct TextItem {
    pub name: Code,
    value: String,
}

impl TextItem {
    pub fn new(name: Code, value: &str) -> Result<TextItem, ReportError> {
        if value.trim().is_empty() {
            return Err(ReportError::InvalidText {
                what: "TEXT value",
                reason: "empty".into(),
            });
        }
        Ok(TextItem {
            name,
            value: value.to_owned(),
        })
    }
}

/// UIDREF.
#[derive(Debug, Clone, PartialEq)]
pub struct UidRefItem {
    pub name: Code,
    pub value: Uid,
}

impl UidRefItem {
    pub fn new(name: Code, value: Uid) -> UidRefItem {
        UidRefItem { name, value }
    }
}

/// IMAGE (C.18.4): a reference to one image instance; unnamed in TID 1601
/// Image Library Entry, (121112, DCM, "Source of Measurement") in TID 1501.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageItem {
    pub name: Option<Code>,
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
    /// Referenced Segment Number (0062,000B), for an image that is a SEG.
    pub segment_numbers: Vec<u16>,
}

impl ImageItem {
    pub fn new(sop_class_uid: Uid, sop_instance_uid: Uid) -> ImageItem {
        ImageItem {
            name: None,
            sop_class_uid,
            sop_instance_uid,
            segment_numbers: Vec::new(),
        }
    }

    /// A reference to segments of a Segmentation instance.
    pub fn with_segments(mut self, numbers: Vec<u16>) -> ImageItem {
        self.segment_numbers = numbers;
        self
    }

    pub fn named(mut self, name: Code) -> ImageItem {
        self.name = Some(name);
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ContentItem {
    Container(ContainerItem),
    Code(CodeItem),
    Num(NumItem),
    Text(TextItem),
    UidRef(UidRefItem),
    Image(ImageItem),
}

macro_rules! from_item {
    ($t:ty, $v:ident) => {
        impl From<$t> for ContentItem {
            fn from(i: $t) -> ContentItem {
                ContentItem::$v(i)
            }
        }
    };
}
from_item!(ContainerItem, Container);
from_item!(CodeItem, Code);
from_item!(NumItem, Num);
from_item!(TextItem, Text);
from_item!(UidRefItem, UidRef);
from_item!(ImageItem, Image);

/// One node of the content tree: how it relates to its parent, what it
/// is, and what hangs below it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentNode {
    pub relationship: Relationship,
    pub item: ContentItem,
    pub children: Vec<ContentNode>,
}

impl ContentNode {
    pub fn new(relationship: Relationship, item: impl Into<ContentItem>) -> ContentNode {
        ContentNode {
            relationship,
            item: item.into(),
            children: Vec::new(),
        }
    }

    pub fn with_children(mut self, children: Vec<ContentNode>) -> ContentNode {
        self.children = children;
        self
    }

    /// One Content Sequence item.
    pub fn to_dataset(&self) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        o.put(str_elem(
            tags::RELATIONSHIP_TYPE,
            VR::CS,
            self.relationship.as_str(),
        ));
        encode_item(&mut o, &self.item);
        put_children(&mut o, &self.children);
        o
    }
}

pub(crate) fn put_children(o: &mut InMemDicomObject, children: &[ContentNode]) {
    if !children.is_empty() {
        o.put(seq_elem(
            tags::CONTENT_SEQUENCE,
            children.iter().map(ContentNode::to_dataset).collect(),
        ));
    }
}

/// Document Relationship / Content macros' value part for `item`; used for
/// Content Sequence items and for the root (which has no relationship).
pub(crate) fn encode_item(o: &mut InMemDicomObject, item: &ContentItem) {
    let name = |o: &mut InMemDicomObject, c: &Code| {
        o.put(seq_elem(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![c.to_item()],
        ));
    };
    match item {
        ContentItem::Container(c) => {
            o.put(str_elem(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
            name(o, &c.name);
            o.put(str_elem(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
            if let Some(tid) = c.template {
                let mut t = InMemDicomObject::new_empty();
                t.put(str_elem(tags::MAPPING_RESOURCE, VR::CS, "DCMR"));
                t.put(str_elem(tags::TEMPLATE_IDENTIFIER, VR::CS, tid));
                o.put(seq_elem(tags::CONTENT_TEMPLATE_SEQUENCE, vec![t]));
            }
        }
        ContentItem::Code(c) => {
            o.put(str_elem(tags::VALUE_TYPE, VR::CS, "CODE"));
            name(o, &c.name);
            o.put(seq_elem(
                tags::CONCEPT_CODE_SEQUENCE,
                vec![c.value.to_item()],
            ));
        }
        ContentItem::Num(n) => {
            o.put(str_elem(tags::VALUE_TYPE, VR::CS, "NUM"));
            name(o, &n.name);
            let mut mv = InMemDicomObject::new_empty();
            mv.put(str_elem(tags::NUMERIC_VALUE, VR::DS, format_ds(n.value)));
            // Type 1C: required when DS (16 characters) loses precision; we
            // always send it so readers get the exact double.
            mv.put(DataElement::new(
                tags::FLOATING_POINT_VALUE,
                VR::FD,
                PrimitiveValue::from(n.value),
            ));
            mv.put(seq_elem(
                tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
                vec![n.unit.code().to_item()],
            ));
            o.put(seq_elem(tags::MEASURED_VALUE_SEQUENCE, vec![mv]));
        }
        ContentItem::Text(t) => {
            o.put(str_elem(tags::VALUE_TYPE, VR::CS, "TEXT"));
            name(o, &t.name);
            o.put(str_elem(tags::TEXT_VALUE, VR::UT, t.value.clone()));
        }
        ContentItem::UidRef(u) => {
            o.put(str_elem(tags::VALUE_TYPE, VR::CS, "UIDREF"));
            name(o, &u.name);
            o.put(str_elem(tags::UID, VR::UI, u.value.as_str()));
        }
        ContentItem::Image(i) => {
            o.put(str_elem(tags::VALUE_TYPE, VR::CS, "IMAGE"));
            if let Some(n) = &i.name {
                name(o, n);
            }
            let mut r = sop_ref(i.sop_class_uid.as_str(), i.sop_instance_uid.as_str());
            if !i.segment_numbers.is_empty() {
                r.put(DataElement::new(
                    tags::REFERENCED_SEGMENT_NUMBER,
                    VR::US,
                    PrimitiveValue::U16(i.segment_numbers.iter().copied().collect()),
                ));
            }
            o.put(seq_elem(tags::REFERENCED_SOP_SEQUENCE, vec![r]));
        }
    }
}

/// Source DS text (values joined by `\`) made valid to copy: a value over
/// the 16 bytes DS allows is re-formatted by [`format_ds`]; others are kept
/// as written. Real archives write such values (liver-ircad07: PixelSpacing
/// `0.782000005245209`, SliceThickness `1.6000000238418579`), and copying
/// them verbatim makes our SC and SEG fail dciodvfy.
pub fn fit_ds_text(text: &str) -> String {
    text.split('\\')
        .map(|v| {
            let t = v.trim();
            match t.parse::<f64>() {
                Ok(x) if t.len() > 16 && x.is_finite() => format_ds(x),
                _ => t.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\\")
}

/// A finite f64 as a Decimal String (PS3.5 6.2: at most 16 bytes), as
/// precise as fits.
pub fn format_ds(v: f64) -> String {
    let s = format!("{v}");
    if s.len() <= 16 {
        return s;
    }
    // Longest fixed and scientific forms that fit; keep the closer one.
    let fixed = (0..=15usize)
        .rev()
        .map(|p| trim_fraction(format!("{v:.p$}")))
        .find(|s| s.len() <= 16);
    let sci = (0..=12usize)
        .rev()
        .map(|p| format!("{v:.p$e}"))
        .find(|s| s.len() <= 16);
    let err = |s: &Option<String>| {
        s.as_ref()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(f64::INFINITY, |b| (b - v).abs())
    };
    let (ef, es) = (err(&fixed), err(&sci));
    match (fixed, sci) {
        (Some(f), Some(s)) => {
            if ef <= es {
                f
            } else {
                s
            }
        }
        (f, s) => f.or(s).unwrap_or_else(|| "0".into()),
    }
}

fn trim_fraction(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_source_ds_values_are_refitted_and_short_ones_kept() {
        assert_eq!(fit_ds_text("0.782000005245209\\0.782000005245209"), "0.78200000524521\\0.78200000524521");
        assert_eq!(fit_ds_text("1.6000000238418579"), "1.60000002384186");
        assert_eq!(fit_ds_text("-120\\-110.5\\ 2.5"), "-120\\-110.5\\2.5");
    }

    #[test]
    fn ds_fits_in_16_and_round_trips_closely() {
        for v in [
            0.0,
            1.5,
            -2.25,
            23.412345678912345,
            1e20,
            -1.234e-12,
            123456789.12345679,
            -1.5e300,
            f64::MIN_POSITIVE,
        ] {
            let s = format_ds(v);
            assert!(s.len() <= 16, "{s}");
            let back: f64 = s.parse().unwrap();
            assert!((back - v).abs() <= v.abs() * 1e-9 + 1e-300, "{v} → {s}");
        }
        assert_eq!(format_ds(12.5), "12.5");
    }

    #[test]
    fn codes_are_checked_and_long_values_use_long_code_value() {
        assert!(Code::new("", "DCM", "x").is_err());
        assert!(Code::new("1", "DCM", &"m".repeat(65)).is_err());
        assert!(Code::new("a\\b", "DCM", "x").is_err());
        let long = Code::new("12345678901234567", "SCT", "x").unwrap();
        let item = long.to_item();
        assert!(item.element_opt(tags::CODE_VALUE).unwrap().is_none());
        assert!(item.element_opt(tags::LONG_CODE_VALUE).unwrap().is_some());
    }

    #[test]
    fn num_rejects_nan_and_units_reject_spaces() {
        let u = UcumUnit::new("cm2", "square centimeter").unwrap();
        assert!(NumItem::new(super::super::codes::NUMBER_OF_LESIONS, f64::NAN, u).is_err());
        assert!(UcumUnit::new("cm 2", "x").is_err());
    }
}
