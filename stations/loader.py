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
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.schema import Family
from factory.errors import StageFailed
from factory.load_plan import (GIB, LoadPlan, NodeMemory, decide_load_plan,
                               measure_node_memory, nf4_size, quant_exact_patterns)
from factory.model_files import check_model_dir
from factory.nodeconfig import ForgeSection, NodeConfig
from factory.quant_support import bnb_problem
from factory.stages import StageContext
from factory.tiers import cold_tier, offload_dir

# NF4 layers on the CPU dequantize to this dtype before multiplying: float32
# is exact on every CPU, and the packed AVX512-BF16 kernel, where a CPU has
# it, computes in bf16 whatever this says.
CPU_COMPUTE_DTYPE = "float32"
# On a CPU, float32 is exact and uses fast kernels on CPUs without bf16
# support; it is chosen when twice the bf16 size still fits what the plan
# allowed for weights.
CPU_FP32_HEADROOM = 2.0
# bitsandbytes' fast CPU kernel (AVX512-BF16, inference only) first repacks
# a Linear4bit's weight in blocks of this many output rows, each row whole
# quantization blocks, and fails an assertion on a layer that does not split
# so (bitsandbytes 0.50: functional._convert_weight_packed_for_cpu). Such
# layers (tiny models; odd widths) take its generic dequantize-and-matmul
# path instead, which is the same arithmetic.
CPU_PACK_ROWS = 32


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
    """A model ready to measure: a transformers model (`model`), or a
    quantized artifact another runtime runs (`runtime`, a
    stations.runtime.Runtime; then `model` is None and `plan` is None)."""

    model: Any
    tokenizer: Any | None
    plan: LoadPlan | None
    device: str  # where inputs go: "cuda:0" or "cpu"
    dtype: str
    load_seconds: float
    peak_rss_mb: float
    peak_vram_mb: float | None
    runtime: Any | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def decide(model_dir: Path, *, config: NodeConfig, memory: NodeMemory | None = None,
           require_4bit: bool = False) -> LoadDecision:
    """The load decision for `model_dir` on this node, or StageFailed.

    `memory` defaults to what the node has free now (GPU included); callers
    that must not import torch, and tests of nodes we cannot build, pass it.
    `require_4bit`: only an NF4 load will do (QLoRA trains through one).
    """
    check = check_model_dir(model_dir, allow_pickle=config.forge.allow_pickle_weights)
    if check.problems:
        more = f" (and {len(check.problems) - 1} more problems)" if len(check.problems) > 1 else ""
        raise StageFailed(f"refusing to load {model_dir}: {check.problems[0]}{more}")
    info = check.info
    mem = memory if memory is not None else measure_node_memory(query_gpu=True)
    plan = decide_load_plan(model_bytes=info.bytes_at_16bit, free_vram_bytes=mem.free_vram_bytes,
                            free_ram_bytes=mem.free_ram_bytes, has_cold_tier=bool(config.storage.cold),
                            cuda_available=mem.cuda_available, bnb_available=bnb_problem() is None,
                            nf4_bytes=nf4_size(info, check.family), require_4bit=require_4bit)
    if plan.strategy == "refuse":
        why = f"; {bnb_problem()}" if require_4bit and bnb_problem() else ""
        raise StageFailed(f"cannot load {model_dir} on this node: {plan.reason}{why}")
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
        kwargs["quantization_config"] = nf4_config(decision.family, compute_dtype="bfloat16",
                                                   cpu_offload=plan.strategy == "gpu-4bit-cpu-offload")
        kwargs["device_map"] = "auto" if plan.max_memory else {"": 0}
        if plan.max_memory:
            kwargs["max_memory"] = plan.max_memory
    elif plan.strategy == "cpu-4bit":
        kwargs["quantization_config"] = nf4_config(decision.family, compute_dtype=CPU_COMPUTE_DTYPE)
        kwargs["device_map"] = {"": "cpu"}
    elif plan.strategy == "streaming":
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = plan.max_memory
        if plan.offload_folder_needed:
            if offload is None:
                raise StageFailed(f"the load plan for {decision.model_dir} offloads to disk, and no offload "
                                  "folder was given")
            kwargs["offload_folder"] = str(offload)
    return kwargs


