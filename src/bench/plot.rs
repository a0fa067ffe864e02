//! An SVG picture of a gate run: achieved GB/s against context length (log₂ x axis), one line
//! per kernel series (attention shapes, decode models), and the run's copy bandwidth as a dashed
//! horizontal roofline — so a regression shows as a line that dropped away from the roofline.
//! With a baseline ([`svg_against`]) its series are drawn thin and grey underneath.
//!
//! Hand-written SVG 1.1 (no dependency), self-contained, no scripts or external fonts; every text
//! is XML-escaped. Figures without `kernel`, `context` and `gbps` (the copy figure) are not
//! series; the copy bandwidth is the roofline.

use std::fmt::Write as _;

use super::gate::{Figure, RunResults};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
/// Plot area: left, top, right, bottom edges.
const LEFT: f64 = 80.0;
const TOP: f64 = 64.0;
const RIGHT: f64 = 690.0;
const BOTTOM: f64 = 470.0;
/// Series colours (Okabe–Ito, readable by the colour-blind), cycled.
const COLOURS: [&str; 8] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];

/// One series: its name and (context, GB/s) points sorted by context.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Groups the plotted figures of `results` by kernel, in order of first appearance.
fn series(results: &RunResults) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for f in &results.figures {
        let Figure { kernel: Some(kernel), context: Some(context), gbps: Some(gbps), .. } = f else {
            continue;
        };
        if !gbps.is_finite() || *context == 0 {
            continue;
        }
        let point = (*context as f64, *gbps);
        match out.iter_mut().find(|s| &s.name == kernel) {
            Some(s) => s.points.push(point),
            None => out.push(Series { name: kernel.clone(), points: vec![point] }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The picture of `results` alone.
pub fn svg(results: &RunResults) -> String {
    svg_against(results, None)
}

/// The picture of `results`, with `baseline`'s series (and roofline) drawn thin and grey beneath.
pub fn svg_against(results: &RunResults, baseline: Option<&RunResults>) -> String {
    let now = series(results);
    let base = baseline.map(series).unwrap_or_default();
    let all_points = || now.iter().chain(&base).flat_map(|s| s.points.iter().copied());

    // x: log₂ of the context, padded half an octave each side.
    let (mut x_lo, mut x_hi) =
        all_points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| (lo.min(x.log2()), hi.max(x.log2())));
    if !x_lo.is_finite() {
        (x_lo, x_hi) = (9.0, 14.0); // 512..16384 when there is nothing to draw
    }
    let (x_lo, x_hi) = (x_lo - 0.5, x_hi + 0.5);
    let x_of = |context: f64| LEFT + (context.log2() - x_lo) / (x_hi - x_lo) * (RIGHT - LEFT);

    // y: 0 to a round number above the roofline and every point.
    let mut y_max = all_points().map(|p| p.1).fold(0.0, f64::max).max(results.copy_gbps);
    if let Some(b) = baseline {
        y_max = y_max.max(b.copy_gbps);
    }
    let y_step = nice_step(if y_max.is_finite() && y_max > 0.0 { y_max * 1.08 } else { 1.0 } / 5.0);
    let y_top = (y_max * 1.08 / y_step).ceil().max(1.0) * y_step;
    let y_of = |gbps: f64| BOTTOM - gbps / y_top * (BOTTOM - TOP);

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    s.push('\n');
    let _ = writeln!(s, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let d = &results.device;
    let title = format!("{}: achieved bandwidth vs context length", d.name);
    let mut subtitle = format!(
        "driver {} {} ({}), Vulkan {}; vkdecode gate, {} set, commit {}, {}",
        d.driver_name,
        d.driver_info,
        d.driver_version_text(),
        d.api_version,
        results.set,
        results.commit.get(..12).unwrap_or(&results.commit),
        results.created
    );
    if results.slow_down_attention > 0 {
        subtitle.push_str(&format!("; attention slowed on purpose ({}× extra)", results.slow_down_attention));
    }
    s.push_str(&text_line(20.0, 26.0, 16.0, r#" font-weight="bold""#, &title));
    s.push_str(&text_line(20.0, 46.0, 12.0, r##" fill="#555""##, &subtitle));

    // Grid, ticks and labels.
    let mut y = 0.0;
    while y <= y_top + y_step / 2.0 {
        let py = y_of(y);
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="#e5e5e5"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            py + 4.0,
            axis_label(y, y_step)
        );
        y += y_step;
    }
    for e in (x_lo.ceil() as i32)..=(x_hi.floor() as i32) {
        let px = LEFT + (f64::from(e) - x_lo) / (x_hi - x_lo) * (RIGHT - LEFT);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{BOTTOM}" stroke="#e5e5e5"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            BOTTOM + 18.0,
            context_label(e)
        );
    }
    let _ = writeln!(s, r#"<path class="axes" d="M{LEFT},{TOP} V{BOTTOM} H{RIGHT}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">context length (tokens in the KV cache, log scale)</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 42.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {:.1}) rotate(-90)" text-anchor="middle">achieved GB/s (bytes read / median time)</text>"#,
        (TOP + BOTTOM) / 2.0
    );

    // Baseline beneath, then the roofline, then this run.
    if let Some(b) = baseline {
        let py = y_of(b.copy_gbps);
        let _ = writeln!(
            s,
            r##"<line class="baseline-roofline" x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="#999" stroke-width="1" stroke-dasharray="2 4"/>"##
        );
    }
    for series in &base {
        let _ = writeln!(
            s,
            r##"<polyline class="baseline" points="{}" fill="none" stroke="#aaa" stroke-width="1.5"/>"##,
            points(&series.points, x_of, y_of)
        );
    }
    let py = y_of(results.copy_gbps);
    let _ = writeln!(
        s,
        r#"<line class="roofline" x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="black" stroke-width="1.5" stroke-dasharray="8 5"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">copy roofline {} GB/s</text>"#,
        RIGHT - 4.0,
        py - 6.0,
        tick_label(results.copy_gbps)
    );
    for (i, series) in now.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            s,
            r#"<polyline class="series" points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            points(&series.points, x_of, y_of)
        );
        for &(x, g) in &series.points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{} at {x}: {} GB/s</title></circle>"#,
                x_of(x),
                y_of(g),
                escape(&series.name),
                tick_label(g)
            );
        }
    }

    // Legend to the right of the plot.
    let lx = RIGHT + 20.0;
    let _ = writeln!(s, r#"<text x="{lx}" y="{TOP}" font-weight="bold">series</text>"#);
    let mut ly = TOP + 20.0;
    for (i, series) in now.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2"/>"#,
            ly - 4.0,
            lx + 24.0,
            ly - 4.0
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#, lx + 30.0, escape(&series.name));
        ly += 18.0;
    }
    let _ = writeln!(
        s,
        r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black" stroke-width="1.5" stroke-dasharray="8 5"/>"#,
        ly - 4.0,
        lx + 24.0,
        ly - 4.0
    );
    let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">copy bandwidth (roofline)</text>"#, lx + 30.0);
    if baseline.is_some() {
        ly += 18.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#aaa" stroke-width="1.5"/>"##,
            ly - 4.0,
            lx + 24.0,
            ly - 4.0
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">baseline (roofline dotted)</text>"#, lx + 30.0);
    }
    s.push_str("</svg>\n");
    s
}

fn points(points: &[(f64, f64)], x_of: impl Fn(f64) -> f64, y_of: impl Fn(f64) -> f64) -> String {
    points.iter().map(|&(x, g)| format!("{:.1},{:.1}", x_of(x), y_of(g))).collect::<Vec<_>>().join(" ")
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(10.0 * magnitude)
}

/// `2^e` as `512`, `4K`, `16K`, `1M`.
fn context_label(e: i32) -> String {
    match e {
        ..0 => format!("{}", 2f64.powi(e)),
        0..10 => format!("{}", 1u64 << e),
        10..20 => format!("{}K", 1u64 << (e - 10)),
        _ => format!("{}M", 1u64 << (e - 20).min(40)),
    }
}

/// A y tick: as many decimals as the step needs (`0.2`, `500`).
fn axis_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 9.0) as usize;
    format!("{v:.decimals$}")
}

