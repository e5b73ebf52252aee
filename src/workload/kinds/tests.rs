use serde_json::{Value, json};

use super::*;

fn container(name: &str, resources: Value) -> Value {
    json!({"name": name, "image": "trainer:1", "resources": resources})
}

fn gpus(n: i64) -> Value {
    json!({"limits": {"nvidia.com/gpu": n.to_string()}, "requests": {"nvidia.com/gpu": n.to_string(), "cpu": "8"}})
}

fn template(containers: Value) -> Value {
    json!({"spec": {"containers": containers, "restartPolicy": "Never"}})
}

fn meta(labelled: bool, annotations: Value) -> Value {
    let mut m = json!({"name": "train", "namespace": "team-a", "annotations": annotations});
    if labelled {
        m["labels"] = json!({"sovereign.ai/allocation": "upstage", "team": "a"});
    }
    m
}

fn job(labelled: bool, annotations: Value, spec: Value) -> Job {
    serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": meta(labelled, annotations), "spec": spec}))
    .unwrap()
}

fn job_spec(parallelism: Option<i32>, completions: Option<i32>, containers: Value) -> Value {
    let mut s = json!({"completionMode": "Indexed", "template": template(containers)});
    if let Some(p) = parallelism {
        s["parallelism"] = json!(p);
    }
    if let Some(c) = completions {
        s["completions"] = json!(c);
    }
    s
}

fn members(name: &str, pods: u32, per_pod: i64) -> Members {
    Members { name: name.into(), pods, per_pod }
}

#[test]
fn an_indexed_job_is_one_gang_of_its_pods() {
    let j = job(
        true,
        json!({"sovereign.ai/pools": "h200, b200", "sovereign.ai/topology-key": "topology.sovereign.ai/rack",
               "sovereign.ai/topology-mode": "Required", "sovereign.ai/priority": "50"}),
        job_spec(Some(4), Some(4), json!([container("main", gpus(8))])),
    );
    let g = read_job(&j).unwrap().unwrap();
    assert_eq!(
        g,
        WorkloadGang {
            kind: WorkloadKind::Job,
            namespace: "team-a".into(),
            name: "train".into(),
            allocation: "upstage".into(),
            pools: vec!["h200".into(), "b200".into()],
            resource: "nvidia.com/gpu".into(),
            members: vec![members("job", 4, 8)],
            topology: Some(TopologyConstraint {
                key: "topology.sovereign.ai/rack".into(),
                mode: TopologyMode::Required
            }),
            priority: 50,
        }
    );
    assert_eq!((g.pods(), g.devices()), (4, 32));
}

#[test]
fn an_unlabelled_workload_is_not_ours_whatever_it_holds() {
    // Even one that would be refused if it were labelled.
    let j = job(false, json!({"sovereign.ai/priority": "x"}), job_spec(Some(4), Some(2), json!([])));
    assert_eq!(read_job(&j), Ok(None));
    let js: JobSet = serde_json::from_value(json!({"metadata": meta(false, json!({})), "spec": {}})).unwrap();
    assert_eq!(read_jobset(&js), Ok(None));
}

/// (case, parallelism, completions, containers, pods x per pod or the error)
type JobCase = (&'static str, Option<i32>, Option<i32>, Value, Result<(u32, i64), WorkloadError>);

/// Annotations -> (pools, topology key and mode, priority) or the error.
type AnnotationCase = (Value, Result<(Vec<&'static str>, Option<(&'static str, TopologyMode)>, i32), WorkloadError>);

