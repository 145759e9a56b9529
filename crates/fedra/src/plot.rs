//! Pictures shared by `fedra partition` and `fedra report`: the embedded font, and the heat-map
//! of a partition's client x class matrix.
//!
//! Text is drawn with DejaVu Sans, compiled into the binary (`assets/DejaVuSans.ttf`, licence
//! beside it) and registered with plotters under every family name the code uses, so pictures
//! need no system fonts or libraries and render the same on any machine.
//!
//! The heat-map has one row per client and one column per class. A cell's colour is the share
//! of that class in the client's data (white 0% to dark blue 100%), so an IID split is an even
//! pale grid and a one-class split a dark diagonal-like pattern, whatever the client sizes; the
//! cell's text is the example count. Each row ends with the client's size and EMD.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail};
use fedra_data::stats::PartitionStats;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The most clients a heat-map draws (one pixel row each at that size).
pub const MAX_HEATMAP_CLIENTS: usize = 1000;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Make the embedded font the one plotters draws with (idempotent; call before drawing).
pub fn register_fonts() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            // The bytes are a known-good TTF compiled in, so this cannot fail at run time
            // unless the asset itself is broken, which the unit test below catches.
            let _ = plotters::style::register_font(family, FontStyle::Normal, FONT);
        }
    });
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Colour of a share in [0, 1]: white through mid blue to dark blue.
fn share_colour(share: f64) -> RGBColor {
    const STOPS: [(f64, (f64, f64, f64)); 3] = [
        (0.0, (247.0, 251.0, 255.0)),
        (0.5, (107.0, 174.0, 214.0)),
        (1.0, (8.0, 48.0, 107.0)),
    ];
    let s = if share.is_finite() {
        share.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (lo, hi) = if s <= 0.5 {
        (STOPS[0], STOPS[1])
    } else {
        (STOPS[1], STOPS[2])
    };
    let t = (s - lo.0) / (hi.0 - lo.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(
        mix(lo.1.0, hi.1.0),
        mix(lo.1.1, hi.1.1),
        mix(lo.1.2, hi.1.2),
    )
}

/// Pixel layout of one heat-map, derived from the matrix size.
struct Layout {
    width: u32,
    height: u32,
    left: i32,
    top: i32,
    cell_w: i32,
    cell_h: i32,
    rows: usize,
    cols: usize,
}

impl Layout {
    fn new(rows: usize, cols: usize) -> Self {
        let cell_w = (900 / cols.max(1)).clamp(14, 72) as i32;
        let cell_h = (640 / rows.max(1)).clamp(1, 34) as i32;
        let left = 90;
        let top = 96;
        let grid_w = cell_w * cols as i32;
        let grid_h = cell_h * rows as i32;
        // Right of the grid: size/EMD column (170 px) and the colour bar (110 px).
        let width = (left + grid_w + 170 + 110).max(640) as u32;
        let height = (top + grid_h + 64).max(360) as u32;
        Layout {
            width,
            height,
            left,
            top,
            cell_w,
            cell_h,
            rows,
            cols,
        }
    }
}

fn text_style(size: f64, colour: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    ("sans-serif", size)
        .into_font()
        .color(&colour)
        .pos(Pos::new(h, v))
}

fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    layout: &Layout,
    stats: &PartitionStats,
    class_names: &[String],
    title: &str,
) -> anyhow::Result<()> {
    let l = layout;
    root.fill(&WHITE).map_err(draw_err)?;
    let black = RGBColor(0, 0, 0);
    let grey = RGBColor(90, 90, 90);
    root.draw(&Text::new(
        title.to_string(),
        (l.left, 14),
        text_style(22.0, black, HPos::Left, VPos::Top),
    ))
    .map_err(draw_err)?;
    root.draw(&Text::new(
        format!(
            "{} clients x {} classes; mean EMD {:.3} (weighted by size), min {:.3}, max {:.3}",
            l.rows, l.cols, stats.mean_emd, stats.min_emd, stats.max_emd
        ),
        (l.left, 44),
        text_style(15.0, grey, HPos::Left, VPos::Top),
    ))
    .map_err(draw_err)?;

    // Column headers: class names when they fit the cell at 9 px or more (shrunk to fit, at
    // most 13 px; a glyph is about 0.6 em wide), else class numbers.
    let longest = class_names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(1)
        .max(1);
    let name_size = (l.cell_w as f64 / (longest as f64 * 0.62)).min(13.0);
    let fits = class_names.len() == l.cols && name_size >= 9.0;
    let header_size = if fits {
        name_size
    } else {
        13.0f64.min(l.cell_w as f64 * 0.9)
    };
    let headers: Vec<String> = if fits {
        class_names.to_vec()
    } else {
        (0..l.cols).map(|c| c.to_string()).collect()
    };
    for (c, label) in headers.into_iter().enumerate() {
        if !fits && l.cell_w < 18 && c % 5 != 0 {
            continue;
        }
        let x = l.left + l.cell_w * c as i32 + l.cell_w / 2;
        root.draw(&Text::new(
            label,
            (x, l.top - 6),
            text_style(header_size, black, HPos::Center, VPos::Bottom),
        ))
        .map_err(draw_err)?;
    }
    let row_label_every = (14 / l.cell_h.max(1)).max(1) as usize;
    let count_size = 12.0f64.min(l.cell_h as f64 * 0.7);
    let show_counts = l.cell_h >= 14 && l.cell_w >= 40;
    let right = l.left + l.cell_w * l.cols as i32;
    for (j, client) in stats.clients.iter().enumerate() {
        let y0 = l.top + l.cell_h * j as i32;
        let ymid = y0 + l.cell_h / 2;
        for (c, &count) in client.class_counts.iter().enumerate() {
            let share = if client.size > 0 {
                count as f64 / client.size as f64
            } else {
                0.0
            };
            let x0 = l.left + l.cell_w * c as i32;
            let fill = share_colour(share);
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + l.cell_w, y0 + l.cell_h)],
                fill.filled(),
            ))
            .map_err(draw_err)?;
            if show_counts && count > 0 {
                // White on the darker half of the scale, black on the pale half (readable on mid blue).
                let ink = if share > 0.6 { WHITE } else { black };
                root.draw(&Text::new(
                    count.to_string(),
                    (x0 + l.cell_w / 2, ymid),
                    text_style(count_size, ink, HPos::Center, VPos::Center),
                ))
                .map_err(draw_err)?;
            }
        }
        if j % row_label_every == 0 {
            let size = 13.0f64.min(l.cell_h as f64 * row_label_every as f64 * 0.8);
            root.draw(&Text::new(
                format!("client {}", client.id),
                (l.left - 8, ymid),
                text_style(size, black, HPos::Right, VPos::Center),
            ))
            .map_err(draw_err)?;
            root.draw(&Text::new(
                format!("n={}  EMD {:.3}", client.size, client.emd),
                (right + 10, ymid),
                text_style(size, black, HPos::Left, VPos::Center),
            ))
            .map_err(draw_err)?;
        }
    }
    // Grid outline.
    let bottom = l.top + l.cell_h * l.rows as i32;
    root.draw(&Rectangle::new(
        [(l.left, l.top), (right, bottom)],
        black.stroke_width(1),
    ))
    .map_err(draw_err)?;

    // Colour bar: share of the client's examples, 0% at the bottom to 100% at the top.
    let bar_x = right + 180;
    let bar_top = l.top;
    let bar_h = (bottom - l.top).clamp(120, 320);
    let steps = 64;
    for s in 0..steps {
        let share = 1.0 - s as f64 / (steps - 1) as f64;
        let y = bar_top + bar_h * s / steps;
        let y1 = bar_top + bar_h * (s + 1) / steps;
        root.draw(&Rectangle::new(
            [(bar_x, y), (bar_x + 18, y1)],
            share_colour(share).filled(),
        ))
        .map_err(draw_err)?;
    }
    root.draw(&Rectangle::new(
        [(bar_x, bar_top), (bar_x + 18, bar_top + bar_h)],
        black.stroke_width(1),
    ))
    .map_err(draw_err)?;
    for (frac, label) in [(1.0, "100%"), (0.5, "50%"), (0.0, "0%")] {
        let y = bar_top + ((1.0 - frac) * bar_h as f64) as i32;
        root.draw(&Text::new(
            label,
            (bar_x + 24, y),
            text_style(12.0, black, HPos::Left, VPos::Center),
        ))
        .map_err(draw_err)?;
    }
    root.draw(&Text::new(
        "share of client",
        (bar_x - 4, bar_top + bar_h + 10),
        text_style(12.0, grey, HPos::Left, VPos::Top),
    ))
    .map_err(draw_err)?;
    let note = if show_counts {
        "cell: example count; colour: share of the client's examples"
    } else {
        "colour: share of the client's examples"
    };
    root.draw(&Text::new(
        note,
        (l.left, bottom + 14),
        text_style(13.0, grey, HPos::Left, VPos::Top),
    ))
    .map_err(draw_err)?;
    Ok(())
}

