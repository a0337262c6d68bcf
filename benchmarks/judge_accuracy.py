"""Precision and recall of the shipped refusal judge on its labelled replies, as a results file.

The even half of ``data/judge_labelled.jsonl`` was read while the phrase lists were written; the odd half
was not, and gives the honest figure. Pure Python, a second on any machine::

    python benchmarks/judge_accuracy.py            # writes benchmarks/results/judge.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from transformers_sra.judge import is_refusal, judge_accuracy, labelled_replies

ROOT = Path(__file__).resolve().parent.parent


def measure() -> dict:
    rows = labelled_replies()
    table = []
    for name, subset in ((f"held-out (odd half, n = {len(rows[1::2])})", rows[1::2]), (f"all (n = {len(rows)})", rows)):
        acc = judge_accuracy(is_refusal, subset)
        table.append({"name": name, "precision": acc["precision"], "recall": acc["recall"], "accuracy": acc["accuracy"]})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {"commit": commit.strip(), "command": "python benchmarks/judge_accuracy.py",
            "columns": [["name", "labelled replies"], ["precision", "precision (refusal)"],
                        ["recall", "recall (refusal)"], ["accuracy", "accuracy"]],
            "rows": table}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge.json"))
    out = Path(parser.parse_args().out)
    out.write_text(json.dumps(measure(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", out)
