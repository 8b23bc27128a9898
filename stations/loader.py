"""Executes a load plan (factory/load_plan.py) with transformers, accelerate
and bitsandbytes, and reports what loading cost.

Everything that can refuse a model is checked before any weight is
allocated, and before torch is imported: the same verdict `factory plan`
gives (factory.model_files.check_model_dir: an absurd config, special files,
pickle weights unless the node allows them, a config that disagrees with the
tensors on disk), then whether any strategy fits this node's free memory,
then, for a streaming load that spills to disk, whether the cold tier is
there and has room. `decide` is that whole decision; the part's stations
(`load`) and the package stage's fresh-process reload check
(stations/smoke.py) both act on it, so they load a model the same way.
"""

from __future__ import annotations

import errno
import importlib.util
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.schema import Family
from factory.errors import StageFailed
from factory.load_plan import GIB, LoadPlan, NodeMemory, decide_load_plan, measure_node_memory
from factory.model_files import check_model_dir
from factory.nodeconfig import ForgeSection, NodeConfig
from factory.stages import StageContext
from factory.tiers import cold_tier, offload_dir

# On a CPU, float32 is exact and uses fast kernels on CPUs without bf16
# support; it is chosen when twice the bf16 size still fits what the plan
# allowed for weights.
CPU_FP32_HEADROOM = 2.0
# Module names bitsandbytes must leave unquantised under a 4-bit plan
# (transformers matches them as name suffixes: "mlp.gate" is not "gate_proj").
QUANT_SKIP_MODULES = ("lm_head", "router", "mlp.gate", "block_sparse_moe.gate")


@dataclass(frozen=True)
class LoadDecision:
    """How this node loads one model directory, decided from its files and
    the node's memory before anything is loaded."""

    model_dir: Path
    plan: LoadPlan
    family: Family
    config: dict[str, Any]  # the model's config.json
    model_bytes: int  # weights at 16 bits per parameter (what the plan sized)
    dtype: str  # torch dtype name from_pretrained gets
    device: str  # where inputs go: "cuda:0" or "cpu"

    @property
    def spill_bytes(self) -> int:
        """Weight bytes that fit neither the GPU nor RAM budget of the plan:
        what a streaming load writes to its offload folder."""
        resident = sum(float(v.removesuffix("GiB")) * GIB for v in (self.plan.max_memory or {}).values())
        return max(0, self.model_bytes - int(resident)) if self.plan.offload_folder_needed else 0


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


def decide(model_dir: Path, *, config: NodeConfig, memory: NodeMemory | None = None) -> LoadDecision:
    """The load decision for `model_dir` on this node, or StageFailed.

    `memory` defaults to what the node has free now (GPU included); callers
    that must not import torch, and tests of nodes we cannot build, pass it.
    """
    check = check_model_dir(model_dir, allow_pickle=config.forge.allow_pickle_weights)
    if check.problems:
        more = f" (and {len(check.problems) - 1} more problems)" if len(check.problems) > 1 else ""
        raise StageFailed(f"refusing to load {model_dir}: {check.problems[0]}{more}")
    info = check.info
    mem = memory if memory is not None else measure_node_memory(query_gpu=True)
    bnb = mem.cuda_available and importlib.util.find_spec("bitsandbytes") is not None
    plan = decide_load_plan(model_bytes=info.bytes_at_16bit, free_vram_bytes=mem.free_vram_bytes,
                            free_ram_bytes=mem.free_ram_bytes, has_cold_tier=bool(config.storage.cold),
                            cuda_available=mem.cuda_available, bnb_available=bnb)
    if plan.strategy == "refuse":
        raise StageFailed(f"cannot load {model_dir} on this node: {plan.reason}")
    dtype = plan.dtype or "bfloat16"
    if plan.strategy == "cpu" and plan.model_gib * CPU_FP32_HEADROOM <= plan.free_ram_gib / 2:
        dtype = "float32"
    device = "cuda:0" if 0 in (plan.max_memory or {}) else "cpu"
    return LoadDecision(Path(model_dir), plan, check.family, check.config, info.bytes_at_16bit, dtype, device)


