"""Gemma-3 (gemma3_text, gemma3) on tiny real checkpoints: what the
registry-wide tests (test_adapters, test_standin, test_quant_gguf, ...) do
not say about it.

* Gemma-3-270M's own geometry (4 heads, 1 KV head, head_dim 256 on a
  640-wide model) through head pruning: transformers refuses a head count
  that does not divide hidden_size, so 0.25 keeps all 4 heads.
* The multimodal checkpoint's on-disk layout (language_model.model.*,
  vision_tower.*, multi_modal_projector.*) and its two towers: prune and
  LoRA leave both bit for bit, NF4 leaves both unquantized.
* llama.cpp scores a stand-in as transformers does: the stand-in's
  query_pre_attn_scalar (= head_dim) and a sliding window that bites.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from adapters import get_family
from factory import quant_support
from factory.model_files import inspect_checkpoint
from stations.lora import DROPPED_KEY
from stations.standin import HEAD_DIM, TOKENIZER_VOCAB, add_tokenizer, build_standin, save_random_model
from stations.towers import find_towers, record_towers
from tests.stationkit import make_ctx, run_stages
from tests.tiny_models import build_tiny_model

_FULL_EVERY_SIXTH = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
GEMMA3_270M = {
    # google/gemma-3-270m config.json: the keys that shape the model.
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "intermediate_size": 2048, "vocab_size": 262144, "tie_word_embeddings": True, "layer_types": _FULL_EVERY_SIXTH,
    "sliding_window": 512, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06, "attention_bias": False,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
}
TEXT = [f"def f{i}(x):\n    return x * {i}\n" for i in range(24)]
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n"
TOWER_ROOTS = ("vision_tower.", "multi_modal_projector.")


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _at_270m_widths(root: Path) -> Path:
    """Gemma-3-270M's widths (hidden 640, head_dim 256, MLP 2048), two
    layers (one of each kind) and the tiny tokenizer's vocabulary."""
    config = {**GEMMA3_270M, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
              "vocab_size": TOKENIZER_VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    for key in ("architectures", "model_type", "torch_dtype"):
        config.pop(key)
    out = save_random_model(get_family("gemma3_text"), config, root / "models" / "m")
    return add_tokenizer(out)


def _alloy(family: str, *stages: dict) -> dict:
    return {"name": "gemma3", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": family},
            "stages": list(stages)}


def _prune(level: float) -> dict:
    return {"type": "prune", "strategy": "magnitude", "level": level, "minHeadsPerLayer": 1, "minKvHeadsPerLayer": 1}


def _out(root: Path, entry: dict) -> Path:
    return root / "work" / "part" / entry["metrics"]["model_dir"]


def _logits(family: str, model_dir: Path, ids: list[int]) -> torch.Tensor:
    model = getattr(transformers, get_family(family).auto_class).from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)


# ── the stand-in of the real target ─────────────────────────────────────────


def test_standin_of_gemma_3_270m_keeps_heads_layer_kinds_and_window(tmp_path: Path) -> None:
    family = get_family("gemma3_text")
    out = build_standin(family, tmp_path / "m", source_config=GEMMA3_270M)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 1)
    assert config["layer_types"] == _FULL_EVERY_SIXTH[:6]  # the first full-attention layer is the sixth
    assert (config["sliding_window"], config["tie_word_embeddings"], config["dtype"]) == (512, True, "bfloat16")
    assert config["head_dim"] == config["query_pre_attn_scalar"] == HEAD_DIM  # 256 = head_dim on the source
    names = inspect_checkpoint(out).tensors
    assert "lm_head.weight" not in names and names["model.embed_tokens.weight"].shape == (TOKENIZER_VOCAB, 4 * HEAD_DIM)
    norms = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    assert {n.split(".")[3] for n in names if n.startswith("model.layers.0.") and "layernorm" in n} == norms
    assert names["model.layers.0.self_attn.q_norm.weight"].shape == (HEAD_DIM,)
    logits = _logits("gemma3_text", out, [0, 5, 9, 200, 3])
    assert logits.shape == (5, TOKENIZER_VOCAB) and torch.isfinite(logits.float()).all()