/// The default title of a partition heat-map.
fn default_title(stats: &PartitionStats) -> String {
    format!("partition {} (seed {})", stats.scheme, stats.seed)
}

/// Draw the heat-map of `stats` into `path`, as SVG or PNG by its extension. `class_names`
/// head the columns when there is one per class and they fit; otherwise class numbers do.
pub fn partition_heatmap_file(
    path: &Path,
    stats: &PartitionStats,
    class_names: &[String],
    title: Option<&str>,
) -> anyhow::Result<()> {
    register_fonts();
    // One pixel row per client at most 1000 clients keeps the picture under ~1700 px tall.
    if stats.clients.len() > MAX_HEATMAP_CLIENTS {
        bail!(
            "{}: a heat-map shows at most {MAX_HEATMAP_CLIENTS} clients, this partition has {}",
            path.display(),
            stats.clients.len()
        );
    }
    let title = title.map_or_else(|| default_title(stats), str::to_string);
    let layout = Layout::new(stats.clients.len(), stats.num_classes());
    let size = (layout.width, layout.height);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "svg" => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_heatmap(&root, &layout, stats, class_names, &title)?;
            root.present()
                .map_err(|e| anyhow!("{}: cannot write the SVG: {e}", path.display()))?;
        }
        "png" => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_heatmap(&root, &layout, stats, class_names, &title)?;
            root.present()
                .map_err(|e| anyhow!("{}: cannot write the PNG: {e}", path.display()))?;
        }
        _ => bail!(
            "{}: the picture must end in .svg or .png (got {:?})",
            path.display(),
            ext
        ),
    }
    Ok(())
}

