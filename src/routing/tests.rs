use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use super::*;
use crate::config::Config;
use crate::node::check::check_file;
use crate::dicom::header::InstanceHeader;

fn realct() -> Option<PathBuf> {
    crate::test_data::realct()
}

/// The shipped config/node.yaml, in a temp dir with the model cards it names.
pub(crate) fn default_table() -> (tempfile::TempDir, RouteTable) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    for m in ["pma", "sfa", "liver", "cac"] {
        std::fs::write(dir.path().join(format!("models/{m}.yaml")), "name: x\n").unwrap();
    }
    let cfg = dir.path().join("config/node.yaml");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/node.yaml"), &cfg).unwrap();
    let (_, table) = check_file(&cfg).unwrap_or_else(|d| panic!("{d:#?}"));
    (dir, table)
}

fn series_under(p: &Path) -> Vec<SeriesFacts> {
    let mut notes = Vec::new();
    let found = crate::series::scan::collect(&[p.to_owned()], &mut notes);
    found.iter().map(|s| SeriesFacts::load(&s.instances).unwrap()).collect()
}

#[test]
fn default_routes_never_take_localizers_or_secondary_captures() {
    let Some(root) = realct() else { return };
    let (_d, table) = default_table();
    assert_eq!(table.routes.len(), 4);
    for dir in ["head-philips/S1000", "head-philips/S4010"] {
        let series = series_under(&root.join(dir));
        assert_eq!(series.len(), 1, "{dir}");
        let outcomes = table.evaluate(&series[0]);
        for o in &outcomes {
            assert!(o.matched.is_none(), "{dir} matched {}", o.route);
            eprintln!("{dir} / {}: {}: {}", o.route, o.verdict.at, o.verdict.why);
        }
        assert!(table.matches(&series[0]).is_empty());
    }
    let localizer = &series_under(&root.join("head-philips/S1000"))[0];
    let o = &table.evaluate(localizer)[0];
    assert!(o.verdict.why.contains("LOCALIZER") && o.verdict.why.ends_with("under not"), "{}", o.verdict.why);
    let sc = &series_under(&root.join("head-philips/S4010"))[0];
    assert!(table.evaluate(sc)[0].verdict.why.contains("Secondary Capture"));
}

#[test]
fn chest_slice_goes_to_pma_and_sfa_only() {
    let Some(root) = realct() else { return };
    let (_d, table) = default_table();
    let p = root.join("chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm");
    let series = series_under(&p);
    let jobs = table.matches(&series[0]);
    let models: Vec<&str> = jobs.iter().map(|j| j.model.as_str()).collect();
    assert_eq!(models, vec!["pma", "sfa"]);
    assert_eq!(jobs[0].send_to, vec!["pacs".to_string()]);
    assert_eq!(jobs[0].slices, Some(crate::volume::SliceSelection::AboveAorticArch));
}

#[test]
fn real_chest_volume_goes_to_pma_and_sfa_above_the_arch() {
    let Some(dir) = crate::test_data::require(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/realct-labelled/chest-lidc0001/ct"),
        "real chest CT chest-lidc0001",
    ) else {
        return;
    };
    let (_d, table) = default_table();
    let series = series_under(&dir);
    assert_eq!(series.len(), 1);
    let jobs = table.matches(&series[0]);
    let models: Vec<&str> = jobs.iter().map(|j| j.model.as_str()).collect();
    // IV contrast: no CAC.
    assert_eq!(models, vec!["pma", "sfa"]);
    for j in &jobs {
        assert_eq!(j.slices, Some(crate::volume::SliceSelection::AboveAorticArch));
    }
}

#[test]
fn head_volume_and_tilted_head_take_no_default_route() {
    let Some(root) = realct() else { return };
    let (_d, table) = default_table();
    for dir in ["head-philips/S2010", "head-ge-tilted", "abdomen-ge-3slice"] {
        let series = series_under(&root.join(dir));
        assert_eq!(series.len(), 1);
        assert!(table.matches(&series[0]).is_empty(), "{dir}");
    }
    // Tilted gantry: the planes are 18.5° off axial.
    let tilted = &series_under(&root.join("head-ge-tilted"))[0];
    assert_eq!(tilted.derived(Derived::Axial), Some(FactValue::Bool(false)));
    let philips = &series_under(&root.join("head-philips/S2010"))[0];
    assert_eq!(philips.derived(Derived::InstanceCount), Some(FactValue::Number(vec![28.0])));
    assert_eq!(philips.derived(Derived::Axial), Some(FactValue::Bool(true)));
    let spacing = philips.slice_spacing.unwrap();
    assert!((spacing - 5.0).abs() < 0.01, "{spacing}");
}

