"""The prune station on tiny real checkpoints: counts, slices, reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from typing import get_args

from adapters import get_family
from factory.alloy import PruneStrategy
from factory.errors import StageFailed
from factory.support import HEAD_PRUNE_REFUSED as REFUSED_STRATEGIES
from stations.head_prune import STRATEGIES, Geometry, plan_counts
from tests.stationkit import run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

DENSE = ["llama", "mistral", "qwen2", "qwen3"]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in model_dir.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _model(root: Path, family: str, name: str = "m", **overrides) -> Path:
    out = build_tiny_model(family, root / "models" / name, vocab_size=TOKENIZER_VOCAB, **overrides)
    return add_tokenizer(out)


def _alloy(family: str, name: str = "m", **stage) -> dict:
    """A one-stage prune alloy. The tiny models have 4 heads, under the
    schema's default floors (4 heads, 2 KV heads), so the floors are lowered."""
    return {"name": "prune-test", "version": "1.0.0",
            "source": {"baseModel": f"models/{name}", "architecture": family},
            "stages": [{"type": "prune", "strategy": "magnitude", "level": 0.5, "minHeadsPerLayer": 1,
                        "minKvHeadsPerLayer": 1, **stage}]}


def _run(root: Path, alloy: dict) -> tuple[dict, Path]:
    entries, _ = run_stages(root, alloy)
    metrics = entries[-1]["metrics"]
    return metrics, root / "work" / "part" / metrics["model_dir"]


