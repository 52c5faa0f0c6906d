//! Shared test fixture: a real `nvmed` process on the emulated controller.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvmed_client::{NvmeRing, RingOptions};

/// A broker process, stopped (SIGTERM) on drop.
pub struct TestBroker {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The line nvmed printed when it was ready (it names the metrics address, if any).
    pub ready: String,
    /// What it was started with (to start it again).
    pub args: Vec<String>,
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn scratch_dir() -> PathBuf {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nvmed-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl TestBroker {
    /// Starts `nvmed --emulate` with extra arguments and waits until it is ready.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(scratch_dir(), extra)
    }

    pub fn start_in(dir: PathBuf, extra: &[&str]) -> Self {
        let socket = dir.join("nvmed.sock");
        let mut args = vec!["--emulate", "--socket", socket.to_str().unwrap(), "--size", "64M"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        Self::spawn(dir, socket, &args)
    }

    /// Starts `nvmed` with exactly `args` (it must listen on `socket`) and waits until it is ready.
    pub fn spawn(dir: PathBuf, socket: PathBuf, args: &[String]) -> Self {
        Self::spawn_env(dir, socket, args, &[])
    }

    /// [`TestBroker::spawn`] with these environment variables set too.
    pub fn spawn_env(dir: PathBuf, socket: PathBuf, args: &[String], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nvmed"))
            .args(args)
            .envs(env.iter().copied())
            // NVMED_TEST_LOG=info (or debug) shows the brokers' logs when debugging a test.
            .env("NVMED_LOG", std::env::var("NVMED_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start nvmed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "nvmed did not start with {args:?}: {line:?}");
        Self { child: Some(child), dir, socket, ready: line.trim_end().to_string(), args: args.to_vec() }
    }

    /// SIGKILLs the broker (as a crash would end it) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again with the same arguments (after [`TestBroker::kill9`] or
    /// [`TestBroker::stop`]) and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker still runs");
        let again = Self::spawn(self.dir.clone(), self.socket.clone(), &self.args);
        let mut again = std::mem::ManuallyDrop::new(again);
        self.child = again.child.take();
        self.ready = std::mem::take(&mut again.ready);
    }

    pub fn connect(&self) -> NvmeRing {
        NvmeRing::open(&self.socket).expect("connect to the broker")
    }

    /// A client that does not reconnect when the broker goes away.
    pub fn connect_once(&self) -> NvmeRing {
        let opts = RingOptions { reconnect: nvmed_client::Reconnect::off(), ..RingOptions::default() };
        NvmeRing::open_with(&self.socket, opts).expect("connect to the broker")
    }

    pub fn connect_with(&self, sq: u32, cq: u32) -> NvmeRing {
        let opts = RingOptions { sq_entries: sq, cq_entries: cq, ..RingOptions::default() };
        NvmeRing::open_with(&self.socket, opts).expect("connect to the broker")
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        send_signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the broker process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a signal to a process.
pub fn send_signal(pid: u32, sig: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::try_from(sig).unwrap(),
    );
}

#[allow(unused_imports)]
pub use nvmed_client::testkit::{pattern, Rng};

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `$TMPDIR/{prefix}-{pid}`, empty: a directory of that name left by an earlier process with
/// the same pid (other builds' binaries: a stale `nvmed-test-peer` speaks an older protocol) is
/// removed, and so are those of processes that no longer run.
pub fn fresh_pid_dir(prefix: &str) -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    let stale = std::fs::read_dir(&tmp).into_iter().flatten().flatten().filter_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let pid = name.strip_prefix(prefix)?.strip_prefix('-')?.parse::<u32>().ok()?;
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        (gone || pid == std::process::id()).then(|| e.path())
    });
    for d in stale {
        let _ = std::fs::remove_dir_all(d);
    }
    tmp.join(format!("{prefix}-{}", std::process::id()))
}

/// A copy of a built binary that other uids can run: the build directory may sit in a tree
/// only root can enter (a checkout under a 0700 directory).
pub fn runnable_by_anyone(bin: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = fresh_pid_dir("nvmed-bins");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    });
    let src = std::path::Path::new(bin);
    let dst = dir.join(src.file_name().unwrap());
    // Copy to a temporary name and rename, so concurrent tests never run a half-written file.
    if !dst.exists() {
        let tmp = dir.join(format!(
            "{}.{:?}",
            src.file_name().unwrap().to_string_lossy(),
            std::thread::current().id()
        ));
        std::fs::copy(src, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &dst).unwrap();
    }
    dst
}

/// Starts `nvmed-test-peer MODE SOCKET` (`hammer` or `hammer-rings`) and returns once it says it
/// is hammering the broker with writes.
pub fn start_hammer(mode: &str, socket: &std::path::Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvmed-test-peer"))
        .arg(mode)
        .arg(socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("HAMMERING") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "nvmed-test-peer {mode} exited early");
    }
    child
}

/// What `nvmed-test-peer ARGS SOCKET` prints to stdout, run as `uid` (it must succeed).
pub fn peer_output(uid: u32, args: &[&str], socket: &std::path::Path) -> String {
    use std::os::unix::process::CommandExt;
    let out = Command::new(runnable_by_anyone(env!("CARGO_BIN_EXE_nvmed-test-peer")))
        .args(args)
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nvmed-test-peer {args:?} as uid {uid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `nvmed-test-peer load` as `uid` for `secs` at depth `qd`; returns the child, started.
pub fn load_as(uid: u32, socket: &std::path::Path, secs: f64, qd: usize) -> Child {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(runnable_by_anyone(env!("CARGO_BIN_EXE_nvmed-test-peer")))
        .arg("load")
        .arg(socket)
        .args([secs.to_string(), qd.to_string()])
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("LOADING") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "load peer exited early");
    }
    // Keep reading its output in the background through the child's stdout later.
    child.stdout = Some(out.into_inner());
    child
}

pub fn ios_of(mut child: Child) -> u64 {
    let out = BufReader::new(child.stdout.take().unwrap());
    let n = out
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("IOS ").map(|n| n.trim().parse::<u64>().unwrap()))
        .expect("the load peer did not report");
    assert!(child.wait().unwrap().success());
    n
}

/// CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap() // utime, stime
}

/// The broker's CPU use (user + system) over `span`, in per cent of one core.
pub fn cpu_percent_over(broker: &TestBroker, span: Duration) -> f64 {
    let p = broker.child.as_ref().unwrap().id();
    let (t0, c0) = (Instant::now(), cpu_ticks(p));
    std::thread::sleep(span);
    let ticks = cpu_ticks(p) - c0;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as f64;
    ticks as f64 / hz / t0.elapsed().as_secs_f64() * 100.0
}

/// Ring options with reconnecting off (a test that ends or kills its broker on purpose).
pub fn no_reconnect() -> nvmed_client::RingOptions {
    nvmed_client::RingOptions {
        reconnect: nvmed_client::Reconnect { enabled: false, ..Default::default() },
        ..Default::default()
    }
}
