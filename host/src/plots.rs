//! Sweep plots of a bench (the paper's Fig. 4): for every swept key with
//! numeric values and every Table 1 metric, the metric's mean against the
//! key's value, one line per (variant, run, other swept values). Written
//! as SVG (text kept as text) and rendered to PNG from the same SVG with
//! resvg, so the two never disagree.

use crate::bench::JobResult;
use crate::evaluate::COLUMNS;
use crate::report::escape;
use ragar_core::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const W: f64 = 640.0;
const H: f64 = 400.0;
// Margins: left (y labels), right (legend), top (title), bottom (x labels).
const L: f64 = 70.0;
const R: f64 = 180.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One plot's lines: label -> (x, y) points.
type Lines = BTreeMap<String, Vec<(f64, f64)>>;

/// An SVG line chart.
pub fn svg(title: &str, x_label: &str, y_label: &str, lines: &Lines) -> String {
    let pts: Vec<(f64, f64)> = lines.values().flatten().copied().collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x0 + 1.0);
    }
    if y1 <= y0 {
        (y0, y1) = (y0 - 1.0, y0 + 1.0);
    }
    let pad = (y1 - y0) * 0.08;
    (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let py = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"DejaVu Sans, sans-serif\" font-size=\"12\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\
         <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>",
        (L + W - R) / 2.0,
        escape(title)
    );
    // Axes, ticks (5 on y, every distinct x).
    s += &format!(
        "<path d=\"M{L},{T} V{} H{}\" stroke=\"black\" fill=\"none\"/>",
        H - B,
        W - R
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let (tick, at, label) = (L - 4.0, py(y), fmt(y));
        s += &format!(
            "<line x1=\"{tick}\" x2=\"{L}\" y1=\"{at}\" y2=\"{at}\" stroke=\"black\"/>\
             <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{label}</text>",
            tx = L - 6.0,
            ty = at + 4.0
        );
    }
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        s += &format!(
            "<line x1=\"{0}\" x2=\"{0}\" y1=\"{1}\" y2=\"{2}\" stroke=\"black\"/><text x=\"{0}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>",
            px(x),
            H - B,
            H - B + 4.0,
            H - B + 18.0,
            fmt(x)
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        (L + W - R) / 2.0,
        H - 12.0,
        escape(x_label)
    );
    s += &format!(
        "<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (T + H - B) / 2.0,
        escape(y_label)
    );
    for (i, (label, points)) in lines.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let mut p = points.clone();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let d: Vec<String> = p.iter().map(|(x, y)| format!("{:.2},{:.2}", px(*x), py(*y))).collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
            d.join(" ")
        );
        for (x, y) in &p {
            s += &format!(
                "<circle cx=\"{:.2}\" cy=\"{:.2}\" r=\"3.5\" fill=\"{c}\"/>",
                px(*x),
                py(*y)
            );
        }
        let ly = T + 14.0 + 18.0 * i as f64;
        s += &format!(
            "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2}\" y2=\"{2}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{3}\" y=\"{4}\">{5}</text>",
            W - R + 10.0,
            W - R + 30.0,
            ly,
            W - R + 35.0,
            ly + 4.0,
            escape(label)
        );
    }
    s + "</svg>\n"
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Render an SVG to PNG bytes (system fonts for the text).
pub fn png(svg: &str) -> Result<Vec<u8>> {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let tree = resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| Error::invalid_input(format!("plot SVG: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| Error::invalid_input("plot of zero size"))?;
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|e| Error::invalid_input(format!("plot PNG: {e}")))
}

/// Every sweep plot of `results` into `dir`; returns the SVG paths.
pub fn sweep_plots(results: &[&JobResult], dir: &Path) -> Result<Vec<PathBuf>> {
    let keys: Vec<String> = {
        let mut k: Vec<String> = results.iter().flat_map(|r| r.job.params.keys().cloned()).collect();
        k.sort();
        k.dedup();
        k
    };
    let mut written = Vec::new();
    for key in keys {
        if !results
            .iter()
            .all(|r| r.job.params.get(&key).is_some_and(serde_json::Value::is_number))
        {
            continue;
        }
        for (_, metric, header) in COLUMNS {
            let mut lines: Lines = BTreeMap::new();
            for r in results {
                let x = r.job.params[&key].as_f64().expect("checked numeric");
                let others: Vec<String> = r
                    .job
                    .params
                    .iter()
                    .filter(|(k, _)| **k != key)
                    .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
                    .collect();
                for (run, means) in &r.metrics {
                    if let Some(y) = means.get(metric) {
                        let mut label = format!("{} {run}", r.job.method);
                        if !others.is_empty() {
                            label += &format!(" ({})", others.join(", "));
                        }
                        lines.entry(label).or_default().push((x, *y));
                    }
                }
            }
            if lines.values().all(|l| l.len() < 2) {
                continue;
            }
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let short = key.rsplit('.').next().unwrap_or(&key);
            let svg_text = svg(&format!("{header} vs {short}"), &key, header, &lines);
            let stem = dir.join(format!("{short}__{metric}"));
            let svg_path = stem.with_extension("svg");
            crate::io::write_atomic(&svg_path, svg_text.as_bytes())?;
            crate::io::write_atomic(&stem.with_extension("png"), &png(&svg_text)?)?;
            written.push(svg_path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(method: &str, k: i64, cps: f64) -> JobResult {
        JobResult {
            job: crate::bench::Job {
                id: format!("{method}-{k}"),
                method: method.into(),
                params: BTreeMap::from([("method.retrieval.k".to_string(), serde_json::json!(k))]),
                overrides: vec![],
                round: 1,
            },
            status: "ok".into(),
            error: None,
            seconds: 1.0,
            peak_rss_mib: 1.0,
            metrics: BTreeMap::from([("ragar".to_string(), BTreeMap::from([("cps".to_string(), cps)]))]),
            timing: serde_json::Value::Null,
            latency: BTreeMap::new(),
            table4: BTreeMap::new(),
            stage: None,
        }
    }

    #[test]
    fn a_numeric_sweep_gives_one_plot_per_metric_present() {
        let rs = [
            result("ragar", 0, 1.0),
            result("ragar", 3, 2.0),
            result("pmg", 0, 0.5),
            result("pmg", 3, 0.7),
        ];
        let refs: Vec<&JobResult> = rs.iter().collect();
        let dir = tempfile::tempdir().unwrap();
        let written = sweep_plots(&refs, dir.path()).unwrap();
        assert_eq!(written, vec![dir.path().join("k__cps.svg")]);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.contains("pmg ragar") && svg.contains("ragar ragar") && svg.matches("<circle").count() == 4);
        assert!(dir.path().join("k__cps.png").is_file());
    }

    #[test]
    fn a_chart_renders_to_png_with_its_lines() {
        let lines: Lines = BTreeMap::from([
            ("ragar".to_string(), vec![(0.0, 1.0), (3.0, 2.5), (5.0, 2.0)]),
            ("pmg <&>".to_string(), vec![(0.0, 0.5), (5.0, 1.5)]),
        ]);
        let s = svg("CPS vs k", "method.retrieval.k", "CPS", &lines);
        assert!(s.contains("pmg &lt;&amp;&gt;") && s.matches("<polyline").count() == 2);
        let png = png(&s).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 400));
        // Both line colours are drawn.
        for c in [[0x1f, 0x77, 0xb4], [0xd6, 0x27, 0x28]] {
            assert!(img.pixels().any(|p| p.0 == c), "colour {c:?} missing");
        }
    }
}