// ---- compile diagnostics ----

const HEAD: &str = "\
node:
  ae_title: BIOMARKER
  data_dir: data
models:
  pma: {card: pma.yaml}
  sfa: {card: sfa.yaml}
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
routes:
";

fn diagnostics(routes: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    for m in ["pma", "sfa"] {
        std::fs::write(dir.path().join(format!("{m}.yaml")), "x: 1\n").unwrap();
    }
    let p = dir.path().join("n.yaml");
    std::fs::write(&p, format!("{HEAD}{routes}")).unwrap();
    match check_file(&p) {
        Ok(_) => vec![],
        Err(d) => d
            .iter()
            .map(|d| d.to_string().replace(&p.display().to_string(), "n.yaml"))
            .collect(),
    }
}

#[test]
fn good_routes_compile() {
    let d = diagnostics(
        "  - name: a
    model: pma
    send_to: [pacs]
    slices: {mode: index, index: 3}
    match:
      any:
        - {keyword: SliceThickness, range: {min: 1}}
        - {keyword: ContrastBolusAgent, absent: true}
        - {derived: sop_class, equals: 1.2.840.10008.5.1.4.1.1.2}
",
    );
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn semantic_errors_are_positioned_and_all_reported() {
    let d = diagnostics(
        "  - name: a
    model: foo
    send_to: [pacs, nowhere]
    match:
      all:
        - keyword: Modalty
          equals: CT
        - {derived: slice_thickness, range: {min: 5, max: 1}}
        - keyword: SeriesDescription
          regex: \"(unclosed\"
  - name: a
    model: sfa
    slices: {mode: index}
    match: {derived: axial, equals: yes}
",
    );
    let want = [
        "n.yaml:11:5: routes[0].model: unknown model \"foo\" (known: pma, sfa)",
        "n.yaml:12:5: routes[0].send_to[1]: unknown destination \"nowhere\" (known: pacs)",
        "n.yaml:15:11: routes[0].match.all[0].keyword: unknown DICOM keyword \"Modalty\"",
        "n.yaml:17:38: routes[0].match.all[1].range: min 5 is greater than max 1",
        "n.yaml:19:11: routes[0].match.all[2].regex: bad regex: regex parse error: (unclosed ^ error: unclosed group",
        "n.yaml:20:5: routes[1].name: duplicate route name \"a\" (also routes[0])",
        "n.yaml:22:5: routes[1].slices: `mode: index` needs `index: N`",
        "n.yaml:23:29: routes[1].match.equals: axial is true or false, not \"yes\"",
    ];
    assert_eq!(d.len(), want.len(), "{d:#?}");
    for (got, want) in d.iter().zip(want) {
        assert!(got.starts_with(want), "got  {got}\nwant {want}");
    }
}

#[test]
fn condition_shape_errors() {
    let cases = [
        ("{keyword: Modality}", "exactly one operator"),
        ("{keyword: Modality, equals: CT, regex: C}", "exactly one operator"),
        ("{all: [], any: []}", "one of `all`, `any`, `not`"),
        ("{all: []}", "at least one condition"),
        ("{derived: colour, equals: red}", "unknown derived value \"colour\""),
        ("{keyword: Modality, derived: axial, equals: CT}", "either `keyword` or `derived`"),
        ("{keyword: Modality, range: {min: 1}}", "not numeric"),
        ("{derived: instance_count, regex: x}", "not text"),
        ("{derived: instance_count, equals: many}", "is a number"),
        ("{keyword: SliceThickness, range: {}}", "give `min`, `max`"),
        ("{colour: red}", "unknown field `colour`"),
    ];
    for (m, want) in cases {
        let d = diagnostics(&format!("  - name: a\n    model: pma\n    match: {m}\n"));
        assert_eq!(d.len(), 1, "{m}: {d:#?}");
        assert!(d[0].contains(want), "{m}: {}", d[0]);
        assert!(d[0].starts_with("n.yaml:"), "{m}: {}", d[0]);
    }
}

#[test]
fn missing_card_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("n.yaml");
    std::fs::write(&p, "node: {ae_title: A, data_dir: d}\nmodels:\n  pma:\n    card: nope.yaml\n").unwrap();
    let d = check_file(&p).unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].line, d[0].column), (Some(4), Some(5)));
    assert!(d[0].message.contains("does not exist"));
}

