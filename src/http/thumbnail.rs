//! A PNG preview of one of our own Secondary Capture overlays, for the
//! status page. Only our SC layout is supported (8-bit RGB, native
//! uncompressed), which is all the node ever writes.

use std::path::Path;

use dicom_dictionary_std::tags;

#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

/// Nearest-neighbour downscale so the longer side is at most `max_side`.
pub fn png_from_sc(path: &Path, max_side: u32) -> Result<Vec<u8>, ThumbnailError> {
    let read = |message: String| ThumbnailError::Read {
        path: path.display().to_string(),
        message,
    };
    let obj = dicom_object::open_file(path).map_err(|e| read(e.to_string()))?;
    let int = |tag| -> Result<u32, ThumbnailError> {
        obj.element(tag)
            .map_err(|e| read(e.to_string()))?
            .to_int::<u32>()
            .map_err(|e| read(e.to_string()))
    };
    let (rows, cols, spp) = (int(tags::ROWS)?, int(tags::COLUMNS)?, int(tags::SAMPLES_PER_PIXEL)?);
    let planar = obj.element(tags::PLANAR_CONFIGURATION).ok().and_then(|e| e.to_int::<u32>().ok()).unwrap_or(0);
    if spp != 3 || int(tags::BITS_ALLOCATED)? != 8 {
        return Err(ThumbnailError::Unsupported(format!("not 8-bit RGB (samples per pixel {spp})")));
    }
    let data = obj
        .element(tags::PIXEL_DATA)
        .map_err(|e| read(e.to_string()))?
        .to_bytes()
        .map_err(|e| read(e.to_string()))?;
    let n = (rows * cols) as usize;
    if data.len() < n * 3 {
        return Err(ThumbnailError::Unsupported("pixel data shorter than rows x columns x 3".into()));
    }
    let scale = (rows.max(cols) as f64 / max_side as f64).max(1.0);
    let (h, w) = (((rows as f64) / scale).round().max(1.0) as u32, ((cols as f64) / scale).round().max(1.0) as u32);
    let mut rgb = Vec::with_capacity((h * w * 3) as usize);
    for y in 0..h {
        let sy = ((y as f64 * scale) as u32).min(rows - 1);
        for x in 0..w {
            let sx = ((x as f64 * scale) as u32).min(cols - 1);
            let i = (sy * cols + sx) as usize;
            for c in 0..3 {
                rgb.push(if planar == 1 { data[c * n + i] } else { data[i * 3 + c] });
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| read(e.to_string()))?;
        wr.write_image_data(&rgb).map_err(|e| read(e.to_string()))?;
    }
    Ok(out)
}
