//! Heatmaps as PNG files: patching sweeps, attributions, head scores, attention patterns.
//!
//! Drawn with plotters on an RGB buffer, with the DejaVu Sans Mono font compiled in (no system
//! fonts needed), encoded with the `png` crate into a temporary file that is renamed into place,
//! so a failed plot never leaves a half-written file.

use std::io::Write;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::{Error, Result};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "flexmodel-mono";

/// How values map to colours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Blue below zero, white at zero, red above, symmetric around zero (patching results,
    /// attributions).
    Diverging,
    /// White at the minimum to dark blue at the maximum (probabilities, scores).
    Sequential,
}

/// A labelled grid of values.
#[derive(Clone, Debug)]
pub struct Heatmap {
    /// Title, drawn above the grid.
    pub title: String,
    /// `values[row][col]`.
    pub values: Vec<Vec<f32>>,
    /// One label per row, drawn on the left.
    pub rows: Vec<String>,
    /// One label per column, drawn below (vertically).
    pub cols: Vec<String>,
    /// The colour scale.
    pub scale: Scale,
}

/// Pixels per cell, at most; large grids get smaller cells.
const CELL: u32 = 26;
const CHAR_W: u32 = 7;

impl Heatmap {
    /// A heatmap of a `[rows, cols]` tensor.
    ///
    /// # Errors
    /// A tensor that is not 2-D, label counts that differ from its shape.
    pub fn new(
        title: impl Into<String>,
        values: &candle_core::Tensor,
        rows: Vec<String>,
        cols: Vec<String>,
        scale: Scale,
    ) -> Result<Self> {
        let values = values
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()
            .map_err(|_| {
                Error::msg(format!(
                    "a heatmap needs a 2-D tensor, got {:?}",
                    values.dims()
                ))
            })?;
        let map = Self {
            title: title.into(),
            values,
            rows,
            cols,
            scale,
        };
        map.check()?;
        Ok(map)
    }

    fn check(&self) -> Result<()> {
        let n_rows = self.values.len();
        let n_cols = self.values.first().map_or(0, Vec::len);
        if n_rows == 0 || n_cols == 0 || self.values.iter().any(|r| r.len() != n_cols) {
            return Err(Error::msg(
                "a heatmap needs a non-empty rectangular grid of values",
            ));
        }
        if self.rows.len() != n_rows || self.cols.len() != n_cols {
            return Err(Error::msg(format!(
                "heatmap labels: {} rows and {} columns of values, {} row and {} column labels",
                n_rows,
                n_cols,
                self.rows.len(),
                self.cols.len()
            )));
        }
        Ok(())
    }

    /// The image's size in pixels, `(width, height)`.
    pub fn size(&self) -> (u32, u32) {
        let (cell, left, bottom) = self.layout();
        let (n_rows, n_cols) = (self.values.len() as u32, self.cols.len() as u32);
        let width = left + n_cols * cell + 90;
        let height = 40 + n_rows * cell + bottom;
        let title = 16 + self.title.chars().count() as u32 * 9;
        (width.max(title).max(320), height)
    }

    /// Cell size, left margin (row labels), bottom margin (column labels).
    fn layout(&self) -> (u32, u32, u32) {
        let longest = |v: &[String]| v.iter().map(|s| s.chars().count()).max().unwrap_or(0) as u32;
        let n = self.values.len().max(self.cols.len()) as u32;
        let cell = (1600 / n.max(1)).clamp(6, CELL);
        let left = 12 + longest(&self.rows).min(48) * CHAR_W;
        let bottom = 12 + longest(&self.cols).min(24) * CHAR_W;
        (cell, left, bottom)
    }

