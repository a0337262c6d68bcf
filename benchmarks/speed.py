"""Cost of extraction and of search candidates, measured side by side in one run against the forward passes they need.

Prints, and writes to ``benchmarks/results/speed-<model>.json`` with the git commit and the machine load:

* extraction (`record_residuals` at the default candidate layers) against a bare decoder forward
  (``model.get_decoder()(**batch)``: no hooks, no LM head) and the full ``model(**batch)`` over the same
  length-sorted batches; targets ≤ 1.05× and ≤ 0.8×;
* padding waste of the batches extraction and scoring run (share of token slots that are padding); target ≤ 10%;
* one search candidate (hook ablation + `Validation.measure`) against the same passes without hooks; target ≤ 1.1×;
* peak RSS of a child process that runs the pipeline's steps (extraction, base scoring, one candidate, one bake)
  against the model's in-memory size; target ≤ 1.3× size + 1 GiB (``--device cuda``: the child's peak
  ``torch.cuda.max_memory_allocated()`` instead, against the same budget); and the whole command's peak, the larger
  of this process's and the child's (`transformers_sra.report.peak_rss`, the one measure the library reports too);
* extraction time against prompt count and against depth (the deepest recorded layer), with a line fit;
* the parameter count, total and without the token embedding and the LM head (what extraction and the bare decoder
  forward multiply by; the embedding lookup is free). ``--count-parameters`` adds the latter to a file written
  before speed.py recorded it, from the model built from its config on the meta device, and times nothing.

Timings are CPU seconds of the benchmark process at one thread (wall time on a shared machine mostly measures the
other processes); the compared functions alternate round by round and each keeps its best round. With
``--device cuda`` the model runs on the GPU and timings are wall seconds between two ``torch.cuda.synchronize()``
calls (CPU time would miss the GPU's work); the JSON is then ``speed-<model>-cuda.json``.

``--model`` is ``demo``, a Hub id, or a folder. A folder that holds only ``config.json`` and the tokenizer files (no
weights) gets a model built from the config with random weights (speed does not depend on weight values); the
output and the JSON say "random weights"::

    python benchmarks/speed.py                                   # the demo model (0.5B), 1 thread
    python benchmarks/speed.py --model ~/.cache/transformers_sra/qwen2.5-coder-1.5b-instruct
    python benchmarks/speed.py --device cuda --model path/to/config-and-tokenizer-folder
    python benchmarks/speed.py --count-parameters --model demo  # into benchmarks/results/speed-demo.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from transformers_sra import load_corpus, load_prompts
from transformers_sra.batching import encode_texts, id_batches, input_device, pad_id, shared_prefix_length, sorted_batches
from transformers_sra.measure.records import git_commit
from transformers_sra.method.editing import ablate_activations, bake_direction
from transformers_sra.method.extraction import record_residuals
from transformers_sra.method.search import Validation, default_candidates
from transformers_sra.models.architectures import decoder_layers
from transformers_sra.prompts import format_chat
from transformers_sra.report import peak_rss
from transformers_sra.strength import StrengthProfile

GIB = 1 << 30
RANDOM_WEIGHTS = "random weights"
# files that hold a checkpoint's weights; a folder with none of them is a config (and tokenizer) only
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.safetensors.index.json")


def has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_FILES)


def load(name: str, device: str = "cpu"):
    """``(model, tokenizer, weights)`` in fp32 on ``device``; ``weights`` is "checkpoint" or `RANDOM_WEIGHTS` (a
    folder without weight files: the model is built from its config.json, seeded, random)."""
    if name == "demo":
        from transformers_sra import load_demo_model

        model, tok = load_demo_model(dtype=torch.float32)
        return model.to(device).eval(), tok, "checkpoint"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(name).expanduser()
    tok = AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else name)
    if folder.is_dir() and not has_weights(folder):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch.float32)
        return model.to(device).eval(), tok, RANDOM_WEIGHTS
    model = AutoModelForCausalLM.from_pretrained(str(folder) if folder.is_dir() else name, dtype=torch.float32)
    return model.to(device).eval(), tok, "checkpoint"


def best_of(fns: dict[str, Callable[[], object]], rounds: int, device: str = "cpu") -> dict[str, float]:
    """Each function's fastest round; the functions alternate within every round. On the CPU in CPU seconds of this
    process (one thread: what other processes on a shared machine take from wall time is not counted); on CUDA in
    wall seconds between two ``torch.cuda.synchronize()`` (the GPU's work is not CPU time of this process)."""
    cuda = device == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            with torch.no_grad():
                fn()
            if cuda:
                torch.cuda.synchronize()
            best[name] = min(best[name], clock() - start)
    return best


def line_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = a + b x and its R² (1 for exactly linear growth)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss > 0 else 1.0
    return {"intercept_s": round(a, 4), "slope_s": round(b, 5), "r2": round(r2, 4)}


def non_embedding_parameters(model) -> int:
    """Parameters less the token embedding and the LM head (counted once when tied)."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def count_parameters(args) -> None:
    """Add ``non_embedding_parameters`` to the existing results file of ``args.model`` without timing anything: the
    model is built from its config on the meta device, and its parameter count must equal the one the file holds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers_sra.demo import demo_model_dir

    folder = demo_model_dir() if args.model == "demo" else Path(args.model).expanduser()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    path = results_path(args.out, args.model, args.device)
    result = json.loads(path.read_text(encoding="utf-8"))
    total = sum(p.numel() for p in model.parameters())
    if total != result["parameters"]:
        sys.exit(f"{folder}'s config builds {total} parameters, {path} holds {result['parameters']}: another model")
    result["non_embedding_parameters"] = non_embedding_parameters(model)
    result["non_embedding_parameters_by"] = (f"python benchmarks/speed.py --count-parameters --model {args.model} at "
                                             f"commit {git_commit()} (config on the meta device, no timing)")
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"{path}: {result['non_embedding_parameters']} non-embedding parameters of {total}")


