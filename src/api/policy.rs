//! What a worker template may ask of the node. A tenant who may create
//! ModelProjects gets pods that the operator creates, so the template must not
//! be a way around the cluster's pod permissions: node-level access and a
//! ServiceAccount other than `default` need the allocation's
//! `workloadPolicy`, which only an admin writes. Pure: unit-tested here.
//!
//! A ModelProject's CEL cannot see its allocation, so this check is the
//! reconciler's (and the admission loop's: a project that fails it is never
//! admitted); fields a pod has and the template lacks (hostNetwork, hostPID,
//! hostIPC, hostPorts, nodeName) cannot be asked for at all.

use k8s_openapi::api::core::v1::{Capabilities, SELinuxOptions, SeccompProfile, Volume};

use kube::ResourceExt;

use crate::api::{GpuAllocation, ModelProject, WorkerTemplate};

/// The volume types Pod Security `restricted` allows: they give the pod its own
/// storage, never the node's.
const POD_VOLUMES: &[&str] =
    &["configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected", "downwardAPI", "csi", "ephemeral"];
/// The one capability Pod Security `restricted` lets a container add.
const HARMLESS_CAPABILITY: &str = "NET_BIND_SERVICE";

/// Every node-level access the template asks for, in words (empty: none).
pub fn node_access(t: &WorkerTemplate) -> Vec<String> {
    let mut out = Vec::new();
    for v in &t.volumes {
        if let Some(kind) = volume_kind(v).filter(|k| !POD_VOLUMES.contains(&k.as_str())) {
            out.push(format!("volume {} is a {kind} volume", v.name));
        }
    }
    if let Some(p) = &t.pod_security_context {
        if p.sysctls.as_ref().is_some_and(|s| !s.is_empty()) {
            out.push("podSecurityContext.sysctls".into());
        }
        profile_access(&mut out, "podSecurityContext", p.seccomp_profile.as_ref(), p.se_linux_options.as_ref());
        if p.app_armor_profile.as_ref().is_some_and(|a| a.type_ == "Unconfined") {
            out.push("podSecurityContext.appArmorProfile Unconfined".into());
        }
        if p.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            out.push("podSecurityContext.windowsOptions.hostProcess".into());
        }
    }
    if let Some(c) = &t.security_context {
        if c.privileged == Some(true) {
            out.push("securityContext.privileged".into());
        }
        let added = added_capabilities(c.capabilities.as_ref());
        if !added.is_empty() {
            out.push(format!("securityContext.capabilities.add {}", added.join(", ")));
        }
        profile_access(&mut out, "securityContext", c.seccomp_profile.as_ref(), c.se_linux_options.as_ref());
        if c.app_armor_profile.as_ref().is_some_and(|a| a.type_ == "Unconfined") {
            out.push("securityContext.appArmorProfile Unconfined".into());
        }
        if c.proc_mount.as_deref() == Some("Unmasked") {
            out.push("securityContext.procMount Unmasked".into());
        }
        if c.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            out.push("securityContext.windowsOptions.hostProcess".into());
        }
    }
    out
}

/// The template against its allocation's workload policy; the message says
/// what to change or what the admin must allow.
pub fn check(t: &WorkerTemplate, allocation: &GpuAllocation) -> Result<(), String> {
    let name = allocation.metadata.name.as_deref().unwrap_or_default();
    let policy = allocation.spec.workload_policy.clone().unwrap_or_default();
    let mut problems = Vec::new();
    if let Some(sa) = t.service_account_name.as_deref().filter(|sa| *sa != "default")
        && !policy.service_accounts.iter().any(|s| s == sa)
    {
        problems
            .push(format!("serviceAccountName {sa} is not in GpuAllocation {name}'s workloadPolicy.serviceAccounts"));
    }
    let access = node_access(t);
    if !access.is_empty() && !policy.allow_node_access {
        problems.push(format!(
            "node-level access ({}) needs GpuAllocation {name}'s workloadPolicy.allowNodeAccess",
            access.join("; ")
        ));
    }
    if problems.is_empty() { Ok(()) } else { Err(format!("template: {}", problems.join("; "))) }
}

/// The volume's type: the one field besides its name.
fn volume_kind(v: &Volume) -> Option<String> {
    let value = serde_json::to_value(v).ok()?;
    value.as_object()?.keys().find(|k| *k != "name").cloned()
}

fn added_capabilities(c: Option<&Capabilities>) -> Vec<&str> {
    c.and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .filter(|cap| cap.trim_start_matches("CAP_") != HARMLESS_CAPABILITY)
        .collect()
}

fn profile_access(out: &mut Vec<String>, at: &str, seccomp: Option<&SeccompProfile>, selinux: Option<&SELinuxOptions>) {
    if seccomp.is_some_and(|s| s.type_ == "Unconfined") {
        out.push(format!("{at}.seccompProfile Unconfined"));
    }
    if selinux.is_some_and(|s| s.user.is_some() || s.role.is_some() || s.type_.is_some()) {
        out.push(format!("{at}.seLinuxOptions"));
    }
}

/// Why a project cannot be admitted: the condition reason and what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

