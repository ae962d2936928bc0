"""Shared helpers for scripts/bench.sh: hasync pairs, the control socket,
/proc accounting, ports, Maildir delivery and queue fixtures.

Python 3.11 standard library only.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes we started: recorded so that bench.sh's trap can end them by pid

_PIDFILE: Path | None = None
_PROCS: list[subprocess.Popen] = []


def set_pidfile(path: Path) -> None:
    global _PIDFILE
    _PIDFILE = path


def track(proc: subprocess.Popen) -> subprocess.Popen:
    _PROCS.append(proc)
    if _PIDFILE is not None:
        with open(_PIDFILE, "a") as f:
            f.write(f"{proc.pid}\n")
    return proc


def stop_all() -> None:
    """Ends every process this run started (by pid), SIGTERM then SIGKILL."""
    for p in _PROCS:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3
    for p in _PROCS:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------
# ports below the ephemeral range

_next_port = [0]


def free_port() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start, span = 12000, max(1000, low - 12000)
    if _next_port[0] == 0:
        _next_port[0] = (os.getpid() * 131) % span
    for _ in range(span):
        port = start + _next_port[0] % span
        _next_port[0] += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# --------------------------------------------------------------------------
# /proc accounting


def proc_cpu_s(pid: int, children: bool = False) -> float:
    """utime+stime (and waited-for children's, if asked) of pid, in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def count_tree(root: Path) -> tuple[int, int]:
    """(regular files, bytes) under root, following nothing."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if (st.st_mode & 0o170000) == 0o100000:
                files += 1
                size += st.st_size
    return files, size


def machine_info() -> dict:
    info: dict = {"cores": os.cpu_count(), "kernel": os.uname().release}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_mib"] = round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    try:
        info["os"] = next(
            l.split("=", 1)[1].strip('"')
            for l in Path("/etc/os-release").read_text().splitlines()
            if l.startswith("PRETTY_NAME=")
        )
    except (OSError, StopIteration):
        pass
    return info


def fs_info(path: Path) -> dict:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", str(path)],
        capture_output=True,
        text=True,
    )
    parts = out.stdout.split()
    if len(parts) >= 2:
        return {"device": parts[0], "fstype": parts[1], "options": parts[2] if len(parts) > 2 else ""}
    return {}


def stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    s = sorted(xs)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return {"median": med, "min": s[0], "max": s[-1], "n": n, "all": xs}


# --------------------------------------------------------------------------
# a hasync node and pair

# Lines added to every pair's [replication] table (run.py --durability).
REPLICATION_EXTRA = ""

CONFIG = """node_name = "{name}"
priority = {prio}
state_dir = "{state}"
queue_dir = "{queue}"
recovery = "become-secondary"

[link]
listen = "127.0.0.1:{listen}"
peer = "127.0.0.1:{peer}"
peer_name = "{peer_name}"
secret_file = "{secret}"
heartbeat_interval_ms = {interval}
heartbeat_lost_threshold = {threshold}
startup_wait_ms = {startup}

[replication]
sync_listen = "127.0.0.1:{sync_listen}"
sync_peer = "127.0.0.1:{sync_peer}"
verify_interval_ms = 600000
{replication_extra}
[queue]
layout = "{layout}"
sync = "off"

[mailstores]
{stores}
"""


def settle(warm: Path | None = None) -> None:
    """Untimed: flush what the previous measurement left dirty so it does not
    bill its writeback to the next one. With `warm`: also drop the page cache
    and read `warm`'s files back, so that every run starts from the same
    cache (its source cached, nothing else): on this VM the kernel's cost per
    file written grows as the page cache fills with earlier runs' copies
    (`cp -a` of the fixture into one filesystem: 1.2 s of system time for
    each of the first three copies, 2.8 s for the fourth and fifth, 1.1 s
    again after a drop), which billed the later runs of a step more than
    its first, whoever ran them."""
    subprocess.run(["sync"], check=True)
    if warm is not None and drop_caches():
        subprocess.run(f"find '{warm}' -type f -exec cat {{}} + > /dev/null", shell=True, check=True)
    time.sleep(0.3)


def drop_caches() -> bool:
    """Untimed: write back and drop the page cache, so that a measurement
    reads the tree from the disk as a freshly booted node would (a 20k tree
    fits in the cache, a million does not: without this the scale step
    compares cache against disk, not tree sizes). False when not permitted."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    time.sleep(0.3)
    return True


def wait_drained(primary: "Node", messages: int, timeout: float, what: str) -> dict:
    """Waits until the primary has no op pending or in flight and has timed
    `messages` changes to durable (everything delivered is acknowledged);
    returns its last replication status (logged if `timeout` passed first)."""
    t0 = time.monotonic()
    while True:
        r = primary.status()["replication"]
        if r["ops_pending"] == 0 and r["ops_inflight"] == 0 and r["lag_samples"] >= messages:
            return r
        if time.monotonic() - t0 > timeout:
            log(f"{what}: not drained after {timeout:.0f} s: {json.dumps(r)[:400]}")
            return r
        time.sleep(0.02)


class StatusError(RuntimeError):
    pass


class Node:
    def __init__(self, exe: Path, root: Path, name: str, stores: dict[str, Path], queue_dir: Path):
        self.exe = exe
        self.root = root
        self.name = name
        self.stores = stores
        self.queue_dir = queue_dir
        self.state_dir = root / "state"
        self.config = root / "hasync.toml"
        self.log_path = root / "hasync.log"
        self.proc: subprocess.Popen | None = None
        self.cpu_at_start = 0.0
        self.started_at = 0.0
        self.hwm_kib = 0

    @property
    def socket(self) -> Path:
        return self.state_dir / "hasync.sock"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        env = dict(os.environ, RUST_LOG=os.environ.get("HASYNC_BENCH_LOG", "info"), NO_COLOR="1")
        logf = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = track(
            subprocess.Popen(
                [str(self.exe), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
            )
        )
        logf.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid) if self.running() else float("nan")

    def sample_hwm(self) -> int:
        """Reads VmHWM (peak RSS) now; remembers the largest seen."""
        if self.running():
            v = proc_status_kib(self.proc.pid, "VmHWM")
            if v:
                self.hwm_kib = max(self.hwm_kib, v)
        return self.hwm_kib

    def kill9(self) -> None:
        if self.running():
            self.sample_hwm()
            self.proc.kill()
        if self.proc:
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the daemon saves its indexes), SIGKILL after timeout."""
        if self.running():
            self.sample_hwm()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self, timeout: float = 2.0) -> dict:
        """One `{"cmd":"status"}` request on the control socket (what `hasync status --json` does)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.socket))
            s.sendall(b'{"cmd":"status"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise StatusError(f"{self.name}: control socket: {e}") from e
        finally:
            s.close()
        try:
            resp = json.loads(buf)
        except ValueError as e:
            raise StatusError(f"{self.name}: malformed status: {buf[:200]!r}") from e
        if not resp.get("ok") or "status" not in resp:
            raise StatusError(f"{self.name}: {resp.get('error')}")
        return resp["status"]

    def try_status(self) -> dict | None:
        try:
            return self.status(timeout=1.0)
        except StatusError:
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


class Pair:
    """Two nodes on 127.0.0.1; node 0 has the higher priority and starts as primary."""

    def __init__(
        self,
        exe: Path,
        base: Path,
        stores: list[dict[str, Path]],
        queues: list[Path] | None = None,
        layout: str = "postfix",
        interval_ms: int = 200,
        threshold: int = 5,
        startup_wait_ms: int = 2000,
        replication_extra: str = "",
        roots: list[Path] | None = None,
    ):
        """`roots`: a directory per node for its state and queue (each node
        on a filesystem of its own); default: both under `base`."""
        replication_extra = REPLICATION_EXTRA + replication_extra
        self.base = base
        self.interval_ms = interval_ms
        self.threshold = threshold
        names = ["mx1", "mx2"]
        links = [free_port(), free_port()]
        syncs = [free_port(), free_port()]
        self.nodes: list[Node] = []
        for i in range(2):
            root = (roots[i] if roots else base) / names[i]
            (root / "state").mkdir(parents=True, exist_ok=True)
            q = queues[i] if queues else root / "queue"
            q.mkdir(parents=True, exist_ok=True)
            for p in stores[i].values():
                p.mkdir(parents=True, exist_ok=True)
            secret = root / "link.secret"
            secret.write_text("bench-secret-0123456789abcdef\n")
            secret.chmod(0o600)
            node = Node(exe, root, names[i], stores[i], q)
            node.config.write_text(
                CONFIG.format(
                    name=names[i],
                    prio=200 if i == 0 else 100,
                    state=node.state_dir,
                    queue=q,
                    listen=links[i],
                    peer=links[1 - i],
                    peer_name=names[1 - i],
                    secret=secret,
                    interval=interval_ms,
                    threshold=threshold,
                    startup=startup_wait_ms,
                    sync_listen=syncs[i],
                    sync_peer=syncs[1 - i],
                    layout=layout,
                    replication_extra=replication_extra,
                    stores="\n".join(f'{k} = "{v}"' for k, v in stores[i].items()),
                )
            )
            self.nodes.append(node)

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def stop(self) -> None:
        """Samples both nodes' peak RSS, then stops them in reverse order: the
        secondary (usually node 1) first, so that it does not take over (and
        scan the store as a new primary) while the pair shuts down."""
        for n in self.nodes:
            n.sample_hwm()
        for n in reversed(self.nodes):
            n.stop()

    def sample_hwm(self) -> None:
        for n in self.nodes:
            n.sample_hwm()

    def roles(self) -> list[str | None]:
        out = []
        for n in self.nodes:
            s = n.try_status() if n.running() else None
            out.append(s["mode"] if s else None)
        return out

    def wait_formed(self, timeout: float = 30.0, every: float = 0.01) -> int:
        """Waits for one primary and one secondary that sees it alive; returns the primary's index."""
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            st = [n.try_status() if n.running() else None for n in self.nodes]
            if all(st):
                last = [s["mode"] for s in st]
                for p in (0, 1):
                    if (
                        st[p]["mode"] == "primary"
                        and st[1 - p]["mode"] == "secondary"
                        and st[1 - p]["peer"]["alive"]
                        and st[p]["peer"]["alive"]
                    ):
                        return p
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None and n.proc.returncode not in (-9,):
                    raise RuntimeError(f"{n.name} exited ({n.proc.returncode}):\n{n.log_tail()}")
            time.sleep(every)
        raise RuntimeError(
            f"pair did not form within {timeout}s (roles {last})\n"
            + "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in self.nodes)
        )


# --------------------------------------------------------------------------
# message content


class Bodies:
    """Message bodies: RFC 5322-ish headers + text, sizes lognormal-like
    (median ~10 KiB, clipped 512 B .. `clip`), unique per message."""

    WORDS = [b"mail ", b"queue ", b"relay ", b"spam ", b"archive ", b"inbox ", b"deliver ", b"ok\r\n"]

    def __init__(self, seed: int, median: int = 10240, clip: int = 256 * 1024):
        self.rng = random.Random(seed)
        self.median = median
        self.clip = clip
        rng = random.Random(seed ^ 0x5EED)
        text = bytearray()
        while len(text) < clip + 4096:
            text += self.WORDS[rng.randrange(8)]
        self.text = bytes(text)

    def size(self) -> int:
        return int(min(self.clip, max(512, self.median * math.exp(self.rng.gauss(0.0, 1.0)))))

    def body(self, n: int) -> bytes:
        size = self.size()
        head = (
            f"Return-Path: <bench{n % 997}@example.net>\r\n"
            f"Message-ID: <{self.rng.getrandbits(64):016x}.{n}@bench.example.net>\r\n"
            f"Subject: bench {n}\r\n\r\n"
        ).encode()
        off = self.rng.randrange(4096)
        return head + self.text[off : off + max(0, size - len(head))]


def write_postfix_queue(qdir: Path, n: int, seed: int) -> tuple[int, int]:
    """N deferred messages in Postfix form: deferred/<first char>/<ID>, mode 0700,
    ID = 10 uppercase hex digits. Returns (files, bytes)."""
    bodies = Bodies(seed, median=8192, clip=256 * 1024)
    rng = random.Random(seed)
    total = 0
    made: set[str] = set()
    for i in range(n):
        while True:
            qid = f"{rng.getrandbits(40):010X}"
            if qid not in made:
                made.add(qid)
                break
        d = qdir / "deferred" / qid[0]
        d.mkdir(parents=True, exist_ok=True)
        p = d / qid
        b = bodies.body(i)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        os.write(fd, b)
        os.close(fd)
        os.chmod(p, 0o700)
        total += len(b)
    return n, total


def maildirs(root: Path) -> list[Path]:
    """The Maildir folders (directories with cur/new/tmp) under root, sorted."""
    out = []
    for dirpath, dirs, _names in os.walk(root):
        if {"cur", "new", "tmp"} <= set(dirs):
            out.append(Path(dirpath))
            dirs[:] = []
    return sorted(out)


class Pacer:
    """Paces a loop at a fixed offered rate: step i is due at t0 + i/rate; a
    late step goes at once (no coordinated omission on the offered side)
    and the worst lateness is kept."""

    def __init__(self, rate: float):
        self.rate = rate
        self.t0 = time.monotonic()
        self.behind_max = 0.0

    def wait(self, i: int) -> None:
        due = self.t0 + i / self.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            self.behind_max = max(self.behind_max, now - due)


def paced_delivery(
    boxes: list[Path],
    rate: float,
    seconds: float,
    seed: int,
    on_delivered=None,
) -> dict:
    """Delivers messages the Maildir way (write tmp/<name>, rename to new/<name>)
    at a fixed offered rate; a late writer catches up (no coordinated omission
    on the offered side). Returns counts and the achieved rate."""
    bodies = Bodies(seed)
    total = int(rate * seconds)
    prebuilt = [bodies.body(i) for i in range(min(total, 4096))]
    host = "bench.example.net"
    pid = os.getpid()
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    pacer = Pacer(rate)
    t0 = pacer.t0
    nbytes = 0
    for i in range(total):
        pacer.wait(i)
        box = boxes[i % len(boxes)]
        name = f"{int(time.time())}.M{i}P{pid}.{host},S={len(prebuilt[i % len(prebuilt)])}"
        tmp = box / "tmp" / name
        new = box / "new" / name
        body = prebuilt[i % len(prebuilt)]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, body)
        os.close(fd)
        os.rename(tmp, new)
        nbytes += len(body)
        if on_delivered is not None:
            on_delivered(new, time.monotonic())
    elapsed = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "writer_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "messages": total,
        "bytes": nbytes,
        "seconds": elapsed,
        "offered_per_s": rate,
        "achieved_per_s": total / elapsed if elapsed > 0 else None,
        "writer_behind_ms_max": pacer.behind_max * 1000,
    }


