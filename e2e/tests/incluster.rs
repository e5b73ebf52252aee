//! The operator the way users run it: the image from `make image`, installed
//! with Helm on the dev cluster's real node (kubelet + containerd + runc), in a
//! namespace enforcing Pod Security `restricted`. These run last: the first of
//! them stops the suite's host-run operator, so that only in-cluster operators
//! act from then on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, ResourceExt};
use sovereign_e2e::incluster::{RealNode, container_id, proc_status, root_is_read_only, with_release};
use sovereign_e2e::{Env, wait_for};
use sovereign_operator::api::ProjectPhase;

use crate::projects::{project_yaml, wait_project, with_grant};

/// Pools of the runs of the leader tests: 32 ATOM devices, then 32 H200.
const BOTH: &str = "[e2e-atom, e2e-h200]";

/// Leader-election timings of the two-replica tests (short, so that they run fast).
const LEASE_S: u64 = 8;
const RENEW_S: u64 = 5;

/// The chart's defaults (two replicas, leader election) with short timings: these tests
/// install what `helm install` installs.
/// One operator without leader election (the chart's other supported shape).
const SINGLE: &[&str] = &["replicaCount=1", "leaderElection.enabled=false"];

fn two_replicas_with_leader_election() -> Vec<String> {
    vec![
        format!("leaderElection.leaseDurationSeconds={LEASE_S}"),
        format!("leaderElection.renewDeadlineSeconds={RENEW_S}"),
        "leaderElection.retryPeriodSeconds=1".into(),
    ]
}

/// Stops the suite's shared host-run operator (once).
async fn stop_host_operator(env: &Env) -> anyhow::Result<()> {
    let operator = env.operator.lock().await.take();
    if let Some(op) = operator {
        let status = op.terminate(Duration::from_secs(30)).await?;
        ensure!(status.success(), "the shared operator exited with {status} on SIGTERM");
    }
    Ok(())
}

/// Whether the in-cluster tests can run here (a dev cluster with its real node).
pub fn available(env: &Env) -> bool {
    matches!(RealNode::from_state(env), Ok(Some(_)))
}

fn holder(lease: &Lease) -> String {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default()
}