/// One line of text at (`x`, `y`), its font made smaller when the line would run past the
/// picture's right edge (estimated at 0.68 em per character, wide enough for bold sans-serif;
/// `textLength` would be exact but renderers disagree on squeezing glyphs).
fn text_line(x: f64, y: f64, size: f64, attributes: &str, text: &str) -> String {
    let room = WIDTH - x - 10.0;
    let estimate = text.chars().count() as f64 * 0.68 * size;
    let size = if estimate > room { (size * room / estimate).max(6.0) } else { size };
    format!("<text x=\"{x}\" y=\"{y}\" font-size=\"{size:.1}\"{attributes}>{}</text>\n", escape(text))
}

/// A GB/s value to four significant digits (`2913`, `12.35`, `0.009712`).
fn tick_label(v: f64) -> String {
    if !v.is_finite() || v == 0.0 {
        return format!("{v}");
    }
    let decimals = (3 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{v:.decimals$}")
}

/// Escapes text for XML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::gate::{Better, DeviceIdentity, FORMAT_VERSION, GateSet};
    use super::*;

    fn figure(kernel: &str, context: usize, gbps: f64) -> Figure {
        Figure {
            name: format!("{kernel} {context}"),
            unit: "µs/call".into(),
            better: Better::Lower,
            median: 1.0,
            p10: 0.9,
            p90: 1.1,
            samples: 5,
            kernel: Some(kernel.into()),
            context: Some(context),
            gbps: Some(gbps),
        }
    }

    fn run() -> RunResults {
        let copy = Figure { kernel: None, context: None, gbps: None, ..figure("copy", 0, 0.0) };
        RunResults {
            format_version: FORMAT_VERSION,
            set: GateSet::Full,
            slow_down_attention: 0,
            device: DeviceIdentity {
                name: "Device <A&B>".into(),
                vendor_id: 0x10de,
                device_id: 1,
                driver_name: "NVIDIA".into(),
                driver_info: "580".into(),
                driver_version: 580 << 22,
                api_version: "1.4".into(),
            },
            commit: "abc".into(),
            created: "2025-01-01T00:00:00Z".into(),
            runs: 1,
            copy_gbps: 2900.0,
            figures: vec![
                copy,
                figure("attention h32:kv8:d128 f16", 16384, 2500.0),
                figure("attention h32:kv8:d128 f16", 512, 900.0),
                figure("attention h16:kv8:d128 f16", 4096, 2000.0),
                figure("decode qwen3-8b", 512, 2100.0),
            ],
        }
    }

    /// Every element opened is closed, in order (a tag-balance check, enough for hand-written
    /// SVG without comments or CDATA).
    #[track_caller]
    fn assert_well_formed(svg: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("an unterminated tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "a `<` inside tag `{tag}`");
            let name = tag.trim_start_matches('/').split(|c: char| c.is_whitespace() || c == '/').next().unwrap();
            if tag.starts_with('/') {
                assert_eq!(stack.pop(), Some(name), "closing `{name}`");
            } else if !tag.ends_with('/') {
                stack.push(name);
            }
            assert!(!rest[..open].contains('>'), "a stray `>` before `<{tag}>`");
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(!rest.contains('>'));
    }

    #[test]
    fn the_picture_has_the_roofline_and_one_line_per_series() {
        let svg = svg(&run());
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert_well_formed(&svg);
        assert_eq!(svg.matches(r#"class="roofline""#).count(), 1);
        assert_eq!(svg.matches("<polyline").count(), 3, "one per series: two attention shapes, one model");
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("Device &lt;A&amp;B&gt;") && !svg.contains("<A&B>"));
        assert!(svg.contains(">16K<") && svg.contains(">512<"), "log₂ ticks");
        // The attention series runs left to right: kv 512 before kv 16384.
        let line = svg.lines().find(|l| l.contains(r#"class="series""#)).unwrap();
        let xs: Vec<f64> =
            line.split('"').nth(3).unwrap().split(' ').map(|p| p.split(',').next().unwrap().parse().unwrap()).collect();
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
    }

    #[test]
    fn a_baseline_is_drawn_beneath() {
        let svg = svg_against(&run(), Some(&run()));
        assert_well_formed(&svg);
        assert_eq!(svg.matches(r#"<polyline class="baseline""#).count(), 3);
        assert_eq!(svg.matches(r#"<polyline class="series""#).count(), 3);
    }

    #[test]
    fn a_run_without_series_still_draws_axes() {
        let mut r = run();
        r.figures.retain(|f| f.kernel.is_none());
        let svg = svg(&r);
        assert_well_formed(&svg);
        assert!(svg.contains(r#"class="roofline""#) && !svg.contains(r#"class="series""#));
    }
}
