//! Desired objects of an admitted ModelProject: the worker pods (placement,
//! accelerators, and the torchrun environment added to the user's template),
//! the one headless Service per tenant namespace, and the EndpointSlice that
//! gives each gang's worker 0 a DNS name under it. Pure: no client.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, Pod, PodSpec, ResourceRequirements, Service, ServiceSpec, Toleration,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::{AcceleratorPool, ModelProject};
use crate::snapshot::{
    ALLOCATION_LABEL, LEDGER_FINALIZER, MANAGED_BY, POOL_LABEL, PROJECT_LABEL, RESERVED_FOR, WORKER_INDEX_LABEL,
};

pub mod kinds;

/// Where an admitted gang runs.
#[derive(Clone, Debug)]
pub struct Placement<'a> {
    pub pool: &'a AcceleratorPool,
    /// Node of worker i.
    pub nodes: &'a [String],
    /// The allocation holds these nodes by a dedicated grant: tolerate its taint.
    pub dedicated: bool,
}

pub fn worker_name(project: &str, index: usize) -> String {
    format!("{project}-worker-{index}")
}

fn owner(project: &ModelProject) -> Vec<OwnerReference> {
    project.controller_owner_ref(&()).into_iter().collect()
}

fn labels(project: &ModelProject, pool: &str) -> BTreeMap<String, String> {
    [
        (PROJECT_LABEL.to_string(), project.name_any()),
        (ALLOCATION_LABEL.to_string(), project.spec.allocation.clone()),
        (POOL_LABEL.to_string(), pool.to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
    ]
    .into()
}

/// Name of the headless Service in every tenant namespace: the subdomain of
/// every worker pod, so `<project>-worker-0.sovereign-rendezvous` resolves to
/// worker 0 of each gang, its rendezvous.
pub const RENDEZVOUS_SERVICE: &str = "sovereign-rendezvous";

/// The rendezvous Service of a tenant namespace: headless, with no selector and
/// no ports. Its endpoints are the operator's own, one EndpointSlice per gang
/// ([`rendezvous_slice`]): with a selector, the endpoints controllers would
/// rewrite the namespace's whole Endpoints and EndpointSlice (every gang's
/// worker 0) each time one worker 0 came or went. DNS names a headless
/// Service's endpoints whatever their ports, and each gang chooses its own
/// `masterPort`.
pub fn rendezvous_service() -> Service {
    let managed = (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string());
    Service {
        metadata: ObjectMeta {
            name: Some(RENDEZVOUS_SERVICE.into()),
            labels: Some([managed].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec { cluster_ip: Some("None".into()), ..Default::default() }),
        ..Default::default()
    }
}

/// The label that ties an EndpointSlice to its Service (what DNS reads).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Who manages an EndpointSlice: the endpoints controllers leave ours alone.
pub const SLICE_MANAGED_BY: (&str, &str) =
    ("endpointslice.kubernetes.io/managed-by", "sovereign-operator.sovereign.ai");

/// Worker 0's endpoint in the namespace's rendezvous Service, once the pod has
/// an IP: one EndpointSlice per gang, named as the pod and owned by it (it goes
/// with the pod), so `<project>-worker-0.sovereign-rendezvous` resolves to that
/// pod. Published before the pod is ready, as torchrun's peers retry until
/// worker 0 listens.
pub fn rendezvous_slice(project: &str, worker0: &Pod) -> Option<EndpointSlice> {
    let ip = worker0.status.as_ref()?.pod_ip.clone()?;
    let address_type = match ip.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(_) => "IPv4",
        std::net::IpAddr::V6(_) => "IPv6",
    };
    let name = worker_name(project, 0);
    let labels = [
        (SERVICE_NAME_LABEL.to_string(), RENDEZVOUS_SERVICE.to_string()),
        (SLICE_MANAGED_BY.0.to_string(), SLICE_MANAGED_BY.1.to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (PROJECT_LABEL.to_string(), project.to_string()),
    ];
    let owner = worker0.owner_ref(&())?;
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.into()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        address_type: address_type.into(),
        endpoints: vec![Endpoint {
            addresses: vec![ip],
            hostname: Some(name.clone()),
            node_name: worker0.spec.as_ref().and_then(|s| s.node_name.clone()),
            conditions: Some(EndpointConditions { ready: Some(true), serving: Some(true), terminating: Some(false) }),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(name),
                namespace: worker0.namespace(),
                uid: worker0.uid(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ports: None,
    })
}

/// The torchrun / Kubeflow PyTorchJob environment of worker `index`.
pub fn torchrun_env(project: &ModelProject, index: usize) -> Vec<EnvVar> {
    let name = project.name_any();
    let master = format!("{}.{RENDEZVOUS_SERVICE}", worker_name(&name, 0));
    let port = project.spec.run_policy.master_port.to_string();
    let (workers, per) = (project.spec.workers.to_string(), project.spec.accelerators_per_worker.to_string());
    let rank = index.to_string();
    [
        ("MASTER_ADDR", master.as_str()),
        ("MASTER_PORT", port.as_str()),
        ("WORLD_SIZE", workers.as_str()),
        ("RANK", rank.as_str()),
        ("NODE_RANK", rank.as_str()),
        ("NNODES", workers.as_str()),
        ("NPROC_PER_NODE", per.as_str()),
        ("PET_MASTER_ADDR", master.as_str()),
        ("PET_MASTER_PORT", port.as_str()),
        ("PET_NNODES", workers.as_str()),
        ("PET_NPROC_PER_NODE", per.as_str()),
        ("PET_NODE_RANK", rank.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| EnvVar { name: k.into(), value: Some(v.into()), value_from: None })
    .collect()
}

/// Worker pod `index` of an admitted project.
pub fn worker_pod(project: &ModelProject, placement: &Placement<'_>, index: usize) -> Pod {
    let t = &project.spec.template;
    let pool = placement.pool;
    let pool_name = pool.name_any();
    let name = worker_name(&project.name_any(), index);

    // The user's env wins: ours only fill names the user did not set.
    let mut env = t.env.clone();
    for var in torchrun_env(project, index) {
        if !env.iter().any(|e| e.name == var.name) {
            env.push(var);
        }
    }
    let devices = Quantity(project.spec.accelerators_per_worker.to_string());
    let mut resources = t.resources.clone().unwrap_or_default();
    resources.requests.get_or_insert_with(Default::default).insert(pool.spec.resource_name.clone(), devices.clone());
    resources.limits.get_or_insert_with(Default::default).insert(pool.spec.resource_name.clone(), devices);

    let mut tolerations: Vec<Toleration> = pool.spec.tolerations.clone();
    if placement.dedicated {
        tolerations.push(Toleration {
            key: Some(RESERVED_FOR.into()),
            operator: Some("Equal".into()),
            value: Some(project.spec.allocation.clone()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    let mut pod_labels = t.labels.clone();
    pod_labels.extend(labels(project, &pool_name));
    pod_labels.insert(WORKER_INDEX_LABEL.into(), index.to_string());
    let node = placement.nodes.get(index).cloned().unwrap_or_default();

    Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: project.namespace(),
            labels: Some(pod_labels),
            annotations: (!t.annotations.is_empty()).then(|| t.annotations.clone()),
            owner_references: Some(owner(project)),
            // Held until the ledger has charged the pod's lifetime.
            finalizers: Some(vec![LEDGER_FINALIZER.into()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            hostname: Some(name),
            subdomain: Some(RENDEZVOUS_SERVICE.into()),
            // Pinned to the node the plan chose; the scheduler still binds and checks.
            affinity: Some(on_node(node)),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(t.termination_grace_period_seconds.unwrap_or(30)),
            service_account_name: t.service_account_name.clone(),
            image_pull_secrets: (!t.image_pull_secrets.is_empty()).then(|| t.image_pull_secrets.clone()),
            priority_class_name: t.priority_class_name.clone(),
            volumes: (!t.volumes.is_empty()).then(|| t.volumes.clone()),
            security_context: t.pod_security_context.clone(),
            containers: vec![Container {
                name: "trainer".into(),
                image: Some(t.image.clone()),
                image_pull_policy: t.image_pull_policy.clone(),
                command: (!t.command.is_empty()).then(|| t.command.clone()),
                args: (!t.args.is_empty()).then(|| t.args.clone()),
                working_dir: t.working_dir.clone(),
                env: Some(env),
                env_from: (!t.env_from.is_empty()).then(|| t.env_from.clone()),
                resources: Some(ResourceRequirements { ..resources }),
                volume_mounts: (!t.volume_mounts.is_empty()).then(|| t.volume_mounts.clone()),
                security_context: t.security_context.clone(),
                ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                    name: Some("rendezvous".into()),
                    container_port: project.spec.run_policy.master_port,
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Required affinity to one node by name, as the DaemonSet controller pins its
/// pods: the scheduler's NodeAffinity pre-filter then checks that node alone,
/// where a nodeSelector on the hostname label makes it filter every node.
fn on_node(node: String) -> Affinity {
    let term = NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node]),
        }]),
        ..Default::default()
    };
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector { node_selector_terms: vec![term] }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node a worker pod is pinned to.
    fn pinned_node(pod: &Pod) -> Option<&str> {
        let affinity = pod.spec.as_ref()?.affinity.as_ref()?.node_affinity.as_ref()?;
        let term =
            affinity.required_during_scheduling_ignored_during_execution.as_ref()?.node_selector_terms.first()?;
        let field = term.match_fields.as_ref()?.iter().find(|r| r.key == "metadata.name" && r.operator == "In")?;
        field.values.as_ref()?.first().map(String::as_str)
    }

    fn project() -> ModelProject {
        let mut p: ModelProject = serde_json::from_value(serde_json::json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "ModelProject",
            "metadata": {"name": "llm", "namespace": "team", "uid": "u1"},
            "spec": {"allocation": "grant", "placement": {"pools": ["atom"]}, "workers": 4, "acceleratorsPerWorker": 8,
                     "template": {"image": "trainer:1", "env": [{"name": "MASTER_PORT", "value": "1234"}],
                                  "labels": {"team": "a"}, "resources": {"requests": {"cpu": "8"}}}}
        }))
        .unwrap();
        p.metadata.uid = Some("u1".into());
        p
    }

    fn pool() -> AcceleratorPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "AcceleratorPool", "metadata": {"name": "atom"},
            "spec": {"resourceName": "rebellions.ai/ATOM", "kind": "NPU", "vendor": "Rebellions", "model": "ATOM",
                     "nodeSelector": {"matchLabels": {"a": "b"}},
                     "tolerations": [{"key": "npu", "operator": "Exists", "effect": "NoSchedule"}]}
        }))
        .unwrap()
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn every_worker_gets_its_rank_and_the_shared_rendezvous() {
        let (p, pool) = (project(), pool());
        let nodes: Vec<String> = (0..4).map(|i| format!("atom-0{i}")).collect();
        let placement = Placement { pool: &pool, nodes: &nodes, dedicated: false };
        for (i, node) in nodes.iter().enumerate() {
            let pod = worker_pod(&p, &placement, i);
            let env = env_of(&pod);
            assert_eq!(env["RANK"], i.to_string());
            assert_eq!(env["PET_NODE_RANK"], i.to_string());
            assert_eq!(env["WORLD_SIZE"], "4");
            assert_eq!(env["PET_NPROC_PER_NODE"], "8");
            assert_eq!(env["MASTER_ADDR"], "llm-worker-0.sovereign-rendezvous");
            assert_eq!(env["MASTER_PORT"], "1234", "the user's value wins");
            assert_eq!(env["PET_MASTER_PORT"], "23456");
            let spec = pod.spec.as_ref().unwrap();
            assert_eq!(spec.hostname.as_deref(), Some(format!("llm-worker-{i}").as_str()));
            assert_eq!(spec.subdomain.as_deref(), Some(RENDEZVOUS_SERVICE));
            assert_eq!(pinned_node(&pod), Some(node.as_str()));
            assert_eq!(spec.node_selector, None, "pinned by name, not by the hostname label");
            let res = spec.containers[0].resources.as_ref().unwrap();
            assert_eq!(res.requests.as_ref().unwrap()["rebellions.ai/ATOM"], Quantity("8".into()));
            assert_eq!(res.limits.as_ref().unwrap()["rebellions.ai/ATOM"], Quantity("8".into()));
            assert_eq!(res.requests.as_ref().unwrap()["cpu"], Quantity("8".into()), "the user's requests are kept");
            let labels = pod.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[WORKER_INDEX_LABEL], i.to_string());
            assert_eq!(labels["team"], "a");
            assert_eq!(labels[POOL_LABEL], "atom");
            assert_eq!(pod.metadata.owner_references.as_ref().unwrap()[0].name, "llm");
            assert_eq!(spec.tolerations.as_ref().unwrap().len(), 1, "only the pool's toleration");
        }
    }

    #[test]
    fn the_templates_security_contexts_reach_the_pod_and_the_trainer() {
        let (mut p, pool) = (project(), pool());
        p.spec.template.pod_security_context =
            Some(serde_json::from_value(serde_json::json!({"runAsNonRoot": true})).unwrap());
        p.spec.template.security_context =
            Some(serde_json::from_value(serde_json::json!({"allowPrivilegeEscalation": false})).unwrap());
        let nodes = vec!["n".to_string(); 4];
        let spec = worker_pod(&p, &Placement { pool: &pool, nodes: &nodes, dedicated: false }, 0).spec.unwrap();
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
        assert_eq!(spec.containers[0].security_context.as_ref().unwrap().allow_privilege_escalation, Some(false));
    }

    #[test]
    fn dedicated_workers_tolerate_the_reservation() {
        let (p, pool) = (project(), pool());
        let nodes = vec!["n".to_string(); 4];
        let pod = worker_pod(&p, &Placement { pool: &pool, nodes: &nodes, dedicated: true }, 0);
        let tol = pod.spec.unwrap().tolerations.unwrap();
        assert!(tol.iter().any(|t| t.key.as_deref() == Some(RESERVED_FOR) && t.value.as_deref() == Some("grant")));
    }

    #[test]
    fn the_rendezvous_service_is_headless_and_selects_nothing_itself() {
        let svc = rendezvous_service();
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector, None, "its endpoints are the operator's: no controller rewrites them");
        assert_eq!(spec.ports, None);
        assert_eq!(svc.metadata.name.as_deref(), Some(RENDEZVOUS_SERVICE));
    }

    fn with_ip(mut pod: Pod, ip: Option<&str>) -> Pod {
        pod.metadata.uid = Some("u-0".into());
        pod.metadata.namespace = Some("team-a".into());
        pod.spec.as_mut().unwrap().node_name = Some("n".into());
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus { pod_ip: ip.map(Into::into), ..Default::default() });
        pod
    }

    #[test]
    fn worker_0_is_named_under_the_rendezvous_service_once_it_has_an_ip() {
        let (p, pool) = (project(), pool());
        let nodes = vec!["n".to_string(); 2];
        let placement = Placement { pool: &pool, nodes: &nodes, dedicated: false };
        let pod = worker_pod(&p, &placement, 0);
        assert!(rendezvous_slice("llm", &with_ip(pod.clone(), None)).is_none(), "no IP yet: nothing to name");

        let slice = rendezvous_slice("llm", &with_ip(pod.clone(), Some("10.1.2.3"))).unwrap();
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], RENDEZVOUS_SERVICE, "what DNS ties to the Service");
        assert_eq!(labels[SLICE_MANAGED_BY.0], SLICE_MANAGED_BY.1, "the endpoints controllers leave it alone");
        assert_eq!(slice.metadata.name.as_deref(), Some("llm-worker-0"));
        assert_eq!(slice.address_type, "IPv4");
        let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "u-0"), "it goes with the pod");
        let [ep] = &slice.endpoints[..] else { panic!("one endpoint: {:?}", slice.endpoints) };
        assert_eq!(ep.addresses, ["10.1.2.3"]);
        assert_eq!(ep.hostname.as_deref(), Some("llm-worker-0"), "the name MASTER_ADDR uses");
        assert_eq!(ep.conditions.as_ref().unwrap().ready, Some(true), "named before it is ready: ranks wait on it");

        let v6 = rendezvous_slice("llm", &with_ip(pod, Some("fd00::5"))).unwrap();
        assert_eq!(v6.address_type, "IPv6");
    }
}
