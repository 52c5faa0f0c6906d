#!/usr/bin/env python3
"""Soak test (not part of CI): mixed verified I/O from changing clients while the broker is
killed and restarted and faults are injected, for a long time (default 30 minutes).

    python3 scripts/soak.py [--minutes 30] [--clients 4] [--seed N] [--debug]

Each client is a `ringbench --verify` run on its own 8 MiB region (so concurrent clients never
write each other's blocks), lasting 5 to 20 s; new ones replace those that end. At random times
the soak SIGKILLs a client (it is expected to die; a new one takes its region, which it writes
before it reads), or SIGKILLs the broker and starts it again on the same backing file with new
injected faults (hang, stuck, fatal, retry, delay: faults the broker recovers from). A client
that was not killed must exit 0: no I/O error, no data mismatch, and it must finish (a client
still running 60 s past its runtime is a hang). Prints totals and every failure; exits 1 on any.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGION_MIB = 8


def build(debug):
    profile = [] if debug else ["--release"]
    subprocess.run(["cargo", "build", "-q", *profile, "-p", "nvmed-server", "--bin", "nvmed",
                    "-p", "ringbench", "--bin", "ringbench"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    out = os.path.join(target, "debug" if debug else "release")
    return os.path.join(out, "nvmed"), os.path.join(out, "ringbench")


class Broker:
    def __init__(self, nvmed, workdir, size_mib, rng):
        self.nvmed, self.workdir, self.size_mib, self.rng = nvmed, workdir, size_mib, rng
        self.socket = os.path.join(workdir, "nvmed.sock")
        self.proc = None
        self.faults = []

    def start(self):
        # Faults the broker recovers from, somewhere in the next few thousand commands.
        kinds = ["hang", "stuck", "fatal", "retry", "delay"]
        self.faults = []
        for _ in range(self.rng.randint(0, 3)):
            k = self.rng.choice(kinds)
            n = self.rng.randint(100, 20000)
            self.faults.append(f"delay:{n}:{self.rng.randint(1, 200)}" if k == "delay" else f"{k}:{n}")
        args = [self.nvmed, "--emulate", "--socket", self.socket, "--socket-mode", "666",
                "--size", f"{self.size_mib}M", "--backing", os.path.join(self.workdir, "disk.img"),
                "--emulator-mode", "async", "--emulator-latency-us", str(self.rng.choice([0, 20, 200])),
                "--io-timeout-ms", "500", "--io-threads", str(self.rng.choice([1, 2]))]
        for f in self.faults:
            args += ["--inject", f]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(os.path.join(self.workdir, "nvmed.log"), "a"),
                                     env=dict(os.environ, NVMED_LOG="warn"))
        line = self.proc.stdout.readline().decode()
        if "ready" not in line:
            raise RuntimeError(f"nvmed did not start: {line!r}")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()


class Client:
    def __init__(self, ringbench, socket, region, rng, workdir, n):
        self.region = region
        self.runtime = rng.randint(5, 20)
        self.out = os.path.join(workdir, f"client-{n}.json")
        self.err = os.path.join(workdir, f"client-{n}.err")
        args = [ringbench, "--socket", socket, "--rw", "randrw", "--bs", rng.choice(["4k", "16k", "64k"]),
                "--iodepth", str(rng.choice([1, 4, 16])), "--numjobs", str(rng.choice([1, 2])),
                "--offset", f"{region * REGION_MIB}M", "--size", f"{REGION_MIB}M",
                "--runtime", str(self.runtime), "--verify", "--output-format", "json"]
        self.started = time.monotonic()
        self.killed = False
        self.proc = subprocess.Popen(args, stdout=open(self.out, "w"), stderr=open(self.err, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--debug", action="store_true", help="debug binaries (quicker to build)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    nvmed, ringbench = build(a.debug)
    workdir = tempfile.mkdtemp(prefix="nvmed-soak-")
    broker = Broker(nvmed, workdir, a.clients * REGION_MIB, rng)
    broker.start()
    totals = dict(clients=0, ok=0, killed=0, broker_restarts=0, reconnects=0, ios=0, verified_reads=0,
                  faults=len(broker.faults))
    failures = []
    clients = {}
    quarantine = {}
    n = 0
    end = time.monotonic() + a.minutes * 60
    print(f"soak: seed {a.seed}, {a.minutes} min, {a.clients} clients, in {workdir}", flush=True)
    next_report = time.monotonic() + 60
    while time.monotonic() < end or clients:
        # Fill the free regions while the soak lasts (a killed client's region waits until what
        # it left at the device surely drained: aborts and retries included).
        for region in range(a.clients):
            if region not in clients and time.monotonic() < end and quarantine.get(region, 0) < time.monotonic():
                n += 1
                clients[region] = Client(ringbench, broker.socket, region, rng, workdir, n)
                totals["clients"] += 1
        # Reap the ended ones.
        for region, c in list(clients.items()):
            rc = c.proc.poll()
            if rc is None:
                if time.monotonic() - c.started > c.runtime + 60:
                    failures.append(f"client {c.out}: still running {c.runtime + 60} s after it started (hang)")
                    c.proc.kill()
                    c.proc.wait()
                    del clients[region]
                continue
            del clients[region]
            if c.killed:
                totals["killed"] += 1
                quarantine[region] = time.monotonic() + 10
            elif rc != 0:
                failures.append(f"client {c.out}: exit {rc}: {open(c.err).read().strip()[-500:]}")
            else:
                totals["ok"] += 1
                r = json.load(open(c.out))
                totals["ios"] += r["total"]["ios"]
                totals["verified_reads"] += r["total"]["verified_reads"]
                totals["reconnects"] += r["reconnects"]
        # Chaos, now and then.
        if time.monotonic() < end:
            roll = rng.random()
            if roll < 0.003 and clients:
                victim = rng.choice(list(clients.values()))
                victim.killed = True
                victim.proc.send_signal(signal.SIGKILL)
            elif roll < 0.007:
                broker.kill9()
                time.sleep(rng.choice([0, 0.1, 0.5, 2]))
                broker.start()
                totals["broker_restarts"] += 1
                totals["faults"] += len(broker.faults)
        if time.monotonic() > next_report:
            next_report += 60
            print(f"soak: {totals} failures={len(failures)}", flush=True)
        time.sleep(0.1)
    broker.proc.send_signal(signal.SIGTERM)
    broker.proc.wait()
    print(f"soak: done: {totals}")
    for f in failures:
        print(f"soak: FAILURE {f}")
    print(f"soak: {len(failures)} failures (seed {a.seed}; logs in {workdir})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
