"""gguf quant: llama.cpp's converter and quantizer, each file checked by llama.cpp.

1. GGML's converter writes a 16-bit GGUF of the input safetensors model
   (stations.gguf_convert, its own process), in the stage dir: f16, or
   bf16 when the model is bf16 and a bf16 type is asked for.
2. llama.cpp quantizes it once per `quantTypes` entry (Q4_K_M, Q5_K_M,
   Q6_K, Q8_0, ...; F16/BF16 keep the conversion itself), each a process
   (stations.llama_cpp_runtime quantize).
3. Each file is loaded by llama.cpp in a fresh process and run forward: its
   logits must be finite and not uniform, its vocabulary the model's.
4. The intermediate 16-bit file is removed unless a quant type is it.

The artifact directory holds the GGUF files, and the HF config and
tokenizer files of the model they came from: the GGUF embeds its own
tokenizer, and eval tokenizes with the HF one so the source and the GGUF are
scored on the same ids. Tier sizes are reported against the alloy's
`tiers.<type>.fitsVramGb` (stations.quant).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from factory.alloy import QuantStage
from factory.errors import StageFailed
from factory.model_files import CONFIG_FILE
from factory.stages import StageContext
from stations.quant import copy_tokenizer

SIXTEEN_BIT = {"F16": "f16", "BF16": "bf16"}  # quant types that are the conversion itself
# Converting a large checkpoint or quantizing 30B parameters on a few cores
# takes a while; a hung tool is still caught.
TOOL_TIMEOUT_S = 6 * 3600


# llama.cpp's log lines that say why it refused a file.
_LLAMA_ERROR = re.compile(r"error|GGML_ASSERT|failed to", re.I)


def _run(ctx: StageContext, what: str, argv: list[str]) -> dict:
    """Run a tool process; its last stdout line is JSON when it prints one."""
    try:
        # GGML_NO_BACKTRACE: a failed GGML assertion prints its message and
        # aborts, instead of attaching gdb to itself first.
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    except subprocess.TimeoutExpired as err:
        raise StageFailed(f"{what} did not finish in {TOOL_TIMEOUT_S} s") from err
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode != 0:
        died = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        said = [line.strip() for line in proc.stderr.splitlines() if _LLAMA_ERROR.search(line)][-3:]
        detail = "; ".join([*(result.get("problems") or []), *said]) or proc.stderr.strip()[-800:]
        hint = (" (SIGILL: this llama.cpp build uses CPU instructions this machine does not run; reinstall it "
                "with bootstrap/format-tools.sh)" if proc.returncode == -4 else "")
        raise StageFailed(f"{what} failed ({died}){hint}: {detail}")
    return result


def _sixteen_bit(types: list[str]) -> str:
    """The conversion's type: bf16 when that is the 16-bit type asked for."""
    return "bf16" if "BF16" in types and "F16" not in types else "f16"


def make_gguf(ctx: StageContext, src: Path, out: Path) -> dict:
    """Every quant type of the stage as a checked GGUF file in `out`."""
    stage = ctx.stage
    assert isinstance(stage, QuantStage)
    types = [t.upper() for t in stage.quant_types]
    outtype = _sixteen_bit(types)
    base = ctx.stage_dir / f"model-{outtype}.gguf"
    steps = len(types) * 2 + 1
    # 1. the 16-bit conversion
    if not base.exists():
        tmp = base.with_name(base.name + ".tmp")
        _run(ctx, "llama.cpp's converter", [sys.executable, "-m", "stations.gguf_convert", str(src), str(tmp),
                                            "--outtype", outtype])
        tmp.replace(base)
    ctx.progress(1, steps, "steps")
    # 2. one file per quant type
    vocab = json.loads((src / CONFIG_FILE).read_text()).get("vocab_size")
    files = []
    for i, qtype in enumerate(types):
        ctx.stop_point()
        target = out / f"model-{qtype}.gguf"
        if qtype in SIXTEEN_BIT:
            if SIXTEEN_BIT[qtype] != outtype:
                raise StageFailed(f"$.stages[{ctx.index}].quantTypes: {qtype} with "
                                  f"{'F16' if outtype == 'bf16' else 'BF16'} in one stage needs two conversions; "
                                  "list one 16-bit type per quant stage")
            shutil.copy2(base, target)
        else:
            tmp = target.with_name(target.name + ".tmp")
            _run(ctx, f"llama.cpp's quantizer ({qtype})",
                 [sys.executable, "-m", "stations.llama_cpp_runtime", "quantize", str(base), str(tmp), qtype])
            tmp.replace(target)
        ctx.progress(2 + 2 * i, steps, "steps")
        # 3. llama.cpp loads it and runs it forward, in a fresh process
        argv = [sys.executable, "-m", "stations.llama_cpp_runtime", "check", str(target)]
        if isinstance(vocab, int):
            argv += ["--vocab", str(vocab)]
        checked = _run(ctx, f"llama.cpp loading {target.name}", argv)
        size = target.stat().st_size
        files.append({"quant_type": qtype, "file": target.name, "bytes": size, "check": checked})
        ctx.emit("quant/file", format="gguf", quant_type=qtype, file=target.name, bytes=size)
        ctx.progress(3 + 2 * i, steps, "steps")
    # 4. what a reader needs beside the files; the intermediate goes
    copy_tokenizer(src, out)
    shutil.copy2(src / CONFIG_FILE, out / CONFIG_FILE)
    base.unlink()
    return {"format": "gguf", "converted_from": outtype, "files": files, "eval_file": files[0]["file"],
            "architecture": files[0]["check"].get("architecture")}