def plan_for(ctx: StageContext, model_dir: Path) -> tuple[LoadPlan, Family, dict]:
    """The load plan for `model_dir` on this node, checked from headers only."""
    decision = decide(model_dir, config=ctx.config)
    return decision.plan, decision.family, decision.config


def offload_folder(decision: LoadDecision, config: NodeConfig, base: str) -> Path:
    """The cold-tier folder a streaming load of part `base` spills to, made
    once the tier is known to exist and to hold the spill above its
    min_free_gb. A missing tier is the node config's fault (StageFailed); a
    full one is the node's state, which passes: OSError ENOSPC, which the
    line treats as "wait for room"."""
    folder = offload_dir(config, base)
    if folder is None:
        raise StageFailed(f"the load plan for {decision.model_dir} offloads to disk, but this node has no cold "
                          "tier; add a [[storage.cold]] tier to factory_node.toml or run the part on a larger node")
    tier = cold_tier(config, 0)
    need = decision.spill_bytes
    if tier.problem is not None:
        raise StageFailed(f"the load plan for {decision.model_dir} offloads {need / GIB:.2f} GiB to the cold tier "
                          f"{tier.key}, but {tier.problem} (or fix {tier.key} in factory_node.toml)")
    if not tier.room_for(need):
        raise OSError(errno.ENOSPC, f"the load plan for {decision.model_dir} offloads {need / GIB:.2f} GiB to the "
                                    f"cold tier {tier.name}, which has {tier.free_gib:.2f} GiB free and keeps "
                                    f"{tier.min_free_gb:g} GiB ({tier.key.removesuffix('.path')}"
                                    ".min_free_gb); free space there", str(tier.path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def from_pretrained_kwargs(decision: LoadDecision, forge: ForgeSection, *,
                           offload: Path | None = None) -> dict[str, Any]:
    """What `from_pretrained` gets for this decision; `offload` is the
    folder of a streaming plan that spills to disk (`offload_folder`)."""
    import torch

    plan = decision.plan
    kwargs: dict[str, Any] = {"dtype": getattr(torch, decision.dtype),
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
            if offload is None:
                raise StageFailed(f"the load plan for {decision.model_dir} offloads to disk, and no offload "
                                  "folder was given")
            kwargs["offload_folder"] = str(offload)
    return kwargs


def load(ctx: StageContext, model_dir: Path, *, with_tokenizer: bool = True, purpose: str = "") -> Loaded:
    """Load `model_dir` as the plan says, emitting a `model/load` event."""
    decision = decide(model_dir, config=ctx.config)  # before torch: a refused model costs nothing
    offload = (offload_folder(decision, ctx.config, ctx.work_dir.name)
               if decision.plan.offload_folder_needed else None)
    import torch
    import transformers

    plan = decision.plan
    t0 = time.monotonic()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    auto = getattr(transformers, decision.family.auto_class)
    model = auto.from_pretrained(model_dir, **from_pretrained_kwargs(decision, ctx.config.forge, offload=offload))
    model.eval()
    tokenizer = (transformers.AutoTokenizer.from_pretrained(
        model_dir, trust_remote_code=ctx.config.forge.trust_remote_code) if with_tokenizer else None)
    vram = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    loaded = Loaded(model, tokenizer, plan, decision.device, decision.dtype, round(time.monotonic() - t0, 3),
                    round(_peak_rss_mb(), 1), None if vram is None else round(vram, 1))
    ctx.emit("model/load", model_dir=str(model_dir), purpose=purpose, plan=asdict(plan), dtype=decision.dtype,
             device=decision.device, load_s=loaded.load_seconds, peak_rss_mb=loaded.peak_rss_mb,
             peak_vram_mb=loaded.peak_vram_mb)
    return loaded
