//! The PNG plot of the load benchmark: throughput and p99 latency against concurrency (log scale), one
//! line per system.
//!
//! Why hand-rolled: the plot is one small chart, and every dev-dependency is also compiled by `cargo
//! test` in CI (2 cores). A plotting crate needs a font (no system fonts can be assumed on a fresh
//! machine: `plotters` draws text through a TrueType font, so it would add a font loader and a font
//! file) and an image encoder. What the chart needs is ~300 lines: a RGB canvas with lines, markers and
//! a 5×7 bitmap font (upper case, digits, a few signs), and a PNG encoder whose zlib stream uses one
//! fixed-Huffman deflate block with run-length matches (distance 3: the pixel to the left; distance one
//! row: the pixel above), which packs a chart of flat colours to a few tens of KiB. No dependency.

use std::path::Path;

/// One line of the chart: a system's label, colour and its (concurrency, value) points.
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
}

pub const COLORS: [[u8; 3]; 5] = [
    [0x33, 0x66, 0xcc], // blue
    [0xdc, 0x39, 0x12], // red
    [0x10, 0x96, 0x18], // green
    [0x99, 0x00, 0x99], // purple
    [0xff, 0x99, 0x00], // orange
];

const WIDTH: usize = 1000;
const HEIGHT: usize = 800;
const BACKGROUND: [u8; 3] = [0xff, 0xff, 0xff];
const INK: [u8; 3] = [0x20, 0x20, 0x20];
const GRID: [u8; 3] = [0xdd, 0xdd, 0xdd];
const FAINT: [u8; 3] = [0x70, 0x70, 0x70];

/// Draws the two panels (throughput, linear y; p99, log y) sharing a log-scale concurrency axis, and
/// writes them to `path` as PNG. `notes`: short lines printed under the title.
pub fn write_chart(
    path: &Path,
    title: &str,
    notes: &[String],
    throughput: &[Series],
    p99: &[Series],
) -> std::io::Result<()> {
    let mut canvas = Canvas::new(WIDTH, HEIGHT);
    canvas.text(40, 16, title, INK, 2);
    let mut y = 40;
    for note in notes {
        for line in wrap(note, (WIDTH - 80) / 6) {
            canvas.text(40, y, &line, FAINT, 1);
            y += 12;
        }
    }
    // Legend, one row under the notes.
    let legend_y = y + 6;
    let mut x = 40;
    for series in throughput {
        canvas.fill_rect(x, legend_y, 24, 14, series.color);
        canvas.text(x + 32, legend_y, &series.label, INK, 2);
        x += 32 + text_width(&series.label, 2) + 40;
    }
    let top = legend_y + 34;

    let xs: Vec<f64> = throughput
        .iter()
        .chain(p99)
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| *x > 0.0)
        .collect();
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let (x_min, x_max) = match (ticks.first(), ticks.last()) {
        (Some(&a), Some(&b)) => (a, b),
        _ => (1.0, 256.0),
    };
    let x_axis = LogAxis {
        lo: (x_min / 1.5).log2(),
        hi: (x_max * 1.5).log2(),
        log: f64::log2,
    };

    let panel_height = (HEIGHT - top - 60) / 2;
    let left = 100;
    let right = WIDTH - 30;

    // Panel 1: throughput, linear from 0.
    let t_max = nice_ceiling(
        throughput
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.1,
    );
    let panel1 = Panel {
        left,
        right,
        top: top + 20,
        bottom: top + panel_height - 10,
    };
    canvas.text(left, top, "THROUGHPUT (COMPLETED PURCHASES/S)", INK, 2);
    let linear_ticks: Vec<f64> = (0..=5).map(|i| t_max * i as f64 / 5.0).collect();
    draw_frame(
        &mut canvas,
        &panel1,
        &x_axis,
        &ticks,
        |v| v / t_max,
        &linear_ticks,
    );
    for series in throughput {
        draw_series(&mut canvas, &panel1, &x_axis, series, |v| v / t_max);
    }

    // Panel 2: p99, log10.
    let values: Vec<f64> = p99
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(1.0)
        .log10()
        .floor();
    let hi = values
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(10.0)
        .log10()
        .ceil();
    let top2 = top + panel_height + 20;
    canvas.text(left, top2, "P99 LATENCY (MS, LOG SCALE)", INK, 2);
    let panel2 = Panel {
        left,
        right,
        top: top2 + 20,
        bottom: top2 + panel_height - 10,
    };
    let decades: Vec<f64> = (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect();
    let y_log = |v: f64| (v.log10() - lo) / (hi - lo);
    draw_frame(&mut canvas, &panel2, &x_axis, &ticks, y_log, &decades);
    // The target: p99 <= 20 ms (at half the peak throughput; closed-loop p99 above it is queueing).
    let y20 = panel2.y(y_log(20.0));
    canvas.dashed_hline(panel2.left, panel2.right, y20, COLORS[1]);
    canvas.text(
        panel2.left + 8,
        (y20 - 14).max(0) as usize,
        "20 MS: THE P99 TARGET, AT HALF THE PEAK THROUGHPUT (OPEN LOOP)",
        FAINT,
        1,
    );
    for series in p99 {
        draw_series(&mut canvas, &panel2, &x_axis, series, y_log);
    }
    canvas.text(
        left + (right - left) / 2 - text_width("CONCURRENCY (CLIENTS, LOG SCALE)", 2) / 2,
        HEIGHT - 24,
        "CONCURRENCY (CLIENTS, LOG SCALE)",
        INK,
        2,
    );

    std::fs::write(path, encode_png(WIDTH, HEIGHT, &canvas.pixels))
}

