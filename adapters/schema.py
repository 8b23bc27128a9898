"""The shape of a model family, as data.

A family says where a checkpoint keeps its experts, routers and attention
weights *on disk* (the names ``save_pretrained`` writes, which are the names the
compression stations read and rewrite) and which ``config.json`` keys hold its
geometry. Code walks this data; adding an architecture means adding one JSON
file under ``adapters/families/``, never an ``if``.

Tensor names are ``string.Template`` strings with two placeholders, as in
mergekit's architecture specs: ``${layer}`` (decoder layer index) and
``${expert}`` (routed expert index). Everything here is plain pydantic: the
daemon imports it, so it must never import torch.
"""

from __future__ import annotations

import re
from string import Template
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TensorTemplate = str
"""A tensor name with ``${layer}`` / ``${expert}`` placeholders."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def render(template: TensorTemplate, **values: int) -> str:
    """Fill a tensor-name template; a missing placeholder is a bug in the spec."""
    return Template(template).substitute({k: str(v) for k, v in values.items()})


def template_regex(template: TensorTemplate) -> re.Pattern[str]:
    """A regex matching every rendering of ``template``; placeholders become
    named integer groups, so callers can count layers/experts found on disk."""
    parts = re.split(r"\$\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\d+)")
    return re.compile("".join(out) + "$")


class ConfigKeys(_Frozen):
    """Which config.json keys hold what. Tuples are candidates tried in
    order: checkpoints in the wild disagree with what transformers writes
    (Hub Qwen3-MoE configs say ``num_experts``; transformers 5 saves
    ``num_local_experts``), so a family lists every spelling it accepts."""

    text_config: str | None = None
    """Sub-dict holding the language model's geometry: VL models nest it one
    level (``text_config``), Qwen2.5-Omni two (``thinker_config.text_config``,
    a dotted path)."""
    hidden_size: tuple[str, ...] = ("hidden_size",)
    num_hidden_layers: tuple[str, ...] = ("num_hidden_layers",)
    num_attention_heads: tuple[str, ...] = ("num_attention_heads",)
    num_key_value_heads: tuple[str, ...] = ("num_key_value_heads",)
    head_dim: tuple[str, ...] = ("head_dim",)
    intermediate_size: tuple[str, ...] = ("intermediate_size",)
    vocab_size: tuple[str, ...] = ("vocab_size",)
    tie_word_embeddings: tuple[str, ...] = ("tie_word_embeddings",)
    layer_types: tuple[str, ...] = ("layer_types",)
    extra_layers: tuple[str, ...] = ("num_nextn_predict_layers",)
    """Decoder layers saved past ``num_hidden_layers`` (DeepSeek-V3's
    multi-token-prediction layer), so the geometry check does not flag them."""
    expert_count: tuple[str, ...] = ()
    top_k: tuple[str, ...] = ()
    moe_intermediate_size: tuple[str, ...] = ()
    """Per-expert FFN width; empty means experts use ``intermediate_size``."""
    shared_expert_count: tuple[str, ...] = ()
    shared_expert_intermediate_size: tuple[str, ...] = ()
    """Total shared-expert width; empty means count x moe_intermediate_size."""
    first_k_dense_replace: tuple[str, ...] = ()
    mlp_only_layers: tuple[str, ...] = ()
    decoder_sparse_step: tuple[str, ...] = ()
    n_group: tuple[str, ...] = ()
    topk_group: tuple[str, ...] = ()
    # Multi-head latent attention (kind "mla") widths; unused by other kinds.
    q_lora_rank: tuple[str, ...] = ("q_lora_rank",)
    """Rank of the factored query (q_a_proj -> q_b_proj); null or 0 means a
    plain q_proj (DeepSeek-V2-Lite)."""
    qk_nope_head_dim: tuple[str, ...] = ("qk_nope_head_dim",)
    qk_rope_head_dim: tuple[str, ...] = ("qk_rope_head_dim",)
    v_head_dim: tuple[str, ...] = ("v_head_dim",)


class AttentionSpec(_Frozen):
    """Attention projections on disk, for the geometry check and head pruning.

    ``kind`` is the one place code branches: standard (GQA/MHA) projections
    have one shape rule, DeepSeek's multi-head latent attention another.
    """

    kind: Literal["gqa", "mla"] = "gqa"
    q_proj: TensorTemplate
    """The per-head query projection (MLA: the factored ``q_b_proj``)."""
    q_proj_unfactored: TensorTemplate | None = None
    """MLA only: the plain ``q_proj`` a checkpoint has instead of
    q_a_proj/q_b_proj when its config's ``q_lora_rank`` is null
    (DeepSeek-V2-Lite). Pick with :meth:`Family.q_proj`."""
    k_proj: TensorTemplate | None = None
    v_proj: TensorTemplate | None = None
    kv_b_proj: TensorTemplate | None = None
    """MLA only: the latent-to-heads key/value up-projection, rows per head
    ``qk_nope_head_dim + v_head_dim``."""
    o_proj: TensorTemplate
    head_independent: tuple[TensorTemplate, ...] = ()
    """Attention tensors whose shape does not depend on the head count (MLA's
    q_a_proj, kv_a_proj_with_mqa and their norms): head pruning copies them
    untouched instead of refusing a tensor it cannot slice."""
    q_rows_per_head_factor: int = 1
    """Qwen3.5/Qwen3-Next full attention fuse an output gate into q_proj,
    doubling its rows (2 x heads x head_dim)."""
    skip_layer_types: tuple[str, ...] = ()
    """``layer_types`` values whose layers have no such projections (e.g.
    Gated-DeltaNet ``linear_attention`` layers in Qwen3.5)."""
    fixed_head_count: bool = False
    """transformers sizes this attention as hidden_size / num_attention_heads
    and ignores config head_dim (Qwen2.5-VL's text decoder in 5.24), so no
    checkpoint with fewer heads loads: head pruning zeroes pruned heads in
    place (defragMode "pad") instead of removing them."""
    heads_divide_hidden: bool = False
    """transformers' config validation (LlamaConfig in 5.x) refuses a head
    count that does not divide hidden_size, even with an explicit head_dim:
    head pruning keeps only such counts, or the saved model would not load."""


class ExpertLayout(_Frozen):
    """How routed experts sit on disk.

    ``per_expert``: one tensor per expert and projection (templates use
    ``${expert}``). ``fused``: one ``[E, ...]`` tensor per projection with
    the expert axis first (Granite-MoE, Qwen3-VL-MoE).
    """

    kind: Literal["per_expert", "fused"]
    tensors: tuple[TensorTemplate, ...]


class MoESpec(_Frozen):
    experts: ExpertLayout
    router: tuple[TensorTemplate, ...]
    """Router tensors on disk; row count equals the routed expert count."""
    shared_experts: tuple[TensorTemplate, ...] = ()
    router_module_in_memory: TensorTemplate
    """Documentation only: where transformers puts the router module once
    loaded. Code must find routers with ``discover_routers`` instead."""
    experts_in_memory: str = "fused"
    """Documentation: transformers >= 5 fuses experts in memory into
    ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] parameters."""


class Tower(_Frozen):
    """A non-text part of a checkpoint (vision encoder, audio encoder, speech
    decoder, vocoder). No compression station may change a tower's tensors:
    head and expert pruning copy them byte for byte, LoRA never targets them,
    and the modality stage proves them unchanged."""

    name: str
    """What it is, unique within the family ("vision", "audio", "talker", ...)."""
    modality: Literal["vision", "audio", "speech"]
    prefixes: tuple[str, ...]
    """Tensor and module name prefixes (ending in "."): on-disk names and,
    where transformers renames on load, the in-memory ones too."""
    config: str | None = None
    """Dotted path of the tower's sub-config in config.json
    ("vision_config", "thinker_config.audio_config")."""
    standin: dict[str, Any] = Field(default_factory=dict)
    """The tower's sub-config in a tiny random stand-in (stations/standin.py)."""
    standin_hidden_keys: tuple[str, ...] = ()
    """Keys of that sub-config that must equal the text model's hidden size
    (the projection into the language model)."""
    loaded: bool = True
    """Whether ``Family.auto_class`` loads this tower. Qwen2.5-Omni's text
    model (the thinker) holds vision and audio but not the talker or token2wav:
    a station that saves a loaded model must carry the unloaded towers over
    from its input checkpoint."""


