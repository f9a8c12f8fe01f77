//! Synthetic CT phantoms with ground truth, for training and testing the
//! biomarker models (issue 3).
//!
//! `biomarker-node phantom --task {pma,sfa,cac,liver} --seed N --out DIR [--count K] [--size S]`
//!
//! Built with the cargo feature `phantom` (on by default); a node built with
//! `--no-default-features` has neither this module nor the subcommand. It
//! uses the node's own Agatston rules (`biomarkers::agatston`) and CT writer
//! (`dicom::ct_writer`), so its truth and the node's measurement agree.
//!
//! # Output (the training code reads exactly this)
//!
//! For each k in 0..K, a directory `DIR/<task>-<seed>-<k>/` holding:
//!
//! - `CT0001.dcm`, `CT0002.dcm`, …: CT Image Storage (1.2.840.10008.5.1.4.1.1.2),
//!   explicit VR little endian, one file per slice, numbered in ascending
//!   InstanceNumber, which is ascending z (ImagePositionPatient[2]) along the
//!   normal of the axial orientation 1\0\0\0\1\0. PMA, SFA and liver series
//!   are one slice; CAC series are a volume. PixelRepresentation varies
//!   (signed with RescaleIntercept 0, or unsigned with -1024), RescaleSlope 1,
//!   and some series mark pixels outside the reconstruction circle with
//!   PixelPaddingValue (-2000 HU signed, raw 0 unsigned).
//! - `truth.json`: `task`, `value`, `unit` (`cm2` for pma/sfa/liver, `{Agatston}`
//!   for cac), `risk_category` (cac only: `0`, `1-10`, `11-100`, `101-400`,
//!   `>400`), `series_instance_uid`, `study_instance_uid`, `pixel_spacing_mm`
//!   `[row, col]`, `slice_thickness_mm`, `rows`, `columns`, `slices`, `seed`,
//!   `index`; for cac `lesions` (`slice` (0-based file order), `area_mm2`,
//!   `peak_hu`, `weight`, `score`, `vessel`) and `distractors`; `extra`
//!   carries generator parameters (body size, noise, the HU-threshold-only
//!   answer, …) that the training must not rely on.
//! - `mask.npy`: NumPy v1.0, `|u1`, C order, shape `(slices, rows, cols)` in
//!   file order; 1 marks exactly the pixels the truth value counts.
//!
//! and `DIR/labels.csv` gets one `series_dir,value` line per series (the header
//! is written when the file is new), the value-only export a hospital has.
//!
//! # Truth definitions (shared with the training code)
//!
//! - PMA: pectoralis major and minor pixels whose stored HU is in [-29, 150], cm².
//! - SFA: subcutaneous fat pixels (not breast, axillary, intermuscular,
//!   mediastinal or arm fat) whose HU is in [-190, -30], cm².
//! - Liver: liver tumour pixels whose HU is in [-20, 200], cm²; 0 tumours in
//!   about 15% of series.
//! - CAC: Agatston over coronary plaques only ([`crate::biomarkers::agatston`],
//!   the node's own copy): per slice,
//!   8-connected components of HU ≥ 130 inside the coronary-plaque region,
//!   area ≥ 1 mm², weight from the peak HU, score scaled by thickness / 3.
//!
//! A pixel "is" a tissue when at least 2 of its 4 sub-samples are (the
//! generator renders at 2x and averages, for partial volume).
//!
//! # Reproducibility
//!
//! Each series draws from its own ChaCha8 stream seeded from (task, seed, k),
//! and UIDs come from a second stream of the same seed ("2.25." + a u128), so
//! any single series regenerates byte for byte.
//!
//! Failure modes: an unknown task, or an I/O error writing the output.

