"""Record a timed run of CI's own command (``.ci/run``) as a results file: install, test run and total wall time.

Run it on a fresh clone under GNU time, with the demo model's cache empty, then record it::

    git clone . /tmp/ci && cd /tmp/ci
    SRA_RESULTS=/tmp/ci-headline.json TRANSFORMERS_SRA_CACHE=/tmp/ci-cache /usr/bin/time -v .ci/run > /tmp/ci.log 2>&1
    python benchmarks/ci_record.py --time-log /tmp/ci.log --commit "$(git -C /tmp/ci rev-parse HEAD)"

The test run's seconds and counts come from pytest's summary line; "install" is the rest of GNU time's elapsed
time (venv, torch, the package with its extras, the demo model's assembly and conversion, ruff).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from make_demo_record import elapsed_seconds, exit_status

COLUMNS = [["name", "stage"], ["seconds", "wall seconds", "{:.0f}"], ["minutes", "minutes", "{:.1f}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-log", required=True, help=".ci/run's output under /usr/bin/time -v")
    parser.add_argument("--commit", required=True, help="the commit of the clone CI's command ran in")
    parser.add_argument("--note", default="", help="what was warm or shared (pip cache, other jobs)")
    parser.add_argument("--out", default="benchmarks/results/ci_run.json")
    args = parser.parse_args()
    log = Path(args.time_log).read_text(encoding="utf-8", errors="replace")
    summary = re.findall(r"^=* ?(\d+ passed.*?) in ([\d.]+)s", log, re.M)
    if not summary:
        raise SystemExit("no pytest summary line ('N passed ... in S s') in the log")
    outcome, tests = summary[-1][0], float(summary[-1][1])
    total = elapsed_seconds(log)
    rows = [{"name": "install: venv, torch, the package and extras, the demo model; ruff", "seconds": total - tests},
            {"name": f"the README's test command, `python -m pytest -q` ({outcome})", "seconds": tests},
            {"name": "total (GNU time, elapsed)", "seconds": total}]
    for row in rows:
        row["minutes"] = row["seconds"] / 60
    record = {"commit": args.commit, "command": ".ci/run on a fresh clone (empty TRANSFORMERS_SRA_CACHE)",
              "note": args.note, "columns": COLUMNS, "rows": rows,
              "exit_status": exit_status(log)}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
