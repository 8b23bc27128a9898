"""How to load a model on this node: a pure decision over measured sizes.

The stations must never discover mid-load that a model does not fit (an
OOM-killed child loses the part's progress and can take the node's other
work with it). So the decision is made up front, from the checkpoint's
measured bytes (``factory.model_files``) and the node's free memory, by one
pure function whose every branch is tested. All sizes in messages and in
``max_memory`` are GiB (2**30 bytes), which is what accelerate parses.

Strategies, tried in order (first that fits wins):

=======================  =====================================================
``gpu-fp16``             whole model in bf16 on the GPU. Fastest, exact.
``gpu-4bit``             NF4 (bitsandbytes) on the GPU. ~0.28x memory;
                         quantization error, fine for profiling/eval.
``gpu-4bit-cpu-offload`` NF4 on the GPU, the overflow kept on the CPU in fp32
                         (bitsandbytes' ``llm_int8_enable_fp32_cpu_offload``).
``cpu``                  bf16 in RAM, no usable GPU. Slowest compute, exact.
``cpu-4bit``             NF4 in RAM, no usable GPU: the model does not fit RAM
                         in bf16 but does as NF4 (bitsandbytes >= 0.46
                         quantizes and multiplies on the CPU). Quantization
                         error, like ``gpu-4bit``; no disk traffic.
``streaming``            bf16 with accelerate ``device_map="auto"`` and
                         ``max_memory``; what fits nowhere goes to an
                         ``offload_folder`` on the cold tier. Slow, exact.
``refuse``               nothing fits; ``reason`` says by how much.
=======================  =====================================================

There is no CPU "4-bit + disk offload": transformers leaves every module it
dispatches to the CPU or disk unquantized in fp32 under bitsandbytes, so
such a plan would hold more bytes than ``streaming`` in bf16, and be inexact.

A stage that trains through a 4-bit base (QLoRA, ``quantizeBits: 4``) asks
with ``require_4bit``: only the 4-bit strategies are tried, on the GPU or,
without a usable one, the CPU.

What NF4 leaves unquantized is sized from the checkpoint (``nf4_bytes``):
bitsandbytes replaces only ``nn.Linear`` layers, and transformers >= 5 holds
a MoE's routed experts as fused ``[E, ...]`` parameters, not Linear layers,
so on a MoE most of the weights stay 16-bit under every 4-bit plan.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:  # both torch-free; imported for annotations only
    from adapters.schema import Family
    from factory.model_files import CheckpointInfo

GIB = 1024**3

# -- thresholds (GiB or ratios); each is a trade-off ---------------------------
VRAM_RESERVE_GIB = 1.5
"""Kept free on the GPU before weights: CUDA context, cuBLAS workspace,
allocator fragmentation. Too low: OOM on first forward; too high: needless
4-bit on cards where bf16 just fits."""

VRAM_ACTIVATION_FRACTION = 0.15
"""Share of the remaining VRAM kept for activations and the eval KV cache
(calibration batches of a few thousand tokens). Larger = safer, more 4-bit."""

RAM_RESERVE_GIB = 4.0
"""Kept free in RAM for the OS, the daemon and safetensors' page cache.
Too low and a CPU load pushes the node into swap or the OOM killer."""

RAM_LOAD_FRACTION = 0.85
"""Share of the remaining RAM weights may fill: loading briefly holds a
shard's worth of extra copies."""

NF4_SIZE_RATIO = 4.5 / 16
"""NF4 bytes / 16-bit bytes. NF4 stores 4 bits per weight plus one absmax per
64-weight block (0.5 bit in fp32; double quantization shrinks it to ~0.13),
while embeddings, norms and lm_head stay 16-bit: 4.5 bits covers both for
models >1B. Overestimates a little, which is the safe side."""

FP32_OFFLOAD_RATIO = 2.0
"""CPU-offloaded modules under bitsandbytes stay unquantized in fp32: twice
their 16-bit size."""

MIN_GPU_WEIGHTS_GIB = 1.0
"""Below this usable VRAM a GPU adds transfer cost without holding enough
weights to pay for it; offloading plans then ignore the GPU."""

STREAMING_MIN_RESIDENT_FRACTION = 0.5
"""Streaming with disk offload needs at least this share of the weights in
VRAM + RAM. Below it every forward pass re-reads most of the model from
disk: hours per calibration pass, so refusing is kinder."""

Strategy = Literal["gpu-fp16", "gpu-4bit", "gpu-4bit-cpu-offload", "cpu", "cpu-4bit", "streaming", "refuse"]
FOUR_BIT_STRATEGIES: frozenset[str] = frozenset({"gpu-4bit", "gpu-4bit-cpu-offload", "cpu-4bit"})


