//! End to end: `nvmed --metrics-listen` scraped with a real HTTP client (ureq) while 8 clients
//! run I/O (6 sessions of this process as uid 0, throttled by an IOPS grant, and 2 peer
//! processes as uid 1000). Each scrape is parsed with `prometheus-parse` and its structure is
//! checked strictly; the per-session, per-uid and broker figures must only grow, and at the
//! end equal what the clients counted themselves. Then: health gauges, registered bytes,
//! 404/405/431, and connections that send nothing must not keep scrapes out.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{ios_of, load_as, TestBroker};
use nvmed_client::{Io, NvmeRing, RingOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Each in-process client's buffer.
const BUF: u64 = 64 * KIB;
/// I/Os each in-process client does (half writes, half reads, 4 KiB each).
const IOS: u64 = 600;
const CLIENTS: usize = 6;
const PEERS: usize = 2;
const PEER_QD: u64 = 4;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a client counted itself.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    submitted: u64,
    completed: u64,
    errors: u64,
    read: u64,
    written: u64,
}

/// A parsed scrape.
struct Metrics {
    samples: Vec<prometheus_parse::Sample>,
    /// The scrape as text (histograms are checked there).
    text: String,
}

fn value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("unexpected value {other:?}"),
    }
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let sample_lines = check_structure(text);
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let histogram = |m: &str| m.contains("_latency_seconds");
        let plain = scrape.samples.iter().filter(|s| !histogram(&s.metric)).count();
        assert_eq!(plain, sample_lines, "prometheus-parse left samples out");
        Metrics { samples: scrape.samples, text: text.to_string() }
    }

    /// The value of the text line `name{labels...}` (labels in the order written).
    fn line(&self, name: &str, labels: &str) -> f64 {
        let key = format!("{name}{{{labels}}} ");
        let l = self.text.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("no {key}"));
        l[key.len()..].parse().unwrap()
    }

    /// The samples of `name` whose labels include `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| value(&s.value))
    }

    /// The one sample of `name` with these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let v: Vec<f64> = self.matching(name, labels).collect();
        assert_eq!(v.len(), 1, "{name}{labels:?}: {v:?}");
        v[0]
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }
}

/// Checks the OpenMetrics text strictly: `# HELP` then `# TYPE` (counter, gauge or histogram)
/// before each family's samples, each sample of the family being described (`_total` for
/// counters; `_bucket` with `le`, `_sum` and `_count` for histograms), label sets well formed
/// with escapes, no sample twice, finite non-negative values, and `# EOF` last. Returns how many
/// samples there are outside histograms.
fn check_structure(text: &str) -> usize {
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.iter().filter(|l| **l == "# EOF").count(), 1);
    let mut family: Option<(String, String)> = None; // name, type
    let mut help: Option<String> = None;
    let mut seen = HashSet::new();
    let mut families = HashSet::new();
    let mut samples = 0;
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(families.insert(name.clone()), "family {name} described twice");
            help = Some(name);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert_eq!(help.as_deref(), Some(name), "TYPE without its HELP: {line}");
            assert!(kind == "counter" || kind == "gauge" || kind == "histogram", "{line}");
            family = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (fam, kind) = family.as_ref().unwrap_or_else(|| panic!("sample before any family: {line}"));
        let (series, val) = line.rsplit_once(' ').expect(line);
        let name = series.split('{').next().unwrap();
        let mut labels = Vec::new();
        if let Some(l) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            labels = parse_labels(l).unwrap_or_else(|e| panic!("{e}: {line}"));
        }
        let v: f64 = val.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        assert!(v.is_finite() && v >= 0.0, "{line}");
        assert!(seen.insert(series.to_string()), "sample twice: {line}");
        if kind == "histogram" {
            let bucket = name == format!("{fam}_bucket");
            assert!(bucket || name == format!("{fam}_sum") || name == format!("{fam}_count"), "{line}");
            assert_eq!(bucket, labels.iter().any(|(k, _)| k == "le"), "le on buckets only: {line}");
            continue; // histograms are checked from the text, not counted here
        }
        let want = if kind == "counter" { format!("{fam}_total") } else { fam.clone() };
        assert_eq!(name, want, "sample outside its family: {line}");
        samples += 1;
    }
    samples
}

