//! Least privilege of the operator: what its ServiceAccount may do, as the API
//! server enforces it with the chart's RBAC and ValidatingAdmissionPolicies. Each
//! write is made as the ServiceAccount (`kubectl --as`, or the API with its token
//! for node patches) as a server-side dry run, which runs authorization and
//! admission exactly as a real write and persists nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use sovereign_e2e::{Env, RELEASE, RELEASE_NAMESPACE, Scope, TestNamespace, wait_for};
use sovereign_operator::api::{GpuAllocation, find_condition};

use crate::grants::alloc_yaml;

fn operator() -> String {
    format!("--as=system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}")
}

/// A worker-like pod in `ns`, labelled as the operator labels its workers or not.
fn pod(ns: &str, worker: bool) -> String {
    let labels = if worker { "{sovereign.ai/project: p}" } else { "{app: x}" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: e2e-privilege, namespace: {ns}, labels: {labels}}}\n\
         spec: {{containers: [{{name: c, image: trainer:1}}]}}\n"
    )
}

fn quota(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: sovereign-accelerators, namespace: {ns}}}\n\
         spec: {{hard: {{requests.nvidia.com/gpu: \"8\"}}}}\n"
    )
}

fn service(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clusterIP: None}}\n"
    )
}

fn slice(ns: &str, service: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: e2e-privilege, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [10.0.0.9], hostname: p-worker-0}}]\n"
    )
}

/// The outcome of one write as the operator: Ok(()) when admitted, Err(stderr) when refused.
fn attempt(env: &Env, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Result<(), String>> {
    as_operator(env, &[&["--dry-run=server"], args].concat(), stdin)
}

/// One kubectl call as the operator.
fn as_operator(env: &Env, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Result<(), String>> {
    let who = operator();
    let mut all = vec![who.as_str()];
    all.extend_from_slice(args);
    let out = env.kubectl(&all, stdin)?;
    Ok(if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) })
}

