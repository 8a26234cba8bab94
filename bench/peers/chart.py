"""Draw bench_peers.py's results as a PNG (run with a Python that has matplotlib).

    python chart.py RESULTS.json OUT.png

RESULTS.json: {"title": str, "systems": [...], "rows": [[workload, unit, {system: value}]]}.
One panel per workload, one bar per system; qtasks's bar is drawn darker.
"""

from __future__ import annotations

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    data = json.loads(open(sys.argv[1]).read())  # noqa: SIM115
    systems: list[str] = data["systems"]
    rows = data["rows"]
    cols = 2
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, (workload, unit, values) in zip(axes.flat, rows, strict=False):
        heights = [values.get(s) or 0.0 for s in systems]
        colors = ["#1f4e79" if s == "qtasks" else "#9dc3e6" for s in systems]
        bars = ax.bar(systems, heights, color=colors)
        ax.bar_label(bars, labels=[f"{h:,.0f}" if h >= 100 else f"{h:.2f}" for h in heights])
        ax.set_title(f"{workload} ({unit})", fontsize=10)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(data["title"], fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
