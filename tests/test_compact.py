"""The compact station on tiny real checkpoints: tiers from measured
importance, exactly the dead tier removed, per-tier precision, reloads.

Dead units are planted by zeroing what a unit writes to the residual stream
(a head's o_proj columns, a channel's down_proj column): their importance is
exactly 0 whatever the random weights. Tier placement is planted the same
way: scaling those columns scales that unit's importance and nothing else in
its layer, so a unit can be put at a chosen fraction of the layer's peak.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from factory.errors import StageFailed
from stations import compact
from tests.stationkit import make_ctx, run_stages
from tests.tiny_models import HEAD_DIM, HIDDEN, INTERMEDIATE, TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

ATTN = "model.layers.{layer}.self_attn."
MLP = "model.layers.{layer}.mlp."


def _model(root: Path, family: str = "qwen3", name: str = "m", **overrides) -> Path:
    out = build_tiny_model(family, root / "models" / name, vocab_size=TOKENIZER_VOCAB, **overrides)
    return add_tokenizer(out)


def _corpus(root: Path) -> str:
    (root / "calibration").mkdir(exist_ok=True)
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\nThe quick brown fox {i} jumps."})
             for i in range(40)]
    (root / "calibration" / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return "calibration/calib.jsonl"


def _alloy(root: Path, family: str = "qwen3", *, corpus: bool = True, extra_stages: list | None = None,
           **stage) -> dict:
    own = {"calibrationCorpusFile": _corpus(root)} if corpus else {}
    return {"name": "compact-test", "version": "1.0.0",
            "source": {"baseModel": "models/m", "architecture": family},
            "stages": [{"type": "compact", **own, **stage}, *(extra_stages or [])]}


def _run(root: Path, alloy: dict) -> tuple[dict, Path, dict]:
    entries, _ = run_stages(root, alloy, upto=1)
    metrics = entries[0]["metrics"]
    out = root / "work" / "part" / metrics["model_dir"]
    return metrics, out, json.loads((out.parent / compact.SIDECAR).read_text())


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _edit(model_dir: Path, fn) -> None:
    """Rewrite the checkpoint's one shard with `fn(tensors)` applied."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _plant_dead(model_dir: Path, heads: dict[int, list[int]], channels: dict[int, list[int]],
                prefix: str = "model.") -> None:
    def zero(t):
        for layer, hs in heads.items():
            for h in hs:
                t[f"{prefix}layers.{layer}.self_attn.o_proj.weight"][:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0.0
        for layer, js in channels.items():
            for j in js:
                t[f"{prefix}layers.{layer}.mlp.down_proj.weight"][:, j] = 0.0
    _edit(model_dir, zero)


def _blocks(t: torch.Tensor, keep: list[int], width: int, dim: int) -> torch.Tensor:
    return torch.cat([t.narrow(dim, b * width, width) for b in keep], dim=dim)


def _logits(model_dir: Path, auto=transformers.AutoModelForCausalLM) -> torch.Tensor:
    model = auto.from_pretrained(model_dir)  # stock transformers, strict shapes
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 200, 3, 17, 44]])).logits


# Heads 4 (2 KV groups of 2). One dead head per group in each layer, so one
# shape (2 KV x 1 query) removes exactly them; 5 dead channels per layer.
DEAD_HEADS = {0: [1, 2], 1: [0, 3]}
DEAD_CHANNELS = {0: [3, 10, 20, 40, 63], 1: [0, 7, 8, 33, 50]}
# Below this fraction of peak only the planted zeros fall (random weights
# keep every other unit far above it); the tier edges above are defaults.
LOW_DEAD = 0.01


