//! Bad worker templates against the real API server, one row each, run
//! concurrently: what the API server refuses when the operator creates the
//! pods or the Service is never silent and never holds devices; what would
//! give a tenant node-level access (or another ServiceAccount) is refused
//! unless the allocation's admin allows it; a template with a securityContext
//! runs in a namespace enforcing Pod Security `restricted`.
//!
//! Every row checks its condition and Warning Event (in the API server's
//! words where the API server refused), that no pod is left where none
//! belongs, that the project holds no devices (no pool, no nodes), and that a
//! valid project is admitted in its namespace afterwards. At the end, with
//! every refused project still there, a gang as large as the whole grant of
//! one pool is admitted: the refused ones hold nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use sovereign_e2e::{Env, in_namespaces, wait_for};
use sovereign_operator::api::{GpuAllocation, ModelProject, ModelProjectStatus, ProjectPhase, find_condition};

use crate::grants::{alloc_yaml, wait_phase};
use crate::projects::{atom, h200, status, wait_project};

/// Granted 24 of ATOM and 32 of H200: every row but those the admin allows.
const TENANT: &str = "e2e-refusals";
/// Granted 8 of the ATOM pool, with a workload policy.
const TRUSTED: &str = "e2e-refusals-trusted";
const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq)]
enum Alloc {
    Tenant,
    Trusted,
}

/// What the namespace of a row holds before the project is applied.
#[derive(Clone, Copy)]
enum Setup {
    None,
    /// pod-security.kubernetes.io/enforce=restricted.
    Restricted,
    /// A ResourceQuota of 1.5 CPUs: one worker of two (1 CPU each) fits.
    CpuQuota,
    /// A LimitRange of at most 1 CPU per container.
    CpuLimitRange,
    /// ServiceAccounts `trainer` and `builder` exist.
    ServiceAccounts,
}

