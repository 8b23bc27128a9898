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
4. Reload check in a fresh process (`python -m stations.quant_bnb DIR`):
   the saved directory goes through this node's load plan as any model
   does, its module types are counted (Linear4bit vs exact) and one forward
   pass on a probe text must give finite, non-uniform logits
   (stations.smoke's verdict). A fresh process proves the artifact stands
   on its files alone, not on state left in this one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from factory.errors import StageFailed, printable
from factory.load_plan import measure_node_memory
from factory.nodeconfig import NodeConfig, load_node_config
from factory.protocol import Layout
from factory.stages import StageContext
from stations.quant import copy_tokenizer

FORMAT = "bnb-nf4"
ARTIFACT_COMPUTE_DTYPE = "bfloat16"  # recorded in the saved quantization_config
RELOAD_TIMEOUT_SECONDS = 1800  # a fresh process loading the NF4 model once
MAX_PROBLEM_CHARS = 1000  # a reload failure quoted into error.json


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
    cmd = [sys.executable, "-m", "stations.quant_bnb", str(out), "--root", str(ctx.layout.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RELOAD_TIMEOUT_SECONDS)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "problems": [f"reload process exited {proc.returncode}: "
                                            f"{printable(proc.stderr[-MAX_PROBLEM_CHARS:], MAX_PROBLEM_CHARS)}"]}
    if not result.get("ok"):
        raise StageFailed(f"the NF4 model saved in {out} does not reload: {'; '.join(result.get('problems', []))}")
    return result


def reload_check(model_dir: Path, *, config: NodeConfig) -> dict:
    """Load a saved NF4 directory through this node's load plan, count its
    module types and probe it (stations.smoke's verdict)."""
    import torch
    import transformers

    from stations.loader import decide, four_bit_layout, instantiate
    from stations.smoke import PROBE, verdict

    decision = decide(model_dir, config=config)
    model = instantiate(decision, config.forge)
    if not getattr(model, "is_loaded_in_4bit", False):
        return {"ok": False, "problems": [f"{model_dir} loads without 4-bit layers: its config.json has no "
                                          "bitsandbytes quantization_config"]}
    layout = four_bit_layout(model)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.forge.trust_remote_code)
    ids = {k: v.to(decision.device) for k, v in tok(PROBE, return_tensors="pt").items()}
    with torch.no_grad():
        logits = model(**ids).logits[0].float()  # (T, V)
    return {**verdict(logits), "device": decision.device, "layout": asdict(layout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stations.quant_bnb")
    parser.add_argument("model_dir")
    parser.add_argument("--root", help="factory root whose factory_node.toml applies")
    args = parser.parse_args(argv)
    try:
        config = load_node_config(Layout(Path(args.root)).node_config) if args.root else NodeConfig()
        result = reload_check(Path(args.model_dir), config=config)
    except Exception as err:  # noqa: BLE001 - any failure to reload is the finding
        result = {"ok": False, "problems": [f"{type(err).__name__}: {printable(str(err), MAX_PROBLEM_CHARS)}"]}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
