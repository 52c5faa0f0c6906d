#!/usr/bin/env python3
"""Client scaling of nvmed's broker: throughput for 1..64 clients with 1 and 2 broker I/O threads.

Runs `ringbench --embedded` (the broker in-process on an emulated controller) for each point:

  nop       --null --engine nvmed-nop --iodepth QD           (rings and broker only, no device)
  randread  --size 256M --rw randread --bs 4k --iodepth QD   (memory-backed emulated namespace,
                                                              as benchmark 2 of scripts/bench.sh)
  nop-deep  --null --engine nvmed-nop --iodepth DEEP         (the client side made cheap: deep
                                                              batches, one submit per reaped batch)

for every client count (--numjobs) and broker I/O thread count (--io-threads, when ringbench
has it; otherwise only the 1-thread column is measured, without the flag, and the others print
n/a). Points are run client count by client count, every series and thread count of one client
count next to each other in time, so the 2-thread / 1-thread ratios compare neighbours.

Prints the machine state (cross-core ping-pong before and after the runs), a Markdown table,
the ratios the goals need (64 clients / best single-client figure, goal >= 0.9; 2 threads /
1 thread, goal >= 1.0), writes the raw results as JSON (--json) and draws an SVG line chart
(--svg). Python standard library only. Nothing is asserted: machines are noisy.

  python3 scripts/scale_bench.py                      # 2 s per point (about 2.5 minutes)
  python3 scripts/scale_bench.py --secs 0.5 --clients 1,4,16
"""

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import xml.sax.saxutils as sx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
if not os.path.isabs(TARGET):
    TARGET = os.path.join(REPO, TARGET)

# Series: key -> (label, ringbench arguments without --numjobs/--runtime/--io-threads).
def series_defs(args):
    return [
        ("nop", f"nop QD{args.iodepth}",
         ["--embedded", "--null", "--engine", "nvmed-nop", "--iodepth", str(args.iodepth)]),
        ("randread", f"randread QD{args.iodepth}",
         ["--embedded", "--size", args.size, "--rw", "randread", "--bs", "4k",
          "--iodepth", str(args.iodepth)]),
        ("nop-deep", f"nop QD{args.deep_iodepth} deep",
         ["--embedded", "--null", "--engine", "nvmed-nop", "--iodepth", str(args.deep_iodepth)]),
    ]


QUIET = False


def log(msg, progress=False):
    if not (progress and QUIET):
        print(msg, file=sys.stderr, flush=True)


def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {s!r}")
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"need positive integers: {s!r}")
    return v


def build_ringbench():
    log(f"scale_bench: building ringbench (release, target dir {TARGET})", True)
    cmd = ["cargo", "build", "--release", "-p", "ringbench", "--bin", "ringbench"]
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"scale_bench: {' '.join(cmd)} failed:\n{p.stdout}")
    return os.path.join(TARGET, "release", "ringbench")