class ArrivalWatcher:
    """Polls for delivered files to appear under a mirror root (or, with
    `gone`, for deleted files to disappear from it); records change-to-visible
    lag per file (a copy, not a durability, measure)."""

    def __init__(self, src_root: Path, dst_root: Path, poll_s: float = 0.001, gone: bool = False):
        self.src_root = src_root
        self.dst_root = dst_root
        self.poll_s = poll_s
        self.gone = gone
        self.pending: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        self.lags_ms: list[float] = []
        self.stop_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def delivered(self, path: Path, at: float) -> None:
        rel = os.path.relpath(path, self.src_root)
        with self.lock:
            self.pending.append((os.path.join(self.dst_root, rel), at))

    def _run(self) -> None:
        while True:
            with self.lock:
                todo = list(self.pending)
            if not todo:
                if self.stop_at is not None:
                    return
            now = time.monotonic()
            seen = set()
            for dst, at in todo:
                if os.path.lexists(dst) != self.gone:
                    self.lags_ms.append((now - at) * 1000)
                    seen.add(dst)
            if seen:
                with self.lock:
                    self.pending = [p for p in self.pending if p[0] not in seen]
            if self.stop_at is not None and time.monotonic() > self.stop_at:
                return
            time.sleep(self.poll_s)

    def finish(self, grace_s: float) -> dict:
        """Waits up to grace_s for the stragglers. A file still missing then
        counts with its age at that moment, a lower bound of its lag, and the
        summary says `lower_bound`."""
        self.stop_at = time.monotonic() + grace_s
        self.thread.join()
        now = time.monotonic()
        with self.lock:
            missing = list(self.pending)
        lags = self.lags_ms + [(now - at) * 1000 for _dst, at in missing]
        out = summarize_lags(lags) | {"missing": len(missing), "grace_s": grace_s}
        out["lower_bound"] = bool(missing)
        return out


