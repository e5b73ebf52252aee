//! The plan as tables.

use super::{Fate, Plan};
use crate::report::render::aligned;

fn or_dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn section(out: &mut String, title: &str, headers: &[&str], rows: Vec<Vec<String>>) {
    out.push_str(&format!("\n{title}\n"));
    if rows.is_empty() {
        out.push_str("  (no change)\n");
        return;
    }
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    out.push_str(&aligned(&headers, &rows));
}

pub fn table(plan: &Plan) -> String {
    let mut out = format!("Plan at {} (read-only: nothing was written)\n", plan.at);
    for c in &plan.changes {
        out.push_str(&format!("  {c}\n"));
    }
    let rows = plan
        .allocations
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                format!("{} -> {}", or_dash(a.phase_now.as_deref()), a.phase),
                format!("{} -> {}", a.granted_now, a.granted),
                a.reason.clone(),
                a.message.clone(),
            ]
        })
        .collect();
    section(&mut out, "Allocations", &["NAME", "PHASE", "GRANTED", "REASON", "MESSAGE"], rows);
    let rows = plan
        .quotas
        .iter()
        .map(|q| vec![q.namespace.clone(), q.resource.clone(), or_dash(q.now), or_dash(q.planned)])
        .collect();
    section(&mut out, "Quotas", &["NAMESPACE", "RESOURCE", "NOW", "PLANNED"], rows);
    let rows = plan
        .nodes
        .iter()
        .map(|n| {
            let what = match (&n.reserved_now, &n.reserved) {
                (None, Some(_)) => "reserve",
                (Some(_), None) => "release",
                _ => "move",
            };
            vec![n.node.clone(), what.into(), or_dash(n.reserved_now.as_deref()), or_dash(n.reserved.as_deref())]
        })
        .collect();
    section(&mut out, "Nodes", &["NODE", "ACTION", "RESERVED-FOR NOW", "PLANNED"], rows);
    let rows = plan
        .projects
        .iter()
        .filter(|p| p.fate != Fate::Idle)
        .map(|p| {
            let mut why = p.reason.clone().unwrap_or_default();
            if !p.preempts.is_empty() {
                why = format!("preempts {}{}", p.preempts.join(", "), if why.is_empty() { "" } else { "; " }) + &why;
            }
            if p.borrowed {
                why = format!("on borrowed capacity{}{why}", if why.is_empty() { "" } else { "; " });
            }
            vec![
                p.project.clone(),
                or_dash(p.phase_now.as_deref()),
                format!("{:?}", p.fate),
                or_dash(p.pool.as_deref()),
                if p.nodes.is_empty() { "-".into() } else { p.nodes.join(",") },
                why,
            ]
        })
        .collect();
    section(&mut out, "Projects", &["PROJECT", "NOW", "PLANNED", "POOL", "NODES", "WHY"], rows);
    let rows = plan
        .pools_after
        .iter()
        .map(|a| {
            let b = plan.pools_before.iter().find(|b| b.pool == a.pool).cloned().unwrap_or_default();
            let ch = |x: i64, y: i64| if x == y { x.to_string() } else { format!("{x} -> {y}") };
            vec![
                a.pool.clone(),
                if a.domestic { "yes" } else { "no" }.into(),
                ch(b.allocatable, a.allocatable),
                ch(b.granted, a.granted),
                ch(b.reserved, a.reserved),
                ch(b.in_use, a.in_use),
            ]
        })
        .collect();
    section(&mut out, "Pools", &["POOL", "DOMESTIC", "ALLOCATABLE", "GRANTED", "RESERVED", "IN-USE"], rows);
    let (b, a) = (plan.domestic_before, plan.domestic_after);
    out.push_str(&format!(
        "\nDomestic share: capacity {} -> {}, granted {} -> {}, in use {} -> {} (target 50%)\n",
        pct(b.capacity),
        pct(a.capacity),
        pct(b.granted),
        pct(a.granted),
        pct(b.in_use),
        pct(a.in_use)
    ));
    out
}