def test_removes_exactly_the_planted_dead_tier_and_reloads(root):
    src = _model(root)
    _plant_dead(src, DEAD_HEADS, DEAD_CHANNELS)
    metrics, out, side = _run(root, _alloy(root, deadThreshold=LOW_DEAD, enableQuantization=False))

    for layer in (0, 1):
        tiers = side["heads"][str(layer)]["tiers"]
        assert [h for h, t in enumerate(tiers) if t == "dead"] == DEAD_HEADS[layer]
        assert side["heads"][str(layer)]["kept"] == [h for h in range(4) if h not in DEAD_HEADS[layer]]
        assert side["heads"][str(layer)]["keptKvHeads"] == [0, 1]
        ctiers = side["channels"][str(layer)]["tiers"]
        assert [j for j, t in enumerate(ctiers) if t == "dead"] == DEAD_CHANNELS[layer]
        assert side["channels"][str(layer)]["kept"] == [j for j in range(INTERMEDIATE)
                                                        if j not in DEAD_CHANNELS[layer]]
        assert all(side["heads"][str(layer)]["importance"][h] == 0.0 for h in DEAD_HEADS[layer])

    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    assert config["head_dim"] == HEAD_DIM and config["intermediate_size"] == INTERMEDIATE - 5

    before, after = _tensors(src), _tensors(out)
    for layer in (0, 1):
        kept_h = [h for h in range(4) if h not in DEAD_HEADS[layer]]
        kept_c = [j for j in range(INTERMEDIATE) if j not in DEAD_CHANNELS[layer]]
        a, m = ATTN.format(layer=layer), MLP.format(layer=layer)
        assert torch.equal(after[a + "q_proj.weight"], _blocks(before[a + "q_proj.weight"], kept_h, HEAD_DIM, 0))
        assert torch.equal(after[a + "o_proj.weight"], _blocks(before[a + "o_proj.weight"], kept_h, HEAD_DIM, 1))
        for name in ("k_proj.weight", "v_proj.weight", "q_norm.weight", "k_norm.weight"):
            assert torch.equal(after[a + name], before[a + name])
        assert torch.equal(after[m + "gate_proj.weight"], before[m + "gate_proj.weight"][kept_c])
        assert torch.equal(after[m + "up_proj.weight"], before[m + "up_proj.weight"][kept_c])
        assert torch.equal(after[m + "down_proj.weight"], before[m + "down_proj.weight"][:, kept_c])
    untouched = [n for n in before if ".self_attn." not in n and ".mlp." not in n]
    assert untouched and all(torch.equal(before[n], after[n]) for n in untouched)

    # What went wrote exactly zero into the residual stream: same outputs.
    assert torch.allclose(_logits(out), _logits(src), atol=1e-5)
    assert metrics["heads"]["removed"] == 4 and metrics["heads"]["deadKept"] == 0
    assert metrics["heads"]["perTier"]["dead"] == 4
    assert (metrics["heads"]["perLayerAfter"], metrics["heads"]["kvPerLayerAfter"]) == (2, 2)
    assert metrics["channels"]["removed"] == 10 and metrics["channels"]["perLayerAfter"] == INTERMEDIATE - 5
    per_layer = 2 * HEAD_DIM * HIDDEN * 2 + 5 * 3 * HIDDEN  # q rows + o columns of 2 heads, 5 x (gate, up, down)
    assert metrics["paramsBefore"] - metrics["paramsAfter"] == 2 * per_layer
    assert metrics["thresholds"]["deadThreshold"] == LOW_DEAD and metrics["thresholds"]["highThreshold"] == 0.7
    assert metrics["enableQuantization"] is False and metrics["quantization"] is None
    assert metrics["calibration"]["from"] == "$.stages[0].calibrationCorpusFile"
    assert metrics["calibration"]["tokens"] > 0 and "towers_proved" not in metrics
    assert (out / "tokenizer.json").is_file()


