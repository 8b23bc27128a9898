"""expert-activation-profile: how much each routed expert matters, measured.

The calibration corpus runs through the model in blocks; a forward hook on
every router (found by structure: adapters.discover_routers) sees what the
MoE block is about to do. In transformers >= 5 every MoE family's router
returns ``(router_logits, top_k_weights, top_k_index)`` and the block then
calls its fused experts module as ``experts(hidden, top_k_index,
top_k_weights)``; the hook reads the routing from that return value and the
tokens' hidden states from the router's input. Per layer and expert it adds:

* ``activation_count``: top-k selections (each token picks an expert once,
  so a layer's counts sum to tokens x top_k);
* ``gate_weight``: the sum of the routing weights the block multiplies the
  expert's output by (after the family's own normalisation and scaling);
* ``reap``: REAP saliency, mean over the tokens routed to the expert of
  gate weight x ||expert output||_2. The expert outputs come from calling
  the layer's own experts module once per block with every (token, slot)
  pair as its own row, routed to that slot's expert with weight 1: exactly
  the module's arithmetic (activation, kernels, offload hooks) with no
  re-implementation, computed on routed tokens only. An expert no token
  reached has REAP exactly 0;
* ``tokens_seen``: tokens routed to the expert, the REAP denominator (equal
  to activation_count; kept separately so readers need not know that);
* ``router_l2``: the L2 norm of the expert's router row, read from the
  checkpoint (data-free, and exact whatever the load plan quantised).

The result is ``importance.json`` (format forge-factory/expert-importance,
version 1) in the stage dir; expert-prune reads it through the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import discover_routers, family_for_config
from adapters.schema import Family
from factory.alloy import ExpertActivationProfileStage
from factory.durable import write_json
from factory.errors import StageFailed
from factory.model_files import inspect_checkpoint
from factory.stages import StageContext, StageResult
from stations import corpus as corpora
from stations.base import input_model_dir
from stations.expert_prune import IMPORTANCE_FORMAT, router_l2_from_disk
from stations.loader import load

IMPORTANCE_FILE = "importance.json"


@dataclass
class LayerStats:
    """Running sums for one MoE layer's experts, float64. They move to the
    device the routing arrives on at the first block (a router offloaded by
    accelerate has its weight on "meta", so its weight says nothing)."""

    counts: Any  # [E] top-k selections
    gate: Any  # [E] routing weight sums
    reap: Any  # [E] sums of gate x ||expert output||
    experts: Any  # the layer's fused experts module

    @classmethod
    def zeros(cls, num_experts: int, device: Any, experts: Any) -> "LayerStats":
        import torch

        def z() -> Any:
            return torch.zeros(num_experts, dtype=torch.float64, device=device)

        return cls(z(), z(), z(), experts)

    def add(self, hidden: Any, weights: Any, index: Any) -> None:
        """Fold one block's routing into the sums. hidden [T, H], weights and index [T, k]."""
        import torch

        T, k = index.shape
        if self.counts.device != index.device:
            self.counts, self.gate, self.reap = (t.to(index.device) for t in (self.counts, self.gate, self.reap))
        flat_idx, flat_w = index.reshape(-1), weights.reshape(-1).to(torch.float64)
        self.counts.index_add_(0, flat_idx, torch.ones_like(flat_w))
        self.gate.index_add_(0, flat_idx, flat_w)
        # One row per (token, slot), each routed to its slot's expert alone with weight 1.
        rows = hidden.reshape(T, 1, -1).expand(T, k, -1).reshape(T * k, -1)  # [T*k, H]
        ones = torch.ones(T * k, 1, dtype=hidden.dtype, device=hidden.device)
        out = self.experts(rows, flat_idx.reshape(-1, 1), ones)  # [T*k, H]
        norms = torch.linalg.vector_norm(out.to(torch.float64), dim=-1).to(index.device)
        self.reap.index_add_(0, flat_idx, flat_w * norms)


def experts_module(model: Any, router: Any, num_experts: int, layer: int) -> Any:
    """The router's sibling that holds the fused [E, ...] expert weights."""
    name = next(n for n, m in model.named_modules() if m is router)
    parent = model.get_submodule(name.rpartition(".")[0])
    for child in parent.children():
        params = list(child.parameters(recurse=False))
        if child is not router and params and all(p.dim() == 3 and p.shape[0] == num_experts for p in params):
            return child
    raise StageFailed(f"layer {layer}: no fused experts module ([{num_experts}, ...] parameters) next to the router "
                      f"{name}; this transformers version lays the MoE block out differently: upgrade to >= 5")


def _router_hook(stats: LayerStats, layer: int):
    def hook(module: Any, args: tuple, output: Any) -> None:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise StageFailed(f"layer {layer}: router {type(module).__name__} returned {type(output).__name__}, "
                              "not (logits, top_k_weights, top_k_index); this transformers version is not "
                              "supported by the profile station: use transformers >= 5")
        _, weights, index = output
        hidden = args[0].reshape(-1, args[0].shape[-1])
        stats.add(hidden, weights, index)

    return hook


