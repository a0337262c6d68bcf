"""``sra`` / ``python -m transformers_sra``: the command line, generated from `SRAConfig`'s fields.

::

    sra ablate --output qwen-sra                       # the demo model, default config
    sra ablate --model ./my-model --strength 0.9 --iterations 1 --output out/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Optional, Sequence

from .config import PROMPT_FIELDS, SRAConfig
from .errors import SRAError
from .prompts import load_prompts


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(SRAConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SRA configuration (see SRAConfig)")
    for f in dataclasses.fields(SRAConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")
        kind = _field_type(f)
        if kind is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
        elif f.name in ("layers", "candidate_layers", "positions", "fluency_ranks"):
            group.add_argument(flag, type=int, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "atoms":
            group.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "custom_atoms":
            group.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, help=help_text + " (JSON)")
        else:  # prompt sources: a shipped set name or a file path
            group.add_argument(flag, default=argparse.SUPPRESS, help=help_text + " (shipped set name or file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sra", description="Surgical Refusal Ablation for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    ablate = sub.add_parser("ablate", help="remove refusal from a model and save the result")
    ablate.add_argument("--model", default=None, help="model id or local folder (default: the demo Qwen2.5-Coder-0.5B-Instruct)")
    ablate.add_argument("--output", required=True, help="folder for the ablated checkpoint, sra_config.json and the report")
    ablate.add_argument("--config", default=None, help="an sra_config.json (or its folder) to start from; flags override it")
    ablate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ablate.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto")
    ablate.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model folder")
    ablate.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _add_config_arguments(ablate)
    return parser


def _config_from(args: argparse.Namespace) -> SRAConfig:
    names = {f.name for f in dataclasses.fields(SRAConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    base = SRAConfig.from_pretrained(args.config).to_dict() if args.config else {}
    return SRAConfig.from_dict({**base, **overrides})


def _ablate(args: argparse.Namespace) -> int:
    import torch

    from .hub import check_output_dir, save_cleaned
    from .pipeline import apply_surgical_ablation

    config = _config_from(args)  # bad flags and missing prompt files fail before the model is loaded
    for name in PROMPT_FIELDS:
        load_prompts(getattr(config, name))
    check_output_dir(args.output, args.overwrite)
    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from .demo import load_demo_model

        model, tokenizer = load_demo_model(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device_map,
                                                         trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as err:
            raise SRAError(f"cannot load model {args.model!r}: {str(err).splitlines()[0]}") from None
    report = apply_surgical_ablation(model, tokenizer, config)
    path = save_cleaned(model, tokenizer, report, args.output, overwrite=args.overwrite)
    chosen = report.chosen
    print(f"direction layer {report.direction_layer}, fluency Shield rank {report.fluency_rank}; "
          f"{len(report.directions)} direction(s) removed from {report.writers_edited} writers; validation: "
          f"refusal score {chosen['refusal_score']:.3f} (base {report.validation['base_refusal_score']:.3f}), "
          f"KL {chosen['kl']:.3f}, perplexity {chosen['ppl_change']:+.2%}")
    print(f"saved to {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"ablate": _ablate}[args.command](args)
    except SRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the output folder was not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