#[test]
fn compile_is_pure_on_a_config_built_in_code() {
    let mut cfg: Config = serde_yaml::from_str(&format!("{HEAD}  - {{name: a, model: zzz, match: {{derived: axial, equals: true}}}}\n")).unwrap();
    cfg.models.clear();
    let d = RouteTable::compile(&cfg).unwrap_err();
    assert_eq!(d[0].line, None);
    assert!(d[0].to_string().contains("unknown model \"zzz\" (none are defined)"), "{}", d[0]);
}

// ---- evaluation on synthetic series ----

/// In memory, a multi-valued string must be `Strs`; a backslash inside one
/// `Str` is only split when the value is written and read back.
fn ds(v: &str) -> PrimitiveValue {
    PrimitiveValue::Strs(v.split('\\').map(str::to_owned).collect())
}

fn facts(elements: Vec<DataElement<InMemDicomObject>>, n: usize) -> SeriesFacts {
    let mut obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, ds(uids::CT_IMAGE_STORAGE)),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, ds("1.2.3.1")),
        DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, ds("1.2.3")),
        DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, ds("1.2.3.4")),
        DataElement::new(tags::MODALITY, VR::CS, ds("CT")),
        DataElement::new(tags::IMAGE_TYPE, VR::CS, ds("ORIGINAL\\PRIMARY\\AXIAL")),
        DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds("1\\0\\0\\0\\1\\0")),
        DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, ds("0\\0\\0")),
        DataElement::new(tags::SLICE_THICKNESS, VR::DS, ds("2.5")),
    ]);
    for e in elements {
        obj.put(e);
    }
    let first = InstanceHeader::from_dataset(&obj).unwrap();
    let headers: Vec<InstanceHeader> = (0..n)
        .map(|i| {
            let mut h = first.clone();
            if let Some(g) = h.geometry.as_mut() {
                g.position[2] = i as f64 * 2.5;
            }
            h
        })
        .collect();
    SeriesFacts::from_parts(obj, Path::new("first.dcm"), headers.iter())
}

fn eval(yaml: &str, f: &SeriesFacts) -> Verdict {
    let spec: crate::config::ConditionSpec = serde_yaml::from_str(yaml).unwrap();
    let mut errors = Vec::new();
    let c = Condition::compile(&spec, "match", &mut errors).unwrap_or_else(|| panic!("{errors:?}"));
    c.evaluate(f, "match")
}

#[test]
fn operators_and_explanations() {
    let ct = facts(vec![], 40);
    let agent = facts(
        vec![DataElement::new(tags::CONTRAST_BOLUS_AGENT, VR::LO, PrimitiveValue::from("IOMEPROL"))],
        40,
    );
    let holds = |y: &str, f: &SeriesFacts| eval(y, f).holds;
    assert!(holds("{keyword: SliceThickness, equals: 2.5}", &ct));
    assert!(holds("{keyword: SliceThickness, range: {min: 2, max: 3.5}}", &ct));
    assert!(holds("{keyword: ImageType, equals: 'ORIGINAL\\PRIMARY\\AXIAL'}", &ct));
    assert!(holds("{keyword: ImageType, contains: AXIAL}", &ct));
    assert!(holds("{keyword: Modality, one_of: [MR, CT]}", &ct));
    assert!(holds("{derived: sop_class, equals: CT Image Storage}", &ct));
    assert!(holds("{derived: instance_count, range: {min: 20}}", &ct));
    assert!(holds("{derived: slice_spacing, equals: 2.5}", &ct));
    assert!(holds("{derived: axial, equals: true}", &ct));
    assert!(holds("{derived: contrast, equals: false}", &ct));
    assert!(holds("{derived: contrast, equals: true}", &agent));
    assert!(holds("{keyword: ContrastBolusAgent, absent: true}", &ct));
    assert!(holds("{keyword: ContrastBolusAgent, present: true}", &agent));
    assert!(!holds("{keyword: BodyPartExamined, regex: .}", &ct));
    assert!(holds("{not: {keyword: BodyPartExamined, present: true}}", &ct));

    let v = eval("{all: [{derived: modality, equals: CT}, {keyword: SliceThickness, range: {max: 2}}]}", &ct);
    assert!(!v.holds);
    assert_eq!(v.at, "match.all[1]");
    assert_eq!(v.why, "SliceThickness = 2.5 is outside ..2");
    let v = eval("{any: [{keyword: Modality, equals: MR}, {keyword: BodyPartExamined, equals: CHEST}]}", &ct);
    assert_eq!(v.why, "none held: Modality = CT does not equal MR; BodyPartExamined is absent");
    let v = eval("{not: {keyword: ImageType, regex: AXIAL}}", &ct);
    assert_eq!(v.why, "ImageType = ORIGINAL\\PRIMARY\\AXIAL matched regex AXIAL under not");
    assert_eq!(v.at, "match.not");
}

