//! fio on nvmed: the external engine (capi/fio/fio_nvmed.c, built by scripts/build_capi.sh
//! against the installed fio's headers) runs the job files of examples/fio against a live
//! broker with data verification, catches data that changed behind its back, and shows the
//! broker's own words when a job hits its limits; the engine's polling and ring options take effect.
//!
//! Needs `fio` (Debian: apt-get install fio, plus a deb-src entry and dpkg-dev for its headers).
//! Without it these tests say so and pass, unless NVMED_REQUIRE_FIO=1 (CI sets it).

mod common;
mod csupport;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{scratch_dir, TestBroker};
use csupport::{lib_dir, repo};
use nvmed_client::Io;

/// The engine, built once per test process; `None` when fio is not installed (and not required).
fn engine() -> Option<PathBuf> {
    static ENGINE: OnceLock<Option<PathBuf>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let have_fio = Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success());
            if !have_fio {
                assert!(
                    std::env::var("NVMED_REQUIRE_FIO").as_deref() != Ok("1"),
                    "fio is not installed and NVMED_REQUIRE_FIO=1"
                );
                eprintln!(
                    "SKIPPED: fio is not installed (apt-get install fio); the fio engine tests did not run"
                );
                return None;
            }
            let lib = lib_dir();
            let out = Command::new("bash")
                .arg(repo().join("scripts/build_capi.sh"))
                .arg("--libdir")
                .arg(&lib)
                .output()
                .expect("run scripts/build_capi.sh");
            assert!(
                out.status.success(),
                "building the fio engine failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Some(lib.join("libfio_nvmed.so"))
        })
        .clone()
}

/// A broker with a namespace large enough for the example job files.
fn broker(extra: &[&str]) -> TestBroker {
    let dir = scratch_dir();
    let socket = dir.join("nvmed.sock");
    let mut args: Vec<String> =
        ["--emulate", "--socket", socket.to_str().unwrap(), "--size", "256M"].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    TestBroker::spawn(dir, socket, &args)
}

struct FioRun {
    ok: bool,
    /// stdout and stderr.
    text: String,
    /// The JSON report (with --output-format=json).
    json: Option<serde_json::Value>,
}

fn fio(engine: &Path, socket: &Path, args: &[&str]) -> FioRun {
    let out = Command::new("fio")
        .args(args)
        // Verify state files and the like go to the broker's scratch directory, not the source tree.
        .current_dir(socket.parent().unwrap())
        .env("NVMED_FIO_ENGINE", engine)
        .env("NVMED_SOCKET", socket)
        // The engine finds libnvmed.so beside itself (runpath $ORIGIN); cargo's LD_LIBRARY_PATH
        // would win over that and could load another build's.
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run fio");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // fio may print notes before the JSON document.
    let json = stdout.find("\n{").map(|i| i + 1).or(stdout.starts_with('{').then_some(0)).and_then(|i| {
        serde_json::Deserializer::from_str(&stdout[i..]).into_iter::<serde_json::Value>().next()?.ok()
    });
    FioRun {
        ok: out.status.success(),
        text: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        json,
    }
}

/// Runs a command-line job `name` of 1 MiB on `broker` with the engine, plus `extra` options.
fn job<'a>(engine: &'a Path, broker: &'a TestBroker, name: &'a str) -> impl Fn(&[&str]) -> FioRun + 'a {
    move |extra: &[&str]| {
        let (eng, sock) = (
            format!("--ioengine=external:{}", engine.display()),
            format!("--filename={}", broker.socket.display()),
        );
        let name = format!("--name={name}");
        let mut args = vec![name.as_str(), &eng, &sock, "--size=1m"];
        args.extend_from_slice(extra);
        fio(engine, &broker.socket, &args)
    }
}

fn jobs(run: &FioRun) -> Vec<serde_json::Value> {
    let json = run.json.as_ref().unwrap_or_else(|| panic!("no JSON report from fio:\n{}", run.text));
    json["jobs"].as_array().expect("jobs").clone()
}

fn bytes(job: &serde_json::Value, dir: &str) -> u64 {
    job[dir]["io_bytes"].as_u64().unwrap_or_else(|| panic!("no {dir}.io_bytes in {job}"))
}

