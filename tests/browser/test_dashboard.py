"""The dashboard in headless Chromium: what an operator sees and clicks.

The pages update themselves by polling their `/api/` twins; a marker set on `window`
before the update and still there after it proves the page was never reloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

    from tests.browser.conftest import Site

pytestmark = pytest.mark.browser

# A live update comes within one poll (3 s); the rest is headroom for a busy machine.
LIVE_TIMEOUT_MS = 15_000


def cell(page: Page, section: str, row_label: str, column: int) -> Locator:
    """The `column`th cell of the row whose first cell reads `row_label`, in one section."""
    first = page.locator("td:first-child", has_text=re.compile(f"^{re.escape(row_label)}$"))
    return page.locator(f"#{section} tr").filter(has=first).locator(":scope > td").nth(column)


def mark_page(page: Page) -> None:
    """Leave a marker that a reload (or any navigation) would wipe."""
    page.evaluate("window.__qtasksNoReload = true")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__qtasksNoReload === true"), "the page was reloaded"


def test_failed_task_found_inspected_and_retried(site: Site, page: Page, screenshots: Path) -> None:
    from playwright.sync_api import expect

    failed_uuid = site.add("ship", "order-42")
    assert site.wait(failed_uuid).status.value == "error"

    # The overview, then the task list filtered to failures, as an operator would.
    page.goto("/")
    expect(page.locator("h1")).to_have_text("overview")
    expect(page.locator("#workers")).to_contain_text("alive", timeout=LIVE_TIMEOUT_MS)
    page.locator("header").get_by_role("link", name="tasks", exact=True).click()
    expect(page.locator("h1")).to_have_text("tasks")
    page.locator("#filters select[name=status]").select_option("error")
    page.locator("#filters").get_by_role("button", name="filter").click()
    expect(page).to_have_url(re.compile(r"/tasks\?status=error"))
    row = page.locator("#records tr", has_text=failed_uuid)
    expect(row).to_contain_text("ship")
    expect(row).to_contain_text("RuntimeError: carrier rejected order-42")

    # The failed task: its traceback is on the page.
    row.get_by_role("link", name=failed_uuid).click()
    expect(page).to_have_url(re.compile(f"/tasks/{failed_uuid}$"))
    expect(cell(page, "record", "status", 1)).to_have_text("error")
    traceback = page.locator("#record pre.traceback")
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("RuntimeError: carrier rejected order-42")
    page.screenshot(path=str(screenshots / "failed-task.png"), full_page=True)

    # Retry: a new task with the same arguments, shown while it waits for `release`.
    page.locator("#record").get_by_role("button", name="Retry").click()
    expect(page.locator(".flash")).to_contain_text(f"retry of {failed_uuid}")
    new_uuid = page.url.rsplit("/", 1)[-1].split("?", 1)[0]
    assert new_uuid != failed_uuid
    expect(cell(page, "record", "uuid", 1)).to_have_text(new_uuid)
    expect(cell(page, "record", "args", 1)).to_have_text('["order-42"]')
    status = cell(page, "record", "status", 1)
    expect(status).to_have_text(re.compile("^(new|process)$"))
    expect(page.locator("#record").get_by_role("button", name="Retry")).to_have_count(0)
    mark_page(page)

    # The task succeeds; the page shows it by itself.
    (site.folder / "release").touch()
    expect(status).to_have_text("success", timeout=LIVE_TIMEOUT_MS)
    expect(cell(page, "record", "result", 1)).to_have_text('"order-42 shipped"')
    expect(page.locator("#record pre.traceback")).to_have_count(0)
    expect(page.locator("#live-status")).to_contain_text(re.compile(r"live · \d"))  # polled
    assert_not_reloaded(page)
    shot = screenshots / "retried-task.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    assert site.wait(new_uuid).returning == "order-42 shipped"


def test_overview_updates_live(site: Site, page: Page, screenshots: Path) -> None:
    from playwright.sync_api import expect

    page.goto("/")
    expect(page.locator("#workers")).to_contain_text("alive", timeout=LIVE_TIMEOUT_MS)
    parked_total = cell(page, "queues", "parked", 1)
    add_processed = cell(page, "tasks", "add", 2)
    expect(parked_total).to_have_text("0")
    expect(add_processed).to_have_text("0")
    mark_page(page)

    # Work arrives after the page was loaded: 3 messages nobody consumes, 5 that run.
    for n in range(3):
        site.add("parked", n)
    done = [site.add("add", n, n) for n in range(5)]
    for uuid in done:
        assert site.wait(uuid).status.value == "success"

    expect(parked_total).to_have_text("3", timeout=LIVE_TIMEOUT_MS)
    expect(add_processed).to_have_text("5", timeout=LIVE_TIMEOUT_MS)
    expect(cell(page, "tasks", "add", 3)).to_have_text("5")  # succeeded
    # The chart's peak rises above zero once a poll has seen the counters grow.
    expect(page.locator("#chart svg[aria-label=throughput]")).to_contain_text(
        re.compile(r"peak (0\.[1-9]|[1-9])"), timeout=LIVE_TIMEOUT_MS
    )
    assert_not_reloaded(page)
    page.screenshot(path=str(screenshots / "overview.png"), full_page=True)
