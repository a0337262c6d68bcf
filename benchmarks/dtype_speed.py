"""What `--dtype auto` chooses between on this CPU: fp32, bf16 and fp16 measured side by side in one run.

`transformers_sra.cli.loading.compute_dtype` computes a bf16 (fp16) checkpoint in its own dtype only on a CPU that
multiplies it in hardware, else in fp32. This times what that choice is about, with the library's own matmul
micro-benchmark (`loading.matmul_seconds`) at the demo model's MLP shape (16 rows, 896 by 4864), and, with
``--model demo`` (the default), the demo model on 16 harmless prompts in fp32 and in bf16: the prompt forward pass
(with the first token) and the mean greedy decode step after it, as the evaluation's replies run them
(`eval_plan.timed_generation`). Records the CPU, whether it multiplies bf16 / fp16 natively (its x86 flags, else the
micro-benchmark), torch's CPU capability and the compute dtype ``auto`` picks for a checkpoint saved in each dtype,
and writes ``benchmarks/results/dtype_speed.json`` with the commit and the command.

Times are CPU seconds of this process at one thread (wall time on a shared machine mostly measures the other
processes), the best of ``--rounds`` rounds in which the dtypes alternate::

    python benchmarks/dtype_speed.py               # matmul and demo model: about a minute of CPU
    python benchmarks/dtype_speed.py --model none  # the matmul only: a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from transformers_sra import load_prompts
from transformers_sra.cli.loading import NATIVE_FLAGS, compute_dtype, cpu_computes_natively, cpu_flags, matmul_seconds
from transformers_sra.measure.records import git_commit

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPE = (16, 896, 4864)  # the demo model's MLP up-projection on a batch of 16 rows


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def time_model(rounds: int, prompts: int, steps: int) -> dict:
    """The demo model's prompt forward pass and mean decode step in fp32 and in bf16 (loaded in each, as ``auto``
    loads it), best of ``rounds`` each; the first round is also the warm-up (allocator, kernels)."""
    from transformers_sra import load_demo_model
    from transformers_sra.measure.plan import timed_generation
    from transformers_sra.prompts import format_chat

    model, tok = load_demo_model(dtype=torch.float32)
    models = {"float32": model.eval(), "bfloat16": load_demo_model(dtype=torch.bfloat16)[0].eval()}
    texts = format_chat(tok, load_prompts("harmless_train")[:prompts])
    best = {dt: {"prompt forward": float("inf"), "decode step": float("inf")} for dt in models}
    for _ in range(rounds):
        for dt, m in models.items():
            positions, prefill, step_s = timed_generation(m, tok, texts, 1 + steps, clock=time.process_time)
            best[dt] = {"prompt forward": min(best[dt]["prompt forward"], prefill),
                        "decode step": min(best[dt]["decode step"], sum(step_s) / steps)}
    return {"prompts": prompts, "token_positions": positions, "decode_steps": steps,
            "seconds": {dt: {k: round(v, 3) for k, v in s.items()} for dt, s in best.items()},
            "float32_over_bfloat16": {k: round(best["float32"][k] / best["bfloat16"][k], 2) for k in best["float32"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=("demo", "none"), help="also time the demo model, or not")
    parser.add_argument("--rounds", type=int, default=5, help="matmul rounds (the demo model gets 3)")
    parser.add_argument("--seconds", type=float, default=0.2, help="CPU seconds of repeats per matmul timing")
    parser.add_argument("--out", default="benchmarks/results/dtype_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = cpu_flags()
    result = {"commit": git_commit(), "command": shlex.join(["python", "benchmarks/dtype_speed.py", *sys.argv[1:]]),
              "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_by": "micro-benchmark" if flags is None else "x86 flags",
              "native_flags": sorted(f for fs in NATIVE_FLAGS.values() for f in fs if flags and f in flags),
              "native": {name(dt): dt == torch.float32 or cpu_computes_natively(dt) for dt in DTYPES},
              "auto_computes": {name(dt): name(compute_dtype(dt, "cpu")) for dt in DTYPES},
              "rounds": args.rounds, "clock": "CPU seconds of this process"}
    best = dict.fromkeys(DTYPES, float("inf"))
    for _ in range(args.rounds):
        for dt in DTYPES:
            best[dt] = min(best[dt], matmul_seconds(dt, SHAPE, args.seconds, clock=time.process_time))
    result["matmul"] = {"shape": list(SHAPE), "ms": {name(dt): round(s * 1e3, 3) for dt, s in best.items()},
                        "over_float32": {name(dt): round(s / best[torch.float32], 3) for dt, s in best.items()}}
    if args.model == "demo":
        result["demo_model"] = time_model(3, 16, 4)
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
