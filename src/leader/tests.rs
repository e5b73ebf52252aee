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

// Real time with wide margins (the watchdog is a timer): renewals every 50 ms
// keep a 600 ms deadline from firing; once they stop, it fires after the
// deadline, not before.
#[tokio::test]
async fn watchdog_fires_once_renewals_stop_for_the_deadline() {
    let deadline = Duration::from_millis(600);
    let (tx, rx) = watch::channel(Instant::now());
    let dog = tokio::spawn(watchdog(rx, deadline));
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(Instant::now()).unwrap();
    }
    assert!(!dog.is_finished(), "fired while renewals succeeded");
    let last = Instant::now();
    tx.send(last).unwrap();
    tokio::time::timeout(Duration::from_secs(5), dog).await.expect("watchdog never fired").unwrap();
    let waited = last.elapsed();
    assert!(waited >= deadline, "fired {waited:?} after the last renewal, before the deadline");
    drop(tx);
}

#[tokio::test]
async fn watchdog_fires_when_the_renewer_is_gone() {
    let deadline = Duration::from_millis(300);
    let (tx, rx) = watch::channel(Instant::now());
    let start = Instant::now();
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), watchdog(rx, deadline)).await.expect("never fired");
    assert!(start.elapsed() >= deadline);
}
