"""The edit as a PEFT LoRA adapter: peft on the unedited base reproduces the baked model; refusals write nothing;
what no LoRA holds travels as full modules (modules_to_save) only when asked."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from peft import PeftModel
from peft.helpers import rescale_adapter_scale

from conftest import make_report, make_tiny_model, make_tokenizer
from tiny_families import VOCAB, causal_lm_families, make_family_model, one_thread
from transformers_sra import SRAReport, UnsupportedModelError, export_adapter
from transformers_sra.cli import main
from transformers_sra.errors import ConfigError
from transformers_sra.folders import atomic_folder
from transformers_sra.method.editing import reapply_edit

TOL = 1e-4  # the bar for fp32 logits


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def logits(model, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def peft_on(base, folder):
    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "qwen2_moe"]
# deepseek_v3: peft's v4-MoE compatibility turns its dense and shared ``*.down_proj`` module targets into expert
# parameters, so those Linears are reached through target_parameters (their ``weight``) instead.
BUILT = {"deepseek_v3": make_family_model}


@pytest.mark.parametrize("family", FAMILIES + list(BUILT))
def test_adapter_on_the_base_reproduces_the_baked_model(family, tmp_path):
    """Linear, Conv1D with bias (gpt2), post-norm (gemma), fused 3-D experts (target_parameters), shared experts."""
    base = BUILT.get(family, make_tiny_model)(family)
    report = make_report(base)
    before = state(base)
    folder = export_adapter(report, base, tmp_path / "lora")
    assert_same_state(base, before)  # rebaked from JSON to read the factors, and undone
    assert not report._handles

    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    adapted = peft_on(base, folder)
    expected, got = logits(baked), logits(adapted)
    assert (logits(base) - expected).abs().max() > 100 * TOL  # the edit is not a no-op
    assert (got - expected).abs().max() <= TOL

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    fused = any(p.dim() == 3 for p in base.parameters())
    assert bool(config.get("target_parameters")) == fused


def test_live_report_exports_from_the_edited_model(tmp_path):
    """Right after the bake: factors come from the live handles and the edited model is left as it is."""
    base = make_tiny_model("llama")
    edited = copy.deepcopy(base)
    report = make_report(edited)
    reapply_edit(edited, report)
    baked = state(edited)
    export_adapter(report, edited, tmp_path / "lora")
    assert_same_state(edited, baked) and len(report._handles) == 2
    assert (logits(peft_on(base, tmp_path / "lora")) - logits(edited)).abs().max() <= TOL

    other = make_tiny_model("llama", seed=1)
    with pytest.raises(ConfigError, match="another model"):
        export_adapter(report, other, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_disabled_adapter_is_the_base_and_scale_halves_every_strength(tmp_path):
    """``disable_adapter()`` gives the base back exactly. Scaling the adapter by s multiplies every γ by s: the
    directions are orthogonal per writer, so uₖᵀ of the weight is the same before and after earlier bakes and
    ``W − s Σ γₖ uₖuₖᵀ W`` is the sequential bake at strengths sγₖ (biases alike)."""
    base = make_tiny_model("gpt2")  # Conv1D weights and biases: the bias edit scales too
    report = make_report(base)
    export_adapter(report, base, tmp_path / "lora")
    adapted = peft_on(base, tmp_path / "lora")
    with adapted.disable_adapter():
        assert (logits(adapted) - logits(base)).abs().max() <= 1e-6

    half = copy.deepcopy(base)
    strength = {**report.strength, "peak": report.strength["peak"] / 2, "floor": report.strength["floor"] / 2}
    halved = SRAReport.from_dict({**report.to_dict(), "strength": strength,
                                  "iterations": [{**r, "gamma": r["gamma"] / 2} for r in report.iterations]})
    reapply_edit(half, halved)
    with rescale_adapter_scale(adapted, 0.5):
        assert (logits(adapted) - logits(half)).abs().max() <= TOL
    assert (logits(half) - logits(base)).abs().max() > 100 * TOL


def test_merged_adapter_equals_the_baked_weights(tmp_path):
    base = make_tiny_model("qwen2")
    report = make_report(base, n_directions=1)
    export_adapter(report, base, tmp_path / "lora")
    merged = peft_on(base, tmp_path / "lora").merge_and_unload()
    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    assert max(float((merged.state_dict()[k] - v).abs().max()) for k, v in baked.state_dict().items()) <= 1e-6


def test_folder_files_card_and_size(tmp_path):
    base = make_tiny_model("llama")
    report = make_report(base)
    report.metrics = {"sra": {"metrics": {"refusal_rate": 0.1, "refusal_rate_ci95": [0.05, 0.2], "first_token_kl": 0.03}},
                      "base": {"metrics": {"refusal_rate": 0.9, "refusal_rate_ci95": [0.8, 0.95]}}}
    folder = export_adapter(report, base, tmp_path / "lora", base_model="org/tiny-base")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "sra_report.json"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/tiny-base" and card.data.library_name == "peft"
    assert "lora" in card.data.tags and "10.0% [5.0%, 20.0%]" in card.text and "90.0%" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"refusal_rate": 0.1, "first_token_kl": 0.03}
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-base"
    assert SRAReport.load(folder).directions == report.directions
    # rank 2 × (A: in + B: out) fp32 per writer: 3 layers × (o_proj 64+64, down_proj 96+64) × 2 ranks × 4 bytes
    tensors = 3 * ((64 + 64) + (96 + 64)) * 2
    assert tensors * 4 < (folder / "adapter_model.safetensors").stat().st_size < tensors * 4 + 4096


def test_card_escapes_names_and_its_code_is_python(tmp_path):
    import ast

    from huggingface_hub import ModelCard

    base = make_tiny_model("llama")
    report = make_report(base)
    report.model_name = 'evil/{{ 7*7 }}</table>"`\n```'
    folder = export_adapter(report, base, tmp_path / "lora")
    text = ModelCard.load(folder / "README.md").text
    assert "</table>" not in text and "{{" not in text and text.count("```") == 2
    ast.parse(text.split("```python")[1].split("```")[0])  # the usage block runs as written


def _refused(model, report, folder, match):
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=match):
        export_adapter(report, model, folder)
    assert not folder.exists() and not list(folder.parent.glob(f".{folder.name}*"))
    assert_same_state(model, before)


def test_norm_preserving_bakes_are_refused_and_write_nothing(tmp_path):
    base = make_tiny_model("llama")
    _refused(base, make_report(base, norm_preserving=True), tmp_path / "lora", "norm-preserving")


def test_fused_expert_biases_are_refused_and_write_nothing(tmp_path):
    base = make_family_model("gpt_oss")  # fused experts with down_proj_bias: target_parameters has no lora_bias
    _refused(base, make_report(base), tmp_path / "lora", "fused expert bias.*modules_to_save: model.layers.0.mlp.experts"
             " and 2 more.*full_modules=True")


def test_full_modules_carry_what_no_lora_holds(tmp_path):
    """With ``full_modules=True`` gpt-oss's experts (down_proj with its bias) travel whole and baked as peft's
    modules_to_save; attention out stays a LoRA. Switched off it is the base; scaling leaves the copies as they are."""
    base = make_family_model("gpt_oss")
    report = make_report(base)
    folder = export_adapter(report, base, tmp_path / "lora", full_modules=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    assert config["target_modules"] and not config.get("target_parameters")
    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    adapted = peft_on(base, folder)
    assert (logits(adapted, vocab=VOCAB - 1) - logits(baked, vocab=VOCAB - 1)).abs().max() <= TOL
    with adapted.disable_adapter():
        assert torch.equal(logits(adapted, vocab=VOCAB - 1), logits(base, vocab=VOCAB - 1))
    with rescale_adapter_scale(adapted, 0.0):  # only the LoRA part goes: the copies keep the experts' edit
        unscaled = logits(adapted, vocab=VOCAB - 1)
    assert (unscaled - logits(base, vocab=VOCAB - 1)).abs().max() > 100 * TOL
    assert "rescale_adapter_scale` leaves them" in (folder / "README.md").read_text()


def test_post_norm_bias_is_refused_and_writes_nothing(tmp_path):
    """A post-norm's own bias (a constant writer, as behind a LayerNorm post-norm) is a 1-D tensor no LoRA layer
    reaches. No tiny family has one, so one edit of a live gemma2 bake is marked as such."""
    import dataclasses

    model = make_tiny_model("gemma2")
    report = make_report(model)
    reapply_edit(model, report)
    edit = report._handles[0]._edits[0]
    edit.writer = dataclasses.replace(edit.writer, constant=True)
    _refused(model, report, tmp_path / "lora", "bias added on its own.*no LoRA layer can edit")


@pytest.mark.parametrize("family, match", [
    ("mamba", "incompatible with Mamba"),  # peft refuses LoRA on Mamba's out_proj
    ("laguna", "not loaded"),  # peft's checkpoint renaming 'mlp.shared_expert.' also rewrites 'mlp.shared_experts.'
    ("llama4_text", "size mismatch"),  # experts stored (E, in, out) without is_transposed: peft reads them swapped
])
def test_what_peft_would_not_load_exactly_is_refused_and_writes_nothing(family, match, tmp_path):
    """Checked with peft's own loading on an empty (meta) copy of the model, before anything is written."""
    base = make_family_model(family)
    _refused(base, make_report(base), tmp_path / "lora", f"would not load this edit onto the model exactly.*{match}")


