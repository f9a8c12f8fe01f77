//! The PS3.16 templates of a TID 1500 Measurement Report, one type each,
//! after highdicom's `sr/templates.py`. Each builds its content nodes; the
//! checks happened when its content items were made.
//!
//! ```text
//! CONTAINER (126000, DCM, "Imaging Measurement Report")        TID 1500
//!   HAS CONCEPT MOD  CODE Language = en                        TID 1204
//!   HAS OBS CONTEXT  CODE Observer Type = Device ...           TID 1002/1004
//!   HAS CONCEPT MOD  CODE Procedure reported
//!   CONTAINS CONTAINER Image Library > Image Library Group     TID 1600
//!   CONTAINS CONTAINER Imaging Measurements
//!     CONTAINS CONTAINER Measurement Group                     TID 1501
//!       tracking id/UID, finding site, TID 4019, NUM (TID 300), CODE
//!     (TID 1411 instead of 1501 when a SEG exists: + Referenced Segment,
//!      Source series for segmentation)
//! ```

use super::codes;
use super::content::{
    Code, CodeItem, ContainerItem, ContentNode, ImageItem, NumItem, Relationship, TextItem,
    UcumUnit, UidRefItem,
};
use super::ReportError;
use crate::dicom::Uid;

use Relationship::{Contains, HasAcqContext, HasConceptMod, HasObsContext};

/// TID 1204 Language of Content Item and Descendants: English, RFC 5646.
pub fn language_of_content() -> ContentNode {
    ContentNode::new(
        HasConceptMod,
        CodeItem::new(codes::LANGUAGE_OF_CONTENT, codes::ENGLISH),
    )
}

/// TID 1002 Observer Context with TID 1004 Device Observer Identifying
/// Attributes: the node (and the model it ran) made the observations.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceObserver {
    uid: Uid,
    name: TextItem,
    manufacturer: TextItem,
    model_name: TextItem,
}

impl DeviceObserver {
    pub fn new(
        uid: Uid,
        name: &str,
        manufacturer: &str,
        model_name: &str,
    ) -> Result<DeviceObserver, ReportError> {
        Ok(DeviceObserver {
            uid,
            name: TextItem::new(codes::DEVICE_OBSERVER_NAME, name)?,
            manufacturer: TextItem::new(codes::DEVICE_OBSERVER_MANUFACTURER, manufacturer)?,
            model_name: TextItem::new(codes::DEVICE_OBSERVER_MODEL_NAME, model_name)?,
        })
    }

    pub fn nodes(&self) -> Vec<ContentNode> {
        vec![
            ContentNode::new(
                HasObsContext,
                CodeItem::new(codes::OBSERVER_TYPE, codes::DEVICE),
            ),
            ContentNode::new(
                HasObsContext,
                UidRefItem::new(codes::DEVICE_OBSERVER_UID, self.uid.clone()),
            ),
            ContentNode::new(HasObsContext, self.name.clone()),
            ContentNode::new(HasObsContext, self.manufacturer.clone()),
            ContentNode::new(HasObsContext, self.model_name.clone()),
        ]
    }
}

/// TID 4019 Algorithm Identification: name and version (TEXT, HAS CONCEPT
/// MOD), under a measurement group and under each measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct AlgorithmIdentification {
    name: TextItem,
    version: TextItem,
}

impl AlgorithmIdentification {
    pub fn new(name: &str, version: &str) -> Result<AlgorithmIdentification, ReportError> {
        Ok(AlgorithmIdentification {
            name: TextItem::new(codes::ALGORITHM_NAME, name)?,
            version: TextItem::new(codes::ALGORITHM_VERSION, version)?,
        })
    }

    pub fn nodes(&self) -> Vec<ContentNode> {
        vec![
            ContentNode::new(HasConceptMod, self.name.clone()),
            ContentNode::new(HasConceptMod, self.version.clone()),
        ]
    }
}

