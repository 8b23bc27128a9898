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
CPU_BNB = {**CPU_ONLY, "bnb_available": True}  # bitsandbytes >= 0.46: NF4 on the CPU
NF4_FITS_RAM = int(RAM_BUDGET / lp.NF4_SIZE_RATIO)  # largest dense model whose NF4 fits the RAM budget

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
    ("cpu-bf16-first-even-with-bnb", RAM_BUDGET, CPU_BNB, "cpu", False),
    ("cpu-4bit-just-over-bf16", RAM_BUDGET + STEP, CPU_BNB, "cpu-4bit", False),
    ("cpu-4bit-at-nf4-budget", NF4_FITS_RAM - STEP, CPU_BNB, "cpu-4bit", False),
    ("cpu-past-nf4-refuses", NF4_FITS_RAM + STEP, CPU_BNB, "refuse", False),
    ("cpu-4bit-beside-tiny-gpu", RAM_BUDGET + STEP, {**CPU_BNB, "cuda_available": True,
                                                      "free_vram_bytes": int(2 * GIB)}, "cpu-4bit", False),
    # A MoE whose fused experts stay 16-bit: its NF4 size barely shrinks, so it streams.
    ("moe-nf4-too-big-streams", RAM_BUDGET + STEP, {**CPU_BNB, "nf4_bytes": RAM_BUDGET + STEP}, "streaming", True),
    ("moe-nf4-fits", RAM_BUDGET + STEP, {**CPU_BNB, "nf4_bytes": RAM_BUDGET}, "cpu-4bit", False),
    # QLoRA: only 4-bit will do, even where bf16 fits.
    ("require-4bit-on-gpu", GIB, {**GPU, "require_4bit": True}, "gpu-4bit", False),
    ("require-4bit-offload", NF4_FITS + STEP, {**GPU, "require_4bit": True}, "gpu-4bit-cpu-offload", False),
    ("require-4bit-on-cpu", GIB, {**CPU_BNB, "require_4bit": True}, "cpu-4bit", False),
    ("require-4bit-cpu-beside-full-gpu", GIB, {**GPU, "free_vram_bytes": int(1.6 * GIB), "require_4bit": True},
     "cpu-4bit", False),
    ("require-4bit-without-bnb", GIB, {**CPU_ONLY, "require_4bit": True}, "refuse", False),
    ("require-4bit-too-big", NF4_FITS_RAM + STEP, {**CPU_BNB, "require_4bit": True}, "refuse", False),
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
    ("streaming", None, {0, "cpu"}), ("cpu", None, {"cpu"}), ("cpu-4bit", "nf4", {"cpu"}),
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
    assert "bitsandbytes cannot quantize here" in plan.reason
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


def test_refusal_on_a_cpu_node_names_the_nf4_size() -> None:
    plan = decide_load_plan(model_bytes=NF4_FITS_RAM + STEP, **CPU_BNB)
    assert f"NF4 would need {(NF4_FITS_RAM + STEP) * lp.NF4_SIZE_RATIO / GIB:.2f} GiB" in plan.reason


def test_a_required_4bit_load_that_fits_nowhere_says_so() -> None:
    plan = decide_load_plan(model_bytes=NF4_FITS_RAM + STEP, **CPU_BNB, require_4bit=True)
    assert plan.reason.startswith("a 4-bit load of the ") and "run it on a larger node" in plan.reason
    no_bnb = decide_load_plan(model_bytes=GIB, **CPU_ONLY, require_4bit=True)
    assert "bitsandbytes cannot quantize on this node" in no_bnb.reason


def test_nf4_size_keeps_experts_routers_embeddings_and_head_at_16_bits(tiny_model) -> None:
    from factory.model_files import check_model_dir

    check = check_model_dir(tiny_model("qwen3_moe"))
    info, family = check.info, check.family
    quantized = [n for n, t in info.tensors.items() if len(t.shape) == 2 and ".self_attn." in n]
    assert quantized and not any(".mlp." in n for n in quantized)  # every Linear of a fused-expert MoE
    q_bytes = sum(2 * info.tensors[n].numel for n in quantized)
    want = info.bytes_at_16bit - q_bytes + q_bytes * lp.NF4_SIZE_RATIO
    assert abs(lp.nf4_size(info, family) - want) <= 1
    dense = check_model_dir(tiny_model("llama"))  # every 2-D weight of its layers is a Linear
    linear = sum(2 * t.numel for n, t in dense.info.tensors.items() if len(t.shape) == 2 and ".layers." in n)
    want = dense.info.bytes_at_16bit - linear + linear * lp.NF4_SIZE_RATIO
    assert abs(lp.nf4_size(dense.info, dense.family) - want) <= 1


@pytest.mark.parametrize(("family", "exact", "quantized"), [
    ("phimoe", ["model.layers.0.mlp.router", "model.layers.1.block_sparse_moe.gate", "lm_head"],
     ["model.layers.0.self_attn.q_proj"]),
    ("qwen3_vl_moe", ["model.language_model.layers.3.mlp.gate", "model.visual.blocks.0.attn.qkv"],
     ["model.language_model.layers.3.mlp.gate_proj", "model.language_model.layers.3.self_attn.o_proj"]),
    ("granitemoe", ["model.layers.2.block_sparse_moe.router.layer"], ["model.layers.2.self_attn.k_proj"]),
])
def test_quant_exact_patterns_as_transformers_reads_them(family: str, exact: list[str], quantized: list[str]) -> None:
    from transformers.quantizers.quantizers_utils import should_convert_module

    from adapters import get_family

    patterns = lp.quant_exact_patterns(get_family(family))
    assert not any(should_convert_module(n, patterns) for n in exact)
    assert all(should_convert_module(n, patterns) for n in quantized)


def test_the_plan_module_stays_torch_free() -> None:
    code = ("import sys; from adapters import families; from factory import load_plan as lp; "
            "[lp.quant_exact_patterns(f) for f in families()]; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
