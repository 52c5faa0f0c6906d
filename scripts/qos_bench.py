#!/usr/bin/env python3
"""QoS between nvmed's tenants on a modelled device: latency isolation, limit accuracy, weights.

Starts `nvmed --emulate --model MODEL --queue-depth 32` (an emulated controller with the speed
of a small SSD, behind a 32-entry device queue, so the broker's scheduler decides who gets the
device) and runs `ringbench` against it as other uids (tenants are uids; default 1000 and 1001,
through setpriv), one broker per configuration:

  1. latency isolation: a QD1 4 KiB random reader (uid A) alone, then with a QD256 128 KiB
     random writer (uid B) beside it, with equal weights and with the reader at weight 4, each
     without and with nvmed's cap on what contending tenants keep queued at the device
     (--contended-queue-kib, default 256 KiB here);
     p50/p99 of the reader and p99(with writer) / p99(alone) (goal <= 2x). Three more rows,
     informative: the writer capped to 2 requests at the device (--grant B:1:qd=2), the writer
     capped below the device's write bandwidth (--grant B:1:write-mbps=100), the reader alone
     again (how much the machine moved).
  2. limit accuracy: uid A granted iops=5k (4 KiB random reads, QD32), then read-mbps=100
     (128 KiB random reads, QD32), 10 s each: measured / limit (goal within 5 %), and each
     second's figure from the broker's own counters (`nvmectl top --json`).
  3. weights: uids A and B, weights 1 and 3, both QD64 4 KiB random reads for 10 s: A's share
     of the completed I/O (goal 25 % +- 5 points), over the seconds both ran (nvmectl) and
     from ringbench's totals.

Prints the machine state (`ringbench --pingpong 1`) first, then one Markdown table per part
with its goal and PASS/MISS, writes the raw results as JSON (--json) and draws one SVG with a
panel per part (--svg). Runs as root (to start clients as other uids). Python standard library
only; builds release nvmed, ringbench and nvmectl with cargo unless given their paths. Nothing
is asserted: the machine is shared and noisy.

  sudo python3 scripts/qos_bench.py                  # about 100 s
  python3 scripts/qos_bench.py --parts 1 --latency-secs 3
  python3 scripts/qos_bench.py --replot target/qos.json --svg /tmp/qos.svg   # no measuring
"""

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import xml.sax.saxutils as sx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_bench as sb  # noqa: E402  (ping-pong, axis helpers, markers: one chart style)

REPO = sb.REPO
TARGET = sb.TARGET

DEFAULT_MODEL = "latency-us=100,iops=20k,read-mbps=400,write-mbps=200,channels=16"

QUIET = False


def log(msg, progress=False):
    if not (progress and QUIET):
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Binaries, broker, clients.

def build(want):
    """cargo build --release of the binaries in `want`; returns {name: path}."""
    pkgs = {"nvmed": "nvmed-server", "ringbench": "ringbench", "nvmectl": "nvmectl"}
    cmd = ["cargo", "build", "--release"]
    for b in want:
        cmd += ["-p", pkgs[b]]
    for b in want:
        cmd += ["--bin", b]
    log(f"qos_bench: building {', '.join(want)} (release, target dir {TARGET})", True)
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"qos_bench: {' '.join(cmd)} failed:\n{p.stdout}")
    return {b: os.path.join(TARGET, "release", b) for b in want}


