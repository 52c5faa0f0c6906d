#!/usr/bin/env python3
"""Host side of `vmtest/vhost.sh --bench`: runs the benchmark guest (the QEMU command after --),
follows its console (each run's result line carries the guest's interrupt count of that
disk's virtio device, printed as interrupts per I/O), samples each backend's CPU time (utime + stime of /proc/PID/stat, all
threads) between the guest's `VHOSTBENCH BEGIN <disk>` and `VHOSTBENCH RESULT <disk> ...` lines,
and prints A and B side by side: IOPS, ratio, backend CPU seconds and CPU per I/O."""

import argparse
import os
import signal
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / TICK  # fields 14 and 15: utime, stime
    except (OSError, IndexError, ValueError):
        return float("nan")


def backend_counters(pid, log_path):
    """Asks nvmed-vhost (SIGUSR1) for its stats line and returns its counters (None if no line
    came within a second)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = f.tell()
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return None
    deadline = time.time() + 1.0
    while time.time() < deadline:
        with open(log_path, "rb") as f:
            f.seek(start)
            # Whole lines only: the backend may be writing the stats line right now.
            for line in f.read().decode(errors="replace").split("\n")[:-1]:
                if line.startswith("nvmed-vhost stats:"):
                    kvs = (kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
                    return {k: int(v) for k, v in kvs if v.isdigit()}
        time.sleep(0.02)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--a", required=True, help="backend of column A (qsd or nvmed-vhost)")
    ap.add_argument("--b", default="qsd", help="backend of column B (qsd or nvmed-vhost)")
    ap.add_argument("--secs", type=float, default=0, help="seconds per run (for interrupts per I/O)")
    ap.add_argument("--pids", action="append", default=[], help="DISK=PID[,PID] (backend, then broker)")
    ap.add_argument("--stats-log", action="append", default=[],
                    help="DISK=PATH: nvmed-vhost's log (its counters are asked for at each run's start and end)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    pids = {}
    for p in args.pids:
        disk, ids = p.split("=", 1)
        pids[disk] = [int(x) for x in ids.split(",")]

    stats_logs = dict(p.split("=", 1) for p in args.stats_log)
    results = {}  # (rw, qd, queues) -> side -> dict
    begin = {}
    failures = []
    t0 = time.time()
    with open(args.log, "w") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            log.write(line + "\n")
            line = line.split("Booting from ROM..")[-1]  # SeaBIOS's last words share a line
            w = line.split()
            if line.startswith("VHOSTBENCH BEGIN"):
                d = w[2]
                k0 = backend_counters(pids[d][0], stats_logs[d]) if d in stats_logs else None
                begin[d] = (time.time(), [cpu_seconds(p) for p in pids.get(d, [])], k0)
            elif line.startswith("VHOSTBENCH RESULT"):
                d, rw, qd, qs, iops = w[2], w[3], int(w[4]), int(w[5]), float(w[6])
                irqs = int(w[7]) if len(w) > 7 else None
                t_begin, c0, k0 = begin.pop(d)
                c1 = [cpu_seconds(p) for p in pids.get(d, [])]
                k1 = backend_counters(pids[d][0], stats_logs[d]) if d in stats_logs else None
                counters = None
                if k0 and k1 and k1.get("requests", 0) > k0.get("requests", 0):
                    n = k1["requests"] - k0["requests"]
                    counters = {k: (k1[k] - k0.get(k, 0)) / n for k in ("kicks", "completion_wakeups", "notifications") if k in k1}
                    if "busy_us" in k1:
                        counters["busy_per_io"] = (k1["busy_us"] - k0.get("busy_us", 0)) / n
                    if "busy_us" in k1 and args.secs:
                        counters["util"] = (k1["busy_us"] - k0.get("busy_us", 0)) / (args.secs * 1e6 * qs)
                r = {"iops": iops, "wall": time.time() - t_begin, "cpu": [b - a for a, b in zip(c0, c1)], "irqs": irqs, "counters": counters}
                results.setdefault((rw, qd, qs), {}).setdefault(d[0], []).append(r)
                print(f"  guest: {d} {rw} QD{qd} {qs}q {iops:.0f} IOPS", flush=True)
            elif line.startswith("VHOSTBENCH DISK"):
                print(f"  guest: {' '.join(w[2:])}", flush=True)
            elif "VHOSTTEST FAIL" in line or "Kernel panic" in line:
                failures.append(line)
                print(f"  guest: {line}", flush=True)
        rc = proc.wait()
    print(f"  (guest ran {time.time() - t0:.0f} s, qemu exit {rc}; console: {args.log})")

    def name(kind):
        return "nvmed-vhost (nvmed --emulate, memory)" if kind == "nvmed-vhost" else "qemu-storage-daemon, raw file on tmpfs"
    print(f"  A = {name(args.a)}; B = {name(args.b)}")
    print("  CPU = the backend process's CPU seconds during the run"
          + (" (nvmed-vhost + nvmed broker)" if "nvmed-vhost" in (args.a, args.b) else ""))

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    def summary(runs):
        """Median IOPS (and its spread), median CPU seconds and CPU per I/O over the rounds."""
        iops = median([r["iops"] for r in runs])
        cpu = median([sum(r["cpu"]) for r in runs])
        per_io = median([sum(r["cpu"]) / (r["iops"] * r["wall"]) * 1e6 if r["iops"] else float("nan") for r in runs])
        irq = ""
        if args.secs and all(r.get("irqs") is not None and r["iops"] for r in runs):
            irq = f", {median([r['irqs'] / (r['iops'] * args.secs) for r in runs]):.2f} irq/IO"
        if all(r.get("counters") for r in runs):
            c = {k: median([r["counters"][k] for r in runs]) for k in runs[0]["counters"]}
            irq += (f", per I/O {c.get('kicks', 0):.2f} kicks, {c.get('completion_wakeups', 0):.2f} nvmed wakeups,"
                    f" {c.get('notifications', 0):.2f} notifications")
            if "util" in c:
                irq += (f", requests at the backend {100 * c['util']:.0f}% of the time per queue"
                        f" ({c['busy_per_io']:.1f} us per I/O)")
        spread = f" ({min(r['iops'] for r in runs):.0f}-{max(r['iops'] for r in runs):.0f})" if len(runs) > 1 else ""
        parts = ""
        if len(runs[0]["cpu"]) > 1:
            parts = " (" + "+".join(f"{median([r['cpu'][i] for r in runs]):.2f}" for i in range(len(runs[0]["cpu"]))) + ")"
        return iops, per_io, f"{iops:6.0f} IOPS{spread}, cpu {cpu:5.2f} s{parts} {per_io:6.1f} us/IO{irq}"

    rounds = max((len(v) for sides in results.values() for v in sides.values()), default=0)
    if rounds > 1:
        print(f"  each figure: the median of {rounds} runs, A and B alternating (the range in brackets)")
    for key in sorted(results, key=lambda k: (k[0], k[1], k[2])):
        rw, qd, qs = key
        sides = results[key]
        if "a" not in sides or "b" not in sides:
            continue
        ia, pa, ta = summary(sides["a"])
        ib, pb, tb = summary(sides["b"])
        ratio = ia / ib if ib else float("nan")
        cratio = pa / pb if pb else float("nan")
        label = f"QD{qd}" if qs == 1 else f"2x QD{qd}"
        print(f"  {rw:<9} {label:<8} {qs} queue{'s' if qs > 1 else ' '}  A {ta} | B {tb} | "
              f"A/B IOPS x{ratio:.2f}, CPU/IO x{cratio:.2f}")
    if rc != 0 or failures or not results:
        print("  the benchmark guest failed" + (": " + "; ".join(failures) if failures else ""))
        sys.exit(1)


if __name__ == "__main__":
    main()
