//! A client for the commands that read the cluster (`report`, `plan`): the
//! kubeconfig given, else the in-cluster config or $KUBECONFIG, as kubectl does;
//! and hints for the errors a user with too few rights or no CRDs meets.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::KubeArgs;

pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    connect(&KubeArgs { kubeconfig: kubeconfig.map(Path::to_path_buf), context: None }).await
}

/// A client for the kubeconfig and context given (each defaulting as kubectl does).
pub async fn connect(args: &KubeArgs) -> anyhow::Result<Client> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options).await?,
        (None, None) => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// What to do about an error of the API server that the user can fix: the role
/// that grants a refused read (403), or the CRD that is missing (404).
pub fn hint(err: &anyhow::Error) -> Option<String> {
    let status = err.chain().find_map(|e| match e.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) => Some(status),
        _ => None,
    })?;
    let details = status.details.as_ref();
    let resource = details.map(|d| d.kind.as_str()).unwrap_or_default();
    let group = details.map(|d| d.group.as_str()).unwrap_or_default();
    match status.code {
        403 => Some(forbidden_hint(resource, group, &status.message)),
        404 if group == crate::api::GROUP || status.message.contains("could not find the requested resource") => Some(
            "the sovereign.ai CRDs are not installed in this cluster (kubectl get crd | grep sovereign.ai): \
             install the chart, or `kubectl apply -f crds/`"
                .into(),
        ),
        _ => None,
    }
}

fn forbidden_hint(resource: &str, group: &str, message: &str) -> String {
    let release = "<release> is the chart's release name, sovereign-operator by default";
    match (group, resource) {
        ("sovereign.ai", "gpuallocations" | "acceleratorpools") => format!(
            "reading {resource} needs the chart's ClusterRole <release>-tenant-reader \
             (bind it with a ClusterRoleBinding; {release})"
        ),
        ("sovereign.ai", "modelprojects") if message.contains("at the cluster scope") => {
            "listing ModelProjects in every namespace needs the built-in view role in all of them \
             (a ClusterRoleBinding); with rights in one namespace, report it alone with -n NAMESPACE"
                .into()
        }
        ("sovereign.ai", "modelprojects") => {
            "reading ModelProjects of a namespace needs the built-in view role there (the chart \
             aggregates ModelProjects into view, edit and admin)"
                .into()
        }
        _ => format!(
            "`plan` reads nodes, pods, namespaces and quotas besides the sovereign.ai objects: it needs \
             the chart's ClusterRole <release>-planner ({release})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::{Status, response::StatusDetails};

    fn api_error(code: u16, group: &str, kind: &str, message: &str) -> anyhow::Error {
        let details: StatusDetails = serde_json::from_value(serde_json::json!({"group": group, "kind": kind})).unwrap();
        let status = Status::failure(message, "").with_code(code).with_details(details);
        anyhow::Error::new(kube::Error::Api(status.boxed())).context("listing")
    }

    #[test]
    fn a_refused_read_names_the_role_that_grants_it() {
        let e = api_error(403, "sovereign.ai", "gpuallocations", "forbidden");
        assert!(hint(&e).unwrap().contains("<release>-tenant-reader"));
        let e = api_error(
            403,
            "sovereign.ai",
            "modelprojects",
            "cannot list resource \"modelprojects\" in API group \"sovereign.ai\" at the cluster scope",
        );
        assert!(hint(&e).unwrap().contains("-n NAMESPACE"));
        let e = api_error(403, "sovereign.ai", "modelprojects", "in the namespace \"a\"");
        assert!(hint(&e).unwrap().contains("view role there"));
        let e = api_error(403, "", "nodes", "forbidden");
        assert!(hint(&e).unwrap().contains("<release>-planner"));
    }

    #[test]
    fn a_missing_crd_says_how_to_install_it() {
        let e = api_error(404, "", "", "the server could not find the requested resource");
        assert!(hint(&e).unwrap().contains("kubectl apply -f crds/"));
        // Another 404 (an object that is gone) has no hint.
        assert_eq!(hint(&api_error(404, "", "pods", "pods \"x\" not found")), None);
        assert_eq!(hint(&anyhow::anyhow!("no API error")), None);
    }
}
