"""The suite's own ledger reader: what it counts must be what the tasks wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Ledger

pytestmark = pytest.mark.faults


def test_a_line_cut_short_by_a_concurrent_append_is_left_for_the_next_read(
    tmp_path: Path,
) -> None:
    # A read of a file being appended to can end mid-line: the reader parsed "E 4f2a 12"
    # and failed with IndexError while the scenario waited for its tasks (Kafka, CI).
    path = tmp_path / "ledger-12.log"
    path.write_text("S 4f2a 12 1.000000\nE 4f2a 12")
    ledger = Ledger(tmp_path)
    assert [(ln.kind, ln.uuid) for ln in ledger.lines()] == [("S", "4f2a")]
    with path.open("a") as f:
        f.write(" 2.000000\n")
    assert [(ln.kind, ln.uuid) for ln in ledger.lines()] == [("S", "4f2a"), ("E", "4f2a")]