    /// Writes the heatmap as a PNG file at `path`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        self.check()?;
        let (width, height) = self.size();
        let mut buf = vec![255u8; (width * height * 3) as usize];
        self.draw(&mut buf, (width, height))
            .map_err(|e| Error::msg(format!("drawing {}: {e}", path.display())))?;
        write_png(path, &buf, (width, height))
    }

    fn draw(&self, buf: &mut [u8], size: (u32, u32)) -> std::result::Result<(), String> {
        static FONT_ONCE: Once = Once::new();
        FONT_ONCE.call_once(|| {
            // The font is compiled in and known to parse.
            let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
        });
        let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (cell, left, _) = self.layout();
        let top = 40;
        let text = |px| TextStyle::from((FAMILY, px).into_font()).color(&BLACK);
        root.draw(&Text::new(self.title.clone(), (8, 10), text(15)))
            .map_err(|e| e.to_string())?;
        let (lo, hi) = self.range();
        for (r, row) in self.values.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let (x, y) = (
                    (left + c as u32 * cell) as i32,
                    (top + r as u32 * cell) as i32,
                );
                let rect = Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    self.colour(v, lo, hi).filled(),
                );
                root.draw(&rect).map_err(|e| e.to_string())?;
            }
        }
        let label_px = (cell as i32 - 4).clamp(6, 12);
        for (r, label) in self.rows.iter().enumerate() {
            let y = (top + r as u32 * cell) as i32 + (cell as i32 - label_px) / 2;
            let label: String = label.chars().take(48).collect();
            root.draw(&Text::new(label, (6, y), text(label_px)))
                .map_err(|e| e.to_string())?;
        }
        let bottom_y = (top + self.values.len() as u32 * cell + 6) as i32;
        for (c, label) in self.cols.iter().enumerate() {
            let x = (left + c as u32 * cell) as i32 + (cell as i32 + label_px) / 2;
            let label: String = label.chars().take(24).collect();
            let style = text(label_px).transform(FontTransform::Rotate90);
            root.draw(&Text::new(label, (x, bottom_y), style))
                .map_err(|e| e.to_string())?;
        }
        // colour bar
        let bar_x = (left + self.cols.len() as u32 * cell + 16) as i32;
        let bar_h = (self.values.len() as u32 * cell).max(60) as i32;
        for i in 0..bar_h {
            let v = hi - (hi - lo) * i as f32 / (bar_h - 1).max(1) as f32;
            let y = top as i32 + i;
            root.draw(&Rectangle::new(
                [(bar_x, y), (bar_x + 14, y + 1)],
                self.colour(v, lo, hi).filled(),
            ))
            .map_err(|e| e.to_string())?;
        }
        for (v, y) in [(hi, top as i32), (lo, top as i32 + bar_h - 10)] {
            root.draw(&Text::new(format!("{v:.3}"), (bar_x + 18, y), text(10)))
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())
    }

    /// The value range the colours span (symmetric around zero for a diverging scale).
    fn range(&self) -> (f32, f32) {
        let finite = self
            .values
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        match self.scale {
            Scale::Diverging => {
                let m = lo.abs().max(hi.abs()).max(1e-12);
                (-m, m)
            }
            Scale::Sequential if hi > lo => (lo, hi),
            Scale::Sequential => (lo, lo + 1.0),
        }
    }

    fn colour(&self, v: f32, lo: f32, hi: f32) -> RGBColor {
        if !v.is_finite() {
            return RGBColor(200, 200, 200);
        }
        let mix = |a: (f32, f32, f32), t: f32| {
            let t = t.clamp(0.0, 1.0);
            let c = |x: f32| (255.0 + (x - 255.0) * t).round() as u8;
            RGBColor(c(a.0), c(a.1), c(a.2))
        };
        match self.scale {
            Scale::Diverging if v >= 0.0 => mix((178.0, 24.0, 43.0), v / hi),
            Scale::Diverging => mix((33.0, 102.0, 172.0), v / lo),
            Scale::Sequential => mix((8.0, 48.0, 107.0), (v - lo) / (hi - lo)),
        }
    }
}

/// Encodes an RGB buffer as PNG into a temporary file beside `path`, then renames it.
fn write_png(path: &Path, rgb: &[u8], (width, height): (u32, u32)) -> Result<()> {
    let io = |e: std::io::Error| Error::msg(format!("writing {}: {e}", path.display()));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut encoder = png::Encoder::new(&mut tmp, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| Error::msg(format!("encoding {}: {e}", path.display())))?;
        writer
            .write_image_data(rgb)
            .map_err(|e| Error::msg(format!("encoding {}: {e}", path.display())))?;
    }
    tmp.flush().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}
