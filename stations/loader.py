"""Executes a load plan (factory/load_plan.py) with transformers, accelerate
and bitsandbytes, and reports what loading cost.

Everything that can refuse a model is checked before any weight is
allocated: the config's implied size (an absurd config is refused from its
numbers alone), pickle weights (they run code on load: refused unless the
node allows them), and whether any strategy fits this node's free memory.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters import family_for_config
from factory.errors import StageFailed
from factory.load_plan import LoadPlan, decide_load_plan, measure_node_memory
from factory.model_files import check_config_sanity, inspect_checkpoint
from factory.stages import StageContext
from factory.tiers import offload_dir

# On a CPU, float32 is exact and uses fast kernels on CPUs without bf16
# support; it is chosen when twice the bf16 size still fits what the plan
# allowed for weights.
CPU_FP32_HEADROOM = 2.0
# Module names bitsandbytes must leave unquantised under a 4-bit plan
# (transformers matches them as name suffixes: "mlp.gate" is not "gate_proj").
QUANT_SKIP_MODULES = ("lm_head", "router", "mlp.gate", "block_sparse_moe.gate")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any | None
    plan: LoadPlan
    device: str  # where inputs go: "cuda:0" or "cpu"
    dtype: str
    load_seconds: float
    peak_rss_mb: float
    peak_vram_mb: float | None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def plan_for(ctx: StageContext, model_dir: Path) -> tuple[LoadPlan, Any, dict]:
    """The load plan for `model_dir` on this node, checked from headers only."""
    import importlib.util

    info = inspect_checkpoint(model_dir)
    family = family_for_config(info.config)
    problems = check_config_sanity(info.config, family)
    if problems:
        raise StageFailed(f"{model_dir}/config.json is not a plausible model: {problems[0]}; "
                          "fix the config or the source")
    if not info.tensors:
        if info.has_pickle_weights and not ctx.config.forge.allow_pickle_weights:
            raise StageFailed(f"{model_dir} has only pickle weights (.bin/.pt), which run code when loaded; "
                              "convert them to safetensors, or set [forge] allow_pickle_weights = true "
                              "in factory_node.toml if you trust the source")
        if not info.has_pickle_weights:
            raise StageFailed(f"{model_dir} has no weights (no .safetensors files)")
    mem = measure_node_memory(query_gpu=True)
    bnb = mem.cuda_available and importlib.util.find_spec("bitsandbytes") is not None
    plan = decide_load_plan(model_bytes=info.bytes_at_16bit, free_vram_bytes=mem.free_vram_bytes,
                            free_ram_bytes=mem.free_ram_bytes, has_cold_tier=bool(ctx.config.storage.cold),
                            cuda_available=mem.cuda_available, bnb_available=bnb)
    if plan.strategy == "refuse":
        raise StageFailed(f"cannot load {model_dir} on this node: {plan.reason}")
    return plan, family, info.config


def _from_pretrained_kwargs(ctx: StageContext, plan: LoadPlan, dtype_name: str) -> dict:
    import torch

    forge = ctx.config.forge
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype_name),
                              "use_safetensors": None if forge.allow_pickle_weights else True,
                              "trust_remote_code": forge.trust_remote_code}
    if plan.strategy == "gpu-fp16":
        kwargs["device_map"] = {"": 0}
    elif plan.strategy in ("gpu-4bit", "gpu-4bit-cpu-offload"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            # Routers decide which experts run: keep them exact. Most families'
            # routers are not nn.Linear (never quantised), but PhiMoE's
            # subclasses it; the output head stays exact as by default.
            llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
            llm_int8_enable_fp32_cpu_offload=plan.strategy == "gpu-4bit-cpu-offload")
        kwargs["device_map"] = "auto" if plan.max_memory else {"": 0}
        if plan.max_memory:
            kwargs["max_memory"] = plan.max_memory
    elif plan.strategy == "streaming":
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = plan.max_memory
        if plan.offload_folder_needed:
            cold = offload_dir(ctx.config, ctx.work_dir.name)
            cold.mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(cold)
    return kwargs


def load(ctx: StageContext, model_dir: Path, *, with_tokenizer: bool = True, purpose: str = "") -> Loaded:
    """Load `model_dir` as the plan says, emitting a `model/load` event."""
    import torch
    import transformers

    plan, family, _config = plan_for(ctx, model_dir)
    dtype_name = plan.dtype or "bfloat16"
    if plan.strategy == "cpu" and plan.model_gib * CPU_FP32_HEADROOM <= plan.free_ram_gib / 2:
        dtype_name = "float32"
    t0 = time.monotonic()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    auto = getattr(transformers, family.auto_class)
    model = auto.from_pretrained(model_dir, **_from_pretrained_kwargs(ctx, plan, dtype_name))
    model.eval()
    tokenizer = (transformers.AutoTokenizer.from_pretrained(
        model_dir, trust_remote_code=ctx.config.forge.trust_remote_code) if with_tokenizer else None)
    device = "cuda:0" if plan.strategy.startswith("gpu") or (plan.strategy == "streaming"
                                                            and torch.cuda.is_available()) else "cpu"
    vram = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    loaded = Loaded(model, tokenizer, plan, device, dtype_name, round(time.monotonic() - t0, 3),
                    round(_peak_rss_mb(), 1), None if vram is None else round(vram, 1))
    ctx.emit("model/load", model_dir=str(model_dir), purpose=purpose, plan=asdict(plan), dtype=dtype_name,
             device=device, load_s=loaded.load_seconds, peak_rss_mb=loaded.peak_rss_mb,
             peak_vram_mb=loaded.peak_vram_mb)
    return loaded
