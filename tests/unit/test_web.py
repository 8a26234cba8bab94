"""The web dashboard (`qtasks.web`) through Starlette's TestClient, and `qtasks web` via main().

Each test writes an app module to a fresh folder, on memory:// (state lives in the module)
or on an SQLite file there. Workers run between client sessions on a loop of their own,
as a worker process would.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import re
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qtasks.cli.main import main
from qtasks.runtime.worker import Worker
from qtasks.stats.report import TaskStats
from qtasks.web.app import CHART_SAMPLES, SESSION_COOKIE, Throughput, chart_svg, create_app

with warnings.catch_warnings():
    # Starlette asks for `httpx2` now; the dev extra has httpx, which still works.
    warnings.filterwarnings("ignore", message=".*install `httpx2` instead")
    from starlette.testclient import TestClient

PREFIX = "qt_web_test_"
SAME_ORIGIN = {"Origin": "http://testserver"}

APP_SOURCE = """
    from qtasks.asyncio import QueueTasks

    app = QueueTasks("webapp", broker_url=URL)
    FLAKY = {"fail": True}

    @app.task
    async def hello(name: str, punctuation: str = "!") -> str:
        return f"hi {name}{punctuation}"

    @app.task
    async def boom() -> None:
        raise RuntimeError("kaput <script>")

    @app.task
    async def flaky(n: int) -> int:
        if FLAKY["fail"]:
            raise ValueError(f"flaky failure {n}")
        return n * 2
"""


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> ModuleType:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    name = PREFIX + uuid.uuid4().hex[:8]
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'q.db'}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP_SOURCE).replace("URL", repr(url)))
    return importlib.import_module(name)


def _cleanup(module: ModuleType) -> None:
    asyncio.run(module.app.stop())
    for loaded in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[loaded]


@pytest.fixture
def mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The app module on memory://."""
    module = _module(tmp_path, monkeypatch, "memory")
    yield module
    _cleanup(module)


