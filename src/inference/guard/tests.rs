use super::*;
use crate::volume::Volume;
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            !n.starts_with("DIRFILE") && !n.ends_with(".json") && !n.ends_with(".npy") && !n.ends_with(".md") && n != "LICENSE"
        })
        .collect();
    v.sort();
    v
}

fn stats(name: &str, vol: &Volume, idx: &[usize]) {
    let seen = vol.hu.select(ndarray::Axis(0), idx);
    let air = hu_peak(seen.iter().copied(), [-1100.0, -900.0]);
    let fat = hu_peak(seen.iter().copied(), [-200.0, -20.0]);
    let tr = if idx.len() == 1 {
        format!("{:?}", landmark::trachea_in_slice(vol.slice(idx[0]).unwrap(), vol.pixel_spacing))
    } else {
        String::new()
    };
    eprintln!("STATS {name}: air {air:?} fat {fat:?} {tr}");
}

#[test]
#[ignore]
fn print_pixel_stats() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let d = tempfile::tempdir().unwrap();
    for task in [crate::phantom::Task::Pma, crate::phantom::Task::Sfa, crate::phantom::Task::Liver, crate::phantom::Task::Cac] {
        for k in 0..6 {
            let p = crate::phantom::generate(task, 901, k, None);
            let dir = d.path().join(format!("{}-{k}", task.name()));
            std::fs::create_dir_all(&dir).unwrap();
            crate::phantom::write_series(&dir, task, 901, k, &p).unwrap();
            let vol = Volume::from_files(&files(&dir)).unwrap();
            let idx: Vec<usize> = (0..vol.slices()).collect();
            stats(&format!("phantom {} {k}", task.name()), &vol, &idx);
        }
    }
    let lidc = Volume::from_files(&files(&shared.join("realct-labelled/chest-lidc0001/ct"))).unwrap();
    let lv = landmark::above_aortic_arch(&lidc).unwrap();
    stats("lidc above arch", &lidc, &[lv.index]);
    for off in [-20isize, -12, -6, -4, 4, 8, 16] {
        let i = (lv.index as isize + off) as usize;
        stats(&format!("lidc z {}", lidc.positions[i][2]), &lidc, &[i]);
    }
    let one = |name: &str, p: PathBuf| {
        let vol = Volume::from_files(&[p]).unwrap();
        stats(name, &vol, &[0]);
    };
    one("chest slice", shared.join("realct/chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm"));
    one("lungmask 0", PathBuf::from("/tmp/guard-lm/0.dcm"));
    one("lungmask 1", PathBuf::from("/tmp/guard-lm/1.dcm"));
    for dir in ["realct/abdomen-ge-3slice", "realct/head-philips/S2010", "realct/head-ge-tilted"] {
        match Volume::from_files(&files(&shared.join(dir))) {
            Ok(vol) => {
                let idx: Vec<usize> = (0..vol.slices()).collect();
                stats(dir, &vol, &idx);
                let m = vol.slices() / 2;
                stats(&format!("{dir} middle"), &vol, &[m]);
            }
            Err(e) => eprintln!("STATS {dir}: {e}"),
        }
    }
}