#[test]
fn sagittal_single_slice_is_not_axial_and_has_no_spacing() {
    let sag = facts(
        vec![DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds("0\\1\\0\\0\\0\\-1"))],
        1,
    );
    assert_eq!(sag.derived(Derived::Axial), Some(FactValue::Bool(false)));
    assert_eq!(sag.derived(Derived::SliceSpacing), None);
    let v = eval("{derived: slice_spacing, range: {max: 5}}", &sag);
    assert_eq!(v.why, "slice_spacing is absent");
}

#[test]
fn enhanced_ct_facts_come_from_functional_groups() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enh.dcm");
    crate::volume::tests::write_enhanced(&p, [10.0, 6.0, 2.0]);
    let f = &series_under(dir.path())[0];
    assert_eq!(f.derived(Derived::InstanceCount), Some(FactValue::Number(vec![1.0])));
    assert_eq!(f.derived(Derived::SliceCount), Some(FactValue::Number(vec![3.0])));
    assert_eq!(f.derived(Derived::SliceThickness), Some(FactValue::Number(vec![2.0])));
    assert_eq!(f.derived(Derived::SliceSpacing), Some(FactValue::Number(vec![4.0])));
    assert_eq!(f.derived(Derived::Axial), Some(FactValue::Bool(true)));
    assert!(eval("{derived: sop_class, equals: Enhanced CT Image Storage}", f).holds);
}

#[test]
fn route_names_that_are_not_one_file_name_are_refused() {
    for bad in ["..", ".", "a/b", "..\\\\x", "tab\\there"] {
        let d = diagnostics(&format!(
            "  - name: \"{bad}\"
    model: pma
    match: {{derived: axial, equals: true}}
"
        ));
        assert_eq!(d.len(), 1, "{bad}: {d:#?}");
        assert!(d[0].contains("routes[0].name") && d[0].contains("one plain file name"), "{bad}: {}", d[0]);
    }
    let d = diagnostics(
        "  - name: pma.v2 single-slice
    model: pma
    match: {derived: axial, equals: true}
",
    );
    assert!(d.is_empty(), "{d:#?}");
}

/// An Enhanced CT header claiming 2^31 - 1 frames with three Per-Frame
/// items: the facts looked up every claimed frame's plane (minutes of work
/// per series, found by the `dicom_file` fuzz target); the frames past the
/// items add nothing, so the result is the three planes'.
#[test]
fn a_huge_number_of_frames_costs_only_the_frames_described() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enh.dcm");
    crate::volume::tests::write_enhanced(&p, [10.0, 6.0, 2.0]);
    let mut first = dicom_object::open_file(&p).unwrap().into_inner();
    first.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("2147483647")));
    let facts = SeriesFacts::from_parts(first, &p, std::iter::empty());
    assert_eq!(facts.slice_spacing, Some(4.0));
    assert_eq!(facts.derived(Derived::Axial), Some(FactValue::Bool(true)));
}

#[test]
fn mode_all_compiles_takes_no_index_and_is_the_default_liver_route() {
    let route = |slices: &str| {
        format!("  - name: a\n    model: pma\n    slices: {slices}\n    match: {{derived: axial, equals: true}}\n")
    };
    let d = diagnostics(&route("{mode: all}"));
    assert!(d.is_empty(), "{d:#?}");
    let d = diagnostics(&route("{mode: all, index: 2}"));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(d[0].contains("routes[0].slices.index: `index` is only used with `mode: index`"), "{d:#?}");
    let (_d, table) = default_table();
    let liver = table.routes.iter().find(|r| r.name == "liver-abdomen").unwrap();
    assert_eq!(liver.slices, Some(crate::volume::SliceSelection::All));
}

