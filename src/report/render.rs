//! The report as a table for people, CSV for spreadsheets, JSON for tools.

use super::{Report, Row, Section};

/// One column: header and cell.
type Column = (&'static str, fn(&Row) -> String);

fn hours(v: f64) -> String {
    format!("{v:.1}")
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

fn num(v: Option<i64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// A duration in its largest whole unit and the next: 3h05m, 12m30s, 40s.
pub fn duration(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m"),
    }
}

const NAME: Column = ("NAME", |r| r.name.clone());
const HOURS: Column = ("ACC-HOURS", |r| hours(r.accelerator_hours));
const DOMESTIC_HOURS: Column = ("DOMESTIC-HOURS", |r| r.domestic_accelerator_hours.map(hours).unwrap_or_default());
const DOMESTIC_SHARE: Column = ("DOMESTIC", |r| pct(r.domestic_share));
const ALLOCATABLE: Column = ("ALLOCATABLE", |r| num(r.allocatable));
const GRANTED: Column = ("GRANTED", |r| r.granted.to_string());
const RESERVED: Column = ("RESERVED", |r| num(r.reserved));
const IN_USE: Column = ("IN-USE", |r| r.in_use.to_string());
const GRANT_USED: Column = ("GRANT-USED", |r| pct(r.grant_used));
const PHASE: Column = ("PHASE", |r| r.phase.clone().unwrap_or_default());
const BUDGET_LEFT: Column = ("BUDGET-LEFT", |r| match (r.budget_left_hours, r.budget_hours) {
    (Some(left), Some(all)) => format!("{} of {}", hours(left), hours(all)),
    _ => "-".into(),
});
const QUEUED: Column = ("QUEUED", |r| r.queued.to_string());
const RUNNING: Column = ("RUNNING", |r| r.running.to_string());
const LONGEST_WAIT: Column = ("LONGEST-WAIT", |r| r.longest_wait_seconds.map(duration).unwrap_or_else(|| "-".into()));
const ADMISSION_WAIT: Column = ("MEAN-ADMISSION-WAIT", |r| {
    r.mean_admission_wait_seconds.map(|s| duration(s as i64)).unwrap_or_else(|| "-".into())
});

/// The columns each section shows in the table.
fn columns(s: Section) -> Vec<Column> {
    let usage = [HOURS, DOMESTIC_HOURS, DOMESTIC_SHARE, GRANTED, IN_USE, GRANT_USED];
    let queue = [QUEUED, RUNNING, LONGEST_WAIT, ADMISSION_WAIT];
    let mut out = vec![NAME];
    match s {
        Section::Total => out.extend([HOURS, DOMESTIC_HOURS, DOMESTIC_SHARE, ALLOCATABLE, GRANTED, IN_USE, GRANT_USED]),
        Section::Class => out.extend([HOURS, ALLOCATABLE, GRANTED, IN_USE, GRANT_USED]),
        Section::Program | Section::Tenant => out.extend(usage.into_iter().chain(queue)),
        Section::Pool => out.extend([HOURS, ALLOCATABLE, GRANTED, RESERVED, IN_USE, GRANT_USED, RUNNING]),
        Section::Workload => out.extend([HOURS, DOMESTIC_HOURS, DOMESTIC_SHARE]),
        Section::Allocation => {
            out.extend([PHASE]);
            out.extend(usage);
            out.extend([BUDGET_LEFT]);
            out.extend(queue);
        }
    }
    out
}

const TITLES: [(Section, &str); 7] = [
    (Section::Total, "Center"),
    (Section::Class, "Domestic and non-domestic pools"),
    (Section::Program, "By program"),
    (Section::Tenant, "By tenant"),
    (Section::Pool, "By pool (hours estimated from each allocation's hours per class, split by grant)"),
    (Section::Allocation, "Grants against use, and the queue, by allocation"),
    (Section::Workload, "By workload (kind namespace/name)"),
];

/// Aligned columns under a title per section.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "Accelerator use at {} (domestic target {:.0}%)\n",
        report.generated_at,
        report.domestic_target * 100.0
    );
    for (section, title) in TITLES {
        let rows: Vec<&Row> = report.section(section).collect();
        if rows.is_empty() {
            continue;
        }
        let cols = columns(section);
        let cells: Vec<Vec<String>> = rows.iter().map(|r| cols.iter().map(|c| (c.1)(r)).collect()).collect();
        out.push_str(&format!("\n{title}\n"));
        out.push_str(&aligned(&cols.iter().map(|c| c.0.to_string()).collect::<Vec<_>>(), &cells));
    }
    out
}

/// Left-aligned columns two spaces apart, as kubectl prints them, by display
/// width: a Hangul syllable or a CJK character takes two columns of a terminal.
pub fn aligned(headers: &[String], cells: &[Vec<String>]) -> String {
    use unicode_width::UnicodeWidthStr;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.width()).collect();
    for row in cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.width());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(headers).chain(cells.iter().map(Vec::as_slice)) {
        let mut line = String::new();
        for (c, w) in row.iter().zip(&widths) {
            line.push_str(c);
            line.extend(std::iter::repeat_n(' ', w - c.width() + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One CSV record per row, every column, empty where it does not apply.
pub fn csv(report: &Report) -> anyhow::Result<String> {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    w.write_record([
        "section",
        "name",
        "accelerator_hours",
        "domestic_accelerator_hours",
        "domestic_share",
        "hours_estimated",
        "allocatable",
        "granted",
        "reserved",
        "in_use",
        "grant_used",
        "phase",
        "budget_hours",
        "budget_left_hours",
        "queued",
        "running",
        "longest_wait_seconds",
        "mean_admission_wait_seconds",
    ])?;
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in &report.rows {
        w.write_record([
            r.section.map(Section::as_str).unwrap_or_default().to_string(),
            r.name.clone(),
            r.accelerator_hours.to_string(),
            opt(r.domestic_accelerator_hours.map(|v| v.to_string())),
            opt(r.domestic_share.map(|v| v.to_string())),
            r.hours_estimated.to_string(),
            opt(r.allocatable.map(|v| v.to_string())),
            r.granted.to_string(),
            opt(r.reserved.map(|v| v.to_string())),
            r.in_use.to_string(),
            opt(r.grant_used.map(|v| v.to_string())),
            opt(r.phase.clone()),
            opt(r.budget_hours.map(|v| v.to_string())),
            opt(r.budget_left_hours.map(|v| v.to_string())),
            r.queued.to_string(),
            r.running.to_string(),
            opt(r.longest_wait_seconds.map(|v| v.to_string())),
            opt(r.mean_admission_wait_seconds.map(|v| v.to_string())),
        ])?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

pub fn json(report: &Report) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(report)? + "\n")
}

/// The JSON document in YAML.
pub fn yaml(report: &Report) -> anyhow::Result<String> {
    Ok(serde_saphyr::to_string(report)?)
}
