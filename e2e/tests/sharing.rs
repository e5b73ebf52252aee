//! Sharing scarce accelerators in the real cluster: priority preemption of the
//! smallest victim set, reclaim of borrowed capacity, no preemption between
//! equals, no thrashing over minutes of contention, and Hard budgets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use sovereign_e2e::{Env, in_namespaces, wait_for};
use sovereign_operator::api::{AllocationPhase, ModelProject, ProjectPhase, find_condition};

use crate::grants::{alloc_yaml, pool_yaml, wait_phase};
use crate::projects::{atom, project_yaml, status, wait_no_workers, wait_project, with_grant, workers};

const MINUTE: Duration = Duration::from_secs(60);

fn prio(p: i32) -> String {
    format!("  priority: {p}\n")
}

/// Events of `reason` about the object `name` in `ns`, their notes.
pub async fn events(env: &Env, ns: &str, name: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let lp = ListParams::default().fields(&format!("regarding.name={name}"));
    let list = Api::<Event>::namespaced(env.client.clone(), ns).list(&lp).await?;
    Ok(list.items.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).filter_map(|e| e.note).collect())
}

/// Preemptions recorded in the status of every project in `ns`.
async fn preemptions(env: &Env, ns: &str) -> anyhow::Result<BTreeMap<String, i32>> {
    let list = Api::<ModelProject>::namespaced(env.client.clone(), ns).list(&ListParams::default()).await?;
    Ok(list.items.iter().map(|p| (p.name_any(), p.status.as_ref().map(|s| s.preemptions).unwrap_or(0))).collect())
}

pub async fn a_higher_priority_run_preempts_exactly_the_gang_it_needs(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "preempt", 32, async |ns, scope| {
        // The atom pool (4 nodes of 8) is full: big (2 nodes, priority 0),
        // small-0 (priority 0) and small-5 (priority 5).
        for (name, workers, p) in [("big", 2, 0), ("small-0", 1, 0), ("small-5", 1, 5)] {
            scope.apply(&project_yaml(name, &ns, "e2e-train", "[e2e-atom]", workers, &prio(p), ""))?;
        }
        for name in ["big", "small-0", "small-5"] {
            wait_project(&env, &ns, name, ProjectPhase::Running, MINUTE).await?;
        }
        // One node is needed: the lowest priority, then the fewest devices.
        scope.apply(&project_yaml("urgent", &ns, "e2e-train", "[e2e-atom]", 1, &prio(100), ""))?;
        let s = wait_project(&env, &ns, "urgent", ProjectPhase::Running, MINUTE).await?;
        ensure!(s.preempted == vec![format!("{ns}/small-0")], "urgent preempted {:?}", s.preempted);
        ensure!(s.protected_until.is_some(), "a run admitted by preemption is protected for a while");
        let victim = status(&env, &ns, "small-0").await.map_err(anyhow::Error::msg)?;
        ensure!(victim.phase == Some(ProjectPhase::Queued), "small-0 is {:?}", victim.phase);
        let c = find_condition(&victim.conditions, "Preempted").cloned();
        ensure!(
            c.as_ref().is_some_and(|c| c.reason == "Preempted" && c.message.contains(&format!("{ns}/urgent"))),
            "{c:?}"
        );
        ensure!(victim.restarts == 0, "a preemption is not a failure");
        wait_no_workers(&env, &ns, "small-0").await?;
        let counts = preemptions(&env, &ns).await?;
        let expected: BTreeMap<String, i32> =
            [("big", 0), ("small-0", 1), ("small-5", 0), ("urgent", 0)].map(|(n, c)| (n.to_string(), c)).into();
        ensure!(counts == expected, "preemptions {counts:?}");
        for name in ["big", "small-5"] {
            let s = status(&env, &ns, name).await.map_err(anyhow::Error::msg)?;
            ensure!(s.phase == Some(ProjectPhase::Running), "{name} is {:?}", s.phase);
        }
        let said = events(&env, &ns, "small-0", "Preempted").await?;
        ensure!(said.iter().any(|n| n.contains("urgent") && n.contains("priority 100 over 0")), "{said:?}");
        let said = events(&env, &ns, "urgent", "Preempting").await?;
        ensure!(said.iter().any(|n| n.contains("small-0")), "{said:?}");
        Ok(())
    })
    .await
}