#[test]
fn the_example_job_files_run_and_verify_on_nvmed() {
    let Some(engine) = engine() else { return };
    let broker = broker(&[]);
    let job = repo().join("examples/fio/verify.fio");
    let run = fio(&engine, &broker.socket, &["--output-format=json", job.to_str().unwrap()]);
    assert!(run.ok, "fio failed:\n{}", run.text);
    assert!(!run.text.contains("verify failed") && !run.text.contains("bad magic"), "{}", run.text);
    let jobs = jobs(&run);
    let names: Vec<&str> = jobs.iter().map(|j| j["jobname"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "seq-write",
            "rand-write-procs",
            "rand-write-procs",
            "rand-write-threads-poll",
            "rand-write-threads-poll",
            "randrw",
            "trim"
        ]
    );
    // Zero copy: the device moved exactly the bytes fio counted, by DMA straight into fio's
    // registered buffers (nothing bounced, nothing copied by the broker).
    let moved: u64 = jobs.iter().map(|j| bytes(j, "read") + bytes(j, "write")).sum();
    let stats = broker.connect().stats().unwrap();
    assert_eq!(stats.device_dma_bytes, Some(moved), "{stats:?}");
    assert_eq!(stats.broker_bounced_bytes, 0);
    const REGION: u64 = 16 << 20;
    for j in &jobs {
        let name = j["jobname"].as_str().unwrap();
        assert_eq!(j["error"].as_u64(), Some(0), "{name}: {j}");
        match name {
            "trim" => assert_eq!(bytes(j, "trim"), REGION, "{name}"),
            // Everything written once, then read back and verified.
            "randrw" => {
                assert!(bytes(j, "write") > REGION / 4 && bytes(j, "read") >= REGION, "{name}: {j}");
            }
            _ => {
                assert_eq!(bytes(j, "write"), REGION, "{name}");
                assert_eq!(bytes(j, "read"), REGION, "{name}: the verify pass reads it all back");
            }
        }
    }
}

#[test]
fn verification_catches_data_changed_behind_fios_back() {
    let Some(engine) = engine() else { return };
    let broker = broker(&[]);
    let (eng, sock) = (
        format!("--ioengine=external:{}", engine.display()),
        format!("--filename={}", broker.socket.display()),
    );
    let common =
        ["--name=v", &eng, &sock, "--rw=write", "--bs=64k", "--iodepth=4", "--size=4m", "--verify=crc32c"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = common.iter().chain(extra).copied().collect();
        fio(&engine, &broker.socket, &args)
    };
    let written = run(&["--do_verify=1"]);
    assert!(written.ok, "{}", written.text);
    let clean = run(&["--verify_only=1"]);
    assert!(clean.ok, "verifying untouched data failed:\n{}", clean.text);

    // Zero one block in the middle through the client library, then verify again.
    let mut ring = broker.connect();
    let nsid = ring.namespaces()[0].nsid;
    let c = {
        ring.prep(Io::write_zeroes(nsid, 2 << 20, 4096).user_data(1)).unwrap();
        ring.submit().unwrap();
        let mut done = Vec::new();
        ring.wait(1, &mut done, None).unwrap();
        done[0]
    };
    assert!(c.status.is_success());
    let dirty = run(&["--verify_only=1", "--output-format=json"]);
    assert!(!dirty.ok, "fio did not notice the zeroed block:\n{}", dirty.text);
    assert!(dirty.text.contains("verify"), "{}", dirty.text);
    assert_eq!(jobs(&dirty)[0]["error"].as_u64(), Some(libc::EILSEQ as u64), "{}", dirty.text);
}

#[test]
fn a_job_over_the_brokers_limits_fails_with_the_brokers_words() {
    let Some(engine) = engine() else { return };
    let broker = broker(&["--max-registered-bytes", "64K", "--default-access", "read-only"]);
    let run = job(&engine, &broker, "limited");

    // fio's buffers (4 x 64 KiB) are more than this broker lets one session register.
    let big = run(&["--rw=read", "--bs=64k", "--iodepth=4", "--output-format=json"]);
    assert!(!big.ok, "{}", big.text);
    assert!(
        big.text.contains(
            "nvmed: registering 262144 bytes of I/O buffers: broker refused the request: bad buffer length 262144: larger than the limit of 65536 bytes"
        ),
        "{}",
        big.text
    );
    assert_eq!(jobs(&big)[0]["error"].as_u64(), Some(libc::ENOMEM as u64));

    // Within the limit reads work; writes to a read-only namespace fail with nvmed's status.
    let reads = run(&["--rw=randread", "--bs=4k", "--iodepth=4", "--output-format=json"]);
    assert!(reads.ok, "{}", reads.text);
    assert_eq!(bytes(&jobs(&reads)[0], "read"), 1 << 20);
    // A job that would write a read-only namespace is refused at start, with the reason.
    let writes = run(&["--rw=write", "--bs=4k", "--iodepth=4"]);
    assert!(!writes.ok, "{}", writes.text);
    assert!(
        writes.text.contains(
            "nvmed: namespace 1 is read-only for this client: a job that writes or trims cannot run"
        ),
        "{}",
        writes.text
    );
}

