//! The accelerator-hour ledger of one allocation. Pure: no client, no clock.
//!
//! Every figure is a sum over pods of (end - start) x devices x the pool's
//! chargeFactor, from the pod's own times: `status.startTime`, and the end its
//! status gives (the last container's `finishedAt`, or the deletion time). A
//! running pod is charged up to the moment of the reckoning, provisionally:
//! once its status gives its end, it is charged up to that end, even if a
//! reckoning meanwhile charged it further (the kubelet reports an end a moment
//! after it happens). Nothing is ever integrated from a rate, so no write,
//! restart or round trip through the API can count a stretch twice or lose it.
//!
//! Hours are kept per workload (a ModelProject, a batch Job, a JobSet: its
//! [`Workload`] kind and name) and pool, for the workloads that exist; the
//! hours of pods of no workload, and of workloads that are gone, count in the
//! allocation's pool figures only, so the books never grow with time.
//!
//! A pod is charged once for good ("settled") when it is deleted and done; its
//! finalizer is released after the settled figure is written, and its UID is
//! remembered until the object is gone. The ledger also lists every pod it is
//! charging ("open"): one that disappears unseen (a plain pod deleted while the
//! operator was down, say) is settled from that entry, up to the end it
//! recorded or, failing that, the last reckoning written before the operator
//! started.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{OpenCharge, SettledCharge, UsageLedger};

/// Milliseconds in an hour.
pub const MILLIS_PER_HOUR: f64 = 3_600_000.0;

/// Kind of the operator's own workload.
pub const MODEL_PROJECT: &str = "ModelProject";

/// The workload a pod runs for: its kind (`ModelProject`, `Job`, `JobSet`) and
/// "namespace/name".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

impl Workload {
    pub fn new(kind: &str, name: impl Into<String>) -> Self {
        Workload { kind: kind.to_string(), name: name.into() }
    }

    pub fn project(name: impl Into<String>) -> Self {
        Workload::new(MODEL_PROJECT, name)
    }

    /// The `kind` field the books and the status store: none for a ModelProject.
    pub fn stored_kind(&self) -> Option<String> {
        (self.kind != MODEL_PROJECT).then(|| self.kind.clone())
    }
}

/// What a charge is booked to: the kind of workload its pod ran for (none for
/// a tenant's own pod), and the workload itself while it exists. Bounded: by
/// pool, one entry per kind besides the workloads that exist.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Account {
    kind: Option<String>,
    workload: Option<Workload>,
}

impl Account {
    fn of(workload: Option<&Workload>, exists: &dyn Fn(&Workload) -> bool) -> Self {
        Account { kind: workload.map(|w| w.kind.clone()), workload: workload.filter(|w| exists(w)).cloned() }
    }

    /// From the fields the books store (`project`, `kind`): a workload named
    /// with no kind is a ModelProject (books written before other kinds were
    /// charged); a kind with no name is a workload that is gone.
    fn stored(project: Option<&String>, kind: Option<&String>) -> Option<Workload> {
        project.map(|n| Workload::new(kind.map_or(MODEL_PROJECT, String::as_str), n.clone()))
    }

    fn stored_kind(project: Option<&String>, kind: Option<&String>) -> Option<String> {
        Self::stored(project, kind).map(|w| w.kind).or_else(|| kind.cloned())
    }

    /// The (`project`, `kind`) the books store.
    fn to_stored(&self) -> (Option<String>, Option<String>) {
        match &self.workload {
            Some(w) => (Some(w.name.clone()), w.stored_kind()),
            None => (None, self.kind.clone()),
        }
    }
}

/// One pod charged to the allocation, as its status tells it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodLife {
    pub uid: String,
    /// The workload it runs for, if any (a tenant's own pod runs for none).
    pub workload: Option<Workload>,
    pub pool: String,
    pub domestic: bool,
    /// Devices x chargeFactor (0 when the pod holds no device of a pool).
    pub weight: f64,
    /// `status.startTime` in ms; None until the kubelet started it.
    pub start_millis: Option<i64>,
    /// When it ended (or will have ended at the latest, for a deletion), in ms.
    pub end_millis: Option<i64>,
    /// Deleted and done: charge it for good and release its finalizer.
    pub settle: bool,
    /// Carries the ledger finalizer.
    pub held: bool,
}

impl PodLife {
    /// Charge-weighted accelerator-milliseconds up to `now` (never negative).
    pub fn millis(&self, now: i64) -> f64 {
        let Some(start) = self.start_millis else { return 0.0 };
        let end = self.end_millis.unwrap_or(now).min(now);
        (end - start).max(0) as f64 * self.weight
    }

