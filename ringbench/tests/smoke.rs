//! ringbench runs its embedded broker end to end, verifies data, and reports sane numbers.

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringbench"))
        .args(args)
        .args(["--output-format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ringbench failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[test]
fn embedded_randrw_with_verify() {
    let r = run(&[
        "--embedded",
        "--size",
        "64M",
        "--rw",
        "randrw",
        "--bs",
        "16k",
        "--iodepth",
        "16",
        "--numjobs",
        "2",
        "--number-ios",
        "3000",
        "--verify",
    ]);
    let total = &r["total"];
    assert_eq!(total["ios"], 6000);
    assert!(total["reads"].as_u64().unwrap() > 1000 && total["writes"].as_u64().unwrap() > 1000);
    assert!(total["verified_reads"].as_u64().unwrap() > 100, "verify checked too few reads: {total}");
    assert!(total["iops"].as_f64().unwrap() > 0.0);
    let lat = &total["latency"];
    assert!(lat["min_ns"].as_u64().unwrap() <= lat["p50_ns"].as_u64().unwrap());
    assert!(lat["p50_ns"].as_u64().unwrap() <= lat["p99_ns"].as_u64().unwrap());
    assert!(lat["p99_ns"].as_u64().unwrap() <= lat["max_ns"].as_u64().unwrap());
    assert_eq!(r["jobs"].as_array().unwrap().len(), 2);
    assert!(r["broker_cpu"].is_object());
    // The machine's state beside the figures (needs two CPUs to bounce a line between).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pp = r["pingpong_round_trip_ns"].as_f64();
    if cpus >= 2 {
        assert!(pp.is_some_and(|ns| ns > 0.0 && ns < 1e6), "ping-pong: {pp:?}");
    }
    assert_eq!(r["submit_batch"], 8, "nvmed engines hand requests over every 8 by default");
}

#[test]
fn submit_batch_is_the_engines_choice_or_the_users() {
    let common = ["--embedded", "--null", "--iodepth", "16", "--number-ios", "2000", "--machine-state", "0"];
    let with = |engine: &str, extra: &[&str]| {
        let mut a = common.to_vec();
        a.extend_from_slice(&["--engine", engine]);
        a.extend_from_slice(extra);
        run(&a)
    };
    // io_uring: all re-queued requests in one system call; any user value is taken as given.
    assert_eq!(with("io-uring-nop", &[])["submit_batch"], 16);
    for (engine, n) in [("nvmed-nop", 3), ("io-uring-nop", 5)] {
        let r = with(engine, &["--submit-batch", &n.to_string()]);
        assert_eq!((r["submit_batch"].as_u64(), r["total"]["ios"].as_u64()), (Some(n), Some(2000)));
    }
}

#[test]
fn complete_min_waits_for_batches_and_still_drains_the_tail() {
    // Each reap waits for 16 of the 32 in flight (the last ones: whatever is left), on both
    // kinds of engine, processes too; every request completes, and the report says so.
    let common = ["--embedded", "--null", "--iodepth", "32", "--number-ios", "5000", "--machine-state", "0"];
    for (engine, extra) in [
        ("nvmed-nop", &[][..]),
        ("io-uring-nop", &[][..]),
        ("nvmed-nop", &["--processes", "--numjobs", "2"][..]),
    ] {
        let mut a = common.to_vec();
        a.extend_from_slice(&["--engine", engine, "--complete-min", "16"]);
        a.extend_from_slice(extra);
        let r = run(&a);
        assert_eq!(r["complete_min"], 16, "{engine} {extra:?}");
        let jobs = r["jobs"].as_array().unwrap().len() as u64;
        assert_eq!(r["total"]["ios"].as_u64(), Some(5000 * jobs), "{engine} {extra:?}");
    }
    // Above the depth it is the depth.
    let r = run(&[
        "--embedded",
        "--null",
        "--engine",
        "nvmed-nop",
        "--iodepth",
        "4",
        "--complete-min",
        "64",
        "--number-ios",
        "100",
        "--machine-state",
        "0",
    ]);
    assert_eq!((r["complete_min"].as_u64(), r["total"]["ios"].as_u64()), (Some(4), Some(100)));
}

#[test]
fn io_uring_engines_run_the_same_workload() {
    let dir = std::env::temp_dir().join(format!("rb-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("f.img");
    let r = run(&["--engine", "io-uring-nop", "--iodepth", "8", "--number-ios", "1000"]);
    assert_eq!(r["total"]["ios"], 1000);
    // O_DIRECT may be unsupported by the temp filesystem; only check when it opens.
    let out = Command::new(env!("CARGO_BIN_EXE_ringbench"))
        .args(["--engine", "io-uring", "--filename", file.to_str().unwrap(), "--size", "16M"])
        .args([
            "--rw",
            "randrw",
            "--iodepth",
            "8",
            "--number-ios",
            "2000",
            "--verify",
            "--output-format",
            "json",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["total"]["ios"], 2000);
    } else {
        assert!(err.contains("Invalid argument") || err.contains("not supported"), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_options_are_explained() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringbench")).args(["--bs", "100"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 512"));
}

#[test]
fn jobs_as_processes_merge_their_latencies() {
    let r = run(&[
        "--embedded",
        "--size",
        "64M",
        "--rw",
        "randrw",
        "--iodepth",
        "4",
        "--numjobs",
        "2",
        "--processes",
        "--number-ios",
        "2000",
        "--verify",
    ]);
    assert_eq!(r["total"]["ios"], 4000);
    let jobs = r["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_ne!(jobs[0]["reads"], jobs[1]["reads"], "jobs must not replay the same sequence");
    assert!(
        r["total"]["latency"]["max_ns"].as_u64().unwrap() >= jobs[0]["latency"]["max_ns"].as_u64().unwrap()
    );
}

#[test]
fn idle_broker_reports_its_cpu() {
    let r = run(&["--embedded", "--idle", "0.5", "--numjobs", "3"]);
    assert_eq!(r["clients"], 3);
    // An idle broker sleeps: well under a few percent of a core, whatever the machine.
    let cpu = r["broker_cpu_percent"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&cpu), "idle broker used {cpu}% CPU");
}
