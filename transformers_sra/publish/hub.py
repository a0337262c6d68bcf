"""Write the ablated model's output folder atomically, and push that folder whole to the Hub.

Everything is written into a hidden sibling folder first and renamed into place at the end, so an error
or an interrupt never leaves a half-written output folder. The folder holds the checkpoint (safetensors),
tokenizer, generation config, ``sra_config.json``, ``sra_report.json``, the card's three figures and
``README.md``; ``config.json`` records where the model came from (``transformers_sra`` key)::

    save_cleaned(model, tokenizer, report, "qwen-sra/")
    push_cleaned("qwen-sra/", "me/qwen-sra", private=True)     # one commit with every file

`PreTrainedModel.push_to_hub` would replace README.md and leave out the extra files, so the push goes
through `HfApi.upload_folder`. The token comes from the argument, ``HF_TOKEN`` or the login cache and is
never written or printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .._version import __version__
from ..config import SRAConfig
from ..errors import ConfigError, SRAError
from ..folders import atomic_folder, check_output_dir
from ..report import SRAReport
from .cast import cast_checkpoint

REQUIRED_FILES = ("config.json", "README.md", "sra_config.json", "sra_report.json")


def check_card_dependencies() -> None:
    """The card needs jinja2 (templates) and matplotlib (figures): fail before anything is written."""
    import importlib.util

    missing = [name for name in ("jinja2", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the model card needs {' and '.join(missing)}: pip install 'transformers-sra[card]' "
                          "(or save with card=False)")


def provenance(model, report: SRAReport, base_model: Optional[str] = None) -> dict:
    """What ``config.json`` records under ``transformers_sra``: base model, revision, version, config hash."""
    from .card import base_model_info, config_hash

    known_id, _ = base_model_info(report.model_name)
    return {"base_model": base_model or known_id or report.model_name,
            "base_model_path": report.model_name,
            "revision": getattr(model.config, "_commit_hash", None),
            "transformers_sra_version": __version__,
            "config_sha256": config_hash(report.config)}


@dataclass(frozen=True)
class CardOrigin:
    """What the model card says of the model's origin where it cannot be inferred: a Hub id and its license."""

    base_model: Optional[str] = None
    license: Optional[str] = None


def save_cleaned(model, tokenizer, report: SRAReport, output_dir: str | os.PathLike, *, overwrite: bool = False,
                 card: Union[bool, CardOrigin] = True, dtype: Optional[torch.dtype] = None) -> Path:
    """Save a normal transformers checkpoint plus config, report, figures and model card, all or nothing.

    ``card=False`` writes no card or figures; ``card=CardOrigin(base_model=..., license=...)`` writes them with that
    Hub id and license instead of what is inferred from the model's origin. ``dtype`` saves the
    weights in that dtype (`sra ablate` computes a bf16 checkpoint in fp32 on a CPU without native bf16): cast on
    disk after saving (`cast.cast_checkpoint`), so the model is never held twice; the live model stays as it is.
    """
    target = check_output_dir(output_dir, overwrite)
    if card:
        check_card_dependencies()
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        # A GGUF-loaded model is already dequantized; transformers refuses to save it until this is dropped.
        quantizer.remove_quantization_config(model)
    had = hasattr(model.config, "transformers_sra")
    origin = card if isinstance(card, CardOrigin) else CardOrigin()
    with atomic_folder(target, overwrite=overwrite) as tmp:
        model.config.transformers_sra = provenance(model, report, origin.base_model)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if dtype is not None and dtype != model.dtype:
                cast_checkpoint(tmp, dtype)
        finally:
            if not had:
                del model.config.transformers_sra  # provenance belongs to the saved file, not the live model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        SRAConfig.from_dict(report.config).save_pretrained(tmp)
        report.save(tmp / "sra_report.json")
        if card:
            from .card import render_card
            from .figures import write_figures

            figures = write_figures(report, tmp)
            render_card(report, base_model=origin.base_model, license=origin.license,
                        figures=figures).save(tmp / "README.md")
    return target


def push_cleaned(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
                 create_pr: bool = False, token: Optional[str] = None, commit_message: Optional[str] = None):
    """Upload a folder written by `save_cleaned` to ``repo_id`` in one commit; returns the commit info.

    ``revision`` names a branch (created if missing); ``create_pr`` opens a pull request instead of
    committing to it. Any failure raises `SRAError` with one sentence; the local folder is never touched.
    """
    from huggingface_hub import HfApi, ModelCard

    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} is not a complete transformers-sra folder (missing {', '.join(missing)}); "
                          "write it with save_cleaned or `sra ablate --output` first")
    report = SRAReport.load(folder)
    api = HfApi(token=token)
    try:
        ModelCard.load(folder / "README.md").validate()  # needs the network, so only here
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {report.model_name.rsplit('/', 1)[-1]} "
                                                                  "with refusal removed (transformers-sra)")
    except Exception as err:  # network, auth, validation: one sentence, never the token
        reason = " ".join(str(err).split()) or type(err).__name__
        if token:
            reason = reason.replace(token, "***")
        raise SRAError(f"could not push {folder} to {repo_id} ({type(err).__name__}: {reason[:200]}); "
                       "the local folder is unchanged, push it again when the Hub is reachable") from None
