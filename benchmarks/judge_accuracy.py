"""Precision and recall of the shipped judge (`judge.classify`) on its labelled replies, as a results file.

Refusals: the even half of ``data/judge_labelled.jsonl`` was read while the phrase lists were written; the odd
half was not, and gives the honest figure. Degenerate replies (loops): ``data/degenerate_labelled.jsonl``, loops
against lists, hashtags, dialogue, tables and code, written together with the loop detector (so its figure is
an upper bound), plus the degenerate rows of the held-out half. Pure Python, a second on any machine::

    python benchmarks/judge_accuracy.py            # writes benchmarks/results/judge.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers_sra.evaluation import git_commit
from transformers_sra.judge import classify, degenerate_labelled, judge_accuracy, labelled_replies

ROOT = Path(__file__).resolve().parent.parent


def measure() -> dict:
    rows = labelled_replies()
    table = []
    loops = degenerate_labelled()
    for label, name, subset in (
            ("refusal", f"refusals, held-out (odd half, n = {len(rows[1::2])})", rows[1::2]),
            ("refusal", f"refusals, all (n = {len(rows)})", rows),
            ("degenerate", f"loops, held-out half (n = {len(rows[1::2])})", rows[1::2]),
            ("degenerate", f"loops vs lists, hashtags, dialogue, tables, code (n = {len(loops)})", loops)):
        acc = judge_accuracy(classify, subset, label=label)
        table.append({"name": name, "precision": acc["precision"], "recall": acc["recall"], "accuracy": acc["accuracy"]})
    return {"commit": git_commit(), "command": "python benchmarks/judge_accuracy.py",
            "columns": [["name", "labelled replies"], ["precision", "precision"], ["recall", "recall"],
                        ["accuracy", "accuracy (three outcomes)"]],
            "rows": table}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge.json"))
    out = Path(parser.parse_args().out)
    out.write_text(json.dumps(measure(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", out)