pub async fn an_equal_priority_run_never_preempts(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "peers", 32, async |ns, scope| {
        for name in ["a", "b"] {
            scope.apply(&project_yaml(name, &ns, "e2e-train", "[e2e-atom]", 2, &prio(10), ""))?;
            wait_project(&env, &ns, name, ProjectPhase::Running, MINUTE).await?;
        }
        for (name, p) in [("peer", 10), ("lower", 5)] {
            scope.apply(&project_yaml(name, &ns, "e2e-train", "[e2e-atom]", 2, &prio(p), ""))?;
        }
        // The pass that placed them in the queue is the pass that would have preempted.
        for (name, position) in [("peer", 1), ("lower", 2)] {
            let s = wait_project(&env, &ns, name, ProjectPhase::Queued, MINUTE).await?;
            let c = find_condition(&s.conditions, "Queued").cloned();
            ensure!(c.as_ref().is_some_and(|c| c.reason == "Waiting"), "{name}: {c:?}");
            ensure!(s.queue_position == Some(position) && s.preempted.is_empty(), "{name}: {s:?}");
        }
        for name in ["a", "b"] {
            let s = status(&env, &ns, name).await.map_err(anyhow::Error::msg)?;
            ensure!(s.phase == Some(ProjectPhase::Running) && s.preemptions == 0, "{name}: {s:?}");
        }
        Ok(())
    })
    .await
}

pub async fn a_borrower_runs_on_idle_capacity_and_is_reclaimed_by_the_owner(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["owner", "borrower"], async |names, scope| {
        let (o, b) = (names[0].clone(), names[1].clone());
        scope.apply(&atom())?;
        scope.apply(&alloc_yaml("e2e-owner", &[&o], "[{pool: e2e-atom, accelerators: 16}]", ""))?;
        let lend = "[{pool: e2e-atom, accelerators: 16, borrowingLimit: 16}]";
        scope.apply(&alloc_yaml("e2e-borrower", &[&b], lend, ""))?;
        for a in ["e2e-owner", "e2e-borrower"] {
            wait_phase(&env, a, AllocationPhase::Active, MINUTE).await?;
        }
        // 32 devices: its own 16 and the owner's idle 16, however high its priority.
        scope.apply(&project_yaml("wide", &b, "e2e-borrower", "[e2e-atom]", 4, &prio(500), ""))?;
        let s = wait_project(&env, &b, "wide", ProjectPhase::Running, MINUTE).await?;
        ensure!(s.borrowed, "wide runs on borrowed capacity");
        scope.apply(&project_yaml("mine", &o, "e2e-owner", "[e2e-atom]", 2, &prio(0), ""))?;
        let s = wait_project(&env, &o, "mine", ProjectPhase::Running, MINUTE).await?;
        ensure!(s.preempted == vec![format!("{b}/wide")] && !s.borrowed, "{s:?}");
        let w = wait_project(&env, &b, "wide", ProjectPhase::Queued, MINUTE).await?;
        let c = find_condition(&w.conditions, "Preempted").cloned();
        ensure!(c.as_ref().is_some_and(|c| c.reason == "Reclaimed" && c.message.contains("e2e-owner")), "{c:?}");
        ensure!(w.preemptions == 1 && w.restarts == 0, "{w:?}");
        let said = events(&env, &b, "wide", "Reclaimed").await?;
        ensure!(said.iter().any(|n| n.contains(&format!("{o}/mine"))), "{said:?}");
        wait_no_workers(&env, &b, "wide").await?;
        Ok(())
    })
    .await
}

/// Minutes of contention on a full pool: four priority-0 runs, then runs of
/// priority 10 and 20 that preempt two each, then one of priority 30 that
/// could preempt those two (lower priority) but must not: they were admitted
/// by preemption and keep their place for the minimum run time. It waits for
/// one to finish instead. The preemption count is watched the whole time and
/// may never pass 4, and every run ends up running or finished.
pub async fn contention_over_minutes_never_thrashes(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "thrash", 32, async |ns, scope| {
        for i in 0..4 {
            scope.apply(&project_yaml(&format!("low-{i}"), &ns, "e2e-train", "[e2e-atom]", 1, &prio(0), ""))?;
        }
        for i in 0..4 {
            wait_project(&env, &ns, &format!("low-{i}"), ProjectPhase::Running, MINUTE).await?;
        }
        let finite = |secs: u32| format!("sim.sovereign.ai/complete-after: {secs}s");
        for (name, p, secs) in [("high-10", 10, 75), ("high-20", 20, 75)] {
            scope.apply(&project_yaml(name, &ns, "e2e-train", "[e2e-atom]", 2, &prio(p), &finite(secs)))?;
            wait_project(&env, &ns, name, ProjectPhase::Running, MINUTE).await?;
        }
        scope.apply(&project_yaml("high-30", &ns, "e2e-train", "[e2e-atom]", 2, &prio(30), &finite(40)))?;
        let s = wait_project(&env, &ns, "high-30", ProjectPhase::Queued, MINUTE).await?;
        ensure!(s.preempted.is_empty(), "high-30 preempted protected runs: {:?}", s.preempted);
        let most = Arc::new(AtomicI32::new(0));
        wait_for("every run to be running or finished", Duration::from_secs(240), || {
            let (env, ns, most) = (env.clone(), ns.clone(), most.clone());
            async move {
                let counts = preemptions(&env, &ns).await.map_err(|e| e.to_string())?;
                let seen = most.fetch_max(counts.values().sum::<i32>(), Ordering::AcqRel).max(counts.values().sum());
                if seen > 4 {
                    return Err(format!("preempted more than needed: {counts:?}"));
                }
                let list = Api::<ModelProject>::namespaced(env.client.clone(), &ns)
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let waiting: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| {
                        let phase = p.status.as_ref().and_then(|s| s.phase);
                        !matches!(phase, Some(ProjectPhase::Running | ProjectPhase::Succeeded))
                    })
                    .map(|p| p.name_any())
                    .collect();
                if waiting.is_empty() { Ok(()) } else { Err(format!("still waiting: {waiting:?}")) }
            }
        })
        .await?;
        let counts = preemptions(&env, &ns).await?;
        for (name, n) in &counts {
            let expected = if name.starts_with("low-") { 1 } else { 0 };
            ensure!(*n == expected, "{name} was preempted {n} times: {counts:?}");
        }
        let most = most.load(Ordering::Acquire);
        ensure!(most == 4, "at most {most} preemptions seen");
        Ok(())
    })
    .await
}

