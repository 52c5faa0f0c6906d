//! libnvmed from C: the C example, compiled with the system C compiler against the checked-in
//! header and the built library, runs against a live broker and verifies its data; bad calls
//! and a broker limit come back as the right error codes with readable text.

mod common;
mod csupport;

use common::TestBroker;
use csupport::{compile_c, run};

#[test]
fn the_c_example_verifies_its_data_against_a_live_broker() {
    let broker = TestBroker::start(&[]);
    let exe = broker.dir.join("nvmed_example");
    compile_c(&[csupport::repo().join("capi/examples/nvmed_example.c")], &exe);
    let out = run(&exe, &[broker.socket.to_str().unwrap()]);
    assert!(out.status.success(), "the C example failed:\n{}", out.text);
    for line in [
        "write/read: 65536 bytes verified",
        "readv: 2 segments verified (caller's memfd)",
        "write zeroes: verified",
        // (the event loop's line varies: the completion may come before the sleep)
        // Bad calls: the typed code, its name, and the library's text.
        "bad nsid: -15 no such namespace for this session: namespace 99 is not one this session may use (it may use: 1)",
        "unregistered buffer: -9 unknown buffer id: unknown buffer id 12345",
        "out of buffer: -10 range outside the buffer: range 130972+4096 is outside buffer 0 of 131072 bytes",
        // A request the broker fails: the status word in the completion, described.
        "past the end: status 0x2000006: broker: offset + length past the end of the namespace",
        "ok",
    ] {
        assert!(out.text.lines().any(|l| l == line), "missing {line:?} in:\n{}", out.text);
    }
    assert!(out.text.lines().any(|l| l.starts_with("event loop: completion 12 after ")), "{}", out.text);
    // 64 KiB written; 3 x 64 KiB and 4 KiB read (read, readv, read after write zeroes, the event
    // loop's read); one failure.
    assert!(
        out.text.contains(
            "9 submitted, 9 completed, 1 errors, 200704 bytes read, 65536 bytes written, 2 buffers"
        ),
        "{}",
        out.text
    );
}

