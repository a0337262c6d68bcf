"""The ``sra`` command on tiny random models: every subcommand, progress switches, errors, Ctrl-C."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model, make_tokenizer
from test_pipeline_cli import SMALL as _SMALL
from tiny_families import one_thread
from transformers_sra import SRAConfig, SRAReport, apply_surgical_ablation
from transformers_sra.cli import build_parser, main
from transformers_sra.cli.args import config_from
from transformers_sra.cli.loading import device_map_for

# Small prompt sets everywhere (the shipped atom sets hold hundreds of prompts): each run takes seconds.
SMALL = {**_SMALL, "atoms": (), "custom_atoms": {
    "mathy": {"role": "shield", "prompts": ["explain math please", "math and logic", "explain the math of code"]},
    "short": {"role": "confound", "prompts": ["why", "short answer"]}}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run 30x faster on one thread than on two contended ones (OpenMP spin-waits)."""
    with one_thread():
        yield


def _save_tiny(path, dtype=torch.float32, seed=0):
    model, tok = make_tiny_model("qwen2", seed=seed).to(dtype), make_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny(tmp_path):
    return _save_tiny(tmp_path / "tiny")


@pytest.fixture
def config_dir(tmp_path):
    SRAConfig(**SMALL).save_pretrained(tmp_path / "cfg")
    return tmp_path / "cfg"


def _error_line(stderr: str) -> str:
    """The last stderr line, which must hold the whole error (progress lines may come before it)."""
    assert "Traceback" not in stderr, stderr
    return stderr.rstrip("\n").splitlines()[-1]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _ablate(tiny, config_dir, out, *extra):
    return main(["ablate", "--model", str(tiny), "--output", str(out), "--config", str(config_dir),
                 "--direction-layer", "1", "--no-evaluate", *extra])


# -- ablate ---------------------------------------------------------------------------------------------------
def test_ablate_refuses_to_write_over_its_own_model_folder(tiny, config_dir, capsys):
    """With --overwrite, an output that is the model folder would replace the base checkpoint by its edit."""
    before = _digest(tiny)
    assert _ablate(tiny, config_dir, tiny, "--overwrite") == 2
    assert "is the model folder itself" in _error_line(capsys.readouterr().err)
    assert _digest(tiny) == before
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(f".{tiny.name}")]  # no half-written sibling


def test_ablate_writes_a_loadable_checkpoint_in_the_checkpoints_dtype(tmp_path, capsys, config_dir):
    from transformers import AutoModelForCausalLM

    tiny = _save_tiny(tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert _ablate(tiny, config_dir, out, "--strength", "0.9") == 0, capsys.readouterr().err
    assert {"model.safetensors", "config.json", "sra_config.json", "sra_report.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # --dtype auto kept bf16, not fp32
        assert f.get_tensor("model.layers.2.self_attn.o_proj.weight").dtype == torch.bfloat16
    saved = SRAConfig.from_pretrained(out)
    assert saved.strength == 0.9 and saved.direction_layer == 1 and set(saved.custom_atoms) == {"mathy", "short"}
    v = SRAReport.load(out).direction_tensor(0)[2]  # per-layer directions: layer 2 (after layer 1) removes its own
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).model.layers[2].self_attn.o_proj.weight
    original = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).model.layers[2].self_attn.o_proj.weight
    # W ← W − γ v vᵀW with γ = 0.9 leaves 0.1 of the v component (bf16 rounding: about 1e-2 relative)
    torch.testing.assert_close(v @ edited, 0.1 * (v @ original), atol=2e-3, rtol=0.05)