#[derive(Clone, Copy)]
enum Expect {
    /// Refused by the API server at apply time: kubectl's error says this.
    AtApply(&'static str),
    /// Never admitted: Valid=False, reason NotAllowedByAllocation, saying this;
    /// no pod is ever created.
    NotAllowed(&'static str),
    /// Admitted, then the API server refused a pod or the Service for good:
    /// Blocked with WorkersCreated=False of this reason and these words. The
    /// check at the door may refuse it earlier (at apply, naming `at_apply`).
    Blocked { reason: &'static str, words: &'static str, at_apply: Option<&'static str> },
    /// A refusal that may heal (quota): retried and surfaced, and the
    /// scheduling timeout gives the devices back.
    Retried { reason: &'static str, words: &'static str },
    /// Allowed: runs, and the worker pod carries this (JSON) fragment.
    Runs(&'static str),
}

#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    /// Namespace prefix (rows share none).
    ns: &'static str,
    alloc: Alloc,
    setup: Setup,
    /// The project's name.
    project: &'static str,
    /// Lines added to the template (4 spaces in) and to the spec (2 in).
    extra: &'static str,
    expect: Expect,
    /// A JSON patch that fixes the project: then the same project is queued
    /// again and runs (a Blocked run waits for a change of its spec).
    fix: Option<&'static str>,
    /// Template lines of the valid project admitted afterwards.
    valid: &'static str,
}

const RESTRICTED: &str = "    podSecurityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}\n    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}\n";
const ONE_CPU: &str = "    resources: {requests: {cpu: \"1\"}, limits: {cpu: \"1\"}}\n";

fn rows() -> Vec<Row> {
    let row = |name, ns, project, extra, expect| Row {
        name,
        ns,
        alloc: Alloc::Tenant,
        setup: Setup::None,
        project,
        extra,
        expect,
        fix: None,
        valid: "",
    };
    let blocked = |reason, words, at_apply| Expect::Blocked { reason, words, at_apply };
    let mut rows = vec![
        // The API server refuses what the operator derives from the project.
        row(
            "a name with a dot is no hostname or Service name",
            "rf-dot",
            "llm.v2",
            "",
            blocked("Invalid", "llm.v2", Some("metadata.name")),
        ),
        row(
            "a 64-character name is no label value",
            "rf-long",
            "a-sixty-four-character-project-name-that-no-label-value-can-hold",
            "",
            blocked("Invalid", "must be no more than 63 characters", Some("metadata.name")),
        ),
        // The API server refuses what the template says.
        row(
            "a PriorityClass that does not exist",
            "rf-prio",
            "bad",
            "    priorityClassName: no-such-class\n",
            blocked("ReferenceNotFound", "no PriorityClass with name no-such-class was found", None),
        ),
        row(
            "a volumeMount without a volume",
            "rf-mount",
            "bad",
            "    volumeMounts: [{name: data, mountPath: /data}]\n",
            blocked("Invalid", "volumeMounts[0].name: Not found", Some("volumeMounts")),
        ),
        row(
            "requests above limits",
            "rf-limits",
            "bad",
            "    resources: {requests: {cpu: \"2\"}, limits: {cpu: \"1\"}}\n",
            blocked("Invalid", "must be less than or equal to cpu limit", Some("resources")),
        ),
        row(
            "an image pull policy that does not exist",
            "rf-pull",
            "bad",
            "    imagePullPolicy: Sometimes\n",
            blocked("Invalid", "Unsupported value: \"Sometimes\"", Some("imagePullPolicy")),
        ),
        row(
            "a label key that is no label key",
            "rf-label",
            "bad",
            "    labels: {\"not a key\": x}\n",
            blocked("Invalid", "not a key", Some("labels")),
        ),
        row(
            "two volumes of one name",
            "rf-dupvol",
            "bad",
            "    volumes: [{name: d, emptyDir: {}}, {name: d, emptyDir: {}}]\n",
            blocked("Invalid", "Duplicate value: \"d\"", Some("volumes")),
        ),
        row(
            "a 58-character name leaves no room for -worker-0 in a hostname",
            "rf-host",
            "a-sixty-character-project-name-that-fits-a-label-value-but",
            "",
            blocked("Invalid", "spec.hostname", Some("metadata.name")),
        ),
        row(
            "an env var from a field that does not exist",
            "rf-fieldref",
            "bad",
            "    env: [{name: X, valueFrom: {fieldRef: {fieldPath: spec.nothing}}}]\n",
            blocked("Invalid", "spec.nothing", Some("env")),
        ),
        row(
            "envFrom a ConfigMap whose name is no name",
            "rf-envfrom",
            "bad",
            "    envFrom: [{configMapRef: {name: Bad_Name}}]\n",
            blocked("Invalid", "Bad_Name", Some("envFrom")),
        ),
        row(
            "an annotation key that is no key",
            "rf-annot",
            "bad",
            "    annotations: {\"not a key\": x}\n",
            blocked("Invalid", "not a key", Some("annotations")),
        ),
        row(
            "a volume whose name is no name",
            "rf-volname",
            "bad",
            "    volumes: [{name: Bad_Name, emptyDir: {}}]\n",
            blocked("Invalid", "Bad_Name", Some("volumes")),
        ),
        row(
            "a volumeMount without a mountPath",
            "rf-mountpath",
            "bad",
            "    volumes: [{name: d, emptyDir: {}}]\n    volumeMounts: [{name: d, mountPath: \"\"}]\n",
            blocked("Invalid", "mountPath: Required value", Some("volumeMounts")),
        ),
        row(
            "a negative memory request",
            "rf-negmem",
            "bad",
            "    resources: {requests: {memory: \"-1\"}}\n",
            blocked("Invalid", "must be greater than or equal to 0", Some("resources")),
        ),
        row(
            "a CPU quantity that is no quantity",
            "rf-qty",
            "bad",
            "    resources: {requests: {cpu: \"1.5.5\"}}\n",
            blocked("BadRequest", "quantities must match the regular expression", Some("resources")),
        ),
        Row {
            setup: Setup::CpuLimitRange,
            ..row(
                "a container above the namespace's LimitRange",
                "rf-limitrange",
                "bad",
                "    resources: {requests: {cpu: \"2\"}, limits: {cpu: \"2\"}}\n",
                blocked("Forbidden", "maximum cpu usage per Container is 1", None),
            )
        },
        Row {
            setup: Setup::Restricted,
            fix: Some(
                r#"[{"op":"add","path":"/spec/template/podSecurityContext","value":{"runAsNonRoot":true,"runAsUser":1000,"seccompProfile":{"type":"RuntimeDefault"}}},{"op":"add","path":"/spec/template/securityContext","value":{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]}}}]"#,
            ),
            valid: RESTRICTED,
            ..row(
                "no securityContext in a namespace enforcing restricted, then fixed",
                "rf-psa",
                "bad",
                "",
                blocked("PodSecurity", "violates PodSecurity \"restricted:latest\"", None),
            )
        },
        Row {
            alloc: Alloc::Trusted,
            ..row(
                "an allowed ServiceAccount that does not exist",
                "rf-nosa",
                "bad",
                "    serviceAccountName: ghost\n",
                blocked("ReferenceNotFound", "serviceaccount \"ghost\" not found", None),
            )
        },
        Row {
            setup: Setup::CpuQuota,
            valid: ONE_CPU,
            ..row(
                "a namespace quota that admits one worker of two",
                "rf-quota",
                "bad",
                "    resources: {requests: {cpu: \"1\"}, limits: {cpu: \"1\"}}\n  runPolicy: {schedulingTimeoutSeconds: 10}\n",
                Expect::Retried { reason: "QuotaExceeded", words: "exceeded quota" },
            )
        },
        // Node-level access and ServiceAccounts the allocation does not allow.
        row(
            "the node's root through hostPath",
            "rf-hostpath",
            "bad",
            "    volumes: [{name: root, hostPath: {path: /}}]\n    volumeMounts: [{name: root, mountPath: /host}]\n",
            Expect::NotAllowed("volume root is a hostPath volume"),
        ),
        row(
            "an nfs volume",
            "rf-nfs",
            "bad",
            "    volumes: [{name: d, nfs: {server: nfs.example, path: /}}]\n",
            Expect::NotAllowed("volume d is a nfs volume"),
        ),
        row(
            "a privileged container",
            "rf-priv",
            "bad",
            "    securityContext: {privileged: true}\n",
            Expect::NotAllowed("securityContext.privileged"),
        ),
        row(
            "an added capability",
            "rf-cap",
            "bad",
            "    securityContext: {capabilities: {add: [SYS_ADMIN]}}\n",
            Expect::NotAllowed("capabilities.add SYS_ADMIN"),
        ),
        row(
            "a gitRepo volume (git runs on the node)",
            "rf-gitrepo",
            "bad",
            "    volumes: [{name: g, gitRepo: {repository: \"https://example.invalid/r.git\"}}]\n",
            Expect::NotAllowed("volume g is a gitRepo volume"),
        ),
        row(
            "an iscsi volume",
            "rf-iscsi",
            "bad",
            "    volumes: [{name: i, iscsi: {targetPortal: \"10.0.0.1:3260\", iqn: \"iqn.2001-04.com.example:t\", lun: 0}}]\n",
            Expect::NotAllowed("volume i is a iscsi volume"),
        ),
        row(
            "all capabilities",
            "rf-capall",
            "bad",
            "    securityContext: {capabilities: {add: [ALL]}}\n",
            Expect::NotAllowed("capabilities.add ALL"),
        ),
        row(
            "an Unmasked /proc",
            "rf-proc",
            "bad",
            "    securityContext: {procMount: Unmasked}\n",
            Expect::NotAllowed("procMount Unmasked"),
        ),
        row(
            "an Unconfined AppArmor profile",
            "rf-apparmor",
            "bad",
            "    securityContext: {appArmorProfile: {type: Unconfined}}\n",
            Expect::NotAllowed("appArmorProfile Unconfined"),
        ),
        row(
            "a Windows host process",
            "rf-hostproc",
            "bad",
            "    securityContext: {windowsOptions: {hostProcess: true}}\n",
            Expect::NotAllowed("hostProcess"),
        ),
        row(
            "an Unconfined seccomp profile",
            "rf-seccomp",
            "bad",
            "    podSecurityContext: {seccompProfile: {type: Unconfined}}\n",
            Expect::NotAllowed("seccompProfile Unconfined"),
        ),
        row(
            "SELinux options",
            "rf-selinux",
            "bad",
            "    securityContext: {seLinuxOptions: {type: spc_t}}\n",
            Expect::NotAllowed("seLinuxOptions"),
        ),
        row(
            "sysctls",
            "rf-sysctl",
            "bad",
            "    podSecurityContext: {sysctls: [{name: kernel.msgmax, value: \"65536\"}]}\n",
            Expect::NotAllowed("sysctls"),
        ),
        Row {
            setup: Setup::ServiceAccounts,
            ..row(
                "a ServiceAccount the allocation does not list",
                "rf-sa",
                "bad",
                "    serviceAccountName: builder\n",
                Expect::NotAllowed("serviceAccountName builder is not in GpuAllocation e2e-refusals"),
            )
        },
        // Pod fields the template does not have: nobody can ask for them.
        row("hostNetwork", "rf-hostnet", "bad", "    hostNetwork: true\n", Expect::AtApply("unknown field")),
        row("hostPID", "rf-hostpid", "bad", "    hostPID: true\n", Expect::AtApply("unknown field")),
        row("hostIPC", "rf-hostipc", "bad", "    hostIPC: true\n", Expect::AtApply("unknown field")),
        row(
            "a hostPort",
            "rf-hostport",
            "bad",
            "    ports: [{containerPort: 80, hostPort: 80}]\n",
            Expect::AtApply("unknown field"),
        ),
        row(
            "an init container",
            "rf-init",
            "bad",
            "    initContainers: [{name: x, image: busybox}]\n",
            Expect::AtApply("unknown field"),
        ),
        row("a nodeName", "rf-nodename", "bad", "    nodeName: atom-00\n", Expect::AtApply("unknown field")),
        // What the admin allows runs.
        Row {
            alloc: Alloc::Trusted,
            ..row(
                "hostPath, allowed by the allocation",
                "rf-hostpath-ok",
                "bad",
                "    volumes: [{name: root, hostPath: {path: /}}]\n",
                Expect::Runs(r#""hostPath":{"path":"/""#),
            )
        },
        Row {
            alloc: Alloc::Trusted,
            ..row(
                "a privileged container, allowed by the allocation",
                "rf-priv-ok",
                "bad",
                "    securityContext: {privileged: true}\n",
                Expect::Runs(r#""privileged":true"#),
            )
        },
        Row {
            alloc: Alloc::Trusted,
            setup: Setup::ServiceAccounts,
            ..row(
                "a ServiceAccount the allocation lists",
                "rf-sa-ok",
                "bad",
                "    serviceAccountName: trainer\n",
                Expect::Runs(r#""serviceAccountName":"trainer""#),
            )
        },
        Row {
            setup: Setup::Restricted,
            valid: RESTRICTED,
            ..row(
                "a restricted template in a namespace enforcing restricted",
                "rf-psa-ok",
                "bad",
                RESTRICTED,
                Expect::Runs(r#""runAsNonRoot":true"#),
            )
        },
    ];
    rows.iter_mut().filter(|r| r.name.contains("PriorityClass")).for_each(|r| {
        r.fix = Some(r#"[{"op":"remove","path":"/spec/template/priorityClassName"}]"#);
    });
    rows
}

fn project_yaml(name: &str, ns: &str, alloc: &str, workers: u32, extra: &str) -> String {
    let pools = if alloc == TRUSTED { "[e2e-atom]" } else { "[e2e-atom, e2e-h200]" };
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: ModelProject\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  allocation: {alloc}\n  placement: {{pools: {pools}}}\n  workers: {workers}\n  acceleratorsPerWorker: 1\n  template:\n    image: trainer:1\n    terminationGracePeriodSeconds: 0\n{extra}"
    )
}

/// kubectl off the runtime's threads: the rows run concurrently.
async fn kubectl(env: &Env, args: &[&str], stdin: Option<&str>) -> anyhow::Result<std::process::Output> {
    let (env, args, stdin) =
        (env.clone(), args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), stdin.map(String::from));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.kubectl(&args, stdin.as_deref())
    })
    .await?
}

async fn kubectl_ok(env: &Env, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let out = kubectl(env, args, stdin).await?;
    if !out.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Warning Events of `reason` about `name`, their notes.
async fn warnings(env: &Env, ns: &str, name: &str, reason: &str) -> Result<Vec<String>, String> {
    let lp = ListParams::default().fields(&format!("regarding.name={name}"));
    let list = Api::<Event>::namespaced(env.client.clone(), ns).list(&lp).await.map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.note)
        .collect())
}

async fn wait_warning(env: &Env, ns: &str, name: &str, reason: &str, words: &str) -> anyhow::Result<String> {
    wait_for(&format!("a Warning Event {reason} on {name} saying {words:?}"), WAIT, || async {
        let notes = warnings(env, ns, name, reason).await?;
        notes.iter().find(|n| n.contains(words)).cloned().ok_or_else(|| format!("{notes:?}"))
    })
    .await
}

/// The project's worker pods, by name: a label selector cannot name a
/// project whose name is no label value.
async fn workers(env: &Env, ns: &str, name: &str) -> anyhow::Result<Vec<Pod>> {
    let prefix = format!("{name}-worker-");
    let all = Api::<Pod>::namespaced(env.client.clone(), ns).list(&ListParams::default()).await?;
    Ok(all.items.into_iter().filter(|p| p.metadata.name.as_deref().is_some_and(|n| n.starts_with(&prefix))).collect())
}

async fn wait_no_workers(env: &Env, ns: &str, name: &str) -> anyhow::Result<()> {
    wait_for(&format!("the workers of {name} to be gone"), WAIT, || async {
        let n = workers(env, ns, name).await.map_err(|e| e.to_string())?.len();
        if n == 0 { Ok(()) } else { Err(format!("{n} pods")) }
    })
    .await
}

/// The project holds no devices: no pool, no nodes, not admitted or running.
fn holds_nothing(s: &ModelProjectStatus) -> anyhow::Result<()> {
    ensure!(
        s.pool.is_none()
            && s.nodes.is_empty()
            && !matches!(s.phase, Some(ProjectPhase::Admitted | ProjectPhase::Running)),
        "still holds devices: {:?} {:?} {:?}",
        s.phase,
        s.pool,
        s.nodes
    );
    Ok(())
}

async fn set_up(env: &Env, ns: &str, setup: Setup) -> anyhow::Result<()> {
    match setup {
        Setup::None => {}
        Setup::Restricted => {
            kubectl_ok(env, &["label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"], None).await?;
        }
        Setup::CpuQuota => {
            let q = format!(
                "apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: cpu, namespace: {ns}}}\nspec: {{hard: {{requests.cpu: 1500m}}}}\n"
            );
            kubectl_ok(env, &["apply", "-f", "-"], Some(&q)).await?;
            // The quota admits nothing until its controller has counted the namespace.
            wait_for("the cpu quota to be counted", WAIT, || async {
                let out =
                    kubectl_ok(env, &["-n", ns, "get", "resourcequota", "cpu", "-o", "jsonpath={.status.hard}"], None)
                        .await;
                match out {
                    Ok(s) if s.contains("requests.cpu") => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await?;
        }
        Setup::CpuLimitRange => {
            let l = format!(
                "apiVersion: v1\nkind: LimitRange\nmetadata: {{name: cpu, namespace: {ns}}}\nspec: {{limits: [{{type: Container, max: {{cpu: \"1\"}}}}]}}\n"
            );
            kubectl_ok(env, &["apply", "-f", "-"], Some(&l)).await?;
        }
        Setup::ServiceAccounts => {
            kubectl_ok(env, &["-n", ns, "create", "serviceaccount", "trainer"], None).await?;
            kubectl_ok(env, &["-n", ns, "create", "serviceaccount", "builder"], None).await?;
        }
    }
    Ok(())
}

/// One row, in its own namespace.
async fn check_row(env: Arc<Env>, r: Row, ns: String) -> anyhow::Result<()> {
    set_up(&env, &ns, r.setup).await?;
    let alloc = if r.alloc == Alloc::Trusted { TRUSTED } else { TENANT };
    let name = r.project;
    let yaml = project_yaml(name, &ns, alloc, 2, r.extra);
    let applied = kubectl(&env, &["apply", "-f", "-"], Some(&yaml)).await?;
    let refused_at_apply = !applied.status.success();
    let said = String::from_utf8_lossy(&applied.stderr).into_owned();
    match r.expect {
        Expect::AtApply(words) => {
            ensure!(refused_at_apply, "applied although it should be refused: {yaml}");
            ensure!(said.contains(words), "refused, but kubectl said: {said}");
        }
        Expect::Blocked { at_apply: Some(words), .. } if refused_at_apply => {
            ensure!(said.contains(words), "refused at apply, but kubectl said: {said}");
        }
        _ if refused_at_apply => bail!("refused at apply: {said}"),
        Expect::NotAllowed(words) => {
            let s = wait_for("Valid=False NotAllowedByAllocation", WAIT, || async {
                let s = status(&env, &ns, name).await?;
                match find_condition(&s.conditions, "Valid") {
                    Some(c) if c.status == "False" && c.reason == "NotAllowedByAllocation" => Ok(s),
                    c => Err(format!("{:?} {c:?}", s.phase)),
                }
            })
            .await?;
            let c = find_condition(&s.conditions, "Valid").context("Valid")?;
            ensure!(c.message.contains(words), "the condition says: {}", c.message);
            wait_warning(&env, &ns, name, "NotAllowedByAllocation", words).await?;
            holds_nothing(&s)?;
            ensure!(s.admitted_at.is_none(), "it was admitted at {:?}", s.admitted_at);
            ensure!(workers(&env, &ns, name).await?.is_empty(), "a pod was created");
        }
        Expect::Blocked { reason, words, .. } => {
            let s = wait_project(&env, &ns, name, ProjectPhase::Blocked, WAIT).await?;
            let c = find_condition(&s.conditions, "WorkersCreated").context("WorkersCreated")?;
            ensure!(c.status == "False" && c.reason == reason, "WorkersCreated: {c:?}");
            ensure!(c.message.contains(words) && c.message.contains("the API server refused"), "{}", c.message);
            wait_warning(&env, &ns, name, "WorkersRefused", words).await?;
            holds_nothing(&s)?;
            wait_no_workers(&env, &ns, name).await?;
            if let Some(patch) = r.fix {
                kubectl_ok(&env, &["-n", &ns, "patch", "modelproject", name, "--type=json", "-p", patch], None).await?;
                wait_project(&env, &ns, name, ProjectPhase::Running, WAIT).await?;
                delete_project(&env, &ns, name).await?;
            }
        }
        Expect::Retried { reason, words } => {
            let c = wait_for("the lasting refusal to be surfaced", WAIT, || async {
                let s = status(&env, &ns, name).await?;
                find_condition(&s.conditions, "WorkersCreated").cloned().ok_or_else(|| format!("{:?}", s.phase))
            })
            .await?;
            ensure!(c.status == "False" && c.reason == reason && c.message.contains(words), "{c:?}");
            wait_warning(&env, &ns, name, "WorkersRefused", words).await?;
            // The scheduling timeout counts from admission: the half-created
            // gang is stopped and its devices given back.
            wait_warning(&env, &ns, name, "SchedulingTimeout", words).await?;
            let s = status(&env, &ns, name).await.map_err(anyhow::Error::msg)?;
            ensure!(s.retry_after.is_some(), "no backoff: {s:?}");
            holds_nothing(&s)?;
            wait_no_workers(&env, &ns, name).await?;
            // It would be admitted again after the backoff; make room for the valid one.
            delete_project(&env, &ns, name).await?;
        }
        Expect::Runs(fragment) => {
            wait_project(&env, &ns, name, ProjectPhase::Running, WAIT).await?;
            let pods = workers(&env, &ns, name).await?;
            ensure!(pods.len() == 2, "{} workers", pods.len());
            let spec = serde_json::to_string(&pods[0].spec)?;
            ensure!(spec.contains(fragment), "the worker lacks {fragment}: {spec}");
            delete_project(&env, &ns, name).await?;
        }
    }
    // Afterwards a valid project in the same namespace is still admitted.
    let ok = project_yaml("ok", &ns, alloc, 1, r.valid);
    kubectl_ok(&env, &["apply", "-f", "-"], Some(&ok)).await?;
    wait_project(&env, &ns, "ok", ProjectPhase::Running, WAIT).await?;
    delete_project(&env, &ns, "ok").await
}

async fn delete_project(env: &Env, ns: &str, name: &str) -> anyhow::Result<()> {
    Api::<ModelProject>::namespaced(env.client.clone(), ns).delete(name, &DeleteParams::background()).await?;
    wait_no_workers(env, ns, name).await
}

pub async fn refused_and_unsafe_templates_are_never_silent_and_hold_nothing(env: Arc<Env>) -> anyhow::Result<()> {
    let rows = rows();
    let prefixes: Vec<&str> = rows.iter().map(|r| r.ns).collect();
    in_namespaces(&env, &prefixes, async |names, scope| {
        let of = |a: Alloc| -> Vec<&str> {
            rows.iter().zip(names).filter(|(r, _)| r.alloc == a).map(|(_, n)| n.as_str()).collect()
        };
        scope.apply(&atom())?;
        scope.apply(&h200())?;
        let grants = "[{pool: e2e-atom, accelerators: 24}, {pool: e2e-h200, accelerators: 32}]";
        scope.apply(&alloc_yaml(TENANT, &of(Alloc::Tenant), grants, ""))?;
        let policy = "  workloadPolicy: {allowNodeAccess: true, serviceAccounts: [trainer, ghost]}\n";
        scope.apply(&alloc_yaml(TRUSTED, &of(Alloc::Trusted), "[{pool: e2e-atom, accelerators: 8}]", policy))?;
        let active = sovereign_operator::api::AllocationPhase::Active;
        wait_phase(&env, TENANT, active, WAIT).await?;
        wait_phase(&env, TRUSTED, active, WAIT).await?;

        let mut set = tokio::task::JoinSet::new();
        for (r, ns) in rows.iter().zip(names) {
            let (env, r, ns) = (env.clone(), *r, ns.clone());
            set.spawn(async move { (r.name, check_row(env, r, ns).await) });
        }
        let mut failed = Vec::new();
        while let Some(done) = set.join_next().await {
            let (name, res) = done?;
            if let Err(e) = res {
                failed.push(format!("{name}: {e:#}"));
            }
        }
        ensure!(failed.is_empty(), "{} of {} rows failed:\n{}", failed.len(), rows.len(), failed.join("\n"));

        // Every refused project is still there (Blocked, or never admitted),
        // and together they hold nothing: a gang of the tenant's whole ATOM
        // grant (3 nodes x 8) is admitted next to them.
        let ns = &names[0];
        let fill = project_yaml("whole-grant", ns, TENANT, 3, "")
            .replace("acceleratorsPerWorker: 1\n", "acceleratorsPerWorker: 8\n")
            .replace("[e2e-atom, e2e-h200]", "[e2e-atom]");
        env.kubectl_ok(&["apply", "-f", "-"], Some(&fill))?;
        wait_project(&env, ns, "whole-grant", ProjectPhase::Running, WAIT).await?;
        let a = Api::<GpuAllocation>::all(env.client.clone());
        wait_for("the tenant's allocation to count only the whole-grant gang", WAIT, || async {
            let s = a.get(TENANT).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            if s.in_use == 24 { Ok(()) } else { Err(format!("inUse {}", s.in_use)) }
        })
        .await?;
        delete_project(&env, ns, "whole-grant").await
    })
    .await
}