mod abdomen;
mod canvas;
mod cac;
mod chest;
mod raster;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::dicom::ct_writer::{write_ct_slice, CtSeriesSpec, CtSliceSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct PhantomArgs {
    /// pma, sfa, cac or liver
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Matrix size (rows = columns). Defaults: 512 for slices, 256 for cac.
    /// Pixel spacing scales so the field of view stays realistic.
    #[arg(long)]
    pub size: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Pma,
    Sfa,
    Cac,
    Liver,
}

impl Task {
    pub fn parse(s: &str) -> Option<Task> {
        match s {
            "pma" => Some(Task::Pma),
            "sfa" => Some(Task::Sfa),
            "cac" => Some(Task::Cac),
            "liver" => Some(Task::Liver),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Pma => "pma",
            Task::Sfa => "sfa",
            Task::Cac => "cac",
            Task::Liver => "liver",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Task::Cac => "{Agatston}",
            _ => "cm2",
        }
    }

    fn default_size(self) -> usize {
        match self {
            Task::Cac => 256,
            _ => 512,
        }
    }
}

/// A rendered series before it is written.
pub struct Phantom {
    pub rows: usize,
    pub cols: usize,
    pub slices: usize,
    /// Between rows, between columns (mm).
    pub spacing: [f64; 2],
    /// Slice thickness, also the spacing between slices (mm).
    pub thickness: f64,
    /// ImagePositionPatient of slice 0.
    pub origin: [f64; 3],
    /// Stored HU, [slices][rows][cols].
    pub hu: Vec<i16>,
    /// Truth mask, same layout.
    pub mask: Vec<u8>,
    pub signed: bool,
    pub padding_hu: Option<i16>,
    pub value: f64,
    pub risk: Option<&'static str>,
    pub kvp: f64,
    /// Task-specific truth (lesions) and generator parameters.
    pub extra: Value,
}

/// The per-series random stream: `stream` 0 for anatomy, 1 for UIDs.
fn series_rng(task: Task, seed: u64, index: u32, stream: u8) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[0..8].copy_from_slice(&seed.to_le_bytes());
    s[8..12].copy_from_slice(&index.to_le_bytes());
    s[12] = task as u8 + 1;
    s[13] = stream;
    s[16..24].copy_from_slice(b"phantom1");
    ChaCha8Rng::from_seed(s)
}

/// Renders one series (no I/O).
pub fn generate(task: Task, seed: u64, index: u32, size: Option<usize>) -> Phantom {
    let mut rng = series_rng(task, seed, index, 0);
    let size = size.unwrap_or(task.default_size());
    match task {
        Task::Pma | Task::Sfa => chest::generate(&mut rng, task, size),
        Task::Liver => abdomen::generate(&mut rng, size),
        Task::Cac => cac::generate(&mut rng, size),
    }
}

fn uid(rng: &mut ChaCha8Rng) -> String {
    format!("2.25.{}", rng.gen::<u128>() >> 1)
}