/// `{k="v",...}` with `\\`, `\"` and `\n` escapes.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let inner = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')).ok_or("labels not in braces")?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        if chars.next() != Some('"') {
            return Err("label value not quoted".into());
        }
        let mut val = String::new();
        loop {
            match chars.next().ok_or("unterminated label value")? {
                '"' => break,
                '\\' => match chars.next() {
                    Some('\\') => val.push('\\'),
                    Some('"') => val.push('"'),
                    Some('n') => val.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                c => val.push(c),
            }
        }
        out.push((key, val));
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(c) => return Err(format!("unexpected {c:?} after a label")),
        }
    }
    Ok(out)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn scrape(agent: &ureq::Agent, addr: SocketAddr) -> Metrics {
    let mut resp = agent.get(&format!("http://{addr}/metrics")).call().expect("scrape");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers().get("content-type").expect("a content type").to_str().unwrap().to_string();
    assert_eq!(ct, CONTENT_TYPE);
    Metrics::parse(&resp.body_mut().read_to_string().unwrap())
}

/// `IOS` 4 KiB I/Os at depth 4 in its own MiB of namespace 1, alternating writes and reads.
fn client_io(ring: &mut NvmeRing, index: u64) -> Counts {
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(BUF as usize).unwrap();
    let mut c = Counts::default();
    let mut out = Vec::new();
    let mut next = 0u64;
    while c.completed < IOS {
        while next < IOS && ring.in_flight() < 4 {
            let slot = next % (BUF / (4 * KIB));
            let off = index * MIB + (next % 256) * 4 * KIB;
            let io = if next.is_multiple_of(2) {
                Io::write(ns, off, 4096, buf, slot * 4 * KIB)
            } else {
                Io::read(ns, off, 4096, buf, slot * 4 * KIB)
            };
            ring.prep(io.user_data(next)).unwrap();
            c.submitted += 1;
            next += 1;
        }
        ring.submit().unwrap();
        out.clear();
        ring.wait(1, &mut out, Some(Duration::from_secs(10))).unwrap();
        for cqe in &out {
            c.completed += 1;
            if !cqe.status.is_success() {
                c.errors += 1;
            } else if cqe.user_data.is_multiple_of(2) {
                c.written += 4 * KIB;
            } else {
                c.read += 4 * KIB;
            }
        }
    }
    c
}

