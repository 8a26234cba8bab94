"""The fault harness: CLI worker processes, a producer, the ledger and the figures.

A `Scenario` owns everything one test starts: its folder, its settings (which the
workers get as $QTFAULT_SETTINGS), its worker processes (each killed and reaped at the
end, never anything else), and a producer app. Figures come from two sources that do
not depend on each other: the ledger the tasks append to (how often each function ran,
when, in which process) and the storage's records (what ended up done):

    lost = enqueued - done      (acknowledged enqueues without a final record)
    dup  = runs - done          (extra starts of a task's function)

The scenarios of the dead-letter queue (3, 9, 10, 12, 13, 19, in `test_poison_faults.py`)
count dead-lettered records (status `error`) as done-with-reason the same way, and read
the `D`/`J` ledger lines (`Ledger.decodes`) to count decode attempts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qtasks import QueueTasks, Task, TaskStatusEnum

from .tasks import SETTINGS_ENV, build_app

REPO = Path(__file__).resolve().parents[2]
FINAL = {TaskStatusEnum.SUCCESS, TaskStatusEnum.ERROR, TaskStatusEnum.CANCEL}

FAST_LIVENESS = {
    "heartbeat_interval_seconds": 0.5,
    "worker_lost_after_seconds": 3.0,
    "sweep_interval_seconds": 1.0,
}
"""Shortened liveness settings: a dead worker's tasks come back within about 4 s."""


@dataclasses.dataclass
class LedgerLine:
    kind: str
    uuid: str
    pid: int
    t: float