#[test]
fn a_job_the_namespace_cannot_take_is_refused_at_start_and_unlink_spares_the_socket() {
    let Some(engine) = engine() else { return };
    let broker = broker(&["--lba-size", "4096"]);
    let run = job(&engine, &broker, "sizes");
    // 512-byte requests on 4 KiB blocks: every one would fail; the job does not start.
    let small = run(&["--rw=randread", "--bs=512"]);
    assert!(!small.ok, "{}", small.text);
    assert!(
        small.text.contains(
            "nvmed: bs 512-512 (alignment 512) is not a multiple of namespace 1's 4096-byte blocks"
        ),
        "{}",
        small.text
    );
    // Above the largest request the broker takes.
    let big = run(&["--rw=read", "--bs=32m", "--size=64m"]);
    assert!(!big.ok, "{}", big.text);
    assert!(big.text.contains("nvmed: bs 33554432 is above namespace 1's largest request"), "{}", big.text);
    // unlink=1 (from a job file written for files) leaves the broker's socket alone.
    let ok = run(&["--rw=write", "--bs=4k", "--unlink=1"]);
    assert!(ok.ok, "{}", ok.text);
    assert!(broker.socket.exists(), "fio's unlink=1 deleted the broker's socket");
    broker.connect();
}

/// The engine's own options reach the library: `busy_poll` reaps by polling (the job's thread
/// spins through each slow I/O), `spin_us` bounds the waiting mode's spin (0: sleep at once,
/// a long one: spin through the I/O), `sq_entries` sizes the ring (the broker's bound shows).
#[test]
fn the_engines_polling_and_ring_options_take_effect() {
    let Some(engine) = engine() else { return };
    // Each read takes 2 ms at the device: a job at depth 1 mostly waits.
    let broker = broker(&["--emulator-mode", "async", "--emulator-latency-us", "2000"]);
    let run = job(&engine, &broker, "polling");
    let cpu = |extra: &[&str]| {
        let mut args = vec![
            "--rw=randread",
            "--bs=4k",
            "--iodepth=1",
            "--time_based=1",
            "--runtime=1",
            "--output-format=json",
        ];
        args.extend_from_slice(extra);
        let r = run(&args);
        assert!(r.ok, "{}", r.text);
        let j = &jobs(&r)[0];
        assert!(j["read"]["io_bytes"].as_u64().unwrap() > 0, "{j}");
        j["usr_cpu"].as_f64().unwrap() + j["sys_cpu"].as_f64().unwrap()
    };
    let asleep = cpu(&["--spin_us=0"]);
    let polling = cpu(&["--busy_poll=1"]);
    let spinning = cpu(&["--spin_us=100000"]);
    // Loose bounds (other tests share the CPUs): a thread that sleeps through 2 ms waits uses a
    // few percent of a CPU; one that spins through them, most of what it is given.
    assert!(asleep < 15.0, "spin_us=0: the job used {asleep:.1}% of a CPU");
    assert!(polling > 20.0 && polling > 3.0 * asleep, "busy_poll=1: {polling:.1}% (sleeping: {asleep:.1}%)");
    assert!(
        spinning > 30.0 && spinning > 3.0 * asleep,
        "spin_us=100000: {spinning:.1}% (sleeping: {asleep:.1}%)"
    );
    // A ring above the broker's largest is refused in the broker's words.
    let big = run(&["--rw=read", "--bs=4k", "--sq_entries=8192"]);
    assert!(!big.ok, "{}", big.text);
    assert!(big.text.contains("(got sq 8192, cq 16384)"), "{}", big.text);
}