/// Writes the series directory (DICOM, truth.json, mask.npy); returns the truth.
pub fn write_series(dir: &Path, task: Task, seed: u64, index: u32, p: &Phantom) -> anyhow::Result<Value> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let mut urng = series_rng(task, seed, index, 1);
    let study = uid(&mut urng);
    let series = uid(&mut urng);
    let frame = uid(&mut urng);
    let day = urng.gen_range(1..=28);
    let month = urng.gen_range(1..=12);
    let (window_center, window_width) = match task {
        Task::Cac => (40.0, 400.0),
        Task::Liver => (60.0, 360.0),
        _ => (40.0, 500.0),
    };
    let spec = CtSeriesSpec {
        patient_name: format!("PHANTOM^{}", task.name().to_uppercase()),
        patient_id: format!("PH-{}-{}-{}", task.name(), seed, index),
        study_instance_uid: study.clone(),
        series_instance_uid: series.clone(),
        frame_of_reference_uid: frame,
        study_id: format!("{}", index + 1),
        accession_number: format!("PH{:08}", urng.gen_range(0..100_000_000u32)),
        study_date: format!("2024{month:02}{day:02}"),
        study_time: format!("{:02}{:02}00", urng.gen_range(7..19), urng.gen_range(0..60)),
        series_number: 1,
        series_description: match task {
            Task::Pma => "Phantom chest PMA",
            Task::Sfa => "Phantom chest SFA",
            Task::Cac => "Phantom calcium score",
            Task::Liver => "Phantom abdomen liver",
        }
        .to_owned(),
        body_part_examined: match task {
            Task::Liver => "ABDOMEN",
            _ => "CHEST",
        }
        .to_owned(),
        rows: p.rows as u16,
        columns: p.cols as u16,
        pixel_spacing: p.spacing,
        slice_thickness: p.thickness,
        kvp: p.kvp,
        tube_current_ma: urng.gen_range(80..400),
        convolution_kernel: match task {
            Task::Cac => "B35f",
            _ => "STANDARD",
        }
        .to_owned(),
        images_in_acquisition: p.slices as u32,
        signed: p.signed,
        padding_hu: p.padding_hu.map(i32::from),
        window_center,
        window_width,
    };
    let n = p.rows * p.cols;
    for s in 0..p.slices {
        let sop = uid(&mut urng);
        let pos = [p.origin[0], p.origin[1], p.origin[2] + s as f64 * p.thickness];
        write_ct_slice(
            &dir.join(format!("CT{:04}.dcm", s + 1)),
            &spec,
            &CtSliceSpec {
                sop_instance_uid: sop,
                instance_number: s as i32 + 1,
                position: pos,
                hu: &p.hu[s * n..(s + 1) * n],
            },
        )?;
    }
    write_npy_u8(&dir.join("mask.npy"), &[p.slices, p.rows, p.cols], &p.mask)?;
    let mut truth = json!({
        "task": task.name(),
        "value": p.value,
        "unit": task.unit(),
        "series_instance_uid": series,
        "study_instance_uid": study,
        "pixel_spacing_mm": p.spacing,
        "slice_thickness_mm": p.thickness,
        "rows": p.rows,
        "columns": p.cols,
        "slices": p.slices,
        "seed": seed,
        "index": index,
    });
    let obj = truth.as_object_mut().expect("truth is an object");
    if let Some(r) = p.risk {
        obj.insert("risk_category".into(), json!(r));
    }
    if let Value::Object(extra) = &p.extra {
        for key in ["lesions", "distractors", "tumours"] {
            if let Some(v) = extra.get(key) {
                obj.insert(key.into(), v.clone());
            }
        }
        let rest: serde_json::Map<String, Value> = extra
            .iter()
            .filter(|(k, _)| !["lesions", "distractors", "tumours"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        obj.insert("extra".into(), Value::Object(rest));
    }
    fs::write(dir.join("truth.json"), serde_json::to_string_pretty(&truth)? + "\n")?;
    Ok(truth)
}

/// NumPy .npy v1.0 (header padded so the data starts on a 64-byte boundary).
pub fn write_npy_u8(path: &Path, shape: &[usize], data: &[u8]) -> std::io::Result<()> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape_s}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(data)?;
    f.flush()
}

pub fn run(args: &PhantomArgs) -> anyhow::Result<()> {
    let task = Task::parse(&args.task)
        .ok_or_else(|| anyhow::anyhow!("unknown task {:?}: pma, sfa, cac or liver", args.task))?;
    fs::create_dir_all(&args.out)?;
    let labels = args.out.join("labels.csv");
    let new = !labels.exists();
    let mut csv = fs::OpenOptions::new().create(true).append(true).open(&labels)?;
    if new {
        writeln!(csv, "series_dir,value")?;
    }
    for k in 0..args.count {
        let t0 = Instant::now();
        let p = generate(task, args.seed, k, args.size);
        let name = format!("{}-{}-{}", task.name(), args.seed, k);
        write_series(&args.out.join(&name), task, args.seed, k, &p)?;
        writeln!(csv, "{name},{}", p.value)?;
        println!(
            "{name}: {:.3} {}{} ({} ms)",
            p.value,
            task.unit(),
            p.risk.map(|r| format!(" [{r}]")).unwrap_or_default(),
            t0.elapsed().as_millis()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