def _corpus(root: Path) -> str:
    (root / "calibration").mkdir(exist_ok=True)
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\nThe quick brown fox {i}."}) for i in range(40)]
    (root / "calibration" / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return "calibration/calib.jsonl"


def _rows(t: torch.Tensor, blocks: list[int], width: int, dim: int = 0) -> torch.Tensor:
    return torch.cat([t.narrow(dim, b * width, width) for b in blocks], dim=dim)


# ── counts (pure arithmetic) ───────────────────────────────────────────────


def _geo(heads: int, kv: int) -> Geometry:
    return Geometry(heads, kv, 8, 8, (0,))


@pytest.mark.parametrize("heads, kv, level, mins, want", [
    (32, 8, 0.5, (1, 1), (8, 2)),  # GQA: every KV group kept, 2 of 4 queries each
    (32, 8, 0.3, (1, 1), (8, 3)),  # 22 wanted -> nearest whole queries-per-group: 24
    (32, 8, 0.9, (1, 1), (3, 1)),  # one query per group is still too many: groups go
    (32, 8, 0.9, (1, 4), (4, 1)),  # ... but never under minKvHeadsPerLayer
    (12, 12, 0.5, (1, 1), (6, 1)),  # plain MHA: whole groups
    (32, 8, 0.9, (20, 1), (8, 3)),  # clamped up to minHeadsPerLayer (then rounded up to a valid shape)
    (4, 2, 0.0, (1, 1), (2, 2)),  # level 0 removes nothing
])
def test_plan_counts(heads, kv, level, mins, want):
    plan = plan_counts(_geo(heads, kv), level=level, min_heads=mins[0], min_kv_heads=mins[1])
    assert (plan.kv_keep, plan.q_per_group_keep) == want
    assert plan.heads_keep >= mins[0] and plan.kv_keep >= mins[1]


def test_plan_counts_refuses_floors_above_the_model():
    with pytest.raises(StageFailed, match="minHeadsPerLayer=9"):
        plan_counts(_geo(8, 2), level=0.5, min_heads=9, min_kv_heads=1)


# ── the station on real checkpoints ────────────────────────────────────────


@pytest.mark.parametrize("family", DENSE)
def test_gqa_half_the_heads_reloads_with_bit_exact_slices(root, family):
    src = _model(root, family, num_attention_heads=4, num_key_value_heads=2)
    metrics, out = _run(root, _alloy(family))

    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # stock transformers, strict shapes
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert model.config.head_dim == 8
    logits = model(torch.tensor([[1, 5, 9, 200, 3]])).logits
    assert logits.shape == (1, 5, TOKENIZER_VOCAB) and torch.isfinite(logits).all()
    assert metrics["headsPerLayerAfter"] == 2 and metrics["paramsAfter"] < metrics["paramsBefore"]
    assert metrics["dataFree"] is True and metrics["strategy"] == "magnitude"

    before, after = _tensors(src), _tensors(out)
    kept = json.loads((out.parent / "head_prune.json").read_text())["keptHeads"]
    for layer, sel in kept.items():
        p = f"model.layers.{layer}.self_attn."
        heads, kv = sel["heads"], sel["kvHeads"]
        assert len(heads) == 2 and len(kv) == 2
        assert all(h // 2 in kv for h in heads)  # group structure: one query per kept KV head
        assert torch.equal(after[p + "q_proj.weight"], _rows(before[p + "q_proj.weight"], heads, 8))
        assert torch.equal(after[p + "k_proj.weight"], _rows(before[p + "k_proj.weight"], kv, 8))
        assert torch.equal(after[p + "v_proj.weight"], _rows(before[p + "v_proj.weight"], kv, 8))
        assert torch.equal(after[p + "o_proj.weight"], _rows(before[p + "o_proj.weight"], heads, 8, dim=1))
        if family == "qwen2":  # q/k/v biases follow their rows
            assert torch.equal(after[p + "q_proj.bias"], _rows(before[p + "q_proj.bias"], heads, 8))
            assert torch.equal(after[p + "k_proj.bias"], _rows(before[p + "k_proj.bias"], kv, 8))
        if family == "qwen3":  # per-head-dim norms are shared by all heads: untouched
            assert torch.equal(after[p + "q_norm.weight"], before[p + "q_norm.weight"])
    untouched = [n for n in before if "self_attn" not in n]
    assert all(torch.equal(before[n], after[n]) for n in untouched)
    assert (out / "tokenizer.json").is_file()


def test_mha_prunes_whole_groups(root):
    _model(root, "llama", num_attention_heads=4, num_key_value_heads=4)
    metrics, out = _run(root, _alloy("llama"))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    assert metrics["kvHeadsPerLayerAfter"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_head_dim_written_when_config_derived_it(root):
    src = _model(root, "llama", num_attention_heads=4, num_key_value_heads=2)
    config = json.loads((src / "config.json").read_text())
    config.pop("head_dim")  # hidden 32 / 4 heads = 8, derived
    (src / "config.json").write_text(json.dumps(config))
    _, out = _run(root, _alloy("llama"))
    assert json.loads((out / "config.json").read_text())["head_dim"] == 8  # not 32 / 2 = 16
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_min_heads_clamps_the_level(root):
    """Documented choice: a level that would go under minHeadsPerLayer is clamped, not refused."""
    _model(root, "qwen3", num_attention_heads=4, num_key_value_heads=2)
    metrics, out = _run(root, _alloy("qwen3", level=0.9, minHeadsPerLayer=2))
    assert metrics["clampedBy"] == "minHeadsPerLayer"
    assert metrics["headsPerLayerAfter"] == 2 and metrics["levelAchieved"] == 0.5
    assert transformers.AutoConfig.from_pretrained(out).num_attention_heads == 2


def test_pad_mode_zeroes_heads_in_place_and_computes_what_removal_does(root):
    src = _model(root, "qwen2", num_attention_heads=4, num_key_value_heads=2)
    removed_metrics, removed = _run(root, _alloy("qwen2"))
    padded_metrics, padded = _run(root, _alloy("qwen2", defragMode="pad"))
    assert padded_metrics["defragMode"] == "pad" and padded_metrics["paramsAfter"] == padded_metrics["paramsBefore"]
    assert json.loads((padded / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    before, after = _tensors(src), _tensors(padded)
    kept = json.loads((padded.parent / "head_prune.json").read_text())["keptHeads"]
    for layer, sel in kept.items():
        o = f"model.layers.{layer}.self_attn.o_proj.weight"
        assert after[o].shape == before[o].shape
        for h in range(4):
            cols = after[o][:, h * 8:(h + 1) * 8]
            assert torch.equal(cols, before[o][:, h * 8:(h + 1) * 8] if h in sel["heads"] else torch.zeros_like(cols))
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    a = transformers.AutoModelForCausalLM.from_pretrained(removed)(ids).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(padded)(ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_defrag_mode_is_refused_by_the_schema():
    import json

    from factory.validation import check_bytes

    found = check_bytes(json.dumps(_alloy("qwen2", defragMode="shuffle")).encode()).findings
    assert [(f.path, f.value) for f in found] == [("$.stages[0].defragMode", "shuffle")]


def test_llama_keeps_a_head_count_dividing_hidden(root):
    """transformers refuses a Llama config whose heads do not divide
    hidden_size: 4 heads at level 0.25 would keep 3 of a 32-wide model."""
    _model(root, "llama", num_attention_heads=4, num_key_value_heads=4)
    metrics, out = _run(root, _alloy("llama", level=0.25))
    assert (metrics["headsPerLayerAfter"], metrics["clampedBy"]) == (4, "hiddenSize")
    transformers.AutoModelForCausalLM.from_pretrained(out)
    metrics, out = _run(root, _alloy("llama", level=0.5))  # 2 divides 32: pruned as asked
    assert (metrics["headsPerLayerAfter"], metrics["clampedBy"]) == (2, None)


def test_calibration_scores_drop_a_silent_head(root):
    """A head whose output projection is zero adds nothing to the residual
    stream: the activation strategy must remove it."""
    src = _model(root, "qwen2", num_attention_heads=4, num_key_value_heads=4)
    weights = load_file(src / "model.safetensors")
    for layer in (0, 1):
        weights[f"model.layers.{layer}.self_attn.o_proj.weight"][:, 8:16] = 0.0  # head 1 silent
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    metrics, out = _run(root, _alloy("qwen2", strategy="activation-magnitude", calibrationCorpusFile=_corpus(root),
                                     analysisSteps=2, level=0.25))
    assert metrics["strategy"] == "activation-magnitude" and metrics["dataFree"] is False
    assert metrics["method"] == "output-contribution-norm"
    assert 0 < metrics["calibrationTokens"] <= 2 * 256
    sidecar = json.loads((out.parent / "head_prune.json").read_text())
    for layer in ("0", "1"):
        assert sidecar["scores"][layer][1] == 0.0
        assert 1 not in sidecar["keptHeads"][layer]["heads"] and len(sidecar["keptHeads"][layer]["heads"]) == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[4, 5, 6]])).logits).all()


def test_calibration_strategy_without_corpus_falls_back_to_magnitude(root):
    _model(root, "mistral")
    metrics, _ = _run(root, _alloy("mistral", strategy="entropy"))
    assert (metrics["strategy"], metrics["strategyRequested"], metrics["dataFree"]) == ("magnitude", "entropy", True)


def test_gradient_scores_drop_a_gated_off_head(root):
    """A head whose output projection is zero has no path to the loss, so the
    loss's gradient with respect to its gate is exactly zero: pruned first."""
    src = _model(root, "mistral", num_attention_heads=4, num_key_value_heads=4)
    weights = load_file(src / "model.safetensors")
    for layer in (0, 1):
        weights[f"model.layers.{layer}.self_attn.o_proj.weight"][:, 16:24] = 0.0  # head 2 silent
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    metrics, out = _run(root, _alloy("mistral", strategy="gradient", calibrationCorpusFile=_corpus(root),
                                     analysisSteps=2, level=0.25))
    assert (metrics["strategy"], metrics["method"], metrics["dataFree"]) == ("gradient", "head-mask-gradient", False)
    sidecar = json.loads((out.parent / "head_prune.json").read_text())
    for layer in ("0", "1"):
        scores = sidecar["scores"][layer]
        assert scores[2] == 0.0 and all(s > 0 for i, s in enumerate(scores) if i != 2)
        assert sidecar["keptHeads"][layer]["heads"] == [0, 1, 3]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[4, 5, 6]])).logits).all()