#[test]
fn job_shapes_table() {
    let one_gpu = || json!([container("main", gpus(1))]);
    let cases: Vec<JobCase> = vec![
        ("defaults: one pod", None, None, one_gpu(), Ok((1, 1))),
        ("parallelism 1, completions unset", Some(1), None, one_gpu(), Ok((1, 1))),
        (
            "more completions than parallelism",
            Some(2),
            Some(4),
            one_gpu(),
            Err(WorkloadError::ParallelismNotCompletions {
                what: "job".into(),
                parallelism: 2,
                completions: "4".into(),
            }),
        ),
        (
            "a work queue (completions unset)",
            Some(3),
            None,
            one_gpu(),
            Err(WorkloadError::ParallelismNotCompletions {
                what: "job".into(),
                parallelism: 3,
                completions: "unset".into(),
            }),
        ),
        (
            "zero pods",
            Some(0),
            Some(0),
            one_gpu(),
            Err(WorkloadError::NotPositive { what: "job".into(), field: "parallelism", value: 0 }),
        ),
        (
            "limits only",
            Some(2),
            Some(2),
            json!([container("main", json!({"limits": {"rebellions.ai/ATOM": "4"}}))]),
            Ok((2, 4)),
        ),
        (
            "two containers add up",
            Some(2),
            Some(2),
            json!([container("a", gpus(2)), container("b", gpus(6))]),
            Ok((2, 8)),
        ),
        (
            "a sidecar adds, a plain init container counts only if larger",
            Some(1),
            Some(1),
            json!([container("main", gpus(2))]),
            Ok((1, 3)),
        ),
        (
            "no accelerators",
            Some(2),
            Some(2),
            json!([container("main", json!({"requests": {"cpu": "1"}}))]),
            Err(WorkloadError::NoAccelerators),
        ),
        (
            "hugepages and kubernetes.io names are not devices",
            Some(1),
            Some(1),
            json!([container("main", json!({"limits": {"hugepages-2Mi": "1Gi", "example.kubernetes.io/x": "1"}}))]),
            Err(WorkloadError::NoAccelerators),
        ),
        (
            "two resource names in one pod",
            Some(1),
            Some(1),
            json!([container("a", gpus(8)), container("b", json!({"limits": {"furiosa.ai/rngd": "1"}}))]),
            Err(WorkloadError::SeveralResources {
                what: "job".into(),
                resources: vec!["furiosa.ai/rngd".into(), "nvidia.com/gpu".into()],
            }),
        ),
        (
            "a fraction of a device",
            Some(1),
            Some(1),
            json!([container("main", json!({"limits": {"nvidia.com/gpu": "500m"}}))]),
            Err(WorkloadError::BadQuantity {
                what: "job".into(),
                container: "main".into(),
                resource: "nvidia.com/gpu".into(),
                value: "500m".into(),
            }),
        ),
    ];
    for (case, p, c, containers, want) in cases {
        let mut spec = job_spec(p, c, containers);
        if case.starts_with("a sidecar") {
            spec["template"]["spec"]["initContainers"] = json!([
                container("sidecar", gpus(1)).as_object().cloned().map(|mut o| {
                    o.insert("restartPolicy".into(), json!("Always"));
                    o
                }),
                container("setup", gpus(2)),
            ]);
        }
        let got = read_job(&job(true, json!({}), spec)).map(|g| {
            let g = g.expect("labelled");
            (g.pods(), g.members[0].per_pod)
        });
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn a_plain_init_container_larger_than_the_app_sets_the_ask() {
    let mut spec = job_spec(Some(1), Some(1), json!([container("main", gpus(2))]));
    spec["template"]["spec"]["initContainers"] = json!([container("warmup", gpus(8))]);
    let g = read_job(&job(true, json!({}), spec)).unwrap().unwrap();
    assert_eq!(g.members[0].per_pod, 8);
}

#[test]
fn annotation_table() {
    let cases: Vec<AnnotationCase> = vec![
        (json!({}), Ok((vec![], None, 0))),
        (json!({"sovereign.ai/pools": "atom"}), Ok((vec!["atom"], None, 0))),
        (
            json!({"sovereign.ai/topology-key": "topology.sovereign.ai/block"}),
            Ok((vec![], Some(("topology.sovereign.ai/block", TopologyMode::Preferred)), 0)),
        ),
        (json!({"sovereign.ai/priority": "-1000"}), Ok((vec![], None, -1000))),
        (json!({"sovereign.ai/priority": "1001"}), Err(WorkloadError::BadPriority { value: "1001".into() })),
        (json!({"sovereign.ai/priority": "high"}), Err(WorkloadError::BadPriority { value: "high".into() })),
        (
            json!({"sovereign.ai/pools": "h200,,b200"}),
            Err(WorkloadError::BadPools {
                value: "h200,,b200".into(),
                reason: "\"\" is not a pool name (lowercase letters, digits, '-' and '.'); list pools comma-separated, for example \"h200,b200\"".into(),
            }),
        ),
        (
            json!({"sovereign.ai/pools": "h200,H200"}),
            Err(WorkloadError::BadPools {
                value: "h200,H200".into(),
                reason: "\"H200\" is not a pool name (lowercase letters, digits, '-' and '.'); list pools comma-separated, for example \"h200,b200\"".into(),
            }),
        ),
        (
            json!({"sovereign.ai/pools": "h200,b200,h200"}),
            Err(WorkloadError::BadPools { value: "h200,b200,h200".into(), reason: "pool h200 is listed twice".into() }),
        ),
        (
            json!({"sovereign.ai/pools": "a,b,c,d,e,f,g,h,i"}),
            Err(WorkloadError::BadPools { value: "a,b,c,d,e,f,g,h,i".into(), reason: "9 pools; at most 8".into() }),
        ),
        (json!({"sovereign.ai/topology-mode": "Required"}), Err(WorkloadError::ModeWithoutKey)),
        (
            json!({"sovereign.ai/topology-key": "rack", "sovereign.ai/topology-mode": "required"}),
            Err(WorkloadError::BadTopologyMode { value: "required".into() }),
        ),
        (
            json!({"sovereign.ai/topology-key": "not a key"}),
            Err(WorkloadError::BadTopologyKey { value: "not a key".into() }),
        ),
    ];
    for (annotations, want) in cases {
        let j = job(true, annotations.clone(), job_spec(Some(1), Some(1), json!([container("main", gpus(1))])));
        let got = read_job(&j).map(|g| {
            let g = g.expect("labelled");
            (g.pools, g.topology.map(|t| (t.key, t.mode)), g.priority)
        });
        let want = want.map(|(p, t, prio)| {
            (p.into_iter().map(String::from).collect::<Vec<_>>(), t.map(|(k, m)| (k.to_string(), m)), prio)
        });
        assert_eq!(got, want, "{annotations}");
    }
}

fn jobset(replicated: Value) -> JobSet {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": meta(true, json!({"sovereign.ai/pools": "b200"})),
        "spec": {"replicatedJobs": replicated, "suspend": true}
    }))
    .unwrap();
    JobSet::from_dynamic(&obj).unwrap()
}