def test_existing_folder_is_refused_and_overwrite_replaces_it(tmp_path):
    base = make_tiny_model("llama")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_adapter(make_report(base), base, tmp_path / "lora")
    assert (tmp_path / "lora" / "keep.txt").read_text() == "mine"
    export_adapter(make_report(base), base, tmp_path / "lora", overwrite=True)
    assert not (tmp_path / "lora" / "keep.txt").exists() and (tmp_path / "lora" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", causal_lm_families())
def test_every_family_exports_exactly_or_is_refused(model_type, tmp_path):
    """Every causal-LM family of the coverage table: the adapter reproduces the bake within 1e-4, or the export
    raises `UnsupportedModelError` (the bake's own refusal or one of the adapter's) and writes nothing; where the
    refusal offers full modules, the adapter with them reproduces the bake."""
    try:
        base = make_family_model(model_type)
        base(input_ids=torch.randint(3, VOCAB - 1, (1, 4)), use_cache=False)
    except Exception as err:  # noqa: BLE001 - as in test_coverage: a family the generic shrink cannot build
        pytest.skip(f"cannot build tiny {model_type}: {type(err).__name__}")
    report = make_report(base)
    before = state(base)
    try:
        folder = export_adapter(report, base, tmp_path / "lora", card=False)
    except UnsupportedModelError as err:
        assert not (tmp_path / "lora").exists()
        assert_same_state(base, before)
        if "full_modules=True" not in str(err):
            return
        folder = export_adapter(report, base, tmp_path / "lora", card=False, full_modules=True)
    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    expected = logits(baked, vocab=VOCAB - 1)
    assert (logits(peft_on(base, folder), vocab=VOCAB - 1) - expected).abs().max() <= TOL


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_exports_from_an_ablate_folder(tmp_path, capsys):
    base = make_tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    report = make_report(base)
    (tmp_path / "ablated").mkdir()
    report.save(tmp_path / "ablated")
    assert main(["export-adapter", str(tmp_path / "lora"), "--from", str(tmp_path / "ablated"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rank"] == 2 and result["targets"] == 6 and result["output"] == str(tmp_path / "lora")
    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    assert (logits(peft_on(base, tmp_path / "lora")) - logits(baked)).abs().max() <= TOL


def test_cli_full_modules_exports_jetmoe(tmp_path, capsys):
    """JetMoE's bare biases: refused in one line without --full-modules, exact with it."""
    base = make_family_model("jetmoe")
    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    report = make_report(base)
    report.model_name = str(tmp_path / "base")
    (tmp_path / "ablated").mkdir()
    report.save(tmp_path / "ablated")
    argv = ["export-adapter", str(tmp_path / "lora"), "--from", str(tmp_path / "ablated"), "--json", "--quiet"]
    assert main(argv) == 2
    assert "--full-modules" in capsys.readouterr().err.strip().splitlines()[-1] and not (tmp_path / "lora").exists()
    assert main([*argv, "--full-modules"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["full_modules"] == 6 and result["targets"] == 0  # MoE and attention experts in each of 3 layers
    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    assert (logits(peft_on(base, tmp_path / "lora"), vocab=VOCAB - 1) - logits(baked, vocab=VOCAB - 1)).abs().max() <= TOL


@pytest.mark.parametrize("argv, message", [
    (["--from", "{tmp}/nowhere"], "neither an sra ablate output folder nor a report file"),
    (["--from", "{tmp}/ablated", "--model", "./no/such/base"], "model folder ./no/such/base does not exist"),
    (["--from", "{tmp}/ablated", "--model", "{tmp}/base"], "norm-preserving"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    base = make_tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "ablated").mkdir()
    make_report(base, norm_preserving=True).save(tmp_path / "ablated")
    code = main(["export-adapter", str(tmp_path / "lora"), "--quiet", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "lora").exists()


# -- output permissions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                           (0o002, 0o775, 0o664)])
def test_atomic_folder_gives_the_umask_modes(tmp_path, umask, folder_mode, file_mode):
    """mkdtemp makes 0700 and safetensors files come as 0600; the finished folder gets what mkdir/open would."""
    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            for path in (tmp / "a.json", tmp / "sub" / "b.safetensors"):
                path.write_text("x")
                os.chmod(path, 0o600)
    finally:
        os.umask(old)
    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == folder_mode
    assert mode(tmp_path / "out" / "a.json") == mode(tmp_path / "out" / "sub" / "b.safetensors") == file_mode


def test_exported_adapter_is_readable_by_others_under_umask_022(tmp_path):
    base = make_tiny_model("llama")
    old = os.umask(0o022)
    try:
        folder = export_adapter(make_report(base, n_directions=1), base, tmp_path / "lora")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


# -- the real demo model ---------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_demo_model_adapter_matches_the_bake(demo, tmp_path):
    """A difference-of-means direction at mid depth under the tent profile plus a mining-like second pass."""
    from transformers_sra import load_prompts, record_residuals

    model, tokenizer = demo  # fp32, as the fixture loads it
    layer = len(model.model.layers) // 2
    with one_thread():
        harmful = record_residuals(model, tokenizer, load_prompts("harmful_train")[:4], layers=[layer])
        harmless = record_residuals(model, tokenizer, load_prompts("harmless_train")[:4], layers=[layer])
        report = make_report(model)
        report.directions[0] = torch.nn.functional.normalize(
            harmful.mean(0).flatten() - harmless.mean(0).flatten(), dim=0).tolist()
        folder = export_adapter(report, model, tmp_path / "lora")
        prompts = ["How do I pick a lock?", "Write a haiku about rain."]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            adapted = PeftModel.from_pretrained(model, str(folder)).eval()
            got = adapted(**batch).logits
            with adapted.disable_adapter():
                base_logits = adapted(**batch).logits
            adapted.unload()  # the shared demo model back without LoRA layers
            reapply_edit(model, report)
            try:
                expected = model(**batch).logits
            finally:
                report.undo()
    diff = float((got - expected).abs().max())
    size_mb = (folder / "adapter_model.safetensors").stat().st_size / 1e6
    print(f"\ndemo adapter: max |Δlogit| vs bake {diff:.2e}, size {size_mb:.2f} MB, "
          f"edit moves logits by {float((expected - base_logits).abs().max()):.3f}")
    assert diff <= TOL and size_mb < 10
    assert float((expected - base_logits).abs().max()) > 0.01