def results_path(out: str, model: str, device: str) -> Path:
    """``<out>/speed-<model>[-cuda].json``: ``demo``, or the model folder's or Hub id's last part."""
    name = "demo" if model == "demo" else Path(model).name
    return Path(out) / f"speed-{name}{'-cuda' if device == 'cuda' else ''}.json"


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def padding_waste(tokenizer, texts: list[str], batch_size: int) -> dict:
    """Padding share of the batches `prompt_batches` builds (the shared chat prefix is run once, not padded)."""
    encoded = encode_texts(tokenizer, texts)
    n = shared_prefix_length(encoded)
    out = {}
    for name, rows in (("sorted, shared prefix cached", [e[n:] for e in encoded]), ("sorted, full prompts", encoded)):
        slots = pads = 0
        for b in id_batches(rows, batch_size, torch.device("cpu"), pad_id(tokenizer)):
            slots += b.attention_mask.numel()
            pads += int((b.attention_mask == 0).sum())
        out[name] = round(pads / slots, 4)
    return out


def rss_child(args) -> None:
    """The pipeline's memory-heavy steps in this process; prints its peak RSS (and on CUDA its peak
    ``torch.cuda.max_memory_allocated()``, the model's weights included) as JSON."""
    torch.set_num_threads(1)
    model, tok, _ = load(args.model, args.device)
    n_layers = len(decoder_layers(model))
    layers = default_candidates(n_layers)
    harmful, harmless = load_prompts("harmful_train")[: args.prompts], load_prompts("harmless_train")[: args.prompts]
    acts = [record_residuals(model, tok, p, layers=layers, batch_size=args.batch_size) for p in (harmful, harmless)]
    direction = acts[0][:, -1].mean(0) - acts[1][:, -1].mean(0)
    val = Validation.measure_base(model, tok, load_prompts("harmful_val")[: args.prompts],
                                  load_prompts("harmless_val")[: args.prompts], load_corpus("general_val")[:4],
                                  batch_size=args.batch_size)
    with ablate_activations(model, direction, StrengthProfile(peak=1.2, floor=0.2, center=0.6, width=0.4)):
        val.measure(model, tok)
    bake_direction(model, direction).undo()
    peaks = {"peak_rss": peak_rss(), "model_bytes": model_bytes(model)}
    if args.device == "cuda":
        torch.cuda.synchronize()
        peaks["peak_cuda_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(peaks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', a Hub id, or a model folder (a folder with only "
                        "config.json and tokenizer files: random weights)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="run the model on the CPU (CPU seconds) or on the GPU (synchronized wall seconds)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per extraction (half harmful, half harmless)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-parameters", action="store_true", help="only add the non-embedding parameter count "
                        "to an existing results file (from the model's config on the meta device; no timing)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.rss_child:
        return rss_child(args)
    if args.count_parameters:
        return count_parameters(args)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tok, weights = load(args.model, args.device)
    n_layers = len(decoder_layers(model))
    layers = default_candidates(n_layers)
    prompts = load_prompts("harmful_train")[: args.prompts // 2] + load_prompts("harmless_train")[: args.prompts // 2]
    texts = format_chat(tok, prompts)
    batches = list(sorted_batches(tok, texts, args.batch_size, input_device(model)))
    decoder = model.get_decoder()
    with torch.no_grad():  # one-time costs (allocator, kernels) out of the first timed call
        model(**batches[-1].model_inputs(model), use_cache=False)
    cuda = args.device == "cuda"
    result = {"model": args.model, "weights": weights, "random_weights": weights == RANDOM_WEIGHTS,
              "parameters": sum(p.numel() for p in model.parameters()),
              "non_embedding_parameters": non_embedding_parameters(model), "layers": n_layers, "dtype": "float32",
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "clock": "wall seconds between torch.cuda.synchronize() calls" if cuda else "CPU seconds of this process",
              "threads": args.threads, "prompts": len(prompts), "batch_size": args.batch_size,
              "tokens": int(sum(int(b.attention_mask.sum()) for b in batches)), "torch": torch.__version__}
    if cuda:
        result["cuda"] = torch.version.cuda

    # -- extraction against bare forwards over the same batches ---------------------------------------------------
    t = best_of({
        "extraction": lambda: record_residuals(model, tok, prompts, layers=layers, batch_size=args.batch_size),
        "bare decoder forward": lambda: [decoder(**b.model_inputs(decoder), use_cache=False) for b in batches],
        "full model forward": lambda: [model(**b.model_inputs(model), use_cache=False) for b in batches],
    }, args.rounds, args.device)
    result["extraction"] = {"seconds": {k: round(v, 3) for k, v in t.items()}, "deepest_layer": max(layers),
                            "vs_bare_decoder": round(t["extraction"] / t["bare decoder forward"], 3),
                            "vs_full_model": round(t["extraction"] / t["full model forward"], 3),
                            "targets": {"vs_bare_decoder": 1.05, "vs_full_model": 0.8}}

    # -- padding ---------------------------------------------------------------------------------------------------
    sets = {name: format_chat(tok, load_prompts(name)) for name in ("harmful_train", "harmless_train", "harmful_val",
                                                                      "harmless_val")}
    result["padding_waste"] = {name: padding_waste(tok, texts_, args.batch_size) for name, texts_ in sets.items()}
    result["padding_waste"]["target"] = 0.10

    # -- one search candidate against the same passes without hooks -----------------------------------------------
    n_val = args.prompts // 2
    val = Validation.measure_base(model, tok, load_prompts("harmful_val")[:n_val], load_prompts("harmless_val")[:n_val],
                                  load_corpus("general_val")[:4], batch_size=args.batch_size)
    seeded = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=seeded), dim=0)
    profile = StrengthProfile(peak=1.2, floor=0.2, center=0.6, width=0.4)

    def candidate():
        with ablate_activations(model, direction, profile):
            val.measure(model, tok)

    t = best_of({"candidate": candidate, "unhooked passes": lambda: val.measure(model, tok)}, args.rounds, args.device)
    result["search_candidate"] = {"seconds": {k: round(v, 3) for k, v in t.items()},
                                  "ratio": round(t["candidate"] / t["unhooked passes"], 3), "target": 1.1,
                                  "passes": {"harmful": n_val, "harmless": n_val, "text passages": 4}}

    # -- growth: prompt count and depth -----------------------------------------------------------------------------
    counts = [max(2, args.prompts // 4), max(4, args.prompts // 2), args.prompts, 2 * args.prompts]
    pool = load_prompts("harmful_train") + load_prompts("harmless_train")
    by_count = [best_of({"x": lambda n=n: record_residuals(model, tok, pool[::2][:n], layers=layers,
                                                           batch_size=args.batch_size)}, 1, args.device)["x"]
                for n in counts]
    depths = sorted({max(1, n_layers * k // 4) for k in (1, 2, 3, 4)})
    by_depth = [best_of({"x": lambda d=d: record_residuals(model, tok, prompts, layers=[d - 1],
                                                           batch_size=args.batch_size)}, 1, args.device)["x"]
                for d in depths]
    result["growth"] = {"prompts": counts, "seconds_by_prompts": [round(x, 3) for x in by_count],
                        "fit_prompts": line_fit(counts, by_count),
                        "depth": depths, "seconds_by_depth": [round(x, 3) for x in by_depth],
                        "fit_depth": line_fit(depths, by_depth)}
    model = decoder = batches = val = None  # free them; the names stay bound for the timed lambdas above
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the child gets the GPU's memory

    # -- peak memory of the pipeline's steps, in a fresh process ----------------------------------------------------
    child = subprocess.run([sys.executable, __file__, "--rss-child", "--model", args.model, "--prompts", str(args.prompts),
                            "--batch-size", str(args.batch_size), "--device", args.device],
                           capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"the memory child failed ({child.returncode}):\n{child.stderr[-4000:]}")
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    budget = 1.3 * peaks["model_bytes"] + GIB
    if cuda:
        result["peak_cuda_memory"] = {
            "measure": "torch.cuda.max_memory_allocated() of a fresh process (model weights included) against the "
                       "model's size; replaces peak RSS on CUDA",
            "peak_allocated_gib": round(peaks["peak_cuda_allocated"] / GIB, 3),
            "model_gib": round(peaks["model_bytes"] / GIB, 3), "budget_gib": round(budget / GIB, 3),
            "ratio_to_budget": round(peaks["peak_cuda_allocated"] / budget, 3),
            "host_peak_rss_gib": round(peaks["peak_rss"] / GIB, 3)}
    else:
        result["peak_rss"] = {"peak_rss_gib": round(peaks["peak_rss"] / GIB, 3),
                              "model_gib": round(peaks["model_bytes"] / GIB, 3),
                              "budget_gib": round(budget / GIB, 3), "ratio_to_budget": round(peaks["peak_rss"] / budget, 3)}
    # the whole command, as GNU time would report it: this process (the timings' model) and the child, the larger
    whole = peak_rss(children=True)
    result["peak_rss_command"] = {"peak_rss_gib": round(whole / GIB, 3), "ratio_to_budget": round(whole / budget, 3),
                                  "measure": "the largest peak RSS of this process and its child (transformers_sra."
                                             "report.peak_rss(children=True), GNU time's figure for the command)"}

    result["load_average"] = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    result["commit"] = git_commit()
    print(report(result))
    path = results_path(args.out, args.model, args.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")


def report(r: dict) -> str:
    e, c, g = r["extraction"], r["search_candidate"], r["growth"]
    pad = max(v["sorted, shared prefix cached"] for k, v in r["padding_waste"].items() if k != "target")
    ok = lambda x, target: "ok" if x <= target else "MISSED"  # noqa: E731
    if "peak_cuda_memory" in r:
        m = r["peak_cuda_memory"]
        memory = (f"  peak CUDA memory (torch.cuda.max_memory_allocated) {m['peak_allocated_gib']:.2f} GiB / "
                  f"(1.3 × {m['model_gib']:.2f} GiB + 1 GiB) = {m['ratio_to_budget']:.3f}  (target ≤ 1)  "
                  f"{ok(m['ratio_to_budget'], 1.0)}")
    else:
        m = r["peak_rss"]
        memory = (f"  peak RSS {m['peak_rss_gib']:.2f} GiB / (1.3 × {m['model_gib']:.2f} GiB + 1 GiB) = "
                  f"{m['ratio_to_budget']:.3f}  (target ≤ 1)  {ok(m['ratio_to_budget'], 1.0)}")
        if "peak_rss_command" in r:
            w = r["peak_rss_command"]
            memory += (f"\n  peak RSS of the whole command {w['peak_rss_gib']:.2f} GiB / budget = "
                       f"{w['ratio_to_budget']:.3f}  (target ≤ 1)  {ok(w['ratio_to_budget'], 1.0)}")
    weights = f" ({r['weights']})" if r.get("random_weights") else ""
    lines = [f"{r['model']}{weights}: {r['parameters'] / 1e9:.2f}B parameters, {r['layers']} layers, {r['prompts']} prompts "
             f"({r['tokens']} tokens), batch {r['batch_size']}, {r['threads']} thread(s); load {r['load_average']}",
             f"  on {r.get('device', 'cpu')}, {r.get('dtype', 'float32')}; times in {r.get('clock', 'CPU seconds')}",
             f"  extraction {e['seconds']['extraction']:.2f} s | bare decoder {e['seconds']['bare decoder forward']:.2f} s | "
             f"full model {e['seconds']['full model forward']:.2f} s",
             f"  extraction / bare decoder  {e['vs_bare_decoder']:.3f}  (target ≤ 1.05)  {ok(e['vs_bare_decoder'], 1.05)}",
             f"  extraction / full model    {e['vs_full_model']:.3f}  (target ≤ 0.8)   {ok(e['vs_full_model'], 0.8)}",
             f"  padding waste (worst set)  {pad:.3f}  (target ≤ 0.10)  {ok(pad, 0.10)}",
             f"  search candidate / passes  {c['ratio']:.3f}  (target ≤ 1.1)   {ok(c['ratio'], 1.1)}",
             memory,
             f"  time vs prompts {g['prompts']}: {g['seconds_by_prompts']} s, line fit R² {g['fit_prompts']['r2']}",
             f"  time vs depth {g['depth']}: {g['seconds_by_depth']} s, line fit R² {g['fit_depth']['r2']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
