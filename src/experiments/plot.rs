//! Accuracy against training wall-clock, as a PNG: the paper's Pareto figures (1, 4, 5).
//!
//! Every run's evaluation curve is drawn thin, coloured by method, with a dot at each
//! evaluation and a larger one at its final value; each method's Pareto frontier (the best
//! value reached by that time by any of its runs) is drawn as a thick step line; each
//! baseline's final value is a faint horizontal line, so a curve crossing it is a run reaching
//! that target.
//!
//! Text (title, axis labels, legend) is rendered with `ab_glyph` from a TrueType font, so no
//! system library (fontconfig, freetype) is needed. The font is [`PlotOptions::font`] if set
//! (only that one: a file that cannot be used gives a plot without text, and [`PlotOutcome`]
//! says why); otherwise the file named by `RECYCLE_PLOT_FONT`, or else the first of
//! [`DEFAULT_FONT_PATHS`] that exists (wider character coverage), and failing those the font
//! compiled into the binary ([`EMBEDDED_FONT`]), so a machine without fonts still gets
//! labelled plots.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use super::report::Report;
use super::runlog::{write_atomic, BASELINE_METHOD, METRIC_ACCURACY, METRIC_MLM_ACCURACY};
use super::{Error, Result};

/// Fonts tried when neither [`PlotOptions::font`] nor `RECYCLE_PLOT_FONT` is set.
pub const DEFAULT_FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Environment variable naming a TrueType/OpenType font file for plot text.
pub const FONT_ENV: &str = "RECYCLE_PLOT_FONT";

/// The font used when no other is found: DejaVu Sans reduced to Latin-1 and a few signs
/// (`assets/fonts/`, with its license).
pub const EMBEDDED_FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// How to draw the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    /// A TrueType/OpenType font file; when set, no other font is tried.
    pub font: Option<PathBuf>,
    /// Title above the plot; a default one names the metric.
    pub title: Option<String>,
    /// Try the system's fonts ([`DEFAULT_FONT_PATHS`]) before the embedded one.
    pub system_fonts: bool,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 1200,
            height: 800,
            font: None,
            title: None,
            system_fonts: true,
        }
    }
}

/// What [`plot_accuracy_vs_time`] drew.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOutcome {
    pub path: PathBuf,
    /// False when no usable font was found: the PNG has curves, frontiers and grid, but no
    /// title, axis labels or legend.
    pub text: bool,
    /// The font file used for text (`None` with text: the embedded font).
    pub font: Option<PathBuf>,
    /// Why there is no text, when there is none; which fonts were passed over, when the
    /// embedded one was used instead.
    pub note: Option<String>,
}

/// Font files registered with plotters so far, by path: the family name they were given, or
/// `None` if the file could not be used. plotters keeps registered fonts for the process'
/// lifetime (it needs `&'static` bytes), so each file is read and leaked at most once.
static FONTS: Mutex<Option<HashMap<PathBuf, Option<&'static str>>>> = Mutex::new(None);

/// Reads and registers `path`, returning the family name to draw text with.
fn register(path: &Path) -> std::result::Result<&'static str, String> {
    let mut guard = FONTS.lock().unwrap_or_else(|e| e.into_inner());
    let fonts = guard.get_or_insert_with(HashMap::new);
    if let Some(known) = fonts.get(path) {
        return known.ok_or_else(|| format!("{}: not a usable font", path.display()));
    }
    let family = match std::fs::read(path) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            let name: &'static str =
                Box::leak(format!("recycle-plot-font-{}", fonts.len()).into_boxed_str());
            match plotters::style::register_font(name, FontStyle::Normal, bytes) {
                Ok(()) => Some(name),
                Err(_) => None,
            }
        }
        // A missing file may appear later (installed meanwhile): do not cache the miss.
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    fonts.insert(path.to_path_buf(), family);
    family.ok_or_else(|| format!("{}: not a usable font", path.display()))
}

/// Registers [`EMBEDDED_FONT`] (once) and returns its family name.
fn embedded_font() -> std::result::Result<&'static str, String> {
    static FAMILY: std::sync::OnceLock<std::result::Result<&'static str, String>> =
        std::sync::OnceLock::new();
    FAMILY
        .get_or_init(|| {
            let name = "recycle-plot-font-embedded";
            plotters::style::register_font(name, FontStyle::Normal, EMBEDDED_FONT)
                .map(|()| name)
                .map_err(|_| "the embedded font could not be read".to_string())
        })
        .clone()
}

