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

from pydantic import BaseModel, ConfigDict, Field

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
    """Sub-dict holding the language model's geometry (VL models nest it)."""
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


class AttentionSpec(_Frozen):
    """Attention projections on disk, for the geometry check.

    ``kind`` is the one place code branches: standard (GQA/MHA) projections
    have one shape rule, DeepSeek's multi-head latent attention another.
    """

    kind: Literal["gqa", "mla"] = "gqa"
    q_proj: TensorTemplate
    k_proj: TensorTemplate | None = None
    v_proj: TensorTemplate | None = None
    o_proj: TensorTemplate
    q_rows_per_head_factor: int = 1
    """Qwen3.5/Qwen3-Next full attention fuse an output gate into q_proj,
    doubling its rows (2 x heads x head_dim)."""
    skip_layer_types: tuple[str, ...] = ()
    """``layer_types`` values whose layers have no such projections (e.g.
    Gated-DeltaNet ``linear_attention`` layers in Qwen3.5)."""


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
    """The transformers Auto class that loads the whole checkpoint."""
    config: ConfigKeys = Field(default_factory=ConfigKeys)
    tensors: TensorNames = Field(default_factory=TensorNames)
    attention: AttentionSpec
    moe: MoESpec | None = None
    lora_targets: tuple[str, ...]
    """Default PEFT ``target_modules``. MoE experts are fused parameters in
    transformers >= 5, not Linear modules, so MoE families target attention
    (and shared experts) only."""
    notes: str = ""

    # -- config readers -------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The dict holding the language model's geometry."""
        key = self.config.text_config
        if key and isinstance(config.get(key), dict):
            return config[key]
        return config

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

    def names(self) -> tuple[str, ...]:
        """Every key this family answers to, canonical name first."""
        return (self.name, *self.architectures, *self.aliases)
