"""bnb-nf4 / bnb-4bit / safetensors quant: bitsandbytes NF4, saved, then
reloaded in a fresh process.

1. Where: the 4-bit load plan (stations.loader `decide`, `require_4bit`):
   GPU 0 when the NF4 model fits there, else the CPU (bitsandbytes >= 0.46
   quantizes on the CPU too); a plan that would leave the GPU's overflow
   unquantized in fp32 is replaced by the CPU one, since the artifact must
   be NF4 throughout.
2. Quantize while loading: NF4 with double quantization; the family's
   routers, the output head and non-text towers stay exact
   (factory.load_plan.quant_exact_patterns), and so do a MoE's routed
   experts, which transformers >= 5 holds as fused parameters that
   bitsandbytes does not quantize. Unquantized tensors keep the
   checkpoint's own dtype (`dtype="auto"`), so what stays exact is
   bit-identical to the input. The compute dtype recorded in the artifact
   is bf16 wherever it was made: a reader on a GPU gets its fast path.
3. `save_pretrained` (weights + quantization_config) and the tokenizer.
4. Reload check in a fresh process (stations.smoke, as the package stage
   reloads a model): the saved directory goes through this node's load plan
   as any model does, its module types are counted (Linear4bit vs exact)
   and one forward pass on a probe text must give finite, non-uniform
   logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from factory.errors import StageFailed
from factory.load_plan import measure_node_memory
from factory.nodeconfig import NodeConfig
from factory.stages import StageContext
from stations.quant import copy_tokenizer

FORMAT = "bnb-nf4"
ARTIFACT_COMPUTE_DTYPE = "bfloat16"  # recorded in the saved quantization_config


def make_bnb4(ctx: StageContext, src: Path, out: Path) -> dict:
    """Quantize `src` to NF4 into `out` and prove it reloads; the metrics
    say where it was made, its size and what stayed exact."""
    decision = quant_decision(src, ctx.config)
    layout = quantize_nf4(decision, ctx.config, out, stop_point=ctx.stop_point)
    reload = _reload_in_fresh_process(ctx, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"format": FORMAT, "bytes": size, "madeOn": decision.device, "loadPlan": decision.plan.strategy,
            "quantization_config": json.loads((out / "config.json").read_text())["quantization_config"],
            "quantizedModules": layout.quantized, "quantizedParams": layout.quantized_params,
            "quantizedFraction": round(layout.quantized_fraction, 6), "exactLinear": list(layout.exact_linear),
            "routers": layout.routers, "reload": reload}


def quant_decision(src: Path, config: NodeConfig):
    """Step 1: the 4-bit plan the quantization runs under (a LoadDecision)."""
    from stations.loader import decide

    decision = decide(src, config=config, require_4bit=True)
    if decision.plan.strategy == "gpu-4bit-cpu-offload":
        decision = decide(src, config=config, require_4bit=True, memory=measure_node_memory(query_gpu=False))
    return decision


def quantize_nf4(decision, config: NodeConfig, out: Path, *, stop_point: Callable[[], None] = lambda: None):
    """Steps 2-3: load through bitsandbytes, check what stayed exact, save
    to `out` with the tokenizer; returns the stations.loader.FourBitLayout."""
    import torch
    import transformers

    from stations.loader import four_bit_layout, from_pretrained_kwargs, nf4_config

    kwargs = {**from_pretrained_kwargs(decision, config.forge), "dtype": "auto",
              "quantization_config": nf4_config(decision.family, compute_dtype=ARTIFACT_COMPUTE_DTYPE)}
    model = getattr(transformers, decision.family.auto_class).from_pretrained(decision.model_dir, **kwargs).eval()
    layout = four_bit_layout(model)
    if layout.quantized == 0:
        raise StageFailed(f"bitsandbytes found no linear layer to quantize in {decision.model_dir}; NF4 cannot "
                          "shrink this model, so drop the quant stage or pick another format")
    stop_point()
    model.save_pretrained(out)
    copy_tokenizer(decision.model_dir, out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return layout


def _reload_in_fresh_process(ctx: StageContext, out: Path) -> dict:
    from stations.smoke import run_fresh

    result = run_fresh(out, root=ctx.layout.root)
    if result.get("ok") and "layout" not in result:
        result = {"ok": False, "problems": [f"{out} loads without 4-bit layers: its config.json has no "
                                            "bitsandbytes quantization_config"]}
    if not result.get("ok"):
        raise StageFailed(f"the NF4 model saved in {out} does not reload: {'; '.join(result.get('problems', []))}")
    return result