@dataclass(frozen=True)
class LoadPlan:
    strategy: Strategy
    dtype: str | None  # torch dtype name for from_pretrained; None when refused
    quantization: Literal["nf4"] | None
    max_memory: dict[int | str, str] | None  # accelerate's {0: "10.00GiB", "cpu": "30.00GiB"}
    offload_folder_needed: bool  # stream overflow to the cold tier
    reason: str  # one sentence, with the numbers in GiB
    model_gib: float
    free_vram_gib: float | None
    free_ram_gib: float

    @property
    def fits(self) -> bool:
        return self.strategy != "refuse"


class NodeMemory(NamedTuple):
    free_ram_bytes: int
    free_vram_bytes: int | None
    cuda_available: bool


@dataclass(frozen=True)
class _Budget:
    """The numbers every branch reads, in GiB."""

    model: float
    nf4: float
    vram: float  # usable for weights; 0 without CUDA
    ram: float  # usable for weights
    free_vram: float | None
    free_ram: float


def usable_vram_gib(free_vram_bytes: int) -> float:
    """VRAM weights may fill: free minus the fixed reserve, minus the
    activation share of what is left."""
    return max(0.0, free_vram_bytes / GIB - VRAM_RESERVE_GIB) * (1 - VRAM_ACTIVATION_FRACTION)


def usable_ram_gib(free_ram_bytes: int) -> float:
    return max(0.0, free_ram_bytes / GIB - RAM_RESERVE_GIB) * RAM_LOAD_FRACTION


