"""Record a timed ``make demo`` as a results file: wall time per stage, the evaluation plan and peak memory.

Run ``make demo`` on a fresh clone under GNU time, with the demo model's cache empty, then record it::

    git clone . /tmp/demo && cd /tmp/demo
    TRANSFORMERS_SRA_CACHE=/tmp/demo-cache /usr/bin/time -v make demo > /tmp/demo.log 2>&1
    python benchmarks/make_demo_record.py --folder /tmp/demo/qwen-sra --time-log /tmp/demo.log \
        --commit "$(git -C /tmp/demo rev-parse HEAD)"

Run the record with the same ``ONEDNN_MAX_CPU_ISA``/``ATEN_CPU_CAPABILITY`` as ``make demo`` (if any): the JSON
keeps them beside the CPU's flags. Stages come from the folder's ``sra_report.json`` (``timings``: the CLI's and
the pipeline's); "install" is the elapsed time GNU time measured for the whole command less everything ``sra
ablate`` timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from _common import cpu_flags_record

# torch's CPU kernel restriction, which makes a CPU with native bf16 run like an AVX2-only one for bf16 matmuls
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")

COLUMNS = [["name", "stage"], ["seconds", "wall seconds", "{:.0f}"]]


def elapsed_seconds(log: str) -> float:
    """GNU time's "Elapsed (wall clock) time (h:mm:ss or m:ss)" in seconds."""
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log)
    if not match:
        raise SystemExit("no GNU time 'Elapsed (wall clock)' line in the log: run make demo under /usr/bin/time -v")
    seconds = 0.0
    for part in match.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def exit_status(log: str) -> str:
    """GNU time's "Exit status", or "?" when the log has none."""
    match = re.search(r"Exit status: (\d+)", log)
    return match.group(1) if match else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="the folder make demo wrote (qwen-sra)")
    parser.add_argument("--time-log", required=True, help="make demo's output under /usr/bin/time -v")
    parser.add_argument("--commit", required=True, help="the commit of the clone make demo ran in")
    parser.add_argument("--note", default="", help="what was warm or shared (pip cache, other jobs)")
    parser.add_argument("--out", default="benchmarks/results/make_demo.json")
    parser.add_argument("--command", default="make demo", help="the command as run, e.g. with its SRA_ARGS")
    args = parser.parse_args()
    report = json.loads((Path(args.folder) / "sra_report.json").read_text())
    log = Path(args.time_log).read_text(errors="replace")
    total = elapsed_seconds(log)
    timings = report["timings"]
    order = ["load", "plan evaluation", "evaluate base", "validate", "extract", "validation", "search", "bake", "mine",
             "evaluate edit"]
    stages = [(name, timings[name]) for name in order if name in timings]
    stages += [(name, t) for name, t in timings.items() if name not in order]
    install = total - sum(t for _, t in stages)
    rest = "install, start-up and save (make, pip, imports, writing the folder: the rest of the wall time)"
    rows = [{"name": rest, "seconds": install}]
    rows += [{"name": f"sra ablate: {name}", "seconds": t} for name, t in stages]
    rows.append({"name": "total (GNU time, elapsed)", "seconds": total})
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    sizes = report["metrics"].get("sets", {})
    record = {"commit": args.commit, "command": f"{args.command} (fresh clone, empty TRANSFORMERS_SRA_CACHE)",
              "note": args.note, "columns": COLUMNS, "rows": rows, "sets": sizes,
              "peak_rss_gib": round(int(peak.group(1)) / 2**20, 2) if peak else None,
              "report_peak_memory": report.get("peak_memory"), "exit_status": exit_status(log),
              "cpu_flags": cpu_flags_record(),
              "isa_restriction": {v: os.environ[v] for v in ISA_VARIABLES if v in os.environ}}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "columns"}, indent=1))


if __name__ == "__main__":
    main()