/// The references a project needs: the allocation exists, lists its namespace
/// and grants its pools, consents to `preemptible: false` and allows what the
/// template asks of the node (its `workloadPolicy`). The message says what to fix.
pub fn validate(project: &ModelProject, allocation: Option<&GpuAllocation>) -> Result<(), Invalid> {
    let invalid = |message: String| Invalid { reason: "InvalidReference", message };
    let ns = project.namespace().unwrap_or_default();
    let name = &project.spec.allocation;
    let Some(a) = allocation else {
        return Err(invalid(format!("GpuAllocation {name} does not exist")));
    };
    if !a.spec.tenant.namespaces.contains(&ns) {
        return Err(invalid(format!("GpuAllocation {name} does not list namespace {ns} in tenant.namespaces")));
    }
    let ungranted: Vec<&str> = project
        .spec
        .placement
        .pools
        .iter()
        .filter(|p| !a.spec.grants.iter().any(|g| &g.pool == *p))
        .map(String::as_str)
        .collect();
    if !ungranted.is_empty() {
        return Err(invalid(format!(
            "placement.pools names pools that GpuAllocation {name} grants nothing in: {}",
            ungranted.join(", ")
        )));
    }
    if !project.spec.preemptible && !a.spec.allow_non_preemptible {
        return Err(invalid(format!("preemptible: false needs GpuAllocation {name} to set allowNonPreemptible")));
    }
    check(&project.spec.template, a).map_err(|message| Invalid { reason: "NotAllowedByAllocation", message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(extra: serde_json::Value) -> WorkerTemplate {
        let mut t = serde_json::json!({"image": "trainer:1"});
        t.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(t).unwrap()
    }

    fn allocation(policy: serde_json::Value) -> GpuAllocation {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation", "metadata": {"name": "grant"},
            "spec": {"tenant": {"displayName": "t", "namespaces": ["team"]},
                     "grants": [{"pool": "atom", "accelerators": 16}], "workloadPolicy": policy}
        }))
        .unwrap()
    }

    #[test]
    fn node_level_access_is_named_and_pod_storage_is_not() {
        let cases: Vec<(&str, serde_json::Value, Option<&str>)> = vec![
            ("a plain template", serde_json::json!({}), None),
            (
                "pod volumes",
                serde_json::json!({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "b", "persistentVolumeClaim": {"claimName": "c"}},
                                              {"name": "c", "configMap": {"name": "x"}}, {"name": "d", "secret": {"secretName": "x"}},
                                              {"name": "e", "projected": {"sources": []}}, {"name": "f", "csi": {"driver": "x"}}]}),
                None,
            ),
            (
                "the restricted profile",
                serde_json::json!({"podSecurityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                                   "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}),
                None,
            ),
            (
                "hostPath",
                serde_json::json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                Some("volume root is a hostPath volume"),
            ),
            (
                "nfs",
                serde_json::json!({"volumes": [{"name": "d", "nfs": {"server": "s", "path": "/"}}]}),
                Some("nfs volume"),
            ),
            (
                "gitRepo",
                serde_json::json!({"volumes": [{"name": "g", "gitRepo": {"repository": "r"}}]}),
                Some("gitRepo volume"),
            ),
            (
                "privileged",
                serde_json::json!({"securityContext": {"privileged": true}}),
                Some("securityContext.privileged"),
            ),
            (
                "SYS_ADMIN",
                serde_json::json!({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}),
                Some("capabilities.add SYS_ADMIN"),
            ),
            (
                "Unmasked /proc",
                serde_json::json!({"securityContext": {"procMount": "Unmasked"}}),
                Some("procMount Unmasked"),
            ),
            (
                "Unconfined seccomp",
                serde_json::json!({"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}}),
                Some("podSecurityContext.seccompProfile Unconfined"),
            ),
            (
                "Unconfined AppArmor",
                serde_json::json!({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}),
                Some("appArmorProfile Unconfined"),
            ),
            (
                "SELinux",
                serde_json::json!({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}),
                Some("securityContext.seLinuxOptions"),
            ),
            (
                "sysctls",
                serde_json::json!({"podSecurityContext": {"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}]}}),
                Some("sysctls"),
            ),
            (
                "host process",
                serde_json::json!({"securityContext": {"windowsOptions": {"hostProcess": true}}}),
                Some("hostProcess"),
            ),
        ];
        for (name, extra, want) in cases {
            let got = node_access(&template(extra)).join("; ");
            match want {
                None => assert!(got.is_empty(), "{name}: {got}"),
                Some(w) => assert!(got.contains(w), "{name}: {got}"),
            }
        }
    }

    #[test]
    fn the_allocation_allows_service_accounts_and_node_access_explicitly() {
        let host = template(serde_json::json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}));
        let err = check(&host, &allocation(serde_json::json!({}))).unwrap_err();
        assert!(err.contains("workloadPolicy.allowNodeAccess") && err.contains("hostPath"), "{err}");
        assert!(check(&host, &allocation(serde_json::json!({"allowNodeAccess": true}))).is_ok());

        let sa = template(serde_json::json!({"serviceAccountName": "builder"}));
        let err = check(&sa, &allocation(serde_json::json!({}))).unwrap_err();
        assert!(err.contains("serviceAccountName builder") && err.contains("workloadPolicy.serviceAccounts"), "{err}");
        assert!(check(&sa, &allocation(serde_json::json!({"serviceAccounts": ["builder"]}))).is_ok());
        assert!(
            check(&sa, &allocation(serde_json::json!({"allowNodeAccess": true}))).is_err(),
            "node access is not an SA"
        );
        let default = template(serde_json::json!({"serviceAccountName": "default"}));
        assert!(check(&default, &allocation(serde_json::json!({}))).is_ok());
    }
}