struct LogAxis {
    lo: f64,
    hi: f64,
    log: fn(f64) -> f64,
}

impl LogAxis {
    fn frac(&self, x: f64) -> f64 {
        ((self.log)(x) - self.lo) / (self.hi - self.lo)
    }
}

struct Panel {
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
}

impl Panel {
    fn x(&self, frac: f64) -> i64 {
        self.left as i64 + (frac * (self.right - self.left) as f64).round() as i64
    }

    fn y(&self, frac: f64) -> i64 {
        self.bottom as i64 - (frac * (self.bottom - self.top) as f64).round() as i64
    }
}

fn draw_frame(
    canvas: &mut Canvas,
    panel: &Panel,
    x_axis: &LogAxis,
    x_ticks: &[f64],
    y_frac: impl Fn(f64) -> f64,
    y_ticks: &[f64],
) {
    for &v in y_ticks {
        let y = panel.y(y_frac(v));
        canvas.line(panel.left as i64, y, panel.right as i64, y, GRID, 1);
        let label = axis_label(v);
        let w = text_width(&label, 1) as i64;
        canvas.text(
            (panel.left as i64 - 8 - w).max(0) as usize,
            (y - 3).max(0) as usize,
            &label,
            INK,
            1,
        );
    }
    for &t in x_ticks {
        let x = panel.x(x_axis.frac(t));
        canvas.line(x, panel.top as i64, x, panel.bottom as i64, GRID, 1);
        let label = axis_label(t);
        let w = text_width(&label, 1) as i64;
        canvas.text(
            (x - w / 2).max(0) as usize,
            panel.bottom + 6,
            &label,
            INK,
            1,
        );
    }
    let (l, r, t, b) = (
        panel.left as i64,
        panel.right as i64,
        panel.top as i64,
        panel.bottom as i64,
    );
    canvas.line(l, b, r, b, INK, 1);
    canvas.line(l, t, l, b, INK, 1);
}

fn draw_series(
    canvas: &mut Canvas,
    panel: &Panel,
    x_axis: &LogAxis,
    series: &Series,
    y_frac: impl Fn(f64) -> f64,
) {
    let points: Vec<(i64, i64)> = series
        .points
        .iter()
        .filter(|(x, y)| *x > 0.0 && y.is_finite() && *y > 0.0)
        .map(|&(x, y)| (panel.x(x_axis.frac(x)), panel.y(y_frac(y).clamp(0.0, 1.0))))
        .collect();
    for pair in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        canvas.line(x0, y0, x1, y1, series.color, 3);
    }
    for &(x, y) in &points {
        canvas.fill_rect(
            (x - 4).max(0) as usize,
            (y - 4).max(0) as usize,
            9,
            9,
            series.color,
        );
    }
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// `12000` → `12K`, `2.5` → `2.5`, `0.1` → `0.1`.
fn axis_label(v: f64) -> String {
    if v >= 10_000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}K", v / 1000.0)
    } else if v >= 1.0 && v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The next "nice" number (1, 2, 2.5 or 5 × 10^n) at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let base = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * base >= v {
            return m * base;
        }
    }
    10.0 * base
}

// ------------------------------------------------------------------------------------------------
// Canvas
// ------------------------------------------------------------------------------------------------

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: BACKGROUND.repeat(width * height),
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let at = (y as usize * self.width + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, color: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx as i64, yy as i64, color);
            }
        }
    }

    /// Bresenham, `thickness` pixels wide (a square brush).
    fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3], thickness: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let half = thickness / 2;
        loop {
            for oy in -half..thickness - half {
                for ox in -half..thickness - half {
                    self.set(x + ox, y + oy, color);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn dashed_hline(&mut self, x0: usize, x1: usize, y: i64, color: [u8; 3]) {
        for x in x0..x1 {
            if (x / 6) % 2 == 0 {
                self.set(x as i64, y, color);
            }
        }
    }

    /// Text in the built-in 5×7 font, `scale` pixels per dot; lower case is drawn as upper case.
    fn text(&mut self, x: usize, y: usize, text: &str, color: [u8; 3], scale: usize) {
        let mut cx = x;
        for ch in text.chars() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.fill_rect(cx + col * scale, y + row * scale, scale, scale, color);
                    }
                }
            }
            cx += 6 * scale;
        }
    }
}

fn text_width(text: &str, scale: usize) -> usize {
    text.chars().count() * 6 * scale
}