# ── head pruning at the real widths ─────────────────────────────────────────


def test_transformers_refuses_heads_that_do_not_divide_hidden_size() -> None:
    """Why the family says heads_divide_hidden, although head_dim is explicit."""
    with pytest.raises(Exception, match=r"hidden size \(640\) is not a multiple of the number of attention heads \(3\)"):
        transformers.Gemma3TextConfig(hidden_size=640, num_attention_heads=3, num_key_value_heads=1, head_dim=256)


@pytest.mark.parametrize(("level", "heads", "clamped"), [(0.25, 4, "hiddenSize"), (0.5, 2, None), (0.75, 1, None)])
def test_head_prune_at_gemma_3_270m_widths_reloads(root: Path, level: float, heads: int, clamped: str | None) -> None:
    src = _at_270m_widths(root)
    entries, _ = run_stages(root, _alloy("gemma3_text", _prune(level)))
    metrics, out = entries[0]["metrics"], _out(root, entries[0])
    assert (metrics["headsPerLayerAfter"], metrics["kvHeadsPerLayerAfter"], metrics["clampedBy"]) == (heads, 1, clamped)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, 1, 256)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, strict shapes
    attn = model.model.layers[1].self_attn
    assert (attn.q_proj.weight.shape, attn.o_proj.weight.shape) == ((heads * 256, 640), (640, heads * 256))
    assert attn.k_proj.weight.shape == (256, 640) and attn.scaling == 256 ** -0.5
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 5, 9, 200, 3]])).logits).all()
    before, after = _tensors(src), _tensors(out)
    assert set(before) == set(after)
    kept_whole = [n for n in before if not n.endswith(("q_proj.weight", "o_proj.weight"))]
    assert all(torch.equal(before[n], after[n]) for n in kept_whole)  # k/v (the one KV head), q_norm/k_norm, MLP


def test_head_prune_copies_both_towers_bit_for_bit(root: Path) -> None:
    src = add_tokenizer(build_tiny_model("gemma3", root / "models" / "m", vocab_size=TOKENIZER_VOCAB))
    entries, _ = run_stages(root, _alloy("gemma3", _prune(0.5)))
    metrics, out = entries[0]["metrics"], _out(root, entries[0])
    before, after = _tensors(src), _tensors(out)
    towers = [n for n in before if n.startswith(TOWER_ROOTS)]
    assert metrics["headsPerLayerAfter"] == 2 and metrics["towerTensorsCopied"] == len(towers) > 0
    assert all(torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8)) for n in towers)
    assert after["language_model.model.layers.0.self_attn.q_proj.weight"].shape == (2 * 8, 32)
    assert torch.isfinite(_logits("gemma3", out, [4, 5, 6])).all()


# ── the multimodal checkpoint's layout ──────────────────────────────────────


def test_multimodal_checkpoint_layout_and_towers(tiny_model) -> None:
    """save_pretrained writes the Hub's layout, not the in-memory one; both
    towers are found and fingerprinted, and nothing else is."""
    model_dir = tiny_model("gemma3")
    names = set(inspect_checkpoint(model_dir).tensors)
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "language_model.model.layers.1.self_attn.k_norm.weight" in names
    found = find_towers(names, get_family("gemma3"))
    assert {k: v.prefix for k, v in found.items()} == {"vision": "vision_tower.",
                                                       "vision_projector": "multi_modal_projector."}
    recorded = record_towers(model_dir)
    assert sum(len(t["tensors"]) for t in recorded.values()) == sum(n.startswith(TOWER_ROOTS) for n in names)
    assert "mm_input_projection_weight" in recorded["vision_projector"]["tensors"]


