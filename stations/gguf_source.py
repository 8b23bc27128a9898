"""Dequantize a GGUF source once into the safetensors checkpoint the rest of
the forge reads (factory.gguf_source says which file and checks it).

transformers' GGUF loader dequantizes the file into an ordinary model; that
model refuses `save_pretrained` while its GGUF quantizer is attached, and
once the quantizer is detached it saves like any other (the weights it holds
are dense). The checkpoint is written in bfloat16, Gemma's and most
released checkpoints' dtype, beside the GGUF's own tokenizer, and
`gguf_source.json` records the file, its sha256 and what made it.

It is made once per GGUF hash, under the source lock, in a hidden tmp
directory that is fsynced and renamed into place: a second part naming the
same bytes (or a retry after a crash) finds it and reuses it, and a crashed
dequantization leaves no half checkpoint under the real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from factory import durable, locks
from factory.errors import StageFailed
from factory.gguf_source import GgufFile, sweep_dead_tmps
from factory.protocol import GGUF_SOURCE_RECORD, Layout

CHECKPOINT_DTYPE = "bfloat16"


def materialize(gguf: GgufFile, layout: Layout) -> tuple[Path, bool]:
    """(the dequantized checkpoint of `gguf`, whether this call made it)."""
    target = gguf.checkpoint(layout)
    if (target / GGUF_SOURCE_RECORD).is_file():
        return target, False
    layout.sources.mkdir(exist_ok=True)
    with locks.held(layout.source_lock(gguf.sha256)):
        if (target / GGUF_SOURCE_RECORD).is_file():  # another part made it while we waited
            return target, False
        sweep_dead_tmps(layout.sources)
        if target.exists():  # no record: not ours to trust (never renamed into place by this code)
            raise StageFailed(f"{target} exists without {GGUF_SOURCE_RECORD}; remove it so the GGUF "
                              f"{gguf.path} can be dequantized there")
        partial = durable.tmp_path_for(target)
        try:
            _dequantize(gguf, partial)
            durable.fsync_tree(partial)
            durable.move(partial, target)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
    return target, True


def _dequantize(gguf: GgufFile, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gguf-source-") as staging:
        # transformers reads the GGUF from a directory; this one holds only
        # a link to it, so nothing else beside the file is ever read.
        name = gguf.path.name
        os.symlink(gguf.path, Path(staging) / name)
        try:
            model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=name,
                                                         dtype=getattr(torch, CHECKPOINT_DTYPE))
            tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=name)
        except Exception as err:  # transformers raises anything on a file it cannot map
            raise StageFailed(f"transformers could not dequantize {gguf.path} ({gguf.architecture}): "
                              f"{type(err).__name__}: {str(err)[:800]}") from err
    model.hf_quantizer = None  # the weights are dense now; the quantizer only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = f"gguf-{gguf.sha256}"
    out.mkdir()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    durable.write_json(out / GGUF_SOURCE_RECORD, {
        "gguf": gguf.path.name, "sha256": gguf.sha256, "architecture": gguf.architecture, "origin": gguf.origin,
        "model_type": model.config.model_type, "dtype": CHECKPOINT_DTYPE,
        "transformers": transformers.__version__, "seconds": round(time.monotonic() - started, 1)})
