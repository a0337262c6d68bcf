"""``sra bake --model DIR --report sra_report.json --output DIR2``: apply a saved edit to a checkpoint shard by
shard, without loading the model (for checkpoints larger than memory); see `streaming.stream_bake`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..folders import claimed
from ..progress import stage, step_logger
from . import summary


@dataclass
class BakeArguments:
    _argument_group_name = "bake"
    model: str = field(metadata={"help": "Folder of the safetensors checkpoint to edit (it is only read).",
                                 "metavar": "DIR"})
    report: str = field(metadata={"help": "sra_report.json of a run on this model (or a folder holding one); "
                                          "the run may have used any copy of it, offloaded included.", "metavar": "FILE"})
    output: str = field(metadata={"help": "Folder for the edited checkpoint, written all or nothing.", "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder (only once the new "
                                                             "one is complete)."})


def run(args: argparse.Namespace) -> int:
    from ..publish.bake import stream_bake

    with claimed(args.output), stage(f"bake {args.report} into {args.model}, shard by shard"):
        target = stream_bake(args.model, args.report, args.output, overwrite=args.overwrite,
                             progress=step_logger("bake"))
    shards = sorted(p.name for p in target.glob("*.safetensors"))
    result = {"command": "bake", "model": args.model, "report": args.report, "output": str(target), "shards": len(shards)}
    summary.emit(result, f"saved: {target} ({len(shards)} safetensors shard{'s' * (len(shards) != 1)} edited)", args.json)
    return 0
