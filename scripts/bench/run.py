#!/usr/bin/env python3
"""The measurements of scripts/bench.sh. Writes <out>/raw.json; report.py
turns it into report.json / report.md / report.svg.

Every measurement gets fresh directories under --run-dir; nothing is deleted
until the end (bench.sh's trap), because creating files right after deleting
many is several times slower on ext4 for a while.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hb  # noqa: E402
from hb import drop_caches, log, settle  # noqa: E402


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def touch(paths: list[str], mark: int) -> None:
    """Changes each file's size and mtime (a header-ish line appended), in a
    new mtime second whatever the filesystem's granularity."""
    time.sleep(1.1)
    for path in paths:
        with open(path, "ab") as f:
            f.write(f"X-Bench-Touched: {mark}\r\n".encode())


def children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def version_of(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return " ".join(text[0].split()) if text else None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.exe = Path(args.exe).resolve()
        self.run = Path(args.run_dir).resolve()
        self.out = Path(args.out).resolve()
        self.raw: dict = {
            "mode": "quick" if self.quick else "full",
            "started_unix": time.time(),
            "machine": hb.machine_info() | {"fs": hb.fs_info(self.run)},
            "versions": {
                "hasync": version_of([str(self.exe), "--version"]),
                "hasync_git": version_of(["git", "-C", str(Path(__file__).resolve().parents[2]), "describe", "--always", "--dirty"]),
                "rsync": version_of(["rsync", "--version"]),
                "lsyncd": version_of(["lsyncd", "--version"]) if shutil.which("lsyncd") else None,
            },
            "errors": {},
            "not_measured": [],
            "conditions": {
                "loadavg_start": os.getloadavg()[0],
                "last_cleanup_s_ago": args.last_cleanup_s if args.last_cleanup_s >= 0 else None,
                "leftover_run_dirs": args.leftover_runs,
            },
        }
        self.rsyncd: subprocess.Popen | None = None
        self.rsync_port = 0
        # Layout: each node (and each peer's destination) on a filesystem of
        # its own, or everything on the run directory's filesystem.
        self.layout = args.layout
        self.fs: hb.TwoFilesystems | None = None
        if self.layout == "two-fs":
            # ~30 KB per message at the default median size, a copy on each side.
            big = max(args.scale or [0]) * 30e3 / 2**30
            self.fs = hb.TwoFilesystems(self.run, (int(8 + 1.3 * big), int(24 + 1.3 * big)))
            self.side = list(self.fs.mounts)
        else:
            self.side = [self.run, self.run]
        self.raw["layout"] = self.layout
        self.raw["layout_note"] = (
            "two-fs: the primary's tree and state on one loop-mounted ext4 image, the secondary's "
            "(and rsync's and cp's destinations) on another, both on the run directory's disk "
            + ("(loop devices with direct I/O)" if self.fs.direct_io
               else "(loop devices WITHOUT direct I/O: the kernel refused it; flushes wait for the host's cache)")
            if self.layout == "two-fs" else "shared: both nodes and every destination on one filesystem"
        )
        self.dst = self.side[1] / "dst"
        self.dst.mkdir(parents=True, exist_ok=True)
        self.hwm: dict[str, int] = {}

    # ------------------------------------------------------------------ util

    def pair_roots(self, name: str) -> list[Path]:
        """Each node's state on its own side's filesystem (its internal
        directories must share the filesystem of its tree)."""
        return [self.side[0] / "pairs" / name, self.side[1] / "pairs" / name]

    def close(self) -> None:
        if self.fs is not None:
            self.fs.close()

    def note_hwm(self, scenario: str, pair: hb.Pair) -> None:
        for n in pair.nodes:
            n.sample_hwm()
            key = f"{scenario}.{n.name}"
            self.hwm[key] = max(self.hwm.get(key, 0), n.hwm_kib)

    def step(self, name: str, fn) -> None:
        t0 = time.monotonic()
        log(f"== {name}")
        try:
            fn()
        except Exception as e:  # keep going: report what could be measured
            self.raw["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"!! {name} failed: {e}")
            traceback.print_exc()
        log(f"== {name} took {time.monotonic() - t0:.1f}s")

    # --------------------------------------------------------------- fixture

    def fixture(self) -> None:
        a = self.args
        self.fx = self.side[0] / "fixture"
        t0 = time.monotonic()
        out = subprocess.run(
            [str(self.exe), "fixture", "--out", str(self.fx), "--messages", str(a.messages),
             "--mailboxes", str(a.mailboxes), "--seed", str(a.seed), "--median-size", str(a.median_size)],
            check=True, capture_output=True, text=True,
        )
        gen_s = time.monotonic() - t0
        files, size = hb.count_tree(self.fx)
        self.files, self.bytes = files, size
        self.raw["fixture"] = {
            "messages": a.messages,
            "mailboxes": a.mailboxes,
            "seed": a.seed,
            "median_size_bytes": a.median_size,
            "files": files,
            "bytes": size,
            "generate_s": gen_s,
            "generator_says": out.stdout.strip(),
        }
        log(f"fixture: {files} files, {size / 1e6:.1f} MB in {gen_s:.1f}s")

    # ----------------------------------------------------------- rsync daemon

    def start_rsyncd(self) -> None:
        conf = self.run / "rsyncd.conf"
        self.rsync_port = hb.free_port()
        conf.write_text(
            f"pid file = {self.run}/rsyncd.pid\n"
            f"log file = {self.run}/rsyncd.log\n"
            "use chroot = no\nuid = root\ngid = root\nmax connections = 8\n"
            f"[bench]\n  path = {self.dst}\n  read only = no\n"
        )
        self.rsyncd = hb.track(
            subprocess.Popen(
                ["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
                 f"--port={self.rsync_port}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(self.run / "rsyncd.stderr", "wb"),
            )
        )
        for _ in range(500):
            try:
                with socket.create_connection(("127.0.0.1", self.rsync_port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"rsync daemon did not listen on {self.rsync_port}")

    def rsync_url(self, sub: str) -> str:
        return f"rsync://127.0.0.1:{self.rsync_port}/bench/{sub}/"

    def rsync_once(self, sub: str, fsync: bool, src: Path | None = None) -> dict:
        """`rsync -a [--fsync] SRC/` (the fixture unless given) to the rsync
        daemon's `sub`, timed, with the CPU of both ends."""
        cmd = ["rsync", "-a"] + (["--fsync"] if fsync else []) + [f"{src or self.fx}/", self.rsync_url(sub)]
        d_cpu0 = hb.proc_cpu_s(self.rsyncd.pid, children=True)
        c_cpu0 = children_cpu_s()
        t0 = time.monotonic()
        sh(cmd)
        secs = time.monotonic() - t0
        c_cpu = children_cpu_s() - c_cpu0
        # the daemon reaps its per-connection child asynchronously
        d_cpu = 0.0
        for _ in range(50):
            time.sleep(0.02)
            d_cpu = hb.proc_cpu_s(self.rsyncd.pid, children=True) - d_cpu0
            if d_cpu > 0:
                break
        return {"seconds": secs, "cpu_s": c_cpu + d_cpu, "cmd": " ".join(cmd)}

    # ------------------------------------------------------- initial sync

    def hasync_initial(self, rep: int) -> dict:
        base = self.run / "pairs" / f"initial-{rep}"
        replica = self.dst / f"hasync-{rep}"
        pair = hb.Pair(self.exe, base, [{"mail": self.fx}, {"mail": replica}],
                       roots=self.pair_roots(f"initial-{rep}"))
        t0 = time.monotonic()
        pair.start()
        p, s = pair.nodes
        formed_ms = None
        seen_phases = []
        deadline = t0 + self.args.sync_timeout
        st0 = st1 = None
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(
                    f"hasync initial sync did not finish in {self.args.sync_timeout}s; last primary status "
                    f"{json.dumps(st0 and st0['replication'])[:600]}\n{p.log_tail()}\n{s.log_tail()}"
                )
            if not p.running() or not s.running():
                raise RuntimeError(f"a daemon exited\n{p.log_tail()}\n{s.log_tail()}")
            st0 = p.try_status()
            if st0:
                if formed_ms is None and st0["mode"] == "primary":
                    formed_ms = (time.monotonic() - t0) * 1000
                ph = st0["replication"]["phase"]
                if not seen_phases or seen_phases[-1] != ph:
                    seen_phases.append(ph)
                if ph == "streaming":
                    st1 = s.try_status()
                    if st1 and st1["replication"]["files_landed"] >= self.files:
                        break
            time.sleep(0.01)
        secs = time.monotonic() - t0
        cpu_p, cpu_s = p.cpu_s(), s.cpu_s()
        cpu = cpu_p + cpu_s
        self.note_hwm("initial_sync", pair)
        st0 = p.status()
        st1 = s.status()
        # let the pair track the fixture a little longer, then sample peak RSS again
        time.sleep(1.0 if self.quick else 2.0)
        self.note_hwm("initial_sync", pair)
        engine = None
        m = None
        for m in re.finditer(
            r"initial-sync complete: (\d+) files, ([\d.]+) MB in ([\d.]+)s \((\d+) files/s\)", p.log_text()
        ):
            pass
        if m:
            engine = {"files": int(m.group(1)), "mb": float(m.group(2)), "seconds": float(m.group(3))}
        pair.stop()
        rf, rb = hb.count_tree(replica)
        stage_f, _ = hb.count_tree(replica / ".hasync") if (replica / ".hasync").exists() else (0, 0)
        res = {
            "seconds": secs,
            "cpu_s": cpu,
            "cpu_s_primary": cpu_p,
            "cpu_s_secondary": cpu_s,
            "formed_ms": formed_ms,
            "phases": seen_phases,
            "files_sent": st0["replication"]["files_sent"],
            "content_bytes_sent": st0["replication"]["content_bytes_sent"],
            "files_landed": st1["replication"]["files_landed"],
            "hash_mismatches": st1["replication"]["hash_mismatches"],
            "replica_files": rf - stage_f,
            "replica_bytes": rb,
            "engine": engine,
            "hb_gap_ms_max_secondary": st1["link"]["heartbeat_gap_ms_max"],
            "hb_gap_ms_p99_secondary": st1["link"]["heartbeat_gap_ms_p99"],
            "hb_gap_ms_max_primary": st0["link"]["heartbeat_gap_ms_max"],
            "hwm_kib_primary": p.hwm_kib,
            "hwm_kib_secondary": s.hwm_kib,
            "watches": st0["replication"].get("watches"),
        }
        self.pairs_initial[rep] = pair
        return res

    def cp_once(self, rep: int) -> dict:
        dst = self.dst / f"cp-{rep}"
        c0 = children_cpu_s()
        t0 = time.monotonic()
        sh(["cp", "-a", str(self.fx), str(dst)])
        t_cp = time.monotonic() - t0
        sh(["sync"])
        secs = time.monotonic() - t0
        return {"seconds": secs, "cp_seconds": t_cp, "cpu_s": children_cpu_s() - c0}

    def initial_sync(self) -> None:
        reps = self.args.reps
        self.pairs_initial: dict[int, hb.Pair] = {}
        runs: dict[str, list] = {"hasync": [], "rsync": [], "rsync_fsync": [], "cp_sync": []}
        for rep in range(reps):
            for name in ("hasync", "rsync", "rsync_fsync", "cp_sync"):
                settle(warm=self.fx)
                try:
                    if name == "hasync":
                        r = self.hasync_initial(rep)
                    elif name == "rsync":
                        r = self.rsync_once(f"rsync-{rep}", fsync=False)
                    elif name == "rsync_fsync":
                        r = self.rsync_once(f"rsync-fsync-{rep}", fsync=True)
                    else:
                        r = self.cp_once(rep)
                except Exception as e:
                    self.raw["errors"][f"initial_sync.{name}.{rep}"] = f"{type(e).__name__}: {e}"
                    log(f"!! {name} rep {rep}: {e}")
                    continue
                r["files_per_s"] = self.files / r["seconds"]
                r["mb_per_s"] = self.bytes / r["seconds"] / 1e6
                r["cpu_s_per_1k_files"] = r["cpu_s"] / self.files * 1000
                runs[name].append(r)
                log(f"{name} rep {rep}: {r['seconds']:.2f}s = {r['files_per_s']:.0f} files/s, "
                    f"{r['mb_per_s']:.1f} MB/s, cpu {r['cpu_s_per_1k_files']:.3f} s/1k files")
        self.raw["initial_sync"] = {"files": self.files, "bytes": self.bytes, "reps": reps, "runs": runs}

    # ------------------------------------------------------- 1% incremental

    def incremental(self) -> None:
        """Per round (as many as the initial sync's reps): modify a different
        1% of the message files (append a header-ish line: size and mtime
        change), then rsync into the rsync replicas of rep 0, and restart the
        stopped rep-0 hasync pair (the secondary still holds the previous
        replica: only differences travel). Medians over the rounds."""
        msgs = []
        for dirpath, _dirs, names in os.walk(self.fx):
            for n in names:
                if n != "dovecot-uidlist":
                    msgs.append(os.path.join(dirpath, n))
        msgs.sort()
        rounds = max(1, self.args.reps)
        runs: dict[str, list] = {"rsync": [], "rsync_fsync": [], "hasync": []}
        changed_n = 0
        for rnd in range(rounds):
            changed = msgs[rnd % 100::100]
            changed_n = len(changed)
            touch(changed, 1)
            for name, sub, fsync in (("rsync", "rsync-0", False), ("rsync_fsync", "rsync-fsync-0", True)):
                if not (self.dst / sub).exists():
                    continue
                settle()
                r = self.rsync_once(sub, fsync)
                runs[name].append(r)
                log(f"incremental {name} round {rnd}: {r['seconds']:.2f}s")
            pair = self.pairs_initial.get(0)
            if pair is None:
                continue
            settle()
            p, s = pair.nodes
            t0 = time.monotonic()
            pair.start()
            sent0 = None
            while True:
                if time.monotonic() - t0 > self.args.sync_timeout:
                    raise RuntimeError(f"hasync did not catch up after restart\n{p.log_tail()}\n{s.log_tail()}")
                st = p.try_status()
                if st and st["mode"] == "primary" and st["replication"]["phase"] == "streaming":
                    sent0 = st["replication"]["files_sent"]
                    break
                time.sleep(0.01)
            secs = time.monotonic() - t0
            cpu = p.cpu_s() + s.cpu_s()
            self.note_hwm("incremental", pair)
            pair.stop()
            # Both daemons' logs of the last round, where the restart's time
            # went (`HASYNC_BENCH_LOG=info,hasync=debug` for more).
            for node in (p, s):
                shutil.copyfile(node.log_path, self.out / f"incremental-{node.name}.log")
            runs["hasync"].append({"seconds": secs, "cpu_s": cpu, "files_sent": sent0})
            log(f"incremental hasync round {rnd} (restart + catch-up): {secs:.2f}s, {sent0} files sent")
        inc: dict = {"modified_files": changed_n, "of_files": self.files, "rounds": rounds}
        for name, rs in runs.items():
            if not rs:
                continue
            secs = [r["seconds"] for r in rs]
            med = hb.stats(secs)["median"]
            pick = min(rs, key=lambda r: abs(r["seconds"] - med))
            inc[name] = dict(pick, seconds=med, all_seconds=secs)
        if "hasync" in inc:
            inc["hasync"]["note"] = "restart of both daemons; secondary holds the previous replica"
        self.raw["incremental"] = inc

    # ---------------------------------------------------------------- scale

    def scale(self) -> None:
        """Per tree size (messages): a fresh fixture, the initial sync of a
        fresh pair (files/s, peak RSS of both daemons, inotify watches), then
        1% of the files changed while both daemons are stopped and the
        restart catch-up timed, then another 1% changed and `rsync -a` of the
        tree onto the same replica timed (rsync's catch-up on the same
        trees); then, with the replica deleted, `rsync -a` of the tree into
        a fresh destination (in the two-fs layout a fresh filesystem of its
        own, so that it meets no recently freed inodes), the peer's initial
        sync at that size; fixture and copies deleted before the next size
        (a million messages take about 30 GB per copy). The page cache is
        dropped before each timed part."""
        out: dict = {}
        if self.rsyncd is None:
            self.start_rsyncd()
        for n in self.args.scale:
            fx = self.side[0] / f"scale-{n}"
            replica = self.dst / f"scale-{n}"
            # Room for the fixture and its replica (about 30 KB per message at the default
            # median size, twice, with a margin), checked before writing a byte of it.
            need = int(n * 30_000 * 2.2 * self.args.median_size / 10240)
            free = shutil.disk_usage(self.run).free
            if free < need:
                raise RuntimeError(f"scale {n}: needs about {need / 1e9:.0f} GB free on {self.run}'s disk, "
                                   f"{free / 1e9:.0f} GB are; not started")
            sh([str(self.exe), "fixture", "--out", str(fx), "--messages", str(n),
                "--mailboxes", str(max(50, n // 100)), "--seed", "3",
                "--median-size", str(self.args.median_size)], capture_output=True)
            files, size = hb.count_tree(fx)
            base = self.run / "pairs" / f"scale-{n}"
            pair = hb.Pair(self.exe, base, [{"mail": fx}, {"mail": replica}],
                           roots=self.pair_roots(f"scale-{n}"))
            cold = drop_caches()
            t0 = time.monotonic()
            pair.start()
            p, s = pair.nodes
            while True:
                if time.monotonic() - t0 > self.args.sync_timeout * max(1, n // 20000):
                    raise RuntimeError(f"scale {n}: initial sync did not finish\n{p.log_tail()}")
                st0 = p.try_status()
                if st0 and st0["mode"] == "primary" and st0["replication"]["phase"] == "streaming":
                    st1 = s.try_status()
                    if st1 and st1["replication"]["files_landed"] >= files:
                        break
                time.sleep(0.05)
            secs = time.monotonic() - t0
            time.sleep(2.0)  # steady tracking
            for node in pair.nodes:
                node.sample_hwm()
            watches = p.status()["replication"].get("watches")
            rss = {node.name: node.hwm_kib / 1024 for node in pair.nodes}
            pair.stop()
            # 1% of the files change while both daemons are down.
            msgs = sorted(str(x) for x in fx.rglob("*") if x.is_file() and x.name != "dovecot-uidlist")
            touch(msgs[::100], 1)
            drop_caches()
            # The restarted daemons' own peaks (not the larger of both lives).
            for node in pair.nodes:
                node.hwm_kib = 0
            t1 = time.monotonic()
            pair.start()
            while True:
                if time.monotonic() - t1 > self.args.sync_timeout:
                    raise RuntimeError(f"scale {n}: no catch-up after restart\n{p.log_tail()}")
                st = p.try_status()
                if st and st["mode"] == "primary" and st["replication"]["phase"] == "streaming":
                    break
                time.sleep(0.01)
            catch_up = time.monotonic() - t1
            for node in pair.nodes:
                node.sample_hwm()
            rss_restart = {node.name: node.hwm_kib / 1024 for node in pair.nodes}
            pair.stop()
            # Both daemons' logs of this size (both lives), for what the catch-up spent.
            for node in pair.nodes:
                shutil.copyfile(node.log_path, self.out / f"scale-{n}-{node.name}.log")
            # rsync's catch-up on the same trees: a different 1% changed, then
            # `rsync -a` of the tree onto the replica the pair left (its quick
            # check of size and mtime over every file, and the changed ones).
            touch(msgs[1::100], 2)
            drop_caches()
            rs = self.rsync_once(f"scale-{n}", False, fx)
            rsync_catch_up = rs["seconds"]
            # And durable, as hasync's catch-up is (a third 1%).
            touch(msgs[2::100], 3)
            drop_caches()
            rsync_fsync_catch_up = self.rsync_once(f"scale-{n}", True, fx)["seconds"]
            out[str(n)] = {
                "messages": n, "files": files, "bytes": size,
                "initial_s": secs, "initial_files_per_s": files / secs,
                "peak_rss_mib": max(rss.values()), "peak_rss_mib_by_node": rss,
                "peak_rss_mib_after_restart": rss_restart,
                "watches": watches,
                "restart_catch_up_s": catch_up, "changed_files": len(msgs[::100]),
                "rsync_catch_up_s": rsync_catch_up, "rsync_cmd": rs["cmd"],
                "rsync_fsync_catch_up_s": rsync_fsync_catch_up,
                "cold_cache": cold,
            }
            log(f"scale {n}: {files} files, initial {files / secs:.0f} files/s, peak RSS "
                f"{max(rss.values()):.1f} MiB, restart catch-up {catch_up:.2f}s (rsync -a {rsync_catch_up:.2f}s, "
                f"--fsync {rsync_fsync_catch_up:.2f}s)")
            shutil.rmtree(replica, ignore_errors=True)
            self.raw["scale"] = out
            if self.fs is not None:
                # Give the freed blocks back to the image's sparse file, or the
                # copy below needs a second tree's room on the disk.
                subprocess.run(["fstrim", str(self.side[1])], check=False, capture_output=True)
            # The peer's initial sync of the same tree.
            dst = self.dst / f"rsync-scale-{n}"
            scratch = None
            if self.fs is not None:
                gib = int(24 + 1.3 * n * 30e3 / 2**30)
                scratch = hb.LoopFs(self.run / f"rsync-scale-{n}.ext4", dst, gib)
            free = shutil.disk_usage(self.run).free
            try:
                if free < size * 1.2:
                    raise RuntimeError(f"{free / 1e9:.0f} GB free for a copy of {size / 1e9:.0f} GB")
                drop_caches()
                rsync_secs = self.rsync_once(f"rsync-scale-{n}", False, fx)["seconds"]
                out[str(n)]["rsync_initial_files_per_s"] = files / rsync_secs
                log(f"scale {n}: rsync -a initial {files / rsync_secs:.0f} files/s")
            except (RuntimeError, subprocess.CalledProcessError) as e:
                self.raw["errors"][f"scale {n} rsync initial"] = str(e)
                log(f"scale {n}: rsync -a initial not measured: {e}")
            finally:
                if scratch is not None:
                    scratch.close()
                shutil.rmtree(dst, ignore_errors=True)
            shutil.rmtree(fx, ignore_errors=True)
        self.raw["scale"] = out

    # ------------------------------------------------------------------ lag

    def lag_store(self, name: str, messages: int) -> Path:
        d = self.side[0] / "lagstores" / name
        sh([str(self.exe), "fixture", "--out", str(d), "--messages", str(messages), "--mailboxes", "50",
            "--seed", "7", "--median-size", str(self.args.median_size)], capture_output=True)
        return d

    def wait_streaming(self, node: hb.Node, timeout: float) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not node.running():
                raise RuntimeError(f"{node.name} exited before streaming\n{node.log_tail()}")
            st = node.try_status()
            if st and st["mode"] == "primary" and st["replication"]["phase"] == "streaming":
                return st
            time.sleep(0.02)
        raise RuntimeError(f"{node.name}: no streaming within {timeout}s\n{node.log_tail()}")

    def streaming_pair(self, name: str, store: Path) -> tuple[hb.Pair, Path]:
        """A fresh pair replicating `store` (node 0 primary) into a replica
        of its own, started and streaming; returns it and the replica's path."""
        replica = self.dst / name
        pair = hb.Pair(self.exe, self.run / "pairs" / name, [{"mail": store}, {"mail": replica}],
                       roots=self.pair_roots(name))
        settle()
        pair.start()
        pair.wait_formed()
        self.wait_streaming(pair.nodes[0], self.args.sync_timeout)
        return pair, replica

    def lag(self) -> None:
        out: dict = {"rates": {}, "store_messages": self.args.lag_store_messages}
        for rate in self.args.rates:
            store = self.lag_store(f"hasync-{rate}", self.args.lag_store_messages)
            pair, replica = self.streaming_pair(f"lag-{rate}", store)
            p, s = pair.nodes
            boxes = hb.maildirs(store)
            watcher = hb.ArrivalWatcher(store, replica) if rate <= 1000 else None
            cpu0 = p.cpu_s() + s.cpu_s()
            landed0 = s.status()["replication"]["files_landed"]
            d = hb.paced_delivery(boxes, rate, self.args.lag_seconds, seed=rate,
                                  on_delivered=watcher.delivered if watcher else None)
            # wait until everything delivered is acked (durable on the secondary)
            t0 = time.monotonic()
            r = hb.wait_drained(p, d["messages"], 60.0, f"lag {rate}/s")
            drain_s = time.monotonic() - t0
            cpu = p.cpu_s() + s.cpu_s() - cpu0
            visible = watcher.finish(grace_s=5.0) if watcher else None
            st1 = s.status()
            self.note_hwm("lag", pair)
            res = {
                "offered_per_s": rate,
                "delivery": d,
                "drain_after_last_s": drain_s,
                "engine_lag_ms": {
                    "p50": r["lag_ms_p50"], "p99": r["lag_ms_p99"], "p999": r["lag_ms_p999"],
                    "max": r["lag_ms_max"], "samples": r["lag_samples"],
                },
                "landed": st1["replication"]["files_landed"] - landed0,
                "visible_lag_ms": visible,
                "cpu_s_per_1k_msgs": cpu / d["messages"] * 1000,
                "hb_gap_ms_max_secondary": st1["link"]["heartbeat_gap_ms_max"],
                # where the lag goes (since each daemon started): sender queueing, secondary commit
                "stages_ms": {"primary": r.get("stages_ms"), "secondary": st1["replication"].get("stages_ms")},
            }
            out["rates"][str(rate)] = res
            for side, st in res["stages_ms"].items():
                for k, v in (st or {}).items():
                    log(f"  stage {side}.{k}: p50 {v['p50']:.2f} p99 {v['p99']:.2f} max {v['max']:.2f} ms ({v['samples']})")
            log(f"lag {rate}/s (achieved {d['achieved_per_s']:.0f}/s): p50 {r['lag_ms_p50']} p99 {r['lag_ms_p99']} "
                f"p999 {r['lag_ms_p999']} max {r['lag_ms_max']} ms over {r['lag_samples']} samples; "
                f"landed {res['landed']}/{d['messages']}")
            pair.stop()
        self.raw["lag"] = out

    # -------------------------------------------------------------- expunge

    def messages_of(self, root: Path) -> list[Path]:
        out = []
        for box in hb.maildirs(root):
            for sub in ("cur", "new"):
                out.extend(sorted((box / sub).iterdir()))
        return out

    def wait_gone(self, replica: Path, store: Path, victims: list[Path], timeout: float) -> float:
        """Seconds until none of `victims` (paths in `store`) is on the replica."""
        t0 = time.monotonic()
        left = [replica / v.relative_to(store) for v in victims]
        while left:
            left = [v for v in left if os.path.lexists(v)]
            if not left:
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{len(left)} expunged messages still on the replica after {timeout:.0f} s")
            time.sleep(0.002)
        return time.monotonic() - t0

    def expunge(self) -> None:
        """Deletes replicated messages as IMAP expunges do (an unlink each),
        on a pair that is streaming: paced (change -> gone from the replica,
        per message, an external poll) and all at once (five folders emptied:
        seconds until the replica holds none of them, against `rsync -a
        --delete` reflecting the same deletes into a copy of its own)."""
        if self.rsyncd is None:
            self.start_rsyncd()
        n = self.args.lag_store_messages
        store = self.lag_store("expunge", n)
        pair, replica = self.streaming_pair("expunge", store)
        p, s = pair.nodes
        msgs = self.messages_of(store)
        missing = [m for m in msgs if not (replica / m.relative_to(store)).exists()]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(msgs)} messages not on the replica while streaming")
        sh(["rsync", "-a", f"{store}/", self.rsync_url("expunge-rsync")])
        out: dict = {"store_messages": len(msgs), "rate_per_s": self.args.expunge_rate}

        # Paced: every 4th message, at the offered rate.
        paced = msgs[::4]
        watcher = hb.ArrivalWatcher(store, replica, gone=True)
        cpu0 = p.cpu_s() + s.cpu_s()
        d = hb.paced_expunge(paced, self.args.expunge_rate, on_deleted=watcher.delivered)
        vis = watcher.finish(grace_s=10.0)
        r = hb.wait_drained(p, 0, 60.0, "expunge paced")
        cpu = p.cpu_s() + s.cpu_s() - cpu0
        out["paced"] = {"deletes": d, "visible_lag_ms": vis, "cpu_s_per_1k_deletes": cpu / len(paced) * 1000,
                        "ops_pending_after": r["ops_pending"]}
        log(f"expunge paced {d['achieved_per_s']:.0f}/s: gone from the replica p50 {vis['p50']:.1f} "
            f"p99 {vis['p99']:.1f} max {vis['max']:.1f} ms over {vis['samples']} ({vis['missing']} still there)")

        def removal(remove, gone: list[Path]) -> dict:
            """Times `remove()` until none of `gone` is on the replica, with
            both daemons' CPU; then `rsync -a --delete` reflecting it."""
            settle()
            cpu0 = p.cpu_s() + s.cpu_s()
            t0 = time.monotonic()
            remove()
            remove_s = time.monotonic() - t0
            clear_s = self.wait_gone(replica, store, gone, 60.0) + remove_s
            cpu = p.cpu_s() + s.cpu_s() - cpu0
            settle()
            cmd = ["rsync", "-a", "--delete", f"{store}/", self.rsync_url("expunge-rsync")]
            t1 = time.monotonic()
            sh(cmd)
            return {"remove_s": remove_s, "replica_clear_s": clear_s, "cpu_s": cpu,
                    "rsync_delete": {"seconds": time.monotonic() - t1, "cmd": " ".join(cmd)}}

        # All at once: five folders emptied (rsync's first run also
        # reflects the paced deletes: one walk either way).
        left = set(msgs) - set(paced)
        boxes = hb.maildirs(store)[:5]
        bulk = [m for m in sorted(left) if any(b in m.parents for b in boxes)]
        out["bulk"] = {"deletes": len(bulk), "folders": len(boxes)} | removal(
            lambda: [os.unlink(m) for m in bulk], bulk)
        log(f"expunge bulk: {len(bulk)} messages in {len(boxes)} folders gone from the replica in "
            f"{out['bulk']['replica_clear_s']:.3f} s (rsync -a --delete {out['bulk']['rsync_delete']['seconds']:.3f} s)")
        # A mailbox deleted: five more folders removed with `rm -rf` (tmp/,
        # new/, cur/, their messages and Dovecot's files).
        gone_boxes = [b for b in hb.maildirs(store) if b not in boxes][:5]
        held = [m for m in self.messages_of(store) if any(b in m.parents for b in gone_boxes)]
        out["folders"] = {"folders": len(gone_boxes), "messages": len(held)} | removal(
            lambda: [shutil.rmtree(b) for b in gone_boxes], gone_boxes)
        log(f"expunge folders: {len(gone_boxes)} folders ({len(held)} messages) gone from the replica in "
            f"{out['folders']['replica_clear_s']:.3f} s (rsync -a --delete "
            f"{out['folders']['rsync_delete']['seconds']:.3f} s)")
        want = len(self.messages_of(store))
        got = len(self.messages_of(replica))
        out["store_after"], out["replica_after"] = want, got
        if want != got:
            raise RuntimeError(f"after the expunges the store holds {want} messages, the replica {got}")
        self.note_hwm("expunge", pair)
        pair.stop()
        self.raw["expunge"] = out

    # --------------------------------------------------------------- lsyncd

    def lsyncd(self) -> None:
        if not shutil.which("lsyncd"):
            self.raw["lsyncd"] = {"installed": False, "reason": self.args.lsyncd_reason or "lsyncd not on PATH"}
            self.raw["not_measured"].append("lsyncd change-to-copy lag: " + self.raw["lsyncd"]["reason"])
            return
        res: dict = {
            "installed": True,
            "delay_s": self.args.lsyncd_delay,
            "default_delay_s": 15,
            "note": "change-to-copy (visible on the target, not fsynced): lsyncd default.rsync to the local "
            "rsync daemon, maxProcesses=1, logging errors only",
            "rates": {},
        }
        self.raw["lsyncd"] = res
        for rate in self.args.lsyncd_rates:
            res["rates"][str(rate)] = self.lsyncd_rate(rate)

    def lsyncd_rate(self, rate: int) -> dict:
        store = self.lag_store(f"lsyncd-{rate}", self.args.lag_store_messages)
        src_files, _ = hb.count_tree(store)
        target = self.dst / f"lsyncd-{rate}"
        target.mkdir()
        conf = self.run / f"lsyncd-{rate}.lua"
        lsync_log = self.run / f"lsyncd-{rate}.log"
        conf.write_text(
            "settings {\n"
            f'  logfile = "{lsync_log}",\n'
            f'  statusFile = "{self.run}/lsyncd-{rate}.status",\n'
            "  nodaemon = true,\n"
            "  maxProcesses = 1,\n"
            "}\n"
            "sync {\n"
            "  default.rsync,\n"
            f'  source = "{store}",\n'
            f'  target = "{self.rsync_url(f"lsyncd-{rate}")}",\n'
            f"  delay = {self.args.lsyncd_delay},\n"
            '  exclude = { "tmp/**" },\n'
            "  rsync = { archive = true },\n"
            "}\n"
        )
        settle()
        proc = hb.track(subprocess.Popen(["lsyncd", "-log", "scarce", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=open(self.run / f"lsyncd-{rate}.stdout", "wb"),
                                         stderr=subprocess.STDOUT))
        # lsyncd's startup is a full rsync of the source: wait until the target has every file
        t0 = time.monotonic()
        while hb.count_tree(target)[0] < src_files:
            if proc.poll() is not None:
                txt = lsync_log.read_text(errors="replace") if lsync_log.exists() else ""
                raise RuntimeError(f"lsyncd exited {proc.returncode}: {txt[-800:]} "
                                   f"{(self.run / f'lsyncd-{rate}.stdout').read_text(errors='replace')[-800:]}")
            if time.monotonic() - t0 > 120:
                raise RuntimeError("lsyncd startup sync not finished in 120 s")
            time.sleep(0.05)
        startup_s = time.monotonic() - t0
        time.sleep(0.5)
        watcher = hb.ArrivalWatcher(store, target)
        seconds = self.args.lag_seconds
        d = hb.paced_delivery(hb.maildirs(store), rate, seconds, seed=rate + 1, on_delivered=watcher.delivered)
        vis = watcher.finish(grace_s=max(10.0, 2 * self.args.lsyncd_delay + 5))
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log(f"lsyncd (delay={self.args.lsyncd_delay}) at {rate}/s: p50 {vis['p50']:.1f} p99 {vis['p99']:.1f} "
            f"max {vis['max']:.1f} ms, missing {vis['missing']}")
        return {"offered_per_s": rate, "startup_sync_s": startup_s, "delivery": d, "visible_lag_ms": vis}

    # ----------------------------------------------------------- queue push

    def queue_push(self) -> None:
        n = self.args.queue_messages
        base = self.run / "pairs" / "queue"
        # Each node's queue on its own filesystem in the two-fs layout.
        roots = self.pair_roots("queue")
        stores = [{"mail": roots[0] / "mx1-mail"}, {"mail": roots[1] / "mx2-mail"}]
        queues = [roots[0] / "mx1-queue", roots[1] / "mx2-queue"]
        for q in queues:
            q.mkdir(parents=True)
        t0 = time.monotonic()
        _, qbytes = hb.write_postfix_queue(queues[0], n, seed=self.args.seed)
        log(f"queue fixture: {n} messages, {qbytes / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s")
        pair = hb.Pair(self.exe, base, stores, queues=queues, layout="postfix", roots=roots)
        settle()
        pair.start()
        prim = pair.wait_formed()
        p, s = pair.nodes[prim], pair.nodes[1 - prim]
        time.sleep(0.5)
        t_kill = time.monotonic()
        p.kill9()
        detect = self.wait_promoted(s, t_kill)
        t_restart = time.monotonic()
        cpu_new0 = s.cpu_s()
        p.start()
        t_end = None
        last = None
        while time.monotonic() - t_restart < self.args.queue_timeout:
            st = p.try_status()
            if st:
                q = st["queue_push"]
                last = q
                if q["requested"] >= 1 and not q["running"] and not q["pending"] and (
                    q["last"]["messages"] > 0 or q["last_error"]
                ):
                    t_end = time.monotonic()
                    break
            time.sleep(0.01)
        def keep_logs() -> None:
            # Both daemons' logs (`HASYNC_BENCH_LOG=info,hasync::queue=debug`
            # adds each batch's commit time), for what the push spent.
            for node in pair.nodes:
                shutil.copyfile(node.log_path, self.out / f"queue-{node.name}.log")

        if t_end is None:
            keep_logs()
            raise RuntimeError(f"queue push did not finish: {json.dumps(last)[:600]}\n{p.log_tail()}\n{s.log_tail()}")
        cpu_old, cpu_new = p.cpu_s(), s.cpu_s() - cpu_new0
        self.note_hwm("queue_push", pair)
        st_new = s.status()
        pair.stop()
        keep_logs()
        rep = last["last"]

        def queued(q: Path) -> int:
            c = 0
            for dirpath, dirs, names in os.walk(q):
                if ".hasync" in dirs:
                    dirs.remove(".hasync")
                c += sum(1 for x in names if os.path.isfile(os.path.join(dirpath, x)))
            return c

        res = {
            "messages": rep["messages"],
            "queued": n,
            "bytes": qbytes,
            "pushed": rep["pushed"],
            "ingested": rep["ingested"],
            "duplicates_dropped": rep["duplicates_dropped"],
            "failed": rep["failed"],
            "garbage": rep["garbage"],
            "push_seconds": rep["seconds"],
            "msgs_per_s": rep["messages"] / rep["seconds"] if rep["seconds"] else None,
            "restart_to_empty_s": t_end - t_restart,
            "new_primary_queue_files": queued(queues[1 - prim]),
            "old_primary_queue_files_after": queued(queues[prim]),
            "new_primary_ingest": st_new["queue_push"]["ingest"],
            "detect_ms": detect,
            "last_error": last["last_error"],
            "cpu_s_old_primary": cpu_old,
            "cpu_s_new_primary": cpu_new,
        }
        self.raw["queue_push"] = res
        log(f"queue push: {res['messages']} msgs in {res['push_seconds']:.2f}s = {res['msgs_per_s'] or 0:.0f} msgs/s; "
            f"restart→empty {res['restart_to_empty_s']:.2f}s; new primary holds {res['new_primary_queue_files']}, "
            f"old primary {res['old_primary_queue_files_after']}")

    # -------------------------------------------------------------- failover

    def wait_promoted(self, node: hb.Node, t_kill: float, timeout: float = 30.0) -> float:
        while time.monotonic() - t_kill < timeout:
            st = node.try_status()
            if st and st["mode"] == "primary":
                return (time.monotonic() - t_kill) * 1000
            time.sleep(0.005)
        raise RuntimeError(f"{node.name} did not take over within {timeout}s\n{node.log_tail()}")

    def failover(self) -> None:
        base = self.run / "pairs" / "failover"
        pair = hb.Pair(self.exe, base, [{"mail": base / "mx1-mail"}, {"mail": base / "mx2-mail"}])
        settle()
        pair.start()
        samples = []
        for k in range(self.args.kills):
            prim = pair.wait_formed()
            time.sleep(0.6)  # a few heartbeats of a settled pair
            p, s = pair.nodes[prim], pair.nodes[1 - prim]
            t_kill = time.monotonic()
            p.kill9()
            ms = self.wait_promoted(s, t_kill)
            samples.append(ms)
            log(f"failover {k + 1}: {s.name} primary {ms:.0f} ms after kill -9 of {p.name}")
            p.start()
        pair.wait_formed()
        self.note_hwm("failover", pair)
        pair.stop()
        self.raw["failover"] = {
            "kills": len(samples),
            "detect_ms_all": samples,
            "detect_ms_median": hb.stats(samples)["median"],
            "heartbeat_interval_ms": pair.interval_ms,
            "heartbeat_lost_threshold": pair.threshold,
            "window_ms": pair.interval_ms * pair.threshold,
            "poll_ms": 5,
        }

    # ------------------------------------------------------------ rss 100k

    def rss_large(self) -> None:
        """Peak RSS of both daemons while tracking a large mailstore (the bar is
        stated for 100k files). Small messages: RSS depends on the file count."""
        n = self.args.rss_messages
        store = self.run / "rss-store"
        t0 = time.monotonic()
        sh([str(self.exe), "fixture", "--out", str(store), "--messages", str(n), "--mailboxes", str(max(1, n // 100)),
            "--seed", "3", "--median-size", "1024"], capture_output=True)
        files, size = hb.count_tree(store)
        log(f"rss fixture: {files} files, {size / 1e6:.0f} MB in {time.monotonic() - t0:.1f}s")
        base = self.run / "pairs" / "rss"
        # The store on the run directory's filesystem, the replica on the secondary's: each
        # node's state beside its tree (internal directories share its filesystem).
        pair = hb.Pair(self.exe, base, [{"mail": store}, {"mail": self.dst / "rss"}],
                       roots=[base, self.side[1] / "pairs" / "rss"])
        settle()
        t0 = time.monotonic()
        pair.start()
        p, s = pair.nodes
        st = self.wait_streaming(p, self.args.sync_timeout)
        secs = time.monotonic() - t0
        self.note_hwm("rss_large", pair)
        # some steady-state traffic while it tracks the store
        hb.paced_delivery(hb.maildirs(store)[:50], 500, 2.0, seed=5)
        time.sleep(1.0)
        self.note_hwm("rss_large", pair)
        pair.stop()
        self.raw["rss_large"] = {
            "files": files, "bytes": size, "initial_sync_s": secs, "files_per_s": files / secs,
            "watches": st["replication"].get("watches"),
            "hwm_kib_primary": p.hwm_kib, "hwm_kib_secondary": s.hwm_kib,
        }
        log(f"rss at {files} files: primary {p.hwm_kib / 1024:.1f} MiB, secondary {s.hwm_kib / 1024:.1f} MiB "
            f"(initial sync {files / secs:.0f} files/s)")

    # --------------------------------------------------------------- profile

    def perf_attach(self, node: hb.Node, tag: str) -> tuple[hb.Node, Path, subprocess.Popen]:
        data = self.run / f"perf-{tag}-{node.name}.data"
        pr = hb.track(subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,8192", "-o", str(data), "-p", str(node.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return node, data, pr

    def perf_collect(self, perfs: list, tag: str, roles: dict[str, str]) -> dict:
        for _n, _d, pr in perfs:
            if pr.poll() is None:
                pr.send_signal(2)  # SIGINT: perf writes its data and exits
        for _n, _d, pr in perfs:
            pr.wait(timeout=60)
        reports = {}
        for n, data, _pr in perfs:
            role = roles[n.name]
            by_sym = subprocess.run(
                ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "--stdio",
                 "-g", "none", "--percent-limit", "0.5"],
                capture_output=True, text=True, timeout=300).stdout
            inclusive = subprocess.run(
                ["perf", "report", "-i", str(data), "--children", "--sort", "symbol",
                 "--stdio", "-g", "none", "--percent-limit", "2"],
                capture_output=True, text=True, timeout=300).stdout
            by_dso = subprocess.run(
                ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio", "-g", "none"],
                capture_output=True, text=True, timeout=300).stdout

            def rows(text: str) -> list[str]:
                out = []
                for line in text.splitlines():
                    line = re.sub(r"(\s+-)+\s*$", "", line.strip())
                    if re.match(r"^[0-9.]+%", line) and "std::sys::backtrace" not in line:
                        out.append(" ".join(line.split()))
                return out

            dest = self.out / f"profile-{tag}-{role}.txt"
            dest.write_text(by_dso + "\n" + by_sym + "\n" + inclusive)
            reports[role] = {"file": str(dest), "by_dso": rows(by_dso)[:6], "top": rows(by_sym)[:25],
                             "hasync_inclusive": [r for r in rows(inclusive) if "hasync::" in r][:25]}
        return reports

    def profile(self) -> None:
        """Untimed extra runs with `perf record -e cpu-clock` on the daemons:
        where the CPU time goes in the initial sync and in the queue push."""
        if not shutil.which("perf"):
            self.raw["not_measured"].append("CPU profiles: perf not installed")
            return
        out: dict = {}
        self.raw["profile"] = out
        # initial sync of the fixture
        base = self.run / "pairs" / "profile"
        pair = hb.Pair(self.exe, base, [{"mail": self.fx}, {"mail": self.dst / "hasync-profile"}],
                       roots=self.pair_roots("profile"))
        settle()
        pair.start()
        perfs = [self.perf_attach(n, "initial-sync") for n in pair.nodes]
        t0 = time.monotonic()
        self.wait_streaming(pair.nodes[0], self.args.sync_timeout)
        secs = time.monotonic() - t0
        reports = self.perf_collect(perfs, "initial-sync", {"mx1": "primary", "mx2": "secondary"})
        pair.stop()
        out["initial_sync"] = {"seconds": secs, "files": self.files, "reports": reports}
        # queue push (the ingesting new primary and the pushing old primary)
        n = self.args.profile_queue_messages
        base = self.run / "pairs" / "profile-queue"
        queues = [base / "mx1-queue", base / "mx2-queue"]
        for q in queues:
            q.mkdir(parents=True)
        hb.write_postfix_queue(queues[0], n, seed=self.args.seed + 1)
        pair = hb.Pair(self.exe, base, [{"mail": base / "mx1-mail"}, {"mail": base / "mx2-mail"}], queues=queues)
        settle()
        pair.start()
        prim = pair.wait_formed()
        p, s = pair.nodes[prim], pair.nodes[1 - prim]
        time.sleep(0.5)
        t_kill = time.monotonic()
        p.kill9()
        self.wait_promoted(s, t_kill)
        perfs = [self.perf_attach(s, "queue-push")]
        p.start()
        perfs.append(self.perf_attach(p, "queue-push"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.queue_timeout:
            st = p.try_status()
            if st and st["queue_push"]["requested"] >= 1 and not st["queue_push"]["running"] \
                    and not st["queue_push"]["pending"] and st["queue_push"]["last"]["messages"] > 0:
                break
            time.sleep(0.05)
        secs = time.monotonic() - t0
        reports = self.perf_collect(perfs, "queue-push", {s.name: "new-primary", p.name: "old-primary"})
        pair.stop()
        out["queue_push"] = {"seconds": secs, "messages": n, "reports": reports}
        log(f"profiles written to {self.out}/profile-*.txt")

    # ------------------------------------------------------------ large files

    def large_files(self) -> None:
        """Initial sync of a store of large files (attachments, archives), with
        large files sent by splice (zero_copy = true, the default) and by plain
        reads (zero_copy = false), alternating, on the same fixture."""
        a = self.args
        src = self.run / "large-fixture"
        rng = random.Random(a.seed)
        sizes = [rng.randint(1 << 20, 16 << 20) for _ in range(a.large_files)]
        block = os.urandom(1 << 20)
        for i, size in enumerate(sizes):
            d = src / f"box{i % 4}" / "cur"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{1700000000 + i}.M{i}P1.bench:2,S", "wb") as f:
                left = size
                while left > 0:
                    f.write(block[: min(left, len(block))])
                    left -= len(block)
        files, total = hb.count_tree(src)
        sh(["sync"])
        for root, _, names in os.walk(src):  # the page cache holds the source for every run
            for n in names:
                with open(os.path.join(root, n), "rb") as f:
                    while f.read(1 << 22):
                        pass
        runs: dict[str, list] = {"splice": [], "read": []}
        for rep in range(a.large_reps):
            for mode in ("splice", "read") if rep % 2 == 0 else ("read", "splice"):
                settle()
                base = self.run / "pairs" / f"large-{mode}-{rep}"
                replica = self.dst / f"large-{mode}-{rep}"
                extra = f"zero_copy = {'true' if mode == 'splice' else 'false'}\n"
                pair = hb.Pair(self.exe, base, [{"mail": src}, {"mail": replica}], replication_extra=extra,
                               roots=[base, self.side[1] / "pairs" / f"large-{mode}-{rep}"])
                pair.start()
                p, s = pair.nodes
                deadline = time.monotonic() + a.sync_timeout
                t0 = None
                while True:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"large-file sync ({mode}) did not finish\n{p.log_tail()}\n{s.log_tail()}")
                    if t0 is None:
                        st0 = p.try_status()
                        if st0 and st0["mode"] == "primary":
                            t0 = time.monotonic()
                        time.sleep(0.002)
                        continue
                    if not p.running() or not s.running():
                        raise RuntimeError(f"a daemon exited\n{p.log_tail()}\n{s.log_tail()}")
                    st1 = s.try_status()
                    if st1 and st1["replication"]["files_landed"] >= files:
                        break
                    time.sleep(0.01)
                secs = time.monotonic() - t0
                st0 = p.status()
                cpu_p, cpu_s = p.cpu_s(), s.cpu_s()
                pair.stop()
                rf, rb = hb.count_tree(replica)
                stage_f, stage_b = hb.count_tree(replica / ".hasync") if (replica / ".hasync").exists() else (0, 0)
                if rf - stage_f != files or rb - stage_b != total:
                    raise RuntimeError(f"large-file replica ({mode}) has {rf - stage_f} files, {rb - stage_b} bytes; "
                                       f"expected {files}, {total}")
                r = {"seconds": secs, "mb_per_s": total / 1e6 / secs, "cpu_s_primary": cpu_p,
                     "cpu_s_secondary": cpu_s, "files_spliced": st0["replication"].get("files_spliced"),
                     "bytes_spliced": st0["replication"].get("bytes_spliced")}
                if mode == "splice" and not r["files_spliced"]:
                    raise RuntimeError("zero_copy = true but no file went out by splice")
                if mode == "read" and r["files_spliced"]:
                    raise RuntimeError("zero_copy = false but files went out by splice")
                runs[mode].append(r)
                log(f"large files ({mode}) rep {rep}: {secs:.2f}s, {r['mb_per_s']:.0f} MB/s, "
                    f"primary CPU {cpu_p:.2f}s, secondary CPU {cpu_s:.2f}s")
        self.raw["large_files"] = {"files": files, "bytes": total, "runs": runs}

    # ------------------------------------------------------------------ all

    def all(self) -> None:
        t0 = time.monotonic()
        only = self.args.only

        def want(name: str) -> bool:
            return only is None or name in only

        if want("initial") or want("incremental") or want("profile"):
            self.step("fixture", self.fixture)
            if not hasattr(self, "files"):
                raise SystemExit("no fixture; nothing to measure")
            self.step("rsync daemon", self.start_rsyncd)
        if want("initial"):
            self.step("initial sync", self.initial_sync)
        if want("incremental"):
            self.step("incremental", self.incremental)
        if want("lag"):
            self.step("lag", self.lag)
        if self.args.scale and want("scale"):
            self.step("scale", self.scale)
        if want("expunge"):
            self.step("expunge", self.expunge)
        if want("lsyncd"):
            self.step("lsyncd", self.lsyncd)
        if want("queue"):
            self.step("queue push", self.queue_push)
        if want("failover"):
            self.step("failover", self.failover)
        # After the lag runs: its gigabytes of writes would still be on
        # their way to the disk during them.
        if want("large"):
            self.step("large files", self.large_files)
        if self.args.rss_messages and want("rss"):
            self.step("rss large", self.rss_large)
        elif want("rss"):
            self.raw["not_measured"].append("RSS while tracking a 100k-file store: skipped in --quick")
        if self.args.perf and want("profile"):
            self.step("profile", self.profile)
        if only is not None:
            self.raw["not_measured"].append(f"partial run: only {','.join(sorted(only))}")
        self.raw["conditions"]["loadavg_end"] = os.getloadavg()[0]
        self.raw["rss_kib"] = self.hwm
        self.raw["bench_seconds"] = time.monotonic() - t0
        self.raw["run_dir"] = str(self.run)
        self.raw["settings"] = {k: v for k, v in vars(self.args).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--exe", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--messages", type=int)
    ap.add_argument("--mailboxes", type=int)
    ap.add_argument("--median-size", type=int, default=10240)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--lag-seconds", type=float)
    ap.add_argument("--lag-store-messages", type=int)
    ap.add_argument("--expunge-rate", type=float, default=200, help="offered deletes/s in the expunge step")
    ap.add_argument("--queue-messages", type=int)
    ap.add_argument("--kills", type=int)
    ap.add_argument("--lsyncd-delay", type=float, default=0)
    ap.add_argument("--lsyncd-rates", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10])
    ap.add_argument("--lsyncd-reason", default="")
    ap.add_argument("--rss-messages", type=int)
    ap.add_argument("--durability", choices=["syncfs", "fsync"],
                    help="[replication] durability of every pair (default: the daemon's default, syncfs)")
    ap.add_argument("--large-files", type=int, help="files of 1-16 MiB in the large-file step")
    ap.add_argument("--large-reps", type=int)
    ap.add_argument("--perf", type=int, help="1: profile an extra initial sync with perf (default: full runs)")
    ap.add_argument("--profile-queue-messages", type=int, default=3000)
    ap.add_argument("--last-cleanup-s", type=int, default=-1)
    ap.add_argument("--leftover-runs", type=int, default=0)
    ap.add_argument("--sync-timeout", type=float, default=600)
    ap.add_argument("--queue-timeout", type=float, default=600)
    ap.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="tree sizes (messages) for the scale step, e.g. 20000,200000,1000000 "
                         "(default 20000,200000 in a full run; a million needs ~65 GB free)")
    ap.add_argument("--layout", choices=["two-fs", "shared"], default="two-fs",
                    help="two-fs (default): each node on a loop-mounted ext4 image of its own; "
                         "shared: everything on the run directory's filesystem")
    ap.add_argument("--only", type=lambda s: set(s.split(",")),
                    help="run only these steps (comma-separated: initial, incremental, large, lag, "
                         "expunge, scale, lsyncd, queue, failover, rss, profile); the report marks the run as partial")
    a = ap.parse_args()
    defaults = (
        dict(messages=2000, mailboxes=50, reps=1, rates=[1000, 10], lag_seconds=3, lag_store_messages=500,
             queue_messages=1000, kills=3, rss_messages=0, perf=0, large_files=12, large_reps=2,
             scale=[])
        if a.quick
        else dict(messages=20000, mailboxes=200, reps=3, rates=[1000, 3000, 5000, 10], lag_seconds=10,
                  lag_store_messages=2000, queue_messages=10000, kills=5, rss_messages=100000,
                  large_files=48, large_reps=4, scale=[20000, 200000],
                  perf=1 if shutil.which("perf") else 0)
    )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.durability:
        hb.REPLICATION_EXTRA = f'durability = "{a.durability}"\n'
    sys.setswitchinterval(0.0005)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("profile-*.txt"), *out.glob("scale-*.log")]:
        old.unlink()
    hb.set_pidfile(Path(a.run_dir) / "pids")
    b = Bench(a)
    try:
        b.all()
    finally:
        hb.stop_all()
        b.close()
        b.raw["finished_unix"] = time.time()
        (out / "raw.json").write_text(json.dumps(b.raw, indent=2, default=str))
        log(f"raw results: {out / 'raw.json'}")


if __name__ == "__main__":
    main()