/// TID 4108 Tracking Identifier: a human-readable identifier and a UID,
/// both required by TID 1501.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackingIdentifier {
    identifier: TextItem,
    uid: Uid,
}

impl TrackingIdentifier {
    pub fn new(identifier: &str, uid: Uid) -> Result<TrackingIdentifier, ReportError> {
        Ok(TrackingIdentifier {
            identifier: TextItem::new(codes::TRACKING_IDENTIFIER, identifier)?,
            uid,
        })
    }

    pub fn nodes(&self) -> Vec<ContentNode> {
        vec![
            ContentNode::new(HasObsContext, self.identifier.clone()),
            ContentNode::new(
                HasObsContext,
                UidRefItem::new(codes::TRACKING_UID, self.uid.clone()),
            ),
        ]
    }
}

/// TID 300 Measurement: a NUM whose concept comes from the model card
/// (e.g. CID 7470-ish (42798000, SCT, "Area")), with its algorithm.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    num: NumItem,
    /// (370129005, SCT, "Measurement Method"), e.g. CID 6140's
    /// (112055, DCM, "Agatston scoring method").
    method: Option<Code>,
    /// (121401, DCM, "Derivation"), CID 7464, e.g. (56851009, SCT, "Maximum").
    derivation: Option<Code>,
    algorithm: Option<AlgorithmIdentification>,
}

impl Measurement {
    pub fn new(
        concept: Code,
        value: f64,
        unit: UcumUnit,
        algorithm: Option<AlgorithmIdentification>,
    ) -> Result<Measurement, ReportError> {
        Ok(Measurement {
            num: NumItem::new(concept, value, unit)?,
            method: None,
            derivation: None,
            algorithm,
        })
    }

    pub fn with_method(mut self, method: Code) -> Measurement {
        self.method = Some(method);
        self
    }

    pub fn with_derivation(mut self, derivation: Code) -> Measurement {
        self.derivation = Some(derivation);
        self
    }

    pub fn node(&self) -> ContentNode {
        let mut children = Vec::new();
        // TID 300 order: Measurement Method (row 2) before Derivation (row 3).
        if let Some(m) = &self.method {
            children.push(ContentNode::new(
                HasConceptMod,
                CodeItem::new(codes::MEASUREMENT_METHOD, m.clone()),
            ));
        }
        if let Some(d) = &self.derivation {
            children.push(ContentNode::new(
                HasConceptMod,
                CodeItem::new(codes::DERIVATION, d.clone()),
            ));
        }
        children.extend(self.algorithm.iter().flat_map(|a| a.nodes()));
        ContentNode::new(Contains, self.num.clone()).with_children(children)
    }
}

/// TID 1501 row "Qualitative Evaluations": a coded name-value pair.
#[derive(Debug, Clone, PartialEq)]
pub struct QualitativeEvaluation(CodeItem);

impl QualitativeEvaluation {
    pub fn new(name: Code, value: Code) -> QualitativeEvaluation {
        QualitativeEvaluation(CodeItem::new(name, value))
    }

    pub fn node(&self) -> ContentNode {
        ContentNode::new(Contains, self.0.clone())
    }
}

/// TID 1501 Measurement and Qualitative Evaluation Group: one per biomarker.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasurementGroup {
    pub tracking: TrackingIdentifier,
    /// (121071, DCM, "Finding"), CID 7472-ish, e.g. a calcified plaque.
    pub finding: Option<Code>,
    /// (363698007, SCT, "Finding Site"), value from CID 7151-ish anatomy.
    pub finding_site: Option<Code>,
    pub algorithm: Option<AlgorithmIdentification>,
    /// IMAGE (121112, DCM, "Source of Measurement"): the slices measured on.
    pub sources: Vec<ImageItem>,
    pub measurements: Vec<Measurement>,
    pub evaluations: Vec<QualitativeEvaluation>,
    /// The SEG segment measured on. With it the group is a TID 1411
    /// Volumetric ROI group (rows 7 and 12) instead of TID 1501, and the
    /// source images are named by the SEG rather than by Source of
    /// Measurement items (TID 1411 has no such row).
    pub segment: Option<ReferencedSegment>,
}