def paced_expunge(victims: list[Path], rate: float, on_deleted=None) -> dict:
    """Deletes the given message files at a fixed offered rate (an IMAP
    expunge unlinks each); a late deleter catches up."""
    pacer = Pacer(rate)
    t0 = pacer.t0
    for i, path in enumerate(victims):
        pacer.wait(i)
        os.unlink(path)
        if on_deleted is not None:
            on_deleted(path, time.monotonic())
    elapsed = time.monotonic() - t0
    return {
        "messages": len(victims),
        "seconds": elapsed,
        "offered_per_s": rate,
        "achieved_per_s": len(victims) / elapsed if elapsed > 0 else None,
        "deleter_behind_ms_max": pacer.behind_max * 1000,
    }


def summarize_lags(lags_ms: list[float]) -> dict:
    if not lags_ms:
        return {"samples": 0, "p50": None, "p99": None, "p999": None, "max": None}
    s = sorted(lags_ms)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"samples": len(s), "p50": q(0.50), "p99": q(0.99), "p999": q(0.999), "max": s[-1]}


class LoopFs:
    """One fresh loop-mounted ext4 image (a sparse file), mounted at `mnt`.

    The loop device does direct I/O on its image: without it every block
    written is cached twice (the image's own filesystem and the file on the
    host's), and a flush inside the image waits for the host's writeback of
    whatever else is dirty (the other node's image, the load generator's
    writes), which is not what a node on a disk of its own sees."""

    def __init__(self, img: Path, mnt: Path, gib: int):
        self.img, self.mnt = img, mnt
        self.dev: str | None = None
        mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run(["truncate", "-s", f"{gib}G", str(img)], check=True)
        # Initialised now, not lazily in the background during the runs.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(img)], check=True)
        self.dev = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", str(img)],
                                  check=True, capture_output=True, text=True).stdout.strip()
        # The kernel falls back to buffered I/O without a word (e.g. when
        # the host disk's sectors are larger than the loop device's): read
        # back what it does, for the report.
        try:
            dio = Path(f"/sys/block/{Path(self.dev).name}/loop/dio").read_text().strip()
            self.direct_io: bool | None = dio == "1"
        except OSError:
            self.direct_io = None
        try:
            subprocess.run(["mount", "-o", "noatime", self.dev, str(mnt)], check=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
        if self.dev:
            r = subprocess.run(["losetup", "-d", self.dev], check=False, capture_output=True, text=True)
            if r.returncode != 0:
                log(f"losetup -d {self.dev} failed: {r.stderr.strip()}")
            self.dev = None
        try:
            self.img.unlink()
        except FileNotFoundError:
            pass


class TwoFilesystems:
    """Two loop-mounted ext4 images (sparse files on the run directory's
    disk), one per node, so that the secondary's syncfs flushes only its
    own filesystem, as on a pair of machines."""

    def __init__(self, run: Path, sizes_gib: tuple[int, int] = (8, 24)):
        self.fss: list[LoopFs] = []
        try:
            for name, gib in zip(("fs-a", "fs-b"), sizes_gib):
                self.fss.append(LoopFs(run / f"{name}.ext4", run / name, gib))
        except BaseException:
            self.close()
            raise
        self.mounts: list[Path] = [f.mnt for f in self.fss]
        self.direct_io = all(f.direct_io for f in self.fss)

    def close(self) -> None:
        for f in self.fss:
            f.close()
        self.fss = []
        self.mounts = []
