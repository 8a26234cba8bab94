"""qtasks on Redis side by side with huey, dramatiq, taskiq and celery, in the same run.

    python bench/bench_peers.py                         # 10,000 tasks, 3 interleaved runs
    python bench/bench_peers.py -n 2000 --peers huey,taskiq --chart /tmp/peers.png
    python bench/bench_peers.py --setup-only            # just create/refresh the venvs

Each peer is installed, at the pinned versions below, from PyPI into its own virtual
environment under `--cache` (default ~/.cache/qtasks-bench/<peer>, reused when present);
qtasks too, as this checkout installed editable with only its `redis` extra (like a
production install). matplotlib goes into a venv of its own there too
(`chart`), never into the project. The task apps are bench/peers/<system>_app.py.

Every system gets the same tasks: `incr` does one Redis INCR on a shared counter, `ping`
one RPUSH, `nap` sleeps 50 ms (asyncio.sleep in qtasks and taskiq, time.sleep in the
thread-based huey, dramatiq and celery) then does the INCR, and `count` does the INCR and
returns the new count. Redis db 14 (`--url`) is flushed before and after each system's
turn and before its I/O-bound phase, so use a database nothing else uses. Per run, for
each system in turn (the order rotates between runs, and figures are medians of the runs):

  enqueue      N single enqueue calls, one after another, no worker running
               (bench/peers/driver.py in the system's venv: await add_task / kiq, delay(),
               send(), calling the huey task)
  drain        the N queued tasks, one worker process started with the system's own CLI;
               the clock runs from the first INCR to the N-th (the counter polled every
               1 ms), so interpreter start-up and imports are left out
  round trip   enqueue -> the task ran, p50 and p99 of --round-trips trips on the idle
               worker: `ping` RPUSHes, the driver waits with BLPOP (blocking, no polling)
               and the time includes the enqueue call
  memory       peak RSS (VmHWM) after the drain and those round trips, summed over the
               worker's process tree (supervisor + children) and of its largest process
  result API   enqueue `count` -> its return value in the producer, through the system's
               own result API as its users call it (defaults kept, 5 s timeout), p50 and
               p99 of --round-trips trips on the same idle worker (after the memory
               reading, so that row is as before):
                 qtasks    await app.add_task("count", timeout=5)   the finished record
                 huey      count().get(blocking=True)    polls: 0.1 s first, then backoff
                 dramatiq  count.send().get_result(block=True)  Results(RedisBackend),
                           a blocking pop, no polling
                 taskiq    await (await count.kiq()).wait_result()  RedisAsyncResultBackend,
                           polls every 0.2 s (its default check_interval)
                 celery    count.delay().get()   Redis result backend, pub/sub, no polling
  I/O-bound    2,000 `nap` tasks queued (untimed), then a fresh worker process running
               100 at once (settings below); the clock runs from the first INCR to the
               2,000th like the drain's, plus the 50 ms the first task slept before its
               INCR, so 100 tasks at a time, 50 ms each, gives the ideal: exactly 2,000/s

Result backends are set up so the other rows measure what they did without one: huey
keeps results by default but not None ones, and only `count` returns a value; dramatiq's
Results middleware stores only for actors with store_results=True (`count`), though it
now looks that option up after every message; celery's other tasks have
ignore_result=True (no result subscription when sent, nothing stored when run); taskiq
stores every task's result, so its backend is RedisAsyncResultBackend minus successful
None results (bench/peers/taskiq_app.py). qtasks keeps a record for every task anyway.

Worker settings (one worker process, otherwise the defaults; logging kept to warnings):

  qtasks    qtasks run                         asyncio, concurrency 10 (max_tasks_process)
  huey      huey_consumer -q                   1 worker thread, blocking BRPOP
  dramatiq  dramatiq --processes 1             supervisor + 1 process with 8 threads
  taskiq    taskiq worker --workers 1          supervisor + 1 process, asyncio
                                               (RedisStreamBroker, acks)
  celery    celery worker -c 1 -l warning      prefork: main + 1 child, prefetch 4

and for the I/O-bound row, each system's own way to run 100 tasks at once in one process:

  qtasks    qtasks run --concurrency 100
  huey      huey_consumer -q -k thread -w 100
  dramatiq  dramatiq --processes 1 --threads 100
  taskiq    taskiq worker --workers 1 --max-async-tasks 100   (100 is also its default)
  celery    celery worker -P threads -c 100 -l warning        (prefetch 4 x 100)

Workers run in their own process group, killed (SIGTERM, then SIGKILL) when each phase
ends and on every exit path (SIGTERM and SIGHUP to this script unwind like Ctrl-C). The
machine may be shared: compare columns of one run, and mind the load average printed
with the table. The result-API trips of huey and taskiq take 0.1-0.2 s each (polling),
so --round-trips 500 adds about 2.5 minutes per run.
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
REPO = HERE.parent
# qtasks gets a venv of its own too, with only the `redis` extra (editable, so it runs this
# checkout): the repository's dev venv also holds OpenTelemetry, which redis-py imports
# when present, and a worker would carry ~4 MiB no production install has.
QTASKS_PINS = ["-e", f"{REPO}[redis]"]
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
IO_TASKS = 2000  # the I/O-bound row: this many `nap` tasks (50 ms sleep, then one INCR)
IO_CONCURRENCY = 100
NAP = 0.05  # bench/peers/common.py's NAP


@dataclass
class System:
    name: str
    bin: Path  # the venv's bin directory
    worker: list[str]
    note: str
    io_worker: list[str]
    io_note: str
    version: str = ""
    figures: list[dict[str, float]] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return self.bin / "python"


def worker_argv(name: str, bin_dir: Path) -> tuple[list[str], str]:
    """The worker command for every row but the I/O-bound one: the system's defaults."""
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


