"""Where `sra ablate`'s peak memory comes from: each memory-heavy piece of the run in a fresh process, its peak RSS.

Issue #32 measured 5.4 GiB for `make demo` in fp32 (GNU time's maximum resident set) on a model of 2.35 GiB, against
a target of 1.3 × model + 1 GiB. Each piece below runs alone in its own process, so its peak is its own
(`transformers_sra.report.peak_rss` with its children, as GNU time counts a command); every piece but the first two
loads the model as `sra ablate --dtype float32` does, then runs one step at the sizes the default plan gives it:

* ``imports``: torch, transformers and transformers_sra, nothing loaded;
* ``convert``: the demo model's GGUF dequantized into an fp32 safetensors folder (`demo.convert_gguf`, into a
  temporary folder: the cache is not touched), what a first `make demo` runs before loading;
* ``first use``: `demo.load_demo_model` on an empty cache (a temporary folder holding only a link to the joined
  GGUF): the conversion, then the load, as a first `make demo` runs them; its loaded RSS is what the run starts
  from then (before issue #32 the conversion ran in the same process; now in a child);
* ``load``: the model, from the converted folder (`demo.load_demo_model`), every weight read once (a run reads them
  all; a checkpoint mapped from disk is resident only once read). The pieces below start from here, and say how far
  their peak goes above it;
* ``extract``: `record_residuals` with the first-token log-probs the behaviour filter reads, on the harmful and the
  harmless training prompts at the candidate and later layers (`model_directions.build_directions`' screened pass);
* ``replies``: 64 judged replies to harmful prompts, one batch of 64 rows (`evaluate_model`'s refusal step), none
  stopping early (a judge that never sees a refusal): the longest KV cache;
* ``first-token KL``: the first-token pass over 64 harmless prompts;
* ``multi-token KL``: the base model's 32-token replies to 16 harmless prompts and their top-k pass;
* ``perplexity text / math / code``: 16 passages of each (`evaluate_model`'s perplexity steps, at half the batch);
* ``save``: `hub.save_cleaned` in the checkpoint's bf16 into a temporary folder, as `sra ablate` saves a model
  computed in fp32 (its last step; without the card, a few KiB); before issue #32 that was ``model.to(bf16)`` and
  ``save_pretrained``;
* ``in one process``: ``first use``, then every piece from ``extract`` to ``save`` in that order in the same
  process, as `sra ablate` runs them after a first use (with ``--extract-prompts``, fewer extraction prompts).

Prints a table and writes ``benchmarks/results/memory_peaks.json`` with the CPU flags: under ``runs[LABEL]`` one row
per piece with the commit and settings it ran at (a run of some pieces replaces only their rows), and a table of
every run side by side for `scripts/render_results.py`::

    python benchmarks/memory_peaks.py --label before         # every piece
    python benchmarks/memory_peaks.py --pieces load save     # some of them, as "after"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
PIECES = ("imports", "convert", "first use", "load", "extract", "replies", "first-token KL", "multi-token KL",
          "perplexity text", "perplexity math", "perplexity code", "save", "in one process")
STEPS = PIECES[4:-1]  # what "in one process" runs after its first use, in the pipeline's and evaluation's order


def child(piece: str, args) -> dict:
    """Run ``piece`` in this process; its peak RSS, the RSS once the model is loaded, and the seconds it took."""
    import torch

    from transformers_sra.report import peak_rss

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if piece == "imports":
        import transformers  # noqa: F401

        import transformers_sra  # noqa: F401
        return {"peak_rss": peak_rss(children=True), "seconds": time.perf_counter() - start}
    from transformers_sra.demo import assemble_demo_gguf, convert_gguf, load_demo_model

    if piece == "convert":
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            convert_gguf(assemble_demo_gguf(), Path(tmp) / "converted")
        return {"peak_rss": peak_rss(children=True), "seconds": time.perf_counter() - start}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cache = None
        if piece in ("first use", "in one process"):  # an empty cache but for a link to the joined GGUF
            gguf = assemble_demo_gguf()
            cache = Path(tmp) / "cache"
            (cache / "gguf").mkdir(parents=True)
            (cache / "gguf" / gguf.name).symlink_to(gguf)
        model, tok = load_demo_model(dtype=torch.float32, cache_dir=cache)
        _touch(model)  # a run reads every weight; until then a checkpoint mapped from disk is not resident
        loaded = {"rss_loaded": _rss(), "model_bytes": _bytes(model)}
        for step in STEPS if piece == "in one process" else [] if piece in ("load", "first use") else [piece]:
            _run(step, model, tok, args, Path(tmp))
        return {"peak_rss": peak_rss(children=True), **loaded, "seconds": time.perf_counter() - start}


def _never(reply: str) -> bool:
    return False


def _run(piece: str, model, tok, args, tmp: Path) -> None:
    import torch
    from streaming_rss import make_report  # benchmarks/ is this script's folder

    from transformers_sra import SRAConfig
    from transformers_sra.measure.evaluation import EvalSets, evaluate_model
    from transformers_sra.method.atoms import AtomRegistry
    from transformers_sra.method.extraction import record_residuals
    from transformers_sra.method.inputs import resolve_inputs
    from transformers_sra.publish.hub import save_cleaned
    from transformers_sra.report import SRAReport

    full = EvalSets.default()
    none = {name: [] for name in ("harmful", "harmless", "over_refusal", "text", "math", "code")}
    options = dict(batch_size=16, reply_batch_size=64, judged_harmless=0, reply_kl_prompts=0)
    if piece == "extract":
        config = SRAConfig()
        inputs = resolve_inputs(model, config, AtomRegistry.default(), tok)
        for key in (inputs.sources["harmful"], inputs.sources["harmless"]):
            texts = inputs.texts[key][: args.extract_prompts or None]
            acts, logprobs = record_residuals(model, tok, texts, next_token=True, batch_size=config.batch_size,
                                              layers=inputs.layers + inputs.later_layers)
    elif piece == "replies":  # a judge that never calls a reply a refusal: no reply stops early (the worst case)
        evaluate_model(model, tok, EvalSets(**{**none, "harmful": full.harmful[:64]}), judge=_never,
                       max_new_tokens=args.reply_tokens, **options)
    elif piece == "first-token KL":
        evaluate_model(model, tok, EvalSets(**{**none, "harmless": full.harmless[:64]}), **options)
    elif piece == "multi-token KL":
        evaluate_model(model, tok, EvalSets(**{**none, "harmless": full.harmless[:16]}),
                       **{**options, "reply_kl_prompts": 16})
    elif piece.startswith("perplexity"):
        name = piece.split()[1]
        evaluate_model(model, tok, EvalSets(**{**none, name: getattr(full, name)[:16]}), **options)
    elif piece == "save":  # as `sra ablate` saves a model computed in fp32 from a bf16 checkpoint (no card)
        make_report(model, tmp / "report.json")
        save_cleaned(model, tok, SRAReport.load(tmp / "report.json"), tmp / "saved", card=False, dtype=torch.bfloat16)
    else:
        raise SystemExit(f"unknown piece {piece!r}; choose from {', '.join(PIECES)}")


def _touch(model) -> None:
    for p in model.parameters():
        float(p.detach().sum())


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", nargs="+", default=list(PIECES), choices=PIECES, metavar="PIECE",
                        help=f"which pieces to run (default all: {', '.join(PIECES)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reply-tokens", type=int, default=128, help="reply length of the replies piece")
    parser.add_argument("--extract-prompts", type=int, default=0, help="first N prompts of each training set (0: all)")
    parser.add_argument("--tmp", default=None, help="where the convert and save pieces write (then delete)")
    parser.add_argument("--out", default="benchmarks/results/memory_peaks.json")
    parser.add_argument("--label", default="after", help="the run's name in the JSON (before, after: a fix's two sides)")
    parser.add_argument("--note", default="", help="what else ran on the machine, what changed")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    from _common import cpu_flags_record  # here, not at the top: a child's "imports" piece measures the package alone

    from transformers_sra.measure.records import git_commit, write_results

    rows = []
    for piece in args.pieces:
        argv = [sys.executable, __file__, "--child", piece, "--threads", str(args.threads), "--reply-tokens",
                str(args.reply_tokens), "--extract-prompts", str(args.extract_prompts)]
        proc = subprocess.run(argv + (["--tmp", args.tmp] if args.tmp else []), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{piece} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"piece": piece, "peak_rss_gib": round(r["peak_rss"] / GIB, 3), "seconds": round(r["seconds"], 1)}
        if "rss_loaded" in r:
            row["loaded_rss_gib"] = round(r["rss_loaded"] / GIB, 3)
            row["above_loaded_gib"] = round((r["peak_rss"] - r["rss_loaded"]) / GIB, 3)
            row["model_gib"] = round(r["model_bytes"] / GIB, 3)
        rows.append(row)
        print(f"{piece:>18}  peak {row['peak_rss_gib']:.2f} GiB" + (f", {row['above_loaded_gib']:+.2f} GiB above the "
              f"loaded model" if "above_loaded_gib" in row else "") + f"  ({row['seconds']:.0f} s)", flush=True)
    path = Path(args.out)
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"runs": {}}
    settings = {"commit": git_commit(), "note": args.note, "threads": args.threads, "reply_tokens": args.reply_tokens,
                "extract_prompts": args.extract_prompts or "all", "load_average": [round(x, 2) for x in os.getloadavg()]}
    write_results(path, merged(record, args.label, [{**row, **settings} for row in rows], cpu_flags_record()))
    print(f"wrote {path}")


def merged(record: dict, label: str, rows: list[dict], flags: list) -> dict:
    """``record`` with ``rows`` in place of the same pieces' rows of run ``label`` (each row keeps its commit and
    settings), and the table `scripts/render_results.py` renders: a piece a row, a run a column."""
    runs = record["runs"]
    run = runs.setdefault(label, {"rows": []})
    run["rows"] = sorted([r for r in run["rows"] if r["piece"] not in {row["piece"] for row in rows}] + rows,
                         key=lambda r: PIECES.index(r["piece"]))
    model = next((r["model_gib"] for run in runs.values() for r in run["rows"] if "model_gib" in r), None)

    def cell(r: dict) -> str:
        above = f" ({r['above_loaded_gib']:+.2f} above the loaded model)" if "above_loaded_gib" in r else ""
        return f"{r['peak_rss_gib']:.2f} GiB{above}"

    commits = {label: sorted({r["commit"][:12] for r in run["rows"]}) for label, run in runs.items()}
    table = [{"name": piece, **{label: cell(r) for label, run in runs.items() for r in run["rows"] if r["piece"] == piece}}
             for piece in PIECES if any(r["piece"] == piece for run in runs.values() for r in run["rows"])]
    return {**record, "model_gib": model, "budget_gib": model and round(1.3 * model + 1, 3),
            "cpu_flags": flags,
            "commit": max((r["commit"] for r in run["rows"]), default="unknown"),
            "command": "python benchmarks/memory_peaks.py --label " + " / ".join(
                f"{label} (commit {', '.join(c)})" for label, c in commits.items()),
            "columns": [["name", "piece, each in a fresh process (the demo model in fp32)"]]
                       + [[label, f"{label}: peak RSS", "{}"] for label in runs],
            "rows": table}


if __name__ == "__main__":
    main()