def test_random_strategy_is_seeded_and_reproducible(root):
    _model(root, "llama", num_attention_heads=4, num_key_value_heads=4)
    first, out = _run(root, _alloy("llama", strategy="random"))
    scores = json.loads((out.parent / "head_prune.json").read_text())["scores"]
    again, out = _run(root, _alloy("llama", strategy="random"))
    assert json.loads((out.parent / "head_prune.json").read_text())["scores"] == scores
    assert (first["method"], first["dataFree"], first["seed"]) == ("seeded-random", True, 0)
    assert len({tuple(v) for v in scores.values()}) == 2  # one stream: layers draw different numbers


def test_every_reference_strategy_has_a_defined_behaviour():
    """forge-alloy's enum, partitioned: each strategy runs or is refused with a reason."""
    assert set(STRATEGIES) | set(REFUSED_STRATEGIES) == set(get_args(PruneStrategy))
    assert not set(STRATEGIES) & set(REFUSED_STRATEGIES)


@pytest.mark.parametrize("strategy", sorted(REFUSED_STRATEGIES))
def test_router_strategies_are_refused_with_the_fix(root, strategy):
    _model(root, "llama")
    with pytest.raises(StageFailed, match=rf"strategy: strategy '{strategy}' .* attention heads are not routed.*"
                                          "use activation-magnitude"):
        _run(root, _alloy("llama", strategy=strategy))