pub async fn the_operator_writes_only_in_tenant_namespaces_and_on_pool_nodes(env: Arc<Env>) -> anyhow::Result<()> {
    let tenant = TestNamespace::create(&env.client, "privilege").await?;
    let result = async {
        let mut wrong = Vec::new();
        let mut refused = |what: &str, r: Result<(), String>, want: &str| match r {
            Ok(()) => wrong.push(format!("{what}: was allowed")),
            Err(e) if !e.contains(want) => wrong.push(format!("{what}: expected `{want}`, got {}", e.trim())),
            Err(_) => {}
        };
        let create = ["create", "-f", "-"];
        refused(
            "a worker pod in kube-system",
            attempt(&env, &create, Some(&pod("kube-system", true)))?,
            "may write pods only in tenant namespaces: namespace kube-system lacks the label sovereign.ai/tenant=true",
        );
        refused(
            "a worker pod in default (no tenant label)",
            attempt(&env, &create, Some(&pod("default", true)))?,
            "namespace default lacks the label sovereign.ai/tenant=true",
        );
        refused(
            "the quota in kube-system",
            attempt(&env, &create, Some(&quota("kube-system")))?,
            "may write resourcequotas only in tenant namespaces",
        );
        refused(
            "the rendezvous Service in kube-system",
            attempt(&env, &create, Some(&service("kube-system", "sovereign-rendezvous")))?,
            "may write services only in tenant namespaces",
        );
        refused(
            "another Service in a tenant namespace",
            attempt(&env, &create, Some(&service(&tenant.name, "web")))?,
            "only its own Service, sovereign-rendezvous",
        );
        refused(
            "a rendezvous EndpointSlice in kube-system",
            attempt(&env, &create, Some(&slice("kube-system", "sovereign-rendezvous")))?,
            "may write endpointslices only in tenant namespaces",
        );
        refused(
            "an endpoint of another Service in a tenant namespace (its DNS name taken over)",
            attempt(&env, &create, Some(&slice(&tenant.name, "web")))?,
            "only endpoints of its own Service, sovereign-rendezvous",
        );
        refused(
            "a pod that is no worker, in a tenant namespace",
            attempt(&env, &create, Some(&pod(&tenant.name, false)))?,
            "only the worker pods of ModelProjects",
        );
        // Verbs the operator never calls are not granted at all (RBAC).
        refused(
            "a pod deleted by name",
            attempt(&env, &["-n", "kube-system", "delete", "pod", "any"], None)?,
            "cannot delete resource \"pods\"",
        );
        refused(
            "an Endpoints object created (it may only delete the rendezvous Service's, on upgrade)",
            attempt(
                &env,
                &create,
                Some(&format!("apiVersion: v1\nkind: Endpoints\nmetadata: {{name: sovereign-rendezvous, namespace: {}}}\n", tenant.name)),
            )?,
            "cannot create resource \"endpoints\"",
        );
        refused(
            "a Secret read",
            as_operator(&env, &["-n", "kube-system", "get", "secrets"], None)?,
            "cannot list resource \"secrets\"",
        );

        // Nodes: a node without accelerators (a system or CPU node) is refused.
        let nodes = Api::<Node>::all(env.client.clone()).list(&ListParams::default()).await?.items;
        let has_accelerator = |n: &Node| {
            n.status.as_ref().and_then(|s| s.capacity.as_ref()).is_some_and(|c| c.keys().any(|k| k.contains('/')))
        };
        let plain = nodes.iter().find(|n| !has_accelerator(n)).context("a node without accelerators")?;
        let pool_node = nodes.iter().find(|n| has_accelerator(n)).context("an accelerator node")?;
        // Merge patches as the operator sends them (it has no `get` on nodes, so no kubectl label/taint).
        let label = |k: &str| format!(r#"{{"metadata":{{"labels":{{"{k}":"x"}}}}}}"#);
        let mut taints = pool_node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        taints.push(k8s_openapi::api::core::v1::Taint {
            key: "sovereign.ai/reserved-for".into(),
            value: Some("x".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        });
        let taint = serde_json::json!({"spec": {"taints": taints}}).to_string();
        let (plain, pool_node) = (plain.metadata.name.clone().unwrap(), pool_node.metadata.name.clone().unwrap());
        // kubectl patch reads the node first; the operator's token has no `get`, so patch through
        // the API with that token.
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(env.operator_kubeconfig()?)?,
            &Default::default(),
        )
        .await?;
        let op_client = kube::Client::try_from(config)?;
        let as_op: Api<Node> = Api::all(op_client.clone());
        let patch = async |node: &str, body: &str| -> anyhow::Result<Result<(), String>> {
            let pp = kube::api::PatchParams { dry_run: true, ..Default::default() };
            let body: serde_json::Value = serde_json::from_str(body)?;
            Ok(as_op.patch(node, &pp, &kube::api::Patch::Merge(&body)).await.map(|_| ()).map_err(|e| e.to_string()))
        };
        refused(
            "a reservation on a node without accelerators",
            patch(&plain, &label("sovereign.ai/reserved-for")).await?,
            &format!("may patch only accelerator nodes (an extended resource such as nvidia.com/gpu in status.capacity); node {plain} has none"),
        );
        refused(
            "another label on an accelerator node",
            patch(&pool_node, &label("role")).await?,
            "may change on a node only its reservation",
        );
        refused(
            "a cordon of an accelerator node",
            patch(&pool_node, r#"{"spec":{"unschedulable":true}}"#).await?,
            "may change on a node only its reservation",
        );

        // What the operator does is allowed.
        let mut allowed = |what: &str, r: Result<(), String>| {
            if let Err(e) = r {
                wrong.push(format!("{what}: was refused: {}", e.trim()));
            }
        };
        allowed("a worker pod in a tenant namespace", attempt(&env, &create, Some(&pod(&tenant.name, true)))?);
        allowed("the quota in a tenant namespace", attempt(&env, &create, Some(&quota(&tenant.name)))?);
        allowed(
            "the rendezvous Service in a tenant namespace",
            attempt(&env, &create, Some(&service(&tenant.name, "sovereign-rendezvous")))?,
        );
        allowed(
            "worker 0's endpoint under the rendezvous Service in a tenant namespace",
            attempt(&env, &create, Some(&slice(&tenant.name, "sovereign-rendezvous")))?,
        );
        allowed(
            "a reservation on an accelerator node",
            patch(&pool_node, &label("sovereign.ai/reserved-for")).await?,
        );
        allowed(
            "a reservation taint on an accelerator node",
            patch(&pool_node, &taint).await?,
        );
        ensure!(wrong.is_empty(), "{} attempts wrong:\n{}", wrong.len(), wrong.join("\n"));

        // An allocation that lists a namespace without the tenant label says so.
        let plain_ns = format!("{}-plain", tenant.name);
        env.kubectl_ok(&["create", "namespace", &plain_ns], None)?;
        let alloc = alloc_yaml("e2e-untenanted", &[&plain_ns], "[{pool: e2e-none, accelerators: 8}]", "");
        let mut scope = Scope::new(&env);
        let seen = async {
            scope.apply(&alloc)?;
            let allocations: Api<GpuAllocation> = Api::all(env.client.clone());
            wait_for("QuotaApplied=False NamespaceNotTenant", Duration::from_secs(30), || async {
                let a = allocations.get("e2e-untenanted").await.map_err(|e| e.to_string())?;
                let conds = a.status.unwrap_or_default().conditions;
                let c = find_condition(&conds, "QuotaApplied").ok_or("no QuotaApplied condition")?;
                let want = format!("namespace(s) {plain_ns} lack the label sovereign.ai/tenant=true");
                if c.status == "False" && c.reason == "NamespaceNotTenant" && c.message.starts_with(&want) {
                    Ok(())
                } else {
                    Err(format!("{}: {}", c.reason, c.message))
                }
            })
            .await?;
            // The operator may set the allocation's finalizer, never its spec (a token that could
            // would add kube-system to tenant.namespaces).
            let as_op: Api<GpuAllocation> = Api::all(op_client.clone());
            let pp = kube::api::PatchParams { dry_run: true, ..Default::default() };
            let spec = serde_json::json!({"spec": {"tenant": {"namespaces": [&plain_ns, "kube-system"]}}});
            match as_op.patch("e2e-untenanted", &pp, &kube::api::Patch::Merge(&spec)).await {
                Ok(_) => anyhow::bail!("the operator changed an allocation's spec"),
                Err(e) => ensure!(e.to_string().contains("may not change a GpuAllocation's spec"), "{e}"),
            }
            let fin = serde_json::json!({"metadata": {"finalizers": ["sovereign.ai/release-reservations"]}});
            as_op.patch("e2e-untenanted", &pp, &kube::api::Patch::Merge(&fin)).await?;
            anyhow::Ok(())
        }
        .await;
        let cleaned = scope.cleanup();
        env.kubectl(&["delete", "namespace", &plain_ns, "--wait=false"], None)?;
        seen?;
        cleaned
    }
    .await;
    tenant.cleanup().await?;
    result
}

/// The ledger's finalizer on an admitted Job's pod (the chart's ledger-finalizer policy adds it)
/// is the operator's to remove, and that is all it may change on such a pod: a write that also
/// changes its labels, annotations, spec or another finalizer is refused.
pub async fn the_operator_changes_an_admitted_jobs_pod_only_by_removing_the_ledger_finalizer(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let tenant = TestNamespace::create(&env.client, "privilege-ledger").await?;
    let ns = tenant.name.clone();
    // As the Job controller makes it from a pinned template (made here by the admin, with the
    // finalizers the policy and another controller would have added).
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: e2e-held, namespace: {ns}, \
         labels: {{sovereign.ai/job: train, sovereign.ai/pool: h200, sovereign.ai/allocation: a}}, \
         finalizers: [example.com/keep, sovereign.ai/usage-ledger]}}\n\
         spec: {{nodeName: nowhere, containers: [{{name: c, image: trainer:1}}]}}\n"
    );
    env.kubectl_ok(&["create", "-f", "-"], Some(&pod))?;
    let result = async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(env.operator_kubeconfig()?)?,
            &Default::default(),
        )
        .await?;
        let as_op: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(kube::Client::try_from(config)?, &ns);
        let patch = async |body: serde_json::Value| {
            let pp = kube::api::PatchParams { dry_run: true, ..Default::default() };
            as_op.patch("e2e-held", &pp, &kube::api::Patch::Merge(&body)).await.map(|_| ()).map_err(|e| e.to_string())
        };
        let want = "update an admitted Job's or JobSet's pod only removing the finalizer sovereign.ai/usage-ledger";
        let refusals = [
            ("and a label", serde_json::json!({"metadata": {"finalizers": ["example.com/keep"], "labels": {"x": "1"}}})),
            ("and an annotation", serde_json::json!({"metadata": {"finalizers": ["example.com/keep"], "annotations": {"x": "1"}}})),
            ("and the spec", serde_json::json!({"metadata": {"finalizers": ["example.com/keep"]}, "spec": {"activeDeadlineSeconds": 5}})),
            ("another finalizer instead", serde_json::json!({"metadata": {"finalizers": ["sovereign.ai/usage-ledger"]}})),
            ("every finalizer", serde_json::json!({"metadata": {"finalizers": []}})),
        ];
        let mut wrong = Vec::new();
        for (what, body) in refusals {
            match patch(body).await {
                Ok(()) => wrong.push(format!("removing the ledger finalizer {what}: was allowed")),
                Err(e) if !e.contains(want) => wrong.push(format!("removing the ledger finalizer {what}: {e}")),
                Err(_) => {}
            }
        }
        if let Err(e) = patch(serde_json::json!({"metadata": {"finalizers": ["example.com/keep"]}})).await {
            wrong.push(format!("removing the ledger finalizer only: was refused: {e}"));
        }
        ensure!(wrong.is_empty(), "the operator's writes on a Job's pod:\n{}", wrong.join("\n"));
        anyhow::Ok(())
    }
    .await;
    env.kubectl_ok(
        &[
            "-n",
            &ns,
            "patch",
            "pod",
            "e2e-held",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ],
        None,
    )?;
    tenant.cleanup().await?;
    result
}
