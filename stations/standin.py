"""Tiny random stand-ins of a model family: the shape of a real source, none of its size.

``build_standin(family, out_dir, source_config=...)`` writes a real
transformers checkpoint (config.json, safetensors, a small trained BPE
tokenizer) that exercises the same code paths as the source it stands in
for: `factory rehearse` runs whole recipes on one, and the tests build every
family with it.

What is kept and what is shrunk, in the order the geometry is resolved
(`source_config`, the real config.json; else `declared`, the alloy's
`source` fields; else the family's transformers defaults):

* **kept**: the routed expert count, top-k, shared-expert count and group
  routing (n_group / topk_group); the query and KV head counts, so heads : kv
  heads and every head-pruning floor mean what they mean on the source; the
  layer-type pattern (Qwen3.5's linear / full attention) and the MoE pattern
  (dense first layers, sparse step), each cut to the shortest prefix that
  still shows every kind; a null ``q_lora_rank`` (DeepSeek-V2-Lite's plain
  q_proj); every non-text tower, as a tiny one.
* **shrunk**: head_dim to ``HEAD_DIM`` (so hidden = heads x HEAD_DIM), MLP
  and expert widths to a few units, depth to that prefix, the vocabulary to
  the tokenizer's, and whatever the family's ``standin`` data sizes (MLA
  ranks, linear-attention head widths, rope sections).

Placeholder token ids the source config names (image / video / audio,
vision start and end) are renumbered into the tiny vocabulary as special
tokens of the tokenizer, so a modality check finds them consistent.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from adapters.schema import Family

HEAD_DIM = 8
"""Per-head width: the smallest that keeps rope (even, mrope sections of 1-2)
and leaves head_dim distinct from the expert widths below."""
DENSE_INTERMEDIATE = 32
"""Dense MLP width (and dense layers of MoE models)."""
EXPERT_INTERMEDIATE = 8
"""Per-expert FFN width: 128 or 256 experts stay a few MB. Never equal to
hidden or hidden / 2, so fused [E, 2I, H] shapes stay unambiguous."""
MIN_LAYERS = 2
MAX_HEADS = 64
"""Above this many query heads the counts are scaled down, ratio kept (a
128-head DeepSeek-V3 would otherwise be 1024 wide)."""
DEFAULT_TOP_K = 2
"""Router top-k when neither the source nor the family's defaults say."""
TOKENIZER_VOCAB = 320
"""Byte-level BPE needs the 256 byte symbols plus merges."""
BASE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
_TOKEN_ID_SUFFIXES = ("_token_id", "_token_index")

# Alloy `source` fields (camelCase, as the alloy writes them) -> family ConfigKeys fields.
_DECLARED: dict[str, tuple[str, ...]] = {
    "expert_count": ("numExpertsPerLayer",),
    "top_k": ("numActivatedExperts", "numExpertsPerTok", "topK"),
    "num_hidden_layers": ("numLayers",),
}
# Structural text-config keys copied verbatim from the source when present:
# they change which code runs, not how big it is.
_STRUCTURAL = ("linear_num_key_heads", "linear_num_value_heads", "max_position_embeddings", "norm_topk_prob",
               "topk_method", "scoring_func", "routed_scaling_factor", "use_qk_norm", "attention_bias",
               "sliding_window", "use_sliding_window", "hidden_act", "rms_norm_eps")
_COPIED_FIELDS = ("num_attention_heads", "num_key_value_heads", "expert_count", "top_k", "shared_expert_count",
                  "first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step", "n_group", "topk_group",
                  "tie_word_embeddings")


# ── geometry ────────────────────────────────────────────────────────────────


def family_defaults(family: Family) -> dict[str, Any]:
    """The family's transformers default config, as config.json would hold it."""
    import transformers

    return transformers.AutoConfig.for_model(family.name).to_dict()


def _first_key(family: Family, field: str) -> str:
    return getattr(family.config, field)[0]


def _source_text(family: Family, source_config: dict | None, declared: dict | None) -> dict[str, Any]:
    """The source's structural text geometry under the family's first key
    spellings: from its config, else its declaration over the defaults."""
    src = family.text_config(source_config if source_config is not None else family_defaults(family))
    text = {k: src[k] for k in _STRUCTURAL if k in src}
    for field in (*_COPIED_FIELDS, "layer_types", "num_hidden_layers", "q_lora_rank"):
        keys = getattr(family.config, field)
        present = next((k for k in keys if k in src), None)
        if present is not None:
            text[keys[0]] = src[present]
    if source_config is None and declared:
        for field, names in _DECLARED.items():
            value = next((declared[n] for n in names if declared.get(n) is not None), None)
            if value is not None and getattr(family.config, field):
                text[_first_key(family, field)] = value
    return text


