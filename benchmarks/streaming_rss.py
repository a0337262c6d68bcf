"""Peak memory of the streaming bake (`sra bake`) against the in-memory bake, each in its own process.

Saves the model (default: the demo model, fp32) in shards, then runs in fresh subprocesses: the imports alone
(the baseline), the in-memory bake (``from_pretrained`` + `reapply_edit` + ``save_pretrained``) and `stream_bake`,
and reads each one's peak RSS (`transformers_sra.report.peak_rss`: VmHWM, as ``getrusage`` would carry the
parent's RSS into the child). Checks that both
outputs are equal bit for bit.
Prints a table and writes ``benchmarks/results/streaming_rss-<model>.json``::

    python benchmarks/streaming_rss.py                       # demo model, 200 MB shards
    python benchmarks/streaming_rss.py --model DIR --shard 500MB
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

from transformers_sra.report import peak_rss

GIB = 1 << 30

RUNS = ("imports only", "in-memory bake", "streaming bake")


def child(run: str, base: str, report: str, out: str, shard: str) -> None:
    """One run in this fresh process; prints its peak RSS (`peak_rss`) and seconds as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers_sra.method.editing import reapply_edit
    from transformers_sra.publish.bake import stream_bake
    from transformers_sra.report import SRAReport

    torch.set_num_threads(1)
    start = time.perf_counter()
    if run == "in-memory bake":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        reapply_edit(model, SRAReport.load(report))
        model.save_pretrained(out, max_shard_size=shard)
    elif run == "streaming bake":
        stream_bake(base, report, out)
    print(json.dumps({"peak_rss": peak_rss(), "seconds": time.perf_counter() - start}))


def run_child(run: str, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", run, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_report(model, path: Path) -> None:
    """Two directions and a tent profile, as a pipeline run would record them (the memory cost does not depend on them)."""
    import torch

    from transformers_sra.report import SRAReport

    gen = torch.Generator().manual_seed(0)
    dirs = [torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=gen), dim=0).tolist()
            for _ in range(2)]
    SRAReport(model_name="benchmark", model_type=model.config.model_type, config={}, direction_layer=0, fluency_rank=0,
              strength={"peak": 1.2, "floor": 0.2, "center": 0.6, "width": 0.4}, bake_layers=None, writers_edited=0,
              directions=dirs, dirty_direction=dirs[0], search=[], validation={}, atom_audit={}, explained_share={},
              target_coverage={}, iterations=[{"gamma": 1.0, "accepted": True}], timings={}).save(path)


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                out.update({k: shard for k in f.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for key in ia:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or a model folder")
    parser.add_argument("--shard", default="200MB", help="max_shard_size of the saved checkpoint")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import torch
    from transformers import AutoModelForCausalLM

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if args.model == "demo":
            from transformers_sra import load_demo_model

            model, _ = load_demo_model(dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(tmp / "base", max_shard_size=args.shard)
        make_report(model, tmp / "report.json")
        del model
        shards = sorted((tmp / "base").glob("*.safetensors"))
        rows = {}
        for name in RUNS:
            rows[name] = run_child(name, str(tmp / "base"), str(tmp / "report.json"), str(tmp / name.replace(" ", "-")),
                                   args.shard)
        equal = same_tensors(tmp / "in-memory-bake", tmp / "streaming-bake")
        largest = max(s.stat().st_size for s in shards)
    base = rows["imports only"]["peak_rss"]
    from transformers_sra.measure.records import git_commit  # here: the parent's imports stay those of the runs
    result = {"model": args.model, "model_gib": round(model_bytes / GIB, 3), "shards": len(shards),
              "largest_shard_gib": round(largest / GIB, 3),
              "runs": {k: {"peak_rss_gib": round(v["peak_rss"] / GIB, 3), "seconds": round(v["seconds"], 1),
                           "above_imports_gib": round((v["peak_rss"] - base) / GIB, 3)} for k, v in rows.items()},
              "streaming_above_imports_in_largest_shards": round((rows["streaming bake"]["peak_rss"] - base) / largest, 2),
              "in_memory_over_streaming": round(rows["in-memory bake"]["peak_rss"] / rows["streaming bake"]["peak_rss"], 2),
              "bit_for_bit_equal": equal,
              "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
              "commit": git_commit()}
    print(f"{args.model}: {result['model_gib']} GiB in memory (fp32), {len(shards)} shards, largest "
          f"{result['largest_shard_gib']} GiB; load {result['load_average']}")
    for name, row in result["runs"].items():
        print(f"  {name:15s} peak RSS {row['peak_rss_gib']:6.2f} GiB  (+{row['above_imports_gib']:.2f} over imports)  "
              f"{row['seconds']:7.1f} s")
    print(f"  streaming peak above imports = {result['streaming_above_imports_in_largest_shards']} × the largest shard; "
          f"in-memory / streaming peak = {result['in_memory_over_streaming']}; outputs equal bit for bit: {equal}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "demo" if args.model == "demo" else Path(args.model).name
    (out / f"streaming_rss-{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
