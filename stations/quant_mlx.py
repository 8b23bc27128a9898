"""quant, format mlx: mlx-lm's converter, one MLX directory per quantTypes entry.

Each entry ("4bit", "8bit", ...) becomes `out/mlx-<entry>/`: weights packed
by mlx-lm's affine quantizer at that many bits in groups of GROUP_SIZE,
config.json with the `quantization` mlx-lm reads back, and the tokenizer.
The HF tokenizer files are copied into `out` too, because eval scores the
artifact on ids from the same tokenizer as the source (stations/runtime.py).

Two things stand between a transformers-5 checkpoint and mlx-lm's
converter, both handled on a staged copy of the config (the source is
never touched; its weights are linked, not copied):

- transformers 5 nests `rope_theta` (and the scaling) under
  `rope_parameters`; several mlx-lm architectures read only the top-level
  keys and some silently default rope_theta to 10000, which would convert a
  500000-theta Llama 3 into a different model. `_lift_rope` writes them back.
- A key can be spelled several ways (transformers 5 saves Qwen3-MoE's expert
  count as `num_local_experts`; mlx-lm requires `num_experts`). The family
  spec (adapters/families/*.json) already lists every spelling of each key,
  and mlx-lm's ModelArgs lists the ones it reads, so `mlx_config` copies a
  value to each spelling mlx-lm wants and lacks: data on both sides, no
  per-family code.

Every output is then opened by mlx-lm in a fresh interpreter
(`python -m stations.mlx_runtime --check DIR`), which scores a prompt and
generates: non-finite or flat logits fail the stage.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from factory.alloy import QuantStage
from factory.durable import fsync_tree, move, tmp_path_for, write_json
from factory.errors import StageFailed
from factory.model_files import CONFIG_FILE
from factory.quant_support import mlx_architecture, mlx_family_problem
from factory.stages import StageContext
from stations.mlx_runtime import MIN_LOGIT_RANGE
from stations.quant import copy_tokenizer

MLX_BITS = (2, 3, 4, 5, 6, 8)  # widths mlx's affine quantizer packs
QUANT_TYPE = re.compile(r"(\d+)bit")  # "4bit": mlx-community's naming
# The alloy schema has no group-size key, so every output uses mlx-lm's
# affine default (smaller groups: more accurate, more scale bytes). A layer
# whose input width is not a multiple of it stays unquantized; the metrics
# count those.
GROUP_SIZE = 64
QUANT_MODE = "affine"
# The fresh-process check loads the model and generates a few tokens; this
# bounds a hung interpreter, not a slow one (a 30B model loads in minutes).
CHECK_TIMEOUT_S = 3600


def make_mlx(ctx: StageContext, src: Path, out: Path) -> dict:
    """Convert `src` (a transformers safetensors dir) to MLX, one directory
    of `out` per quantTypes entry, each checked by mlx-lm in a fresh process."""
    stage = ctx.stage
    assert isinstance(stage, QuantStage)
    # 1. Read every entry, and whether mlx-lm has the architecture, before converting any.
    bits = [parse_quant_type(ctx.index, j, qt) for j, qt in enumerate(stage.quant_types)]
    for j, quant_type in enumerate(stage.quant_types):
        if quant_type in stage.quant_types[:j]:
            raise StageFailed(f"$.stages[{ctx.index}].quantTypes[{j}] {quant_type!r} is listed twice; "
                              "each entry is one output directory, so list it once")
    config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    problem = mlx_family_problem(str(model_type))
    if problem:
        raise StageFailed(f"{src / CONFIG_FILE} model_type {model_type!r}: {problem}")
    copy_tokenizer(src, out)
    files, checks = [], {}
    # 2. Stage the source with the config mlx-lm reads (a tmp name: the recovery sweep removes a dead one's).
    staged = stage_source(src, tmp_path_for(ctx.stage_dir / "mlx-staging"),
                          mlx_config(config, model_type=str(model_type)))
    try:
        for quant_type, width in zip(stage.quant_types, bits):
            ctx.stop_point()
            # 3. Convert into a hidden name, make it durable, then move it into place.
            name = f"mlx-{quant_type}"
            target = out / name
            convert(staged, target, bits=width)
            # 4. A fresh mlx-lm process must load it and give real logits.
            checks[name] = fresh_check(target)
            files.append({"quant_type": quant_type, "file": name, "bytes": weight_bytes(target), "bits": width,
                          "group_size": GROUP_SIZE, "mode": QUANT_MODE, **packed_counts(target, name),
                          "layer_overrides": layer_overrides(target)})
            ctx.emit("quant/file", format="mlx", quant_type=quant_type, file=name, bytes=files[-1]["bytes"])
    finally:
        shutil.rmtree(staged)  # links and the translated config only
    return {"format": "mlx", "files": files, "eval_file": files[0]["file"], "check": checks}


def parse_quant_type(stage_index: int, entry_index: int, quant_type: str) -> int:
    """The bit width of a quantTypes entry such as "4bit"."""
    match = QUANT_TYPE.fullmatch(quant_type)
    if match is None or int(match.group(1)) not in MLX_BITS:
        raise StageFailed(f"$.stages[{stage_index}].quantTypes[{entry_index}] {quant_type!r}: mlx takes "
                          f"{', '.join(f'{b}bit' for b in MLX_BITS)} (mlx-lm's affine quantization)")
    return int(match.group(1))


def mlx_config(config: dict[str, Any], *, model_type: str) -> dict[str, Any]:
    """`config` (a transformers config.json) as mlx-lm's `model_type`
    architecture reads it: rope lifted, each key under every spelling the
    family spec knows and mlx-lm's ModelArgs asks for, dtype under the
    name mlx-lm's converter casts to."""
    import importlib

    from adapters import family_for_config

    out = json.loads(json.dumps(config))  # a deep copy; the source's dict stays as read
    for scope in (out, out.get("text_config")):
        if isinstance(scope, dict):
            _lift_rope(scope)
            _layer_interval(scope)
    if "torch_dtype" not in out and out.get("dtype"):
        out["torch_dtype"] = out["dtype"]  # transformers 5's spelling; mlx-lm reads the old one
    args = importlib.import_module(f"mlx_lm.models.{mlx_architecture(model_type)}").ModelArgs
    wanted = set(inspect.signature(args).parameters)
    keys = family_for_config(config).config
    for field in type(keys).model_fields:
        spellings = getattr(keys, field)
        if not isinstance(spellings, tuple):
            continue  # text_config: where the keys live, not a key
        present = next((k for k in spellings if out.get(k) is not None), None)
        for spelling in spellings:
            if present is not None and spelling in wanted and out.get(spelling) is None:
                out[spelling] = out[present]
    return out


