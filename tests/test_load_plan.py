"""decide_load_plan: every branch and its boundaries, table-driven.

Sizes are built from the module's own budget functions so a boundary case
sits exactly on (or one step past) the threshold whatever the constants are.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from factory import load_plan as lp
from factory.load_plan import GIB, decide_load_plan, measure_node_memory

VRAM = 80 * GIB
RAM = 128 * GIB
VRAM_BUDGET = int(lp.usable_vram_gib(VRAM) * GIB)  # bytes weights may fill on the GPU
RAM_BUDGET = int(lp.usable_ram_gib(RAM) * GIB)
NF4_FITS = int(VRAM_BUDGET / lp.NF4_SIZE_RATIO)  # largest model whose NF4 fits VRAM
STEP = GIB // 100  # one step past a boundary (0.01 GiB)


def _offload_limit() -> int:
    """Largest model whose NF4 spill, kept in fp32 on the CPU, fits the RAM budget."""
    # spill = (m*r - v)/(m*r); cpu = spill*m*2  =>  m = (cpu/2 + v/r)
    return int((RAM_BUDGET / lp.FP32_OFFLOAD_RATIO + VRAM_BUDGET / lp.NF4_SIZE_RATIO))


def _stream_disk_limit(resident: int) -> int:
    return int(resident / lp.STREAMING_MIN_RESIDENT_FRACTION)


GPU = dict(free_vram_bytes=VRAM, free_ram_bytes=RAM, has_cold_tier=True, cuda_available=True, bnb_available=True)
CPU_ONLY = dict(free_vram_bytes=None, free_ram_bytes=RAM, has_cold_tier=True, cuda_available=False, bnb_available=False)

CASES = [
    # (id, model_bytes, node overrides, strategy, offload_folder_needed)
    ("fp16-small", 1 * GIB, GPU, "gpu-fp16", False),
    ("fp16-exactly-at-budget", VRAM_BUDGET, GPU, "gpu-fp16", False),
    ("4bit-just-over-fp16", VRAM_BUDGET + STEP, GPU, "gpu-4bit", False),
    ("4bit-exactly-at-budget", NF4_FITS - STEP, GPU, "gpu-4bit", False),
    ("offload-just-over-4bit", NF4_FITS + STEP, GPU, "gpu-4bit-cpu-offload", False),
    ("offload-at-ram-limit", _offload_limit() - STEP, GPU, "gpu-4bit-cpu-offload", False),
    ("stream-past-offload", _offload_limit() + STEP, GPU, "streaming", True),
    ("no-bnb-streams-gpu-ram", VRAM_BUDGET + STEP, {**GPU, "bnb_available": False}, "streaming", False),
    ("no-bnb-stream-disk", VRAM_BUDGET + RAM_BUDGET + STEP, {**GPU, "bnb_available": False}, "streaming", True),
    ("stream-disk-at-resident-limit", _stream_disk_limit(VRAM_BUDGET + RAM_BUDGET) - STEP,
     {**GPU, "bnb_available": False}, "streaming", True),
    ("refuse-past-resident-limit", _stream_disk_limit(VRAM_BUDGET + RAM_BUDGET) + STEP,
     {**GPU, "bnb_available": False}, "refuse", False),
    ("refuse-no-cold-tier", VRAM_BUDGET + RAM_BUDGET + STEP,
     {**GPU, "bnb_available": False, "has_cold_tier": False}, "refuse", False),
    ("tiny-gpu-fp16-still-fits", GIB // 4, {**GPU, "free_vram_bytes": int(2 * GIB)}, "gpu-fp16", False),
    ("tiny-gpu-ignored-for-cpu", 10 * GIB, {**GPU, "free_vram_bytes": int(2 * GIB)}, "cpu", False),
    ("cuda-but-vram-unknown", 10 * GIB, {**GPU, "free_vram_bytes": None}, "cpu", False),
    ("cpu-exactly-at-budget", RAM_BUDGET, CPU_ONLY, "cpu", False),
    ("cpu-over-streams-to-disk", RAM_BUDGET + STEP, CPU_ONLY, "streaming", True),
    ("cpu-over-no-cold-tier", RAM_BUDGET + STEP, {**CPU_ONLY, "has_cold_tier": False}, "refuse", False),
    ("cpu-refuse-past-resident", _stream_disk_limit(RAM_BUDGET) + STEP, CPU_ONLY, "refuse", False),
    ("no-ram-at-all", GIB, {**CPU_ONLY, "free_ram_bytes": 0}, "refuse", False),
]


@pytest.mark.parametrize(("model_bytes", "node", "strategy", "offload"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_strategy_table(model_bytes: int, node: dict, strategy: str, offload: bool) -> None:
    plan = decide_load_plan(model_bytes=model_bytes, **node)
    assert plan.strategy == strategy, plan.reason
    assert plan.offload_folder_needed is offload
    assert plan.fits is (strategy != "refuse")
    assert plan.model_gib == round(model_bytes / GIB, 2)
    assert f"{model_bytes / GIB:.2f} GiB" in plan.reason


@pytest.mark.parametrize(("strategy", "quant", "devices"), [
    ("gpu-fp16", None, {0}), ("gpu-4bit", "nf4", {0}), ("gpu-4bit-cpu-offload", "nf4", {0, "cpu"}),
    ("streaming", None, {0, "cpu"}), ("cpu", None, {"cpu"}),
])
def test_plan_fields_per_strategy(strategy: str, quant: str | None, devices: set) -> None:
    model_bytes, node = next((c[1], c[2]) for c in CASES if c[3] == strategy)
    if strategy == "streaming":
        model_bytes, node = VRAM_BUDGET + STEP, {**GPU, "bnb_available": False}
    plan = decide_load_plan(model_bytes=model_bytes, **node)
    assert plan.strategy == strategy
    assert plan.quantization == quant
    assert plan.dtype == "bfloat16"
    assert set(plan.max_memory) == devices


def test_max_memory_is_what_accelerate_parses() -> None:
    from accelerate.utils import convert_file_size_to_int

    plan = decide_load_plan(model_bytes=NF4_FITS + STEP, **GPU)
    parsed = {k: convert_file_size_to_int(v) for k, v in plan.max_memory.items()}
    assert parsed[0] <= VRAM_BUDGET and parsed[0] > VRAM_BUDGET - GIB // 50
    assert parsed["cpu"] <= RAM_BUDGET


def test_refusal_names_the_numbers() -> None:
    plan = decide_load_plan(model_bytes=1000 * GIB, **{**GPU, "bnb_available": False, "has_cold_tier": False})
    assert plan.strategy == "refuse" and plan.dtype is None and plan.max_memory is None
    assert "1000.00 GiB" in plan.reason
    assert "bitsandbytes is not installed" in plan.reason
    assert "no cold tier" in plan.reason
    assert plan.free_vram_gib == 80.0 and plan.free_ram_gib == 128.0


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="model_bytes must be >= 0"):
        decide_load_plan(model_bytes=-1, **GPU)


def test_four_bit_estimate_is_documented_ratio() -> None:
    assert lp.NF4_SIZE_RATIO == pytest.approx(4.5 / 16)


def test_measure_node_memory_without_gpu_query_never_imports_torch() -> None:
    code = ("import sys; from factory.load_plan import measure_node_memory as m; r = m(); "
            "assert r.free_ram_bytes > 0 and r.free_vram_bytes is None and r.cuda_available is False; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_measure_node_memory_with_gpu_query() -> None:
    mem = measure_node_memory(query_gpu=True)
    assert mem.free_ram_bytes > 0
    import torch

    assert mem.cuda_available is torch.cuda.is_available()
    assert (mem.free_vram_bytes is None) is (not mem.cuda_available)
