//! What an admitted gang does next, from what its worker pods show. Pure.
//!
//! - Missing workers are created while the gang starts (phase Admitted).
//! - Every worker Running: the gang runs. Every worker Succeeded: it succeeded.
//! - A worker that fails (non-zero exit) stops the whole gang: a restart that
//!   counts against `maxRestarts`, or Failed when none is left.
//! - A worker lost to its node (pod gone while running, evicted) stops the gang
//!   for a restart that does not count.
//! - Workers not all bound to nodes within the scheduling timeout: the gang is
//!   stopped and goes back to the queue, so it never holds capacity half-placed.
//! - Past `activeDeadlineSeconds` from its first start: Failed.

use k8s_openapi::jiff::{SignedDuration, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Not running yet; `bound` once the scheduler gave it a node.
    Pending {
        bound: bool,
    },
    Running,
    Succeeded,
    /// Exited non-zero.
    Failed {
        exit_code: Option<i32>,
    },
    /// Evicted or its node is gone: not the program's fault.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerObs {
    pub index: usize,
    pub state: PodState,
}

pub struct GangView<'a> {
    pub workers: usize,
    pub observed: &'a [WorkerObs],
    /// The gang ran with every worker at least once in this attempt.
    pub was_running: bool,
    pub restarts: i32,
    pub max_restarts: i32,
    pub admitted_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub scheduling_timeout: SignedDuration,
    pub active_deadline: Option<SignedDuration>,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A worker failed and restarts are left: counted.
    WorkerFailed {
        index: usize,
        exit_code: Option<i32>,
    },
    /// A worker failed and no restart is left.
    OutOfRestarts {
        index: usize,
        exit_code: Option<i32>,
    },
    /// A worker was lost to its node: restart, not counted.
    WorkerLost {
        index: usize,
    },
    /// Not every worker was bound in time: back to the queue.
    SchedulingTimeout {
        bound: usize,
    },
    DeadlineExceeded,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Create these workers.
    Create(Vec<usize>),
    /// Nothing to do until pods change (or the deadline/timeout passes).
    Wait,
    Running,
    Succeeded,
    Stop(Stop),
}

pub fn next(g: &GangView<'_>) -> Next {
    if let (Some(deadline), Some(start)) = (g.active_deadline, g.started_at)
        && g.now.duration_since(start) >= deadline
    {
        return Next::Stop(Stop::DeadlineExceeded);
    }
    let at = |i: usize| g.observed.iter().find(|w| w.index == i).map(|w| &w.state);
    for i in 0..g.workers {
        match at(i) {
            Some(PodState::Failed { exit_code }) => {
                let exit_code = *exit_code;
                return Next::Stop(if g.restarts < g.max_restarts {
                    Stop::WorkerFailed { index: i, exit_code }
                } else {
                    Stop::OutOfRestarts { index: i, exit_code }
                });
            }
            Some(PodState::Lost) => return Next::Stop(Stop::WorkerLost { index: i }),
            None if g.was_running => return Next::Stop(Stop::WorkerLost { index: i }),
            _ => {}
        }
    }
    let missing: Vec<usize> = (0..g.workers).filter(|i| at(*i).is_none()).collect();
    if !missing.is_empty() {
        return Next::Create(missing);
    }
    let states: Vec<&PodState> = (0..g.workers).filter_map(at).collect();
    if states.iter().all(|s| **s == PodState::Succeeded) {
        return Next::Succeeded;
    }
    if states.iter().all(|s| matches!(s, PodState::Running | PodState::Succeeded)) {
        return Next::Running;
    }
    let bound = states.iter().filter(|s| !matches!(s, PodState::Pending { bound: false })).count();
    if !g.was_running
        && bound < g.workers
        && g.admitted_at.is_some_and(|t| g.now.duration_since(t) >= g.scheduling_timeout)
    {
        return Next::Stop(Stop::SchedulingTimeout { bound });
    }
    Next::Wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn view(observed: &[WorkerObs]) -> GangView<'_> {
        GangView {
            workers: 2,
            observed,
            was_running: false,
            restarts: 0,
            max_restarts: 1,
            admitted_at: Some(t(0)),
            started_at: None,
            scheduling_timeout: SignedDuration::from_secs(60),
            active_deadline: None,
            now: t(10),
        }
    }

    fn w(index: usize, state: PodState) -> WorkerObs {
        WorkerObs { index, state }
    }

    const RUN: PodState = PodState::Running;
    const UNBOUND: PodState = PodState::Pending { bound: false };
    const BOUND: PodState = PodState::Pending { bound: true };

    /// A case: name, the pods seen, a change to the default view, the expected step.
    type Case = (&'static str, Vec<WorkerObs>, fn(&mut GangView<'_>), Next);

    #[test]
    fn table() {
        let fail = PodState::Failed { exit_code: Some(3) };
        let cases: Vec<Case> = vec![
            ("nothing yet: create all", vec![], |_| {}, Next::Create(vec![0, 1])),
            ("one missing: create it", vec![w(0, RUN)], |_| {}, Next::Create(vec![1])),
            ("all running", vec![w(0, RUN), w(1, RUN)], |_| {}, Next::Running),
            ("all succeeded", vec![w(0, PodState::Succeeded), w(1, PodState::Succeeded)], |_| {}, Next::Succeeded),
            ("one done, one running: still running", vec![w(0, PodState::Succeeded), w(1, RUN)], |_| {}, Next::Running),
            ("bound but starting", vec![w(0, RUN), w(1, BOUND)], |_| {}, Next::Wait),
            (
                "failure with restarts left",
                vec![w(0, RUN), w(1, fail.clone())],
                |_| {},
                Next::Stop(Stop::WorkerFailed { index: 1, exit_code: Some(3) }),
            ),
            (
                "failure without restarts left",
                vec![w(0, RUN), w(1, fail.clone())],
                |g| g.restarts = 1,
                Next::Stop(Stop::OutOfRestarts { index: 1, exit_code: Some(3) }),
            ),
            ("a lost worker", vec![w(0, PodState::Lost), w(1, RUN)], |_| {}, Next::Stop(Stop::WorkerLost { index: 0 })),
            (
                "a worker vanished after the gang ran",
                vec![w(1, RUN)],
                |g| g.was_running = true,
                Next::Stop(Stop::WorkerLost { index: 0 }),
            ),
            ("unbound within the timeout", vec![w(0, RUN), w(1, UNBOUND)], |_| {}, Next::Wait),
            (
                "unbound past the timeout",
                vec![w(0, RUN), w(1, UNBOUND)],
                |g| g.now = t(61),
                Next::Stop(Stop::SchedulingTimeout { bound: 1 }),
            ),
            (
                "past the deadline",
                vec![w(0, RUN), w(1, RUN)],
                |g| {
                    g.started_at = Some(t(0));
                    g.active_deadline = Some(SignedDuration::from_secs(5));
                },
                Next::Stop(Stop::DeadlineExceeded),
            ),
        ];
        for (name, observed, tweak, want) in cases {
            let mut g = view(&observed);
            tweak(&mut g);
            assert_eq!(next(&g), want, "{name}");
        }
    }
}