def test_moe_attention_is_pruned(root):
    _model(root, "qwen3_moe")
    _, out = _run(root, _alloy("qwen3_moe"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_attention_heads == 2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_layouts_it_cannot_slice_are_refused(root):
    _model(root, "olmoe")
    with pytest.raises(StageFailed, match="sized by the head count"):
        _run(root, _alloy("olmoe"))


@pytest.mark.parametrize("q_lora_rank", [16, None], ids=["q_b_proj", "plain-q_proj"])
def test_latent_attention_prunes_per_head_rows(root, q_lora_rank):
    """DeepSeek MLA: q (q_b_proj, or V2-Lite's plain q_proj) rows per head of
    nope + rope = 16, kv_b_proj rows per head of nope + v = 16, o_proj
    columns per head of v = 8; the latent projections are shared, untouched."""
    src = _model(root, "deepseek_v2", num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank)
    metrics, out = _run(root, _alloy("deepseek_v2"))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    assert config["q_lora_rank"] == q_lora_rank and config["head_dim"] == 8  # the rope width, untouched
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 200, 3]])).logits).all()
    before, after = _tensors(src), _tensors(out)
    q = "q_proj" if q_lora_rank is None else "q_b_proj"
    for layer, sel in json.loads((out.parent / "head_prune.json").read_text())["keptHeads"].items():
        p = f"model.layers.{layer}.self_attn."
        heads = sel["heads"]
        assert sel["kvHeads"] == heads and len(heads) == 2
        assert torch.equal(after[p + q + ".weight"], _rows(before[p + q + ".weight"], heads, 16))
        assert torch.equal(after[p + "kv_b_proj.weight"], _rows(before[p + "kv_b_proj.weight"], heads, 16))
        assert torch.equal(after[p + "o_proj.weight"], _rows(before[p + "o_proj.weight"], heads, 8, dim=1))
        shared = [p + "kv_a_proj_with_mqa.weight", p + "kv_a_layernorm.weight"]
        shared += [p + "q_a_proj.weight", p + "q_a_layernorm.weight"] if q_lora_rank else []
        assert all(torch.equal(after[n], before[n]) for n in shared)
        assert (p + "q_a_proj.weight" in after) == (q_lora_rank is not None)
    assert metrics["paramsAfter"] < metrics["paramsBefore"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni", "qwen3_vl"])
@pytest.mark.parametrize("strategy", ["magnitude", "activation-magnitude"])
def test_non_text_towers_are_copied_bit_for_bit(root, family, strategy):
    """Vision, audio, talker and vocoder tensors leave byte-identical; only
    the text attention loses heads, and the model still loads and runs."""
    src = _model(root, family)
    extra = {"calibrationCorpusFile": _corpus(root), "analysisSteps": 1} if strategy != "magnitude" else {}
    metrics, out = _run(root, _alloy(family, strategy=strategy, **extra))
    spec = get_family(family)
    before, after = _tensors(src), _tensors(out)
    towers = {n for n in before if spec.tower_of(n)}
    assert {spec.tower_of(n).name for n in towers} == {t.name for t in spec.towers}
    assert metrics["towerTensorsCopied"] == len(towers)
    for name in towers:
        assert after[name].dtype == before[name].dtype
        assert torch.equal(after[name].view(torch.uint8), before[name].view(torch.uint8)), name
    assert metrics["strategy"] == strategy and metrics["headsPerLayerAfter"] == 2
    # Qwen2.5-VL's attention derives head_dim from hidden / heads: heads are zeroed in place there.
    padded = spec.attention.fixed_head_count
    assert metrics["defragMode"] == ("pad" if padded else "remove")
    assert spec.read(json.loads((out / "config.json").read_text()), "num_attention_heads") == (4 if padded else 2)
    model = getattr(transformers, spec.auto_class).from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[4, 5, 6]])).logits).all()


def test_sharded_checkpoint_keeps_its_index(root):
    src = build_tiny_model("llama", root / "models" / "m", vocab_size=TOKENIZER_VOCAB, max_shard_size="20KB")
    _, out = _run(root, _alloy("llama"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in src.glob("*.safetensors")}
    sizes = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            sizes += sum(s.get_tensor(k).nbytes for k in s.keys())
    assert index["metadata"]["total_size"] == sizes
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_attention_heads == 2