def _set_path(config: dict[str, Any], path: str | None, value: dict[str, Any]) -> None:
    if not path:
        config.update(value)
        return
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def _heads(heads: int, kv_heads: int) -> tuple[int, int]:
    """(heads, kv heads), scaled down past MAX_HEADS with the ratio kept."""
    group = heads // kv_heads
    while heads > MAX_HEADS and kv_heads % 2 == 0 and kv_heads > 1:
        kv_heads //= 2
        heads = group * kv_heads
    return heads, kv_heads


def _depth(family: Family, text: dict[str, Any]) -> int:
    """The shortest prefix of layers showing every layer kind the source has."""
    need = MIN_LAYERS
    types = text.get(_first_key(family, "layer_types")) or []
    seen: set[str] = set()
    for i, kind in enumerate(types):
        if kind not in seen:
            seen.add(kind)
            need = max(need, i + 1)
    step = text.get(family.config.decoder_sparse_step[0]) if family.config.decoder_sparse_step else None
    if step and step > 1:
        need = max(need, step)
    dense = text.get(family.config.first_k_dense_replace[0]) if family.config.first_k_dense_replace else None
    if dense:
        need = max(need, 2)  # one dense layer, one MoE layer
    source_layers = text.get(_first_key(family, "num_hidden_layers"))
    return min(need, source_layers) if source_layers else need


def standin_text_config(family: Family, *, source_config: dict | None = None,
                        declared: dict | None = None, vocab_size: int = TOKENIZER_VOCAB) -> dict[str, Any]:
    """The stand-in's text-config kwargs (see the module docstring)."""
    text = _source_text(family, source_config, declared)
    keys = family.config
    heads = text.get(keys.num_attention_heads[0]) or 4
    kv = text.get(keys.num_key_value_heads[0]) or heads
    heads, kv = _heads(heads, kv)
    layers = _depth(family, text)
    text.update({keys.num_attention_heads[0]: heads, keys.num_key_value_heads[0]: kv,
                 keys.head_dim[0]: HEAD_DIM, keys.hidden_size[0]: heads * HEAD_DIM,
                 keys.intermediate_size[0]: DENSE_INTERMEDIATE, keys.vocab_size[0]: vocab_size,
                 keys.num_hidden_layers[0]: layers, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})
    if keys.layer_types and text.get(keys.layer_types[0]):
        text[keys.layer_types[0]] = list(text[keys.layer_types[0]][:layers])
    if keys.first_k_dense_replace and text.get(keys.first_k_dense_replace[0]):
        text[keys.first_k_dense_replace[0]] = 1
    if keys.mlp_only_layers and text.get(keys.mlp_only_layers[0]):
        text[keys.mlp_only_layers[0]] = [i for i in text[keys.mlp_only_layers[0]] if i < layers]
    if keys.extra_layers:
        text[keys.extra_layers[0]] = 0  # no multi-token-prediction layer
    if family.is_moe:
        _moe_widths(family, text)
    _merge(text, family.standin, keep_null=source_config is not None)
    if family.attention.kind == "mla":
        text[keys.head_dim[0]] = text.get(keys.qk_rope_head_dim[0], HEAD_DIM)
    return text


def _moe_widths(family: Family, text: dict[str, Any]) -> None:
    keys = family.config
    if not text.get(keys.top_k[0]):
        text[keys.top_k[0]] = min(DEFAULT_TOP_K, text.get(keys.expert_count[0]) or DEFAULT_TOP_K)
    width = keys.moe_intermediate_size[0] if keys.moe_intermediate_size else keys.intermediate_size[0]
    text[width] = EXPERT_INTERMEDIATE
    if keys.shared_expert_intermediate_size:
        text[keys.shared_expert_intermediate_size[0]] = EXPERT_INTERMEDIATE


def _merge(into: dict[str, Any], values: dict[str, Any], *, keep_null: bool) -> None:
    """Deep-merge `values` into `into`; with `keep_null`, a key the source
    holds as None stays None (a null q_lora_rank is structure, not size)."""
    for key, value in values.items():
        if keep_null and key in into and into[key] is None:
            continue
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, keep_null=keep_null)
        else:
            into[key] = copy.deepcopy(value)


def standin_config_dict(family: Family, text: dict[str, Any]) -> dict[str, Any]:
    """The whole config kwargs: `text` where the family keeps it, and every
    tower's tiny sub-config where the family says."""
    hidden = text[family.config.hidden_size[0]]
    config: dict[str, Any] = {}
    _set_path(config, family.config.text_config, copy.deepcopy(text))
    for tower in family.towers:
        if tower.config:
            sub = {**copy.deepcopy(tower.standin), **{k: hidden for k in tower.standin_hidden_keys}}
            _set_path(config, tower.config, sub)
    return config


# ── tokens ─────────────────────────────────────────────────────────────────


