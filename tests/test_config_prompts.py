"""SRAConfig validation and round trip; prompt sets from every supported source; the judge's classifier."""

from __future__ import annotations

import json

import pytest

from transformers_sra import ConfigError, PromptSetError, SRAConfig, load_prompts
from transformers_sra.prompts import format_chat, shipped_prompt_sets


def test_config_round_trip(tmp_path):
    config = SRAConfig(strength=0.8, iterations=1, layers=[3, 4], ridge_lambda=0.5, atoms=("math", "coding"),
                       custom_atoms={"chem": {"role": "shield", "prompts": ["What is an ion?"]}},
                       harmful_prompts=["a", "b"], positions=(-1, -2))
    path = config.save_pretrained(tmp_path)
    assert path.endswith("sra_config.json")
    loaded = SRAConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert json.loads((tmp_path / "sra_config.json").read_text())["strength"] == 0.8


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 0}, "strength"),
    ({"ridge_lambda": -1}, "ridge_lambda"),
    ({"iterations": -1}, "iterations"),
    ({"atom_rank": 0}, "atom_rank"),
    ({"positions": (0,)}, "positions"),
    ({"layers": []}, "layers"),
    ({"atoms": ("math", "math")}, "duplicates"),
    ({"custom_atoms": {"x": {"role": "shield"}}}, "prompts"),
    ({"custom_atoms": {"x": {"role": "boss", "prompts": ["a"]}}}, "role"),
])
def test_config_rejects_bad_values_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SRAConfig(**kwargs)


def test_config_unknown_fields_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown SRAConfig fields"):
        SRAConfig.from_dict({"strenght": 1.0})
    with pytest.raises(ConfigError, match="no sra_config.json"):
        SRAConfig.from_pretrained(tmp_path)


def test_shipped_sets_are_large_enough_and_splits_are_disjoint():
    names = set(shipped_prompt_sets())
    for kind in ("harmful", "harmless"):
        train, val, test = (set(load_prompts(f"{kind}_{s}")) for s in ("train", "val", "test"))
        assert len(train) >= 128 and len(val) >= 32 and len(test) >= 64
        assert not (train & test) and not (train & val) and not (val & test)
    for atom in ("math", "coding", "logic", "deception", "privacy", "neutral"):
        assert atom in names and len(load_prompts(atom)) >= 32
    for a, b in (("terse", "verbose"), ("formal", "casual"), ("imperative", "question"), ("list", "prose")):
        assert len(load_prompts(f"style_{a}")) == len(load_prompts(f"style_{b}")) >= 32


def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "one"}, {"instruction": "two"}]))
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    (tmp_path / "p.csv").write_text("id,text\n1,one\n2,two\n")
    for name in ("p.txt", "p.json", "p.jsonl", "p.csv"):
        assert load_prompts(tmp_path / name) == ["one", "two"], name
    (tmp_path / "q.jsonl").write_text('{"body": "x"}\n')
    assert load_prompts(tmp_path / "q.jsonl", column="body") == ["x"]
    with pytest.raises(PromptSetError, match="column"):
        load_prompts(tmp_path / "q.jsonl")


def test_prompts_from_lists_and_datasets():
    datasets = pytest.importorskip("datasets")
    assert load_prompts(["a ", " b"]) == ["a", "b"]
    ds = datasets.Dataset.from_dict({"goal": ["x", "y"], "other": [1, 2]})
    assert load_prompts(ds) == ["x", "y"]
    assert SRAConfig(harmful_prompts=ds).harmful_prompts == ["x", "y"]


def test_bad_prompt_sources_fail_clearly(tmp_path):
    with pytest.raises(PromptSetError, match="neither a file nor a shipped"):
        load_prompts("no_such_set")
    with pytest.raises(PromptSetError, match="empty"):
        load_prompts([])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptSetError, match="cannot parse"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(PromptSetError, match="unsupported"):
        load_prompts(tmp_path / "p.xml")


def test_format_chat_uses_the_template(tokenizer):
    assert format_chat(tokenizer, ["why"]) == ["[BOS]<user> why <assistant>"]
    assert format_chat(tokenizer, ["why"], system_prompt="be brief") == ["[BOS]<system> be brief <user> why <assistant>"]