class Broker:
    """One `nvmed --emulate --model ...` process on a socket in `dir`."""

    def __init__(self, nvmed, dir, model, queue_depth, grants, size, extra=()):
        self.socket = os.path.join(dir, "nvmed.sock")
        self.admin = os.path.join(dir, "nvmed-admin.sock")
        self.cmd = [nvmed, "--emulate", "--size", size, "--socket", self.socket, "--admin-socket", self.admin,
                    "--socket-mode", "666", "--model", model, "--queue-depth", str(queue_depth),
                    # A uid some cases grant nothing runs on the whole namespace.
                    "--default-access", "read-write"]
        for g in grants:
            self.cmd += ["--grant", g]
        self.cmd += list(extra)
        self.log_path = os.path.join(dir, "nvmed.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.monotonic() + 30
        line = ""
        while "ready" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"qos_bench: nvmed did not start ({' '.join(self.cmd)}):\n{open(self.log_path).read()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def cpu_pressure_us():
    """Total microseconds in which some task waited for a CPU (/proc/pressure/cpu), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


class Pressure:
    """CPU pressure (share of the time some task was waiting for a CPU) over a stretch of time."""

    def __init__(self):
        self.t0, self.p0 = time.monotonic(), cpu_pressure_us()

    def percent(self):
        p1, dt = cpu_pressure_us(), time.monotonic() - self.t0
        if self.p0 is None or p1 is None or dt <= 0:
            return None
        return (p1 - self.p0) / 1e6 / dt * 100


def as_uid(uid):
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return ["runuser", "-u", f"#{uid}", "--"]


class Client:
    """A ringbench run as `uid`, started now; `result()` waits for its JSON report."""

    def __init__(self, rb, broker, uid, args, secs):
        self.uid = uid
        self.cmd = as_uid(uid) + [rb, "--socket", broker.socket, "--runtime", str(secs),
                                  "--output-format", "json"] + args
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {"cmd": self.cmd, "uid": self.uid, "error": f"timed out after {timeout:.0f} s"}
        if self.proc.returncode != 0:
            msg = (err.strip() or out.strip() or f"exit status {self.proc.returncode}").splitlines()[-1]
            return {"cmd": self.cmd, "uid": self.uid, "error": msg}
        try:
            r = json.loads(out)
        except ValueError:
            return {"cmd": self.cmd, "uid": self.uid, "error": f"unparsable output: {out.strip()[:200]}"}
        t = r["total"]
        return {
            "cmd": self.cmd,
            "uid": self.uid,
            "ios": t["ios"],
            "seconds": t["seconds"],
            "iops": t["iops"],
            "mb_s": t["iops"] * r["bs"] / 1e6,
            "bs": r["bs"],
            "latency_ns": t["latency"],
            "broker_cpu": r.get("broker_cpu"),
            "ringbench_cpu": r.get("ringbench_cpu"),
        }


class Sampler:
    """`nvmectl top --json --interval 1` in the background: per-second, per-session counters."""

    def __init__(self, nvmectl, broker, interval=1.0):
        self.lines = []
        self.proc = None
        if not nvmectl:
            return
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([nvmectl, "--admin-socket", broker.admin, "top", "--json",
                                      "--interval", str(interval)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            # A refresh the broker did not answer ({"error": ...}), or the first one after it
            # (no rates measured: interval_secs null).
            if "error" in d or d.get("interval_secs") is None:
                continue
            self.lines.append({
                "t": time.monotonic() - self.t0,
                "cpu_pressure_us": cpu_pressure_us(),
                "interval_s": d["interval_secs"],
                "sessions": [{"id": s["id"], "uid": s["uid"], "command": s.get("command"), "iops": s["iops"],
                              "read_mb_s": s["read_mb_s"], "write_mb_s": s["write_mb_s"]}
                             for s in d["sessions"]],
            })

    def stop(self):
        if not self.proc:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=5)
        err = self.proc.stderr.read().strip()
        if not self.lines and err:
            log(f"qos_bench: nvmectl top: {err.splitlines()[-1]}")
        return self.lines


def ringbench_sessions(line):
    # ringbench opens a second, short session after its run (to read the broker's I/O thread
    # counters); it does no I/O. Only ringbench's sessions count here, nvmectl has none.
    return [s for s in line["sessions"] if s.get("command") in (None, "ringbench")]


def steady_seconds(lines, uids):
    """The sampled seconds in which every uid of `uids` ran for the whole second: each uid's
    session is in this sample and in the previous one (so it started before the second began)
    and in the next one with I/O (so it had not stopped within it). Returns [(line, {uid: s})]."""
    def by_uid(line):
        d = {}
        for s in ringbench_sessions(line):
            if s["uid"] in uids and (s["uid"] not in d or s["iops"] > d[s["uid"]]["iops"]):
                d[s["uid"]] = s
        return d

    out = []
    for i in range(1, len(lines) - 1):
        prev, cur, nxt = by_uid(lines[i - 1]), by_uid(lines[i]), by_uid(lines[i + 1])
        if all(u in prev and u in cur and u in nxt and nxt[u]["iops"] > 0 and prev[u]["id"] == cur[u]["id"]
               for u in uids):
            out.append((lines[i], cur))
    return out


def second_pressure(lines, line):
    """CPU pressure (%) over the sampled second ending at `line`."""
    i = lines.index(line)
    p0, p1 = lines[i - 1].get("cpu_pressure_us"), line.get("cpu_pressure_us")
    if i == 0 or p0 is None or p1 is None:
        return None
    return (p1 - p0) / 1e6 / (line["t"] - lines[i - 1]["t"]) * 100


# ---------------------------------------------------------------------------------------------
# The three parts.

def part1(env, a):
    uid_r, uid_w = a.uids
    reader = ["--rw", "randread", "--bs", "4k", "--iodepth", "1"]
    writer = ["--rw", "randwrite", "--bs", "128k", "--iodepth", "256"]
    ccap = ["--contended-queue-kib", str(a.contended_kib)]
    cases = [
        ("alone", "reader alone", [], False, []),
        ("equal", "+ writer, equal weights", [], True, []),
        ("w4", "+ writer, reader weight 4", [f"{uid_r}:1:weight=4"], True, []),
        ("ccap", f"+ writer, --contended-queue-kib {a.contended_kib}, equal weights", [], True, ccap),
        ("ccap4", f"+ writer, --contended-queue-kib {a.contended_kib}, reader weight 4",
         [f"{uid_r}:1:weight=4"], True, ccap),
        ("qd", f"+ writer capped at qd={a.writer_qd} (informative)", [f"{uid_w}:1:qd={a.writer_qd}"], True, []),
        ("cap", f"+ writer capped at write-mbps={a.writer_cap_mbps} (informative)",
         [f"{uid_w}:1:write-mbps={a.writer_cap_mbps}"], True, []),
        ("alone2", "reader alone, again (noise check)", [], False, []),
    ]
    rows = []
    for key, label, grants, with_writer, extra in cases:
        log(f"  part 1: {label} ({a.latency_secs} s)", True)
        b = env.broker(grants, extra)
        try:
            w = None
            pressure = Pressure()
            if with_writer:
                w = Client(env.rb, b, uid_w, writer, a.latency_secs + 2 * a.settle_secs)
                time.sleep(a.settle_secs)
            r = Client(env.rb, b, uid_r, reader, a.latency_secs).result(a.latency_secs * 5 + 60)
            wr = w.result(a.latency_secs * 5 + 60) if w else None
            cpu = pressure.percent()
        finally:
            b.stop()
        rows.append({"case": key, "label": label, "grants": grants, "reader": r, "writer": wr,
                     "cpu_pressure_pct": cpu})
    return {"cases": rows}


def part2(env, a):
    uid = a.uids[0]
    cases = [
        ("iops", f"iops={fmt_si(a.iops_limit)}", a.iops_limit, "IOPS",
         ["--rw", "randread", "--bs", "4k", "--iodepth", "32"]),
        ("read-mbps", f"read-mbps={a.read_mbps_limit}", a.read_mbps_limit, "MB/s",
         ["--rw", "randread", "--bs", "128k", "--iodepth", "32"]),
    ]
    rows = []
    for key, grant, limit, unit, args in cases:
        log(f"  part 2: {grant}, {' '.join(args)} ({a.secs} s)", True)
        b = env.broker([f"{uid}:1:{grant}"])
        try:
            s = Sampler(env.nvmectl, b)
            time.sleep(0.3)
            pressure = Pressure()
            r = Client(env.rb, b, uid, args, a.secs).result(a.secs * 5 + 60)
            cpu = pressure.percent()
            time.sleep(1.2)
            lines = s.stop()
        finally:
            b.stop()
        per_sec, per_sec_cpu = None, None
        if lines is not None:
            per_sec, per_sec_cpu = [], []
            for line, by in steady_seconds(lines, [uid]):
                x = by[uid]
                per_sec.append(x["iops"] if unit == "IOPS" else x["read_mb_s"])
                per_sec_cpu.append(second_pressure(lines, line))
        measured = None
        if "error" not in r:
            measured = r["iops"] if unit == "IOPS" else r["mb_s"]
        rows.append({"case": key, "grant": f"{uid}:1:{grant}", "limit": limit, "unit": unit, "args": args,
                     "client": r, "measured": measured, "per_second": per_sec,
                     "per_second_cpu_pressure_pct": per_sec_cpu, "cpu_pressure_pct": cpu, "samples": lines})
    return {"cases": rows}


def part3(env, a):
    ua, ub = a.uids
    args = ["--rw", "randread", "--bs", "4k", "--iodepth", "64"]
    log(f"  part 3: weights 1 and 3, QD64 4 KiB reads ({a.secs} s)", True)
    b = env.broker([f"{ua}:1:weight=1", f"{ub}:1:weight=3"])
    try:
        s = Sampler(env.nvmectl, b)
        time.sleep(0.3)
        pressure = Pressure()
        ca = Client(env.rb, b, ua, args, a.secs)
        cb = Client(env.rb, b, ub, args, a.secs)
        ra, rb_ = ca.result(a.secs * 5 + 60), cb.result(a.secs * 5 + 60)
        cpu = pressure.percent()
        time.sleep(1.2)
        lines = s.stop()
    finally:
        b.stop()
    per_sec = None
    if lines is not None:
        per_sec = []
        for line, by in steady_seconds(lines, [ua, ub]):
            per_sec.append({"t": line["t"], "interval_s": line["interval_s"],
                            "iops": {str(ua): by[ua]["iops"], str(ub): by[ub]["iops"]},
                            "cpu_pressure_pct": second_pressure(lines, line)})
    return {"uids": [ua, ub], "weights": [1, 3], "args": args, "clients": [ra, rb_], "per_second": per_sec,
            "cpu_pressure_pct": cpu, "samples": lines}


class Env:
    def __init__(self, a, bins, tmp):
        self.a, self.tmp = a, tmp
        self.nvmed, self.nvmectl = bins["nvmed"], bins.get("nvmectl")
        # The clients run as other uids: ringbench must be executable by them, wherever it was built.
        self.rb = os.path.join(tmp, "ringbench")
        shutil.copy(bins["ringbench"], self.rb)
        os.chmod(self.rb, 0o755)
        self.root_rb = bins["ringbench"]

    def broker(self, grants, extra=()):
        return Broker(self.nvmed, self.tmp, self.a.model, self.a.queue_depth, grants, self.a.size,
                      self.a.nvmed_args.split() + list(extra))


# ---------------------------------------------------------------------------------------------
# Report.

def fmt_si(n):
    n = float(n)
    if n >= 1e6 and n % 1e6 == 0:
        return f"{n / 1e6:.0f}m"
    if n >= 1e3 and n % 1e3 == 0:
        return f"{n / 1e3:.0f}k"
    return f"{n:g}"


def us(ns):
    return f"{ns / 1e3:.0f} us" if ns >= 1e5 else f"{ns / 1e3:.1f} us"


PRESSURE_NOTE = ("CPU pressure: share of the time some task on the machine waited for a CPU "
                 "(/proc/pressure/cpu, this benchmark's own threads included)")


def pct(v):
    return "n/a" if v is None else f"{v:.0f} %"


def verdict(ok):
    return "PASS" if ok else "**MISS**"


def summarize(state):
    """Derived figures and verdicts (also stored in the JSON)."""
    s = {}
    if "part1" in state:
        cases = {c["case"]: c for c in state["part1"]["cases"]}
        alone = cases.get("alone", {}).get("reader", {})
        for c in state["part1"]["cases"]:
            r = c["reader"]
            if "error" in r or "error" in alone:
                c["ratio_p99"] = c["ratio_p50"] = None
                continue
            c["ratio_p99"] = r["latency_ns"]["p99_ns"] / alone["latency_ns"]["p99_ns"]
            c["ratio_p50"] = r["latency_ns"]["p50_ns"] / alone["latency_ns"]["p50_ns"]
        s["part1"] = {c["case"]: c["ratio_p99"] for c in state["part1"]["cases"]}
    if "part2" in state:
        s["part2"] = {}
        for c in state["part2"]["cases"]:
            c["error_pct"] = None if c["measured"] is None else (c["measured"] / c["limit"] - 1) * 100
            ps = c.get("per_second") or []
            c["per_second_error_pct"] = [(v / c["limit"] - 1) * 100 for v in ps]
            s["part2"][c["case"]] = c["error_pct"]
    if "part3" in state:
        p = state["part3"]
        ua, ub = (str(u) for u in p["uids"])
        ra, rb = p["clients"]
        p["share_totals"] = None
        if "error" not in ra and "error" not in rb and ra["ios"] + rb["ios"] > 0:
            p["share_totals"] = ra["ios"] / (ra["ios"] + rb["ios"])
        p["share_steady"] = None
        if p.get("per_second"):
            na = sum(x["iops"][ua] * x["interval_s"] for x in p["per_second"])
            nb = sum(x["iops"][ub] * x["interval_s"] for x in p["per_second"])
            if na + nb > 0:
                p["share_steady"] = na / (na + nb)
        s["part3"] = {"share_steady": p["share_steady"], "share_totals": p["share_totals"]}
    return s


def report(state, svg_path, json_path):
    summarize(state)
    a = state["args"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        m = state["machine"]
        print(f"machine: {m['cores']} cores, {m['cpu']}, kernel {m['kernel']}, load {' '.join(m['load_before'])} "
              f"before ({' '.join(m['load_after'])} after)")
        print(f"machine state: {sb.pingpong_text(state['pingpong'])} (ringbench --pingpong 1)")
        print(f"device: nvmed --emulate --model {a['model']} --queue-depth {a['queue_depth']}; "
              f"tenants uid {a['uids'][0]} (A) and uid {a['uids'][1]} (B), clients ringbench as those uids")
        print()
        if "part1" in state:
            part1_table(state["part1"], a)
        if "part2" in state:
            part2_table(state["part2"], a)
        if "part3" in state:
            part3_table(state["part3"], a)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(state, f, indent=2)
    draw_svg(svg_path, state)
    sys.stdout.write(out.getvalue())
    print(f"chart: {svg_path}")
    if json_path:
        print(f"raw results: {json_path}")


def part1_table(p, a):
    print(f"1. latency isolation: QD1 4 KiB random reader (uid A) beside a QD256 128 KiB random writer "
          f"(uid B), {a['latency_secs']} s each; goal p99 with writer <= 2x alone")
    print()
    print("| case | reader p50 | reader p99 | reader p99.9 | reader IOPS | writer MB/s | CPU pressure | "
          "p50 / p50 alone | p99 / p99 alone | goal (p99) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in p["cases"]:
        r, w = c["reader"], c["writer"]
        if "error" in r:
            print(f"| {c['label']} | err: {r['error']} | | | | | | | | |")
            continue
        lat = r["latency_ns"]
        wcell = "-" if w is None else (f"err: {w['error']}" if "error" in w else f"{w['mb_s']:.0f}")
        if c["case"] == "alone":
            r50, ratio, goal = "1.00x", "1.00x", "(baseline)"
        elif c["ratio_p99"] is None:
            r50, ratio, goal = "n/a", "n/a", "n/a"
        else:
            r50, ratio = f"{c['ratio_p50']:.2f}x", f"{c['ratio_p99']:.2f}x"
            goal = verdict(c["ratio_p99"] <= 2.0)
            if c["case"] in ("qd", "cap"):
                goal = "(" + goal.strip("*") + ", informative)"
            elif c["case"] == "alone2":
                goal = "(noise check)"
        print(f"| {c['label']} | {us(lat['p50_ns'])} | {us(lat['p99_ns'])} | {us(lat['p99_9_ns'])} | "
              f"{r['iops']:.0f} | {wcell} | {pct(c.get('cpu_pressure_pct'))} | {r50} | {ratio} | {goal} |")
    print()
    print(PRESSURE_NOTE)
    print()


def part2_table(p, a):
    print(f"2. limit accuracy: uid A alone with one limit, {a['secs']} s at QD32; goal measured within 5 % "
          "of the limit")
    print()
    print("| grant | workload | limit | measured (ringbench) | error | each second (broker) | worst second "
          "| CPU pressure | goal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in p["cases"]:
        wl = f"{c['args'][1]} {c['args'][3]} QD{c['args'][5]}"
        if c["measured"] is None:
            print(f"| `{c['grant']}` | {wl} | | err: {c['client'].get('error')} | | | | | |")
            continue
        ps = c.get("per_second")
        fmt = (lambda v: f"{v:.0f}") if c["unit"] == "IOPS" else (lambda v: f"{v:.1f}")
        each = ", ".join(fmt(v) for v in ps) if ps else "n/a"
        worst = max(c["per_second_error_pct"], key=abs) if ps else None
        worst_s = f"{worst:+.1f} %" if worst is not None else "n/a"
        print(f"| `{c['grant']}` | {wl} | {fmt(c['limit'])} {c['unit']} | {fmt(c['measured'])} {c['unit']} | "
              f"{c['error_pct']:+.1f} % | {each} | {worst_s} | {pct(c.get('cpu_pressure_pct'))} | "
              f"{verdict(abs(c['error_pct']) <= 5)} |")
    print()
    for c in p["cases"]:
        ps = c.get("per_second_cpu_pressure_pct")
        if ps:
            print(f"CPU pressure each second of `{c['grant']}`: " + ", ".join(pct(v) for v in ps))
    print(PRESSURE_NOTE)
    print()


def part3_table(p, a):
    ua, ub = p["uids"]
    print(f"3. weights: uid A weight 1, uid B weight 3, both QD64 4 KiB random reads for {a['secs']} s; "
          "goal A's share of completed I/O 25 % +- 5 points")
    print()
    print("| measured over | uid A (weight 1) | uid B (weight 3) | A's share | B / A | goal |")
    print("|---|---|---|---|---|---|")
    ra, rb = p["clients"]
    if p.get("per_second"):
        n = len(p["per_second"])
        ia = sum(x["iops"][str(ua)] for x in p["per_second"]) / n
        ib = sum(x["iops"][str(ub)] for x in p["per_second"]) / n
        sh = p["share_steady"]
        print(f"| {n} whole seconds both ran (broker counters) | {ia:.0f} IOPS | {ib:.0f} IOPS | {sh * 100:.1f} % | "
              f"{ib / ia if ia else float('inf'):.2f}x | {verdict(abs(sh - 0.25) <= 0.05)} |")
    if p["share_totals"] is not None:
        sh = p["share_totals"]
        print(f"| ringbench totals ({ra['seconds']:.1f} s, {rb['seconds']:.1f} s) | {ra['iops']:.0f} IOPS | "
              f"{rb['iops']:.0f} IOPS | {sh * 100:.1f} % | {rb['ios'] / ra['ios'] if ra['ios'] else float('inf'):.2f}x | "
              f"{verdict(abs(sh - 0.25) <= 0.05)} |")
    else:
        print(f"| ringbench totals | {ra.get('error', '')} | {rb.get('error', '')} | | | |")
    print()
    if p.get("per_second"):
        print("uid A's share each second: " + ", ".join(
            f"{x['iops'][str(ua)] / (x['iops'][str(ua)] + x['iops'][str(ub)]) * 100:.1f} %"
            for x in p["per_second"] if x["iops"][str(ua)] + x["iops"][str(ub)] > 0))
    print(f"CPU pressure over the run: {pct(p.get('cpu_pressure_pct'))}")
    print()


# ---------------------------------------------------------------------------------------------
# SVG: three panels stacked (hand-written, in scale_bench.py's style).

C_A, C_B, C_GOAL = "#1f77b4", "#d62728", "#2ca02c"


def log_ticks(lo, hi):
    """Decades and their 2x, 5x between lo and hi (log axis)."""
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo * 0.9999 <= v <= hi * 1.0001:
                ticks.append(v)
        e += 1
    return ticks


def panel_frame(out, x0, y0, pw, ph, title, ylabel):
    out.append(f'<text x="{x0}" y="{y0 - 12}" font-size="14" font-weight="bold">{sx.escape(title)}</text>')
    out.append(f'<g stroke="black" stroke-width="1.2" fill="none"><line x1="{x0}" y1="{y0 + ph}" '
               f'x2="{x0 + pw}" y2="{y0 + ph}"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + ph}"/></g>')
    out.append(f'<text transform="translate({x0 - 58} {y0 + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{sx.escape(ylabel)}</text>')


def y_grid(out, x0, y0, pw, ph, ticks, Y, label):
    out.append('<g stroke="#ddd" stroke-width="1">')
    for v in ticks:
        out.append(f'<line x1="{x0}" y1="{Y(v):.1f}" x2="{x0 + pw}" y2="{Y(v):.1f}"/>')
    out.append('</g><g text-anchor="end">')
    for v in ticks:
        out.append(f'<line x1="{x0 - 5}" y1="{Y(v):.1f}" x2="{x0}" y2="{Y(v):.1f}" stroke="black"/>')
        out.append(f'<text x="{x0 - 8}" y="{Y(v) + 4:.1f}">{label(v)}</text>')
    out.append("</g>")


def legend(out, x, y, items):
    for i, (name, color, kind) in enumerate(items):
        yy = y + 18 * i
        if kind == "bar":
            out.append(f'<rect x="{x}" y="{yy - 6}" width="14" height="10" fill="{color}"/>')
        elif kind == "band":
            out.append(f'<rect x="{x}" y="{yy - 6}" width="14" height="10" fill="{color}" fill-opacity="0.15" '
                       f'stroke="{color}" stroke-dasharray="3,2"/>')
        elif kind == "dash":
            out.append(f'<line x1="{x - 4}" y1="{yy - 1}" x2="{x + 18}" y2="{yy - 1}" stroke="{color}" '
                       'stroke-width="1.5" stroke-dasharray="6,4"/>')
        else:
            out.append(f'<line x1="{x - 4}" y1="{yy - 1}" x2="{x + 18}" y2="{yy - 1}" stroke="{color}" stroke-width="2"/>')
            out.append(sb.marker(kind, x + 7, yy - 1, color, None))
        out.append(f'<text x="{x + 24}" y="{yy + 3}" font-size="11">{sx.escape(name)}</text>')


def draw_part1(out, p, x0, y0, pw, ph):
    panel_frame(out, x0, y0, pw, ph, "1. latency isolation: QD1 4 KiB reader, QD256 128 KiB writer beside it",
                "reader latency, us (log)")
    cases = [c for c in p["cases"] if "error" not in c["reader"]]
    vals = [c["reader"]["latency_ns"][k] / 1e3 for c in cases for k in ("p50_ns", "p99_ns")]
    if not vals:
        out.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph / 2}" text-anchor="middle">no data</text>')
        return
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals) * 1.05))
    Y = lambda v: y0 + ph - (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph  # noqa: E731
    y_grid(out, x0, y0, pw, ph, log_ticks(lo, hi), Y, lambda v: f"{v:g}")
    alone = next((c for c in cases if c["case"] == "alone"), None)
    if alone:
        v = alone["reader"]["latency_ns"]["p99_ns"] / 1e3 * 2
        out.append(f'<line x1="{x0}" y1="{Y(v):.1f}" x2="{x0 + pw}" y2="{Y(v):.1f}" stroke="{C_GOAL}" '
                   f'stroke-width="1.5" stroke-dasharray="6,4"><title>goal: 2x p99 alone = {v:.0f} us</title></line>')
    gw = pw / len(cases)
    bw = min(46, gw / 3)
    short = {"alone": ("reader", "alone"), "equal": ("+ writer,", "equal weights"),
             "w4": ("+ writer,", "reader weight 4"), "qd": ("+ writer,", "its qd capped"),
             "cap": ("+ writer,", "its MB/s capped"), "alone2": ("reader", "alone again"),
             "ccap": ("+ writer, cap", "equal weights"), "ccap4": ("+ writer, cap", "reader weight 4")}
    for i, c in enumerate(cases):
        cx = x0 + gw * (i + 0.5)
        for j, (k, color) in enumerate((("p50_ns", C_A), ("p99_ns", C_B))):
            v = c["reader"]["latency_ns"][k] / 1e3
            bx = cx - bw + j * bw
            out.append(f'<rect x="{bx:.1f}" y="{Y(v):.1f}" width="{bw - 2:.1f}" height="{y0 + ph - Y(v):.1f}" '
                       f'fill="{color}"><title>{sx.escape(c["label"])}: {k[:3]} {v:.0f} us</title></rect>')
            out.append(f'<text x="{bx + (bw - 2) / 2:.1f}" y="{Y(v) - 4:.1f}" text-anchor="middle" font-size="10">'
                       f'{v:.0f}</text>')
        lines = list(short.get(c["case"], (c["case"], "")))
        if c.get("ratio_p99") is not None and c["case"] != "alone":
            lines.append(f"p99 {c['ratio_p99']:.2f}x")
        for n, text in enumerate(lines):
            bold = ' font-weight="bold"' if n == 2 else ""
            out.append(f'<text x="{cx:.1f}" y="{y0 + ph + 16 + 14 * n}" text-anchor="middle" font-size="11"{bold}>'
                       f'{sx.escape(text)}</text>')
    legend(out, x0 + pw + 20, y0 + 10, [("reader p50", C_A, "bar"), ("reader p99", C_B, "bar"),
                                       ("goal: 2x p99 alone", C_GOAL, "dash")])


def draw_part2(out, p, x0, y0, pw, ph):
    panel_frame(out, x0, y0, pw, ph, "2. limit accuracy: each whole second, measured / limit (broker counters)",
                "measured / limit, %")
    series = [(c, c.get("per_second_error_pct") or []) for c in p["cases"]]
    vals = [100 + e for _, es in series for e in es] + [c["measured"] / c["limit"] * 100 for c in p["cases"]
                                                       if c["measured"] is not None]
    lo = min([90.0] + [math.floor(v / 5) * 5 for v in vals])
    hi = max([110.0] + [math.ceil(v / 5) * 5 for v in vals])
    Y = lambda v: y0 + ph - (v - lo) / (hi - lo) * ph  # noqa: E731
    step = 5 if hi - lo <= 40 else 10 if hi - lo <= 80 else 25
    y_grid(out, x0, y0, pw, ph, [v for v in range(int(lo), int(hi) + 1) if v % step == 0], Y, lambda v: f"{v}")
    out.append(f'<rect x="{x0}" y="{Y(105):.1f}" width="{pw}" height="{Y(95) - Y(105):.1f}" fill="{C_GOAL}" '
               f'fill-opacity="0.12" stroke="{C_GOAL}" stroke-dasharray="3,2"><title>goal: within 5 %</title></rect>')
    n = max([len(es) for _, es in series] + [1])
    X = lambda i: x0 + (i + 0.5) / n * pw  # noqa: E731
    for i in range(n):
        out.append(f'<text x="{X(i):.1f}" y="{y0 + ph + 18}" text-anchor="middle" font-size="11">{i + 1}</text>')
    out.append(f'<text x="{x0 + pw / 2:.1f}" y="{y0 + ph + 36}" text-anchor="middle">second (whole seconds '
               'of the run)</text>')
    items = []
    for (c, es), color, mk in zip(series, (C_A, C_B), ("circle", "square")):
        name = f"{c['grant'].split(':', 2)[2]}, {c['args'][3]}"
        if c["measured"] is not None:
            name += f": {c['measured'] / c['limit'] * 100:.1f} % overall"
        items.append((name, color, mk))
        if not es:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{X(i):.1f},{Y(100 + e):.1f}" for i, e in enumerate(es))
        out.append(f'<g><title>{sx.escape(name)}</title><path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, e in enumerate(es):
            out.append(sb.marker(mk, X(i), Y(100 + e), color, f"second {i + 1}: {100 + e:.1f} %"))
        out.append("</g>")
    items.append(("goal: 95-105 %", C_GOAL, "band"))
    legend(out, x0 + pw + 20, y0 + 10, items)


def draw_part3(out, p, x0, y0, pw, ph):
    ua, ub = (str(u) for u in p["uids"])
    panel_frame(out, x0, y0, pw, ph, "3. weights 1 : 3, both QD64 4 KiB reads: each tenant's IOPS per second",
                "completed I/O per second")
    ps = p.get("per_second") or []
    if not ps:
        out.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph / 2}" text-anchor="middle">no per-second data '
                   '(no nvmectl)</text>')
        return
    tot = [x["iops"][ua] + x["iops"][ub] for x in ps]
    ymax, ystep = sb.nice_ceiling(max(tot))
    Y = lambda v: y0 + ph - v / ymax * ph  # noqa: E731
    y_grid(out, x0, y0, pw, ph, [i * ystep for i in range(int(round(ymax / ystep)) + 1)], Y,
           lambda v: sb.fmt_tick(v / 1e3, ystep / 1e3) + "k" if v else "0")
    n = len(ps)
    gw = pw / n
    bw = min(40, gw * 0.7)
    for i, x in enumerate(ps):
        cx = x0 + gw * (i + 0.5)
        a, b = x["iops"][ua], x["iops"][ub]
        out.append(f'<rect x="{cx - bw / 2:.1f}" y="{Y(a):.1f}" width="{bw:.1f}" height="{y0 + ph - Y(a):.1f}" '
                   f'fill="{C_A}"><title>second {i + 1}: uid {ua} {a:.0f} IOPS</title></rect>')
        out.append(f'<rect x="{cx - bw / 2:.1f}" y="{Y(a + b):.1f}" width="{bw:.1f}" height="{Y(a) - Y(a + b):.1f}" '
                   f'fill="{C_B}"><title>second {i + 1}: uid {ub} {b:.0f} IOPS</title></rect>')
        share = a / (a + b) * 100 if a + b else 0
        out.append(f'<text x="{cx:.1f}" y="{Y(a) - 4:.1f}" text-anchor="middle" font-size="10" fill="white">'
                   f'{share:.0f}%</text>')
        out.append(f'<text x="{cx:.1f}" y="{y0 + ph + 18}" text-anchor="middle" font-size="11">{i + 1}</text>')
        # Where a 25 % share would end.
        g = Y((a + b) * 0.25)
        out.append(f'<line x1="{cx - bw / 2 - 3:.1f}" y1="{g:.1f}" x2="{cx + bw / 2 + 3:.1f}" y2="{g:.1f}" '
                   f'stroke="{C_GOAL}" stroke-width="2"/>')
    out.append(f'<text x="{x0 + pw / 2:.1f}" y="{y0 + ph + 36}" text-anchor="middle">second (whole seconds both ran)'
               '</text>')
    sh = p.get("share_steady")
    legend(out, x0 + pw + 20, y0 + 10, [
        (f"uid {ua}, weight 1" + (f": {sh * 100:.1f} %" if sh is not None else ""), C_A, "bar"),
        (f"uid {ub}, weight 3" + (f": {(1 - sh) * 100:.1f} %" if sh is not None else ""), C_B, "bar"),
        ("goal: 25 % for weight 1", C_GOAL, "line")])


def draw_svg(path, state):
    a = state["args"]
    parts = [k for k in ("part1", "part2", "part3") if k in state]
    W, left, right, top, ph, gap = 1000, 90, 270, 80, 240, 110
    pw = W - left - right
    H = top + len(parts) * (ph + gap) - 20
    pp = state["pingpong"].get("pingpong_round_trip_ns_median")
    sub = (f"nvmed --model {a['model']} --queue-depth {a['queue_depth']}; {state['machine']['cores']} cores"
           + (f", ping-pong {pp:.0f} ns" if pp else "") + f", {state['date'][:16].replace('T', ' ')}")
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2:.1f}" y="26" text-anchor="middle" font-size="16" font-weight="bold">'
        'nvmed: QoS between tenants on a modelled device</text>',
        f'<text x="{W / 2:.1f}" y="46" text-anchor="middle" fill="#555">{sx.escape(sub)}</text>',
    ]
    draw = {"part1": draw_part1, "part2": draw_part2, "part3": draw_part3}
    for i, k in enumerate(parts):
        draw[k](out, state[k], left, top + i * (ph + gap), pw, ph)
    out.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--nvmed", help="nvmed binary (default: cargo build --release)")
    ap.add_argument("--ringbench", help="ringbench binary (default: cargo build --release)")
    ap.add_argument("--nvmectl", help="nvmectl binary, for per-second figures (default: beside --nvmed, "
                    "else cargo build --release; 'none' to go without)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"nvmed --model spec (default {DEFAULT_MODEL})")
    ap.add_argument("--queue-depth", type=int, default=32, help="device queue entries (default 32)")
    ap.add_argument("--size", default="256M", help="emulated namespace size (default 256M)")
    ap.add_argument("--nvmed-args", default="", help="extra nvmed arguments for every broker (e.g. '--poll-idle-us 1000')")
    ap.add_argument("--uids", type=sb.int_list, default=[1000, 1001], help="the two tenants' uids (default 1000,1001)")
    ap.add_argument("--parts", type=sb.int_list, default=[1, 2, 3], help="parts to run (default 1,2,3)")
    ap.add_argument("--latency-secs", type=float, default=5.0, help="reader run of each part-1 case (default 5)")
    ap.add_argument("--settle-secs", type=float, default=1.0,
                    help="part 1: the writer runs this long before the reader starts (and after it ends)")
    ap.add_argument("--secs", type=float, default=10.0, help="runs of parts 2 and 3 (default 10)")
    ap.add_argument("--iops-limit", type=int, default=5000, help="part 2 iops grant (default 5000)")
    ap.add_argument("--read-mbps-limit", type=int, default=100, help="part 2 read-mbps grant (default 100)")
    ap.add_argument("--writer-qd", type=int, default=2,
                    help="part 1, informative case: the writer's qd grant (default 2)")
    ap.add_argument("--contended-kib", type=int, default=256,
                    help="part 1: the --contended-queue-kib of the two capped cases (default 256)")
    ap.add_argument("--writer-cap-mbps", type=int, default=100,
                    help="part 1, last case: the writer's write-mbps grant (default 100)")
    ap.add_argument("--svg", default=os.path.join(TARGET, "qos.svg"), help="chart (default <cargo target dir>/qos.svg)")
    ap.add_argument("--json", default=os.path.join(TARGET, "qos.json"),
                    help="raw results (default <cargo target dir>/qos.json)")
    ap.add_argument("--replot", metavar="JSON", help="measure nothing: print the tables and draw --svg from a --json dump")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a = ap.parse_args()
    global QUIET
    QUIET = a.quiet
    if a.replot:
        with open(a.replot) as f:
            report(json.load(f), a.svg, None)
        return
    if len(a.uids) != 2:
        sys.exit("qos_bench: --uids takes two uids")
    if os.geteuid() != 0:
        sys.exit("qos_bench: needs root, to run the clients as the tenants' uids (--uids)")
    report(measure(a), a.svg, a.json)


def measure(a):
    want = [b for b in ("nvmed", "ringbench") if not getattr(a, b)]
    nvmectl = a.nvmectl
    if nvmectl is None and a.nvmed:
        beside = os.path.join(os.path.dirname(os.path.abspath(a.nvmed)), "nvmectl")
        nvmectl = beside if os.path.exists(beside) else None
        if nvmectl is None:
            want.append("nvmectl")
    elif nvmectl is None:
        want.append("nvmectl")
    bins = build(want) if want else {}
    bins.setdefault("nvmed", a.nvmed)
    bins.setdefault("ringbench", a.ringbench)
    bins.setdefault("nvmectl", None if nvmectl == "none" else nvmectl)
    for k, v in bins.items():
        if v and not os.path.exists(v):
            sys.exit(f"qos_bench: no {k} at {v}")
        if v:
            bins[k] = os.path.abspath(v)
    if not bins["nvmectl"]:
        log("qos_bench: no nvmectl: totals only, no per-second figures")

    machine = {
        "cores": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "kernel": platform.release(),
        "load_before": open("/proc/loadavg").read().split()[:3],
    }
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    pp = sb.pingpong(bins["ringbench"], 1)
    log(f"qos_bench: {sb.pingpong_text(pp)}", True)
    tmp = tempfile.mkdtemp(prefix="nvmed-qos.", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    state = {"date": date, "machine": machine, "pingpong": pp,
             "args": {"model": a.model, "queue_depth": a.queue_depth, "uids": a.uids, "secs": a.secs,
                      "latency_secs": a.latency_secs, "settle_secs": a.settle_secs, "size": a.size,
                      "nvmed_args": a.nvmed_args},
             "binaries": bins}
    try:
        # Traversable by the tenants' uids (their sockets and their ringbench live here).
        os.chmod(tmp, 0o755)
        env = Env(a, bins, tmp)
        if 1 in a.parts:
            state["part1"] = part1(env, a)
        if 2 in a.parts:
            state["part2"] = part2(env, a)
        if 3 in a.parts:
            state["part3"] = part3(env, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine["load_after"] = open("/proc/loadavg").read().split()[:3]
    return state


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
