use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::*;

fn pool(name: &str, domestic: bool, allocatable: i64, granted: i64, in_use: i64) -> AcceleratorPool {
    serde_json::from_value(json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "AcceleratorPool", "metadata": {"name": name},
        "spec": {"resourceName": "x.ai/d", "kind": "GPU", "vendor": "V", "model": name, "domestic": domestic,
                 "nodeSelector": {"matchLabels": {"p": name}}},
        "status": {"allocatable": allocatable, "granted": granted, "reserved": 0, "inUse": in_use}
    }))
    .unwrap()
}

/// An allocation with grants in h200 (non-domestic) and atom (domestic).
fn allocation(name: &str, program: &str, hours: f64, domestic_hours: f64, budget: Option<i64>) -> GpuAllocation {
    let mut a = json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation", "metadata": {"name": name},
        "spec": {"tenant": {"displayName": format!("team {name}"), "namespaces": [name]}, "program": program,
                 "grants": [{"pool": "h200", "accelerators": 16}, {"pool": "atom", "accelerators": 16}]},
        "status": {"phase": "Active", "granted": 32, "inUse": 8, "acceleratorHoursUsed": hours,
                   "domesticAcceleratorHoursUsed": domestic_hours,
                   "pools": [{"pool": "h200", "mode": "Shared", "granted": 16, "inUse": 8},
                             {"pool": "atom", "mode": "Shared", "granted": 16, "inUse": 0}]}
    });
    if let Some(b) = budget {
        a["spec"]["budget"] = json!({"acceleratorHours": b});
    }
    serde_json::from_value(a).unwrap()
}

fn project(name: &str, allocation: &str, phase: &str, created: &str, admitted: Option<&str>) -> ModelProject {
    let mut p = json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "ModelProject",
        "metadata": {"name": name, "namespace": allocation, "creationTimestamp": created},
        "spec": {"allocation": allocation, "placement": {"pools": ["atom"]}, "workers": 1,
                 "acceleratorsPerWorker": 8, "template": {"image": "t"}},
        "status": {"phase": phase, "pool": "h200"}
    });
    if let Some(at) = admitted {
        p["status"]["admittedAt"] = json!(at);
    }
    serde_json::from_value(p).unwrap()
}

fn inputs() -> Inputs {
    Inputs {
        pools: vec![pool("h200", false, 32, 32, 16), pool("atom", true, 32, 32, 0)],
        allocations: vec![
            allocation("a", "wbl", 100.0, 25.0, Some(1000)),
            allocation("b", "wbl", 50.0, 50.0, None),
            allocation("c", "science", 10.0, 0.0, None),
        ],
        projects: vec![
            project("run", "a", "Running", "2026-12-01T10:00:00Z", Some("2026-12-01T10:01:00Z")),
            project("wait", "a", "Queued", "2026-12-01T11:00:00Z", None),
            project("wait", "b", "Queued", "2026-12-01T11:30:00Z", None),
        ],
        now: "2026-12-01T12:00:00Z".parse::<Timestamp>().unwrap(),
    }
}

fn row<'a>(r: &'a Report, s: Section, name: &str) -> &'a Row {
    r.section(s).find(|r| r.name == name).unwrap_or_else(|| panic!("no {name} in {s:?}"))
}

#[test]
fn programs_sum_their_allocations_with_the_domestic_share_of_hours() {
    let r = build(&inputs());
    let wbl = row(&r, Section::Program, "wbl");
    assert_eq!((wbl.accelerator_hours, wbl.domestic_accelerator_hours), (150.0, Some(75.0)));
    assert_eq!(wbl.domestic_share, Some(0.5));
    assert_eq!((wbl.granted, wbl.in_use, wbl.grant_used), (64, 16, Some(0.25)));
    assert_eq!((wbl.queued, wbl.running), (2, 1));
    // The longest wait of the program is a's project (one hour).
    assert_eq!(wbl.longest_wait_seconds, Some(3600));
    assert_eq!(wbl.mean_admission_wait_seconds, Some(60.0));
    let science = row(&r, Section::Program, "science");
    assert_eq!((science.domestic_share, science.longest_wait_seconds), (Some(0.0), None));
    assert_eq!(row(&r, Section::Tenant, "team a").accelerator_hours, 100.0);
    let total = row(&r, Section::Total, "all");
    assert_eq!((total.accelerator_hours, total.allocatable, total.queued), (160.0, Some(64), 2));
}