def test_ablate_summary_table_and_json_line(tiny, config_dir, tmp_path, capsys):
    assert _ablate(tiny, config_dir, tmp_path / "a") == 0
    text = capsys.readouterr().out
    report = SRAReport.load(tmp_path / "a")
    for needle in ("direction layer      1", f"refusal score {report.chosen['refusal_score']:.3f}",
                   f"KL {report.chosen['kl']:.3f}", str(tmp_path / "a"), "wall time", "peak memory", "GiB RAM",
                   f"harmful {report.extraction_prompts['harmful']} kept of", "atom sets", "(every prompt read)"):
        assert needle in text, (needle, text)

    assert _ablate(tiny, config_dir, tmp_path / "b", "--json") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    report = SRAReport.load(tmp_path / "b")
    assert result["output"] == str(tmp_path / "b") and result["direction_layer"] == 1
    assert result["validation"]["kl"] == report.chosen["kl"]
    assert result["validation"]["base_refusal_score"] == report.validation["base_refusal_score"]
    # a fixed strength and layer leave one candidate per step: no contenders to judge, and no summary line for them
    assert result["validation"]["contenders"] == sum("judged" in row for row in report.search) == 0
    assert "judged contenders" not in text
    assert set(result["timings"]) >= {"load", "sra extract", "sra search", "save"} and result["memory"]["ram_mib"] > 0