/// Write the heat-map of `stats` as `dir/stem.svg` and `dir/stem.png` (classes numbered), as
/// `fedra report` does for every partition it shows.
#[allow(dead_code)] // called by `fedra report`
pub fn partition_heatmap(dir: &Path, stem: &str, stats: &PartitionStats) -> anyhow::Result<()> {
    for ext in ["svg", "png"] {
        partition_heatmap_file(&dir.join(format!("{stem}.{ext}")), stats, &[], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedra_data::stats::ClientStats;

    fn stats() -> PartitionStats {
        PartitionStats {
            scheme: "classes:1".into(),
            seed: 0,
            clients: (0..3)
                .map(|id| {
                    let mut class_counts = vec![0; 3];
                    class_counts[id] = 10 + id;
                    ClientStats {
                        id,
                        size: 10 + id,
                        class_counts,
                        emd: 4.0 / 3.0,
                    }
                })
                .collect(),
            mean_emd: 4.0 / 3.0,
            min_emd: 4.0 / 3.0,
            max_emd: 4.0 / 3.0,
        }
    }

    #[test]
    fn embedded_font_parses() {
        assert!(plotters::style::register_font("fedra-test", FontStyle::Normal, FONT).is_ok());
    }

    #[test]
    fn colours_run_from_white_to_dark_blue() {
        assert_eq!(share_colour(0.0), RGBColor(247, 251, 255));
        assert_eq!(share_colour(1.0), RGBColor(8, 48, 107));
        assert_eq!(share_colour(f64::NAN), share_colour(0.0));
    }

    #[test]
    fn heatmap_writes_svg_and_png_and_rejects_other_extensions() {
        let dir = tempfile::tempdir().unwrap();
        partition_heatmap(dir.path(), "p", &stats()).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("p.svg")).unwrap();
        assert!(
            svg.contains("client 2") && svg.contains("classes:1"),
            "{svg}"
        );
        let png = std::fs::read(dir.path().join("p.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let err = partition_heatmap_file(&dir.path().join("p.jpg"), &stats(), &[], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.jpg") && err.contains(".svg or .png"),
            "{err}"
        );
        let err =
            partition_heatmap_file(&dir.path().join("no/such/dir/p.png"), &stats(), &[], None)
                .unwrap_err()
                .to_string();
        assert!(err.contains("no/such/dir/p.png"), "{err}");
        let mut many = stats();
        many.clients = (0..MAX_HEATMAP_CLIENTS + 1)
            .map(|id| ClientStats {
                id,
                ..many.clients[0].clone()
            })
            .collect();
        let err = partition_heatmap_file(&dir.path().join("many.png"), &many, &[], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("at most 1000 clients") && err.contains("1001"),
            "{err}"
        );
        let mut thousand = many.clone();
        thousand.clients.truncate(MAX_HEATMAP_CLIENTS);
        partition_heatmap_file(&dir.path().join("thousand.png"), &thousand, &[], None).unwrap();
    }
}
