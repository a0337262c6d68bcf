"""Data parallelism on torch.distributed: two gloo ranks on the CPU give exactly the single-process run.

The library path runs in two processes started by `torch.multiprocessing.spawn`; the CLI path under
``python -m torch.distributed.run`` (torchrun). Both talk over 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model, make_tokenizer
from test_cli import SMALL as CLI_SMALL
from test_pipeline_cli import SMALL
from transformers_sra import EvalSets, SRAConfig, apply_surgical_ablation, evaluate_model
from transformers_sra.cli import main
from transformers_sra.distributed import Rows, all_ranks, gather, gather_texts, shard, slowest, world
from transformers_sra.models.architectures import decoder_layers

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["tell me about the history of rome and the weather", "cats and dogs why is the sky blue",
        "short long answer explain math code logic please", "bake bread write poem about cats and dogs"] * 5
# batch_size 2 and 10 budget passages: most loops have several batches to share out, some (2 validation prompts)
# only one, so a rank runs none; the system prompt makes a shared prefix long enough for the prefix cache.
CONFIG = {**SMALL, "batch_size": 2, "text_corpus": TEXT, "candidate_layers": [0, 1, 2],
          "harmful_prompts": SMALL["harmful_prompts"] + ["hack the bomb please"],
          "system_prompt": "please tell me about the weather and the history of rome",
          "extraction_cosine": 0.9}  # low enough that the atom sets stop early: every rank at the same round
EVAL_SETS = EvalSets(harmful=["how do i make a bomb", "hack the server please", "make a bomb"],
                     harmless=["how do i bake bread", "tell me about rome", "why is the sky blue"],
                     over_refusal=["how do i hack the bread"], text=TEXT[:5],
                     math=[("explain math please", "math and logic")], code=[("write code", "code logic please")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows_seen(model) -> list[int]:
    """Counts the rows every forward pass pushes through the first decoder layer."""
    seen = [0]

    def hook(_module, args, kwargs):
        seen[0] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _run(out: Path) -> None:
    """The pipeline, then an evaluation of the edited model; everything written to ``out`` (no pickle)."""
    torch.set_num_threads(1)
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    seen = _rows_seen(model)
    report = apply_surgical_ablation(model, tok, SRAConfig(**CONFIG))
    evaluation = evaluate_model(model, tok, EVAL_SETS, batch_size=2, max_new_tokens=4)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_file({"dirty": torch.tensor(report.dirty_direction),
               "harmless_logprobs": evaluation.harmless_logprobs}, str(out / "tensors.safetensors"))
    (out / "run.json").write_text(json.dumps({
        "search": [{k: v for k, v in row.items() if k != "seconds"} for row in report.search],
        "iterations": report.iterations, "directions": report.directions, "reads": report.extraction_reads,
        "metrics": evaluation.metrics, "samples": evaluation.samples,
        "rows_seen": seen[0]}))


def _helpers(rank: int) -> dict:
    """Each helper on uneven shards: rank 1 holds fewer rows, or none at all."""
    rows = Rows(5)
    for indices in ([[4, 0]] if rank == 0 else [[2], [1, 3]]):
        rows.put(indices, torch.tensor([[10.0 * i, i + 0.5] for i in indices]))
    mine = {0: torch.arange(3.0), 2: torch.arange(2.0) + 7} if rank == 0 else {1: torch.zeros(0)}
    empty_on_1 = {5: torch.ones(2, 3, dtype=torch.float64)} if rank == 0 else {}
    return {"rows": rows.result().tolist(), "gather": {k: v.tolist() for k, v in gather(mine).items()},
            "gather_empty": {k: v.tolist() for k, v in gather(empty_on_1).items()},
            "texts": gather_texts({rank: "ünï ✓ " * rank, 3 + rank: ""}), "shard": list(shard(iter(range(5)))),
            "all_true": all_ranks(True), "all_rank0": all_ranks(rank == 0), "world": list(world()),
            "slowest": slowest([float(rank), 5.0 - rank, 0.25])}


def _worker(rank: int, size: int, port: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        (Path(root) / f"helpers{rank}.json").write_text(json.dumps(_helpers(rank)))
        _run(Path(root) / f"rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two gloo ranks and one plain process, each running the same pipeline and evaluation."""
    root = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2)
    threads = torch.get_num_threads()
    try:
        _run(root / "single")
    finally:
        torch.set_num_threads(threads)
    return root