#[test]
fn classes_and_pools_split_hours_by_domestic_pools() {
    let r = build(&inputs());
    let dom = row(&r, Section::Class, "domestic");
    let foreign = row(&r, Section::Class, "non-domestic");
    assert_eq!((dom.accelerator_hours, foreign.accelerator_hours), (75.0, 85.0));
    assert_eq!((dom.granted, dom.in_use, dom.allocatable), (48, 0, Some(32)));
    assert_eq!((foreign.granted, foreign.in_use), (48, 24));
    // One pool per class and allocation: the estimate is exact.
    let atom = row(&r, Section::Pool, "atom");
    assert!(atom.hours_estimated);
    assert_eq!((atom.accelerator_hours, atom.domestic_accelerator_hours), (75.0, Some(75.0)));
    assert_eq!(row(&r, Section::Pool, "h200").running, 1);
}

#[test]
fn allocations_show_budget_left_and_phase() {
    let r = build(&inputs());
    let a = row(&r, Section::Allocation, "a");
    assert_eq!((a.budget_hours, a.budget_left_hours), (Some(1000.0), Some(900.0)));
    assert_eq!(a.phase.as_deref(), Some("Active"));
    assert_eq!(row(&r, Section::Allocation, "b").budget_left_hours, None);
}

#[test]
fn an_empty_center_reports_zeros_not_divisions_by_zero() {
    let r = build(&Inputs::default());
    let total = row(&r, Section::Total, "all");
    assert_eq!((total.accelerator_hours, total.domestic_share, total.grant_used), (0.0, None, None));
    assert!(render::table(&r).contains("Center"));
    assert_eq!(charts::all(&r).unwrap().len(), 4);
}

#[test]
fn table_has_a_section_per_group_with_aligned_columns() {
    let text = render::table(&build(&inputs()));
    for title in ["Center", "By program", "By tenant", "By pool", "Grants against use"] {
        assert!(text.contains(title), "{text}");
    }
    let header = text.lines().find(|l| l.starts_with("NAME  PHASE")).expect("allocation header");
    let a = text.lines().find(|l| l.starts_with("a ")).expect("allocation a");
    assert_eq!(header.find("ACC-HOURS"), a.find("100.0"), "{text}");
    assert!(a.contains("900.0 of 1000.0") && a.contains("1h00m"), "{a}");
}

#[test]
fn table_aligns_by_display_width_with_korean_names() {
    use unicode_width::UnicodeWidthStr;
    let mut i = inputs();
    i.allocations[0].spec.tenant.display_name = "업스테이지 컨소시엄".into();
    let text = render::table(&build(&i));
    let header = text.split("By tenant\n").nth(1).and_then(|t| t.lines().next()).expect("tenant header");
    let korean = text.lines().find(|l| l.starts_with("업스테이지")).expect("the Korean tenant's row");
    // Every column after the name starts at the header's display column, so the
    // name's nine characters take eighteen terminal columns.
    let col = |line: &str, cell: &str| line.find(cell).map(|b| line[..b].width());
    assert_eq!(col(header, "ACC-HOURS"), col(korean, "100.0"), "{text}");
    assert_eq!(col(header, "ACC-HOURS"), Some("업스테이지 컨소시엄".width() + 2), "{text}");
    let other = text.lines().find(|l| l.starts_with("team b ")).expect("another tenant");
    assert_eq!(col(header, "GRANTED"), col(other, "32"), "{text}");
    assert_eq!(render::aligned(&["이름".into(), "X".into()], &[vec!["a".into(), "1".into()]]), "이름  X\na     1\n");
}

