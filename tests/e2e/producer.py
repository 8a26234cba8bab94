"""A producer process for the e2e tests: enqueue N squares, wait for all, check results.

    python producer.py N   (run with the app module's folder as cwd and on PYTHONPATH)

Prints one JSON line: {"sent": N, "ok": count of correct results, "bad": [...]}.
"""

from __future__ import annotations

import json
import sys

from e2e_app import app, square  # type: ignore[import-not-found]


def main() -> None:
    n = int(sys.argv[1])
    records = [square.add_task(i) for i in range(n)]
    bad = []
    ok = 0
    for i, record in enumerate(records):
        final = app.wait(record.uuid, timeout=120)
        if final.status == "success" and final.returning == i * i:
            ok += 1
        else:
            bad.append([i, str(final.status), final.returning, final.error_message])
    print(json.dumps({"sent": n, "ok": ok, "bad": bad[:10]}))
    app.close()


if __name__ == "__main__":
    main()