def test_progress_on_stderr_and_quiet_silences_it(tiny, config_dir, tmp_path, capsys):
    # the search bar: 1 layer + 2 Shield ranks + 5 per-layer tents - 2 shared candidates
    assert _ablate(tiny, config_dir, tmp_path / "loud") == 0
    err = capsys.readouterr().err
    for needle in ("load ", "extract:", "prompt/s", "search:", "/6 [", "candidate", "search done in", "save done in"):
        assert needle in err, (needle, err[-2000:])
    assert _ablate(tiny, config_dir, tmp_path / "quiet", "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "direction layer" in captured.out


def test_library_prints_only_when_asked(tiny, capsys):
    from transformers import AutoModelForCausalLM

    config = SRAConfig(**SMALL, direction_layer=1, fluency_rank=0, strength=1.0)
    tok = make_tokenizer()

    def run(**kwargs):
        model = AutoModelForCausalLM.from_pretrained(tiny)
        capsys.readouterr()
        apply_surgical_ablation(model, tok, config, **kwargs)
        return capsys.readouterr()

    quiet = run()
    assert quiet.out == "" and quiet.err == ""
    loud = run(progress=True)
    assert "extract:" in loud.err and "search done in" in loud.err and loud.out == ""
    logger = logging.getLogger("transformers_sra")
    logger.setLevel(logging.INFO)
    try:
        assert "extract:" in run().err  # the logging level alone turns the bars on
    finally:
        logger.setLevel(logging.NOTSET)
    rows = []
    run(progress=lambda step, row: rows.append(step))
    assert rows == ["search", "mine"]  # a callable still gets the rows (one candidate, one mining pass)


def test_flags_are_generated_from_sraconfig_with_bools_and_lists(tmp_path):
    yaml_file = tmp_path / "sra.yaml"
    yaml_file.write_text("max_kl: 0.2\natoms: [math, logic]\niterations: 1\n")
    args = build_parser().parse_args(["ablate", "--output", "o", "--config", str(yaml_file), "--projected",
                                      "--candidate-layers", "0", "2", "--fluency-ranks", "4", "0", "--max_kl", "0.3",
                                      "--custom-atoms", '{"med": {"role": "shield", "prompts": ["a", "b"]}}'])
    config = config_from(args)
    assert config.projected is True and config.candidate_layers == [0, 2] and config.fluency_ranks == (4, 0)
    assert config.max_kl == 0.3  # the flag beats the file ...
    assert config.atoms == ("math", "logic") and config.iterations == 1  # ... which beats the defaults
    assert config.custom_atoms == {"med": {"role": "shield", "prompts": ["a", "b"]}}
    assert config.batch_size == SRAConfig().batch_size
    assert args.dtype == "auto" and args.evaluate is True and args.overwrite is False


def test_device_map_defaults_to_auto_only_with_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_map_for(None) is None and device_map_for("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_map_for(None) == "auto" and device_map_for("none") is None


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    top = capsys.readouterr().out
    assert exit_.value.code == 0 and all(c in top for c in ("ablate", "evaluate", "audit", "chat"))
    helps = {}
    for command in ("ablate", "evaluate", "audit", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = text = capsys.readouterr().out
        assert text.startswith(f"usage: sra {command}") and "(default: None)" not in text
        assert not any(w.startswith("--") and "_" in w for w in text.split()), text  # dashed flags only
    assert "--max-kl MAX_KL" in helps["ablate"] and "--projected " in helps["audit"] and "--max-kl" not in helps["chat"]


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message, when", [
    (["--strength", "7"], "strength must be in", "config"),
    (["--max-kl", "-1"], "max_kl must be > 0", "config"),
    (["--strength", "steep"], "strength must be 'auto'", "config"),
    (["--model", "/no/such/model"], "model folder /no/such/model does not exist", "config"),
    (["--model", "MODEL_NO_WEIGHTS"], "cannot load model", "load"),
    (["--harmful-prompts", "/no/such.txt"], "neither a file nor a shipped prompt set", "config"),
    (["--harmful-prompts", "EMPTY"], "is empty", "config"),
    (["--harmful-prompts", "BINARY"], "cannot parse", "config"),
    (["--direction-layer", "7"], "layer 7 is out of range", "pipeline"),
    (["--config", "BADYAML"], "not valid YAML", "config"),
    (["--config", "UNKNOWN"], "unknown SRAConfig fields ['max_kll']", "config"),
    (["--push-to-hub", "not a repo"], "is not a repo id", "config"),
    (["--max-kl", "lots"], "invalid float value", "parse"),
    (["--no-such-flag"], "unrecognized arguments", "parse"),
    (["--tasks", "humaneval"], "opt in with --allow-code-execution", "config"),
])
def test_errors_are_one_line_and_leave_no_output(tmp_path, capsys, monkeypatch, argv, message, when):
    from transformers_sra.cli import ablate

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    tiny = _save_tiny(tmp_path / "tiny")
    files = {"EMPTY": ("empty.txt", b"\n \n"), "BINARY": ("bin.txt", b"\xff\xfe\x00bad"),
             "BADYAML": ("c.yaml", b"max_kl: [0.1\n"), "UNKNOWN": ("c.json", b'{"max_kll": 0.1}')}
    for key, (name, data) in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    files["MODEL_NO_WEIGHTS"] = ("no-weights", None)
    argv = [str(tmp_path / files[a][0]) if a in files else a for a in argv]
    loads = []
    real_load = ablate.load_model
    monkeypatch.setattr(ablate, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    out = tmp_path / "out"
    model_args = [] if "--model" in argv else ["--model", str(tiny)]
    capsys.readouterr()
    code = main(["ablate", *model_args, "--output", str(out), "--no-evaluate", *argv]) if when != "parse" else None
    if when == "parse":
        with pytest.raises(SystemExit) as exit_:
            main(["ablate", "--output", str(out), *argv])
        code = exit_.value.code
    err = capsys.readouterr().err
    assert code == 2 and _error_line(err).startswith("error: ") and message in _error_line(err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert bool(loads) == (when in ("load", "pipeline"))  # config errors come before the model is loaded


def test_refuses_a_non_empty_output_and_overwrite_replaces_it(tiny, config_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _ablate(tiny, config_dir, out) == 2 and "not empty" in _error_line(capsys.readouterr().err)
    assert (out / "keep.txt").read_text() == "mine"
    assert _ablate(tiny, config_dir, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_unexpected_errors_are_one_line_unless_debug(tiny, config_dir, tmp_path, capsys, monkeypatch):
    from transformers_sra.method import pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(pipeline, "apply_surgical_ablation", boom)
    assert _ablate(tiny, config_dir, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert _error_line(err) == "error: RuntimeError: disk on fire (rerun with --debug for the traceback and report it)"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _ablate(tiny, config_dir, tmp_path / "out", "--debug")


@pytest.mark.parametrize("where", ["pipeline", "save"])
def test_ctrl_c_leaves_model_and_output_untouched(tiny, config_dir, tmp_path, capsys, monkeypatch, where):
    from transformers_sra.method import pipeline
    from transformers_sra.report import SRAReport as Report

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "pipeline":
        monkeypatch.setattr(pipeline, "apply_surgical_ablation", interrupt)
    else:  # mid-save: the weights are already written into the hidden sibling folder
        monkeypatch.setattr(Report, "save", interrupt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    before = _digest(out)
    assert _ablate(tiny, config_dir, out, "--overwrite") == 130
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: interrupted;") and "untouched" in err
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "out", "tiny"]  # no half-written sibling


# -- evaluate, audit, chat ------------------------------------------------------------------------------------
def test_evaluate_scores_a_model_made_elsewhere(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers_sra.prompts import load_prompts
    from transformers_sra.signals.logprobs import first_token_kl, first_token_logprobs

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    base = _save_tiny(tmp_path / "base")
    edited = _save_tiny(tmp_path / "other-tool", seed=1)  # stands in for another tool's output
    report = tmp_path / "eval.json"
    argv = ["evaluate", "--base", str(base), "--edited", str(edited), "--limit", "3", "--max-new-tokens", "3",
            "--output", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "refusal (judged)" in text and "first-token KL vs base" in text and str(report) in text
    result = json.loads(report.read_text())
    assert result["sets"]["harmful"] == 3 and set(result["metrics"]) == {"base", "edited"}
    tok = AutoTokenizer.from_pretrained(base)  # as the command loads it (a saved word-level tokenizer differs)
    harmless = load_prompts("harmless_test")[:3]
    expected = first_token_kl(first_token_logprobs(AutoModelForCausalLM.from_pretrained(base), tok, harmless),
                              first_token_logprobs(AutoModelForCausalLM.from_pretrained(edited), tok, harmless))
    assert expected > 0 and result["metrics"]["edited"]["first_token_kl"] == pytest.approx(expected, rel=1e-4)
    assert main(argv + ["--json", "--quiet"]) == 0  # the base's numbers now come from the cache
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and json.loads(line)["metrics"]["edited"]["first_token_kl"] == pytest.approx(expected, rel=1e-4)


def test_audit_matches_the_search_and_edits_nothing(tiny, tmp_path, capsys, config_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "audit"
    argv = ["audit", "--model", str(tiny), "--config", str(config_dir), "--candidate-layers", "0", "1", "2",
            "--fluency-rank", "2", "--strength", "1.0", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    audit = json.loads((out / "audit.json").read_text())
    assert {"atom_orthogonality.png", "layer_sweep.png"} <= {p.name for p in out.iterdir()}
    assert audit["names"] == ["dirty", "clean", "mathy", "short"] and len(audit["sweep"]) == 3
    matrix = torch.tensor(audit["cosine"][str(audit["best_layer"])])
    torch.testing.assert_close(matrix.diagonal(), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(matrix, matrix.T, atol=1e-4, rtol=0)
    assert "layer sweep" in text and f"cosines at layer {audit['best_layer']}" in text
    # the sweep is the search's first stage: the same numbers as apply_surgical_ablation's table
    model = AutoModelForCausalLM.from_pretrained(tiny)
    config = SRAConfig(**{**SMALL, "candidate_layers": [0, 1, 2], "fluency_rank": 2, "strength": 1.0})
    report = apply_surgical_ablation(model, AutoTokenizer.from_pretrained(tiny), config)
    for mine, theirs in zip(audit["sweep"], report.search):
        assert (mine["layer"], mine["refusal_score"], mine["kl"]) == (theirs["layer"], theirs["refusal_score"], theirs["kl"])


def test_chat_streams_the_greedy_reply_and_compares(tiny, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers_sra.signals.judge import generate

    other = _save_tiny(tmp_path / "other", seed=3)
    tok = AutoTokenizer.from_pretrained(tiny)
    expected = {name: generate(AutoModelForCausalLM.from_pretrained(path), tok, ["how do i bake bread"],
                               max_new_tokens=6)[0] for name, path in (("edited", tiny), ("base", other))}
    assert main(["chat", str(tiny), "--prompt", "how do i bake bread", "--max-new-tokens", "6", "--quiet"]) == 0
    assert capsys.readouterr().out == f"[model] {expected['edited']}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("how do i bake bread\n\n"))
    assert main(["chat", str(tiny), "--compare", str(other), "--max-new-tokens", "6", "--quiet"]) == 0
    assert capsys.readouterr().out == f"[base] {expected['base']}\n[edited] {expected['edited']}\n"
    assert main(["chat", str(tiny), "--prompt", "how do i bake bread", "--max-new-tokens", "6", "--json"]) == 0
    line = capsys.readouterr().out
    assert json.loads(line)["turns"] == [{"prompt": "how do i bake bread", "model": expected["edited"]}]


def test_ablate_evaluates_base_standard_and_sra_for_the_summary_and_card(tiny, config_dir, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["ablate", "--model", str(tiny), "--output", str(out), "--config", str(config_dir),
                 "--direction-layer", "1", "--eval-limit", "2", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    metrics = SRAReport.load(out).metrics
    assert set(metrics) >= {"base", "standard", "sra"} and metrics["sets"]["harmful"] == 2
    lines = {line.split("  ")[0]: line for line in captured.out.splitlines()}
    for name, label in (("base", "base model"), ("standard", "standard ablation"), ("sra", "SRA")):
        m = metrics[name]["metrics"]
        assert lines[label].split()[len(label.split())] == f"{m['refusal_rate']:.1%}", lines[label]
    assert f"{metrics['sra']['metrics']['first_token_kl']:.4f}" in lines["SRA"]
    assert "evaluate base done in" in captured.err and "evaluate edit done in" in captured.err
    assert (out / "README.md").is_file() and (out / "refusal_vs_kl.png").is_file()


def test_push_to_hub_uploads_the_finished_folder_and_an_offline_push_fails_in_one_line(tiny, config_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    import huggingface_hub

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            uploads.append(kwargs)
            return f"https://hub.example/{kwargs['repo_id']}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, *a, **k: None)
    out = tmp_path / "out"
    assert _ablate(tiny, config_dir, out, "--push-to-hub", "me/tiny-sra", "--json", "--quiet") == 0
    assert json.loads(capsys.readouterr().out)["pushed"] == "https://hub.example/me/tiny-sra/commit/1"
    assert [(u["repo_id"], u["folder_path"]) for u in uploads] == [("me/tiny-sra", str(out))]

    class OfflineApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    out2 = tmp_path / "out2"
    assert _ablate(tiny, config_dir, out2, "--push-to-hub", "me/tiny-sra", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not push") and "local folder is unchanged" in err
    assert (out2 / "model.safetensors").is_file() and (out2 / "README.md").is_file()  # saved before the push


THINKING_TEMPLATE = ("[BOS]{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                     " think {% endif %}{% endif %}")


def test_chat_and_evaluate_pass_chat_template_kwargs_to_the_template(tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from transformers_sra import prompts

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    path = _save_tiny(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(path)
    rendered = []
    real = prompts.format_messages
    monkeypatch.setattr(prompts, "format_messages", lambda *a: rendered.append(real(*a)) or rendered[-1])
    monkeypatch.setattr("transformers_sra.cli.chat.format_messages", prompts.format_messages)
    kwargs = ["--chat-template-kwargs", '{"enable_thinking": false}']
    chat = ["chat", str(path), "--prompt", "hi", "--max-new-tokens", "2", "--quiet"]
    assert main(chat) == 0 and main(chat + kwargs) == 0, capsys.readouterr().err
    assert [" think " in r for r in rendered] == [False, True]
    # evaluate formats both models' prompts with them, and the base's cached numbers are kept apart by them
    evaluate = ["evaluate", "--base", str(path), "--edited", str(path), "--limit", "1", "--max-new-tokens", "2", "--quiet",
                "--output", str(tmp_path / "eval.json")]
    rendered.clear()
    assert main(evaluate + kwargs) == 0, capsys.readouterr().err
    assert rendered and all(" think " in r for r in rendered)
    assert main(evaluate) == 0
    assert len(list((tmp_path / "cache" / "evaluations").iterdir())) == 2
    capsys.readouterr()
    assert main(chat + ["--chat-template-kwargs", "[1]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--chat-template-kwargs must be a JSON object" in err
