"""quant: a quantised copy of the stage's input model.

Formats are catalog data (`factory.catalog.QUANT_FORMATS`): each names its
support probe (in `factory.quant_support`: what the node needs, checked
without torch, so the planner refuses an alloy before it is queued) and the
function here that writes it.

  safetensors | bnb-nf4 | bnb-4bit
      bitsandbytes 4-bit NF4 (double quant, bf16 compute), saved with its
      quantization_config by save_pretrained and reloaded to check that it
      loads and gives finite logits. bitsandbytes quantises on CUDA only:
      a node without a CUDA GPU refuses it.
  gguf
      llama.cpp: `convert_hf_to_gguf.py` (on PATH) writes an f16 GGUF, then
      `llama-quantize` (on PATH) makes each of `quantTypes` (Q4_K_M, Q8_0, ...).
      Refused where either tool is missing.
  mlx, onnx
      Refused with what provides them (no writer here yet).

`run_stage` asks the probe again in the part's child process before it
touches the model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from factory import catalog
from factory.alloy import QuantStage
from factory.durable import write_json
from factory.errors import StageFailed
from factory.quant_support import GGUF_CONVERTER, GGUF_QUANTIZE
from factory.stages import StageContext, StageResult
from stations.base import input_model_dir, model_result, output_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _check_finite(model, device: str) -> float:
    """Reload check: logits of a short sequence must be finite."""
    import torch

    ids = torch.arange(1, 9, device=device).unsqueeze(0) % model.config.get_text_config().vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise StageFailed("the reloaded 4-bit model gives non-finite logits; the quantization is broken")
    return float(logits.float().abs().mean())


def make_bnb4(ctx: StageContext, src: Path, out: Path) -> dict:
    """NF4 with bitsandbytes on GPU 0, saved, then reloaded and checked."""
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    from stations.loader import plan_for

    if not torch.cuda.is_available():
        raise StageFailed("bitsandbytes 4-bit quantization needs a CUDA GPU and torch sees none on this node; "
                          "run this part on a GPU node")
    _plan, family, _config = plan_for(ctx, src)
    auto = getattr(transformers, family.auto_class)
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    model = auto.from_pretrained(src, quantization_config=qconfig, device_map={"": 0}, dtype=torch.bfloat16,
                                 use_safetensors=True, trust_remote_code=ctx.config.forge.trust_remote_code)
    ctx.stop_point()
    model.save_pretrained(out)
    _copy_tokenizer(src, out)
    del model
    torch.cuda.empty_cache()
    reloaded = auto.from_pretrained(out, device_map={"": 0}, use_safetensors=True)
    mean_abs = _check_finite(reloaded, "cuda:0")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"format": "bnb-nf4", "bytes": size, "reload_logits_mean_abs": mean_abs,
            "quantization_config": reloaded.config.quantization_config.to_dict()}


def make_gguf(ctx: StageContext, src: Path, out: Path) -> dict:
    """f16 GGUF with llama.cpp's converter, then one file per quant type.
    Not exercised by the test suite (llama.cpp is not on the test node)."""
    stage = ctx.stage
    assert isinstance(stage, QuantStage)
    types = stage.quant_types
    f16 = out / "model-f16.gguf"
    subprocess.run([sys.executable, shutil.which(GGUF_CONVERTER), str(src), "--outfile", str(f16),
                    "--outtype", "f16"], check=True)
    files = {}
    for i, qtype in enumerate(types):
        ctx.stop_point()
        target = out / f"model-{qtype}.gguf"
        subprocess.run([shutil.which(GGUF_QUANTIZE), str(f16), str(target), qtype], check=True)
        files[qtype] = {"file": target.name, "bytes": target.stat().st_size}
        ctx.progress(i + 1, len(types), "quant types")
    return {"format": "gguf", "files": files}


def run_stage(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, QuantStage)
    # 1. Refuse what this node cannot make, before touching the model.
    problem = catalog.format_problem(stage.format)
    if problem:
        raise StageFailed(f"$.stages[{ctx.index}].format {stage.format!r}: unsupported here: {problem}")
    make = catalog.quant_maker(stage.format)
    # 2. Quantise the input model into this stage's model dir.
    src, out = input_model_dir(ctx), output_model_dir(ctx)
    metrics = make(ctx, src, out)
    # 3. Record the resolved settings beside the output.
    report = ctx.stage_dir / "quant.json"
    write_json(report, {"format": stage.format, "quantTypes": stage.quant_types, "source": str(src), **metrics})
    return model_result(ctx, out, {"quant": metrics}, report)
