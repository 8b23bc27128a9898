"""expert-activation-profile on tiny real models of every MoE family.

Also holds the small helpers test_expert_prune.py shares: a factory root
with a calibration corpus, tiny MoE models with a tokenizer inside it, and
an alloy naming both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters import families, get_family
from factory.errors import StageFailed
from factory.integrity import sha256_file
from stations.profile import LayerStats, experts_module
from tests.stationkit import Reports, make_ctx, run_stages
from tests.tiny_models import TOKENIZER_VOCAB, TOP_K, add_tokenizer, build_tiny_model

MOE_FAMILIES = [f.name for f in families() if f.is_moe]
# The tiny builder's GQA default (2 KV heads for 4 query heads) does not fit
# DeepSeek's latent attention, whose forward then fails on the head count;
# these families need as many KV heads as query heads to run at all.
FORWARD_OVERRIDES = {"deepseek_v2": {"num_key_value_heads": 4}, "deepseek_v3": {"num_key_value_heads": 4}}
CORPUS = "calibration/calib.jsonl"
TOKENS, SEQ = 384, 64


def _doc(i: int) -> str:
    return (f"def f{i}(x):\n    return x * {i} + {i * i}\n"
            f"The quick brown fox {i} jumps over the lazy dog {i % 7} times.\n")


def make_station_root(path: Path) -> Path:
    """A real factory root (factory init) with a JSONL calibration corpus."""
    subprocess.run([sys.executable, "-m", "factory.cli", "init", str(path)], check=True, capture_output=True)
    (path / "calibration").mkdir(exist_ok=True)
    (path / CORPUS).write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(80)))
    return path


def moe_model(root: Path, family: str, name: str | None = None, **overrides) -> Path:
    """A tiny `family` model with tokenizer at ROOT/models/<name> (built once)."""
    out = root / "models" / (name or family)
    if not (out / "config.json").exists():
        kwargs = {**FORWARD_OVERRIDES.get(family, {}), **overrides}
        build_tiny_model(family, out, vocab_size=TOKENIZER_VOCAB, **kwargs)
        add_tokenizer(out)
    return out


def alloy(root: Path, model: Path, family: str, *stages: dict) -> dict:
    return {
        "name": "moe-test", "version": "1.0.0",
        "source": {"baseModel": str(model.relative_to(root)), "architecture": family},
        "calibrationCorpora": [{"id": "calib", "path": CORPUS, "sha256": sha256_file(root / CORPUS)}],
        "stages": list(stages),
    }


def profile_stage(**extra) -> dict:
    return {"type": "expert-activation-profile", "calibrationCorpus": "calib", "calibrationTokens": TOKENS,
            "sequenceLength": SEQ, **extra}


def router_rows(model_dir: Path, name: str) -> torch.Tensor:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"] \
        if (model_dir / "model.safetensors.index.json").exists() else None
    file = index[name] if index else "model.safetensors"
    with safe_open(str(model_dir / file), framework="pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_station_root(tmp_path_factory.mktemp("profile-root"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_profile_counts_norms_and_reap(root: Path, family: str) -> None:
    model = moe_model(root, family)
    entries, reports = run_stages(root, alloy(root, model, family, profile_stage()), base=f"prof-{family}")
    metrics = entries[0]["metrics"]
    work = root / "work" / f"prof-{family}"
    imp = json.loads((work / metrics["importance"]).read_text())
    spec = get_family(family)
    config = json.loads((model / "config.json").read_text())

    assert imp["format"] == "forge-factory/expert-importance" and imp["version"] == 1
    assert imp["num_experts"] == 4 and imp["top_k"] == TOP_K and imp["family"] == family
    assert imp["corpus"]["sha256"] == sha256_file(root / CORPUS) == metrics["corpus_sha256"]
    assert imp["corpus"]["ref"] == metrics["corpus"] == "calib"
    assert imp["tokens"] == metrics["tokens"] == TOKENS
    assert sorted(map(int, imp["layers"])) == spec.moe_layers(config)  # one row per MoE layer, dense ones excluded
    for layer, row in imp["layers"].items():
        counts = row["activation_count"]
        assert sum(counts) == TOKENS * TOP_K
        assert row["tokens_seen"] == counts
        rows = router_rows(model, spec.router_tensor_names(int(layer))[0]).double()
        assert torch.allclose(torch.tensor(row["router_l2"], dtype=torch.float64), torch.linalg.norm(rows, dim=1))
        for e, n in enumerate(counts):
            assert (row["reap"][e] == 0.0) == (n == 0), (layer, e, n, row["reap"][e])
            assert (row["gate_weight"][e] > 0) == (n > 0)
    assert len(reports.progress()) == TOKENS // SEQ  # one report per block
    assert reports.events("model/load")[0]["purpose"] == "expert-activation-profile"


def test_reap_uses_routed_tokens_only_and_matches_the_expert_weights(root: Path) -> None:
    """REAP of expert e = mean over its routed tokens of gate x ||expert_e(x)||,
    with expert_e computed here from the fused weights by hand."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(moe_model(root, "qwen3_moe")).eval()
    router = model.model.layers[0].mlp.gate
    experts = experts_module(model, router, 4, 0)
    stats = LayerStats.zeros(4, "cpu", experts)
    torch.manual_seed(1)
    hidden = torch.randn(6, 32)
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [1, 0]])  # expert 3: never routed
    weights = torch.rand(6, 2)
    with torch.no_grad():
        stats.add(hidden, weights, index)

    def expert_out(e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        return (experts.act_fn(gate) * up) @ experts.down_proj[e].T

    assert stats.counts.tolist() == [4, 5, 3, 0]
    assert stats.reap[3] == 0 and stats.gate[3] == 0
    with torch.no_grad():
        for e in range(3):
            want = sum(float(weights[t, s]) * float(expert_out(e, hidden[t]).norm())
                       for t in range(6) for s in range(2) if index[t, s] == e)
            assert stats.reap[e].item() == pytest.approx(want, rel=1e-5)


def test_low_coverage_experts_are_warned_not_fatal(root: Path) -> None:
    model = moe_model(root, "olmoe")
    entries, _ = run_stages(root, alloy(root, model, "olmoe", profile_stage(minTokensPerExpert=10**6)),
                            base="prof-low")
    metrics = entries[0]["metrics"]
    assert metrics["low_coverage_experts"] == 2 * 4 == len(metrics["warnings"])
    assert "minTokensPerExpert" in metrics["warnings"][0]
    imp = json.loads((root / "work/prof-low" / metrics["importance"]).read_text())
    assert imp["warnings"] == metrics["warnings"]


def test_examples_and_token_budget_limit_the_corpus(root: Path) -> None:
    model = moe_model(root, "qwen3_moe")
    stage = profile_stage(calibrationExamples=2, calibrationTokens=10**6, sequenceLength=16)
    entries, _ = run_stages(root, alloy(root, model, "qwen3_moe", stage), base="prof-ex")
    two_docs = sum(len(_doc(i)) for i in range(2))  # byte-level BPE: at most one token per byte, plus EOS each
    assert 0 < entries[0]["metrics"]["tokens"] <= two_docs + 2


def test_forge_alloys_max_length_sets_the_block_and_sequence_length_wins(root: Path) -> None:
    """forge-alloy spells the block length maxLength; our sequenceLength,
    when both are given, is the one used. Each block is one progress report."""
    model = moe_model(root, "qwen3_moe")
    for base, extra, block in (("prof-max", {"maxLength": 128}, 128),
                               ("prof-both", {"maxLength": 128, "sequenceLength": SEQ}, SEQ)):
        stage = {k: v for k, v in profile_stage(**extra).items() if k != "sequenceLength" or "sequenceLength" in extra}
        entries, reports = run_stages(root, alloy(root, model, "qwen3_moe", stage), base=base)
        imp = json.loads((root / "work" / base / entries[0]["metrics"]["importance"]).read_text())
        assert imp["blocks"] == len(reports.progress()) == TOKENS // block, base


def test_dense_model_and_changed_corpus_are_refused(root: Path) -> None:
    dense = root / "models" / "dense"
    if not dense.exists():
        build_tiny_model("qwen3", dense, vocab_size=TOKENIZER_VOCAB)
        add_tokenizer(dense)
    with pytest.raises(StageFailed, match="without routed experts"):
        run_stages(root, alloy(root, dense, "qwen3", profile_stage()), base="prof-dense")

    doc = alloy(root, moe_model(root, "qwen3_moe"), "qwen3_moe", profile_stage())
    doc["calibrationCorpora"][0]["sha256"] = "0" * 64
    ctx = make_ctx(root, doc, 0, base="prof-sha", reports=Reports())
    from stations.profile import run_stage

    with pytest.raises(StageFailed, match="sha256"):
        run_stage(ctx)


def test_a_corpus_line_longer_than_memory_wants_is_profiled_within_the_budget(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MB document on one line, read by the streaming parser (its
    whole-line limit lowered so a small file takes that path): the profile
    sees exactly the budget's tokens, from the start of that document."""
    from stations import corpus as corpora

    monkeypatch.setattr(corpora, "WHOLE_LINE_BYTES", 64 * 1024)
    rel = "calibration/one-long-line.jsonl"
    doc = "".join(_doc(i) for i in range(40_000))
    (root / rel).write_text(json.dumps({"id": "long", "text": doc, "source": "generated"}) + "\n")
    model = moe_model(root, "qwen3_moe")
    a = alloy(root, model, "qwen3_moe", profile_stage())
    a["calibrationCorpora"] = [{"id": "calib", "path": rel, "sha256": sha256_file(root / rel)}]
    entries, reports = run_stages(root, a, base="prof-long")
    assert len(doc) > 4 * 2**20 and entries[0]["metrics"]["tokens"] == TOKENS
    assert len(reports.progress()) == TOKENS // SEQ
