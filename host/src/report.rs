//! `report.html`: one static page comparing runs (methods) user by user.
//!
//! For each sampled user: the history as a grid, retrieved items outlined
//! with their fusion weights (Eq. 5) and similarities (Eq. 3), the kept
//! keywords, the reference item, and every run's generated image with its
//! metrics (from `ragar evaluate`). On top: the runs' Table 1 and the
//! definition of every metric. Images are embedded as PNG data URIs
//! (thumbnails), so the file works anywhere, offline, on its own; every
//! piece of text from data is HTML-escaped.

use crate::dataset::Dataset;
use crate::evaluate::{SampleMetrics, Summary, COLUMNS};
use crate::pipeline::SampleLine;
use ragar_core::{Error, Result};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Text made safe for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A PNG data URI of the image at `path`, at most `side` pixels a side;
/// `None` when it cannot be read (the page says so instead).
fn thumbnail(path: &Path, side: u32) -> Option<String> {
    let img = ragar_core::vision::decode(path).ok()?.image;
    let scale = (side as f64 / img.width.max(img.height) as f64).min(1.0);
    let (w, h) = (
        ((img.width as f64 * scale).round() as u32).max(1),
        ((img.height as f64 * scale).round() as u32).max(1),
    );
    let small = if scale < 1.0 {
        ragar_core::vision::resize_bicubic(&img, w, h).ok()?
    } else {
        img
    };
    let png = ragar_core::vision::encode_png(&small).ok()?;
    Some(format!("data:image/png;base64,{}", base64(&png)))
}

/// One run folder's contents.
pub struct Run {
    /// Label (the folder's name).
    pub label: String,
    /// The folder.
    pub dir: PathBuf,
    /// samples.jsonl by user.
    pub samples: HashMap<String, SampleLine>,
    /// metrics.jsonl by user (absent when not evaluated).
    pub metrics: HashMap<String, SampleMetrics>,
    /// metrics.json.
    pub summary: Option<Summary>,
    /// User order of samples.jsonl.
    pub order: Vec<String>,
}