/// TID 1411 row 7 Referenced Segment (IMAGE with Referenced Segment Number)
/// and row 12 Source series for segmentation (UIDREF).
#[derive(Debug, Clone, PartialEq)]
pub struct ReferencedSegment {
    pub segmentation: ImageItem,
    pub source_series: Uid,
}

impl MeasurementGroup {
    pub fn node(&self) -> ContentNode {
        let mut c = self.tracking.nodes();
        if let Some(f) = &self.finding {
            c.push(ContentNode::new(
                Contains,
                CodeItem::new(codes::FINDING, f.clone()),
            ));
        }
        if let Some(seg) = &self.segment {
            c.push(ContentNode::new(
                Contains,
                seg.segmentation.clone().named(codes::REFERENCED_SEGMENT),
            ));
            c.push(ContentNode::new(
                Contains,
                UidRefItem::new(codes::SOURCE_SERIES_FOR_SEGMENTATION, seg.source_series.clone()),
            ));
        }
        if let Some(site) = &self.finding_site {
            c.push(ContentNode::new(
                HasConceptMod,
                CodeItem::new(codes::FINDING_SITE, site.clone()),
            ));
        }
        if let Some(a) = &self.algorithm {
            c.extend(a.nodes());
        }
        c.extend(
            self.sources
                .iter()
                .filter(|_| self.segment.is_none())
                .map(|i| ContentNode::new(Contains, i.clone().named(codes::SOURCE_OF_MEASUREMENT))),
        );
        c.extend(self.measurements.iter().map(Measurement::node));
        c.extend(self.evaluations.iter().map(QualitativeEvaluation::node));
        ContentNode::new(
            Contains,
            ContainerItem::new(
                codes::MEASUREMENT_GROUP,
                Some(if self.segment.is_some() { "1411" } else { "1501" }),
            ),
        )
        .with_children(c)
    }
}

/// TID 1600 Image Library: one group per modality, one IMAGE per source.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageLibrary {
    pub modality: Code,
    pub images: Vec<ImageItem>,
}

impl ImageLibrary {
    pub fn node(&self) -> ContentNode {
        let mut group = vec![ContentNode::new(
            HasAcqContext,
            CodeItem::new(codes::MODALITY, self.modality.clone()),
        )];
        group.extend(
            self.images
                .iter()
                .cloned()
                .map(|i| ContentNode::new(Contains, i)),
        );
        let group = ContentNode::new(
            Contains,
            ContainerItem::new(codes::IMAGE_LIBRARY_GROUP, None),
        )
        .with_children(group);
        ContentNode::new(
            Contains,
            ContainerItem::new(codes::IMAGE_LIBRARY, Some("1600")),
        )
        .with_children(vec![group])
    }
}

/// TID 1500 Measurement Report, the document root.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasurementReport {
    pub observer: DeviceObserver,
    /// (121058, DCM, "Procedure reported"), CID 100.
    pub procedure: Code,
    pub library: ImageLibrary,
    pub groups: Vec<MeasurementGroup>,
}

impl MeasurementReport {
    /// The root container and its children (the root has no relationship).
    pub fn root(&self) -> (ContainerItem, Vec<ContentNode>) {
        let mut c = vec![language_of_content()];
        c.extend(self.observer.nodes());
        c.push(ContentNode::new(
            HasConceptMod,
            CodeItem::new(codes::PROCEDURE_REPORTED, self.procedure.clone()),
        ));
        c.push(self.library.node());
        c.push(
            ContentNode::new(
                Contains,
                ContainerItem::new(codes::IMAGING_MEASUREMENTS, None),
            )
            .with_children(self.groups.iter().map(MeasurementGroup::node).collect()),
        );
        (
            ContainerItem::new(codes::IMAGING_MEASUREMENT_REPORT, Some("1500")),
            c,
        )
    }
}