def decide_load_plan(
    *,
    model_bytes: int,
    free_vram_bytes: int | None,
    free_ram_bytes: int,
    has_cold_tier: bool,
    cuda_available: bool,
    bnb_available: bool,
    nf4_bytes: int | None = None,
    require_4bit: bool = False,
) -> LoadPlan:
    """Pick the fastest exact-enough way to load a model, or refuse.

    ``model_bytes`` is the weights' size at 16 bits per parameter
    (``CheckpointInfo.bytes_at_16bit``; equal to ``total_bytes`` for a
    bf16/fp16 checkpoint). ``free_vram_bytes`` is None when unknown.
    ``bnb_available``: bitsandbytes can quantize on this node
    (``factory.quant_support.bnb_problem() is None``). ``nf4_bytes``: the
    weights once loaded as NF4 (``nf4_size``); without it, the whole model
    at ``NF4_SIZE_RATIO``, right for dense models only. ``require_4bit``:
    only a 4-bit strategy will do (QLoRA), whatever else would fit.
    """
    for name, value in (("model_bytes", model_bytes), ("free_ram_bytes", free_ram_bytes),
                        ("free_vram_bytes", free_vram_bytes or 0), ("nf4_bytes", nf4_bytes or 0)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    has_gpu = cuda_available and free_vram_bytes is not None
    b = _Budget(
        model=model_bytes / GIB,
        nf4=(model_bytes * NF4_SIZE_RATIO if nf4_bytes is None else nf4_bytes) / GIB,
        vram=usable_vram_gib(free_vram_bytes) if has_gpu else 0.0,
        ram=usable_ram_gib(free_ram_bytes),
        free_vram=free_vram_bytes / GIB if free_vram_bytes is not None else None,
        free_ram=free_ram_bytes / GIB,
    )
    if require_4bit:
        return _four_bit_only(b, has_gpu, bnb_available)
    if has_gpu:
        plan = _gpu_fp16(b) or (_gpu_4bit(b) or _gpu_4bit_offload(b) if bnb_available else None)
        if plan:
            return plan
    return (_cpu(b, has_gpu) or (_cpu_4bit(b, has_gpu) if bnb_available else None)
            or _streaming(b, has_cold_tier) or _refuse(b, has_gpu, bnb_available, has_cold_tier))


def _four_bit_only(b: _Budget, has_gpu: bool, bnb_available: bool) -> LoadPlan:
    """The first 4-bit strategy that fits; the CPU one even beside a usable
    GPU, since nothing else is allowed."""
    if not bnb_available:
        return _plan(b, "refuse", f"a 4-bit load of the {b.model:.2f} GiB model was requested, but bitsandbytes "
                                  "cannot quantize on this node")
    plan = (_gpu_4bit(b) or _gpu_4bit_offload(b)) if has_gpu else None
    plan = plan or _cpu_4bit(b, has_gpu=False)
    if plan is not None:
        return plan
    gpu = f"{b.vram:.2f} GiB usable VRAM, " if has_gpu else ""
    return _plan(b, "refuse", f"a 4-bit load of the {b.model:.2f} GiB model was requested, and its {b.nf4:.2f} GiB "
                              f"as NF4 fit neither {gpu}{b.ram:.2f} GiB usable RAM; run it on a larger node")


def _plan(b: _Budget, strategy: Strategy, reason: str, *, quantization: Literal["nf4"] | None = None,
          max_memory: dict[int | str, str] | None = None, offload: bool = False) -> LoadPlan:
    return LoadPlan(strategy=strategy, dtype=None if strategy == "refuse" else "bfloat16",
                    quantization=quantization, max_memory=max_memory, offload_folder_needed=offload,
                    reason=reason, model_gib=round(b.model, 2),
                    free_vram_gib=None if b.free_vram is None else round(b.free_vram, 2),
                    free_ram_gib=round(b.free_ram, 2))


def _gib(x: float) -> str:
    """accelerate's max_memory spelling, rounded down so we never overstate."""
    return f"{int(x * 100) / 100:.2f}GiB"


def _gpu_fp16(b: _Budget) -> LoadPlan | None:
    if b.model > b.vram:
        return None
    return _plan(b, "gpu-fp16", f"model {b.model:.2f} GiB in bf16 fits the {b.vram:.2f} GiB of usable VRAM "
                                f"({b.free_vram:.2f} GiB free)", max_memory={0: _gib(b.vram)})


def _gpu_4bit(b: _Budget) -> LoadPlan | None:
    if b.nf4 > b.vram:
        return None
    return _plan(b, "gpu-4bit", f"model {b.model:.2f} GiB exceeds {b.vram:.2f} GiB usable VRAM in bf16, "
                                f"but fits as NF4 ({b.nf4:.2f} GiB)",
                 quantization="nf4", max_memory={0: _gib(b.vram)})


def _gpu_4bit_offload(b: _Budget) -> LoadPlan | None:
    if b.vram < MIN_GPU_WEIGHTS_GIB:
        return None
    spill_fraction = (b.nf4 - b.vram) / b.nf4  # share of layers that land on the CPU
    cpu_need = spill_fraction * b.model * FP32_OFFLOAD_RATIO
    if cpu_need > b.ram:
        return None
    return _plan(b, "gpu-4bit-cpu-offload",
                 f"model {b.model:.2f} GiB is {b.nf4:.2f} GiB as NF4, over {b.vram:.2f} GiB usable VRAM; "
                 f"the other {spill_fraction:.0%} stays on the CPU in fp32 ({cpu_need:.2f} GiB of "
                 f"{b.ram:.2f} GiB usable RAM)",
                 quantization="nf4", max_memory={0: _gib(b.vram), "cpu": _gib(b.ram)})


def _cpu(b: _Budget, has_gpu: bool) -> LoadPlan | None:
    """RAM-only load, for nodes whose GPU (if any) holds too little to help."""
    if b.model > b.ram or (has_gpu and b.vram >= MIN_GPU_WEIGHTS_GIB):
        return None
    gpu = "no usable GPU" if not has_gpu else f"only {b.vram:.2f} GiB usable VRAM"
    return _plan(b, "cpu", f"{gpu}; model {b.model:.2f} GiB in bf16 fits the {b.ram:.2f} GiB of usable RAM",
                 max_memory={"cpu": _gib(b.ram)})


def _cpu_4bit(b: _Budget, has_gpu: bool) -> LoadPlan | None:
    """NF4 in RAM, for nodes whose GPU (if any) holds too little to help."""
    if b.nf4 > b.ram or (has_gpu and b.vram >= MIN_GPU_WEIGHTS_GIB):
        return None
    gpu = "no usable GPU" if not has_gpu else f"only {b.vram:.2f} GiB usable VRAM"
    fit = "exceeds" if b.model > b.ram else "fits"
    return _plan(b, "cpu-4bit", f"{gpu}; model {b.model:.2f} GiB in bf16 {fit} the {b.ram:.2f} GiB of usable "
                                f"RAM, and is {b.nf4:.2f} GiB as NF4",
                 quantization="nf4", max_memory={"cpu": _gib(b.ram)})


def _streaming(b: _Budget, has_cold_tier: bool) -> LoadPlan | None:
    """device_map over GPU + RAM, spilling the rest to disk on the cold tier."""
    gpu = b.vram if b.vram >= MIN_GPU_WEIGHTS_GIB else 0.0
    resident = gpu + b.ram
    needs_disk = b.model > resident
    if needs_disk and (not has_cold_tier or resident < STREAMING_MIN_RESIDENT_FRACTION * b.model):
        return None
    memory: dict[int | str, str] = {0: _gib(gpu)} if gpu else {}
    memory["cpu"] = _gib(b.ram)
    where = f"{gpu:.2f} GiB VRAM + {b.ram:.2f} GiB RAM"
    tail = (f", {b.model - resident:.2f} GiB offloaded to disk on the cold tier" if needs_disk
            else ", no disk offload needed")
    return _plan(b, "streaming", f"model {b.model:.2f} GiB in bf16 streams across {where}{tail}",
                 max_memory=memory, offload=needs_disk)


def _refuse(b: _Budget, has_gpu: bool, bnb_available: bool, has_cold_tier: bool) -> LoadPlan:
    nf4 = (f"NF4 would need {b.nf4:.2f} GiB" if bnb_available
           else "and bitsandbytes cannot quantize here")
    gpu = f"{b.vram:.2f} GiB usable VRAM" if has_gpu else "no usable GPU"
    disk = ("disk offload would leave over half the model on disk" if has_cold_tier
            else "no cold tier for disk offload")
    return _plan(b, "refuse", f"model {b.model:.2f} GiB fits nowhere on this node: {gpu}, "
                              f"{b.ram:.2f} GiB usable RAM ({nf4}), {disk}; run it on a larger node")


def quant_exact_patterns(family: "Family") -> list[str]:
    """What bitsandbytes must leave unquantized in a loaded model of
    ``family``, as transformers' ``llm_int8_skip_modules`` patterns (each a
    regex matched from the start of a module name up to a dot, or a name
    suffix). Routers decide which experts run, so they stay exact: most are
    not ``nn.Linear`` (never quantized), but PhiMoE's router subclasses it
    and older or remote-code MoEs use a bare Linear. Every router tensor the
    family names on disk and its documented place in memory give a pattern
    ("(?:.+\\.)?layers\\.\\d+\\.mlp\\.gate": any prefix, so a VL model's
    ``model.language_model.`` matches too). The output head stays exact as
    transformers' default does (naming any pattern replaces that default),
    and non-text towers too: no compression station changes a tower."""
    from adapters.schema import render

    patterns = {"lm_head"}
    if family.moe is not None:
        modules = [t.rsplit(".", 1)[0] for t in family.moe.router]  # drop ".weight" / ".e_score_correction_bias"
        for module in (*modules, family.moe.router_module_in_memory):
            _, sep, rest = module.partition("layers.${layer}.")
            if sep:
                patterns.add(r"(?:.+\.)?layers\.\d+\." + re.escape(render(rest)))
    patterns.update(re.escape(p.rstrip(".")) for tower in family.towers for p in tower.prefixes)
    return sorted(patterns)


def nf4_size(info: "CheckpointInfo", family: "Family") -> int:
    """Bytes of the checkpoint's weights once loaded as NF4: the 2-D
    ``.weight`` tensors bitsandbytes quantizes at ``NF4_SIZE_RATIO`` of
    their 16-bit size, everything it leaves alone at 16 bits: embeddings,
    the output head, routers, routed experts (fused parameters in memory,
    not Linear layers), non-text towers (see ``quant_exact_patterns``),
    norms and biases."""
    from adapters.schema import template_regex

    exact = [template_regex(t) for t in (family.tensors.embed, family.tensors.lm_head)]
    if family.moe is not None:
        exact += [template_regex(t) for t in (*family.moe.router, *family.moe.experts.tensors)]
    total = 0.0
    for name, meta in info.tensors.items():
        at_16bit = 2 * meta.numel
        quantized = (len(meta.shape) == 2 and name.endswith(".weight") and family.tower_of(name) is None
                     and not any(r.search(name) for r in exact))
        total += at_16bit * NF4_SIZE_RATIO if quantized else at_16bit
    return int(total)


def measure_node_memory(*, query_gpu: bool = False) -> NodeMemory:
    """Free RAM (psutil) and, only when ``query_gpu``, free VRAM.

    The daemon calls this with ``query_gpu=False``: importing torch costs
    seconds and hundreds of MB, and initialising CUDA in the long-lived
    daemon would pin a context on the GPU. A station's child process that
    already uses torch passes ``query_gpu=True``.
    """
    import psutil

    free_ram = psutil.virtual_memory().available
    if not query_gpu or importlib.util.find_spec("torch") is None:
        return NodeMemory(free_ram, None, False)
    import torch

    if not torch.cuda.is_available():
        return NodeMemory(free_ram, None, False)
    free_vram, _total = torch.cuda.mem_get_info()
    return NodeMemory(free_ram, int(free_vram), True)
