"""The README's and docs' results tables are what scripts/render_results.py renders from the committed JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_match_their_json(render):
    marked = 0
    for doc in render.documents():
        text = doc.read_text(encoding="utf-8")
        marked += text.count(":start -->")
        assert render.render_document(text) == text, f"{doc.name} is out of date: run python scripts/render_results.py"
    assert marked >= 11  # README headline; docs/results.md x3; docs/judge.md judge; docs/performance.md x6


def test_every_table_spec_is_rendered_in_a_document(render):
    text = "".join(doc.read_text(encoding="utf-8") for doc in render.documents())
    assert [name for name in render.TABLES if f"<!-- results:{name}:start -->" not in text] == []
    assert render.main(["--check"]) == 0


def test_a_table_is_rendered_between_its_markers_and_nowhere_else(render, tmp_path):
    results = {"commit": "0123456789abcdef", "command": "python bench.py --n 2",
               "columns": [["name", "model"], ["refusal", "refusal"], ["kl", "KL"], ["ppl", "ΔPPL", "{:+.1%}"],
                           ["note", "note"]],
               "rows": [{"name": "base", "refusal": {"rate": 0.5, "k": 1, "n": 2, "ci95": [0.0126, 0.9874]},
                         "kl": 0.0, "ppl": 0.0},
                        {"name": "edited", "refusal": {"rate": 0.0, "k": 0, "n": 2, "ci95": [0.0, 0.8419]},
                         "kl": 0.04567, "ppl": -0.0123, "note": "a|b"}]}
    (tmp_path / "toy.json").write_text(json.dumps(results))
    text = "intro\n<!-- results:toy:start -->\nstale\n<!-- results:toy:end -->\noutro\n"
    out = render.render_document(text, tmp_path)
    body = out.split("<!-- results:toy:start -->\n")[1].split("<!-- results:toy:end -->")[0]
    assert out.startswith("intro\n") and out.endswith("<!-- results:toy:end -->\noutro\n") and "stale" not in out
    lines = body.splitlines()
    assert lines[0] == "| model | refusal | KL | ΔPPL | note |" and lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| base | 50.0% (1/2) [1.3%, 98.7%] | 0.000 | +0.0% | – |"
    assert lines[3] == "| edited | 0.0% (0/2) [0.0%, 84.2%] | 0.046 | -1.2% | a\\|b |"
    assert "`python bench.py --n 2` at commit `0123456789ab`" in body
    assert render.render_document(out, tmp_path) == out  # rendering twice changes nothing


def test_frontier_points_convert_to_the_shared_shape(render):
    def point(name, k, kl, ppl, over=None):
        p = {"name": name, "refused": k, "n": 100, "refusal": k / 100, "ci95": [0.1, 0.2], "kl": kl, "ppl_change": ppl}
        if over is not None:
            p.update(over_refused=over, over_n=112, over_refusal=over / 112, over_ci95=[0.3, 0.4])
        return p

    points = [point("base", 55, 0.0, 0.0, 48), point("SRA default", 17, 0.029, 0.0004, 18),
              point("standard γ=1.0", 12, 0.107, 0.034), point("standard_filtered γ=1.0", 9, 0.055, 0.011),
              point("standard γ=0.5", 34, 0.020, 0.010)]
    out = render.from_frontier(points, "abc")
    assert [r["name"] for r in out["frontier_points"]["rows"]] == [p["name"] for p in points]
    rows = out["frontier_points"]["rows"]
    assert set(out) == {"frontier_points"}  # the headline comes from the real-model run's results record
    assert rows[0]["refusal"] == {"rate": 0.55, "k": 55, "n": 100, "ci95": [0.1, 0.2]}
    sra = next(r for r in rows if "SRA" in r["name"])
    assert sra["kl"] == 0.029 and sra["over_refusal"]["k"] == 18 and rows[2]["over_refusal"] is None
    assert out["frontier_points"]["commit"] == "abc" and {c[0] for c in out["frontier_points"]["columns"]} >= {"refusal", "kl"}


def test_a_marker_without_its_json_is_a_clear_error(render, tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        render.render_document("<!-- results:missing:start -->\n<!-- results:missing:end -->\n", tmp_path)


def _write(folder, name, data):
    (folder / name).write_text(json.dumps(data))


def test_a_spec_renders_its_cells_from_several_files_of_their_own_shape(render, tmp_path):
    run = {"commit": "aaaabbbbccccdddd", "layers": 4, "target": 1.1, "ok": True, "steps": [0.5, 1.25, 2.0],
           "seconds": {"hooked pass": 3.0, "bare pass": 2.5}, "size": 630167424, "note": "a|b"}
    _write(tmp_path, "one.json", run)
    _write(tmp_path, "two.json", {**run, "commit": "eeeeffff00001111", "layers": 8, "ok": False, "steps": [1.0],
                                  "seconds": {"hooked pass": 9.0, "bare pass": None}})
    _write(tmp_path, "three.json", {k: v for k, v in run.items() if k != "commit"})
    columns = render.Spec(
        files=(("one.json", "small"), ("two.json", "big")), writer="bench.py", caption="{f[target]} at most:",
        header=("what", "target", "{name} ({f[layers]} layers, {f[size_b]:.2f}B)"),
        rows=(("hooked / bare", "≤ {f[target]}", "**{f[ratio]:.2f}** ({f[seconds][hooked pass]:.1f} s)"),
              ("steps", "linear", "{f[steps]:.2f} s, first {f[steps][0]:.1f}"),
              ("bare, equal", "", "{f[seconds][bare pass]:.1f}, {f[ok]}, {f[note]}")),
        derived={"size_b": lambda d: d["size"] / 1e9, "ratio": lambda d: d["seconds"]["hooked pass"] / 2.0})
    rows = render.Spec(files=(("one.json", "small"), ("three.json", "old")), writer="bench.py --rows", file_rows=True,
                       header=("model", "layers"), rows=(("{name}", "{f[layers]}"),))
    text = "<!-- results:cols:start -->\n<!-- results:cols:end -->\n<!-- results:rows:start -->\n<!-- results:rows:end -->\n"
    out = render.render_document(text, tmp_path, {"cols": columns, "rows": rows})
    lines = out.splitlines()
    assert lines[1:4] == ["1.1 at most:", "", "| what | target | small (4 layers, 0.63B) | big (8 layers, 0.63B) |"]
    assert lines[5] == "| hooked / bare | ≤ 1.1 | **1.50** (3.0 s) | **4.50** (9.0 s) |"
    assert lines[6] == "| steps | linear | 0.50, 1.25, 2.00 s, first 0.5 | 1.00 s, first 1.0 |"
    assert lines[7] == "| bare, equal |  | 2.5, yes, a\\|b | –, no, a\\|b |"
    assert f"`{tmp_path / 'one.json'}` (commit `aaaabbbbcccc`) and `{tmp_path / 'two.json'}` (commit `eeeeffff0000`), " \
           "written by `bench.py`.</sub>" in out
    assert "| old | 4 |" in out and f"`{tmp_path / 'three.json'}` (no commit recorded), written by `bench.py --rows`" in out
    assert render.render_document(out, tmp_path, {"cols": columns, "rows": rows}) == out


def test_a_spec_refuses_files_that_disagree_on_a_shared_cell_or_lack_a_key(render, tmp_path):
    _write(tmp_path, "a.json", {"commit": "1", "target": 1.0, "x": 1})
    _write(tmp_path, "b.json", {"commit": "2", "target": 2.0})
    both = (("a.json", "a"), ("b.json", "b"))
    with pytest.raises(SystemExit, match="disagree on the shared cell"):
        render.render_spec(render.Spec(files=both, writer="w", header=("t", "{name}"),
                                       rows=(("≤ {f[target]}", "{f[x]}"),)), tmp_path)
    with pytest.raises(SystemExit, match="'x' is not there"):
        render.render_spec(render.Spec(files=both, writer="w", header=("{name}",), rows=(("{f[x]}",),)), tmp_path)
    with pytest.raises(SystemExit, match="key path"):
        render.render_spec(render.Spec(files=both, writer="w", header=("{f.__class__}",), rows=()), tmp_path)
    with pytest.raises(SystemExit, match="already holds"):
        render.render_spec(render.Spec(files=both, writer="w", header=("{name}",), rows=(),
                                       derived={"target": lambda d: 0}), tmp_path)


def test_a_results_record_names_the_commit_its_run_started_from():
    from transformers_sra.measure.evaluation import EvalSets
    from transformers_sra.measure.records import git_commit, results_record

    sets = EvalSets(harmful=["a"], harmless=["b"], over_refusal=[], text=[], math=[], code=[])
    metrics = {"refusal_rate": 0.5, "refusal_rate_ci95": [0.1, 0.9], "refusal_rate_count": 1, "refusal_rate_n": 2}
    started = results_record({"base": metrics}, sets, commit="0123abc")
    assert started["commit"] == "0123abc" and started["rows"][0]["refusal_rate"]["k"] == 1
    assert results_record({"base": metrics}, sets)["commit"] == git_commit() != "0123abc"