def test_nf4_leaves_the_towers_and_quantizes_the_decoder() -> None:
    from transformers.quantizers.quantizers_utils import should_convert_module

    from factory.load_plan import quant_exact_patterns

    patterns = quant_exact_patterns(get_family("gemma3"))
    exact = ["model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.vision_tower.encoder.layers.0.mlp.fc1",
             "model.multi_modal_projector", "lm_head"]
    assert not any(should_convert_module(n, patterns) for n in exact)
    assert should_convert_module("model.language_model.layers.0.self_attn.q_proj", patterns)


# ── LoRA ────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_lora_trains_the_decoder_only_and_merges(root: Path, family: str) -> None:
    src = add_tokenizer(build_tiny_model(family, root / "models" / "m", vocab_size=TOKENIZER_VOCAB))
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    lora = {"type": "lora", "dataset": "data/train.jsonl", "steps": 4, "learningRate": "1e-2", "rank": 4,
            "scheduler": "constant"}
    entries, _ = run_stages(root, _alloy(family, lora))
    metrics, out = entries[0]["metrics"], _out(root, entries[0])
    assert metrics["loraModules"] == 2 * 7  # every default target in each of the 2 decoder layers
    assert metrics[DROPPED_KEY] == (3 if family == "gemma3" else 0)  # SigLIP's q/k/v_proj
    assert metrics["finalLoss"] < metrics["initialLoss"]
    before, after = _tensors(src), _tensors(out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".layers." in n and not n.startswith(TOWER_ROOTS) for n in changed)
    assert {n.split(".")[-2] for n in changed} == set(get_family(family).lora_targets)
    assert torch.isfinite(_logits(family, out, [4, 5, 6])).all()


# ── llama.cpp agrees with transformers ──────────────────────────────────────


@pytest.mark.skipif(quant_support.gguf_problem() is not None, reason=f"gguf tools: {quant_support.gguf_problem()}")
def test_llama_cpp_scores_a_windowed_standin_as_transformers_does(tmp_path: Path) -> None:
    """Q8_0 log-probabilities within a small fraction of a nat of
    transformers' at float32, with a 4-token window that changes the
    scores: llama.cpp scales queries by 1 / sqrt(head_dim) whatever
    query_pre_attn_scalar says (a stand-in keeping 256 is 0.06 nat off)."""
    from factory import catalog
    from factory.results import ARTIFACT
    from stations.llama_cpp_runtime import open_gguf
    from tests.linekit import make_root

    root = make_root(tmp_path / "root")
    family = get_family("gemma3_text")
    model = build_standin(family, root / "models" / "m", source_config={**GEMMA3_270M, "sliding_window": 4,
                                                                       "torch_dtype": "float32"})
    wide = build_standin(family, tmp_path / "wide", source_config={**GEMMA3_270M, "torch_dtype": "float32"})
    ctx = make_ctx(root, _alloy("gemma3_text", {"type": "quant", "format": "gguf", "quantTypes": ["Q8_0"]}), 0)
    result = catalog.load_station("quant")(ctx)
    ids = transformers.AutoTokenizer.from_pretrained(model)(CODE)["input_ids"]
    target = torch.tensor(ids[1:])[:, None]

    def logprobs(model_dir: Path) -> torch.Tensor:
        return torch.log_softmax(_logits("gemma3_text", model_dir, ids).double(), -1)[:-1].gather(1, target)[:, 0]

    ref = logprobs(model)
    runtime = open_gguf(ctx.work_dir / result.metrics[ARTIFACT]["dir"] / "model-Q8_0.gguf")
    scored = torch.tensor([lp for lp, _ in runtime.score(ids)], dtype=torch.float64)
    runtime.close()
    assert len(ids) > 4 * 8 and float((logprobs(wide) - ref).abs().mean()) > 0.01  # the window bites
    assert float((scored - ref).abs().mean()) < 0.02
