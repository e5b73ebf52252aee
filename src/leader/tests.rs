use super::*;

fn config(lease: u64, renew: u64, retry: u64) -> LeaderConfig {
    LeaderConfig {
        lease_name: "l".into(),
        namespace: "ns".into(),
        identity: "me".into(),
        lease_duration: Duration::from_secs(lease),
        renew_deadline: Duration::from_secs(renew),
        retry_period: Duration::from_secs(retry),
    }
}

#[test]
fn timings_must_nest_retry_renew_lease() {
    assert!(config(15, 10, 2).validate().is_ok());
    assert!(config(10, 10, 2).validate().unwrap_err().contains("renew deadline"));
    assert!(config(10, 15, 2).validate().is_err());
    assert!(config(15, 10, 10).validate().unwrap_err().contains("retry period"));
    assert!(config(15, 10, 0).validate().is_err());
}

#[test]
fn decide_renews_its_own_waits_for_a_live_holder_takes_a_free_or_expired_one() {
    let d = Duration::from_secs(15);
    assert_eq!(decide(Some("me"), d, Duration::from_secs(100), "me"), Step::Renew);
    assert_eq!(decide(Some("other"), d, Duration::from_secs(4), "me"), Step::Wait(Duration::from_secs(11)));
    assert_eq!(decide(Some("other"), d, Duration::from_secs(15), "me"), Step::Acquire);
    assert_eq!(decide(Some(""), d, Duration::ZERO, "me"), Step::Acquire, "released on shutdown");
    assert_eq!(decide(None, d, Duration::ZERO, "me"), Step::Acquire, "no holder");
}

#[test]
fn identity_is_unique_per_process_start() {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from(["sovereign-operator", "run", "--identity", "pod-a"]).unwrap();
    let crate::cli::Command::Run(args) = cli.command else { panic!("expected run") };
    let c = LeaderConfig::from_args(&args);
    assert!(c.identity.starts_with("pod-a_"), "{}", c.identity);
    assert!(c.validate().is_ok(), "the default timings are safe");
    assert!(c.renew_deadline < c.lease_duration);
}

// Real time with wide margins (the watchdog is an OS thread on the real
// clock). Each test has its own flag, since `on_lost` is a plain fn.
fn fired_within(flag: &std::sync::atomic::AtomicBool, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    flag.load(std::sync::atomic::Ordering::SeqCst)
}

// Renewals every 50 ms keep a 600 ms deadline from firing; once they stop,
// it fires after the deadline, not before.
#[test]
fn watchdog_fires_once_renewals_stop_for_the_deadline() {
    static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn lost() {
        LOST.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let deadline = Duration::from_millis(600);
    let dog = Watchdog::start(deadline, lost);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        dog.renewed(std::time::Instant::now());
    }
    assert!(!LOST.load(std::sync::atomic::Ordering::SeqCst), "fired while renewals succeeded");
    let last = std::time::Instant::now();
    dog.renewed(last);
    assert!(fired_within(&LOST, Duration::from_secs(5)), "watchdog never fired");
    let waited = last.elapsed();
    assert!(waited >= deadline, "fired {waited:?} after the last renewal, before the deadline");
}

// The reason it is a thread: a runtime whose one thread is held (here, a
// blocking sleep inside a task on a current-thread runtime, as the operator
// runs) cannot poll a timer, but the watchdog fires on time all the same.
#[test]
fn watchdog_fires_while_the_runtime_thread_is_held() {
    static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn lost() {
        LOST.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let fired_while_held = runtime.block_on(async {
        let _dog = Watchdog::start(Duration::from_millis(200), lost);
        // holds the runtime's only thread for 10x the deadline
        tokio::spawn(async { fired_within(&LOST, Duration::from_secs(2)) }).await.unwrap()
    });
    assert!(fired_while_held, "the watchdog waited for the runtime thread");
}

#[test]
fn a_stopped_watchdog_never_fires() {
    static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn lost() {
        LOST.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let dog = Watchdog::start(Duration::from_millis(200), lost);
    dog.stop();
    assert!(!fired_within(&LOST, Duration::from_millis(800)), "fired after stop");
}

#[test]
fn a_late_report_of_an_older_renewal_does_not_move_the_deadline_back() {
    fn never() {}
    let dog = Watchdog::start(Duration::from_secs(60), never);
    let newer = std::time::Instant::now() + Duration::from_millis(5);
    dog.renewed(newer);
    dog.renewed(newer - Duration::from_millis(5));
    assert_eq!(dog.last(), newer);
    dog.stop();
}