class TensorNames(_Frozen):
    embed: TensorTemplate = "model.embed_tokens.weight"
    lm_head: TensorTemplate = "lm_head.weight"
    layer_marker: TensorTemplate = "model.layers.${layer}.input_layernorm.weight"
    """A tensor every decoder layer has: proves the layer exists on disk."""


class Family(_Frozen):
    """One architecture family, keyed by config.json ``model_type``."""

    name: str
    architectures: tuple[str, ...] = ()
    """transformers class names (config.json ``architectures``)."""
    aliases: tuple[str, ...] = ()
    """Other spellings alloys use for ``source.architecture``."""
    auto_class: str = "AutoModelForCausalLM"
    """The transformers class (an Auto class, or a concrete one such as the
    Omni thinker) whose ``from_pretrained`` loads the checkpoint's language
    model with every tower it needs for a forward pass returning logits."""
    config: ConfigKeys = Field(default_factory=ConfigKeys)
    tensors: TensorNames = Field(default_factory=TensorNames)
    attention: AttentionSpec
    moe: MoESpec | None = None
    towers: tuple[Tower, ...] = ()
    """Non-text towers; empty for text-only families."""
    standin: dict[str, Any] = Field(default_factory=dict)
    """Text-config values a tiny random stand-in sets beyond the generic
    width rules (stations/standin.py): MLA ranks, linear-attention head
    widths, rope sections sized for its head_dim. Nested dicts merge into
    the family's defaults; a value the source config has as null stays null."""
    lora_targets: tuple[str, ...]
    """Default PEFT ``target_modules``. MoE experts are fused parameters in
    transformers >= 5, not Linear modules, so MoE families target attention
    (and shared experts) only."""
    notes: str = ""

    @field_validator("towers")
    @classmethod
    def _towers_are_distinct_prefixes(cls, towers: tuple[Tower, ...]) -> tuple[Tower, ...]:
        """A prefix without its final dot would claim text tensors too
        ("visual" also starts "visual_proj"); a repeated name is a typo."""
        names = [t.name for t in towers]
        if len(set(names)) != len(names):
            raise ValueError(f"tower names repeat: {names}")
        bad = [p for t in towers for p in t.prefixes if not p.endswith(".")]
        if bad:
            raise ValueError(f"tower prefixes must end with '.': {bad}")
        return towers

    # -- config readers -------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The dict holding the language model's geometry (the config itself
        when it is flat, as Hub Qwen2.5-VL configs are)."""
        return _sub_dict(config, self.config.text_config) or config

    def tower_config(self, config: dict[str, Any], tower: Tower) -> dict[str, Any] | None:
        """The sub-config of ``tower``, if the config has one."""
        return _sub_dict(config, tower.config)

    def read(self, config: dict[str, Any], field: str) -> Any:
        """First present candidate key for ``field`` (a ConfigKeys name)."""
        text = self.text_config(config)
        for key in getattr(self.config, field):
            if text.get(key) is not None:
                return text[key]
        return None

    def expert_count(self, config: dict[str, Any]) -> int | None:
        return self.read(config, "expert_count") if self.is_moe else None

    def top_k(self, config: dict[str, Any]) -> int | None:
        return self.read(config, "top_k") if self.is_moe else None

    def head_dim(self, config: dict[str, Any]) -> int | None:
        """Explicit ``head_dim`` or hidden / heads, as transformers does."""
        explicit = self.read(config, "head_dim")
        if explicit:
            return explicit
        hidden, heads = self.read(config, "hidden_size"), self.read(config, "num_attention_heads")
        return hidden // heads if hidden and heads else None

    def q_proj(self, config: dict[str, Any]) -> TensorTemplate:
        """The query projection this checkpoint has: MLA without
        ``q_lora_rank`` keeps a plain q_proj instead of q_a_proj/q_b_proj."""
        plain = self.attention.q_proj_unfactored
        return plain if plain and not self.read(config, "q_lora_rank") else self.attention.q_proj

    def layer_types(self, config: dict[str, Any]) -> list[str] | None:
        return self.read(config, "layer_types")

    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        """Decoder layers whose MLP is a routed MoE block.

        Mirrors transformers: DeepSeek's first ``first_k_dense_replace``
        layers are dense; Qwen-MoE layers in ``mlp_only_layers`` are dense
        and only every ``decoder_sparse_step``-th layer is sparse.
        """
        experts = self.expert_count(config)
        if not experts:
            return []
        dense_prefix = self.read(config, "first_k_dense_replace") or 0
        mlp_only = set(self.read(config, "mlp_only_layers") or ())
        step = self.read(config, "decoder_sparse_step") or 1
        layers = range(self.read(config, "num_hidden_layers") or 0)
        return [i for i in layers if i >= dense_prefix and i not in mlp_only and (i + 1) % step == 0]

    def attention_layers(self, config: dict[str, Any]) -> list[int]:
        """Layers that carry the attention projections in ``attention``."""
        count = self.read(config, "num_hidden_layers") or 0
        types = self.layer_types(config) or []
        skip = set(self.attention.skip_layer_types)
        return [i for i in range(count) if i >= len(types) or types[i] not in skip]

    # -- tensor names ---------------------------------------------------
    def expert_tensor_names(self, layer: int, expert: int) -> list[str]:
        """On-disk tensors holding ``expert`` of ``layer``. For a fused
        layout these are the shared ``[E, ...]`` tensors (slice axis 0)."""
        if self.moe is None:
            return []
        return [render(t, layer=layer, expert=expert) for t in self.moe.experts.tensors]

    def router_tensor_names(self, layer: int) -> list[str]:
        return [render(t, layer=layer) for t in self.moe.router] if self.moe else []

    def shared_expert_tensor_names(self, layer: int) -> list[str]:
        return [render(t, layer=layer) for t in self.moe.shared_experts] if self.moe else []

    def tower_of(self, name: str) -> Tower | None:
        """The tower a tensor or module name belongs to, or None for text."""
        return next((t for t in self.towers if name.startswith(t.prefixes)), None)

    def names(self) -> tuple[str, ...]:
        """Every key this family answers to, canonical name first."""
        return (self.name, *self.architectures, *self.aliases)


def _sub_dict(config: dict[str, Any], path: str | None) -> dict[str, Any] | None:
    """``config`` walked along a dotted key path; None where a step is missing."""
    if not path:
        return None
    node: Any = config
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None