/// A C program that hits a broker limit and a bad argument, and prints what it got.
const LIMITS_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include "nvmed.h"
int main(int argc, char **argv)
{
    nvmed_ring *ring = NULL;
    nvmed_buffer b;
    (void)argc;
    int rc = nvmed_open(argv[1], NULL, &ring);
    if (rc) { printf("open: %d %s\n", rc, nvmed_last_error()); return 1; }
    rc = nvmed_buffer_alloc(ring, 1 << 20, &b);
    printf("alloc 1 MiB: %d [%s] %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
    rc = nvmed_buffer_alloc(ring, 16 << 10, &b);
    printf("alloc 16 KiB: %d\n", rc);
    rc = nvmed_buffer_unregister(ring, b.id + 7);
    printf("unregister unknown: %d [%s] %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
    rc = nvmed_prep_read(NULL, 1, 0, 4096, b.id, 0, 0);
    printf("null ring: %d [%s] %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
    nvmed_completion c;
    rc = nvmed_wait(ring, &c, 1, 1, 1000);
    printf("wait with nothing in flight: %d [%s]\n", rc, nvmed_strerror(rc));
    nvmed_close(ring);
    rc = nvmed_open("/nonexistent/nvmed.sock", NULL, &ring);
    printf("open missing: %d [%s] %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
    return 0;
}
"#;

#[test]
fn broker_limits_and_bad_calls_come_back_as_codes_with_the_brokers_words() {
    let broker = TestBroker::start(&["--max-registered-bytes", "64K"]);
    let src = broker.dir.join("limits.c");
    std::fs::write(&src, LIMITS_C).unwrap();
    let exe = broker.dir.join("limits");
    compile_c(&[src], &exe);
    let out = run(&exe, &[broker.socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.text);
    let expect = [
        "alloc 1 MiB: -3 [the broker refused the request] broker refused the request: bad buffer length 1048576: larger than the limit of 65536 bytes",
        "alloc 16 KiB: 0",
        "null ring: -1 [invalid argument] the ring handle is NULL",
        "wait with nothing in flight: -1 [invalid argument]",
        "open missing: -2 [cannot connect to the broker] cannot connect to the broker at /nonexistent/nvmed.sock: ENOENT: No such file or directory",
    ];
    for line in expect {
        assert!(out.text.lines().any(|l| l == line), "missing {line:?} in:\n{}", out.text);
    }
    assert!(
        out.text.contains("unregister unknown: -9 [unknown buffer id] unknown buffer id"),
        "{}",
        out.text
    );
}

#[test]
fn the_library_exports_only_its_api_and_the_pkg_config_file_points_at_it() {
    let dir = csupport::lib_dir();
    let pc = std::fs::read_to_string(csupport::profile_dir().join("nvmed.pc"))
        .expect("nvmed.pc next to the library");
    assert!(
        pc.contains("Libs: -L${libdir} -lnvmed")
            && pc.contains(concat!("Version: ", env!("CARGO_PKG_VERSION"))),
        "{pc}"
    );
    let syms = std::process::Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(dir.join("libnvmed.so"))
        .output()
        .unwrap();
    assert!(syms.status.success());
    let syms = String::from_utf8_lossy(&syms.stdout);
    let exported: Vec<&str> = syms
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|s| !s.starts_with("NVMED_"))
        .collect();
    assert!(exported.contains(&"nvmed_open") && exported.contains(&"nvmed_strerror"), "{exported:?}");
    assert!(
        exported.iter().all(|s| s.starts_with("nvmed_")),
        "libnvmed.so exports more than its API: {exported:?}"
    );
}

#[test]
fn the_versioned_library_carries_the_symbol_versions_and_soname_of_the_policy() {
    let dir = csupport::lib_dir();
    let out = std::process::Command::new("bash")
        .arg(csupport::repo().join("scripts/build_capi.sh"))
        .args(["--no-fio", "--libdir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let so = dir.join("libnvmed.so.0.1");
    let dump = std::process::Command::new("objdump").arg("-T").arg(&so).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    let defined: Vec<&str> =
        dump.lines().filter(|l| l.contains(" DF .text") || l.contains(" DO .")).collect();
    assert!(defined.iter().any(|l| l.ends_with(" nvmed_open")), "{dump}");
    for l in &defined {
        assert!(l.contains("NVMED_0.1") && l.contains(" nvmed_"), "a symbol outside the policy: {l}");
    }
    let dynamic = std::process::Command::new("readelf").arg("-d").arg(&so).output().unwrap();
    assert!(String::from_utf8_lossy(&dynamic.stdout).contains("Library soname: [libnvmed.so.0.1]"));
    // A C program links against it and gets the versioned symbols.
    let tmp = common::scratch_dir();
    let src = tmp.join("v.c");
    std::fs::write(
        &src,
        "#include \"nvmed.h\"\nint main(void) { return nvmed_version() == NVMED_VERSION ? 0 : 1; }\n",
    )
    .unwrap();
    let exe = tmp.join("v");
    let st = std::process::Command::new("cc")
        .arg(format!("-I{}", csupport::repo().join("capi/include").display()))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(&so)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let needed = std::process::Command::new("objdump").arg("-T").arg(&exe).output().unwrap();
    assert!(String::from_utf8_lossy(&needed.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w == ["(NVMED_0.1)", "nvmed_version"]));
    assert!(std::process::Command::new(&exe).env_remove("LD_LIBRARY_PATH").status().unwrap().success());
    let _ = std::fs::remove_dir_all(tmp);
}

/// A C event loop across a broker restart: it holds the completion fd, the broker is killed
/// and started again, and arming tells it the fd changed (NVMED_E_FD_CHANGED); with the new
/// fd its I/O goes on.
const FD_CHANGED_C: &str = r#"
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include "nvmed.h"
static int io(nvmed_ring *ring, nvmed_buffer *b, int write, uint64_t tag)
{
    nvmed_completion c;
    int rc = write ? nvmed_prep_write(ring, 1, 0, 4096, b->id, 0, tag, 0)
                   : nvmed_prep_read(ring, 1, 0, 4096, b->id, 4096, tag);
    if (rc == 0) rc = nvmed_submit(ring); /* how many it handed over */
    if (rc == 1) rc = nvmed_wait(ring, &c, 1, 1, 5000000);
    if (rc != 1) return rc < 0 ? rc : -100;
    if (c.user_data != tag || c.status != 0) {
        char why[128];
        nvmed_status_string(c.status, why, sizeof why);
        printf("request %llu: tag %llu status %s\n", (unsigned long long)tag,
               (unsigned long long)c.user_data, why);
        return -101;
    }
    return 0;
}
int main(int argc, char **argv)
{
    nvmed_ring *ring = NULL;
    nvmed_buffer b;
    nvmed_completion c[4];
    (void)argc;
    if (nvmed_open(argv[1], NULL, &ring) || nvmed_buffer_alloc(ring, 8192, &b)) {
        printf("setup: %s\n", nvmed_last_error());
        return 1;
    }
    memset(b.addr, 0x3c, 4096);
    int fd = nvmed_completion_fd(ring);
    int first = io(ring, &b, 1, 1);
    printf("first fd ok: %d (io %d %s)\n", fd >= 0 && first == 0, first, nvmed_last_error());
    int cfd = nvmed_control_fd(ring);
    printf("READY\n");
    fflush(stdout);
    /* The broker is killed: no doorbell says so, the control socket hangs up. */
    struct pollfd p = { .fd = cfd, .events = POLLRDHUP };
    int n = poll(&p, 1, 20000);
    printf("control fd hung up: %d\n", cfd >= 0 && n == 1 && (p.revents & (POLLHUP | POLLRDHUP)) != 0);
    fflush(stdout);
    getchar(); /* the broker is started again meanwhile */
    int rc = nvmed_arm_completion_fd(ring, c, 4);
    printf("arm after the restart: %d [%s]\n", rc, nvmed_strerror(rc));
    int fd2 = nvmed_completion_fd(ring);
    printf("new fd: %d\n", fd2 >= 0);
    rc = nvmed_arm_completion_fd(ring, c, 4);
    printf("arm with the new fd: %d\n", rc);
    nvmed_disarm_completion_fd(ring);
    /* The restarted broker's memory is new: write, then read back through the new ring. */
    rc = io(ring, &b, 1, 2);
    if (rc == 0) rc = io(ring, &b, 0, 3);
    printf("io after the restart: %d, data %s\n", rc,
           memcmp(b.addr, (char *)b.addr + 4096, 4096) == 0 ? "same" : "different");
    nvmed_close(ring);
    return 0;
}
"#;

#[test]
fn a_c_event_loop_learns_that_its_completion_fd_changed_across_a_broker_restart() {
    use std::io::{BufRead, BufReader, Write};
    let mut broker = TestBroker::start(&[]);
    let src = broker.dir.join("fd_changed.c");
    std::fs::write(&src, FD_CHANGED_C).unwrap();
    let exe = broker.dir.join("fd_changed");
    compile_c(&[src], &exe);
    let mut child = std::process::Command::new(&exe)
        .arg(&broker.socket)
        .env_remove("LD_LIBRARY_PATH")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut text = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        text += &format!("{line}\n");
        if line == "READY" {
            break;
        }
    }
    assert!(text.contains("first fd ok: 1 (io 0"), "{text}");
    broker.kill9();
    for line in lines.by_ref() {
        let line = line.unwrap();
        text += &format!("{line}\n");
        if line.starts_with("control fd hung up") {
            break;
        }
    }
    assert!(text.contains("control fd hung up: 1\n"), "{text}");
    broker.restart();
    child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    for line in lines {
        text += &format!("{}\n", line.unwrap());
    }
    assert!(child.wait().unwrap().success(), "{text}");
    for want in [
        "arm after the restart: -17 [the ring reconnected: its completion fd changed]",
        "new fd: 1",
        "arm with the new fd: 0",
        "io after the restart: 0, data same",
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want:?} in:\n{text}");
    }
}