_OWN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_id_paths(node: dict[str, Any], family: Family, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], int]]:
    """(key path, id) of every placeholder token id outside the towers' sub-configs."""
    towers = {tuple(t.config.split(".")) for t in family.towers if t.config}
    found = []
    for key, value in node.items():
        where = (*path, key)
        if isinstance(value, dict) and where not in towers:
            found += _token_id_paths(value, family, where)
        elif isinstance(key, str) and key.endswith(_TOKEN_ID_SUFFIXES) and key not in _OWN_IDS \
                and type(value) is int:
            found.append((where, value))
    return found


def placeholder_tokens(config_dict: dict[str, Any], source: dict[str, Any], family: Family,
                       vocab_size: int) -> list[str]:
    """Give `config_dict` every placeholder token id `source` names (image,
    video, audio, vision start/end), renumbered into the tiny vocabulary
    right after the base specials; returns the special tokens to add, in id
    order, spelled after their key (``<|image_token|>``)."""
    names: list[str] = []
    ids: dict[int, int] = {}
    for path, value in _token_id_paths(source, family):
        if value >= vocab_size and value not in ids:
            ids[value] = len(BASE_SPECIAL_TOKENS) + len(names)
            names.append(f"<|{path[-1].removesuffix('_id').removesuffix('_index')}|>")
        node = config_dict
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = ids.get(value, value)
    return names


_TOKENIZER_TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    "The quick brown fox jumps over the lazy dog. Models forget what they are not asked to remember.\n"
    "for i in range(10):\n    print(i * i)\n"
) * 20


def add_tokenizer(model_dir: Path, *, vocab_size: int = TOKENIZER_VOCAB, special_tokens: tuple[str, ...] = ()) -> Path:
    """Train a tiny byte-level BPE tokenizer (deterministic, offline, well
    under a second) and save it beside the model as a fast tokenizer.
    ``<|endoftext|>`` is id 0 (bos, eos), ``<|pad|>`` id 1, then
    `special_tokens` in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*BASE_SPECIAL_TOKENS, *special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TOKENIZER_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BASE_SPECIAL_TOKENS[0],
                                   pad_token=BASE_SPECIAL_TOKENS[1], bos_token=BASE_SPECIAL_TOKENS[0],
                                   additional_special_tokens=list(special_tokens) or None)
    fast.save_pretrained(model_dir)
    return model_dir


# ── building ───────────────────────────────────────────────────────────────


def save_random_model(family: Family, config_dict: dict[str, Any], out_dir: Path, *, seed: int = 0,
                      dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    """Instantiate the family's whole-checkpoint class (``architectures[0]``:
    for Qwen2.5-Omni the thinker, talker and token2wav together) with random
    weights from `seed` and save it with ``save_pretrained``."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(family.name, **copy.deepcopy(config_dict))
    torch.manual_seed(seed)
    model = getattr(transformers, family.architectures[0])._from_config(config)
    model = model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out_dir


def _dtype(source_config: dict | None) -> str:
    """The source's weight dtype when it names a floating one, else float32."""
    name = str((source_config or {}).get("dtype") or (source_config or {}).get("torch_dtype") or "float32")
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def build_standin(family: Family, out_dir: Path, *, source_config: dict | None = None,
                  declared: dict | None = None, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Write a tiny random stand-in of `family` to `out_dir` and return it.

    Geometry from `source_config` (the real source's config.json) when
    given, else from `declared` (the alloy's ``source`` fields:
    numExpertsPerLayer, numActivatedExperts, numLayers), else the family's
    defaults; see the module docstring for what is kept and what shrunk.
    """
    text = standin_text_config(family, source_config=source_config, declared=declared)
    config = standin_config_dict(family, text)
    source = source_config if source_config is not None else family_defaults(family)
    specials = tuple(placeholder_tokens(config, source, family, TOKENIZER_VOCAB))
    if len(BASE_SPECIAL_TOKENS) + len(specials) > TOKENIZER_VOCAB - 256:
        raise ValueError(f"{family.name}: {len(specials)} special tokens do not fit a {TOKENIZER_VOCAB}-token "
                         "stand-in vocabulary")
    save_random_model(family, config, Path(out_dir), seed=seed, dtype=_dtype(source_config))
    if with_tokenizer:
        add_tokenizer(Path(out_dir), special_tokens=specials)
    return Path(out_dir)


def expected_geometry(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    """What a stand-in must keep of a config: expert count, top-k, the head
    ratio and the set of layer kinds (for tests and rehearsal reports)."""
    heads = family.read(config, "num_attention_heads")
    kv = family.read(config, "num_key_value_heads") or heads
    return {"experts": family.expert_count(config), "top_k": family.top_k(config),
            "head_ratio": heads // kv,
            "layer_kinds": sorted(set(family.layer_types(config) or []))}
