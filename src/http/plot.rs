//! The Bland-Altman plot of a shadow candidate against the active version,
//! drawn as SVG on the server: no script, no library, and the status page's
//! Content-Security-Policy needs nothing new.
//!
//! Input: an [`Agreement`]. Output: an SVG document. x: the mean of the two
//! values; y: candidate − active; solid line: the bias; dashed: the 95%
//! limits of agreement; dotted: zero. Text from the stores (version, unit) is
//! XML-escaped.

use std::fmt::Write;

use crate::job::shadow::Agreement;

const W: f64 = 560.0;
const H: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// About five round tick values over `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// Four significant digits, no trailing zeros.
fn fmt(v: f64) -> String {
    let digits = if v == 0.0 { 0 } else { (3 - v.abs().log10().floor() as i32).clamp(0, 9) as usize };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
    if s == "-0" { "0".into() } else { s.to_owned() }
}

pub fn bland_altman(a: &Agreement) -> String {
    let unit = a.unit.as_deref().map(|u| format!(" ({})", esc(u))).unwrap_or_default();
    let pts: Vec<(f64, f64)> =
        a.pairs.iter().map(|p| ((p.active_value + p.candidate_value) / 2.0, p.difference)).collect();
    let mut ys: Vec<f64> = pts.iter().map(|p| p.1).chain([0.0]).collect();
    ys.extend(a.stats.bias);
    ys.extend(a.stats.limits_of_agreement.into_iter().flatten());
    let (mut x0, mut x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    let (mut y0, mut y1) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(*y), hi.max(*y)));
    let pad = |lo: f64, hi: f64, floor: f64| {
        let m = ((hi - lo) * 0.08).max(floor).max(1e-6);
        (lo - m, hi + m)
    };
    (x0, x1) = pad(x0, x1, x1.abs().max(x0.abs()) * 0.05);
    // Differences all alike (two identical versions): still a readable
    // axis, ±2% of the values' scale around them.
    (y0, y1) = pad(y0, y1, x1.abs().max(x0.abs()) * 0.02);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"##
    );
    let _ = write!(s, r##"<rect width="{W}" height="{H}" fill="#fff"/>"##);
    let title = format!(
        "{} {} vs active: n = {}, bias {}, LoA {}",
        esc(&a.model),
        esc(&a.candidate_version),
        a.stats.n,
        a.stats.bias.map(fmt).unwrap_or_else(|| "–".into()),
        a.stats.limits_of_agreement.map(|[l, h]| format!("[{}, {}]", fmt(l), fmt(h))).unwrap_or_else(|| "–".into()),
    );
    let _ = write!(s, r##"<text x="{LEFT}" y="20" font-size="13">{title}</text>"##);
    let (px0, px1, py0, py1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let _ = write!(s, r##"<rect x="{px0}" y="{py0}" width="{}" height="{}" fill="none" stroke="#999"/>"##, px1 - px0, py1 - py0);
    for t in ticks(x0, x1) {
        let x = sx(t);
        let _ = write!(s, r##"<line x1="{x:.1}" y1="{py1}" x2="{x:.1}" y2="{}" stroke="#999"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##, py1 + 4.0, py1 + 16.0, fmt(t));
    }
    for t in ticks(y0, y1) {
        let y = sy(t);
        let _ = write!(s, r##"<line x1="{}" y1="{y:.1}" x2="{px0}" y2="{y:.1}" stroke="#999"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##, px0 - 4.0, px0 - 6.0, y + 4.0, fmt(t));
    }
    // Labels: the bias on the left, the limits on the right, the upper one
    // above its line and the lower one below, so none overlap even when
    // the limits close in on the bias.
    let hline = |s: &mut String, y: f64, style: &str, label: &str, at_left: bool, above: bool| {
        let yy = sy(y);
        let _ = write!(s, r##"<line x1="{px0}" y1="{yy:.1}" x2="{px1}" y2="{yy:.1}" {style}/>"##);
        if !label.is_empty() {
            let (x, anchor) = if at_left { (px0 + 4.0, "start") } else { (px1 - 4.0, "end") };
            let ty = if above { yy - 4.0 } else { yy + 12.0 };
            let _ = write!(s, r##"<text x="{x}" y="{ty:.1}" text-anchor="{anchor}" fill="#333">{label} {}</text>"##, fmt(y));
        }
    };
    hline(&mut s, 0.0, r##"stroke="#bbb" stroke-dasharray="1 3""##, "", true, true);
    if let Some(b) = a.stats.bias {
        hline(&mut s, b, r##"stroke="#1f5fa8" stroke-width="1.5""##, "bias", true, true);
    }
    if let Some([l, h]) = a.stats.limits_of_agreement {
        hline(&mut s, l, r##"stroke="#c0392b" stroke-dasharray="6 4""##, "−1.96 SD", false, false);
        hline(&mut s, h, r##"stroke="#c0392b" stroke-dasharray="6 4""##, "+1.96 SD", false, true);
    }
    for (x, y) in &pts {
        let _ = write!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#1f5fa8" fill-opacity="0.6"/>"##, sx(*x), sy(*y));
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">mean of active and candidate{unit}</text>"##,
        (px0 + px1) / 2.0,
        H - 10.0
    );
    let _ = write!(
        s,
        r##"<text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">candidate − active{unit}</text>"##,
        (py0 + py1) / 2.0
    );
    if pts.is_empty() {
        let _ = write!(s, r##"<text x="{}" y="{}" text-anchor="middle" fill="#666">no pairs yet</text>"##, (px0 + px1) / 2.0, (py0 + py1) / 2.0);
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::shadow::{stats, Pair};

    #[test]
    fn plot_draws_every_pair_and_the_limits_and_escapes_text() {
        let pairs: Vec<Pair> = [(1.0, 1.5), (2.0, 2.5), (3.0, 2.5), (4.0, 5.0)]
            .iter()
            .enumerate()
            .map(|(i, (a, c))| Pair {
                series_instance_uid: format!("1.{i}"),
                route: "r".into(),
                generation: 1,
                active_version: "1".into(),
                active_value: *a,
                active_job: i as i64,
                candidate_value: *c,
                candidate_job: 10 + i as i64,
                difference: c - a,
            })
            .collect();
        let a = Agreement {
            model: "pma".into(),
            candidate_version: "2<x>".into(),
            unit: Some("cm2".into()),
            stats: stats(&[(1.0, 1.5), (2.0, 2.5), (3.0, 2.5), (4.0, 5.0)]),
            pending: 0,
            unpaired: 0,
            worst: vec![],
            pairs,
        };
        let svg = bland_altman(&a);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("bias 0.375") && svg.contains("+1.96 SD 1.608"), "{svg}");
        assert!(svg.contains("2&lt;x&gt;") && !svg.contains("2<x>"));
        assert!(bland_altman(&Agreement { pairs: vec![], stats: stats(&[]), ..a }).contains("no pairs yet"));
        assert_eq!(ticks(0.0, 1.0).len(), 6);
        assert_eq!((fmt(0.0), fmt(10.0), fmt(-0.5), fmt(1234.5678)), ("0".into(), "10".into(), "-0.5".into(), "1235".into()));
    }
}
