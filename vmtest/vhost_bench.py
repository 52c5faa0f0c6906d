#!/usr/bin/env python3
"""Host side of `vmtest/vhost.sh --bench`: runs the benchmark guest (the QEMU command after --),
follows its console, samples each backend's CPU time (utime + stime of /proc/PID/stat, all
threads) between the guest's `VHOSTBENCH BEGIN <disk>` and `VHOSTBENCH RESULT <disk> ...` lines,
and prints A and B side by side: IOPS, ratio, backend CPU seconds and CPU per I/O."""

import argparse
import os
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--a", required=True, help="backend of column A (qsd or nvmed-vhost)")
    ap.add_argument("--pids", action="append", default=[], help="DISK=PID[,PID] (backend, then broker)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    pids = {}
    for p in args.pids:
        disk, ids = p.split("=", 1)
        pids[disk] = [int(x) for x in ids.split(",")]

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
                begin[d] = (time.time(), [cpu_seconds(p) for p in pids.get(d, [])])
            elif line.startswith("VHOSTBENCH RESULT"):
                d, rw, qd, qs, iops = w[2], w[3], int(w[4]), int(w[5]), float(w[6])
                t_begin, c0 = begin.pop(d)
                c1 = [cpu_seconds(p) for p in pids.get(d, [])]
                r = {"iops": iops, "wall": time.time() - t_begin, "cpu": [b - a for a, b in zip(c0, c1)]}
                results.setdefault((rw, qd, qs), {}).setdefault(d[0], []).append(r)
                print(f"  guest: {d} {rw} QD{qd} {qs}q {iops:.0f} IOPS", flush=True)
            elif line.startswith("VHOSTBENCH DISK"):
                print(f"  guest: {' '.join(w[2:])}", flush=True)
            elif "VHOSTTEST FAIL" in line or "Kernel panic" in line:
                failures.append(line)
                print(f"  guest: {line}", flush=True)
        rc = proc.wait()
    print(f"  (guest ran {time.time() - t0:.0f} s, qemu exit {rc}; console: {args.log})")

    name_a = "nvmed-vhost (nvmed --emulate, memory)" if args.a == "nvmed-vhost" else "qsd (stand-in for nvmed-vhost)"
    print(f"  A = {name_a}; B = qemu-storage-daemon, raw file on tmpfs")
    print("  CPU = the backend process's CPU seconds during the run"
          + (" (nvmed-vhost + nvmed broker)" if args.a == "nvmed-vhost" else ""))

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    def summary(runs):
        """Median IOPS (and its spread), median CPU seconds and CPU per I/O over the rounds."""
        iops = median([r["iops"] for r in runs])
        cpu = median([sum(r["cpu"]) for r in runs])
        per_io = median([sum(r["cpu"]) / (r["iops"] * r["wall"]) * 1e6 if r["iops"] else float("nan") for r in runs])
        spread = f" ({min(r['iops'] for r in runs):.0f}-{max(r['iops'] for r in runs):.0f})" if len(runs) > 1 else ""
        parts = ""
        if len(runs[0]["cpu"]) > 1:
            parts = " (" + "+".join(f"{median([r['cpu'][i] for r in runs]):.2f}" for i in range(len(runs[0]["cpu"]))) + ")"
        return iops, per_io, f"{iops:6.0f} IOPS{spread}, cpu {cpu:5.2f} s{parts} {per_io:6.1f} us/IO"

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
