"""Where the split-half rule (`method.convergence`) would stop extraction, and what the directions lose there.

Records every set the pipeline extracts once, whole, in the rule's seeded order (the training sets, neutral and
the atom sets, the fluency passages in the rule's rounds), then replays those rows through `build_directions` at
each threshold: the rule reads prefixes of the same order, so one recording serves every threshold. For each it
reports the prompts each statistic used, the split-half cosine it reached, the cosine of each resulting direction
to the one from every prompt (the dirty direction and the standard one at each candidate layer, the later layers'
own directions, each atom's mean direction, the clean direction at each (layer, fluency rank) after
`Directions.build`) and the share of extraction work saved (prompt tokens × decoder layers run). Training and
atom sets only: no validation or test prompt is read. ::

    nice -n 19 python benchmarks/extraction_convergence.py             # demo model, bf16, 2 threads
    python benchmarks/extraction_convergence.py --model tiny --out /tmp/conv.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _common import tiny_config

from transformers_sra import SRAConfig, load_demo_model
from transformers_sra.batching import encode_texts, shared_prefix_length
from transformers_sra.measure.records import git_commit, write_results
from transformers_sra.method.atoms import AtomRegistry
from transformers_sra.method.build_directions import ModelRecorder, build_directions
from transformers_sra.method.convergence import read_subspace, seeded_order
from transformers_sra.method.inputs import resolve_inputs, set_key
from transformers_sra.models.architectures import decoder_layers
from transformers_sra.prompts import format_chat
from transformers_sra.signals.nll import chunk_token_ids
from transformers_sra.testing import make_tiny_model, make_tokenizer

#: the table docs/performance.md renders (scripts/render_results.py, the shared shape): one row a threshold pair
COLUMNS = [["name", "split-half threshold (prompts; passages)"], ["harmful", "harmful: read, kept"],
           ["harmless", "harmless: read, kept"], ["atoms", "atom sets: read of all"],
           ["fluency", "fluency passages"], ["dirty_min", "dirty direction, cos to full (min over layers)", "{:.4f}"],
           ["atoms_min", "atom means, cos to full (min)", "{:.4f}"],
           ["clean_min", "clean direction, cos to full (min over layer, rank)", "{:.4f}"],
           ["work_saved", "extraction work saved", "{:.0%}"]]
COSINES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
SUBSPACES = (0.5, 0.6, 0.7, 0.8, 0.9)


class Replay:
    """A `ModelRecorder` that answers from one whole recording in the seeded order (fluency: per round's group)."""

    def __init__(self, recorder: ModelRecorder, keys, passages: int, config: SRAConfig, rank: int):
        self.recorder, self.rows, self.groups = recorder, {}, {}
        for key in keys:
            order = seeded_order(len(recorder.inputs.texts[key]), config.seed)
            rows, keep = recorder.prompts(key, order)
            at = torch.empty(len(order), dtype=torch.long)
            at[torch.tensor(order)] = torch.arange(len(order))
            self.rows[key] = rows, keep, at
        # every group any threshold's rounds can ask for: the rounds of a rule that never stops
        read_subspace(self._record_group, passages, rank, 2.0, config.seed)

    def _record_group(self, indices: list[int]) -> torch.Tensor:
        self.groups[tuple(indices)] = self.recorder.passages(indices)
        return self.groups[tuple(indices)]

    def prompts(self, key, indices: list[int]):
        rows, keep, at = self.rows[key]
        pick = at[torch.tensor(indices, dtype=torch.long)]
        return rows[pick], keep[pick]

    def passages(self, indices: list[int]) -> torch.Tensor:
        if tuple(indices) not in self.groups:  # the whole corpus in its own order: the rule switched off
            self.groups[tuple(indices)] = self.recorder.passages(indices)
        return self.groups[tuple(indices)]


def work(model, tok, inputs, config) -> tuple[dict, list]:
    """Token-layers per prompt of each set (its own tokens past the shared chat prefix × the decoder layers its pass
    runs: all of them for the screened training sets, up to the deepest candidate for the rest) and per passage."""
    n_blocks, deepest = len(decoder_layers(model)), max(inputs.layers) + 1
    training = {inputs.sources["harmful"], inputs.sources["harmless"]}
    cost = {}
    for key in inputs.to_extract():
        encoded = encode_texts(tok, format_chat(tok, inputs.texts[key], config.system_prompt))
        prefix = shared_prefix_length(encoded)
        depth = n_blocks if key in training and config.filter_prompts else deepest
        cost[key] = [(len(e) - prefix) * depth for e in encoded]
    passages = [sum(len(c) for c in chunk_token_ids(tok, [p], 256)) * deepest for p in inputs.fluency_text]
    return cost, passages


def set_counts(inputs, reads: dict) -> dict:
    """Prompts recorded per set key, from the report's statistics (a set in two statistics is one reading)."""
    sources, out = inputs.sources, {}
    stats = reads["statistics"]
    out[sources["harmful"]], out[sources["harmless"]] = (stats["dirty"][s]["recorded"] for s in ("harmful", "harmless"))
    for a in inputs.atoms:
        out[set_key(a.prompts)] = stats[a.name]["prompts"]["recorded"]
        out[sources["neutral"] if a.contrast is None else set_key(a.contrast)] = stats[a.name]["contrast"]["recorded"]
    return out


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosines of two ``(L, d)`` tensors, rounded."""
    return [round(float(x), 5) for x in torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)]


def compare(dirs, full, ranks: list[int]) -> dict:
    """Each direction of ``dirs`` against the full extraction's: per candidate layer, and the smallest."""
    out = {"dirty": cosines(dirs.dirty, full.dirty), "standard": cosines(dirs.unfiltered, full.unfiltered),
           "later_min": min(cosines(torch.stack(list(dirs.later.values())), torch.stack(list(full.later.values())))
                            if dirs.later else [1.0]),
           "atoms_min": {n: min(cosines(b[:, 0], full.atom_bases[n][:, 0])) for n, b in dirs.atom_bases.items()},
           "clean": {str(r): [round(float(dirs.clean(l, r) @ full.clean(l, r)), 5) for l in dirs.layers]
                     for r in ranks}}
    if dirs.fluency is not None:
        out["fluency_subspace"] = {str(r): round(subspace_overlap(dirs.fluency[:, :r], full.fluency[:, :r]), 5)
                                   for r in ranks if r}
    return out


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest over layers of the mean squared cosine of the principal angles between two orthonormal bases."""
    return float(((a.double() @ b.double().transpose(1, 2)) ** 2).sum((1, 2)).div(a.shape[1]).min())


def row(model, tok, inputs, config, replay, full, costs) -> dict:
    """One threshold pair: what the rule read, and how close its directions come to the full extraction's."""
    ranks = list(config.fluency_ranks)
    extract = dict(layers=inputs.layers, positions=config.positions, **config.batching)
    dirs, kept = build_directions(model, tok, inputs, config, extract, ranks, recorder=replay)
    cost, passage_cost = costs
    used = sum(sum(cost[k][i] for i in seeded_order(len(cost[k]), config.seed)[:n])
               for k, n in set_counts(inputs, dirs.reads).items())
    fluency = dirs.reads["fluency"]
    order = seeded_order(len(passage_cost), config.seed) if fluency["agreement"] is not None else None
    used += sum(passage_cost[i] for i in (order[:fluency["passages"]] if order else range(len(passage_cost))))
    total = sum(map(sum, cost.values())) + sum(passage_cost)
    return {"extraction_cosine": config.extraction_cosine, "extraction_subspace": config.extraction_subspace,
            "kept": kept, "reads": dirs.reads, "to_full": compare(dirs, full, ranks) if full else None,
            "work_saved": round(1 - used / total, 4)}


def table_row(row: dict) -> dict:
    """``row``'s cells for `COLUMNS`, from its own values."""
    sets, fluency, to_full = row["reads"]["sets"], row["reads"]["fluency"], row["to_full"]
    atoms = [c for name, c in sets.items() if name not in ("harmful", "harmless")]
    name = " ; ".join(["all prompts" if row["extraction_cosine"] is None else f"{row['extraction_cosine']}",
                       "all passages" if row["extraction_subspace"] is None else f"{row['extraction_subspace']}"])
    cells = {"name": name, "fluency": f"{fluency['passages']} of {fluency['available']}",
             "atoms": f"{sum(c['recorded'] for c in atoms)} of {sum(c['available'] for c in atoms)}",
             "work_saved": row["work_saved"]}
    for side in ("harmful", "harmless"):
        cells[side] = f"{sets[side]['recorded']} of {sets[side]['available']}, {row['kept'][side]} kept"
    if to_full:
        cells.update(dirty_min=min(to_full["dirty"]), atoms_min=min(to_full["atoms_min"].values()),
                     clean_min=min(min(v) for v in to_full["clean"].values()))
    return {**cells, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' (bf16) or 'tiny' (a random test model, a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/extraction_convergence.json")
    parser.add_argument("--retable", action="store_true", help="only redo --out's table cells from its own rows")
    args = parser.parse_args()
    if args.retable:
        record = json.loads(Path(args.out).read_text(encoding="utf-8"))
        write_results(args.out, {**record, "columns": COLUMNS, "rows": [table_row(r) for r in record["rows"]]})
        return
    commit, start = git_commit(), time.perf_counter()
    torch.set_num_threads(2)
    if args.model == "tiny":
        model, tok, config = make_tiny_model("qwen2"), make_tokenizer(), tiny_config(0)
    else:
        (model, tok), config = load_demo_model(dtype=torch.bfloat16), SRAConfig()
    off = dataclasses.replace(config, extraction_cosine=None, extraction_subspace=None)
    inputs = resolve_inputs(model, off, AtomRegistry.default(), tok)
    extract = dict(layers=inputs.layers, positions=config.positions, **config.batching)
    recorder = ModelRecorder(model, tok, inputs, off, extract)
    replay = Replay(recorder, sorted(inputs.to_extract(), key=repr), len(inputs.fluency_text), off,
                    max(config.fluency_ranks))
    recorded_s = round(time.perf_counter() - start, 1)
    costs = work(model, tok, inputs, config)
    full = row(model, tok, inputs, off, replay, None, costs)
    reference, _ = build_directions(model, tok, inputs, off, extract, list(config.fluency_ranks), recorder=replay)
    rows = [full]
    for threshold in COSINES:  # the prompt rule alone, every fluency passage read
        rows.append(row(model, tok, inputs, dataclasses.replace(off, extraction_cosine=threshold), replay, reference,
                        costs))
    for threshold in SUBSPACES:  # the fluency rule alone, every prompt read
        rows.append(row(model, tok, inputs, dataclasses.replace(off, extraction_subspace=threshold), replay,
                        reference, costs))
    rows.append(row(model, tok, inputs, dataclasses.replace(off, extraction_cosine=config.extraction_cosine,
                                                            extraction_subspace=config.extraction_subspace),
                    replay, reference, costs))  # the defaults together
    record = {"commit": commit, "command": f"python benchmarks/extraction_convergence.py --model {args.model}",
              "model": args.model, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "layers": inputs.layers, "fluency_ranks": list(config.fluency_ranks),
              "defaults": {"extraction_cosine": config.extraction_cosine,
                           "extraction_subspace": config.extraction_subspace},
              "recorded_s": recorded_s, "seconds": round(time.perf_counter() - start, 1), "columns": COLUMNS,
              "rows": [table_row(r) for r in rows]}
    write_results(args.out, record)
    print(f"wrote {args.out} ({record['seconds']} s)")


if __name__ == "__main__":
    main()