fn replicated(name: &str, replicas: Option<i32>, pods: i32, containers: Value) -> Value {
    let mut r = json!({"name": name, "template": {"spec": job_spec(Some(pods), Some(pods), containers)}});
    if let Some(n) = replicas {
        r["replicas"] = json!(n);
    }
    r
}

#[test]
fn a_jobset_is_one_gang_of_every_replicated_job() {
    let js = jobset(json!([
        replicated("driver", None, 1, json!([container("main", json!({"requests": {"cpu": "1"}}))])),
        replicated("workers", Some(2), 4, json!([container("main", gpus(8))])),
    ]));
    assert_eq!(js.spec.suspend, Some(true));
    let g = read_jobset(&js).unwrap().unwrap();
    assert_eq!(g.kind, WorkloadKind::JobSet);
    assert_eq!(g.members, vec![members("driver", 1, 0), members("workers", 8, 8)]);
    assert_eq!((g.pods(), g.devices(), g.resource.as_str()), (9, 64, "nvidia.com/gpu"));
    assert_eq!((g.workers(), g.per_worker()), (8, 8), "the driver asks for no devices: no worker of the gang");
    assert_eq!(g.pools, vec!["b200".to_string()]);
}

#[test]
fn jobset_errors_table() {
    let cases: Vec<(&str, Value, WorkloadError)> = vec![
        ("no replicated jobs", json!([]), WorkloadError::NoReplicatedJobs),
        (
            "two resource names across replicated jobs",
            json!([
                replicated("gpu", None, 1, json!([container("main", gpus(8))])),
                replicated("npu", None, 1, json!([container("main", json!({"limits": {"rebellions.ai/ATOM": "8"}}))])),
            ]),
            WorkloadError::SeveralResources {
                what: "the workload".into(),
                resources: vec!["nvidia.com/gpu".into(), "rebellions.ai/ATOM".into()],
            },
        ),
        (
            "zero replicas",
            json!([replicated("workers", Some(0), 1, json!([container("main", gpus(8))]))]),
            WorkloadError::NotPositive { what: "replicated job workers".into(), field: "replicas", value: 0 },
        ),
        (
            "a replicated job that is not a gang",
            json!([{"name": "workers", "template": {"spec": job_spec(Some(2), Some(8), json!([container("main", gpus(8))]))}}]),
            WorkloadError::ParallelismNotCompletions {
                what: "replicated job workers".into(),
                parallelism: 2,
                completions: "8".into(),
            },
        ),
        (
            "pods of two replicated jobs asking for different devices",
            json!([
                replicated("big", None, 1, json!([container("main", gpus(8))])),
                replicated("small", Some(2), 1, json!([container("main", gpus(4))])),
            ]),
            WorkloadError::UnevenPods { counts: vec![("big".into(), 8), ("small".into(), 4)] },
        ),
        (
            "no accelerators anywhere",
            json!([replicated("cpu", None, 2, json!([container("main", json!({"requests": {"cpu": "1"}}))]))]),
            WorkloadError::NoAccelerators,
        ),
    ];
    for (case, replicated_jobs, want) in cases {
        assert_eq!(read_jobset(&jobset(replicated_jobs)), Err(want), "{case}");
    }
}