/// A font to draw with: its file (`None`: the embedded font), its family name, and the fonts
/// that were tried and passed over.
struct ChosenFont {
    file: Option<PathBuf>,
    family: &'static str,
    passed_over: Vec<String>,
}

/// The font to use, per the order in the module documentation, or why there is none.
fn find_font(opts: &PlotOptions) -> std::result::Result<ChosenFont, String> {
    if let Some(f) = &opts.font {
        return register(f).map(|family| ChosenFont {
            file: Some(f.clone()),
            family,
            passed_over: Vec::new(),
        });
    }
    let candidates: Vec<PathBuf> =
        if let Some(f) = std::env::var_os(FONT_ENV).filter(|f| !f.is_empty()) {
            vec![PathBuf::from(f)]
        } else if opts.system_fonts {
            DEFAULT_FONT_PATHS
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.is_file())
                .collect()
        } else {
            Vec::new()
        };
    let mut why = Vec::new();
    for c in candidates {
        match register(&c) {
            Ok(family) => {
                return Ok(ChosenFont {
                    file: Some(c),
                    family,
                    passed_over: why,
                })
            }
            Err(e) => why.push(e),
        }
    }
    match embedded_font() {
        Ok(family) => Ok(ChosenFont {
            file: None,
            family,
            passed_over: why,
        }),
        Err(e) => {
            why.push(e);
            Err(why.join("; "))
        }
    }
}

/// Method colours: the baseline dark grey, the others from the Tableau 10 palette.
const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const BASELINE_COLOR: RGBColor = RGBColor(50, 50, 50);

/// The best value reached by each time, over all `curves` (each in time order), as the corners
/// of a step line ending at the last time of any curve.
pub fn pareto_frontier(curves: &[&[(f64, f32)]]) -> Vec<(f64, f32)> {
    let mut points: Vec<(f64, f32)> = curves.iter().flat_map(|c| c.iter().copied()).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f32)> = Vec::new();
    let mut best: Option<f32> = None;
    for &(t, v) in &points {
        match best {
            None => {
                out.push((t, v));
                best = Some(v);
            }
            Some(b) if v > b => {
                out.push((t, b));
                out.push((t, v));
                best = Some(v);
            }
            Some(_) => {}
        }
    }
    if let (Some(&(t_end, _)), Some(b)) = (points.last(), best) {
        if out.last().is_some_and(|&(t, _)| t < t_end) {
            out.push((t_end, b));
        }
    }
    out
}

