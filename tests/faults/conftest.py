"""Fixtures of the fault suite: private servers, scenarios on each broker, the report.

Each scenario prints one summary line (lost, dup, recovery times); the lines are also
written to `<basetemp>/faults-report.txt` and shown in the terminal summary, so a run
with `-m faults` ends with the table of figures. `--soak` multiplies sizes by 10.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kafka_server import TEST_GROUP_PARAMS, TansuServer

from .harness import Scenario
from .servers import RabbitNode, RedisServer, tansu

BROKERS = ("sqlite", "redis", "rabbitmq", "kafka")
_REPORT: list[str] = []


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> int:
    """10 with --soak, else 1: multiply task counts by it."""
    return 10 if request.config.getoption("--soak", default=False) else 1


@pytest.fixture(scope="session")
def report_line(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], None]:
    path = tmp_path_factory.getbasetemp() / "faults-report.txt"

    def add(line: str) -> None:
        _REPORT.append(line)
        with path.open("a") as f:
            f.write(line + "\n")
        print(line)

    return add


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak", default=False):
        here = Path(__file__).parent
        for item in items:
            if here in item.path.parents:
                item.add_marker(pytest.mark.timeout(3600))  # sizes x10: time x10


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.section("fault scenarios: figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis (no persistence) for scenarios that do not fault Redis itself."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node (its own name, ports and data)."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuServer]:
    server = tansu(tmp_path_factory.mktemp("tansu"))
    yield server
    server.stop()


MakeScenario = Callable[..., Scenario]


@pytest.fixture
def make_scenario(
    request: pytest.FixtureRequest, tmp_path: Path, report_line: Callable[[str], None]
) -> Iterator[MakeScenario]:
    """`make_scenario(name, broker, redis=None, **kw)`: a Scenario on that broker.

    `redis` replaces the shared private Redis (for scenarios that fault Redis); RabbitMQ
    and Kafka keep results in Redis.
    """
    made: list[Scenario] = []

    def make(name: str, broker: str, *, redis: RedisServer | None = None, **kw: Any) -> Scenario:
        folder = tmp_path / f"s{name}-{broker}-{len(made)}"
        if broker == "sqlite":
            urls: dict[str, Any] = {"broker_url": f"sqlite:///{folder / 'q.sqlite3'}"}
        else:
            redis_url = (redis or request.getfixturevalue("shared_redis")).url
            if broker == "redis":
                urls = {"broker_url": redis_url}
            elif broker == "rabbitmq":
                node: RabbitNode = request.getfixturevalue("rabbit_node")
                urls = {"broker_url": node.url, "storage_url": redis_url}
            elif broker == "kafka":
                server: TansuServer = request.getfixturevalue("kafka_server")
                params = kw.pop("kafka_params", TEST_GROUP_PARAMS)
                urls = {
                    "broker_url": f"kafka://{server.bootstrap}?{params}",
                    "storage_url": redis_url,
                }
            else:
                raise ValueError(broker)
        scenario = Scenario(name, broker, folder, report=report_line, **urls, **kw)
        made.append(scenario)
        return scenario

    yield make
    failed = getattr(request.node, "rep_call", None)
    for scenario in made:
        if failed is not None and failed.failed:
            print(scenario.worker_logs())
        scenario.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
