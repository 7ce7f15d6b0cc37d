//! Inline SVG charts drawn with `plotters` (its SVG backend: no fonts, no scripts; text goes in
//! as escaped `<text>` elements the browser renders). Each chart carries `data-chart` (its name)
//! and `data-total` (the sum of what it draws) on its wrapper, so tests and readers can check
//! that a chart shows the counts of its table.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colours of the series, in order (a colour-blind-safe palette).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(90, 90, 90),
];

pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One named series of values, one per category.
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// How series share a category's slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bars {
    /// Side by side.
    Grouped,
    /// On top of each other.
    Stacked,
}

/// `#rrggbb` of series `i`, for the HTML legend.
fn colour_hex(i: usize) -> String {
    let RGBColor(r, g, b) = colour(i);
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn wrap(name: &str, total: f64, svg: String, legend: &[Series]) -> String {
    let mut keys = String::new();
    if legend.len() > 1 {
        keys.push_str("<figcaption class=\"legend\">");
        for (i, s) in legend.iter().enumerate() {
            keys.push_str(&format!(
                "<span><i style=\"background:{}\"></i>{}</span>",
                colour_hex(i),
                super::html::escape(&s.name)
            ));
        }
        keys.push_str("</figcaption>");
    }
    format!(
        "<figure class=\"chart\" data-chart=\"{}\" data-total=\"{}\">{svg}{keys}</figure>",
        super::html::escape(name),
        total
    )
}

fn failed(name: &str, e: impl std::fmt::Display) -> String {
    format!(
        "<p class=\"note\">chart {} could not be drawn: {}</p>",
        super::html::escape(name),
        super::html::escape(&e.to_string())
    )
}

/// A bar chart of `series` over `categories`, with an HTML legend under it when there are
/// several series.
pub fn bars(name: &str, title: &str, categories: &[String], series: &[Series], mode: Bars) -> String {
    let total: f64 = series.iter().flat_map(|s| s.values.iter()).sum();
    match draw_bars(title, categories, series, mode) {
        Ok(svg) => wrap(name, total, svg, series),
        Err(e) => failed(name, e),
    }
}

fn draw_bars(
    title: &str,
    categories: &[String],
    series: &[Series],
    mode: Bars,
) -> Result<String, Box<dyn std::error::Error>> {
    let n = categories.len().max(1);
    let top = match mode {
        Bars::Grouped => series.iter().flat_map(|s| s.values.iter().copied()).fold(0.0, f64::max),
        Bars::Stacked => (0..n)
            .map(|i| series.iter().map(|s| s.values.get(i).copied().unwrap_or(0.0)).sum())
            .fold(0.0, f64::max),
    };
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    let width = (120 + 70 * n as u32).clamp(420, 960);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|y| short(*y))
            .draw()?;
        // Category names under the middle of each slot, placed in pixels.
        let style = TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, c) in categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(c.clone(), (x, y + 6), style.clone()))?;
        }
        let k = series.len().max(1) as f64;
        for (j, s) in series.iter().enumerate() {
            let fill = colour(j).filled();
            let rects = s.values.iter().enumerate().map(|(i, &v)| {
                let (x0, x1, y0) = match mode {
                    Bars::Grouped => {
                        let w = 0.8 / k;
                        let x0 = i as f64 + 0.1 + w * j as f64;
                        (x0, x0 + w, 0.0)
                    }
                    Bars::Stacked => {
                        let below: f64 = series[..j]
                            .iter()
                            .map(|p| p.values.get(i).copied().unwrap_or(0.0))
                            .sum();
                        (i as f64 + 0.15, i as f64 + 0.85, below)
                    }
                };
                Rectangle::new([(x0, y0), (x1, y0 + v)], fill)
            });
            chart.draw_series(rects)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A line chart of `points` (x, y), e.g. a training curve.
pub fn line(name: &str, title: &str, x_desc: &str, points: &[(f64, f64)]) -> String {
    match draw_line(title, x_desc, points) {
        Ok(svg) => wrap(name, points.len() as f64, svg, &[]),
        Err(e) => failed(name, e),
    }
}

fn draw_line(title: &str, x_desc: &str, points: &[(f64, f64)]) -> Result<String, Box<dyn std::error::Error>> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (x0, x1) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
    let (x0, x1) = if finite.is_empty() {
        (0.0, 1.0)
    } else {
        (x0, x1.max(x0 + 1.0))
    };
    let pad = ((y1 - y0).abs() * 0.1).max(1e-9);
    let (y0, y1) = if finite.is_empty() {
        (0.0, 1.0)
    } else {
        (y0 - pad, y1 + pad)
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (440, 260)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(65)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .x_label_formatter(&|x| short(*x))
            .y_label_formatter(&|y| fixed(*y, y1 - y0))
            .draw()?;
        chart.draw_series(LineSeries::new(finite.iter().copied(), colour(0).stroke_width(2)))?;
        root.present()?;
    }
    Ok(svg)
}

/// `v` with enough decimals to tell apart ticks over a range of `span`.
fn fixed(v: f64, span: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-3) {
        return short(v);
    }
    let digits = (2.0 - span.max(1e-12).log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.digits$}")
}

/// A number in a few characters: 1234567 -> 1.23M, 0.000123 -> 1.23e-4.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 1.0 {
        format!("{}", (v * 100.0).round() / 100.0)
    } else if a >= 1e-3 {
        format!("{v:.4}")
    } else {
        format!("{v:.2e}")
    }
}