fn metric_label(metrics: &[&str]) -> String {
    match metrics {
        [m] if *m == METRIC_ACCURACY => "accuracy".to_string(),
        [m] if *m == METRIC_MLM_ACCURACY => "MLM accuracy (masked tokens)".to_string(),
        [m] => m.to_string(),
        _ => "evaluation metric".to_string(),
    }
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Plot {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Draws every run's evaluation (y) against training seconds (x), coloured by method, with
/// each method's Pareto frontier, into a PNG at `path` (written atomically). Without a usable
/// font the plot is drawn with no text and the outcome says why.
pub fn plot_accuracy_vs_time(
    report: &Report,
    path: impl AsRef<Path>,
    opts: &PlotOptions,
) -> Result<PlotOutcome> {
    let path = path.as_ref();
    let (w, h) = (opts.width, opts.height);
    if !(200..=10_000).contains(&w) || !(150..=10_000).contains(&h) {
        return Err(Error::Plot {
            path: path.to_path_buf(),
            msg: format!("size {w}x{h} outside 200x150 ..= 10000x10000"),
        });
    }
    let font = find_font(opts);

    // Methods in report order (baseline first), each with its colour and its runs' curves.
    let mut methods: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    let mut next = 0;
    let colors: BTreeMap<&str, RGBColor> = methods
        .iter()
        .map(|&m| {
            let c = if m == BASELINE_METHOD {
                BASELINE_COLOR
            } else {
                next += 1;
                PALETTE[(next - 1) % PALETTE.len()]
            };
            (m, c)
        })
        .collect();
    let curves: Vec<(&str, Vec<(f64, f32)>)> = report
        .rows
        .iter()
        .map(|r| {
            let c = r.curve.iter().map(|p| (p.train_seconds, p.eval)).collect();
            (r.method.as_str(), c)
        })
        .collect();

    // Axis ranges from the data, with a margin; y stays within [0, 1].
    let all = || curves.iter().flat_map(|(_, c)| c.iter());
    let t_max = all().map(|p| p.0).fold(0.0f64, f64::max);
    let x_max = if t_max > 0.0 { t_max * 1.04 } else { 1.0 };
    let (mut lo, mut hi) = all()
        .map(|p| p.1)
        .chain(report.targets.iter().map(|t| t.value))
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.06).max(0.01);
    let y_min = (lo - pad).max(0.0);
    let y_max = (hi + pad).min(1.0).max(y_min + 0.01);
    let y_span = y_max - y_min;

    let mut metrics: Vec<&str> = report.rows.iter().map(|r| r.metric.as_str()).collect();
    metrics.sort();
    metrics.dedup();
    let y_label = metric_label(&metrics);
    let title = opts
        .title
        .clone()
        .unwrap_or_else(|| format!("{y_label} vs training wall-clock"));

    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let err = draw_err(path);
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        // With text: the title across the top, the legend in a panel on the right (outside the
        // plot, so it never hides a curve). Without: the whole picture is the plot.
        let (plot_area, legend_area) = match &font {
            Ok(ChosenFont { family, .. }) => {
                let below_title = root
                    .margin(10, 0, 0, 0)
                    .titled(&title, (*family, 26))
                    .map_err(&err)?;
                let legend_w = (w / 4).clamp(150, 360) as i32;
                let (plot, legend) =
                    below_title.split_horizontally(below_title.dim_in_pixel().0 as i32 - legend_w);
                (plot, Some(legend))
            }
            Err(_) => (root.clone(), None),
        };
        let mut builder = ChartBuilder::on(&plot_area);
        builder.margin(16);
        if font.is_ok() {
            builder.x_label_area_size(56).y_label_area_size(80);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max, y_min..y_max)
            .map_err(&err)?;

        let fmt_y = move |v: &f32| {
            if y_span < 0.1 {
                format!("{:.1}%", v * 100.0)
            } else {
                format!("{:.0}%", v * 100.0)
            }
        };
        let fmt_x = |v: &f64| {
            if x_max < 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        };
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(210, 210, 210))
            .y_label_formatter(&fmt_y)
            .x_label_formatter(&fmt_x);
        if let Ok(ChosenFont { family, .. }) = &font {
            mesh.x_desc("training wall-clock (s; evaluation and checkpoints excluded)")
                .y_desc(y_label.as_str())
                .label_style((*family, 16))
                .axis_desc_style((*family, 18));
        }
        mesh.draw().map_err(&err)?;
        if font.is_err() {
            // No axes are drawn without label areas: frame the plot instead.
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y_min), (x_max, y_max)],
                    BLACK.stroke_width(1),
                )))
                .map_err(&err)?;
        }

        // Baseline targets: dashed horizontal lines, named at their left end.
        let target_style = BASELINE_COLOR.mix(0.6).stroke_width(1);
        for t in &report.targets {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, t.value), (x_max, t.value)],
                    8,
                    5,
                    target_style,
                ))
                .map_err(&err)?;
            if let Ok(ChosenFont { family, .. }) = &font {
                let style = TextStyle::from((*family, 14).into_font())
                    .color(&BASELINE_COLOR)
                    .pos(Pos::new(HPos::Left, VPos::Bottom));
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{} final {:.2}%", t.baseline, f64::from(t.value) * 100.0),
                        (x_max * 0.01, t.value + y_span * 0.005),
                        style,
                    )))
                    .map_err(&err)?;
            }
        }

        // Runs: thin lines, a dot per evaluation, a larger dot at the final value.
        for (method, c) in &curves {
            let color = colors[method];
            chart
                .draw_series(LineSeries::new(
                    c.iter().copied(),
                    color.mix(0.5).stroke_width(1),
                ))
                .map_err(&err)?;
            chart
                .draw_series(
                    c.iter()
                        .map(|&p| Circle::new(p, 3, color.mix(0.6).filled())),
                )
                .map_err(&err)?;
            if let Some(&last) = c.last() {
                chart
                    .draw_series(std::iter::once(Circle::new(last, 6, color.filled())))
                    .map_err(&err)?;
            }
        }

        // Frontiers: thick step lines.
        let mut run_counts = Vec::new();
        for &m in &methods {
            let runs: Vec<&[(f64, f32)]> = curves
                .iter()
                .filter(|(mm, _)| *mm == m)
                .map(|(_, c)| c.as_slice())
                .collect();
            run_counts.push(runs.len());
            chart
                .draw_series(LineSeries::new(
                    pareto_frontier(&runs),
                    colors[m].stroke_width(3),
                ))
                .map_err(&err)?;
        }

        if let (Some(area), Ok(ChosenFont { family, .. })) = (&legend_area, &font) {
            draw_legend(
                area,
                family,
                &methods,
                &run_counts,
                &colors,
                !report.targets.is_empty(),
            )
            .map_err(&err)?;
        }
        root.present().map_err(&err)?;
    }

    let png = encode_png(&buf, w, h).map_err(draw_err(path))?;
    write_atomic(path, &png)?;
    Ok(match font {
        Ok(chosen) => PlotOutcome {
            path: path.to_path_buf(),
            text: true,
            note: (!chosen.passed_over.is_empty()).then(|| {
                let used = match &chosen.file {
                    Some(f) => f.display().to_string(),
                    None => "the embedded font".to_string(),
                };
                format!("used {used}; passed over {}", chosen.passed_over.join("; "))
            }),
            font: chosen.file,
        },
        Err(why) => PlotOutcome {
            path: path.to_path_buf(),
            text: false,
            font: None,
            note: Some(format!(
                "drawn without text (no title, axis labels or legend): no usable font: {why}"
            )),
        },
    })
}