def _blocks(stage: ExpertActivationProfileStage, tokenizer: Any, corpus: corpora.Corpus) -> list[list[int]]:
    """Token blocks within the budget: calibrationExamples documents at most,
    calibrationTokens tokens at most, sequenceLength tokens per block."""
    blocks = corpora.read_blocks(tokenizer, corpus, block=stage.block_length, budget=stage.calibration_tokens,
                                 documents=stage.calibration_examples)
    if not blocks:
        raise StageFailed(f"corpus {corpus.path} gave no tokens; give the profile a non-empty corpus")
    return blocks


def _run_corpus(ctx: StageContext, model: Any, device: str, blocks: list[list[int]]) -> None:
    import torch

    with torch.inference_mode():
        for i, ids in enumerate(blocks):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            ctx.progress(i + 1, len(blocks), "blocks")
            ctx.stop_point()


def _layer_record(stats: LayerStats, router_l2: list[float]) -> dict[str, list]:
    counts = stats.counts.cpu()
    reap = (stats.reap.cpu() / counts.clamp(min=1)).where(counts > 0, 0.0)
    return {"activation_count": [int(c) for c in counts], "gate_weight": [float(g) for g in stats.gate.cpu()],
            "reap": [float(r) for r in reap], "router_l2": router_l2, "tokens_seen": [int(c) for c in counts]}


def _coverage_warnings(layers: dict[str, dict], minimum: int) -> list[str]:
    return [f"layer {layer} expert {e} saw {n} tokens (< minTokensPerExpert {minimum}): its reap and gate_weight "
            "are noisy; profile more tokens (calibrationTokens) or a more varied corpus"
            for layer, row in layers.items() for e, n in enumerate(row["tokens_seen"]) if n < minimum]


def _check_moe(family: Family, model_dir: Path, config: dict) -> tuple[int, list[int]]:
    if not family.is_moe or not family.expert_count(config):
        raise StageFailed(f"{model_dir} is a {family.name} model without routed experts; "
                          "expert-activation-profile needs an MoE model")
    return family.expert_count(config), family.moe_layers(config)


def run_stage(ctx: StageContext) -> StageResult:
    import torch

    stage = ctx.stage
    assert isinstance(stage, ExpertActivationProfileStage)
    # 1. Model, corpus, tokens.
    model_dir = input_model_dir(ctx)
    info = inspect_checkpoint(model_dir)
    family = family_for_config(info.config)
    num_experts, moe_layers = _check_moe(family, model_dir, info.config)
    corpus = corpora.resolve(ctx, file_keys=("calibrationCorpusFile",), id_keys=("calibrationCorpus",))
    torch.manual_seed(0)
    loaded = load(ctx, model_dir, with_tokenizer=True, purpose="expert-activation-profile")
    blocks = _blocks(stage, loaded.tokenizer, corpus)

    # 2. Hooks on the routers found in memory; they must be the config's MoE layers.
    routers = discover_routers(loaded.model, num_experts=num_experts)
    if sorted(routers) != moe_layers:
        raise StageFailed(f"{model_dir}: routers found on layers {sorted(routers)}, but the config makes layers "
                          f"{moe_layers} MoE; the family data ({family.name}) and the model disagree")
    stats = {layer: LayerStats.zeros(num_experts, "cpu", experts_module(loaded.model, r, num_experts, layer))
             for layer, r in routers.items()}
    handles = [r.register_forward_hook(_router_hook(stats[layer], layer)) for layer, r in routers.items()]
    try:
        _run_corpus(ctx, loaded.model, loaded.device, blocks)
    finally:
        for h in handles:
            h.remove()

    # 3. The importance file.
    files = {name: meta.file for name, meta in info.tensors.items()}
    layers = {str(layer): _layer_record(stats[layer], router_l2_from_disk(model_dir, family, layer, files))
              for layer in moe_layers}
    warnings = _coverage_warnings(layers, stage.min_tokens_per_expert)
    tokens = sum(len(b) for b in blocks)
    out = ctx.stage_dir / IMPORTANCE_FILE
    write_json(out, {
        "format": IMPORTANCE_FORMAT, "version": 1, "model_dir": str(model_dir),
        "corpus": {"ref": corpus.ref, "path": os.path.relpath(corpus.path, ctx.layout.root.resolve()),
                   "sha256": corpus.sha256},
        "tokens": tokens, "blocks": len(blocks), "family": family.name, "num_experts": num_experts,
        "top_k": family.top_k(info.config), "min_tokens_per_expert": stage.min_tokens_per_expert, "warnings": warnings,
        "layers": layers,
    })
    rel = str(out.relative_to(ctx.work_dir))
    # `corpus` and `corpus_sha256`: the shape eval's perplexity records a corpus in.
    return StageResult(outputs=[out], metrics={"importance": rel, "tokens": tokens, "corpus": corpus.ref,
                                               "corpus_sha256": corpus.sha256,
                                               "low_coverage_experts": len(warnings), "warnings": warnings})