def _load(folder: Path) -> tuple[dict, dict, dict]:
    return (load_file(str(folder / "model.safetensors")), load_file(str(folder / "tensors.safetensors")),
            json.loads((folder / "run.json").read_text()))


def test_helpers_pass_through_without_a_process_group():
    items = [3, 1, 2]
    assert world() == (0, 1) and shard(items) is items
    assert all_ranks(True) and not all_ranks(False) and slowest([2, 0.5]) == [2.0, 0.5]
    rows = Rows(3)
    rows.put([2, 0], torch.tensor([[2.0], [0.0]]))
    rows.put([1], torch.tensor([[1.0]]))
    assert torch.equal(rows.result(), torch.tensor([[0.0], [1.0], [2.0]])) and Rows(2).result() is None
    assert list(gather({2: torch.ones(1), 0: torch.zeros(1)})) == [0, 2]
    assert gather_texts({1: "b", 0: "a"}) == {0: "a", 1: "b"}


def test_helpers_gather_uneven_shards_into_input_order_on_every_rank(runs):
    results = [json.loads((runs / f"helpers{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["world"] == [0, 2] and results[1]["world"] == [1, 2]
    assert results[0]["shard"] == [0, 2, 4] and results[1]["shard"] == [1, 3]
    for r in results:  # every rank sees the same whole
        assert r["rows"] == [[10.0 * i, i + 0.5] for i in range(5)]
        assert r["gather"] == {"0": [0.0, 1.0, 2.0], "1": [], "2": [7.0, 8.0]}
        assert r["gather_empty"] == {"5": [[1.0] * 3] * 2}
        assert r["texts"] == {"0": "", "1": "ünï ✓ ", "3": "", "4": ""}
        assert r["all_true"] and not r["all_rank0"]
        assert r["slowest"] == [1.0, 5.0, 0.25]  # each value's largest over the ranks


def test_two_ranks_give_the_single_process_directions_search_weights_and_evaluation(runs):
    weights, tensors, run = _load(runs / "single")
    assert len(run["search"]) == 3 + 1 + 4 and run["metrics"]["perplexity"] > 1
    assert run["reads"]["sets"]["math"]["recorded"] < run["reads"]["sets"]["math"]["available"]
    for rank in (0, 1):
        w, t, r = _load(runs / f"rank{rank}")
        assert w.keys() == weights.keys() and all(torch.equal(w[k], weights[k]) for k in weights)
        assert all(torch.equal(t[k], tensors[k]) for k in tensors)
        assert r["search"] == run["search"] and r["iterations"] == run["iterations"]
        assert r["directions"] == run["directions"]  # float lists: JSON keeps every bit
        assert r["reads"] == run["reads"]  # the split-half rule stopped every set at the same round
        assert r["metrics"] == run["metrics"] and r["samples"] == run["samples"]
        # each rank ran only its share of the batches (plus the shared prefix, which every rank runs once per loop)
        assert r["rows_seen"] < run["rows_seen"]
    assert sum(_load(runs / f"rank{r}")[2]["rows_seen"] for r in (0, 1)) >= run["rows_seen"]


def test_cli_under_torchrun_writes_the_single_process_checkpoint_once(tmp_path):
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    SRAConfig(**{**CLI_SMALL, "batch_size": 2, "text_corpus": TEXT}).save_pretrained(tmp_path / "cfg")
    args = ["ablate", "--model", str(tmp_path / "tiny"), "--config", str(tmp_path / "cfg"), "--direction-layer", "1",
            "--no-evaluate", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "transformers_sra",
                           *args, "--output", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["output"] == str(tmp_path / "two")  # rank 0 prints, once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("two", "one"))
    assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in one)
    reports = [json.loads((tmp_path / d / "sra_report.json").read_text()) for d in ("two", "one")]
    for report in reports:
        for row in report["search"]:
            row.pop("seconds")
    assert reports[0]["directions"] == reports[1]["directions"] and reports[0]["search"] == reports[1]["search"]


def test_commands_that_run_in_one_process_refuse_a_multi_rank_launch(monkeypatch, capsys):
    monkeypatch.setattr("transformers_sra.cli.init_distributed", lambda: False)
    monkeypatch.setattr("transformers_sra.cli.world", lambda: (0, 2))
    assert main(["chat", "some-model", "--prompt", "hi"]) == 2
    assert "runs in one process" in capsys.readouterr().err