impl Run {
    /// Read a run folder (samples.jsonl required; metrics optional).
    pub fn open(dir: &Path) -> Result<Self> {
        let lines: Vec<SampleLine> = crate::io::read_jsonl(&dir.join("samples.jsonl"))?;
        let order = lines.iter().map(|l| l.user.clone()).collect();
        let metrics: Vec<SampleMetrics> = if dir.join("metrics.jsonl").is_file() {
            crate::io::read_jsonl(&dir.join("metrics.jsonl"))?
        } else {
            Vec::new()
        };
        let summary = std::fs::read_to_string(dir.join("metrics.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let label = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy().to_string());
        Ok(Run {
            label,
            dir: dir.to_path_buf(),
            samples: lines.into_iter().map(|l| (l.user.clone(), l)).collect(),
            metrics: metrics.into_iter().map(|m| (m.user.clone(), m)).collect(),
            summary,
            order,
        })
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
section.user{border-top:2px solid #999;margin-top:1.5em;padding-top:.5em}
.grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;width:110px;font-size:11px;text-align:center}
figure img{width:100px;height:100px;object-fit:contain;background:#fafafa;border:3px solid transparent}
figure.retrieved img{border-color:#d62728}.missing{width:100px;height:100px;background:#eee;display:flex;align-items:center;justify-content:center}
.gens{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}.gens figure{width:190px}.gens img{width:180px;height:180px}
.kw span{display:inline-block;background:#eef;border-radius:3px;padding:0 .3em;margin:1px}
dl.defs dt{font-weight:600}dl.defs dd{margin:0 0 .4em 1em}";

fn figure(class: &str, src: Option<String>, caption: &str, attrs: &str) -> String {
    let img = match src {
        Some(s) => format!("<img src=\"{s}\" alt=\"{}\">", escape(caption)),
        None => "<div class=\"missing\">image not readable</div>".into(),
    };
    format!(
        "<figure class=\"{class}\"{attrs}>{img}<figcaption>{}</figcaption></figure>",
        escape(caption)
    )
}

/// Write the page for `runs` to `out`; `users` caps how many users it shows
/// (the first run's order, users whose sample did not fail).
pub fn write(data: &Dataset, runs: &[Run], users: usize, out: &Path) -> Result<usize> {
    let first = runs
        .first()
        .ok_or_else(|| Error::invalid_input("a report needs at least one run"))?;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ragar report</title><style>{STYLE}</style></head><body>\
         <h1>ragar report</h1><p>Runs: {}</p>",
        runs.iter().map(|r| format!("<code>{}</code>", escape(&r.label))).collect::<Vec<_>>().join(", ")
    );
    // Table 1.
    html += "<h2>Metrics</h2><table id=\"metrics\"><tr><th rowspan=\"2\">run</th><th colspan=\"5\">Personalization</th><th colspan=\"4\">Semantic alignment</th></tr><tr>";
    for (_, _, h) in COLUMNS {
        let _ = write!(html, "<th>{}</th>", escape(h));
    }
    html += "</tr>";
    for r in runs {
        let _ = write!(html, "<tr><td>{}</td>", escape(&r.label));
        for (_, k, _) in COLUMNS {
            match r.summary.as_ref().and_then(|s| s.means.get(k)) {
                Some(v) => {
                    let _ = write!(html, "<td>{v:.4}</td>");
                }
                None => html += "<td>n/a</td>",
            }
        }
        html += "</tr>";
    }
    html += "</table>";
    for r in runs {
        for n in r.summary.iter().flat_map(|s| &s.notes) {
            let _ = write!(html, "<p class=\"note\">{}: {}</p>", escape(&r.label), escape(n));
        }
    }
    html += "<details><summary>Definitions</summary><dl class=\"defs\">\
        <dt>CPS</dt><dd>100 cos(image feature of the generated image, text feature of the preference text: the kept keywords joined by \", \", or the history items' texts when none were kept; with <code>evaluation.cps: history</code>, the mean score against each history item's text).</dd>\
        <dt>CPIS</dt><dd>Mean over the history images of 100 cos(generated, history image) (image features).</dd>\
        <dt>LPIPS, SSIM (personalization)</dt><dd>Means over the history images; images padded to a white square and resized (LANCZOS) to the generated size. LPIPS v0.1 (lpips package); SSIM: Gaussian 11x11, sigma 1.5, data range 255, mean over RGB.</dd>\
        <dt>ΔR (rank change, Eq. 16)</dt><dd>(r_o - r_g) / log2(1 + r_o): r_o the reference item's rank among the catalogue items outside the history, r_g the generated image's rank in its place (1 = first). Larger = more personalized.</dd>\
        <dt>CS</dt><dd>100 cos(generated image, text feature of the reference item's text).</dd>\
        <dt>CIS</dt><dd>100 cos(generated image, reference image) (image features).</dd>\
        <dt>LPIPS, SSIM (semantic alignment)</dt><dd>Against the reference image, prepared as above.</dd></dl></details>";
    let picked: Vec<&String> = first
        .order
        .iter()
        .filter(|u| first.samples[*u].error.is_none())
        .take(users)
        .collect();
    for user_id in &picked {
        let Some(user) = data.users.iter().find(|u| &&u.user == user_id) else {
            continue;
        };
        let s = &first.samples[*user_id];
        let weights: HashMap<&str, (f32, f32)> = s
            .prepared
            .retrieved_items
            .iter()
            .zip(
                s.prepared
                    .retrieved
                    .weights
                    .iter()
                    .zip(&s.prepared.retrieved.similarities),
            )
            .map(|(id, (w, sim))| (id.as_str(), (*w, *sim)))
            .collect();
        let _ = write!(
            html,
            "<section class=\"user\" data-user=\"{}\"><h2>User {}</h2><h3>History</h3><div class=\"grid\">",
            escape(&user.user),
            escape(&user.user)
        );
        for id in &user.history {
            let src = data.items[id].image.as_deref().and_then(|p| thumbnail(p, 100));
            let (class, caption, attrs) = match weights.get(id.as_str()) {
                Some((w, sim)) => (
                    "item retrieved",
                    format!("{id} · w {w:.3} · sim {sim:.3}"),
                    format!(" data-item=\"{}\" data-weight=\"{w}\"", escape(id)),
                ),
                None => ("item", id.clone(), format!(" data-item=\"{}\"", escape(id))),
            };
            html += &figure(class, src, &caption, &attrs);
        }
        html += "</div><h3>Kept keywords</h3><p class=\"kw\">";
        for k in &s.prepared.keywords {
            let _ = write!(html, "<span>{} ({})</span>", escape(&k.keyword), k.count);
        }
        if s.prepared.keywords.is_empty() {
            html += "<em>none kept</em>";
        }
        html += "</p><h3>Reference and generated images</h3><div class=\"gens\">";
        let reference = user.reference.as_deref().unwrap_or_default();
        let ref_src = data
            .items
            .get(reference)
            .and_then(|i| i.image.as_deref())
            .and_then(|p| thumbnail(p, 180));
        html += &figure("reference", ref_src, &format!("reference: {reference}"), "");
        for r in runs {
            let sample = r.samples.get(*user_id);
            let src = sample
                .and_then(|l| l.image.as_ref())
                .and_then(|i| thumbnail(&r.dir.join(i), 180));
            let mut cap = r.label.clone();
            if let Some(m) = r.metrics.get(*user_id) {
                for (_, k, h) in COLUMNS {
                    if let Some(v) = m.metrics.get(k) {
                        let _ = write!(cap, " · {h} {v:.3}");
                    }
                }
            }
            if let Some(e) = sample.and_then(|l| l.error.as_ref()) {
                let _ = write!(cap, " · failed: {e}");
            }
            html += &figure("generated", src, &cap, &format!(" data-run=\"{}\"", escape(&r.label)));
        }
        html += "</div></section>";
    }
    // Once loaded, the page records how many of its images decoded (a
    // browser-side check the tests read back; harmless when opened by hand).
    html += "<script>addEventListener('load',()=>{const i=[...document.images];\
        document.body.dataset.images=i.length;document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>";
    html += "</body></html>\n";
    crate::io::write_atomic(out, html.as_bytes())?;
    Ok(picked.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_base64() {
        assert_eq!(
            escape("<b a='1'>&\"</b>"),
            "&lt;b a=&#39;1&#39;&gt;&amp;&quot;&lt;/b&gt;"
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