/// The legend, in its own panel: one thick line per method (its frontier), then a key to the
/// marks.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    family: &str,
    methods: &[&str],
    run_counts: &[usize],
    colors: &BTreeMap<&str, RGBColor>,
    targets: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let text = TextStyle::from((family, 15).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let head = TextStyle::from((family, 16).into_font().style(FontStyle::Normal))
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let (x0, x1, x_text) = (8, 38, 46);
    let mut y = 40;
    area.draw_text("method: best so far", &head, (x0, y))?;
    y += 26;
    for (m, &n) in methods.iter().zip(run_counts) {
        let color = colors[m];
        area.draw(&PathElement::new(
            vec![(x0, y), (x1, y)],
            color.stroke_width(3),
        ))?;
        let runs = if n == 1 {
            "1 run".to_string()
        } else {
            format!("{n} runs")
        };
        area.draw_text(&format!("{m} ({runs})"), &text, (x_text, y))?;
        y += 24;
    }
    y += 14;
    let grey = RGBColor(90, 90, 90);
    area.draw(&PathElement::new(
        vec![(x0, y), (x1, y)],
        grey.mix(0.5).stroke_width(1),
    ))?;
    area.draw(&Circle::new(((x0 + x1) / 2, y), 3, grey.mix(0.6).filled()))?;
    area.draw_text("one run, dot per evaluation", &text, (x_text, y))?;
    y += 24;
    area.draw(&Circle::new(((x0 + x1) / 2, y), 6, grey.filled()))?;
    area.draw_text("end of a run", &text, (x_text, y))?;
    if targets {
        y += 24;
        area.draw(&DashedPathElement::new(
            vec![(x0, y), (x1, y)],
            8,
            5,
            BASELINE_COLOR.mix(0.6).stroke_width(1),
        ))?;
        area.draw_text("baseline final value", &text, (x_text, y))?;
    }
    Ok(())
}

/// Encodes an RGB8 buffer as PNG.
fn encode_png(rgb: &[u8], w: u32, h: u32) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_is_the_running_best_over_runs() {
        let a = [(1.0, 0.5), (3.0, 0.7), (5.0, 0.6)];
        let b = [(2.0, 0.6), (4.0, 0.65)];
        let f = pareto_frontier(&[&a, &b]);
        assert_eq!(
            f,
            vec![
                (1.0, 0.5),
                (2.0, 0.5),
                (2.0, 0.6),
                (3.0, 0.6),
                (3.0, 0.7),
                (5.0, 0.7)
            ]
        );
        assert!(pareto_frontier(&[]).is_empty());
    }
}