pub async fn a_hard_budget_stops_runs_and_an_admission_budget_does_not(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["hard"], async |names, scope| {
        let n = names[0].clone();
        // 8 devices at charge factor 900: one accelerator-hour every half second.
        scope.apply(&pool_yaml("e2e-rngd", "furiosa.ai/rngd", ("furiosa.ai/npu.family", "rngd"), 900.0))?;
        let grant = "[{pool: e2e-rngd, accelerators: 8}]";
        scope.apply(&alloc_yaml("e2e-hard", &[&n], grant, "  budget: {acceleratorHours: 3, enforcement: Hard}\n"))?;
        scope.apply(&alloc_yaml("e2e-soft", &[&n], grant, "  budget: {acceleratorHours: 3}\n"))?;
        for a in ["e2e-hard", "e2e-soft"] {
            wait_phase(&env, a, AllocationPhase::Active, MINUTE).await?;
        }
        scope.apply(&project_yaml("capped", &n, "e2e-hard", "[e2e-rngd]", 1, "", ""))?;
        scope.apply(&project_yaml("lenient", &n, "e2e-soft", "[e2e-rngd]", 1, "", ""))?;
        for a in ["e2e-hard", "e2e-soft"] {
            wait_phase(&env, a, AllocationPhase::Exhausted, MINUTE).await?;
            // The Event follows the status write that records the transition.
            wait_for(&format!("a BudgetUsedUp event on {a}"), Duration::from_secs(10), || async {
                let said = events(&env, "default", a, "BudgetUsedUp").await.map_err(|e| e.to_string())?;
                if said.is_empty() { Err("none yet".to_string()) } else { Ok(()) }
            })
            .await?;
        }
        let s = wait_project(&env, &n, "capped", ProjectPhase::Queued, MINUTE).await?;
        let c = find_condition(&s.conditions, "Queued").cloned();
        ensure!(c.as_ref().is_some_and(|c| c.reason == "AllocationInactive" && c.message.contains("budget")), "{c:?}");
        wait_no_workers(&env, &n, "capped").await?;
        let s = status(&env, &n, "lenient").await.map_err(anyhow::Error::msg)?;
        ensure!(s.phase == Some(ProjectPhase::Running), "lenient is {:?}", s.phase);
        let pods = workers(&env, &n, "lenient").await?;
        let running = pods.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        ensure!(running.count() == 1, "the Admission budget left its run alone: {} pods", pods.len());
        Ok(())
    })
    .await
}

pub async fn a_non_preemptible_run_needs_consent_and_is_then_never_preempted(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "protect", 32, async |ns, scope| {
        let long = format!("{}  preemptible: false\n", prio(0));
        scope.apply(&project_yaml("long", &ns, "e2e-train", "[e2e-atom]", 4, &long, ""))?;
        wait_for("long to be refused", MINUTE, || async {
            let s = status(&env, &ns, "long").await?;
            let c = find_condition(&s.conditions, "Valid").cloned();
            match c {
                Some(c) if c.status == "False" && c.message.contains("allowNonPreemptible") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        // The admin consents on the allocation: the run is admitted.
        let grants = "[{pool: e2e-atom, accelerators: 32}, {pool: e2e-h200, accelerators: 32}]";
        scope.apply(&alloc_yaml("e2e-train", &[&ns], grants, "  allowNonPreemptible: true\n"))?;
        wait_project(&env, &ns, "long", ProjectPhase::Running, MINUTE).await?;
        scope.apply(&project_yaml("urgent", &ns, "e2e-train", "[e2e-atom]", 1, &prio(1000), ""))?;
        let s = wait_project(&env, &ns, "urgent", ProjectPhase::Queued, MINUTE).await?;
        ensure!(s.preempted.is_empty(), "urgent preempted {:?}", s.preempted);
        let s = status(&env, &ns, "long").await.map_err(anyhow::Error::msg)?;
        ensure!(s.phase == Some(ProjectPhase::Running) && s.preemptions == 0, "{s:?}");
        Ok(())
    })
    .await
}