def io_worker_argv(name: str, bin_dir: Path) -> tuple[list[str], str]:
    """The worker command for the I/O-bound row: one process running 100 tasks at once."""
    if name == "qtasks":
        argv = [str(bin_dir / "qtasks"), "-A", "qtasks_app:app", "run", "--concurrency"]
        return [*argv, str(IO_CONCURRENCY), "-l", "warning"], "c=100"
    if name == "huey":
        argv = [str(bin_dir / "huey_consumer"), "huey_app.huey", "-q", "-k", "thread", "-w"]
        return [*argv, str(IO_CONCURRENCY)], "100 threads"
    if name == "dramatiq":
        argv = [str(bin_dir / "dramatiq"), "dramatiq_app", "--processes", "1", "--threads"]
        return [*argv, str(IO_CONCURRENCY)], "1 proc, 100 thr"
    if name == "taskiq":
        argv = [str(bin_dir / "taskiq"), "worker", "taskiq_app:broker", "--workers", "1"]
        argv += ["--max-async-tasks", str(IO_CONCURRENCY), "--log-level", "WARNING"]
        return argv, "1 proc, 100 async"
    if name == "celery":
        argv = [str(bin_dir / "celery"), "-A", "celery_app", "worker", "-P", "threads", "-c"]
        return [*argv, str(IO_CONCURRENCY), "-l", "warning"], "threads c=100"
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

    def __init__(self, argv: list[str], url: str, log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            argv,
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
        if self.log.closed:  # killed already
            return
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
            raise RuntimeError(f"counter timed out at {count}/{target}")
        time.sleep(0.001)


# -- one turn --------------------------------------------------------------------------------


def one_turn(system: System, url: str, n: int, round_trips: int, logs: Path) -> dict[str, float]:
    control = redis.Redis.from_url(url)
    figures: dict[str, float] = {}
    workers: list[Worker] = []
    log = logs / f"{system.name}.log"
    control.flushdb()
    try:
        # The default worker: enqueue (none running), drain, round trips, memory, result API.
        enq = driver(system, url, "enqueue", n)
        figures["enqueue"] = enq["rate"]
        queued = int(enq["queued"])
        workers.append(worker := Worker(system.worker, url, log))
        elapsed = wait_counter(control, queued, worker, timeout=max(120.0, n / 20))
        figures["drain"] = (queued - 1) / elapsed
        rt = driver(system, url, "roundtrip", round_trips)
        figures["rt50"] = rt["p50"]
        figures["rt99"] = rt["p99"]
        figures["mem_tree"], figures["mem_max"] = worker.peak_rss_mib()
        rt = driver(system, url, "result", round_trips)
        figures["res50"] = rt["p50"]
        figures["res99"] = rt["p99"]
        worker.kill()
        # I/O-bound: a fresh database and a worker at concurrency 100 for IO_TASKS naps.
        control.flushdb()
        queued = int(driver(system, url, "nap", IO_TASKS)["queued"])
        workers.append(worker := Worker(system.io_worker, url, log))
        elapsed = wait_counter(control, queued, worker, timeout=120.0)
        # The clock starts at the first INCR, which comes NAP after the first task began:
        # adding NAP back makes 100 tasks at a time, 50 ms each, exactly 2,000/s.
        figures["io"] = queued / (elapsed + NAP)
    finally:
        for w in workers:
            w.kill()
        control.flushdb()
        control.close()
    return figures


ROWS = [
    # key, label, unit, higher is better
    ("drain", "drain N queued, one INCR each", "tasks/s", True),
    ("enqueue", "enqueue N, single calls", "calls/s", True),
    ("io", "I/O-bound 2,000 x 50 ms, c=100", "tasks/s", True),
    ("rt50", "round trip enqueue -> ran, p50", "ms", False),
    ("rt99", "round trip enqueue -> ran, p99", "ms", False),
    ("res50", "round trip via result API, p50", "ms", False),
    ("res99", "round trip via result API, p99", "ms", False),
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
    cells = [x for s in systems for x in (s.name, s.note, s.io_note, s.version)]
    width = 2 + max(10, *(len(x) for x in cells))
    header = f"{'workload':<42}" + "".join(f"{n:>{width}}" for n in names)
    print(header + f"{'qtasks/best':>14}")
    print(f"{'versions':<42}" + "".join(f"{s.version:>{width}}" for s in systems))
    print(f"{'worker concurrency':<42}" + "".join(f"{s.note:>{width}}" for s in systems))
    print(
        f"{'worker concurrency, I/O-bound row':<42}"
        + "".join(f"{s.io_note:>{width}}" for s in systems)
    )
    chart_rows = []
    for key, label, unit, higher in ROWS:
        values = {n: medians[n].get(key) for n in names}
        peers = [v for n, v in values.items() if n != "qtasks" and v is not None]
        ratio = "-"
        if values.get("qtasks") is not None and peers:
            best = max(peers) if higher else min(peers)
            r = values["qtasks"] / best
            ratio = f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"
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


def exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


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
        pins = QTASKS_PINS if name == "qtasks" else PINS[name]
        bin_dir = ensure_venv(args.cache / name, pins)
        argv_, note = worker_argv(name, bin_dir)
        io_argv, io_note = io_worker_argv(name, bin_dir)
        systems.append(System(name, bin_dir, argv_, note, io_argv, io_note))
    if args.setup_only:
        if not args.no_chart:
            ensure_venv(args.cache / "chart", CHART_PINS)
        return
    for s in systems:
        s.version = version_of(s)
        # As pip does at install: the peers' packages have their bytecode, and qtasks (an
        # editable checkout) and the task apps get theirs now, so no worker compiles from
        # source at start (about 3 MiB more RSS where PYTHONDONTWRITEBYTECODE is set).
        targets = [str(APPS)] + ([str(REPO / "src" / "qtasks")] if s.name == "qtasks" else [])
        subprocess.run([str(s.python), "-m", "compileall", "-q", *targets], check=True)

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every turn's `finally` kills its workers.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
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
