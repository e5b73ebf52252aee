//! SVG bar charts of a report, drawn with plotters' SVG backend.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::{Report, Row, Section};

const DOMESTIC: RGBColor = RGBColor(0x2e, 0x8b, 0x57);
const FOREIGN: RGBColor = RGBColor(0x46, 0x82, 0xb4);
const GRANT: RGBColor = RGBColor(0xc6, 0xd8, 0xea);
const TARGET: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const SIZE: (u32, u32) = (720, 400);

/// How the series of a chart sit on each category.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each series on top of the previous one.
    Stacked,
    /// Each series from zero, later ones narrower, in front.
    Nested,
}

/// A bar chart: categories along x, one or more series of values.
pub struct Bars<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub categories: Vec<String>,
    pub series: Vec<(&'a str, RGBColor, Vec<f64>)>,
    pub layout: Layout,
    /// A horizontal line (value, legend).
    pub target: Option<(f64, &'a str)>,
    /// A fixed top of the y axis.
    pub y_max: Option<f64>,
    /// Values are fractions, shown as percentages.
    pub percent: bool,
}

/// The report's four charts: (file name, SVG).
pub fn all(report: &Report) -> anyhow::Result<Vec<(&'static str, String)>> {
    let programs: Vec<&Row> = report.section(Section::Program).collect();
    let pools: Vec<&Row> = report.section(Section::Pool).collect();
    let allocations: Vec<&Row> = report.section(Section::Allocation).collect();
    let names = |rows: &[&Row]| rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let by_program = hours_bars("Accelerator-hours by program", &programs);
    let by_pool = hours_bars("Accelerator-hours by pool (estimated)", &pools);
    let target_label = format!("target {:.0}%", report.domestic_target * 100.0);
    let share = Bars {
        title: "Domestic share of accelerator-hours by program",
        y_label: "share of hours",
        categories: names(&programs),
        series: vec![("domestic share", DOMESTIC, programs.iter().map(|r| r.domestic_share.unwrap_or(0.0)).collect())],
        layout: Layout::Nested,
        target: Some((report.domestic_target, &target_label)),
        y_max: None,
        percent: true,
    };
    let grant_use = Bars {
        title: "Grants against use, by allocation",
        y_label: "accelerators",
        categories: names(&allocations),
        series: vec![
            ("granted", GRANT, allocations.iter().map(|r| r.granted as f64).collect()),
            ("in use", FOREIGN, allocations.iter().map(|r| r.in_use as f64).collect()),
        ],
        layout: Layout::Nested,
        target: None,
        y_max: None,
        percent: false,
    };
    Ok(vec![
        ("hours-by-program.svg", by_program.svg()?),
        ("hours-by-pool.svg", by_pool.svg()?),
        ("domestic-share-by-program.svg", share.svg()?),
        ("grant-use.svg", grant_use.svg()?),
    ])
}

/// Hours of each row, stacked domestic under non-domestic.
fn hours_bars<'a>(title: &'a str, rows: &[&Row]) -> Bars<'a> {
    let domestic = |r: &&Row| r.domestic_accelerator_hours.unwrap_or(0.0);
    Bars {
        title,
        y_label: "accelerator-hours",
        categories: rows.iter().map(|r| r.name.clone()).collect(),
        series: vec![
            ("domestic", DOMESTIC, rows.iter().map(domestic).collect()),
            ("non-domestic", FOREIGN, rows.iter().map(|r| r.accelerator_hours - domestic(r)).collect()),
        ],
        layout: Layout::Stacked,
        target: None,
        y_max: None,
        percent: false,
    }
}

/// A y-axis value with at most two decimals and no trailing zeros.
pub fn tick(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Bars<'_> {
    /// The tallest bar (or the fixed top), with some headroom.
    fn top(&self) -> f64 {
        if let Some(max) = self.y_max {
            return max;
        }
        let per_category = |i: usize| -> f64 {
            let values = self.series.iter().map(|s| s.2.get(i).copied().unwrap_or(0.0));
            match self.layout {
                Layout::Stacked => values.sum(),
                Layout::Nested => values.fold(0.0, f64::max),
            }
        };
        let max = (0..self.categories.len()).map(per_category).fold(0.0, f64::max);
        let max = max.max(self.target.map(|t| t.0).unwrap_or(0.0));
        // Headroom for the legend in the upper right corner.
        if max > 0.0 { max * 1.35 } else { 1.0 }
    }

    pub fn svg(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        self.draw(SVGBackend::with_string(&mut out, SIZE).into_drawing_area())
            .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", self.title))?;
        Ok(out)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let n = self.categories.len().max(1);
        // A segmented range 0..k has k + 1 segments; one category still needs
        // a range that is not empty (its chart gets a blank second slot).
        let segments = n.max(2);
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d((0..segments - 1).into_segmented(), 0.0..self.top())?;
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => self.categories.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(segments + 1)
            .x_label_formatter(&label)
            .y_label_formatter(&|v: &f64| if self.percent { format!("{:.0}%", v * 100.0) } else { tick(*v) })
            .y_desc(self.y_label)
            .draw()?;
        let mut base = vec![0.0; n];
        for (k, (name, color, values)) in self.series.iter().enumerate() {
            // Nested series get narrower so that the ones behind stay visible.
            let inset = if self.layout == Layout::Nested { 6 + 10 * k as u32 } else { 6 };
            let bars = values.iter().enumerate().map(|(i, v)| {
                let from = if self.layout == Layout::Stacked { base[i] } else { 0.0 };
                let mut bar = Rectangle::new(
                    [(SegmentValue::Exact(i), from), (SegmentValue::Exact(i + 1), from + v)],
                    color.filled(),
                );
                bar.set_margin(0, 0, inset, inset);
                bar
            });
            chart
                .draw_series(bars)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
            if self.layout == Layout::Stacked {
                for (b, v) in base.iter_mut().zip(values) {
                    *b += v;
                }
            }
        }
        if let Some((value, name)) = self.target {
            let line = PathElement::new(
                vec![(SegmentValue::Exact(0), value), (SegmentValue::Exact(segments), value)],
                TARGET.stroke_width(2),
            );
            chart
                .draw_series(std::iter::once(line))?
                .label(name)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], TARGET.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