@pytest.fixture(params=["memory", "sqlite"])
def any_mod(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """The app module on memory:// and on an SQLite file."""
    module = _module(tmp_path, monkeypatch, request.param)
    yield module
    _cleanup(module)


def on_app(module: ModuleType, coro_fn: Any) -> Any:
    async def go() -> Any:
        await module.app.start()
        try:
            return await coro_fn(module.app)
        finally:
            await module.app.stop()

    return asyncio.run(go())


def add(module: ModuleType, name: str, *args: Any, **options: Any) -> str:
    async def go(app: Any) -> str:
        return str((await app.add_task(name, *args, **options)).uuid)

    result: str = on_app(module, go)
    return result


def work(module: ModuleType, *uuids: str) -> dict[str, Any]:
    """Run a worker until `uuids` are final; its registry entry stays, as if still alive."""

    async def go(app: Any) -> dict[str, Any]:
        worker = Worker()
        await worker.start(app)
        for u in uuids:
            await app.wait(u, 5)
        info = worker.info()
        await worker.stop()
        await app.global_config.register_worker(info)
        return info

    result: dict[str, Any] = on_app(module, go)
    return result


def client(module: ModuleType, **auth: Any) -> TestClient:
    return TestClient(create_app(module.app, **auth), follow_redirects=False)


# -- pages and their JSON ---------------------------------------------------------------


def test_overview_shows_workers_queues_counters_and_failures(any_mod: ModuleType) -> None:
    ok = add(any_mod, "hello", "amy")
    bad = add(any_mod, "boom")
    info = work(any_mod, ok, bad)
    add(any_mod, "hello", "queued")

    with client(any_mod) as web:
        page = web.get("/")
        assert page.status_code == 200
        html = page.text
        for expected in ("Workers", "Queues", "Tasks", "Recent failures", "Throughput"):
            assert expected in html
        assert info["id"] in html
        assert "alive" in html
        assert "hello" in html
        assert "boom" in html
        assert bad in html
        assert "data-live='/api/overview'" in html
        assert "<script>" in html
        assert "kaput &lt;script&gt;" in html  # escaped, never markup
        assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # no CDN

        data = web.get("/api/overview").json()
        counters = {t["name"]: t for t in data["tasks"]}
        assert (counters["hello"]["succeeded"], counters["boom"]["failed"]) == (1, 1)
        assert [w["status"] for w in data["workers"]] == ["alive"]
        (default,) = [q for q in data["queues"] if q["queue"] == "default"]
        assert default["total"] == 1
        assert [f["uuid"] for f in data["failures"]] == [bad]
        assert set(data["html"]) >= {"workers", "queues", "tasks", "chart", "failures"}

        assert web.get("/api/workers").json()["workers"][0]["id"] == info["id"]
        assert web.get("/api/app").json()["app"]["name"] == "webapp"


def test_task_detail_shows_arguments_result_and_traceback(any_mod: ModuleType) -> None:
    ok = add(any_mod, "hello", "amy", task_kwargs={"punctuation": "?"})
    bad = add(any_mod, "boom")
    work(any_mod, ok, bad)

    with client(any_mod) as web:
        html = web.get(f"/tasks/{bad}").text
        assert "Traceback" in html
        assert "RuntimeError: kaput &lt;script&gt;" in html
        assert "raise RuntimeError(&quot;kaput &lt;script&gt;&quot;)" in html
        assert f"action='/tasks/{bad}/retry'" in html
        assert "attempts" in html
        assert f"data-live='/api/tasks/{bad}'" in html

        html = web.get(f"/tasks/{ok}").text
        assert "&quot;hi amy?&quot;" in html  # the result, as JSON
        assert "&quot;punctuation&quot;:&quot;?&quot;" in html
        assert "&quot;amy&quot;" in html
        assert "/retry" not in html  # only failed or cancelled tasks can be retried

        data = web.get(f"/api/tasks/{ok}").json()
        assert (data["task"]["status"], data["task"]["returning"]) == ("success", "hi amy?")
        assert "Traceback" in web.get(f"/api/tasks/{bad}").json()["task"]["traceback"]

        missing = str(uuid.uuid4())
        assert web.get(f"/tasks/{missing}").status_code == 404
        assert web.get("/tasks/not-a-uuid").status_code == 404
        assert web.get(f"/api/tasks/{missing}").json() == {
            "error": f"no task {missing} (unknown or expired)"
        }


def test_task_list_filters_and_uuid_search(mod: ModuleType) -> None:
    ok = add(mod, "hello", "amy")
    bad = add(mod, "boom")
    flaky = add(mod, "flaky", 1)
    work(mod, ok, bad, flaky)

    with client(mod) as web:
        html = web.get("/tasks").text
        assert all(u in html for u in (ok, bad, flaky))

        html = web.get("/tasks?status=error").text
        assert bad in html
        assert flaky in html
        assert ok not in html

        html = web.get("/tasks?status=error&name=boom").text
        assert bad in html
        assert flaky not in html

        assert [t["uuid"] for t in web.get("/api/tasks?status=success").json()["tasks"]] == [ok]
        assert web.get("/api/tasks?name=hello&since=300").json()["tasks"][0]["uuid"] == ok
        assert web.get("/api/tasks?status=new").json()["tasks"] == []

        found = web.get(f"/tasks?uuid={bad}")
        assert (found.status_code, found.headers["location"]) == (303, f"/tasks/{bad}")
        html = web.get(f"/tasks?uuid={ok[:8]}").text  # a prefix lists the matches
        assert ok in html
        assert bad not in html
        assert "no tasks match" in web.get(f"/tasks?uuid={uuid.uuid4()}").text

        assert web.get("/tasks?status=bogus").status_code == 400
        assert web.get("/api/tasks?since=soon").status_code == 400


def test_retry_reenqueues_a_failed_task_that_then_succeeds(any_mod: ModuleType) -> None:
    failed = add(any_mod, "flaky", 21)
    work(any_mod, failed)
    any_mod.FLAKY["fail"] = False

    with client(any_mod) as web:
        assert "ValueError: flaky failure 21" in web.get(f"/tasks/{failed}").text
        response = web.post(f"/tasks/{failed}/retry", headers=SAME_ORIGIN)
        assert response.status_code == 303
        new = response.headers["location"].split("?")[0].rsplit("/", 1)[1]
        assert new != failed
        page = web.get(response.headers["location"])
        assert "retry of" in page.text
        assert web.get(f"/api/tasks/{new}").json()["task"]["status"] == "new"

    work(any_mod, new)

    with client(any_mod) as web:
        data = web.get(f"/api/tasks/{new}").json()["task"]
        assert (data["status"], data["returning"], data["args"]) == ("success", 42, [21])
        assert "success" in web.get(f"/tasks/{new}").text
        # the API form answers with JSON; a finished task cannot be retried
        conflict = web.post(f"/api/tasks/{new}/retry", headers=SAME_ORIGIN)
        assert conflict.status_code == 409
        assert "only failed or cancelled" in conflict.json()["error"]


def test_cancel_and_purge_actions(mod: ModuleType) -> None:
    first = add(mod, "hello", "a")
    add(mod, "hello", "b")
    add(mod, "hello", "c")

    with client(mod) as web:
        response = web.post(f"/tasks/{first}/cancel", headers=SAME_ORIGIN)
        assert (response.status_code, response.headers["location"]) == (
            303,
            f"/tasks/{first}?done=cancelled",
        )
        assert web.get(f"/api/tasks/{first}").json()["task"]["status"] == "cancel"

        response = web.post("/queues/default/purge", headers=SAME_ORIGIN)
        assert response.status_code == 303
        assert "purged 2 queued task(s) from default" in web.get(response.headers["location"]).text
        assert web.post("/api/queues/default/purge", headers=SAME_ORIGIN).json() == {
            "queue": "default",
            "dropped": 0,
        }
        assert len(web.get("/api/tasks?status=cancel").json()["tasks"]) == 3


def test_dead_letters_page_retry_drop_and_purge(any_mod: ModuleType) -> None:
    first, second, third = add(any_mod, "flaky", 1), add(any_mod, "boom"), add(any_mod, "nope")
    work(any_mod, first, second, third)
    any_mod.FLAKY["fail"] = False

    with client(any_mod) as web:
        page = web.get("/dead-letters").text
        for u in (first, second, third):
            assert u in page
        assert "unknown_task" in page
        assert "ValueError: flaky failure 1" in page
        assert "kaput &lt;script&gt;" in page, "details are escaped"
        assert "Purge dead letters of default" in page
        overview = web.get("/").text
        assert "/dead-letters?queue=default" in overview, "the count links to the letters"
        data = web.get("/api/dead-letters").json()
        assert {x["uuid"] for x in data["dead_letters"]} == {first, second, third}
        assert {x["reason"] for x in data["dead_letters"]} == {"failed", "unknown_task"}

        response = web.post(f"/dead-letters/{first}/retry", headers=SAME_ORIGIN)
        assert response.status_code == 303
        assert response.headers["location"].startswith(f"/tasks/{first}?")
        assert web.get(f"/api/tasks/{first}").json()["task"]["status"] == "new"

        response = web.post(f"/api/dead-letters/{second}/drop", headers=SAME_ORIGIN)
        assert response.json() == {"action": "drop", "uuids": [second]}
        missing = web.post(f"/api/dead-letters/{second}/drop", headers=SAME_ORIGIN)
        assert missing.status_code == 409
        assert "no dead letter" in missing.json()["error"]
        assert web.post(f"/dead-letters/{third}/drop").status_code == 403, "same origin only"

        response = web.post("/queues/default/dead-letters/purge", headers=SAME_ORIGIN)
        assert response.status_code == 303
        assert "dropped 1 dead letter(s) of default" in web.get(response.headers["location"]).text
        assert web.get("/api/dead-letters").json()["dead_letters"] == []

    work(any_mod, first)
    with client(any_mod) as web:
        assert web.get(f"/api/tasks/{first}").json()["task"]["returning"] == 2


def test_cross_origin_writes_are_refused(mod: ModuleType) -> None:
    bad = add(mod, "boom")
    work(mod, bad)
    queued = add(mod, "hello", "x")

    with client(mod) as web:
        for headers in (
            {"Origin": "http://evil.example"},
            {},  # neither Origin nor Referer
            {"Origin": "null"},
            {"Referer": "http://evil.example/page"},
            {"Origin": "http://testserver", "Sec-Fetch-Site": "cross-site"},
        ):
            assert web.post(f"/tasks/{bad}/retry", headers=headers).status_code == 403
            assert web.post(f"/api/tasks/{queued}/cancel", headers=headers).status_code == 403
            assert web.post("/queues/default/purge", headers=headers).status_code == 403
        assert web.get("/api/tasks?status=new").json()["tasks"][0]["uuid"] == queued
        assert len(web.get("/api/tasks").json()["tasks"]) == 2  # nothing retried

        referer = {"Referer": f"http://testserver/tasks/{bad}"}
        assert web.post(f"/tasks/{bad}/retry", headers=referer).status_code == 303


def test_secrets_are_never_shown(mod: ModuleType) -> None:
    mod.app.storage_url = "redis://ops:hunter2@db.internal:6379/0"
    with client(mod) as web:
        for path in ("/", "/api/app", "/api/overview"):
            text = web.get(path).text
            assert "hunter2" not in text
            assert "ops:***@db.internal" in text


# -- auth -------------------------------------------------------------------------------


def test_token_auth(mod: ModuleType) -> None:
    with client(mod, token="s3cret") as web:
        refused = web.get("/")
        assert refused.status_code == 401
        assert "name='token'" in refused.text  # a sign-in form for browsers
        assert web.get("/api/overview").status_code == 401
        assert web.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert web.get("/?token=wrong").status_code == 401

        bearer = {"Authorization": "Bearer s3cret"}
        assert web.get("/api/overview", headers=bearer).status_code == 200
        # a Bearer client (not a browser) may write without Origin
        assert web.post("/api/queues/default/purge", headers=bearer).status_code == 200

        signed_in = web.get("/tasks?status=error&token=s3cret")
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "http://testserver/tasks?status=error"
        cookie = web.cookies.get(SESSION_COOKIE)
        assert cookie
        assert "s3cret" not in cookie
        assert "HttpOnly" in signed_in.headers["set-cookie"]
        assert web.get("/tasks?status=error").status_code == 200  # the cookie is enough now
        # the cookie does not excuse a cross-origin write
        assert web.post("/queues/default/purge").status_code == 403


def test_basic_auth(mod: ModuleType) -> None:
    with client(mod, basic=("admin", "pw")) as web:
        refused = web.get("/")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Basic realm="qtasks"'
        assert web.get("/", auth=("admin", "nope")).status_code == 401
        bad = base64.b64encode(b"\xff\xfe").decode()
        assert web.get("/", headers={"Authorization": f"Basic {bad}"}).status_code == 401
        assert web.get("/", auth=("admin", "pw")).status_code == 200
        assert web.get("/api/queues", auth=("admin", "pw")).status_code == 200


# -- throughput chart -------------------------------------------------------------------


def test_throughput_from_counter_samples() -> None:
    chart = Throughput()
    assert chart.rates() == []
    assert "after a few refreshes" in chart_svg([])
    chart.add(100.0, [TaskStats("a", True, processed=10, failed=1)])
    chart.add(100.5, [TaskStats("a", True, processed=99)])  # under a second: ignored
    chart.add(102.0, [TaskStats("a", True, processed=30, failed=5)])
    chart.add(104.0, [TaskStats("a", True, processed=2)])  # a restarted worker
    assert chart.rates() == [(102.0, 10.0, 2.0), (104.0, 0.0, 0.0)]
    svg = chart_svg(chart.rates())
    assert svg.startswith("<svg")
    assert "peak 10.0 tasks/s" in svg
    assert "#dc2626" in svg  # failures drawn
    assert "2 samples" in svg


def test_throughput_chart_fills_from_the_right() -> None:
    # One sample is one slot wide at the right edge, not a bar as wide as the chart.
    svg = chart_svg([(1.0, 4.0, 0.0)], width=600)
    found = re.search(r"<rect x='([\d.]+)' y='[\d.]+' width='([\d.]+)'", svg)
    assert found is not None
    x, bar_width = float(found[1]), float(found[2])
    assert bar_width < 600 / (CHART_SAMPLES - 2)
    assert x + bar_width == pytest.approx(599, abs=1.5)
    assert "· 1 sample<" in svg
    # More samples than slots: only the newest are drawn, the oldest dropped.
    many = [(float(i), float(i), 0.0) for i in range(CHART_SAMPLES * 2)]
    assert chart_svg(many).count("<rect") == CHART_SAMPLES - 1
    assert f"last {CHART_SAMPLES * 2 - 1:.1f}/s" in chart_svg(many)


# -- the command ------------------------------------------------------------------------


def test_web_command_refuses_public_bind_without_auth(
    mod: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[dict[str, Any]] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.append(kw))
    target = f"{mod.__name__}:app"

    assert main(["-A", target, "web", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve the dashboard on 0.0.0.0 without auth" in err
    assert "--insecure-bind" in err
    assert main(["-A", target, "web", "--host", "192.168.1.20", "--port", "9000"]) == 2
    assert main(["-A", target, "web", "--basic", "nocolon"]) == 2
    assert main(["-A", target, "web", "--token", " "]) == 2
    assert served == []

    assert main(["-A", target, "web"]) == 0
    assert main(["-A", target, "web", "--host", "::1", "--port", "9001"]) == 0
    assert main(["-A", target, "web", "--host", "0.0.0.0", "--token", "t"]) == 0
    assert main(["-A", target, "web", "--host", "0.0.0.0", "--basic", "a:b"]) == 0
    assert main(["-A", target, "web", "--host", "0.0.0.0", "--insecure-bind"]) == 0
    assert [(s["host"], s["port"]) for s in served] == [
        ("127.0.0.1", 8000),
        ("::1", 9001),
        ("0.0.0.0", 8000),
        ("0.0.0.0", 8000),
        ("0.0.0.0", 8000),
    ]
    assert "http://[::1]:9001/" in capsys.readouterr().err


def test_web_command_without_the_extra(
    mod: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["-A", f"{mod.__name__}:app", "web"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "Error: the dashboard needs Starlette and uvicorn: pip install 'qtasks[web]'"


def test_web_command_needs_an_app(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QTASKS_APP", raising=False)
    assert main(["web"]) == 2
    assert "no app given" in capsys.readouterr().err
