"""Tiny random-weight checkpoints of every registered family, for tests.

``build_tiny_model("qwen3_moe", out_dir)`` writes a real transformers
checkpoint (config.json + safetensors, via ``save_pretrained``) small enough
to build in well under a second: hidden 32, 2 layers, 4 experts, top-2,
vocab 128. The geometry is derived from the family spec (its config keys
say where the expert count and top-k go, its ``standin`` data the widths
of latent or linear attention, its towers their tiny sub-configs), and the
model is built and saved by the product's own stand-in builder
(stations/standin.py), so a new family JSON needs nothing here; only test
choices (a dense first layer, two expert groups, one layer of each
attention kind) are ``_FAMILY_EXTRAS``.

Use the session fixture ``tiny_model`` to build each model once per session::

    from tests.tiny_models import tiny_model  # noqa: F401  (pytest fixture)

    def test_x(tiny_model):
        model_dir = tiny_model("olmoe")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from adapters import get_family
from adapters.schema import Family
from stations.standin import TOKENIZER_VOCAB, add_tokenizer, save_random_model, standin_config_dict

__all__ = ["TOKENIZER_VOCAB", "add_tokenizer", "build_tiny_model", "tiny_config_kwargs", "tiny_model"]

HIDDEN = 32
LAYERS = 2
EXPERTS = 4
TOP_K = 2
VOCAB = 128
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
INTERMEDIATE = 64  # dense MLP (and experts of families without moe_intermediate_size)
MOE_INTERMEDIATE = 16  # != HIDDEN / 2, so fused [E, 2I, H] shapes are unambiguous

_BASE_TEXT: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "intermediate_size": INTERMEDIATE,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    # Token ids inside the tiny vocab; some defaults (e.g. OLMoE's 50279) are not.
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# Test choices; the widths a family needs come from its `standin` data.
_QWEN3_5_LINEAR = {"layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4,
                   "linear_num_key_heads": 2}
_DEEPSEEK = {
    # Layer 0 dense, layer 1 MoE: exercises first_k_dense_replace.
    # Two groups of two experts, pick one group: exercises group-limited routing.
    "first_k_dense_replace": 1, "num_key_value_heads": HEADS, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
}
_FAMILY_EXTRAS: dict[str, dict[str, Any]] = {
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    # One Gated-DeltaNet layer, one full-attention layer.
    "qwen3_5": _QWEN3_5_LINEAR,
    "qwen3_5_text": _QWEN3_5_LINEAR,
    "qwen3_5_moe": _QWEN3_5_LINEAR,
    "qwen3_5_moe_text": _QWEN3_5_LINEAR,
    # OLMoE is multi-head: its q/k norms span every head, and llama.cpp
    # checks their width against the heads, so a GQA stand-in is not OLMoE.
    "olmoe": {"num_key_value_heads": HEADS},
}


def tiny_config_kwargs(family: Family, **overrides: Any) -> dict[str, Any]:
    """Text-model config kwargs for ``family``: base geometry, the MoE keys
    its spec names (first candidate spelling), its stand-in widths, its
    extras, then overrides."""
    text = {**_BASE_TEXT, **family.standin}
    if family.is_moe:
        keys = family.config
        text[keys.expert_count[0]] = EXPERTS
        text[keys.top_k[0]] = TOP_K
        for field in (keys.moe_intermediate_size, keys.shared_expert_intermediate_size):
            if field:
                text[field[0]] = MOE_INTERMEDIATE
    text.update(_FAMILY_EXTRAS.get(family.name, {}))
    text.update(overrides)
    return text


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    save_dtype: str = "float32",
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Build a tiny random-weight model of ``family`` and save it to ``out_dir``.

    ``overrides`` replace text-config keys (e.g. ``num_hidden_layers=3``).
    ``max_shard_size`` (e.g. ``"20KB"``) forces a sharded checkpoint with a
    ``model.safetensors.index.json``. Returns ``out_dir``.
    """
    spec = get_family(family)
    config = standin_config_dict(spec, tiny_config_kwargs(spec, **overrides))
    return save_random_model(spec, config, Path(out_dir), seed=seed, dtype=save_dtype, max_shard_size=max_shard_size)


class TinyModelCache:
    """Builds each (family, options) checkpoint once under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def __call__(self, family: str, **options: Any) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._built:
            out = self.root / f"{family}-{len(self._built)}"
            self._built[key] = build_tiny_model(family, out, **options)
        return self._built[key]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Session-wide ``tiny_model(family, **options) -> Path``. Treat the
    returned directory as read-only: other tests share it; copy it first
    (``shutil.copytree``) to corrupt or rewrite it."""
    return TinyModelCache(tmp_path_factory.mktemp("tiny_models"))