#[test]
fn scrapes_follow_the_clients_and_match_their_counts() {
    let broker = TestBroker::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--io-threads",
        "2",
        "--socket-mode",
        "666",
        // Root's sessions share 4000 IOPS: they are throttled, so throttle time shows.
        "--grant",
        "0:1:iops=4k",
        // uid 1000's peers have no grant.
        "--default-access",
        "read-write",
    ]);
    let addr: SocketAddr = broker
        .ready
        .split("metrics on http://")
        .nth(1)
        .and_then(|u| u.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("the ready line names no metrics address: {:?}", broker.ready))
        .parse()
        .unwrap();
    let agent = agent();
    let idle = scrape(&agent, addr);
    assert_eq!(idle.get("nvmed_sessions", &[]), 0.0);
    assert_eq!(idle.get("nvmed_registered_bytes", &[]), 0.0);
    assert_eq!(idle.sum("nvmed_thread_rings", &[]), 0.0);
    assert_eq!(idle.matching("nvmed_thread_rings", &[]).count(), 2, "one per I/O thread");

    // 8 clients: 6 sessions here (uid 0), 2 peer processes as uid 1000.
    let peers: Vec<Child> =
        (0..PEERS).map(|_| load_as(1000, &broker.socket, 1.5, PEER_QD as usize)).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let socket = broker.socket.clone();
            std::thread::spawn(move || {
                let opts = RingOptions { client_name: format!("metrics-{i}"), ..RingOptions::default() };
                let mut ring = NvmeRing::open_with(&socket, opts).unwrap();
                let counts = client_io(&mut ring, i as u64);
                (ring, counts) // the session stays open until the end of the test
            })
        })
        .collect();

    // While they run: every figure only grows, and the work shows.
    let mut last_total = 0.0;
    let mut last_per_session: std::collections::HashMap<String, f64> = Default::default();
    let mut rising = 0;
    let mut peers_seen = false;
    while !clients.iter().all(|c| c.is_finished()) {
        let m = scrape(&agent, addr);
        let total = m.get("nvmed_requests_completed_total", &[]);
        assert!(total >= last_total, "the broker's completions went down: {last_total} -> {total}");
        rising += usize::from(total > last_total);
        last_total = total;
        // (The series appears with the first uid-0 session: a scrape may come before it.)
        assert!(m.sum("nvmed_uid_requests_completed_total", &[("uid", "0")]) <= total);
        for s in m.samples.iter().filter(|s| s.metric == "nvmed_session_requests_completed_total") {
            let id = s.labels.get("session").unwrap().to_string();
            let v = value(&s.value);
            let before = last_per_session.insert(id.clone(), v).unwrap_or(0.0);
            assert!(v >= before, "session {id}: completions went down {before} -> {v}");
        }
        peers_seen |= m.get("nvmed_uid_sessions", &[("uid", "1000")]) == PEERS as f64;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rising >= 3, "the counters rose in only {rising} scrapes");
    assert!(peers_seen, "the peers' sessions never showed");
    let done: Vec<(NvmeRing, Counts)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let peer_ios: u64 = peers.into_iter().map(ios_of).sum();
    // The peers' sessions end once their I/O drained; then the figures are final.
    common::wait_until("the peers' sessions and connections to end", Duration::from_secs(10), || {
        let m = scrape(&agent, addr);
        // The connection's quota goes just after the session's end is recorded.
        m.get("nvmed_sessions", &[]) == CLIENTS as f64 && m.get("nvmed_connections", &[]) == CLIENTS as f64
    });
    // The schedulers' figures are kept for 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    let m = scrape(&agent, addr);

    // Each session: exactly what its client counted.
    let mut uid0 = Counts::default();
    for (i, (ring, c)) in done.iter().enumerate() {
        assert_eq!((c.completed, c.errors), (IOS, 0));
        let sid = ring.session_id().to_string();
        let name = format!("metrics-{i}");
        let l = [("session", sid.as_str()), ("uid", "0"), ("client", name.as_str())];
        assert_eq!(m.get("nvmed_session_requests_submitted_total", &l), c.submitted as f64);
        assert_eq!(m.get("nvmed_session_requests_completed_total", &l), c.completed as f64);
        assert_eq!(m.get("nvmed_session_request_errors_total", &l), 0.0);
        assert_eq!(m.get("nvmed_session_read_bytes_total", &l), c.read as f64);
        assert_eq!(m.get("nvmed_session_written_bytes_total", &l), c.written as f64);
        assert_eq!(m.get("nvmed_session_in_flight", &l), 0.0);
        assert_eq!(m.get("nvmed_session_rings", &l), 1.0);
        assert_eq!(m.get("nvmed_session_registered_buffers", &l), 1.0);
        assert_eq!(m.get("nvmed_session_registered_bytes", &l), BUF as f64);
        // Every request was a device request: each has its latency in the histogram.
        let hl = format!("session=\"{sid}\",uid=\"0\",client=\"{name}\"");
        assert_eq!(m.line("nvmed_session_request_latency_seconds_count", &hl), c.completed as f64);
        let inf = m
            .text
            .lines()
            .find(|l| {
                l.starts_with("nvmed_session_request_latency_seconds_bucket{")
                    && l.contains(&hl)
                    && l.contains("le=\"+Inf\"")
            })
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.parse::<f64>().unwrap());
        assert_eq!(inf, Some(c.completed as f64), "the +Inf bucket counts them all");
        assert!(m.line("nvmed_session_request_latency_seconds_sum", &hl) > 0.0);
        uid0.submitted += c.submitted;
        uid0.completed += c.completed;
        uid0.read += c.read;
        uid0.written += c.written;
    }
    // Per uid: uid 0 is the sum of its sessions; uid 1000's sessions ended but still count.
    let u0 = [("uid", "0")];
    assert_eq!(m.get("nvmed_uid_requests_submitted_total", &u0), uid0.submitted as f64);
    assert_eq!(m.get("nvmed_uid_requests_completed_total", &u0), uid0.completed as f64);
    assert_eq!(m.get("nvmed_uid_read_bytes_total", &u0), uid0.read as f64);
    assert_eq!(m.get("nvmed_uid_written_bytes_total", &u0), uid0.written as f64);
    assert_eq!(m.get("nvmed_uid_sessions", &u0), CLIENTS as f64);
    assert_eq!(m.get("nvmed_uid_registered_bytes", &u0), (CLIENTS as u64 * BUF) as f64);
    let u1000 = [("uid", "1000")];
    let peer_done = m.get("nvmed_uid_requests_completed_total", &u1000) as u64;
    // A peer stops reaping at its deadline: what it had in flight completes unseen.
    assert!(
        (peer_ios..=peer_ios + PEERS as u64 * PEER_QD).contains(&peer_done),
        "uid 1000: broker {peer_done}, peers {peer_ios}"
    );
    assert_eq!(m.get("nvmed_uid_requests_submitted_total", &u1000), peer_done as f64);
    assert_eq!(m.get("nvmed_uid_read_bytes_total", &u1000), (peer_done * 4 * KIB) as f64);
    assert_eq!(m.get("nvmed_uid_sessions", &u1000), 0.0);
    assert_eq!(m.get("nvmed_uid_in_flight", &u1000), 0.0);
    // Broker-wide.
    let all = (uid0.completed + peer_done) as f64;
    assert_eq!(m.get("nvmed_requests_completed_total", &[]), all);
    assert_eq!(m.get("nvmed_requests_submitted_total", &[]), all);
    assert_eq!(m.get("nvmed_request_errors_total", &[]), 0.0);
    assert_eq!(m.get("nvmed_in_flight", &[]), 0.0);
    assert_eq!(m.get("nvmed_sessions", &[]), CLIENTS as f64);
    assert_eq!(m.get("nvmed_sessions_ended_total", &[]), PEERS as f64);
    assert_eq!(m.get("nvmed_connections", &[]), CLIENTS as f64);
    assert_eq!(m.get("nvmed_registered_buffers", &[]), CLIENTS as f64);
    assert_eq!(m.get("nvmed_registered_bytes", &[]), (CLIENTS as u64 * BUF) as f64);
    assert!(m.get("nvmed_registered_bytes_limit", &[]) >= (16u64 << 30) as f64);
    // I/O threads: every request was one device command (4 KiB, below MDTS).
    assert_eq!(m.sum("nvmed_thread_device_commands_total", &[]), all);
    assert_eq!(m.sum("nvmed_thread_rings", &[]), CLIENTS as f64);
    assert_eq!(m.sum("nvmed_thread_queue_in_flight", &[]), 0.0);
    assert_eq!(m.get("nvmed_controller_queue_entries", &[("controller", "0")]), 1024.0);
    // QoS: uid 0's tenant dispatched each of its requests once, and was held by its limit.
    assert_eq!(m.sum("nvmed_tenant_dispatched_total", &u0), uid0.completed as f64);
    assert_eq!(m.sum("nvmed_tenant_dispatched_read_bytes_total", &u0), uid0.read as f64);
    assert_eq!(m.sum("nvmed_tenant_dispatched_written_bytes_total", &u0), uid0.written as f64);
    let throttled = m.sum("nvmed_tenant_throttled_seconds_total", &u0);
    assert!(throttled > 0.0, "uid 0 was never held by its 4k IOPS");
    assert_eq!(m.sum("nvmed_tenant_in_flight", &u0), 0.0);
    assert!(!m.has("nvmed_tenant_dispatched_total", &u1000), "uid 1000's rings are gone");
    // Health of the emulated controller (313 K, spare 100 % of threshold 10 %, nothing used).
    let c0 = [("controller", "0"), ("device", "emulated-0")];
    assert_eq!(m.get("nvmed_controller_up", &c0), 1.0);
    assert_eq!(m.get("nvmed_controller_info", &c0), 1.0);
    assert_eq!(m.get("nvmed_health_temperature_celsius", &c0), 40.0);
    assert_eq!(m.get("nvmed_health_available_spare_percent", &c0), 100.0);
    assert_eq!(m.get("nvmed_health_available_spare_threshold_percent", &c0), 10.0);
    assert_eq!(m.get("nvmed_health_percentage_used", &c0), 0.0);
    assert_eq!(m.get("nvmed_health_critical_warning", &c0), 0.0);
    assert_eq!(m.get("nvmed_health_media_errors_total", &c0), 0.0);
    assert!(m.has("nvmed_health_unsafe_shutdowns_total", &c0));
    assert!(m.get("nvmed_health_reading_age_seconds", &c0) < 30.0);

    // Other paths and methods, and a request too large.
    let resp = agent.get(&format!("http://{addr}/other")).call().unwrap();
    assert_eq!(resp.status(), 404);
    let resp = agent.post(&format!("http://{addr}/metrics")).send("x").unwrap();
    assert_eq!(resp.status(), 405);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(16 << 10));
    let _ = s.write_all(huge.as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");

    // Connections that send nothing, or half a request, cannot keep scrapes out.
    let mut idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in idle.iter_mut().take(8) {
        s.write_all(b"GET /metr").unwrap();
    }
    for _ in 0..5 {
        let t = Instant::now();
        let m = scrape(&agent, addr);
        assert_eq!(m.get("nvmed_sessions", &[]), CLIENTS as f64);
        // Kept out, it would wait for a slot until a request deadline (5 s) frees one.
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "a scrape took {:?} beside idle connections",
            t.elapsed()
        );
    }
    drop(idle);
    drop(done);
    common::wait_until("the sessions to end", Duration::from_secs(10), || {
        scrape(&agent, addr).get("nvmed_sessions", &[]) == 0.0
    });
    let m = scrape(&agent, addr);
    assert_eq!(m.get("nvmed_registered_bytes", &[]), 0.0);
    assert_eq!(
        m.get("nvmed_uid_requests_completed_total", &u0),
        uid0.completed as f64,
        "ended sessions still count"
    );
}

#[test]
fn a_token_file_makes_the_endpoint_answer_only_requests_that_carry_it() {
    let dir = std::env::temp_dir().join(format!("nvmed-metrics-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "k9Tq2x\n").unwrap();
    let broker = TestBroker::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-token-file",
        token.to_str().unwrap(),
    ]);
    let addr: SocketAddr = broker
        .ready
        .split("metrics on http://")
        .nth(1)
        .and_then(|u| u.strip_suffix("/metrics"))
        .unwrap()
        .parse()
        .unwrap();
    let agent = agent();
    let resp = agent.get(&format!("http://{addr}/metrics")).call().unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers().get("www-authenticate").unwrap(), "Bearer");
    let resp =
        agent.get(&format!("http://{addr}/metrics")).header("Authorization", "Bearer wrong").call().unwrap();
    assert_eq!(resp.status(), 401);
    let mut resp =
        agent.get(&format!("http://{addr}/metrics")).header("Authorization", "Bearer k9Tq2x").call().unwrap();
    assert_eq!(resp.status(), 200);
    let m = Metrics::parse(&resp.body_mut().read_to_string().unwrap());
    assert_eq!(m.get("nvmed_sessions", &[]), 0.0);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
