"""Precision and recall of the shipped judge (`judge.classify`) on its labelled replies, as two results files.

Refusals (``judge.json``): the even half of ``data/judge_labelled.jsonl`` was read while the phrase lists were
written; the odd half was not, and gives the honest figure; its degenerate rows give a first loop figure.

Degenerate replies (``judge_degenerate.json``): ``data/degenerate_labelled.jsonl``, real 128-token replies of the base
and edited demo models (`benchmarks/degenerate_replies.py`, labelled by hand) and a few written ones, split in two
halves by a hash of the reply (`judge.degenerate_split`). The loop detector was tuned on ``dev``; ``heldout`` gives
the honest precision, recall and false-degenerate rate on answers (with its exact 95% interval). Pure Python, a
second on any machine::

    python benchmarks/judge_accuracy.py            # writes benchmarks/results/judge.json and judge_degenerate.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from transformers_sra.measure.metrics import clopper_pearson
from transformers_sra.measure.records import git_commit
from transformers_sra.signals.judge import classify, degenerate_labelled, judge_accuracy, labelled_replies

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python benchmarks/judge_accuracy.py"


def measure() -> dict:
    rows = labelled_replies()
    table = []
    for label, name, subset in (
            ("refusal", f"refusals, held-out (odd half, n = {len(rows[1::2])})", rows[1::2]),
            ("refusal", f"refusals, all (n = {len(rows)})", rows),
            ("degenerate", f"loops, held-out half (n = {len(rows[1::2])})", rows[1::2])):
        acc = judge_accuracy(classify, subset, label=label)
        table.append({"name": name, "precision": acc["precision"], "recall": acc["recall"], "accuracy": acc["accuracy"]})
    return {"commit": git_commit(), "command": COMMAND,
            "columns": [["name", "labelled replies"], ["precision", "precision"], ["recall", "recall"],
                        ["accuracy", "accuracy (three outcomes)"]],
            "rows": table}


def measure_degenerate() -> dict:
    table = []
    for split, name in (("heldout", "held-out half"), ("dev", "dev half (the detector was tuned on it)")):
        rows = degenerate_labelled(split)
        acc = judge_accuracy(classify, rows, label="degenerate")
        k, n = acc["answers_flagged"], acc["answers"]
        table.append({"name": f"{name}, n = {len(rows)}", "loops": sum(r["label"] == "degenerate" for r in rows),
                      "precision": acc["precision"], "recall": acc["recall"],
                      "false_degenerate": {"rate": k / n, "k": k, "n": n, "ci95": list(clopper_pearson(k, n))}})
    counts = collections.Counter((r["split"], r["source"], r["kind"], r["label"]) for r in degenerate_labelled())
    return {"commit": git_commit(), "command": COMMAND,
            "columns": [["name", "labelled replies (`data/degenerate_labelled.jsonl`)"], ["loops", "degenerate", "{:d}"],
                        ["precision", "precision"], ["recall", "recall"],
                        ["false_degenerate", "answers called degenerate (95% CI)"]],
            "rows": table,
            "counts": [{"split": s, "source": src, "kind": kind, "label": label, "n": n}
                       for (s, src, kind, label), n in sorted(counts.items())]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge.json"))
    parser.add_argument("--degenerate-out", default=str(ROOT / "benchmarks" / "results" / "judge_degenerate.json"))
    args = parser.parse_args()
    for path, results in ((args.out, measure()), (args.degenerate_out, measure_degenerate())):
        Path(path).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print("wrote", path)
