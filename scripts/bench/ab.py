#!/usr/bin/env python3
"""A/B of hasync builds in one sitting, two-filesystem layout (needs root).

    scripts/bench/ab.py initial --rounds 3 OLD_EXE NEW_EXE
    scripts/bench/ab.py lag --rate 1000 --seconds 8 --rounds 2 OLD_EXE NEW_EXE

`initial`: one 20,000-message fixture; per round, each build in turn syncs it
to a fresh pair and replica (files/s, each daemon's CPU, how busy the whole
machine was); before each run the page cache is dropped and the fixture read
back, so every run starts from the same cache. `lag`: per round and build, a
fresh pair over a 2,000-message store takes paced Maildir deliveries (CPU per
message, context switches per message of each daemon, the engine's lag
percentiles). Builds alternate within a round, so a drift of the machine
shows in both. Medians per build at the end. Copies of target/release/hasync
make the builds (scripts/bench.sh rebuilds that path on every run).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hb  # noqa: E402


def machine_busy() -> tuple[int, int]:
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)


def ctx_switches(pid: int) -> int:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            for line in open(path):
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def initial(a, run: Path, side: list[Path], exes: list[Path]) -> None:
    fx = side[0] / "fixture"
    subprocess.run([str(exes[0]), "fixture", "--out", str(fx), "--messages", str(a.messages),
                    "--mailboxes", str(max(50, a.messages // 100)), "--seed", "1"],
                   check=True, capture_output=True)
    files, _ = hb.count_tree(fx)
    res: dict[str, list] = {e.name: [] for e in exes}
    for r in range(a.rounds):
        for i, exe in enumerate(exes):
            hb.settle(warm=fx)
            name = f"initial-{r}-{i}"
            pair = hb.Pair(exe, run / name, [{"mail": fx}, {"mail": side[1] / name}],
                           roots=[side[0] / "pairs" / name, side[1] / "pairs" / name])
            b0 = machine_busy()
            t0 = time.monotonic()
            pair.start()
            p, s = pair.nodes
            while True:
                st = p.try_status()
                if st and st["replication"]["phase"] == "streaming":
                    st1 = s.try_status()
                    if st1 and st1["replication"]["files_landed"] >= files:
                        break
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"{exe}: no initial sync in 600 s\n{p.log_tail()}")
                time.sleep(0.01)
            secs = time.monotonic() - t0
            b1 = machine_busy()
            cpu_p, cpu_s = p.cpu_s(), s.cpu_s()
            pair.stop()
            busy = (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * (os.cpu_count() or 1)
            shutil.rmtree(side[1] / name, ignore_errors=True)
            shutil.rmtree(side[1] / "pairs" / name, ignore_errors=True)
            res[exe.name].append((files / secs, cpu_p, cpu_s))
            print(f"{exe.name} round {r}: {files / secs:,.0f} files/s; CPU s primary {cpu_p:.2f}, secondary "
                  f"{cpu_s:.2f} = {(cpu_p + cpu_s) / files * 1000:.3f} per 1,000 files; machine {busy:.2f} cores busy",
                  flush=True)
    for name, v in res.items():
        print(f"{name}: median {median([x[0] for x in v]):,.0f} files/s, "
              f"{median([(x[1] + x[2]) / files * 1000 for x in v]):.3f} CPU s per 1,000 files "
              f"(secondary {median([x[2] for x in v]):.2f} s)")


def lag(a, run: Path, side: list[Path], exes: list[Path]) -> None:
    res: dict[str, list] = {e.name: [] for e in exes}
    for r in range(a.rounds):
        for i, exe in enumerate(exes):
            name = f"lag-{r}-{i}"
            store = side[0] / name
            subprocess.run([str(exe), "fixture", "--out", str(store), "--messages", "2000", "--mailboxes", "50",
                            "--seed", "7"], check=True, capture_output=True)
            pair = hb.Pair(exe, run / name, [{"mail": store}, {"mail": side[1] / name}],
                           roots=[side[0] / "pairs" / name, side[1] / "pairs" / name])
            subprocess.run(["sync"], check=True)
            pair.start()
            pair.wait_formed()
            p, s = pair.nodes
            t0 = time.monotonic()
            while True:
                st = p.try_status()
                if st and st["replication"]["phase"] == "streaming":
                    break
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"{exe}: not streaming in 600 s\n{p.log_tail()}")
                time.sleep(0.02)
            cx0 = [ctx_switches(n.pid) for n in pair.nodes]
            cpu0 = [n.cpu_s() for n in pair.nodes]
            d = hb.paced_delivery(hb.maildirs(store), a.rate, a.seconds, seed=a.rate)
            rep = hb.wait_drained(p, d["messages"], 60.0, f"{exe.name} at {a.rate}/s")
            cpu = [n.cpu_s() - c for n, c in zip(pair.nodes, cpu0)]
            cx = [ctx_switches(n.pid) - c for n, c in zip(pair.nodes, cx0)]
            pair.stop()
            for gone in (store, side[1] / name, side[0] / "pairs" / name, side[1] / "pairs" / name):
                shutil.rmtree(gone, ignore_errors=True)
            n = max(1, d["messages"])
            res[exe.name].append((sum(cpu) / n * 1000, cx[1] / n, rep["lag_ms_p50"], rep["lag_ms_p99"]))
            print(f"{exe.name} round {r}: {d['achieved_per_s']:.0f}/s achieved (writer CPU {d['writer_cpu_s']:.2f} s); "
                  f"CPU s primary {cpu[0]:.2f}, secondary {cpu[1]:.2f} = {sum(cpu) / n * 1000:.3f} per 1,000 msgs; "
                  f"context switches per msg primary {cx[0] / n:.1f}, secondary {cx[1] / n:.1f}; "
                  f"lag p50 {rep['lag_ms_p50']} p99 {rep['lag_ms_p99']} max {rep['lag_ms_max']} ms", flush=True)
    for name, v in res.items():
        print(f"{name}: median {median([x[0] for x in v]):.3f} CPU s per 1,000 msgs, "
              f"{median([x[1] for x in v]):.1f} context switches per msg on the secondary, "
              f"lag p50 {median([x[2] for x in v])} p99 {median([x[3] for x in v])} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["initial", "lag"])
    ap.add_argument("exes", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20000, help="initial: fixture messages")
    ap.add_argument("--rate", type=int, default=1000, help="lag: deliveries per second")
    ap.add_argument("--seconds", type=float, default=8.0, help="lag: seconds of deliveries")
    a = ap.parse_args()
    exes = [e.resolve() for e in a.exes]
    if len({e.name for e in exes}) != len(exes):
        sys.exit("ab.py: give the builds different file names (they label the results)")
    target = Path(__file__).resolve().parents[2] / "target"
    target.mkdir(exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="hasync-ab-", dir=target))
    hb.set_pidfile(run / "pids")
    fs = None
    try:
        fs = hb.TwoFilesystems(run, (8, 24))
        if not fs.direct_io:
            print("ab.py: the loop devices run WITHOUT direct I/O (the kernel refused it)", flush=True)
        (initial if a.what == "initial" else lag)(a, run, list(fs.mounts), exes)
    finally:
        hb.stop_all()
        if fs is not None:
            fs.close()
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
