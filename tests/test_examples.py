"""Every script in examples/ runs as documented, on tiny random models, and does what it says."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_cli import _save_tiny, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from transformers_sra.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *argv: str, monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_examples_folder_holds_exactly_the_tested_scripts():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "custom_atom.py", "evaluate_other_tool.py", "from_pretrained.py", "push.py"]


def test_one_line_in_a_from_pretrained_script(tmp_path, monkeypatch, capsys):
    model_dir = _save_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    scope = run_example("from_pretrained.py", str(model_dir), str(out), monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    assert f"saved to {out}" in captured.out and "search done in" in captured.err  # progress=True
    model, tokenizer, report = scope["model"], scope["tokenizer"], scope["report"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("how do i make a bomb", return_tensors="pt")
    with torch.no_grad():  # a plain checkpoint: the saved weights are the edited ones, no hooks needed
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits)
        report.undo()
        original = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.testing.assert_close(model(**ids).logits, original(**ids).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(reloaded(**ids).logits, original(**ids).logits, atol=1e-4)


def test_custom_medical_shield(tmp_path, monkeypatch, capsys):
    model_dir = _save_tiny(tmp_path / "tiny")
    scope = run_example("custom_atom.py", str(model_dir), str(tmp_path / "out"), monkeypatch=monkeypatch)
    audit = scope["report"].atom_audit
    row = audit["names"].index("medical")
    dirty, clean = audit["cosine"][0][row], audit["cosine"][1][row]
    # ridge residualization takes the Shield's share out of the refusal direction before it is removed (on this
    # random model every atom is nearly collinear with the others, so the ridge leaves a part of it)
    assert abs(clean) < 0.6 * abs(dirty), (dirty, clean)
    assert f"cos(dirty, medical) = {dirty:+.3f}, cos(clean, medical) = {clean:+.3f}" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_evaluating_a_model_from_another_tool(tmp_path, monkeypatch, capsys):
    from transformers_sra.prompts import load_prompts
    from transformers_sra.signals.logprobs import first_token_kl, first_token_logprobs

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    base, other = _save_tiny(tmp_path / "base"), _save_tiny(tmp_path / "other", seed=5)
    scope = run_example("evaluate_other_tool.py", str(base), str(other), "3", monkeypatch=monkeypatch)
    tok = AutoTokenizer.from_pretrained(base)
    harmless = load_prompts("harmless_test")[:3]
    expected = first_token_kl(first_token_logprobs(AutoModelForCausalLM.from_pretrained(base), tok, harmless),
                              first_token_logprobs(AutoModelForCausalLM.from_pretrained(other), tok, harmless))
    assert scope["edited"].metrics["first_token_kl"] == pytest.approx(expected, rel=1e-4) and expected > 0
    assert f"first_token_kl     base 0.0000  edited {expected:.4f}" in capsys.readouterr().out


def test_push_dry_run_is_offline_and_the_push_uploads_the_folder(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    model_dir = _save_tiny(tmp_path / "tiny")
    folder = tmp_path / "out"
    assert main(["ablate", "--model", str(model_dir), "--output", str(folder), "--no-evaluate", "--quiet",
                 "--atoms", "math", "--direction-layer", "1", "--strength", "1.0", "--fluency-rank", "0"]) == 0
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, kwargs)) or f"https://hub.example/{kwargs.get('repo_id')}"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, *a, **k: calls.append(("validate", {})))
    capsys.readouterr()
    run_example("push.py", str(folder), "me/tiny-sra", "--dry-run", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert calls == [] and out.startswith(f"would push {len(files)} files")
    assert all(f"  {p.relative_to(folder)}  {p.stat().st_size:,} bytes" in out for p in files)
    run_example("push.py", str(folder), "me/tiny-sra", "--private", monkeypatch=monkeypatch)
    names = [name for name, _ in calls]
    assert names[0] == "validate" and "create_repo" in names and names[-1] == "upload_folder"
    upload = calls[-1][1]
    assert upload["repo_id"] == "me/tiny-sra" and upload["folder_path"] == str(folder)
    assert dict(calls[names.index("create_repo")][1])["private"] is True