#[test]
fn a_dynamic_object_without_a_spec_is_not_a_jobset() {
    let obj: DynamicObject = serde_json::from_value(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet", "metadata": {"name": "x"}}))
    .unwrap();
    assert!(matches!(JobSet::from_dynamic(&obj), Err(WorkloadError::NotAJobSet(_))));
}

#[test]
fn errors_say_what_to_change() {
    let e = WorkloadError::ParallelismNotCompletions { what: "job".into(), parallelism: 2, completions: "4".into() };
    assert!(e.to_string().contains("set both to the number of pods"), "{e}");
    let e = WorkloadError::SeveralResources { what: "job".into(), resources: vec!["a.io/x".into(), "b.io/y".into()] };
    assert_eq!(
        e.to_string(),
        "job: pods ask for 2 accelerator resources (a.io/x, b.io/y); a gang runs on one pool, whose devices have one resource name: ask for one"
    );
    assert!(WorkloadError::NoAccelerators.to_string().contains("remove the label sovereign.ai/allocation"));
}

#[test]
fn named_pools_of_another_resource_name_are_refused_and_the_default_keeps_the_pods_resource() {
    let resources: BTreeMap<&str, &str> =
        [("rngd", "furiosa.ai/rngd"), ("h200", "nvidia.com/gpu"), ("b200", "nvidia.com/gpu")].into();
    let resource_of = |p: &str| resources.get(p).map(|r| r.to_string());
    let gang = |pools: &[&str]| {
        let notes = if pools.is_empty() { json!({}) } else { json!({"sovereign.ai/pools": pools.join(",")}) };
        read_job(&job(true, notes, job_spec(Some(2), Some(2), json!([container("main", gpus(8))])))).unwrap().unwrap()
    };
    let granted: Vec<String> = ["rngd", "h200", "b200", "h200"].map(String::from).to_vec();
    let ok = |pools: &[&str]| resolve_pools(&gang(pools), &granted, &resource_of);

    assert_eq!(ok(&["b200", "h200"]).unwrap(), ["b200", "h200"], "one resource name: the order kept");
    assert_eq!(
        ok(&["h200", "gone", "b200"]).unwrap(),
        ["h200", "b200"],
        "a pool that does not exist (yet) is left out"
    );
    assert_eq!(ok(&[]).unwrap(), ["h200", "b200"], "the allocation's pools of the pods' resource, once each");

    let e = ok(&["rngd", "h200", "b200"]).unwrap_err();
    assert_eq!(
        e,
        WorkloadError::OtherResource(Box::new(OtherResource {
            value: "rngd,h200,b200".into(),
            kind: "Job",
            pool: "rngd".into(),
            gives: "furiosa.ai/rngd".into(),
            asks: "nvidia.com/gpu".into(),
            same: vec!["h200".into(), "b200".into()],
        }))
    );
    assert_eq!(
        e.to_string(),
        "annotation sovereign.ai/pools \"rngd,h200,b200\": pool rngd gives furiosa.ai/rngd but the pods ask for \
         nvidia.com/gpu; a Job's requests cannot change while it is held, so it falls back only between pools of one \
         resource name: list only pools that give nvidia.com/gpu (here: h200,b200), or submit one Job per resource \
         name (or a ModelProject, which falls back across resource names)"
    );
    let e = ok(&["rngd"]).unwrap_err();
    assert!(e.to_string().contains("list only pools that give nvidia.com/gpu, or submit"), "nothing to name: {e}");
}