/// The 5×7 glyph of `c` (rows top to bottom, bit 4 = leftmost dot); `?` for what the font lacks.
#[rustfmt::skip]
fn glyph(c: char) -> [u8; 7] {
    match c {
        ' ' => [0; 7],
        '0' => [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
        '1' => [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        '2' => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
        '3' => [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110],
        '4' => [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
        '5' => [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
        '6' => [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
        '7' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
        '8' => [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
        '9' => [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
        'A' => [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'B' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110],
        'C' => [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110],
        'D' => [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100],
        'E' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111],
        'F' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000],
        'G' => [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111],
        'H' => [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'I' => [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'J' => [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100],
        'K' => [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001],
        'L' => [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111],
        'M' => [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001],
        'N' => [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001],
        'O' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'P' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000],
        'Q' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101],
        'R' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001],
        'S' => [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110],
        'T' => [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100],
        'U' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'V' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'W' => [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010],
        'X' => [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001],
        'Y' => [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100],
        'Z' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111],
        '.' => [0, 0, 0, 0, 0, 0b01100, 0b01100],
        ',' => [0, 0, 0, 0, 0b01100, 0b00100, 0b01000],
        ':' => [0, 0b01100, 0b01100, 0, 0b01100, 0b01100, 0],
        ';' => [0, 0b01100, 0b01100, 0, 0b01100, 0b00100, 0b01000],
        '/' => [0, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0],
        '(' => [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010],
        ')' => [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000],
        '[' => [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110],
        ']' => [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110],
        '-' => [0, 0, 0, 0b11111, 0, 0, 0],
        '+' => [0, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0],
        '=' => [0, 0, 0b11111, 0, 0b11111, 0, 0],
        '<' => [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010],
        '>' => [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000],
        '%' => [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011],
        '_' => [0, 0, 0, 0, 0, 0, 0b11111],
        '\'' => [0b00100, 0b00100, 0b01000, 0, 0, 0, 0],
        '*' => [0, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0],
        '#' => [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010],
        '×' => [0, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0],
        '≥' => [0b01000, 0b00100, 0b00010, 0b00100, 0b01000, 0, 0b11110],
        '≤' => [0b00010, 0b00100, 0b01000, 0b00100, 0b00010, 0, 0b01111],
        _ => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0, 0b00100],
    }
}

// ------------------------------------------------------------------------------------------------
// PNG
// ------------------------------------------------------------------------------------------------

/// A PNG of `rgb` (8-bit RGB, rows top to bottom, no filtering).
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    assert_eq!(rgb.len(), width * height * 3, "one RGB triple per pixel");
    let stride = width * 3 + 1;
    let mut raw = Vec::with_capacity(stride * height);
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter type: none
        raw.extend_from_slice(row);
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter method, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &zlib(&raw, stride));
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zlib stream of `data`: one final deflate block with the fixed Huffman codes, whose only matches
/// are at distance 3 (the previous pixel) or `row` (the same byte one scanline up).
fn zlib(data: &[u8], row: usize) -> Vec<u8> {
    let mut bits = BitWriter::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE = 01, fixed Huffman
    let mut i = 0;
    while i < data.len() {
        let mut best = (0usize, 0usize); // (length, distance)
        for distance in [3, row] {
            if distance == 0 || distance > i || distance > 32_768 {
                continue;
            }
            let mut length = 0;
            while length < 258
                && i + length < data.len()
                && data[i + length] == data[i + length - distance]
            {
                length += 1;
            }
            if length > best.0 {
                best = (length, distance);
            }
        }
        if best.0 >= 3 {
            bits.length(best.0);
            bits.distance(best.1);
            i += best.0;
        } else {
            bits.literal(u16::from(data[i]));
            i += 1;
        }
    }
    bits.literal(256); // end of block
    let mut out = vec![0x78, 0x01];
    out.extend(bits.finish());
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65_521;
        b %= 65_521;
    }
    (b << 16) | a
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u32; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u32; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

impl BitWriter {
    /// `count` bits of `value`, least significant first (deflate's order for everything but codes).
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code of `len` bits, most significant first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = code.reverse_bits() >> (32 - len);
        self.put(reversed, len);
    }

    /// A literal/length symbol in the fixed code.
    fn literal(&mut self, symbol: u16) {
        let s = u32::from(symbol);
        match s {
            0..=143 => self.code(0x30 + s, 8),
            144..=255 => self.code(0x190 + s - 144, 9),
            256..=279 => self.code(s - 256, 7),
            _ => self.code(0xc0 + s - 280, 8),
        }
    }

    fn length(&mut self, length: usize) {
        let i = LENGTH_BASE
            .iter()
            .rposition(|&base| usize::from(base) <= length)
            .expect("lengths are 3..=258");
        self.literal(257 + i as u16);
        self.put(length as u32 - u32::from(LENGTH_BASE[i]), LENGTH_EXTRA[i]);
    }

    fn distance(&mut self, distance: usize) {
        let i = DIST_BASE
            .iter()
            .rposition(|&base| base as usize <= distance)
            .expect("distances are 1..=32768");
        self.code(i as u32, 5);
        self.put(distance as u32 - DIST_BASE[i], DIST_EXTRA[i]);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}