#[test]
fn one_namespace_reports_its_allocations_pools_and_projects() {
    let mut i = inputs();
    i.allocations[0].spec.grants.truncate(1); // a: h200 only
    let scoped = scope(i, "a");
    assert_eq!(scoped.allocations.iter().map(|a| a.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["a"]);
    assert_eq!(scoped.pools.iter().map(|p| p.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["h200"]);
    assert_eq!(scoped.projects.len(), 2);
    assert!(scoped.projects.iter().all(|p| p.metadata.namespace.as_deref() == Some("a")));
    let r = build(&scoped);
    assert_eq!(row(&r, Section::Total, "all").accelerator_hours, 100.0);
}

#[test]
fn yaml_is_the_json_document() {
    let r = build(&inputs());
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&render::yaml(&r).unwrap()).unwrap();
    let from_json: serde_json::Value = serde_json::from_str(&render::json(&r).unwrap()).unwrap();
    assert_eq!(from_yaml, from_json);
}

#[test]
fn csv_has_one_record_per_row_and_every_column() {
    let r = build(&inputs());
    let text = render::csv(&r).unwrap();
    let mut reader = ::csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let records: Vec<_> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), r.rows.len());
    assert!(records.iter().all(|rec| rec.len() == headers.len()));
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let wbl = records.iter().find(|rec| &rec[0] == "program" && &rec[1] == "wbl").unwrap();
    assert_eq!((&wbl[col("accelerator_hours")], &wbl[col("domestic_share")]), ("150", "0.5"));
    assert_eq!(&wbl[col("budget_hours")], "");
}

#[test]
fn json_round_trips_the_numbers() {
    let v: serde_json::Value = serde_json::from_str(&render::json(&build(&inputs())).unwrap()).unwrap();
    assert_eq!(v["domesticTarget"], 0.5);
    let rows = v["rows"].as_array().unwrap();
    let a = rows.iter().find(|r| r["section"] == "allocation" && r["name"] == "a").unwrap();
    assert_eq!((a["acceleratorHours"].as_f64(), a["budgetLeftHours"].as_f64()), (Some(100.0), Some(900.0)));
}

#[test]
fn charts_are_svg_with_the_categories_and_the_target_line() {
    let charts = charts::all(&build(&inputs())).unwrap();
    let names: Vec<&str> = charts.iter().map(|c| c.0).collect();
    assert_eq!(names, ["hours-by-program.svg", "hours-by-pool.svg", "domestic-share-by-program.svg", "grant-use.svg"]);
    for (name, svg) in &charts {
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{name}");
        assert!(svg.contains("<rect"), "{name} has no bars");
    }
    let share = &charts[2].1;
    assert!(share.contains("wbl") && share.contains("science") && share.contains("target 50%"), "{share}");
    assert!(charts[3].1.contains("\na\n"), "{}", charts[3].1);
}

#[test]
fn durations_read_in_their_largest_units() {
    assert_eq!(render::duration(40), "40s");
    assert_eq!(render::duration(750), "12m30s");
    assert_eq!(render::duration(3 * 3600 + 300), "3h05m");
}

#[test]
fn axis_ticks_have_no_float_noise() {
    assert_eq!(charts::tick(0.6000000000000001), "0.6");
    assert_eq!(charts::tick(12.0), "12");
    assert_eq!(charts::tick(0.25), "0.25");
}

#[test]
fn workloads_are_listed_by_kind_and_name_from_the_allocations_hours() {
    let mut i = inputs();
    let hours = json!([
        {"project": "a/run", "pool": "h200", "acceleratorHoursUsed": 6.0},
        {"project": "a/run", "pool": "atom", "acceleratorHoursUsed": 2.0},
        {"project": "a/train", "kind": "Job", "pool": "atom", "acceleratorHoursUsed": 1.5},
    ]);
    let status = i.allocations[0].status.as_mut().unwrap();
    status.project_hours = serde_json::from_value(hours).unwrap();
    let r = build(&i);
    let rows: Vec<(&str, f64, Option<f64>)> = r
        .section(Section::Workload)
        .map(|w| (w.name.as_str(), w.accelerator_hours, w.domestic_accelerator_hours))
        .collect();
    assert_eq!(rows, [("Job a/train", 1.5, Some(1.5)), ("ModelProject a/run", 8.0, Some(2.0))]);
    assert!(render::table(&r).contains("By workload"));
    // A namespace's report lists its own workloads only.
    let mut other = i.clone();
    let status = other.allocations[0].status.as_mut().unwrap();
    status.project_hours[2].project = "elsewhere/train".into();
    let scoped = build(&scope(other, "a"));
    let names: Vec<&str> = scoped.section(Section::Workload).map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["ModelProject a/run"]);
}
