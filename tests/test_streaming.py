"""The streaming bake (`sra bake`): shard by shard on the safetensors files equals the in-memory bake bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import make_report, make_tiny_model
from transformers_sra.errors import ConfigError, UnsupportedModelError
from transformers_sra.method.editing import reapply_edit
from transformers_sra.publish.bake import stream_bake
from transformers_sra.report import REPORT_NAME, SRAReport

SHARD = "50KB"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def in_memory_and_streamed(tmp_path: Path, model_type: str, **config):
    model = make_tiny_model(model_type)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size=SHARD)
    report = make_report(model, **config)
    report.save(tmp_path / "report.json")
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reapply_edit(loaded, report)
    loaded.save_pretrained(tmp_path / "memory", max_shard_size=SHARD)
    streamed = stream_bake(base, tmp_path / "report.json", tmp_path / "streamed")
    return base, tmp_path / "memory", streamed


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "qwen3_moe", "mixtral"])
def test_streaming_bake_equals_the_in_memory_bake_bit_for_bit(tmp_path, model_type):
    base, memory, streamed = in_memory_and_streamed(tmp_path, model_type)
    assert len(list(base.glob("*.safetensors"))) > 3  # really sharded
    want, got, before = tensors(memory), tensors(streamed), tensors(base)
    assert set(got) == set(want) == set(before)  # same names: fused experts saved per expert, tied lm_head left out
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    changed = [k for k in before if not torch.equal(before[k], got[k])]
    assert changed and all(("proj" in k or "w2" in k) and k.endswith("weight") for k in changed)
    assert any("experts" in k for k in changed) == ("moe" in model_type or model_type == "mixtral")
    # Shards keep their names and the index is copied; the report travels with the weights.
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert json.loads((streamed / "model.safetensors.index.json").read_text()) == \
        json.loads((base / "model.safetensors.index.json").read_text())
    assert SRAReport.load(streamed / REPORT_NAME).directions == SRAReport.load(tmp_path / "report.json").directions
    # The result loads with plain transformers and computes what the in-memory edit computes.
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    a = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(memory, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_norm_preserving_and_chosen_layers_stream_the_same(tmp_path):
    _, memory, streamed = in_memory_and_streamed(tmp_path, "gemma2", layers=[0, 2], norm_preserving=True)
    want, got, before = tensors(memory), tensors(streamed), tensors(tmp_path / "base")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(".layers.1." in k for k in want if not torch.equal(before[k], got[k]))


def test_bf16_checkpoint_streams_the_same_as_bf16_in_memory(tmp_path):
    model = make_tiny_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    report = make_report(model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    reapply_edit(loaded, report)
    loaded.save_pretrained(tmp_path / "memory")
    stream_bake(tmp_path / "base", report, tmp_path / "streamed")
    want, got = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)


def test_refusals_leave_no_output_folder(tmp_path):
    gpt2 = make_tiny_model("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    qwen = make_tiny_model("qwen2")
    qwen.save_pretrained(tmp_path / "qwen")
    report = make_report(qwen)
    out = tmp_path / "out"
    # A family with no LAYOUTS entry needs probing (forward passes), which a meta-device model cannot run.
    (tmp_path / "gpt2" / "config.json").write_text(
        (tmp_path / "gpt2" / "config.json").read_text().replace('"gpt2"', '"gpt_bigcode"'))
    with pytest.raises(UnsupportedModelError, match="probing") as err:
        stream_bake(tmp_path / "gpt2", report, out)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="report is for a 'qwen2'"):
        stream_bake(_retype(tmp_path, "llama"), report, out)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        stream_bake(tmp_path, report, out)
    with pytest.raises(ConfigError, match="cannot read the report"):
        stream_bake(tmp_path / "qwen", tmp_path / "missing.json", out)
    wrong = make_report(qwen)
    wrong.directions = [[1.0, 0.0]]
    wrong.iterations = []
    with pytest.raises(ConfigError, match="hidden-size vector"):
        stream_bake(tmp_path / "qwen", wrong, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    (out / "keep").parent.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        stream_bake(tmp_path / "qwen", report, out)
    assert [p.name for p in out.iterdir()] == ["keep"]


def _retype(tmp_path: Path, model_type: str) -> Path:
    model = make_tiny_model(model_type)
    model.save_pretrained(tmp_path / model_type)
    return tmp_path / model_type


def test_quantized_shards_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    state = tensors(tmp_path / "m")
    key = "model.layers.0.self_attn.o_proj.weight"
    state[key] = state[key].to(torch.float8_e4m3fn)
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="F8_E4M3"):
        stream_bake(tmp_path / "m", make_report(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sra_bake_command_writes_the_folder_and_errors_in_one_line(tmp_path, capsys):
    from transformers_sra.cli import main

    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    make_report(model).save(tmp_path / "report.json")
    out = tmp_path / "out"
    assert main(["bake", "--model", str(tmp_path / "base"), "--report", str(tmp_path / "report.json"),
                 "--output", str(out), "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(out) and result["shards"] == len(list((tmp_path / "base").glob("*.safetensors")))
    assert (out / REPORT_NAME).is_file() and (out / "config.json").is_file()
    assert main(["bake", "--model", str(tmp_path / "base"), "--report", str(tmp_path / "report.json"),
                 "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output folder") and "--overwrite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["bake", "--model", str(tmp_path / "nowhere"), "--report", str(tmp_path / "report.json"),
                 "--output", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@pytest.mark.real_model
def test_demo_model_in_small_shards_streams_bit_for_bit(tmp_path):
    """The demo model (fp32) saved in 200 MB shards: the streamed bake equals the in-memory bake on every tensor."""
    from transformers_sra import load_demo_model

    model, _ = load_demo_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "base", max_shard_size="200MB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) >= 8
    report = make_report(model, n_directions=2)
    report.config = {"layers": list(range(4, 20))}
    stream_bake(tmp_path / "base", report, tmp_path / "streamed")
    reapply_edit(model, report)
    edited = model.state_dict()
    got = set()
    for shard in sorted((tmp_path / "streamed").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), edited[key]), key
                got.add(key)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert got == set(edited) - tied
    key = "model.layers.10.self_attn.o_proj.weight"  # a writer inside the chosen layers did change
    shard = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(str(tmp_path / "base" / shard), "pt") as f:
        assert not torch.equal(f.get_tensor(key), edited[key])
