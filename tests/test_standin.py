"""Tiny random stand-ins (stations/standin.py) of every registered family.

Parametrized by the registry, so a new family JSON is built, loaded, run and
checked the moment it lands. The "source" of each stand-in is the family's
full-size transformers default config (a real flagship geometry: Qwen3-MoE's
128 experts top-8, DeepSeek-V3's 256 experts in 8 groups, Qwen3.5's
linear/full attention pattern), so what must be kept is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from adapters import Family, families, get_family
from factory.model_files import check_model_dir, inspect_checkpoint
from stations.standin import MAX_HEADS, TOKENIZER_VOCAB, build_standin, family_defaults

ALL = [pytest.param(f, id=f.name) for f in families()]


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _forward(family: Family, model_dir: Path) -> torch.Tensor:
    model = getattr(transformers, family.auto_class).from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ALL)
def test_standin_keeps_the_source_geometry(tmp_path: Path, family: Family) -> None:
    source = family_defaults(family)
    out = build_standin(family, tmp_path / family.name, source_config=source)
    check = check_model_dir(out)
    assert check.ok, [str(p) for p in check.problems]
    config = _config(out)
    # Kept: experts, top-k, group routing, the head ratio, every layer kind, every tower.
    assert family.expert_count(config) == family.expert_count(source)
    if family.is_moe and family.top_k(source):
        assert family.top_k(config) == family.top_k(source)
    for field in ("n_group", "topk_group", "shared_expert_count"):
        assert family.read(config, field) == family.read(source, field), field
    heads, kv = family.read(config, "num_attention_heads"), family.read(config, "num_key_value_heads")
    src_heads, src_kv = family.read(source, "num_attention_heads"), family.read(source, "num_key_value_heads")
    assert heads // kv == src_heads // (src_kv or src_heads) and heads % kv == 0
    assert heads == src_heads or (src_heads > MAX_HEADS and heads <= MAX_HEADS)
    assert set(family.layer_types(config) or []) == set(family.layer_types(source) or [])
    assert bool(family.moe_layers(config)) == bool(family.moe_layers(source))
    for tower in family.towers:
        assert family.tower_config(config, tower), tower.name
        assert any(family.tower_of(n) is tower for n in check.info.tensors), tower.name
    # Shrunk: depth and width, so it stays small whatever the expert count.
    assert family.read(config, "num_hidden_layers") < family.read(source, "num_hidden_layers")
    assert family.read(config, "hidden_size") < family.read(source, "hidden_size")
    assert check.info.total_bytes < 64 << 20
    # Loads in stock transformers with its own tokenizer, and runs.
    assert family.read(config, "vocab_size") == TOKENIZER_VOCAB
    logits = _forward(family, out)
    assert logits.shape[-1] == TOKENIZER_VOCAB and torch.isfinite(logits).all()


def test_declared_fields_set_experts_and_top_k(tmp_path: Path) -> None:
    family = get_family("qwen3_moe")
    declared = {"numExpertsPerLayer": 64, "numActivatedExperts": 4, "numLayers": 48}
    out = build_standin(family, tmp_path / "m", declared=declared, with_tokenizer=False)
    config = _config(out)
    assert (family.expert_count(config), family.top_k(config)) == (64, 4)
    info = inspect_checkpoint(out)
    assert {n.split(".experts.")[1].split(".")[0] for n in info.tensors if ".experts." in n} == {
        str(e) for e in range(64)}
    assert not (out / "tokenizer.json").exists()


def test_layer_pattern_is_kept_with_enough_layers(tmp_path: Path) -> None:
    """Qwen3.5 puts one full-attention layer after three linear ones: the
    stand-in keeps the first four layers, so both kinds exist."""
    family = get_family("qwen3_5_text")
    source = family_defaults(family)
    out = build_standin(family, tmp_path / "m", source_config=source, with_tokenizer=False)
    assert _config(out)["layer_types"] == source["layer_types"][:4]
    assert source["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]


def test_null_q_lora_rank_stays_null(tmp_path: Path) -> None:
    """DeepSeek-V2-Lite: no query factorisation, so a plain q_proj on disk."""
    family = get_family("deepseek_v2")
    source = {**family_defaults(family), "q_lora_rank": None, "n_routed_experts": 64, "num_experts_per_tok": 6,
              "num_attention_heads": 16, "num_key_value_heads": 16, "first_k_dense_replace": 1}
    out = build_standin(family, tmp_path / "lite", source_config=source)
    config = _config(out)
    assert config["q_lora_rank"] is None and (config["n_routed_experts"], config["num_experts_per_tok"]) == (64, 6)
    assert config["first_k_dense_replace"] == 1 and family.moe_layers(config) == [1]
    names = inspect_checkpoint(out).tensors
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("q_a_proj" in n for n in names)
    assert torch.isfinite(_forward(family, out)).all()


def test_placeholder_token_ids_are_special_tokens_of_the_tokenizer(tmp_path: Path) -> None:
    family = get_family("qwen2_5_vl")
    out = build_standin(family, tmp_path / "vl", source_config=family_defaults(family))
    config = _config(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert config[key] < TOKENIZER_VOCAB, key
        token = tok.convert_ids_to_tokens(config[key])
        assert token == f"<|{key.removesuffix('_id')}|>" and token in tok.all_special_tokens, key
        assert tok.encode(token, add_special_tokens=False) == [config[key]], key
    assert len(set(config[k] for k in ("image_token_id", "video_token_id"))) == 2


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    family = get_family("mixtral")
    a = build_standin(family, tmp_path / "a", seed=3, with_tokenizer=False)
    b = build_standin(family, tmp_path / "b", seed=3, with_tokenizer=False)
    c = build_standin(family, tmp_path / "c", seed=4, with_tokenizer=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
