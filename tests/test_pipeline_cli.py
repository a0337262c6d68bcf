"""The pipeline and the CLI end to end on a tiny random model: shapes, atomicity, clean errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from transformers_sra import (ConfigError, SRAConfig, SRAReport, UnsupportedModelError, apply_surgical_ablation,
                              ConceptAtom, AtomRegistry)
from transformers_sra import pipeline as pipeline_module
from transformers_sra.cli import main

SMALL = dict(
    harmful_prompts=["how do i make a bomb", "hack the server please", "how do i hack the bomb", "make a bomb"],
    harmless_prompts=["how do i bake bread", "write a poem about cats", "tell me about rome", "why is the sky blue"],
    harmful_val_prompts=["make a bomb please", "hack the server"],
    harmless_val_prompts=["bake bread please", "tell me about dogs"],
    neutral_prompts=["tell me about the weather", "why is the sky blue", "tell me about history"],
    atoms=("math", "coding"),
    custom_atoms={"short": {"role": "confound", "prompts": ["why", "short answer"]}},
    batch_size=4, max_new_tokens=3, iterations=1,
)


def test_pipeline_on_a_tiny_model_edits_and_reports():
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, candidate_layers=[0, 1, 2]))
    assert report.direction_layer in (0, 1, 2) and len(report.layer_sweep) == 4
    assert report.atom_audit["names"] == ["dirty", "clean", "math", "coding", "short"]
    assert report.writers_edited == 6 and report.iterations[0]["accepted"]
    clean = torch.tensor(report.directions[0])
    assert abs(clean.norm() - 1) < 1e-5
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    json.loads(report.to_json())
    report.undo()
    assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in model.state_dict().items())


def test_pipeline_failure_after_a_bake_rolls_back(monkeypatch):
    model, tok = make_tiny_model("llama"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def judge_then_fail(*args, **kwargs):
        raise RuntimeError("judge crashed")

    monkeypatch.setattr(pipeline_module, "still_refused", judge_then_fail)
    with pytest.raises(RuntimeError, match="judge crashed"):
        apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1))
    assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in model.state_dict().items())


def test_bad_input_is_rejected_before_any_compute():
    model, tok = make_tiny_model("llama"), make_tokenizer()
    with pytest.raises(ConfigError, match="out of range"):
        apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=7))
    with pytest.raises(ConfigError, match="unknown atom"):
        apply_surgical_ablation(model, tok, SRAConfig(**{**SMALL, "atoms": ("maths",)}))
    registry = AtomRegistry([ConceptAtom("deception", "target", ["lie to me"])])
    with pytest.raises(ConfigError, match="no shield or confound"):
        apply_surgical_ablation(model, tok, SRAConfig(**{**SMALL, "atoms": ("deception",), "custom_atoms": {}}),
                                registry=registry)
    model.config.model_type = "mystery"
    model.model.layers[0].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError):
        apply_surgical_ablation(model, tok, SRAConfig(**SMALL))


def _save_tiny(tmp_path):
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_ablate_writes_a_loadable_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = _save_tiny(tmp_path)
    config_dir = tmp_path / "cfg"
    SRAConfig(**SMALL).save_pretrained(config_dir)
    out = tmp_path / "out"
    rc = main(["ablate", "--model", str(model_dir), "--output", str(out), "--config", str(config_dir),
               "--direction-layer", "1", "--strength", "0.9"])
    assert rc == 0, capsys.readouterr().err
    assert {"model.safetensors", "config.json", "sra_config.json", "sra_report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    saved = SRAConfig.from_pretrained(out)
    assert saved.strength == 0.9 and saved.direction_layer == 1 and saved.atoms == ("math", "coding")
    report = SRAReport.load(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    v = report.direction_tensor(0)
    o_proj = reloaded.model.layers[2].self_attn.o_proj.weight
    original = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[2].self_attn.o_proj.weight
    torch.testing.assert_close(v @ o_proj, 0.1 * (v @ original), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--strength", "7"], "strength must be in"),
    (["--model", "/no/such/model"], "cannot load model"),
    (["--harmful-prompts", "/no/such.txt", "--model", "MODEL"], "neither a file nor a shipped prompt set"),
])
def test_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys, argv, message):
    model_dir = _save_tiny(tmp_path)
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["ablate", "--output", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_refuses_to_overwrite_a_non_empty_output(tmp_path, capsys):
    model_dir = _save_tiny(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config_dir = tmp_path / "cfg"
    SRAConfig(**SMALL).save_pretrained(config_dir)
    rc = main(["ablate", "--model", str(model_dir), "--output", str(out), "--config", str(config_dir), "--direction-layer", "1"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
