//! Line and bar charts for `fedra report`, each written as SVG and PNG. Text is drawn with the
//! font fedra embeds, so pictures render the same on any machine without system fonts.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

const SIZE: (u32, u32) = (960, 600);
/// Space around a chart and for its axis labels, in pixels; `legend_corner` measures against
/// what is left.
const MARGIN: u32 = 16;
const X_LABEL_AREA: u32 = 48;
const Y_LABEL_AREA: u32 = 64;
/// The caption's height, about (24-pixel text and its gap).
const CAPTION: u32 = 30;

/// Render `$draw` (a closure over a drawing area, pasted once per backend so each copy gets
/// its own type) into `dir/stem.svg` and `dir/stem.png`.
macro_rules! render_both {
    ($dir:expr, $stem:expr, $draw:expr) => {{
        crate::plot::register_fonts();
        let svg = $dir.join(format!("{}.svg", $stem));
        {
            let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            ($draw)(&root)?;
            root.present()
                .map_err(|e| anyhow!("{}: {e}", svg.display()))?;
        }
        let png = $dir.join(format!("{}.png", $stem));
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        ($draw)(&root)?;
        root.present()
            .map_err(|e| anyhow!("{}: {e}", png.display()))?;
        Ok(())
    }};
}

fn color(i: usize) -> RGBColor {
    // Matplotlib's tab10 and then black and navy: the twelve lines of a remedies comparison
    // stay distinct.
    const PALETTE: [RGBColor; 12] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(0, 0, 0),
        RGBColor(0, 0, 128),
    ];
    PALETTE[i % PALETTE.len()]
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A tick label: whole numbers without decimals (rounds, percentages), others with as few
/// decimals as tell neighbouring ticks apart.
fn tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// One line (with markers) per series.
pub fn lines(
    dir: &Path,
    stem: &str,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = padded(x0, x1);
    let (y0, y1) = padded(y0, y1);
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        x_label: &str,
        y_label: &str,
        series: &[(String, Vec<(f64, f64)>)],
        range: (f64, f64, f64, f64),
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(MARGIN)
            .x_label_area_size(X_LABEL_AREA)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(range.0..range.1, range.2..range.3)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(err)?;
        for (i, (name, points)) in series.iter().enumerate() {
            let c = color(i);
            let pts: Vec<(f64, f64)> = points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
            if pts.len() <= 60 {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(legend_corner(series, range))
            .draw()
            .map_err(err)?;
        Ok(())
    }
    let range = (x0, x1, y0, y1);
    render_both!(dir, stem, |root| draw(
        root, title, x_label, y_label, series, range
    ))
}

/// The plot area of a `lines` chart in pixels, about: the canvas less its margins, caption and
/// label areas. A legend box is measured against it.
const PLOT_PX: (f64, f64) = (
    (SIZE.0 - 2 * MARGIN - Y_LABEL_AREA) as f64,
    (SIZE.1 - 2 * MARGIN - X_LABEL_AREA - CAPTION) as f64,
);

/// The corner for a line chart's legend: the one whose box (sized from the number of entries and
/// the longest name) covers the least of the lines, so that a point at the chart's edge, such as
/// the highest EMD of a sweep at the bottom right, is not drawn behind the legend. On a tie the
/// earlier of lower right, upper right, lower left, upper left.
fn legend_corner(
    series: &[(String, Vec<(f64, f64)>)],
    range: (f64, f64, f64, f64),
) -> SeriesLabelPosition {
    let longest = series
        .iter()
        .map(|s| s.0.chars().count())
        .max()
        .unwrap_or(0) as f64;
    let width = ((longest * 7.5 + 55.0) / PLOT_PX.0).min(1.0);
    let height = ((series.len() as f64 * 18.5 + 20.0) / PLOT_PX.1).min(1.0);
    // Points along every line, in the plot's unit square with y up; sampling the segments
    // counts a line that crosses a corner between two of its markers.
    let unit = |(x, y): (f64, f64)| {
        (
            (x - range.0) / (range.1 - range.0),
            (y - range.2) / (range.3 - range.2),
        )
    };
    let mut samples = Vec::new();
    for (_, points) in series {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(unit)
            .collect();
        if let [only] = pts[..] {
            samples.push(only);
        }
        for pair in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            samples.extend((0..=16).map(|k| {
                let t = f64::from(k) / 16.0;
                (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
            }));
        }
    }
    // (right side, upper side) of each corner, in the order ties are broken.
    let corners = [(true, false), (true, true), (false, false), (false, true)];
    let covered = |&(right, upper): &(bool, bool)| {
        samples
            .iter()
            .filter(|&&(x, y)| {
                let in_x = if right { x >= 1.0 - width } else { x <= width };
                let in_y = if upper {
                    y >= 1.0 - height
                } else {
                    y <= height
                };
                in_x && in_y
            })
            .count()
    };
    match corners.iter().min_by_key(|c| covered(c)) {
        Some((true, true)) => SeriesLabelPosition::UpperRight,
        Some((false, false)) => SeriesLabelPosition::LowerLeft,
        Some((false, true)) => SeriesLabelPosition::UpperLeft,
        _ => SeriesLabelPosition::LowerRight,
    }
}

/// Grouped bars: one group per category, one bar per series inside it.
pub fn grouped_bars(
    dir: &Path,
    stem: &str,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let top = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        y_label: &str,
        categories: &[String],
        series: &[(String, Vec<f64>)],
        top: f64,
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let n = categories.len().max(1) as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(MARGIN)
            .x_label_area_size(X_LABEL_AREA)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..n, 0f64..top)
            .map_err(err)?;
        let names = categories.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(categories.len() * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(err)?;
        let width = 0.8 / series.len().max(1) as f64;
        for (j, (name, values)) in series.iter().enumerate() {
            let c = color(j);
            chart
                .draw_series(
                    values
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite())
                        .map(|(i, &v)| {
                            let x = i as f64 + 0.1 + j as f64 * width;
                            Rectangle::new([(x, 0.0), (x + width * 0.9, v)], c.filled())
                        }),
                )
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
        Ok(())
    }
    render_both!(dir, stem, |root| draw(
        root, title, y_label, categories, series, top
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corner(series: &[(String, Vec<(f64, f64)>)]) -> SeriesLabelPosition {
        legend_corner(series, (0.0, 2.0, 80.0, 100.0))
    }

    #[test]
    fn the_legend_leaves_the_lower_right_for_a_point_there() {
        // An EMD sweep: flat, then falling to the chart's bottom right corner.
        let sweep = vec![(
            "mnist".to_string(),
            vec![(0.0, 98.0), (1.0, 97.5), (1.6, 95.0), (1.8, 81.0)],
        )];
        // The upper right is free too, and comes first.
        assert!(matches!(corner(&sweep), SeriesLabelPosition::UpperRight));
        // Rising curves leave the lower right empty, and the legend stays there.
        let rising = vec![(
            "acc".to_string(),
            vec![(0.0, 81.0), (0.2, 95.0), (1.0, 98.0), (2.0, 99.0)],
        )];
        assert!(matches!(corner(&rising), SeriesLabelPosition::LowerRight));
    }

    #[test]
    fn a_line_crossing_a_corner_between_its_markers_counts() {
        // A long name widens the legend box to about the right 40% of the chart and its lowest
        // tenth. The line's two markers lie outside that box, but the segment between them
        // crosses it: counted by markers alone, the lower right would look free.
        let name = "table2-emd-mnist/scheme-emd-1.764_seed-0".to_string();
        let series = vec![(name, vec![(1.0, 80.2), (2.0, 84.0)])];
        assert!(matches!(corner(&series), SeriesLabelPosition::UpperRight));
    }
}