// ---- covers: liver (anatomy from HU, lazily) ----

#[test]
fn covers_compiles_alone_and_names_its_region() {
    let compile = |y: &str| {
        let spec: crate::config::ConditionSpec = serde_yaml::from_str(y).unwrap();
        let mut errors = Vec::new();
        let c = Condition::compile(&spec, "match", &mut errors);
        (c, errors)
    };
    let (c, e) = compile("{covers: liver}");
    assert!(matches!(c, Some(Condition::Covers(Region::Liver))) && e.is_empty(), "{e:?}");
    let (c, e) = compile("{covers: spleen}");
    assert!(c.is_none());
    assert_eq!(e, vec![("match.covers".to_owned(), "unknown region \"spleen\" (known: liver)".to_owned())]);
    for y in ["{covers: liver, equals: true}", "{covers: liver, keyword: Modality}", "{covers: liver, all: [{covers: liver}]}"] {
        let (c, e) = compile(y);
        assert!(c.is_none() && e[0].1.contains("a condition is one of"), "{y}: {e:?}");
    }
}

#[test]
fn covers_is_not_computed_unless_evaluation_reaches_it() {
    // No files: when asked, the answer is "not judged"; when an earlier
    // alternative holds, it is never asked.
    let f = facts(vec![DataElement::new(tags::SERIES_DESCRIPTION, VR::LO, PrimitiveValue::from("ABDOMEN"))], 40);
    let v = eval("{any: [{keyword: SeriesDescription, regex: '(?i)abd'}, {covers: liver}]}", &f);
    assert!(v.holds);
    assert!(f.liver_coverage_if_computed().is_none());
    let v = eval("{all: [{keyword: Modality, equals: MR}, {covers: liver}]}", &f);
    assert!(!v.holds && f.liver_coverage_if_computed().is_none());
    let v = eval("{any: [{keyword: Modality, equals: MR}, {covers: liver}]}", &f);
    assert!(!v.holds && v.why.contains("liver coverage not judged: no image files"), "{}", v.why);
    assert!(f.liver_coverage_if_computed().is_some());
    let v = eval("{not: {covers: liver}}", &f);
    assert!(v.holds && v.at == "match.not", "{v:?}");
}

/// The default liver route on real volumes without descriptions: IRCAD
/// patient 7 (abdomen) by anatomy; chest-lidc0001 (shoulders to kidneys,
/// most of the liver in it) is a chest scan; the heads have no lung bases
/// or do not assemble.
#[test]
fn default_liver_route_takes_a_real_abdomen_by_anatomy_only() {
    let Some(root) = realct() else { return };
    let labelled = root.parent().unwrap().join("realct-labelled");
    let Some(ircad) = crate::test_data::require(labelled.join("liver-ircad07/ct"), "liver-ircad07") else { return };
    let (_d, table) = default_table();
    let liver = |dir: &Path| {
        let series = series_under(dir);
        assert_eq!(series.len(), 1, "{}", dir.display());
        let o = table.evaluate(&series[0]).into_iter().find(|o| o.route == "liver-abdomen").unwrap();
        let c = series[0].liver_coverage_if_computed().cloned();
        (o, c)
    };
    let (o, c) = liver(&ircad);
    let c = c.expect("the text alternatives fail, so coverage was judged").unwrap();
    eprintln!("ircad07: {c}");
    assert!(o.matched.is_some(), "{}", o.verdict.why);
    assert!(c.covered && c.slices <= ANATOMY_MAX_SLICES);
    let (o, c) = liver(&labelled.join("chest-lidc0001/ct"));
    eprintln!("chest-lidc0001: {}", o.verdict.why);
    assert!(o.matched.is_none());
    assert!(o.verdict.why.contains("chest scan"), "{}", o.verdict.why);
    assert!(!c.unwrap().unwrap().covered);
    for dir in ["head-philips/S2010", "head-ge-tilted"] {
        let (o, _) = liver(&root.join(dir));
        eprintln!("{dir}: {}", o.verdict.why);
        assert!(o.matched.is_none(), "{dir}");
    }
}