def _lift_rope(config: dict[str, Any]) -> None:
    """transformers 5's `rope_parameters` back into `rope_theta` and, for a
    scaled rope, `rope_scaling` (the dict mlx-lm's rope reads its type from)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if config.get("rope_theta") is None and rope.get("rope_theta") is not None:
        config["rope_theta"] = rope["rope_theta"]
    if config.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = dict(rope)


def _layer_interval(config: dict[str, Any]) -> None:
    """transformers reads a hybrid model's layer kinds from `layer_types`;
    mlx-lm (Qwen3-Next, Qwen3.5) builds full attention at every
    `full_attention_interval`-th layer and linear attention elsewhere, so
    the interval is set from the layer types, which must follow that pattern."""
    kinds = config.get("layer_types")
    if not isinstance(kinds, list) or "linear_attention" not in kinds:
        return
    full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    interval = full[0] + 1 if full else 0
    if not interval or [i for i in range(len(kinds)) if (i + 1) % interval == 0] != full:
        raise StageFailed(f"config.json layer_types {kinds} is not full attention every n-th layer, the only "
                          "hybrid layout mlx-lm builds; this model cannot be converted to mlx (use gguf)")
    config["full_attention_interval"] = interval


def stage_source(src: Path, staging: Path, config: dict[str, Any]) -> Path:
    """A directory mlx-lm converts from: every file of `src` linked, the
    translated config.json written in place of its own."""
    staging.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != CONFIG_FILE:
            os.symlink(f.resolve(), staging / f.name)
    write_json(staging / CONFIG_FILE, config)
    return staging


def convert(staged: Path, target: Path, *, bits: int) -> None:
    """mlx-lm's converter into `target`: written under a hidden tmp name
    (the recovery sweep removes a dead writer's), fsynced, then moved."""
    from mlx_lm import convert as mlx_convert

    if target.exists():
        shutil.rmtree(target)  # a failed earlier attempt of this stage; a finished stage is never rerun
    partial = tmp_path_for(target)
    try:
        mlx_convert(str(staged), str(partial), quantize=True, q_bits=bits, q_group_size=GROUP_SIZE, q_mode=QUANT_MODE)
    except Exception as err:  # mlx-lm's architectures raise anything on a layout they do not expect
        shutil.rmtree(partial, ignore_errors=True)
        raise StageFailed(f"mlx-lm could not convert {staged} to {bits}-bit MLX: {type(err).__name__}: "
                          f"{str(err)[:1500]}; a missing config key can be added under another spelling in the "
                          "family's adapters/families/<model_type>.json, a weight layout mlx-lm does not "
                          "expect cannot: convert this model to gguf") from err
    fsync_tree(partial)
    move(partial, target)


def fresh_check(target: Path) -> dict[str, Any]:
    """`python -m stations.mlx_runtime --check target` in a new interpreter;
    its JSON, or StageFailed saying what it saw."""
    import stations

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(stations.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "stations.mlx_runtime", "--check", str(target)],
                              capture_output=True, text=True, env=env, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise StageFailed(f"mlx-lm did not load and run {target} within {CHECK_TIMEOUT_S} s") from err
    lines = proc.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise StageFailed(f"mlx-lm could not load {target} in a fresh process (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-2000:]}") from None
    if "error" in report:
        raise StageFailed(f"mlx-lm could not run {target}: {report['error']}")
    if not report["logits_finite"]:
        raise StageFailed(f"{target} gives non-finite logits in mlx-lm; the conversion is broken")
    if not report["logit_range"] > MIN_LOGIT_RANGE:
        raise StageFailed(f"{target} gives flat logits in mlx-lm (range {report['logit_range']:.3g} nats over "
                          f"the vocabulary); the conversion is broken")
    return report


def layer_overrides(target: Path) -> dict[str, dict]:
    """The layers mlx-lm quantized differently from the rest, as its saved
    config records them (its architectures keep e.g. MoE routers at 8 bits)."""
    quantization = json.loads((target / CONFIG_FILE).read_text(encoding="utf-8"))["quantization"]
    return {path: params for path, params in quantization.items() if isinstance(params, dict)}


def weight_bytes(target: Path) -> int:
    return sum(f.stat().st_size for f in target.glob("*.safetensors"))


def packed_counts(target: Path, name: str) -> dict[str, int]:
    """How many weight matrices mlx-lm packed (a `.scales` beside them) and
    how many it left in float (input width not a multiple of the group)."""
    from safetensors import safe_open

    quantized = unquantized = 0
    for f in sorted(target.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            keys = set(st.keys())
            for key in keys:
                if key.endswith(".weight") and len(st.get_slice(key).get_shape()) >= 2:
                    if key[: -len(".weight")] + ".scales" in keys:
                        quantized += 1
                    else:
                        unquantized += 1
    if quantized == 0:
        raise StageFailed(f"mlx-lm packed no weight of {target}: every input width is off its group size "
                          f"{GROUP_SIZE}, so {name} is not quantized at all")
    return {"quantized_tensors": quantized, "unquantized_matrices": unquantized}
