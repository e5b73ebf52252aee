//! The plan on clusters made of plain objects: no client.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::proposals::parse;
use super::*;
use crate::admission::Decision as GangDecision;

const NOW: &str = "2026-12-01T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn settings() -> Settings {
    Settings {
        node_grace: std::time::Duration::from_secs(300),
        starvation_after: SignedDuration::from_secs(900),
        min_run: SignedDuration::from_secs(600),
    }
}

/// Four Ready 8-device ATOM nodes in two racks.
fn cluster() -> Cluster {
    let node = |i: usize| {
        serde_json::from_value(json!({
            "metadata": {"name": format!("atom-{i}"), "labels": {
                "rebellions.ai/npu.family": "ATOM", "kubernetes.io/hostname": format!("atom-{i}"),
                "topology.sovereign.ai/rack": format!("r{}", i / 2)}},
            "status": {"capacity": {"rebellions.ai/ATOM": "8"}, "allocatable": {"rebellions.ai/ATOM": "8"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    };
    let ns = |n: &str| serde_json::from_value(json!({"metadata": {"name": n}})).unwrap();
    Cluster { nodes: (0..4).map(node).collect(), namespaces: vec![ns("team-a"), ns("team-b")], ..Default::default() }
}

const POOL: &str = "apiVersion: sovereign.ai/v1alpha1\nkind: AcceleratorPool\nmetadata: {name: atom}\nspec:\n  resourceName: rebellions.ai/ATOM\n  kind: NPU\n  vendor: Rebellions\n  model: ATOM\n  domestic: true\n  nodeSelector: {matchLabels: {rebellions.ai/npu.family: ATOM}}\n  topologyKeys: [topology.sovereign.ai/rack, kubernetes.io/hostname]\n";

fn alloc(name: &str, ns: &str, accelerators: i64, extra: &str) -> String {
    format!(
        "---\napiVersion: sovereign.ai/v1alpha1\nkind: GpuAllocation\nmetadata: {{name: {name}}}\nspec:\n  tenant: {{displayName: T, namespaces: [{ns}]}}\n  grants: [{{pool: atom, accelerators: {accelerators}{extra}}}]\n"
    )
}

fn project(name: &str, ns: &str, alloc: &str, workers: u32, priority: i32) -> String {
    format!(
        "---\napiVersion: sovereign.ai/v1alpha1\nkind: ModelProject\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  allocation: {alloc}\n  placement: {{pools: [atom]}}\n  workers: {workers}\n  acceleratorsPerWorker: 8\n  priority: {priority}\n  template: {{image: t}}\n"
    )
}

fn plan_of(c: &Cluster, yaml: &str) -> Plan {
    plan(c, &parse(yaml, Action::Apply).unwrap(), now(), &settings()).unwrap()
}

/// The plan applied: the cluster as the simulation left it, for a second plan.
fn applied(c: &Cluster, yaml: &str) -> Cluster {
    let p = plan_of(c, yaml);
    let mut next = c.clone();
    for prop in parse(yaml, Action::Apply).unwrap() {
        prop.apply(&mut next, now());
    }
    // Statuses as the operator would write them: take them from a settled plan.
    super::simulate::settle(&mut next, now(), &settings());
    assert!(!p.changes.is_empty());
    next
}

fn project_plan<'a>(p: &'a Plan, key: &str) -> &'a ProjectPlan {
    p.projects.iter().find(|x| x.project == key).unwrap_or_else(|| panic!("no {key} in {p:#?}"))
}

#[test]
fn a_dedicated_grant_reserves_nodes_gets_a_quota_and_its_project_is_admitted_on_them() {
    let yaml =
        format!("{POOL}{}{}", alloc("a", "team-a", 16, ", mode: Dedicated"), project("run", "team-a", "a", 2, 0));
    let p = plan_of(&cluster(), &yaml);
    let a = &p.allocations[0];
    assert_eq!((a.phase.as_str(), a.granted, a.reason.as_str()), ("Active", 16, "Active"), "{a:?}");
    let reserved: Vec<&str> =
        p.nodes.iter().filter(|n| n.reserved.as_deref() == Some("a")).map(|n| n.node.as_str()).collect();
    assert_eq!(reserved.len(), 2, "{:?}", p.nodes);
    assert_eq!(
        p.quotas,
        vec![QuotaChange {
            namespace: "team-a".into(),
            resource: "rebellions.ai/ATOM".into(),
            now: None,
            planned: Some(16)
        }]
    );
    let run = project_plan(&p, "team-a/run");
    assert_eq!((&run.fate, run.pool.as_deref()), (&Fate::Admitted, Some("atom")));
    let mut nodes = run.nodes.clone();
    nodes.sort();
    assert_eq!(nodes, reserved, "a dedicated grant runs on its reserved nodes");
    let pool = &p.pools_after[0];
    assert_eq!((pool.allocatable, pool.granted, pool.reserved, pool.in_use), (32, 16, 16, 16));
    assert_eq!(p.domestic_after.capacity, 1.0);
    assert!(render::table(&p).contains("reserve"), "{}", render::table(&p));
}

#[test]
fn a_grant_that_does_not_fit_is_pending_with_the_operators_reason() {
    let yaml = format!("{POOL}{}{}", alloc("a", "team-a", 24, ""), alloc("b", "team-b", 16, ""));
    let p = plan_of(&cluster(), &yaml);
    let b = p.allocations.iter().find(|a| a.name == "b").unwrap();
    assert_eq!((b.phase.as_str(), b.reason.as_str()), ("Pending", "InsufficientCapacity"), "{b:?}");
    assert!(b.message.contains("pool atom is short by 8 accelerators"), "{}", b.message);
    // Pending gives a zero quota: no accelerators without a grant.
    assert!(p.quotas.iter().any(|q| q.namespace == "team-b" && q.planned == Some(0)), "{:?}", p.quotas);
}

#[test]
fn a_window_opens_only_at_its_start() {
    let window = "  window: {start: \"2027-01-01T00:00:00Z\"}\n";
    let yaml = format!("{POOL}{}{window}", alloc("a", "team-a", 8, ""));
    let p = plan_of(&cluster(), &yaml);
    assert_eq!((p.allocations[0].phase.as_str(), p.allocations[0].reason.as_str()), ("Pending", "WindowNotOpen"));
    let later =
        plan(&cluster(), &parse(&yaml, Action::Apply).unwrap(), "2027-01-02T00:00:00Z".parse().unwrap(), &settings())
            .unwrap();
    assert_eq!(later.allocations[0].phase, "Active");
}

#[test]
fn a_higher_priority_project_preempts_the_running_one_and_is_admitted() {
    let base =
        applied(&cluster(), &format!("{POOL}{}{}", alloc("a", "team-a", 32, ""), project("low", "team-a", "a", 4, 0)));
    let low = base.projects.iter().find(|p| p.metadata.name.as_deref() == Some("low")).unwrap();
    assert_eq!(low.status.as_ref().and_then(|s| s.phase), Some(crate::api::ProjectPhase::Admitted));

    let p = plan_of(&base, &project("urgent", "team-a", "a", 1, 100));
    let urgent = project_plan(&p, "team-a/urgent");
    assert_eq!(
        (&urgent.fate, urgent.preempts.clone()),
        (&Fate::Admitted, vec!["team-a/low".to_string()]),
        "{urgent:?}"
    );
    let low = project_plan(&p, "team-a/low");
    assert_eq!(low.fate, Fate::Preempted);
    let why = low.reason.clone().unwrap_or_default();
    assert!(why.contains("preempted by team-a/urgent") && why.contains("then waits"), "{why}");
    assert_eq!(low.phase_now.as_deref(), Some("Admitted"));
}

#[test]
fn deleting_an_allocation_releases_its_nodes_and_leaves_its_runs_alone() {
    let yaml =
        format!("{POOL}{}{}", alloc("a", "team-a", 16, ", mode: Dedicated"), project("run", "team-a", "a", 1, 0));
    let base = applied(&cluster(), &yaml);
    let p = plan(&base, &parse(&alloc("a", "team-a", 16, ""), Action::Delete).unwrap(), now(), &settings()).unwrap();
    assert_eq!(p.changes, vec!["delete GpuAllocation a"]);
    assert!(p.nodes.iter().all(|n| n.reserved.is_none()) && p.nodes.len() == 2, "{:?}", p.nodes);
    assert!(p.allocations.is_empty());
    // As the operator: a run whose allocation is gone is not stopped (its
    // namespace's quota is, for new pods).
    let run = project_plan(&p, "team-a/run");
    assert_eq!(run.fate, Fate::Running, "{run:?}");
}

#[test]
fn a_window_that_closes_stops_the_runs_with_the_operators_words() {
    let window = "  window: {end: \"2026-12-02T00:00:00Z\"}\n";
    let base = applied(
        &cluster(),
        &format!("{POOL}{}{window}{}", alloc("a", "team-a", 8, ""), project("run", "team-a", "a", 1, 0)),
    );
    let p = plan(&base, &[], "2026-12-03T00:00:00Z".parse().unwrap(), &settings()).unwrap();
    assert_eq!((p.allocations[0].phase.as_str(), p.allocations[0].reason.as_str()), ("Expired", "WindowClosed"));
    let run = project_plan(&p, "team-a/run");
    let why = run.reason.clone().unwrap_or_default();
    assert_eq!(run.fate, Fate::Stopped);
    assert!(why.starts_with("allocation a is Expired (") && why.contains("workers stopped"), "{why}");
}

#[test]
fn files_name_only_the_kinds_plan_knows() {
    let err = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", Action::Apply).unwrap_err();
    assert!(err.to_string().contains("not v1 ConfigMap"), "{err}");
    let p = parse(&project("p", "x", "a", 1, 0).replace(", namespace: x", ""), Action::Apply).unwrap();
    let Proposal::Project(_, p) = &p[0] else { panic!() };
    assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
}

/// The cluster with `yaml` applied as objects (no settling): what the
/// operator's stores would hold right after `kubectl apply`.
fn with(c: &Cluster, yaml: &str) -> Cluster {
    let mut next = c.clone();
    for prop in parse(yaml, Action::Apply).unwrap() {
        prop.apply(&mut next, now());
    }
    next
}

#[tokio::test]
async fn the_loop_and_plan_take_the_same_decisions_on_the_same_cluster() {
    let two = format!("{POOL}{}{}", alloc("a", "team-a", 16, ", borrowingLimit: 8"), alloc("b", "team-b", 8, ""));
    let running = applied(&cluster(), &format!("{two}{}", project("low", "team-a", "a", 2, 0)));
    let window = "  window: {end: \"2026-12-01T11:00:00Z\"}\n";
    let fixtures = [
        // Fresh arrivals, one beyond the grant (borrowed) and one that can never fit.
        with(
            &applied(&cluster(), &two),
            &format!(
                "{}{}{}",
                project("first", "team-a", "a", 2, 0),
                project("second", "team-a", "a", 1, 0),
                project("huge", "team-b", "b", 9, 0)
            ),
        ),
        // A higher priority arrival preempts; another tenant reclaims.
        with(
            &running,
            &format!("{}{}", project("urgent", "team-a", "a", 2, 100), project("back", "team-b", "b", 1, 0)),
        ),
        // A grant that expired stops its run.
        with(&running, &format!("{}{window}", alloc("a", "team-a", 16, "")).replacen("---\n", "", 1)),
    ];
    for (i, c) in fixtures.iter().enumerate() {
        // The admission loop's path: its stores, its view cache, its decide.
        let stores = super::stores(c);
        let views = crate::controller::view::ViewCache::new(settings().node_grace, Default::default());
        let (view, _) = views.get_recent(&stores, std::time::Duration::ZERO).await;
        let projects = stores.projects.store.state();
        let by_loop = crate::controller::admission::decide(&view, &stores, &projects, now(), &settings().admission());
        // plan's path.
        let by_plan = super::adapter::decide(c, now(), &settings()).gangs;
        let kinds: std::collections::BTreeSet<&str> = by_loop
            .gangs
            .values()
            .map(|d| match d {
                GangDecision::Admit { borrowed: true, .. } => "borrowed",
                GangDecision::Admit { .. } => "admit",
                GangDecision::Wait { .. } => "wait",
                GangDecision::Stop { .. } => "stop",
                GangDecision::Evict { .. } => "evict",
            })
            .collect();
        let expected: &[&str] = [&["admit", "borrowed", "wait"][..], &["evict", "wait"], &["stop"]][i];
        assert!(expected.iter().all(|k| kinds.contains(k)), "fixture {i} decides {kinds:?}");
        assert_eq!(by_loop, by_plan, "fixture {i}");
    }
}

/// A labelled indexed Job of `pods` x 8 ATOM.
fn labelled_job(name: &str, pods: u32, annotations: &str) -> String {
    format!(
        "---\napiVersion: batch/v1\nkind: Job\nmetadata: {{name: {name}, namespace: team-a, labels: {{sovereign.ai/allocation: a}}, annotations: {{{annotations}}}}}\nspec:\n  completionMode: Indexed\n  parallelism: {pods}\n  completions: {pods}\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{{name: m, image: t, resources: {{limits: {{rebellions.ai/ATOM: \"8\"}}}}}}]\n"
    )
}

/// A labelled JobSet of two replicated jobs (a driver without devices, 2 workers of 8 ATOM), in one rack.
fn labelled_jobset(name: &str) -> String {
    let template = |devices: u32| {
        format!(
            "{{spec: {{parallelism: 1, completions: 1, template: {{spec: {{restartPolicy: Never, containers: [{{name: m, image: t, resources: {{limits: {{rebellions.ai/ATOM: \"{devices}\"}}}}}}]}}}}}}}}"
        )
    };
    format!(
        "---\napiVersion: jobset.x-k8s.io/v1alpha2\nkind: JobSet\nmetadata: {{name: {name}, namespace: team-a, labels: {{sovereign.ai/allocation: a}}, annotations: {{sovereign.ai/topology-key: topology.sovereign.ai/rack, sovereign.ai/topology-mode: Required}}}}\nspec:\n  replicatedJobs:\n  - {{name: driver, template: {}}}\n  - {{name: workers, replicas: 2, template: {}}}\n",
        template(0),
        template(8)
    )
}

#[test]
fn labelled_jobs_and_jobsets_are_planned_as_gangs_beside_the_projects() {
    // A grant of 24: the JobSet (16, one rack) first, then the Job of 2 x 8 does not fit.
    let yaml = format!(
        "{POOL}{}{}{}",
        alloc("a", "team-a", 24, ""),
        labelled_jobset("pair"),
        labelled_job("later", 2, "sovereign.ai/priority: \"-1\"")
    );
    let p = plan_of(&cluster(), &yaml);
    assert!(p.changes.contains(&"create JobSet team-a/pair".to_string()), "{:?}", p.changes);
    let pair = project_plan(&p, "JobSet team-a/pair");
    assert_eq!((&pair.fate, pair.pool.as_deref(), pair.allocation.as_str()), (&Fate::Admitted, Some("atom"), "a"));
    let racks: std::collections::BTreeSet<String> = pair
        .nodes
        .iter()
        .map(|n| n.trim_start_matches("atom-").parse::<usize>().unwrap().div_euclid(2).to_string())
        .collect();
    assert_eq!((pair.nodes.len(), racks.len()), (2, 1), "two workers in one rack: {:?}", pair.nodes);
    let later = project_plan(&p, "Job team-a/later");
    assert_eq!(later.fate, Fate::Waiting, "{later:?}");
    assert!(later.reason.as_deref().is_some_and(|r| r.contains("16")), "the reason in numbers: {later:?}");
    assert_eq!(p.pools_after[0].in_use, 16, "the admitted JobSet's devices");
    let table = render::table(&p);
    assert!(table.contains("JobSet team-a/pair") && table.contains("Job team-a/later"), "{table}");

    // Applied, the JobSet runs; a project of priority 100 then preempts it, and the Job waits on.
    let c = applied(&cluster(), &yaml);
    assert!(c.jobsets.iter().all(|j| !j.spec.suspend.unwrap_or(true)), "the JobSet is started");
    let p = plan_of(&c, &project("urgent", "team-a", "a", 3, 100));
    assert_eq!(project_plan(&p, "JobSet team-a/pair").fate, Fate::Preempted, "{:#?}", p.projects);
    assert_eq!(project_plan(&p, "team-a/urgent").fate, Fate::Admitted);
    assert_eq!(project_plan(&p, "JobSet team-a/pair").phase_now.as_deref(), Some("Running"));
}