    /// Still running at `now` (and so adding to the burn rate).
    pub fn running(&self, now: i64) -> bool {
        self.start_millis.is_some() && self.end_millis.is_none_or(|e| e > now) && self.weight > 0.0
    }
}

/// The figures of a reckoning, in charge-weighted accelerator-milliseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub total: f64,
    pub domestic: f64,
    pub by_pool: BTreeMap<String, f64>,
    /// By (workload, pool), for pods of workloads that exist.
    pub by_workload: BTreeMap<(Workload, String), f64>,
    /// Charge-weighted devices running now, and their domestic part.
    pub rate: f64,
    pub domestic_rate: f64,
    /// Charge-weighted devices running now, by workload.
    pub workload_rate: BTreeMap<Workload, f64>,
    /// By kind of workload (none: tenants' own pods), gone workloads included.
    pub by_kind: BTreeMap<Option<String>, f64>,
}

impl Figures {
    fn add(&mut self, pool: &str, account: &Account, domestic: bool, millis: f64) {
        self.total += millis;
        if domestic {
            self.domestic += millis;
        }
        *self.by_pool.entry(pool.to_string()).or_default() += millis;
        *self.by_kind.entry(account.kind.clone()).or_default() += millis;
        if let Some(w) = &account.workload {
            *self.by_workload.entry((w.clone(), pool.to_string())).or_default() += millis;
        }
    }

    /// Hours of one workload, by pool.
    pub fn workload_pools(&self, workload: &Workload) -> BTreeMap<String, f64> {
        self.by_workload
            .iter()
            .filter(|((w, _), _)| w == workload)
            .map(|((_, pool), m)| (pool.clone(), m / MILLIS_PER_HOUR))
            .collect()
    }
}

/// The outcome of a reckoning.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Books {
    pub ledger: UsageLedger,
    pub figures: Figures,
    /// UIDs of pods whose finalizer may go once `ledger` is written.
    pub release: Vec<String>,
}

/// The books at `now` from the last ledger written and the pods charged to the
/// allocation now. An open pod that is gone is charged up to the end its entry
/// recorded, else the moment the watch saw it go (`seen_gone`), else, if the
/// last ledger was written since this operator started watching
/// (`watching_since`), up to now, else (it went while the operator was down)
/// up to that last ledger.
/// `exists` keeps per-workload figures only for workloads that exist; those
/// of deleted workloads stay in the allocation's pool figures.
///
/// A pod's end, once its status gives it, decides its charge: a reckoning that
/// charged it as running past that end (its status did not say so yet) is
/// corrected, so the figures may fall back by the moment the kubelet took to
/// report the end. Budgets do not flip back for that (see the grant planner's
/// `budget_used_up`).
pub fn reckon(
    prev: &UsageLedger,
    pods: &[PodLife],
    now: i64,
    watching_since: i64,
    seen_gone: &dyn Fn(&str) -> Option<i64>,
    exists: &dyn Fn(&Workload) -> bool,
) -> Books {
    let already: BTreeSet<&str> = prev.settled_pods.iter().map(String::as_str).collect();
    let present: BTreeSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
    let mut settled: BTreeMap<(String, Account), (bool, i64)> = BTreeMap::new();
    let mut settle = |pool: &str, account: Account, domestic: bool, millis: i64| {
        let e = settled.entry((pool.to_string(), account)).or_insert((domestic, 0));
        e.1 += millis;
    };
    let stored = |project: Option<&String>, kind: Option<&String>| {
        let workload = Account::stored(project, kind);
        let mut account = Account::of(workload.as_ref(), exists);
        account.kind = Account::stored_kind(project, kind);
        account
    };
    for s in &prev.settled {
        settle(&s.pool, stored(s.project.as_ref(), s.kind.as_ref()), s.domestic, s.millis);
    }
    let unseen_end = if prev.at_millis >= watching_since { now } else { prev.at_millis };
    for o in prev.open.iter().filter(|o| !present.contains(o.uid.as_str()) && !already.contains(o.uid.as_str())) {
        let life = PodLife {
            start_millis: Some(o.start_millis),
            end_millis: Some(o.end_millis.or_else(|| seen_gone(&o.uid)).unwrap_or(unseen_end)),
            weight: o.weight,
            ..Default::default()
        };
        settle(&o.pool, stored(o.project.as_ref(), o.kind.as_ref()), o.domestic, life.millis(now).round() as i64);
    }
    let mut books = Books::default();
    for p in pods {
        if already.contains(p.uid.as_str()) {
            books.ledger.settled_pods.push(p.uid.clone());
            if p.held {
                books.release.push(p.uid.clone());
            }
            continue;
        }
        let millis = p.millis(now);
        if p.settle {
            if millis > 0.0 {
                settle(&p.pool, Account::of(p.workload.as_ref(), exists), p.domestic, millis.round() as i64);
            }
            books.ledger.settled_pods.push(p.uid.clone());
            if p.held {
                books.release.push(p.uid.clone());
            }
            continue;
        }
        if p.start_millis.is_none() || p.weight <= 0.0 {
            continue;
        }
        let account = Account::of(p.workload.as_ref(), exists);
        books.figures.add(&p.pool, &account, p.domestic, millis);
        if p.running(now) {
            books.figures.rate += p.weight;
            if p.domestic {
                books.figures.domestic_rate += p.weight;
            }
            if let Some(w) = &account.workload {
                *books.figures.workload_rate.entry(w.clone()).or_default() += p.weight;
            }
        }
        books.ledger.open.push(OpenCharge {
            uid: p.uid.clone(),
            pool: p.pool.clone(),
            project: p.workload.as_ref().map(|w| w.name.clone()),
            kind: p.workload.as_ref().and_then(Workload::stored_kind),
            domestic: p.domestic,
            weight: p.weight,
            start_millis: p.start_millis.unwrap_or_default(),
            end_millis: p.end_millis,
        });
    }
    for ((pool, account), (domestic, millis)) in settled {
        books.figures.add(&pool, &account, domestic, millis as f64);
        let (project, kind) = account.to_stored();
        books.ledger.settled.push(SettledCharge { pool, project, kind, domestic, millis });
    }
    books.ledger.open.sort_by(|a, b| a.uid.cmp(&b.uid));
    books.ledger.settled_pods.sort();
    books.ledger.at_millis = now;
    books
}