def nf4_config(family: Family, *, compute_dtype: str, cpu_offload: bool = False):
    """bitsandbytes NF4 with double quantization (the absmax of every
    64-weight block quantized again: ~0.37 bit per weight saved), leaving
    the family's routers, output head and towers exact
    (factory.load_plan.quant_exact_patterns)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              llm_int8_skip_modules=quant_exact_patterns(family),
                              llm_int8_enable_fp32_cpu_offload=cpu_offload)


def fit_cpu_kernels(model, *, training: bool = False) -> int:
    """Route each CPU Linear4bit whose shape bitsandbytes' packed CPU kernel
    cannot take (see CPU_PACK_ROWS) to its generic path, or every one when
    the model will be `training`: the packed kernel has no backward
    (bitsandbytes 0.50 registers no autograd for it), and once an eval-mode
    forward has repacked a weight, every later call goes through it, so
    gradients would silently stop at that layer. Returns how many."""
    import bitsandbytes as bnb

    rerouted = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        state = module.weight.quant_state
        if training or module.out_features % CPU_PACK_ROWS or module.in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False
            rerouted += 1
    return rerouted


@dataclass(frozen=True)
class FourBitLayout:
    """Which layers of a loaded model bitsandbytes quantized, and which it
    left exact: what a 4-bit load or an NF4 artifact must show."""

    quantized: int  # Linear4bit modules
    quantized_params: int  # weights they hold (numel before packing)
    exact_linear: tuple[str, ...]  # nn.Linear (or subclass) modules left unquantized
    routers: dict[str, str]  # router module name -> class name
    total_params: int  # every weight, each Linear4bit counted unpacked

    @property
    def quantized_fraction(self) -> float:
        return self.quantized_params / self.total_params if self.total_params else 0.0


def four_bit_layout(model) -> FourBitLayout:
    """The FourBitLayout of a loaded model, or StageFailed when a router or
    the output head came out quantized (they must stay exact)."""
    import bitsandbytes as bnb
    import torch

    from adapters.registry import discover_routers

    names = {id(m): n for n, m in model.named_modules()}
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    exact = tuple(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit))
    routers = {names[id(r)]: type(r).__name__ for r in discover_routers(model).values()}
    quantized_params = sum(m.in_features * m.out_features for m in four_bit.values())
    packed = sum(m.weight.numel() for m in four_bit.values())
    bad = [n for n in routers if n in four_bit] + [n for n in four_bit if n.rsplit(".", 1)[-1] == "lm_head"]
    if bad:
        raise StageFailed(f"bitsandbytes quantized {bad[:3]}, which must stay exact (routers, the output head); "
                          "add their names to the family's moe.router in adapters/families/")
    total = sum(p.numel() for p in model.parameters()) - packed + quantized_params
    return FourBitLayout(len(four_bit), quantized_params, exact, routers, total)


def instantiate(decision: LoadDecision, forge: ForgeSection, *, offload: Path | None = None):
    """`from_pretrained` as the decision says, in eval mode; a 4-bit model
    (planned, or a saved NF4 checkpoint) is checked and fitted to the CPU
    kernels. Every model this factory loads goes through here."""
    import transformers

    auto = getattr(transformers, decision.family.auto_class)
    model = auto.from_pretrained(decision.model_dir, **from_pretrained_kwargs(decision, forge, offload=offload))
    model.eval()
    if getattr(model, "is_loaded_in_4bit", False):
        four_bit_layout(model)
        fit_cpu_kernels(model)
    return model


def load(ctx: StageContext, model_dir: Path, *, with_tokenizer: bool = True, purpose: str = "",
         require_4bit: bool = False) -> Loaded:
    """Load `model_dir` as the plan says, emitting a `model/load` event;
    `require_4bit`: as NF4 whatever else would fit (QLoRA)."""
    # Before torch: a refused model costs nothing.
    decision = decide(model_dir, config=ctx.config, require_4bit=require_4bit)
    offload = (offload_folder(decision, ctx.config, ctx.work_dir.name)
               if decision.plan.offload_folder_needed else None)
    import torch
    import transformers

    plan = decision.plan
    t0 = time.monotonic()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = instantiate(decision, ctx.config.forge, offload=offload)
    tokenizer = (transformers.AutoTokenizer.from_pretrained(
        model_dir, trust_remote_code=ctx.config.forge.trust_remote_code) if with_tokenizer else None)
    vram = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    loaded = Loaded(model, tokenizer, plan, decision.device, decision.dtype, round(time.monotonic() - t0, 3),
                    round(peak_rss_mb(), 1), None if vram is None else round(vram, 1))
    ctx.emit("model/load", model_dir=str(model_dir), purpose=purpose, plan=asdict(plan), dtype=decision.dtype,
             device=decision.device, load_s=loaded.load_seconds, peak_rss_mb=loaded.peak_rss_mb,
             peak_vram_mb=loaded.peak_vram_mb)
    return loaded