def ringbench_help(rb):
    p = subprocess.run([rb, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"scale_bench: {rb} --help failed:\n{p.stdout}")
    return p.stdout


def pingpong(rb, secs):
    p = subprocess.run([rb, "--pingpong", str(secs), "--output-format", "json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()}
    try:
        return json.loads(p.stdout)
    except ValueError:
        return {"error": f"unparsable: {p.stdout.strip()[:200]}"}


def pingpong_text(pp):
    if "error" in pp:
        return f"ping-pong failed: {pp['error']}"
    return (f"cross-core ping-pong (CPU 0 <-> CPU 1) round trip median "
            f"{pp['pingpong_round_trip_ns_median']:.0f} ns, best {pp['pingpong_round_trip_ns_min']:.0f} ns")


def run_point(rb, base, clients, threads, has_io_threads, secs, extra, timeout):
    cmd = [rb] + base + ["--numjobs", str(clients), "--runtime", str(secs), "--output-format", "json"]
    if has_io_threads:
        cmd += ["--io-threads", str(threads)]
    cmd += extra
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"cmd": cmd, "error": f"timed out after {timeout:.0f} s"}
    wall = time.monotonic() - t0
    if p.returncode != 0:
        err = (p.stderr.strip() or p.stdout.strip() or f"exit status {p.returncode}").splitlines()[-1]
        return {"cmd": cmd, "error": err.removeprefix("ringbench: "), "wall_s": wall}
    try:
        r = json.loads(p.stdout)
    except ValueError:
        return {"cmd": cmd, "error": f"unparsable output: {p.stdout.strip()[:200]}", "wall_s": wall}
    t = r["total"]
    return {
        "cmd": cmd,
        "iops": t["iops"],
        "ios": t["ios"],
        "seconds": t["seconds"],
        "mean_ns": t["latency"]["mean_ns"],
        "p99_ns": t["latency"]["p99_ns"],
        "broker_cpu": r.get("broker_cpu"),
        "ringbench_cpu": r.get("ringbench_cpu"),
        "wall_s": wall,
        # The rest of ringbench's report (per-I/O-thread counters and the like), without the
        # per-job lines.
        "report": {k: v for k, v in r.items() if k not in ("jobs", "total")},
    }


def median_point(runs):
    ok = [r for r in runs if "iops" in r]
    if not ok:
        return dict(runs[-1])
    m = statistics.median(r["iops"] for r in ok)
    return {"iops": m, "runs": runs, "iops_all": [r["iops"] for r in ok]}


def fmt_mops(v):
    return f"{v / 1e6:.2f}" if v >= 1e5 else f"{v / 1e6:.3f}"


def cell(res):
    if res is None:
        return "n/a"
    if "iops" not in res:
        return "err"
    return fmt_mops(res["iops"])


def ratio(a, b):
    if a is None or b is None or "iops" not in a or "iops" not in b or b["iops"] <= 0:
        return None
    return a["iops"] / b["iops"]


def fmt_ratio(x, goal=None):
    if x is None:
        return "n/a"
    s = f"{x:.2f}x"
    if goal is not None:
        s += " (met)" if x >= goal else " (not met)"
    return s


# ---------------------------------------------------------------------------------------------
# SVG chart (hand-written: axes, log2 x-axis of clients, y in M ops/s, one line per series).

COLORS = {"nop": "#1f77b4", "randread": "#d62728", "nop-deep": "#2ca02c"}
DASHES = {1: "", 2: "7,4", 3: "2,3", 4: "9,3,2,3"}
MARKERS = {1: "circle", 2: "square"}


def nice_ceiling(v):
    if v <= 0:
        return 1.0, 0.2
    exp = math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        top = m * 10 ** exp
        if top >= v * 1.02:
            break
    for step_m in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5):
        step = step_m * 10 ** exp
        if top / step <= 8:
            return top, step
    return top, top / 5


def fmt_tick(v, step):
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10 ** decimals != round(step * 10 ** decimals):
        decimals += 1
    return f"{v:.{decimals}f}"


def draw_svg(path, clients, threads, sdefs, results, title, subtitle):
    W, H = 940, 560
    left, right, top, bottom = 80, 290, 70, 70
    pw, ph = W - left - right, H - top - bottom
    vals = [r["iops"] / 1e6 for r in results.values() if r and "iops" in r]
    ymax, ystep = nice_ceiling(max(vals) if vals else 1.0)
    xs = sorted(set(clients))
    lo, hi = math.log2(xs[0]), math.log2(xs[-1])
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1

    def X(c):
        return left + (math.log2(c) - lo) / (hi - lo) * pw

    def Y(v):
        return top + ph - v / ymax * ph

    e = sx.escape
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
        f'<text x="{left + pw / 2:.1f}" y="26" text-anchor="middle" font-size="16" font-weight="bold">{e(title)}</text>',
        f'<text x="{left + pw / 2:.1f}" y="46" text-anchor="middle" fill="#555">{e(subtitle)}</text>',
        '<g stroke="#ddd" stroke-width="1">',
    ]
    n = int(round(ymax / ystep))
    for i in range(n + 1):
        y = Y(i * ystep)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>')
    for c in xs:
        out.append(f'<line x1="{X(c):.1f}" y1="{top}" x2="{X(c):.1f}" y2="{top + ph}"/>')
    out.append("</g>")
    # Axes, ticks, labels.
    out.append(f'<g stroke="black" stroke-width="1.2" fill="none">'
               f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/></g>')
    out.append('<g text-anchor="end">')
    for i in range(n + 1):
        v = i * ystep
        out.append(f'<line x1="{left - 5}" y1="{Y(v):.1f}" x2="{left}" y2="{Y(v):.1f}" stroke="black"/>')
        out.append(f'<text x="{left - 8}" y="{Y(v) + 4:.1f}">{fmt_tick(v, ystep)}</text>')
    out.append("</g>")
    out.append('<g text-anchor="middle">')
    for c in xs:
        out.append(f'<line x1="{X(c):.1f}" y1="{top + ph}" x2="{X(c):.1f}" y2="{top + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{X(c):.1f}" y="{top + ph + 20}">{c}</text>')
    out.append("</g>")
    out.append(f'<text x="{left + pw / 2:.1f}" y="{H - 22}" text-anchor="middle">clients (--numjobs, log2 scale)</text>')
    out.append(f'<text transform="translate(22 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               'throughput, M ops/s</text>')
    # Lines.
    legend = []
    for key, label, _ in sdefs:
        color = COLORS.get(key, "#444")
        for t in threads:
            pts = [(c, results.get((key, c, t))) for c in xs]
            pts = [(c, r["iops"] / 1e6) for c, r in pts if r and "iops" in r]
            if not pts:
                continue
            dash = DASHES.get(t, "4,2")
            da = f' stroke-dasharray="{dash}"' if dash else ""
            name = f"{label}, {t} I/O thread{'s' if t > 1 else ''}"
            out.append(f'<g><title>{e(name)}</title>')
            if len(pts) > 1:
                d = " ".join(f"{'M' if i == 0 else 'L'}{X(c):.1f},{Y(v):.1f}" for i, (c, v) in enumerate(pts))
                out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{da}/>')
            for c, v in pts:
                out.append(marker(MARKERS.get(t, "circle"), X(c), Y(v), color, f"{c} clients: {v:.3f} M ops/s"))
            out.append("</g>")
            legend.append((name, color, da, MARKERS.get(t, "circle")))
    # Legend.
    lx, ly = left + pw + 20, top + 10
    out.append(f'<g><rect x="{lx - 8}" y="{ly - 14}" width="{right - 24}" height="{22 * len(legend) + 12}" '
               'fill="white" stroke="#bbb"/>')
    for i, (name, color, da, mk) in enumerate(legend):
        y = ly + 22 * i
        out.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 30}" y2="{y}" stroke="{color}" stroke-width="2"{da}/>')
        out.append(marker(mk, lx + 15, y, color, None))
        out.append(f'<text x="{lx + 38}" y="{y + 4}" font-size="11">{e(name)}</text>')
    out.append("</g>")
    if not legend:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" text-anchor="middle">no data</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def marker(kind, x, y, color, tip):
    t = f"<title>{sx.escape(tip)}</title>" if tip else ""
    if kind == "square":
        return f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{color}">{t}</rect>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">{t}</circle>'


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--secs", type=float, default=2.0, help="seconds per point (default 2)")
    ap.add_argument("--clients", type=int_list, default=[1, 2, 4, 8, 16, 32, 64],
                    help="client counts (--numjobs), comma-separated (default 1,2,4,8,16,32,64)")
    ap.add_argument("--threads", type=int_list, default=[1, 2],
                    help="broker I/O thread counts (--io-threads), comma-separated (default 1,2)")
    ap.add_argument("--ringbench", help="ringbench binary (default: cargo build --release, then "
                    "$CARGO_TARGET_DIR/release/ringbench or target/release/ringbench)")
    ap.add_argument("--iodepth", type=int, default=32, help="per-client depth of the nop and randread series (default 32)")
    ap.add_argument("--deep-iodepth", type=int, default=256,
                    help="per-client depth of the deep-batch nop series (default 256)")
    ap.add_argument("--no-deep", action="store_true", help="skip the deep-batch nop series")
    ap.add_argument("--series", help="comma-separated subset of nop,randread,nop-deep")
    ap.add_argument("--size", default="256M", help="randread range (ringbench --size, default 256M)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per point; the median is kept (default 1)")
    ap.add_argument("--extra", default="", help="extra ringbench arguments for every point (e.g. '--sessions')")
    ap.add_argument("--svg", default=os.path.join(TARGET, "scale.svg"),
                    help="SVG chart path (default: <cargo target dir>/scale.svg)")
    ap.add_argument("--json", default=os.path.join(TARGET, "scale.json"),
                    help="raw results path (default: <cargo target dir>/scale.json)")
    ap.add_argument("--pingpong-secs", type=float, default=0.5, help="ping-pong length (default 0.5)")
    ap.add_argument("--replot", metavar="JSON",
                    help="measure nothing: print the tables and draw --svg from an earlier --json dump")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-point progress lines on stderr")
    args = ap.parse_args()
    global QUIET
    QUIET = args.quiet
    if args.replot:
        with open(args.replot) as f:
            state = json.load(f)
        report(state, args.svg, None)
    else:
        report(measure(args), args.svg, args.json)


def measure(args):

    rb = args.ringbench or build_ringbench()
    if not os.path.exists(rb):
        sys.exit(f"scale_bench: no ringbench at {rb}")
    help_text = ringbench_help(rb)
    has_io_threads = "--io-threads" in help_text
    has_sessions = "--sessions" in help_text
    extra = args.extra.split()
    sdefs = series_defs(args)
    if args.no_deep:
        sdefs = [s for s in sdefs if s[0] != "nop-deep"]
    if args.series:
        want = args.series.split(",")
        unknown = set(want) - {s[0] for s in sdefs}
        if unknown:
            sys.exit(f"scale_bench: unknown series {','.join(sorted(unknown))}")
        sdefs = [s for s in sdefs if s[0] in want]
    clients, threads = sorted(set(args.clients)), sorted(set(args.threads))
    runnable = [t for t in threads if has_io_threads or t == 1]
    if not has_io_threads:
        log("scale_bench: this ringbench has no --io-threads: measuring the 1-thread column "
            "(its default broker) only, other columns are n/a")

    machine = {
        "cores": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "kernel": platform.release(),
        "load_before": open("/proc/loadavg").read().split()[:3],
    }
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    pp_before = pingpong(rb, args.pingpong_secs)
    n_points = len(clients) * len(sdefs) * len(runnable) * args.repeat
    log(f"scale_bench: {n_points} runs of {args.secs} s (about {n_points * (args.secs + 0.3):.0f} s)", True)

    points = []
    for c in clients:
        for key, label, base in sdefs:
            for t in runnable:
                runs = [run_point(rb, base, c, t, has_io_threads, args.secs, extra, timeout=args.secs * 10 + 60)
                        for _ in range(args.repeat)]
                res = runs[0] if args.repeat == 1 else median_point(runs)
                points.append({"series": key, "clients": c, "io_threads": t, **res})
                shown = f"{res['iops'] / 1e6:.3f} M ops/s" if "iops" in res else f"error: {res['error']}"
                log(f"  {key:<9} {c:>3} clients, {t} I/O thread{'s' if t > 1 else ' '}: {shown}", True)
    pp_after = pingpong(rb, args.pingpong_secs)
    machine["load_after"] = open("/proc/loadavg").read().split()[:3]
    return {
        "date": date,
        "ringbench": rb,
        "ringbench_has_io_threads": has_io_threads,
        "ringbench_has_sessions": has_sessions,
        "secs": args.secs,
        "repeat": args.repeat,
        "iodepth": args.iodepth,
        "deep_iodepth": args.deep_iodepth,
        "extra": extra,
        "machine": machine,
        "pingpong_before": pp_before,
        "pingpong_after": pp_after,
        "series": [{"key": k, "label": l, "args": b} for k, l, b in sdefs],
        "clients": clients,
        "threads": threads,
        "points": points,
    }


def report(state, svg_path, json_path):
    """Prints the tables and ratios, writes the JSON dump (with the ratios) and the SVG chart."""
    sdefs = [(s["key"], s["label"], s["args"]) for s in state["series"]]
    clients, threads = state["clients"], state["threads"]
    results = {(p["series"], p["clients"], p["io_threads"]): p for p in state["points"]}
    machine, extra = state["machine"], state["extra"]
    pp_before, pp_after = state["pingpong_before"], state["pingpong_after"]
    has_io_threads, has_sessions = state["ringbench_has_io_threads"], state["ringbench_has_sessions"]
    secs, repeat = state["secs"], state["repeat"]

    # Report (kept until the files are written, so a closed stdout loses nothing).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print(f"machine: {machine['cores']} cores, {machine['cpu']}, kernel {machine['kernel']}, "
              f"load {' '.join(machine['load_before'])} before ({' '.join(machine['load_after'])} after, "
              "which counts this benchmark's own client threads)")
        print(f"machine state before: {pingpong_text(pp_before)}")
        print(f"machine state after:  {pingpong_text(pp_after)}")
        sess = "one session per client (--sessions)" if "--sessions" in extra else (
            "clients share one session, one ring each" if has_sessions else "one session per client (this ringbench)")
        print(f"each point: one {secs} s run" + (f" (median of {repeat})" if repeat > 1 else "")
              + f" of `ringbench --embedded`, {sess}; throughput in M ops/s"
              + ("" if has_io_threads else "; this ringbench has no --io-threads: 2+ thread columns n/a"))
        spreads = [(max(p["iops_all"]) / min(p["iops_all"]), k, c, t)
                   for (k, c, t), p in results.items() if len(p.get("iops_all", [])) > 1 and min(p["iops_all"]) > 0]
        if spreads:
            w = max(spreads)
            print(f"noise: the runs of one point differed by up to {w[0]:.1f}x (max/min: {w[1]}, {w[2]} clients, "
                  f"{w[3]}T), median {statistics.median(x[0] for x in spreads):.2f}x over all points")
        print()
        hdr = ["clients"]
        for key, label, _ in sdefs:
            for t in threads:
                hdr.append(f"{label}, {t}T")
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for c in clients:
            row = [str(c)]
            for key, _, _ in sdefs:
                for t in threads:
                    row.append(cell(results.get((key, c, t))))
            print("| " + " | ".join(row) + " |")
        print()
        print("series: " + "; ".join(f"{label} = ringbench {' '.join(base)}" for _, label, base in sdefs)
              + "; nT = n broker I/O threads (--io-threads n)")
        print()

        # Ratios.
        ratios = {"scaling": {}, "threads": {}}
        cmax = clients[-1]
        if len(clients) > 1 and clients[0] == 1:
            print(f"{cmax} clients / best single-client figure of the same workload (goal >= 0.9):")
            print()
            print("| workload | " + " | ".join(f"{t}T" for t in threads) + " |")
            print("|---|" + "---|" * len(threads))
            for key, label, _ in sdefs:
                singles = [results.get((key, 1, t)) for t in threads]
                singles = [r for r in singles if r and "iops" in r]
                best = max(singles, key=lambda r: r["iops"]) if singles else None
                row = []
                for t in threads:
                    x = ratio(results.get((key, cmax, t)), best)
                    ratios["scaling"][f"{key}/{t}"] = x
                    row.append(fmt_ratio(x, 0.9))
                print(f"| {label} | " + " | ".join(row) + " |")
            print()
        if len(threads) > 1:
            t1 = threads[0]
            others = threads[1:]
            print(f"{'/'.join(f'{t} threads' for t in others)} / {t1} thread{'s' if t1 > 1 else ''}, per row (goal >= 1.0):")
            print()
            hdr = ["clients"] + [f"{label}, {t}T/{t1}T" for key, label, _ in sdefs for t in others]
            print("| " + " | ".join(hdr) + " |")
            print("|" + "---|" * len(hdr))
            for c in clients:
                row = [str(c)]
                for key, _, _ in sdefs:
                    for t in others:
                        x = ratio(results.get((key, c, t)), results.get((key, c, t1)))
                        ratios["threads"][f"{key}/{c}/{t}"] = x
                        row.append(fmt_ratio(x))
                print("| " + " | ".join(row) + " |")
            print()
        errors = sorted({r["error"] for r in results.values() if r and "error" in r})
        for e in errors:
            print(f"err: {e}")
        if errors:
            print()

    # JSON and SVG.
    state["ratios"] = {k: {str(kk): v for kk, v in d.items()} for k, d in ratios.items()}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(state, f, indent=2)
    pp = pp_before.get("pingpong_round_trip_ns_median")
    subtitle = (f"ringbench --embedded, {secs} s per point, {machine['cores']} cores"
                + (f", ping-pong {pp:.0f} ns" if pp else "")
                + f", {state['date'][:16].replace('T', ' ')}")
    draw_svg(svg_path, clients, threads, sdefs, results, "nvmed: throughput vs clients", subtitle)
    sys.stdout.write(out.getvalue())
    print(f"chart: {svg_path}")
    if json_path:
        print(f"raw results: {json_path}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends quietly
    main()
