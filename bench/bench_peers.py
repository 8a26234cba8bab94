"""qtasks on Redis side by side with huey, dramatiq, taskiq and celery, in the same run.

    python bench/bench_peers.py                         # 10,000 tasks, 3 interleaved runs
    python bench/bench_peers.py -n 2000 --peers huey,taskiq --chart /tmp/peers.png
    python bench/bench_peers.py --setup-only            # just create/refresh the venvs

Each peer is installed, at the pinned versions below, from PyPI into its own virtual
environment under `--cache` (default ~/.cache/qtasks-bench/<peer>, reused when present);
qtasks runs from this repository's venv. matplotlib goes into a venv of its own there too
(`chart`), never into the project. The task apps are bench/peers/<system>_app.py.

Every system gets the same tasks: `incr` does one Redis INCR on a shared counter, `ping`
one RPUSH. Redis db 14 (`--url`) is flushed before and after each system's turn, so use a
database nothing else uses. Per run, for each system in turn (the order rotates between
runs, and figures are medians of the runs):

  enqueue      N single enqueue calls, one after another, no worker running
               (bench/peers/driver.py in the system's venv: await add_task / kiq, delay(),
               send(), calling the huey task)
  drain        the N queued tasks, one worker process started with the system's own CLI;
               the clock runs from the first INCR to the N-th (the counter polled every
               1 ms), so interpreter start-up and imports are left out
  round trip   enqueue -> the task ran, p50 and p99 of --round-trips trips on the idle
               worker: `ping` RPUSHes, the driver waits with BLPOP (blocking, no polling)
               and the time includes the enqueue call
  memory       peak RSS (VmHWM) after the drain and round trips, summed over the worker's
               process tree (supervisor + children) and of its largest process

Worker settings (one worker process, otherwise the defaults; logging kept to warnings):

  qtasks    qtasks run                         asyncio, concurrency 10 (max_tasks_process)
  huey      huey_consumer -q                   1 worker thread, blocking BRPOP
  dramatiq  dramatiq --processes 1             supervisor + 1 process with 8 threads
  taskiq    taskiq worker --workers 1          supervisor + 1 process, asyncio
                                               (RedisStreamBroker, acks)
  celery    celery worker -c 1 -l warning      prefork: main + 1 child, prefetch 4

Workers run in their own process group, killed (SIGTERM, then SIGKILL) when the turn ends
and on every exit path. The machine may be shared: compare columns of one run, and mind
the load average printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
APPS = HERE / "peers"
REPO_VENV_BIN = Path(sys.executable).parent
DEFAULT_URL = os.environ.get("QTASKS_BENCH_PEERS_URL", "redis://127.0.0.1:6379/14")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qtasks-bench"

# Pinned peer versions: change here, and the venv is rebuilt when the pins differ.
PINS: dict[str, list[str]] = {
    "huey": ["huey==2.5.2", "redis==5.2.1"],
    "dramatiq": ["dramatiq[redis]==1.17.1"],
    "taskiq": ["taskiq==0.11.17", "taskiq-redis==1.0.8"],
    "celery": ["celery[redis]==5.4.0", "kombu==5.4.2"],
}
CHART_PINS = ["matplotlib==3.9.2"]
PEERS = list(PINS)


@dataclass
class System:
    name: str
    bin: Path  # the venv's bin directory
    worker: list[str]
    note: str
    version: str = ""
    figures: list[dict[str, float]] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return self.bin / "python"


def worker_argv(name: str, bin_dir: Path) -> tuple[list[str], str]:
    if name == "qtasks":
        return [str(bin_dir / "qtasks"), "-A", "qtasks_app:app", "run", "-l", "warning"], "c=10"
    if name == "huey":
        return [str(bin_dir / "huey_consumer"), "huey_app.huey", "-q"], "1 thread"
    if name == "dramatiq":
        return [str(bin_dir / "dramatiq"), "dramatiq_app", "--processes", "1"], "1 proc, 8 thr"
    if name == "taskiq":
        argv = [str(bin_dir / "taskiq"), "worker", "taskiq_app:broker", "--workers", "1"]
        return [*argv, "--log-level", "WARNING"], "1 proc, async"
    if name == "celery":
        argv = [str(bin_dir / "celery"), "-A", "celery_app", "worker", "-c", "1"]
        return [*argv, "-l", "warning"], "prefork c=1"
    raise ValueError(name)


# -- virtual environments ------------------------------------------------------------------


def ensure_venv(directory: Path, pins: list[str]) -> Path:
    """A venv at `directory` with `pins` installed (reused when its recorded pins match)."""
    stamp = directory / "bench-pins.txt"
    wanted = "\n".join(pins) + "\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return directory / "bin"
    print(f"setting up {directory} with {' '.join(pins)}", file=sys.stderr)
    if not (directory / "bin" / "python").exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    subprocess.run(
        [str(directory / "bin" / "python"), "-m", "pip", "install", "-q", *pins], check=True
    )
    stamp.write_text(wanted)
    return directory / "bin"


def version_of(system: System) -> str:
    if system.name == "qtasks":
        from importlib.metadata import version

        return version("qtasks")
    out = subprocess.run(
        [
            str(system.python),
            "-c",
            f"import importlib.metadata as m; print(m.version({system.name!r}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# -- processes -------------------------------------------------------------------------------


def child_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_REDIS_URL"] = url
    env["PYTHONPATH"] = str(APPS)
    env.pop("VIRTUAL_ENV", None)
    return env


def driver(system: System, url: str, mode: str, n: int) -> dict[str, float]:
    out = subprocess.run(
        [str(system.python), str(APPS / "driver.py"), system.name, mode, str(n)],
        cwd=APPS,
        env=child_env(url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{system.name} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Worker:
    """A system's worker CLI in its own process group; `kill()` ends the whole group."""

    def __init__(self, system: System, url: str, log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            system.worker,
            cwd=APPS,
            env=child_env(url),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tree(self) -> list[int]:
        """The worker's pid and its descendants' pids."""
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(parents.get(pid, []))
        return pids

    def peak_rss_mib(self) -> tuple[float, float]:
        """(sum, max) of VmHWM over the process tree, in MiB."""
        peaks = []
        for pid in self.tree():
            with contextlib.suppress(OSError, StopIteration):
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                line = next(x for x in status if x.startswith("VmHWM:"))
                peaks.append(int(line.split()[1]) / 1024)
        return sum(peaks), max(peaks, default=0.0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        # Children of a supervisor can outlive it: end the group (its id is our child's pid).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.log.close()


def wait_counter(control: redis.Redis, target: int, worker: Worker, timeout: float) -> float:
    """Seconds from the counter's first INCR to it reaching `target` (polled every 1 ms)."""
    deadline = time.monotonic() + timeout
    first = None
    while True:
        count = int(control.get("bench:count") or 0)
        now = time.perf_counter()
        if first is None and count >= 1:
            first = now
        if count >= target:
            assert first is not None
            return now - first
        if worker.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {worker.proc.returncode}; see {worker.log.name}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"drain timed out at {count}/{target}")
        time.sleep(0.001)


# -- one turn --------------------------------------------------------------------------------


def one_turn(system: System, url: str, n: int, round_trips: int, logs: Path) -> dict[str, float]:
    control = redis.Redis.from_url(url)
    figures: dict[str, float] = {}
    control.flushdb()
    worker = None
    try:
        enq = driver(system, url, "enqueue", n)
        figures["enqueue"] = enq["rate"]
        queued = int(enq["queued"])
        worker = Worker(system, url, logs / f"{system.name}.log")
        elapsed = wait_counter(control, queued, worker, timeout=max(120.0, n / 20))
        figures["drain"] = (queued - 1) / elapsed
        rt = driver(system, url, "roundtrip", round_trips)
        figures["rt50"] = rt["p50"]
        figures["rt99"] = rt["p99"]
        figures["mem_tree"], figures["mem_max"] = worker.peak_rss_mib()
    finally:
        if worker is not None:
            worker.kill()
        control.flushdb()
        control.close()
    return figures


ROWS = [
    # key, label, unit, higher is better
    ("drain", "drain N queued, one INCR each", "tasks/s", True),
    ("enqueue", "enqueue N, single calls", "calls/s", True),
    ("rt50", "round trip enqueue -> ran, p50", "ms", False),
    ("rt99", "round trip enqueue -> ran, p99", "ms", False),
    ("mem_tree", "worker peak RSS, process tree", "MiB", False),
    ("mem_max", "worker peak RSS, largest process", "MiB", False),
]


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def report(systems: list[System], args: argparse.Namespace, load: str) -> dict[str, object]:
    names = [s.name for s in systems]
    medians: dict[str, dict[str, float]] = {}
    for s in systems:
        medians[s.name] = {
            key: statistics.median(f[key] for f in s.figures)
            for key, *_ in ROWS
            if s.figures and all(key in f for f in s.figures)
        }
    title = f"n={args.n:,}, runs={args.runs}, round trips={args.round_trips}, medians"
    print(f"\nqtasks vs peers on Redis ({args.url}): {title}; load average {load}\n")
    width = 2 + max(10, *(len(x) for s in systems for x in (s.name, s.note, s.version)))
    header = f"{'workload':<42}" + "".join(f"{n:>{width}}" for n in names)
    print(header + f"{'qtasks/best':>14}")
    print(f"{'versions':<42}" + "".join(f"{s.version:>{width}}" for s in systems))
    print(f"{'worker concurrency':<42}" + "".join(f"{s.note:>{width}}" for s in systems))
    chart_rows = []
    for key, label, unit, higher in ROWS:
        values = {n: medians[n].get(key) for n in names}
        peers = [v for n, v in values.items() if n != "qtasks" and v is not None]
        ratio = "-"
        if values.get("qtasks") is not None and peers:
            best = max(peers) if higher else min(peers)
            ratio = f"{values['qtasks'] / best:.2f}x"
        line = f"{label + ' (' + unit + ')':<42}"
        print(line + "".join(f"{fmt(values[n]):>{width}}" for n in names) + f"{ratio:>14}")
        chart_rows.append([label, unit, {n: v for n, v in values.items() if v is not None}])
    print(
        "\nqtasks/best: qtasks divided by the best peer (highest rate, lowest ms/MiB); above 1"
        " is better for rates, below 1 for ms and MiB."
    )
    return {"title": f"qtasks vs peers on Redis: {title}", "systems": names, "rows": chart_rows}


def draw_chart(data: dict[str, object], cache: Path, out: Path) -> None:
    bin_dir = ensure_venv(cache / "chart", CHART_PINS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    try:
        subprocess.run(
            [str(bin_dir / "python"), str(APPS / "chart.py"), f.name, str(out)], check=True
        )
    finally:
        os.unlink(f.name)
    print(f"chart: {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="Redis database, flushed per turn")
    parser.add_argument("-n", type=int, default=10_000, help="tasks enqueued and drained")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="venvs live here")
    parser.add_argument("--chart", type=Path, help="PNG path (default: a temp dir)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--setup-only", action="store_true")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PINS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")

    systems: list[System] = []
    for name in ["qtasks", *peers]:
        bin_dir = REPO_VENV_BIN if name == "qtasks" else ensure_venv(args.cache / name, PINS[name])
        argv_, note = worker_argv(name, bin_dir)
        systems.append(System(name, bin_dir, argv_, note))
    if args.setup_only:
        if not args.no_chart:
            ensure_venv(args.cache / "chart", CHART_PINS)
        return
    for s in systems:
        s.version = version_of(s)

    logs = Path(tempfile.mkdtemp(prefix="qtasks-bench-peers-"))
    print(f"worker logs: {logs}", file=sys.stderr)
    for run in range(args.runs):
        order = systems[run % len(systems) :] + systems[: run % len(systems)]
        for s in order:
            t0 = time.perf_counter()
            s.figures.append(one_turn(s, args.url, args.n, args.round_trips, logs))
            print(
                f"run {run + 1}/{args.runs} {s.name}: "
                + ", ".join(f"{k} {fmt(v)}" for k, v in s.figures[-1].items())
                + f" ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    data = report(systems, args, load)
    if not args.no_chart:
        out = args.chart or Path(tempfile.mkdtemp(prefix="qtasks-bench-chart-")) / "peers.png"
        draw_chart(data, args.cache, out)


if __name__ == "__main__":
    main()