class Ledger:
    """Reads the per-process ledger files of one scenario folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def raw_lines(self) -> Iterator[list[str]]:
        """The words of every complete line of every ledger file.

        A line being appended while it is read can come out cut short (a read does not
        wait for a write to a regular file); it is left for the next read.
        """
        for path in sorted(self.folder.glob("ledger-*.log")):
            text = path.read_text()
            for raw in text[: text.rfind("\n") + 1].splitlines():
                yield raw.split()

    def lines(self) -> list[LedgerLine]:
        out = []
        for words in self.raw_lines():
            if words and words[0] in {"S", "E", "F"}:
                out.append(LedgerLine(words[0], words[1], int(words[2]), float(words[3])))
        return out

    def partitions(self) -> dict[int, set[tuple[str, int]]]:
        """Kafka partitions each worker pid fetched from."""
        out: dict[int, set[tuple[str, int]]] = collections.defaultdict(set)
        for words in self.raw_lines():
            if words and words[0] == "P":
                out[int(words[1])].add((words[2], int(words[3])))
        return out

    def probes(self) -> list[dict[str, float]]:
        """The `M` lines of the probe task, oldest first."""
        out = []
        for w in self.raw_lines():
            if w and w[0] == "M":
                keys = ("pid", "rss_kb", "fds", "tasks", "threads", "t")
                out.append(dict(zip(keys, map(float, w[2:]), strict=True)))
        return sorted(out, key=lambda m: m["t"])

    def decodes(self, kind: str = "D") -> collections.Counter[str]:
        """Body digests handed to the serializer (`D`) or to its JSON decoder (`J`)."""
        out: collections.Counter[str] = collections.Counter()
        for w in self.raw_lines():
            if w and w[0] == kind:
                out[w[1]] += 1
        return out

    def starts(self) -> collections.Counter[str]:
        return collections.Counter(ln.uuid for ln in self.lines() if ln.kind == "S")

    def ended(self) -> set[str]:
        return {ln.uuid for ln in self.lines() if ln.kind in {"E", "F"}}


class WorkerProc:
    """One `python -m qtasks -A tests.faults.worker_app:app run ...` process."""

    def __init__(self, folder: Path, settings: dict[str, Any], args: Sequence[str]) -> None:
        self.log_path = folder / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            SETTINGS_ENV: json.dumps(settings),
        }
        cmd = [sys.executable, "-m", "qtasks", "-A", "tests.faults.worker_app:app", "run", *args]
        self.started_at = time.time()
        self.proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.alive():
            self.kill()
        self._log.close()


@dataclasses.dataclass
class Figures:
    enqueued: int
    done: int
    runs: int
    lost: int
    dup: int
    missing: list[str]
    statuses: collections.Counter[str]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll until true; the seconds it took (AssertionError after `timeout`)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


class Scenario:
    """Everything one fault scenario starts, and the figures it reports."""

    def __init__(
        self,
        name: str,
        broker: str,
        folder: Path,
        *,
        broker_url: str,
        storage_url: str | None = None,
        config: dict[str, Any] | None = None,
        report: Callable[[str], None] | None = None,
        **extra: Any,
    ) -> None:
        self.name = name
        self.broker = broker
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ledger").mkdir(exist_ok=True)
        self.settings: dict[str, Any] = {
            "name": f"qtf{os.getpid()}x{time.monotonic_ns() % 10**9}",
            "broker_url": broker_url,
            "storage_url": storage_url,
            "ledger_dir": str(folder / "ledger"),
            "config": {"poll_interval_seconds": 0.01, **(config or {})},
            **extra,
        }
        self.ledger = Ledger(folder / "ledger")
        self.workers: list[WorkerProc] = []
        self.enqueued: list[str] = []
        self._producer: QueueTasks | None = None
        self._report = report

    # -- processes -------------------------------------------------------------------

    def start_worker(self, *args: str, **overrides: Any) -> WorkerProc:
        settings = {**self.settings, **overrides}
        worker = WorkerProc(self.folder, settings, args)
        self.workers.append(worker)
        return worker

    @property
    def producer(self) -> QueueTasks:
        if self._producer is None:
            self._producer = build_app(self.settings, producer=True)
        return self._producer

    def enqueue(self, calls: Iterable[tuple[Any, ...]], chunk: int = 1000) -> list[str]:
        """Enqueue in chunks; every uuid returned was acknowledged to the producer."""
        calls = list(calls)
        uuids: list[str] = []
        for i in range(0, len(calls), chunk):
            records = self.producer.add_tasks(calls[i : i + chunk])
            got = [str(r.uuid) for r in records]
            self.enqueued += got
            uuids += got
        return uuids

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def worker_logs(self) -> str:
        return "\n".join(f"--- worker {w.pid} ---\n{w.log()[-6000:]}" for w in self.workers)

    # -- figures ---------------------------------------------------------------------

    def records(self, uuids: Sequence[str]) -> dict[str, Task | None]:
        core = self.producer.core

        async def fetch() -> list[Task | None]:
            out: list[Task | None] = []
            for i in range(0, len(uuids), 500):
                out += await asyncio.gather(*(core.get(u) for u in uuids[i : i + 500]))
            return out

        found = self.producer.portal.call(fetch())
        return dict(zip(uuids, found, strict=True))

    def wait_all_ran(self, timeout: float, uuids: Sequence[str] | None = None) -> float:
        """Wait until every task's function has ended once (ledger E/F); seconds taken."""
        want = set(self.enqueued if uuids is None else uuids)
        return wait_for(lambda: want <= self.ledger.ended(), timeout, "every task to run", 0.2)

    def wait_final(self, timeout: float, uuids: Sequence[str] | None = None) -> dict[str, Task]:
        """Wait until every record is final (success/error/cancel); the records."""
        pending = list(self.enqueued if uuids is None else uuids)
        final: dict[str, Task] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for uuid, record in self.records(pending).items():
                if record is not None and record.status in FINAL:
                    final[uuid] = record
            pending = [u for u in pending if u not in final]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return final

    def figures(self, timeout: float = 15.0) -> Figures:
        final = self.wait_final(timeout)
        starts = self.ledger.starts()
        enqueued = set(self.enqueued)
        done = len(final)
        runs = sum(n for u, n in starts.items() if u in enqueued)
        ran = [u for u in final if starts[u]]  # tasks whose function was meant to run
        missing = [u for u in self.enqueued if u not in final]
        return Figures(
            enqueued=len(self.enqueued),
            done=done,
            runs=runs,
            lost=len(enqueued) - done,
            dup=runs - len(ran),
            missing=missing[:10],
            statuses=collections.Counter(str(r.status) for r in final.values()),
        )

    def report(self, figures: Figures | None, **extra: Any) -> str:
        parts = [f"scenario {self.name:<4} {self.broker:<8}"]
        if figures is not None:
            parts.append(
                f"enqueued={figures.enqueued} done={figures.done} runs={figures.runs} "
                f"lost={figures.lost} dup={figures.dup}"
            )
        parts += [f"{k}={_fmt(v)}" for k, v in extra.items()]
        line = " ".join(parts)
        if self._report is not None:
            self._report(line)
        return line


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)