pub async fn the_image_runs_on_the_real_node_in_a_restricted_namespace_and_finishes_a_run(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    stop_host_operator(&env).await?;
    with_release(&env, "pod", SINGLE, async |rel, node, _| {
        let pod = rel.ready_pods(1, Duration::from_secs(60)).await?.remove(0);
        let spec = pod.spec.clone().unwrap_or_default();
        ensure!(spec.node_name.as_deref() == Some(node.name.as_str()), "scheduled on {:?}", spec.node_name);
        // What runc enforces, read from the container's process on the node.
        let pid = node.container_pid(&container_id(&pod)?)?;
        let st = proc_status(pid)?;
        for (field, want) in [
            ("Uid", "65532\t65532\t65532\t65532"),
            ("Gid", "65532\t65532\t65532\t65532"),
            ("CapEff", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
        ] {
            ensure!(st.get(field).map(String::as_str) == Some(want), "{field}: {:?}, want {want:?}", st.get(field));
        }
        ensure!(root_is_read_only(pid)?, "the container's root filesystem is writable");
        // The probes the kubelet really ran.
        let name = pod.name_any();
        wait_for("successful liveness and readiness probes by the kubelet", Duration::from_secs(60), || async {
            let live = node.probe_count(&rel.namespace, &name, "Liveness", "successful").map_err(|e| e.to_string())?;
            let ready =
                node.probe_count(&rel.namespace, &name, "Readiness", "successful").map_err(|e| e.to_string())?;
            if live >= 1.0 && ready >= 1.0 { Ok(()) } else { Err(format!("liveness {live}, readiness {ready}")) }
        })
        .await?;
        // The in-cluster ServiceAccount: the chart's, through its projected token.
        ensure!(spec.service_account_name.as_deref() == Some(rel.fullname().as_str()));
        let volumes = spec.volumes.unwrap_or_default();
        ensure!(volumes.iter().any(|v| v.name.starts_with("kube-api-access-")), "no projected ServiceAccount token");
        // It acts: a run queued behind another is admitted when that one succeeds, and succeeds.
        with_grant(&env, "incluster", 16, async |ns, scope| {
            let quick = "sim.sovereign.ai/complete-after: 3s";
            scope.apply(&project_yaml("first", &ns, "e2e-train", "[e2e-atom]", 2, "", quick))?;
            wait_project(&env, &ns, "first", ProjectPhase::Running, Duration::from_secs(60)).await?;
            scope.apply(&project_yaml("second", &ns, "e2e-train", "[e2e-atom]", 2, "", quick))?;
            let s = wait_project(&env, &ns, "second", ProjectPhase::Queued, Duration::from_secs(30)).await?;
            ensure!(s.queue_position == Some(1), "queue position {:?}", s.queue_position);
            wait_project(&env, &ns, "second", ProjectPhase::Succeeded, Duration::from_secs(90)).await?;
            Ok(())
        })
        .await?;
        let again = rel.ready_pods(1, Duration::from_secs(10)).await?.remove(0);
        let restarts = again
            .status
            .clone()
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .iter()
            .map(|c| c.restart_count)
            .sum::<i32>();
        ensure!(again.name_any() == name && restarts == 0, "the operator pod restarted ({restarts})");
        Ok(())
    })
    .await
}

pub async fn an_upgrade_to_another_tag_never_runs_two_operators(env: Arc<Env>) -> anyhow::Result<()> {
    stop_host_operator(&env).await?;
    with_release(&env, "upg", SINGLE, async |rel, _, image| {
        let before = rel.ready_pods(1, Duration::from_secs(60)).await?.remove(0);
        let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &rel.namespace);
        let strategy = deployments.get(&rel.fullname()).await?.spec.and_then(|s| s.strategy).and_then(|s| s.type_);
        ensure!(strategy.as_deref() == Some("Recreate"), "strategy {strategy:?} without leader election");
        // Sample the operator processes on the node while Helm upgrades.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (stop, repo) = (stop.clone(), image.repository.clone());
            let node = RealNode::from_state(&env)?.context("real node")?;
            std::thread::spawn(move || -> anyhow::Result<(usize, usize)> {
                let (mut most, mut samples) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(node.running_containers_of(&repo)?.len());
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok((most, samples))
            })
        };
        let next = format!("image.tag={}-next", image.tag);
        let upgraded = rel.upgrade(&[&next]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (most, samples) = sampler.join().map_err(|_| anyhow::anyhow!("sampler panicked"))??;
        upgraded?;
        ensure!(samples > 10, "only {samples} samples");
        ensure!(most == 1, "{most} operator processes ran at the same time during the upgrade");
        let after = rel.ready_pods(1, Duration::from_secs(60)).await?.remove(0);
        let image_now = after.spec.and_then(|s| s.containers.into_iter().next()).and_then(|c| c.image);
        ensure!(image_now == Some(format!("{}:{}-next", image.repository, image.tag)), "image {image_now:?}");
        ensure!(after.metadata.name != before.metadata.name, "the pod was not replaced");
        Ok(())
    })
    .await
}