def test_dead_units_a_uniform_shape_cannot_take_stay(root):
    """Configs hold one head count and one intermediate size: layer 1's
    single dead head (its group keeps a live one, the other group none dead)
    blocks every head shape; channels go down to the smaller dead count."""
    src = _model(root)
    _plant_dead(src, {0: [1, 2], 1: [0]}, {0: [3, 10, 20, 40, 63], 1: [7, 8, 33]})
    metrics, out, side = _run(root, _alloy(root, deadThreshold=LOW_DEAD, enableQuantization=False))

    assert metrics["heads"]["perTier"]["dead"] == 3
    assert metrics["heads"]["removed"] == 0 and metrics["heads"]["deadKept"] == 3
    assert metrics["channels"]["removed"] == 6 and metrics["channels"]["deadKept"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["intermediate_size"] == INTERMEDIATE - 3
    kept0 = side["channels"]["0"]["kept"]
    assert set(range(INTERMEDIATE)) - set(kept0) <= set(DEAD_CHANNELS[0]) and len(kept0) == INTERMEDIATE - 3
    assert side["channels"]["1"]["kept"] == [j for j in range(INTERMEDIATE) if j not in (7, 8, 33)]
    assert torch.allclose(_logits(out), _logits(src), atol=1e-5)


# ── per-tier precision ─────────────────────────────────────────────────────

DORMANT_AT, LOW_AT = 0.15, 0.25  # mid-tier under the default thresholds (0.1, 0.2, 0.3)


def _place_in_tiers(root: Path, src: Path) -> dict:
    """Measure once, then scale layer 1's head 0 / channel 0 to 15 % and head 1
    / channel 1 to 25 % of the peak of the rest of their layer."""
    _, _, side = _run(root, _alloy(root, deadThreshold=0.0, enableQuantization=False))
    heads, chans = side["heads"]["1"]["importance"], side["channels"]["1"]["importance"]
    h_peak, c_peak = max(heads[2:]), max(chans[2:])
    scale = {"h0": DORMANT_AT * h_peak / heads[0], "h1": LOW_AT * h_peak / heads[1],
             "c0": DORMANT_AT * c_peak / chans[0], "c1": LOW_AT * c_peak / chans[1]}

    def apply(t):
        o, d = t[ATTN.format(layer=1) + "o_proj.weight"], t[MLP.format(layer=1) + "down_proj.weight"]
        o[:, 0:HEAD_DIM] *= scale["h0"]
        o[:, HEAD_DIM:2 * HEAD_DIM] *= scale["h1"]
        d[:, 0] *= scale["c0"]
        d[:, 1] *= scale["c1"]
    _edit(src, apply)
    return scale


def _on_grid(q: torch.Tensor, w: torch.Tensor, bits: int) -> bool:
    """q is w rounded to `bits` symmetric levels of one scale (absmax of the
    group / qmax), and no further from w than half a step."""
    qmax = 2 ** (bits - 1) - 1
    step = q.abs().max() / qmax
    levels = q / step
    return bool(torch.allclose(levels, levels.round(), atol=1e-3)
                and (q - w).abs().max() <= step / 2 + 1e-6 and not torch.equal(q, w))


def test_quantization_rounds_only_the_low_tiers(root):
    src = _model(root)
    _place_in_tiers(root, src)
    metrics, out, side = _run(root, _alloy(root, deadThreshold=0.0, enableQuantization=True))
    before, after = _tensors(src), _tensors(out)

    assert side["heads"]["1"]["tiers"][:2] == ["dormant", "low"]
    assert side["channels"]["1"]["tiers"][:2] == ["dormant", "low"]
    assert metrics["heads"]["removed"] == 0 and metrics["channels"]["removed"] == 0
    for layer in (0, 1):
        a, m = ATTN.format(layer=layer), MLP.format(layer=layer)
        for h, tier in enumerate(side["heads"][str(layer)]["tiers"]):
            bits = compact.TIER_BITS[tier]
            for name, dim in (("q_proj.weight", 0), ("o_proj.weight", 1)):
                q = after[a + name].narrow(dim, h * HEAD_DIM, HEAD_DIM)
                w = before[a + name].narrow(dim, h * HEAD_DIM, HEAD_DIM)
                # one group per row (q rows) or per column (o columns): HIDDEN == QUANT_GROUP
                groups = zip(q, w) if dim == 0 else zip(q.T, w.T)
                assert torch.equal(q, w) if bits is None else all(_on_grid(x, y, bits) for x, y in groups)
        for j, tier in enumerate(side["channels"][str(layer)]["tiers"]):
            bits = compact.TIER_BITS[tier]
            for name, unit in (("gate_proj.weight", lambda t: t[j]), ("down_proj.weight", lambda t: t[:, j])):
                q, w = unit(after[m + name]), unit(before[m + name])
                assert torch.equal(q, w) if bits is None else _on_grid(q, w, bits)
    # KV group 0 serves a dormant and a low head: the finer (8 bits) wins.
    k0 = after[ATTN.format(layer=1) + "k_proj.weight"][:HEAD_DIM]
    assert all(_on_grid(x, y, 8) for x, y in zip(k0, before[ATTN.format(layer=1) + "k_proj.weight"][:HEAD_DIM]))
    untouched = [n for n in before if ".self_attn." not in n and ".mlp." not in n]
    assert all(torch.equal(before[n], after[n]) for n in untouched)

    q = metrics["quantization"]
    assert q["dormant"]["bits"] == 4 and q["low"]["bits"] == 8
    assert 0 < q["low"]["relativeError"] < q["dormant"]["relativeError"] < 0.25
    assert metrics["tierBits"] == compact.TIER_BITS and metrics["paramsAfter"] == metrics["paramsBefore"]
    assert torch.isfinite(_logits(out)).all()


def test_without_quantization_every_kept_weight_is_bit_exact(root):
    src = _model(root)
    _place_in_tiers(root, src)
    metrics, out, side = _run(root, _alloy(root, deadThreshold=0.0, enableQuantization=False))
    assert side["heads"]["1"]["tiers"][:2] == ["dormant", "low"]
    before, after = _tensors(src), _tensors(out)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert metrics["quantization"] is None and metrics["tierBits"] is None


# ── parameters and calibration text ────────────────────────────────────────


def test_thresholds_out_of_order_are_refused(root):
    _model(root)
    alloy = _alloy(root, deadThreshold=0.3, dormantThreshold=0.2)
    with pytest.raises(StageFailed, match=r"\$\.stages\[0\]\.deadThreshold = 0\.3 is above "
                                          r"\$\.stages\[0\]\.dormantThreshold = 0\.2"):
        compact.run_stage(make_ctx(root, alloy, 0))
    assert not (root / "work" / "part" / "stages" / "0-compact" / "model").exists()


def test_published_defaults_apply_and_a_held_out_corpus_is_the_fallback(root):
    """The published compact stage names no corpus: the eval stage's
    held-out text is what it measures on (recorded as such)."""
    _model(root)
    held_out = _corpus(root)
    alloy = _alloy(root, corpus=False, extra_stages=[{"type": "eval", "benchmarks": [{"name": "perplexity"}],
                                                            "evalCorpusFile": held_out}])
    result = compact.run_stage(make_ctx(root, alloy, 0))
    m = result.metrics
    assert m["calibration"]["from"] == "$.stages[1].evalCorpusFile"
    assert m["calibration"]["path"].endswith(held_out)
    assert m["thresholds"] == {"deadThreshold": 0.1, "dormantThreshold": 0.2, "lowThreshold": 0.3,
                               "mediumThreshold": 0.5, "highThreshold": 0.7}
    assert m["enableQuantization"] is True


def test_another_stages_calibration_corpus_comes_before_held_out_text(root):
    _model(root)
    alloy = _alloy(root, corpus=False, extra_stages=[
        {"type": "eval", "benchmarks": [{"name": "perplexity"}], "evalCorpusFile": _corpus(root)},
        {"type": "prune", "strategy": "entropy", "level": 0.25, "calibrationCorpusFile": _corpus(root)}])
    m = compact.run_stage(make_ctx(root, alloy, 0)).metrics
    assert m["calibration"]["from"] == "$.stages[2].calibrationCorpusFile"


def test_a_training_stages_dataset_comes_before_held_out_text(root):
    """The published compact alloy trains first (an instruction dataset) and
    names no corpus: compact measures on what the model was trained on."""
    _model(root)
    (root / "data").mkdir()
    records = [json.dumps({"query": f"Write f{i}.", "answer": f"def f{i}(x):\n    return x + {i}\n"})
               for i in range(30)]
    (root / "data" / "code.jsonl").write_text("\n".join(records) + "\n")
    alloy = _alloy(root, corpus=False, extra_stages=[
        {"type": "train", "dataset": "data/code.jsonl", "steps": 1},
        {"type": "eval", "benchmarks": [{"name": "perplexity"}], "evalCorpusFile": _corpus(root)}])
    m = compact.run_stage(make_ctx(root, alloy, 0)).metrics
    assert m["calibration"]["from"] == "$.stages[1].dataset" and m["calibration"]["kind"] == "dataset (file)"
    assert m["calibration"]["tokens"] > 0


def test_a_training_dataset_the_node_lacks_is_refused_with_the_fix(root, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _model(root)
    alloy = _alloy(root, corpus=False, extra_stages=[
        {"type": "train", "domain": "code", "dataset": "m-a-p/CodeFeedback-Filtered-Instruction", "steps": 1}])
    with pytest.raises(StageFailed, match=r"stage 1's training data.*\$\.stages\[1\]\.dataset"):
        compact.run_stage(make_ctx(root, alloy, 0))


def test_no_calibration_text_anywhere_is_refused(root):
    _model(root)
    with pytest.raises(StageFailed, match=r"set \$\.stages\[0\]\.calibrationCorpusFile"):
        compact.run_stage(make_ctx(root, _alloy(root, corpus=False), 0))


# ── other layouts ──────────────────────────────────────────────────────────


def test_vision_tower_and_linear_attention_are_never_touched(root):
    """Qwen3.5 (the published compact alloy's family): a vision tower, a
    Gated-DeltaNet layer 0 and a full-attention layer 1."""
    src = _model(root, "qwen3_5")
    _plant_dead(src, {1: [1, 2]}, {0: [4, 5], 1: [6, 9]}, prefix="model.language_model.")
    metrics, out, side = _run(root, _alloy(root, "qwen3_5", deadThreshold=LOW_DEAD))
    assert sorted(side["heads"]) == ["1"] and sorted(side["channels"]) == ["0", "1"]
    assert metrics["heads"]["removed"] == 2 and metrics["channels"]["removed"] == 4
    before, after = _tensors(src), _tensors(out)
    frozen = [n for n in before if not (".self_attn." in n or ".mlp." in n)]
    assert any(n.startswith("model.visual.") for n in frozen)
    assert any(".linear_attn." in n for n in frozen)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_attention_heads"] == 2
    assert config["text_config"]["intermediate_size"] == INTERMEDIATE - 2
    assert config["vision_config"] == json.loads((src / "config.json").read_text())["vision_config"]
    assert torch.isfinite(_logits(out, transformers.AutoModelForImageTextToText)).all()


def test_moe_experts_are_left_to_expert_prune(root):
    src = _model(root, "qwen3_moe")
    _plant_dead(src, {0: [1, 2], 1: [0, 3]}, {})
    metrics, out, _ = _run(root, _alloy(root, "qwen3_moe", deadThreshold=LOW_DEAD))
    assert metrics["heads"]["removed"] == 4
    assert metrics["channels"]["layers"] == [] and metrics["channels"]["perLayerBefore"] is None
    before, after = _tensors(src), _tensors(out)
    experts = [n for n in before if ".mlp." in n]
    assert experts and all(torch.equal(before[n], after[n]) for n in experts)
    assert torch.isfinite(_logits(out)).all()


def test_head_shape_keeps_only_counts_the_config_can_load():
    """Gemma-3-270M's geometry (4 query heads on 1 KV head, hidden 640): one
    dead head a layer would leave 3, which Gemma3TextConfig refuses (640 %
    3); the shape keeps 4. Two dead heads a layer leave 2, which loads."""
    from stations.head_prune import Geometry

    geo = Geometry(heads=4, kv_heads=1, head_dim=256, q_rows_per_head=256, layers=(0, 1), kv_rows_per_head=256,
                   hidden=640)
    one_dead = {0: [False, True, False, False], 1: [False, False, False, True]}
    assert compact.head_shape(geo, one_dead).heads_keep == 4
    two_dead = {0: [True, True, False, False], 1: [False, True, False, True]}
    assert compact.head_shape(geo, two_dead).heads_keep == 2
    assert compact.head_shape(Geometry(**{**geo.__dict__, "hidden": None}), one_dead).heads_keep == 3