/// Whether `next` says something `prev` does not beyond the passing of time:
/// pods started, ended or settled.
pub fn moved(prev: &UsageLedger, next: &UsageLedger) -> bool {
    prev.settled != next.settled || prev.settled_pods != next.settled_pods || prev.open != next.open
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn pod(uid: &str, project: Option<&str>, weight: f64, start: i64, end: Option<i64>) -> PodLife {
        PodLife {
            uid: uid.into(),
            workload: project.map(Workload::project),
            pool: "h200".into(),
            domestic: false,
            weight,
            start_millis: Some(T0 + start),
            end_millis: end.map(|e| T0 + e),
            settle: false,
            held: project.is_some(),
        }
    }

    fn hours(b: &Books) -> f64 {
        b.figures.total / MILLIS_PER_HOUR
    }

    fn all(_: &Workload) -> bool {
        true
    }

    fn none(_: &str) -> Option<i64> {
        None
    }

    /// Through the API and back: what the next reconcile reads.
    fn round_trip(l: &UsageLedger) -> UsageLedger {
        serde_json::from_str(&serde_json::to_string(l).unwrap()).unwrap()
    }

    #[test]
    fn a_running_pod_is_charged_from_its_start_to_now_whatever_the_writes_between() {
        let pods = vec![pod("a", Some("ns/p"), 8.0, 0, None)];
        // Reckoned every 1.7 s for an hour, each ledger written and read back,
        // against once at the end: the same figure to the millisecond.
        let mut ledger = UsageLedger::default();
        let mut t = 0;
        while t < 3_600_000 {
            t += 1_700;
            ledger = round_trip(&reckon(&ledger, &pods, T0 + t, T0, &none, &all).ledger);
        }
        let once = reckon(&UsageLedger::default(), &pods, T0 + t, T0, &none, &all);
        let many = reckon(&ledger, &pods, T0 + t, T0, &none, &all);
        assert_eq!(many.figures, once.figures);
        assert!((hours(&once) - 8.0 * t as f64 / MILLIS_PER_HOUR).abs() < 1e-9);
    }

    #[test]
    fn a_settled_pod_is_charged_once_and_released_until_it_is_gone() {
        let mut done = pod("a", Some("ns/p"), 2.0, 0, Some(1_800_000));
        done.settle = true;
        let b1 = reckon(&UsageLedger::default(), std::slice::from_ref(&done), T0 + 3_600_000, T0, &none, &all);
        assert_eq!(hours(&b1), 1.0);
        assert_eq!(b1.release, vec!["a".to_string()]);
        assert_eq!(b1.ledger.settled_pods, vec!["a".to_string()]);
        // The finalizer release failed: the pod is still there, never charged twice.
        let b2 = reckon(&round_trip(&b1.ledger), std::slice::from_ref(&done), T0 + 7_200_000, T0, &none, &all);
        assert_eq!((hours(&b2), b2.release.clone()), (1.0, vec!["a".to_string()]));
        // Gone: forgotten, still charged.
        let b3 = reckon(&round_trip(&b2.ledger), &[], T0 + 7_300_000, T0, &none, &all);
        assert_eq!(hours(&b3), 1.0);
        assert!(b3.ledger.settled_pods.is_empty() && b3.release.is_empty());
    }

    #[test]
    fn a_pod_that_vanished_while_watched_is_charged_to_now_and_one_gone_unseen_to_the_last_ledger() {
        let plain = pod("x", None, 1.0, 0, None);
        let before = reckon(&UsageLedger::default(), &[plain], T0 + 600_000, T0, &none, &all).ledger;
        // The operator kept watching: it noticed the pod go (now).
        let watched = reckon(&before, &[], T0 + 601_000, T0, &none, &all);
        assert_eq!(watched.figures.total, 601_000.0);
        // The operator restarted after the pod went: up to the last ledger.
        let restarted = reckon(&before, &[], T0 + 900_000, T0 + 899_000, &none, &all);
        assert_eq!(restarted.figures.total, 600_000.0);
        // The moment the watch saw it go wins over both.
        let seen = reckon(&before, &[], T0 + 900_000, T0 + 899_000, &|_| Some(T0 + 700_000), &all);
        assert_eq!(seen.figures.total, 700_000.0);
        // An end the ledger recorded wins over all.
        let mut ended = pod("x", None, 1.0, 0, Some(300_000));
        ended.held = false;
        let known = reckon(&UsageLedger::default(), &[ended], T0 + 400_000, T0, &none, &all).ledger;
        assert_eq!(reckon(&known, &[], T0 + 900_000, T0 + 899_000, &none, &all).figures.total, 300_000.0);
    }

    /// The race of issue 28, as two real workers showed it: worker 1's container
    /// ended at 20 s, but the kubelet reported that 2.7 s later; meanwhile worker
    /// 0's end arrived and the books were written (at 21.5 s) with worker 1 still
    /// "running". Once worker 1's own end arrives it is charged to that end, not
    /// to the reckoning that could not know it had ended.
    #[test]
    fn a_pod_whose_end_is_reported_late_is_charged_to_its_own_end() {
        let w0 = pod("w0", Some("ns/p"), 1.0, 0, None);
        let w1 = pod("w1", Some("ns/p"), 1.0, 0, None);
        let l0 = reckon(&UsageLedger::default(), &[w0.clone(), w1.clone()], T0 + 10_000, T0, &none, &all).ledger;
        let w0_done = PodLife { end_millis: Some(T0 + 21_000), ..w0 };
        let l1 = round_trip(&reckon(&l0, &[w0_done.clone(), w1.clone()], T0 + 21_500, T0, &none, &all).ledger);
        let w1_done = PodLife { end_millis: Some(T0 + 20_000), ..w1 };
        let b = reckon(&l1, &[w0_done.clone(), w1_done.clone()], T0 + 22_700, T0, &none, &all);
        assert_eq!(b.figures.total, 21_000.0 + 20_000.0, "the pods ran 21 s and 20 s");
        // Settled (deleted and done) or gone from the stores later: the same.
        let settled = |p: &PodLife| PodLife { settle: true, ..p.clone() };
        let s = reckon(&round_trip(&b.ledger), &[settled(&w0_done), settled(&w1_done)], T0 + 30_000, T0, &none, &all);
        assert_eq!(s.figures.total, 41_000.0);
        let gone = reckon(&round_trip(&b.ledger), &[], T0 + 30_000, T0, &none, &all);
        assert_eq!(gone.figures.total, 41_000.0);
    }

    #[test]
    fn projects_pools_and_the_allocation_agree() {
        let mut gone = pod("g", Some("ns/a"), 4.0, 0, Some(1_000));
        gone.settle = true;
        let mut npu = pod("n", Some("ns/b"), 0.5 * 8.0, 500, None);
        npu.pool = "atom".into();
        npu.domestic = true;
        let pods = vec![gone, npu, pod("r", Some("ns/a"), 1.0, 0, None), pod("plain", None, 2.0, 0, None)];
        let b = reckon(&UsageLedger::default(), &pods, T0 + 2_000, T0, &none, &all);
        let f = &b.figures;
        let projects: f64 = f.by_workload.values().sum();
        assert_eq!(f.total, projects + 2.0 * 2_000.0, "projects plus the plain pod");
        assert_eq!(f.by_pool.values().sum::<f64>(), f.total);
        assert_eq!(f.domestic, 4.0 * 1_500.0);
        assert_eq!(f.by_workload[&(Workload::project("ns/a"), "h200".to_string())], 4_000.0 + 2_000.0);
        assert_eq!((f.rate, f.domestic_rate), (4.0 + 1.0 + 2.0, 4.0));
        // A deleted project's hours stay in the allocation's, under no project.
        let later = reckon(&b.ledger, &[], T0 + 2_000, T0, &none, &|w| w.name != "ns/a");
        assert_eq!(later.figures.total, f.total);
        assert!(later.figures.by_workload.keys().all(|(w, _)| w.name != "ns/a"));
    }

    #[test]
    fn jobs_and_projects_are_kept_apart_by_kind_and_a_gone_one_keeps_its_kind_only() {
        let mut job = pod("j", None, 4.0, 0, Some(2_000));
        job.workload = Some(Workload::new("Job", "ns/a"));
        job.settle = true;
        // A project and a Job of the same name: two workloads.
        let pods = [job, pod("p", Some("ns/a"), 1.0, 0, None), pod("plain", None, 2.0, 0, None)];
        let b = reckon(&UsageLedger::default(), &pods, T0 + 3_000, T0, &none, &all);
        let f = &b.figures;
        assert_eq!(f.by_workload[&(Workload::new("Job", "ns/a"), "h200".to_string())], 8_000.0);
        assert_eq!(f.by_workload[&(Workload::project("ns/a"), "h200".to_string())], 3_000.0);
        assert_eq!(f.by_kind[&Some("Job".to_string())], 8_000.0);
        assert_eq!(f.by_kind[&None], 6_000.0, "the tenant's own pod");
        let settled = &round_trip(&b.ledger).settled;
        assert!(settled.iter().any(|s| s.kind.as_deref() == Some("Job") && s.project.as_deref() == Some("ns/a")));
        // The Job is deleted: its hours leave the per-workload figures, not its kind's.
        let gone = reckon(&round_trip(&b.ledger), &pods[1..], T0 + 4_000, T0, &none, &|w| w.kind != "Job");
        assert!(gone.figures.by_workload.keys().all(|(w, _)| w.kind != "Job"));
        assert_eq!(gone.figures.by_kind[&Some("Job".to_string())], 8_000.0);
        assert_eq!(gone.figures.total, 8_000.0 + 4_000.0 + 8_000.0);
        let again = reckon(&round_trip(&gone.ledger), &pods[1..], T0 + 4_000, T0, &none, &all);
        assert_eq!(again.figures.by_kind, gone.figures.by_kind, "a gone workload's kind survives the round trip");
        // Books written before other kinds: a name without a kind is a ModelProject.
        let old: UsageLedger = serde_json::from_value(serde_json::json!({
            "atMillis": T0, "settled": [{"pool": "h200", "project": "ns/old", "millis": 5}]
        }))
        .unwrap();
        let read = reckon(&old, &[], T0, T0, &none, &all);
        assert_eq!(read.figures.by_workload[&(Workload::project("ns/old"), "h200".to_string())], 5.0);
    }

    #[test]
    fn time_does_not_move_the_books_but_pods_do() {
        let pods = vec![pod("a", Some("ns/p"), 8.0, 0, None)];
        let l1 = reckon(&UsageLedger::default(), &pods, T0 + 1_000, T0, &none, &all).ledger;
        let l2 = reckon(&l1, &pods, T0 + 9_000, T0, &none, &all).ledger;
        assert!(!moved(&l1, &l2));
        let l3 = reckon(&l2, &[], T0 + 10_000, T0, &none, &all).ledger;
        assert!(moved(&l2, &l3));
        // A pod that never started is not charged; a pod deleted before it ran is released.
        let mut never = pod("b", Some("ns/p"), 8.0, 0, None);
        never.start_millis = None;
        never.settle = true;
        let b = reckon(&UsageLedger::default(), &[never], T0 + 10_000, T0, &none, &all);
        assert_eq!((b.figures.total, b.release), (0.0, vec!["b".to_string()]));
    }
}