pub async fn two_replicas_roll_out_and_a_standby_takes_over_a_killed_or_deleted_leader(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    stop_host_operator(&env).await?;
    let lease_s = LEASE_S;
    let sets = two_replicas_with_leader_election();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    with_release(&env, "ha", &sets, async |rel, node, _| {
        // Standbys are ready (caches synced), so a rollout completes.
        let deploy = format!("deployment/{}", rel.fullname());
        env.kubectl_ok(&["-n", &rel.namespace, "rollout", "status", &deploy, "--timeout=90s"], None)?;
        let pods = rel.ready_pods(2, Duration::from_secs(60)).await?;
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), &rel.namespace);
        let lease_of = async || leases.get_opt("sovereign-operator-leader").await.map_err(|e| e.to_string());
        let first = wait_for("a leader", Duration::from_secs(30), || async {
            let l = lease_of().await?.ok_or("no lease")?;
            let h = holder(&l);
            if h.is_empty() { Err("no holder".to_string()) } else { Ok(h) }
        })
        .await?;
        let pod_of =
            |identity: &str| pods.iter().find(|p| identity.starts_with(&format!("{}_", p.name_any()))).cloned();
        let leader = pod_of(&first).with_context(|| format!("holder {first} is none of the pods"))?;
        // The standby is warm: its caches synced while it waits for the Lease.
        let standby = pods.iter().find(|p| p.name_any() != leader.name_any()).context("no standby")?;
        let logs = node.pod_logs(&rel.namespace)?;
        let standby_dir = format!("{}_{}_", rel.namespace, standby.name_any());
        let warm = logs.iter().any(|(f, l)| f.starts_with(&standby_dir) && l.contains("caches synced"));
        let acting = logs.iter().any(|(f, l)| f.starts_with(&standby_dir) && l.contains("acquired the leader lease"));
        ensure!(warm && !acting, "standby {}: caches synced {warm}, leading {acting}", standby.name_any());
        with_grant(&env, "ha", 32, async |ns, scope| {
            scope.apply(&project_yaml("one", &ns, "e2e-train", BOTH, 2, "", ""))?;
            wait_project(&env, &ns, "one", ProjectPhase::Running, Duration::from_secs(60)).await?;

            // kill -9 of the leader: a standby admits a new project within lease duration + 2 s.
            let pid = node.container_pid(&container_id(&leader)?)?;
            let killed = Instant::now();
            let out = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
            ensure!(out.success(), "kill -9 {pid} failed");
            scope.apply(&project_yaml("two", &ns, "e2e-train", BOTH, 2, "", ""))?;
            wait_for("project two to be admitted", Duration::from_secs(lease_s + 10), || async {
                let phase = crate::projects::status(&env, &ns, "two").await?.phase;
                match phase {
                    Some(ProjectPhase::Admitted | ProjectPhase::Running) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await?;
            let took = killed.elapsed();
            ensure!(
                took <= Duration::from_secs(lease_s + 2),
                "a new project was admitted {took:?} after kill -9 of the leader (lease {lease_s} s)"
            );
            let second = holder(&lease_of().await.map_err(anyhow::Error::msg)?.context("lease")?);
            ensure!(!second.is_empty() && second != first, "the lease is still held by {second}");
            eprintln!("    kill -9 of the leader: new project admitted after {took:?} (lease {lease_s} s)");

            // Deleting the leader pod (SIGTERM): the lease is released and a standby acts within 2 s.
            let pods_now = rel.ready_pods(2, Duration::from_secs(60)).await?;
            let leader2 = pods_now
                .iter()
                .find(|p| second.starts_with(&format!("{}_", p.name_any())))
                .cloned()
                .with_context(|| format!("holder {second} is none of the pods"))?;
            let deleted = Instant::now();
            env.kubectl_ok(&["-n", &rel.namespace, "delete", "pod", &leader2.name_any(), "--wait=false"], None)?;
            let third =
                wait_for("a new holder after the leader's deletion", Duration::from_secs(lease_s + 5), || async {
                    let h = holder(&lease_of().await?.ok_or("no lease")?);
                    if !h.is_empty() && h != second { Ok(h) } else { Err(format!("holder {h:?}")) }
                })
                .await?;
            let took = deleted.elapsed();
            // Faster than the lease duration: only a release on shutdown allows that.
            // Measured from the delete request, so SIGTERM handling is included: 2 s + 1 s.
            ensure!(took <= Duration::from_secs(3), "new leader {third} {took:?} after the delete request");
            scope.apply(&project_yaml("three", &ns, "e2e-train", BOTH, 2, "", ""))?;
            let admitted = Instant::now();
            wait_project(&env, &ns, "three", ProjectPhase::Running, Duration::from_secs(10)).await?;
            eprintln!(
                "    deleted leader: new holder after {took:?}, next project running after {:?}",
                admitted.elapsed()
            );
            Ok(())
        })
        .await
    })
    .await
}

/// The host-run operator through a 20 s API server outage (its watches fail
/// and back off meanwhile): a run submitted as soon as the API server is
/// ready again is admitted without waiting out a long watch backoff. The
/// time is printed, not asserted (the machine is shared); the figure
/// is 3 s, and kube's default watch backoff (up to 30 s) took about 12.
pub async fn a_run_submitted_right_after_an_api_server_restart_is_admitted(env: Arc<Env>) -> anyhow::Result<()> {
    let mut apiserver = sovereign_e2e::incluster::ApiServer::from_state(&env)?;
    with_grant(&env, "restart", 32, async |ns, scope| {
        apiserver.stop().await?;
        // The outage itself: long enough for the watches' retries to back off.
        tokio::time::sleep(Duration::from_secs(20)).await;
        apiserver.start(&env).await?;
        let submitted = Instant::now();
        scope.apply(&project_yaml("after-restart", &ns, "e2e-train", BOTH, 2, "", ""))?;
        wait_for("after-restart admitted", Duration::from_secs(60), || async {
            let s = crate::projects::status(&env, &ns, "after-restart").await?;
            if s.pool.is_some() { Ok(()) } else { Err(format!("{:?}", s.phase)) }
        })
        .await?;
        eprintln!(
            "    admitted {:?} after its submission, the API server back from a 20 s outage",
            submitted.elapsed()
        );
        // Its workers are ours to create at once; binding them waits for the
        // scheduler's and kwok's own watches, which back off up to 30 s.
        wait_for("after-restart's workers", Duration::from_secs(30), || async {
            let n = crate::projects::workers(&env, &ns, "after-restart").await.map_err(|e| e.to_string())?.len();
            if n == 2 { Ok(()) } else { Err(format!("{n} workers")) }
        })
        .await?;
        wait_project(&env, &ns, "after-restart", ProjectPhase::Running, Duration::from_secs(100)).await?;
        Ok(())
    })
    .await
}

pub async fn api_server_outages_never_let_two_replicas_act_at_once(env: Arc<Env>) -> anyhow::Result<()> {
    stop_host_operator(&env).await?;
    let (lease_s, renew_s) = (LEASE_S, RENEW_S);
    let sets = two_replicas_with_leader_election();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    with_release(&env, "outage", &sets, async |rel, node, _| {
        // Each outage restarts a leader; the kubelet keeps one dead container's
        // log per container, so the terms are read as they are written.
        let logs = node.record_pod_logs(&rel.namespace);
        rel.ready_pods(2, Duration::from_secs(60)).await?;
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), &rel.namespace);
        let holder_now = async || -> Result<String, String> {
            let l = leases.get_opt("sovereign-operator-leader").await.map_err(|e| e.to_string())?;
            let h = l.as_ref().map(holder).unwrap_or_default();
            if h.is_empty() { Err("no holder".into()) } else { Ok(h) }
        };
        let mut apiserver = sovereign_e2e::incluster::ApiServer::from_state(&env)?;
        with_grant(&env, "outage", 32, async |ns, scope| {
            for round in 1..=2 {
                let before = wait_for("a leader", Duration::from_secs(60), || async { holder_now().await }).await?;
                let pods = rel.ready_pods(2, Duration::from_secs(90)).await?;
                let leader = pods
                    .iter()
                    .find(|p| before.starts_with(&format!("{}_", p.name_any())))
                    .with_context(|| format!("holder {before} is none of the pods"))?;
                let pid = node.container_pid(&container_id(leader)?)?;
                // The outage lasts until the leader stopped by itself: its renew deadline passed.
                let down = Instant::now();
                apiserver.stop().await?;
                let stopped = wait_for("the leader to stop without its API server", Duration::from_secs(renew_s + 10), || async move {
                    if std::path::Path::new(&format!("/proc/{pid}")).exists() { Err("running".to_string()) } else { Ok(()) }
                })
                .await;
                let leader_stopped_after = down.elapsed();
                apiserver.start(&env).await?;
                stopped?;
                let after = wait_for("a new leader after the outage", Duration::from_secs(lease_s + 30), || async {
                    let h = holder_now().await?;
                    if h != before { Ok(h) } else { Err(format!("still {h}")) }
                })
                .await?;
                eprintln!(
                    "    outage {round}: leader stopped {leader_stopped_after:?} after the API server (renew deadline {renew_s} s); {after} leads"
                );
                // The new leader acts.
                let name = format!("after-outage-{round}");
                let submitted = Instant::now();
                scope.apply(&project_yaml(&name, &ns, "e2e-train", BOTH, 2, "", ""))?;
                wait_for(&format!("{name} admitted"), Duration::from_secs(60), || async {
                    let s = crate::projects::status(&env, &ns, &name).await?;
                    if s.pool.is_some() { Ok(()) } else { Err(format!("{:?}", s.phase)) }
                })
                .await?;
                // Measured, not asserted (the machine is shared): the figure is 3 s.
                eprintln!("    outage {round}: the run submitted after it was admitted in {:?}", submitted.elapsed());
                // Its workers are the new leader's to create at once. Binding them
                // waits for the scheduler to see them: the restarted API server
                // refuses its first requests (403 until its authorizer's caches
                // sync), and client-go's watches back off after each failure, up
                // to 30 s jittered to 60 s (seen here: 19 s and over 60 s).
                wait_for(&format!("{name}'s workers"), Duration::from_secs(30), || async {
                    let n = crate::projects::workers(&env, &ns, &name).await.map_err(|e| e.to_string())?.len();
                    if n == 2 { Ok(()) } else { Err(format!("{n} workers")) }
                })
                .await?;
                wait_project(&env, &ns, &name, ProjectPhase::Running, Duration::from_secs(120)).await?;
            }
            Ok(())
        })
        .await?;
        let terms = sovereign_e2e::incluster::leader_terms(&logs.lines(), k8s_openapi::jiff::Timestamp::now());
        for t in &terms {
            eprintln!("    term of {}: {} to {}, ended by {:?}", t.process, t.from, t.to, t.ended_by);
        }
        ensure!(terms.len() >= 3, "expected at least 3 leader terms, found {terms:?}");
        let both = sovereign_e2e::incluster::overlaps(&terms);
        ensure!(both.is_empty(), "two replicas led at the same time: {both:?}");
        let gaps: Vec<String> =
            terms.windows(2).map(|w| format!("{:.1}s", w[1].from.duration_since(w[0].to).as_secs_f64())).collect();
        eprintln!("    {} leader terms, none overlapping; gaps between them: {}", terms.len(), gaps.join(", "));
        Ok(())
    })
    .await
}

