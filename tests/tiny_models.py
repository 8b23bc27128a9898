"""Tiny random-weight checkpoints of every registered family, for tests.

``build_tiny_model("qwen3_moe", out_dir)`` writes a real transformers
checkpoint (config.json + safetensors, via ``save_pretrained``) small enough
to build in well under a second: hidden 32, 2 layers, 4 experts, top-2,
vocab 128. The geometry is derived from the family spec (its config keys
say where the expert count and top-k go), so a new family JSON usually
needs nothing here; only families with extra required geometry (DeepSeek's
latent attention, Qwen3.5's linear attention, a vision tower) add a line to
``_FAMILY_EXTRAS``.

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

# Only what the family spec cannot imply.
_QWEN3_5_LINEAR = {"layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4,
                   "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}
_FAMILY_EXTRAS: dict[str, dict[str, Any]] = {
    # Layer 0 dense, layer 1 MoE: exercises first_k_dense_replace.
    # Two groups of two experts, pick one group: exercises group-limited routing.
    "deepseek_v2": {"first_k_dense_replace": 1, "num_key_value_heads": HEADS, "n_shared_experts": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "n_group": 2, "topk_group": 1},
    "deepseek_v3": {"first_k_dense_replace": 1, "num_key_value_heads": HEADS, "n_shared_experts": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "n_group": 2, "topk_group": 1},
    # One Gated-DeltaNet layer, one full-attention layer.
    "qwen3_5": _QWEN3_5_LINEAR,
    "qwen3_5_text": _QWEN3_5_LINEAR,
    "qwen3_5_moe": _QWEN3_5_LINEAR,
    "qwen3_5_moe_text": _QWEN3_5_LINEAR,
}
_TINY_VISION: dict[str, Any] = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                "out_hidden_size": HIDDEN, "deepstack_visual_indexes": [0]}


def tiny_config_kwargs(family: Family, **overrides: Any) -> dict[str, Any]:
    """Text-model config kwargs for ``family``: base geometry, the MoE keys
    its spec names (first candidate spelling), its extras, then overrides."""
    text = dict(_BASE_TEXT)
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
    import torch
    import transformers

    spec = get_family(family)
    text = tiny_config_kwargs(spec, **overrides)
    if spec.config.text_config:
        config = transformers.AutoConfig.for_model(
            spec.name, **{spec.config.text_config: text, "vision_config": dict(_TINY_VISION)}
        )
    else:
        config = transformers.AutoConfig.for_model(spec.name, **text)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.auto_class).from_config(config)
    model = model.to(getattr(torch, save_dtype))
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


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


TOKENIZER_VOCAB = 320
"""Byte-level BPE needs the 256 byte symbols plus merges: build station
models with ``vocab_size=TOKENIZER_VOCAB`` when they need a tokenizer."""

_TOKENIZER_TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    "The quick brown fox jumps over the lazy dog. Models forget what they are not asked to remember.\n"
    "for i in range(10):\n    print(i * i)\n"
) * 20


def add_tokenizer(model_dir: Path, *, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Train a tiny byte-level BPE tokenizer (deterministic, offline, well
    under a second) and save it beside the model as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TOKENIZER_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(model_dir)
    return model_dir
