//! The fault matrix: 4 verifying clients run through each fault the emulated controller can
//! inject. Every request completes exactly once (each job's count of completions is its count
//! of submissions), no data mismatch (ringbench checks every block it reads back and stops at the
//! first wrong one), no hung client (the run ends), and once the clients left the broker holds
//! no session and no IOVA space for them (back to its baseline).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const JOBS: u64 = 4;
const IOS: u64 = 1500;

fn ringbench(extra: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ringbench"))
        .args(["--embedded", "--size", "64M", "--rw", "randrw", "--bs", "4k", "--iodepth", "8"])
        .args(["--numjobs", &JOBS.to_string(), "--number-ios", &IOS.to_string(), "--verify"])
        // An asynchronous device (out-of-order completions, data moved at completion), and a
        // short timeout so the faults are found quickly.
        .args(["--device-latency-us", "50", "--io-timeout-ms", "300", "--output-format", "json"])
        .args(extra)
        .output()
        .unwrap();
    (out, t.elapsed())
}

/// Runs the verified workload through `rules`; returns the broker's recovery figures.
fn survives(rules: &[&str]) -> serde_json::Value {
    let mut args = Vec::new();
    for r in rules {
        args.extend(["--inject", r]);
    }
    let (out, took) = ringbench(&args);
    assert!(
        out.status.success(),
        "{rules:?}: the clients saw an error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    for job in r["jobs"].as_array().unwrap() {
        assert_eq!(
            job["ios"], IOS,
            "{rules:?}: job {} completed a different count than it submitted",
            job["job"]
        );
    }
    assert!(r["total"]["verified_reads"].as_u64().unwrap() > 100, "{rules:?}: too few reads verified");
    let rec = r["broker_recovery"].clone();
    assert_eq!(
        rec["buffer_iova_bytes_after"], 0,
        "{rules:?}: buffers still mapped after the clients left: {rec}"
    );
    assert_eq!(rec["sessions_after"], 0, "{rules:?}: sessions still open after the clients left: {rec}");
    eprintln!("{rules:?}: {rec} in {took:?}");
    rec
}

fn count(rec: &serde_json::Value, what: &str) -> u64 {
    rec[what].as_u64().unwrap()
}

#[test]
fn a_timeout_that_abort_ends_is_retried_without_a_reset() {
    let rec = survives(&["hang:300"]);
    assert!(count(&rec, "aborts") >= 1, "no abort: {rec}");
    assert_eq!(count(&rec, "resets"), 0, "an abort that worked still reset the controller: {rec}");
    assert!(count(&rec, "retries") >= 1, "the aborted command was not sent again: {rec}");
}

#[test]
fn a_timeout_that_abort_cannot_end_resets_and_resends() {
    let rec = survives(&["stuck:300"]);
    assert!(count(&rec, "aborts") >= 1, "no abort tried first: {rec}");
    assert_eq!(count(&rec, "resets"), 1, "{rec}");
    assert!(count(&rec, "retries") >= 1, "nothing sent again after the reset: {rec}");
}

#[test]
fn a_fatal_controller_status_resets_and_resends() {
    let rec = survives(&["fatal:300"]);
    assert_eq!(count(&rec, "resets"), 1, "{rec}");
    assert!(count(&rec, "retries") >= 1, "{rec}");
}

#[test]
fn retryable_statuses_are_retried_then_succeed() {
    let rec = survives(&["retry:300", "retry:301", "retry:2000"]);
    assert!(count(&rec, "retries") >= 3, "{rec}");
    assert_eq!(count(&rec, "resets"), 0, "{rec}");
}

#[test]
fn slow_commands_only_take_longer() {
    // Slower than nothing, faster than the 300 ms timeout (with 200 ms to spare for a busy
    // machine): no abort, no reset, no error.
    let rec = survives(&["delay:200:80", "delay:400:100", "delay:900:60"]);
    assert_eq!(count(&rec, "aborts"), 0, "{rec}");
    assert_eq!(count(&rec, "resets"), 0, "{rec}");
}

#[test]
fn several_faults_in_one_run() {
    // (One reset may end both the stuck command and the fatal status if they come together, and
    // on a loaded machine may even come before the hung command's abort and send it again.)
    let rec = survives(&["hang:200", "retry:700", "stuck:1500", "fatal:3000"]);
    assert!((1..=2).contains(&count(&rec, "resets")), "{rec}");
    assert!(count(&rec, "retries") >= 2, "{rec}");
}

#[test]
fn a_device_that_disappears_fails_clients_clearly_and_never_hangs() {
    let (out, took) = ringbench(&["--inject", "gone:300"]);
    assert!(!out.status.success(), "I/O to a removed device succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the controller is gone"), "unclear error: {err}");
    assert!(took < Duration::from_secs(30), "the clients took {took:?} to notice");
}