/// The chart's aggregated roles: a tenant with `edit` in its namespace submits
/// and deletes runs there and reads the WorkloadAdmissions, but cannot write
/// these nor touch grants or pools; the
/// platform-admin role can. (RBAC answers through `kubectl auth can-i --as`.)
pub async fn the_chart_roles_let_tenants_submit_runs_and_only_admins_grant(env: Arc<Env>) -> anyhow::Result<()> {
    sovereign_e2e::in_namespaces(&env, &["roles"], async |names, scope| {
        let ns = &names[0];
        let admin = format!("{}-platform-admin", sovereign_e2e::RELEASE);
        scope.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: tenant-edit, namespace: {ns}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: e2e-tenant}}]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: e2e-platform-{ns}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {admin}}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: e2e-platform}}]\n"
        ))?;
        let can = |user: &str, verb: &str, what: &str, in_ns: bool| {
            let mut args = vec!["auth", "can-i", verb, what, "--as", user];
            if in_ns {
                args.extend(["-n", ns.as_str()]);
            }
            env.kubectl(&args, None).map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes")
        };
        let cases = [
            ("e2e-tenant", "create", "modelprojects.sovereign.ai", true, true),
            ("e2e-tenant", "delete", "modelprojects.sovereign.ai", true, true),
            ("e2e-tenant", "list", "modelprojects.sovereign.ai", true, true),
            // The operator's lines about labelled workloads: read, never written.
            ("e2e-tenant", "list", "workloadadmissions.sovereign.ai", true, true),
            ("e2e-tenant", "create", "workloadadmissions.sovereign.ai", true, false),
            ("e2e-tenant", "patch", "workloadadmissions.sovereign.ai", true, false),
            ("e2e-tenant", "delete", "workloadadmissions.sovereign.ai", true, false),
            // cluster-scoped: only through <release>-tenant-reader bound cluster-wide
            ("e2e-tenant", "list", "gpuallocations.sovereign.ai", false, false),
            ("e2e-tenant", "create", "gpuallocations.sovereign.ai", false, false),
            ("e2e-tenant", "patch", "acceleratorpools.sovereign.ai", false, false),
            ("e2e-platform", "create", "gpuallocations.sovereign.ai", false, true),
            ("e2e-platform", "patch", "acceleratorpools.sovereign.ai", false, true),
        ];
        // The aggregation controller fills `edit` asynchronously: wait for the first answer.
        wait_for("the aggregated edit role", Duration::from_secs(30), || async {
            if can("e2e-tenant", "create", "modelprojects.sovereign.ai", true).map_err(|e| e.to_string())? {
                Ok(())
            } else {
                Err("no".to_string())
            }
        })
        .await?;
        for (user, verb, what, in_ns, want) in cases {
            ensure!(can(user, verb, what, in_ns)? == want, "{user} {verb} {what}: want {want}");
        }
        Ok(())
    })
    .await
}
