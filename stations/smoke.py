"""The manifest-to-live-model check, run in a fresh process:

    python -m stations.smoke MODEL_DIR [--root ROOT] [--base BASE]

Loads the directory with stock `from_pretrained` the way this node's load
plan says (stations/loader.py `decide`: the same checks, strategy, dtype and
device a part's stations would use, so a 19B model is reloaded in bf16 or
streamed, never blindly in fp32 on the CPU, and a model that fits nowhere is
refused, not OOM-killed), runs one forward pass on a probe text and prints
one JSON line. `--root` reads that root's factory_node.toml (its cold tier,
pickle and remote-code settings; without it the defaults apply, which never
offload to disk); `--base` names the part whose offload folder a streaming
load may spill into.

A saved model passes when its logits are finite, its best next-token
log-probability is above MIN_MAX_LOGPROB (a model that puts no token above
e^-20 has garbage weights) and its distribution is not uniform (a zeroed or
collapsed head gives the same logit everywhere).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from factory.errors import StageFailed, printable
from factory.load_plan import NodeMemory
from factory.nodeconfig import NodeConfig, load_node_config
from factory.protocol import Layout

# A reload failure's text goes into error.json through the package stage:
# short and printable (it may quote a hostile checkpoint).
MAX_PROBLEM_CHARS = 1000

PROBE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
MIN_MAX_LOGPROB = -20.0
# Loading even a large model for one forward pass on CPU stays well inside this.
FRESH_TIMEOUT_SECONDS = 1800
# Entropy below log(V) minus this margin (nats) counts as "not uniform".
UNIFORM_MARGIN_NATS = 1e-3


def check(model_dir: str | Path, *, config: NodeConfig | None = None, base: str | None = None,
          memory: NodeMemory | None = None) -> dict:
    """Reload `model_dir` as the load plan says and probe it. Raises
    StageFailed when the plan refuses the model (before loading anything).
    `memory` defaults to the node's free memory now."""
    from stations.loader import decide, four_bit_layout, instantiate, offload_folder

    config = config or NodeConfig()
    decision = decide(Path(model_dir), config=config, memory=memory)
    offload = None
    if decision.plan.offload_folder_needed:
        if base is None:
            raise StageFailed(f"the load plan for {model_dir} streams part of it from disk, and no part base "
                              "names its offload folder; pass --base")
        offload = offload_folder(decision, config, base)
    import torch
    import transformers

    model = instantiate(decision, config.forge, offload=offload)
    layout = four_bit_layout(model) if getattr(model, "is_loaded_in_4bit", False) else None
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.forge.trust_remote_code)
    ids = {k: v.to(decision.device) for k, v in tok(PROBE, return_tensors="pt").items()}
    with torch.no_grad():
        logits = model(**ids).logits[0].float()  # (T, V)
    result = verdict(logits)
    result["load"] = {"strategy": decision.plan.strategy, "dtype": decision.dtype, "device": decision.device,
                      "reason": decision.plan.reason}
    if layout is not None:  # a saved NF4 model: what is quantized and what stayed exact
        result["layout"] = asdict(layout)
    return result


def run_fresh(model_dir: Path, *, root: Path, base: str | None = None, fmt: str | None = None,
              timeout: float = FRESH_TIMEOUT_SECONDS) -> dict:
    """`check` (or `check_artifact` for a gguf/mlx `fmt`) in a fresh
    process: a model must stand on its files alone, not on state left in
    the process that wrote it. Returns the verdict; a crash is one too."""
    argv = [sys.executable, "-m", "stations.smoke", str(model_dir), "--root", str(root)]
    argv += ["--base", base] if base else []
    argv += ["--format", fmt] if fmt else []
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "problems": [f"the reload process exited {proc.returncode}: "
                                          f"{printable(proc.stderr[-MAX_PROBLEM_CHARS:], MAX_PROBLEM_CHARS)}"]}


def check_artifact(path: str | Path, fmt: str) -> dict:
    """Load a packaged quantized artifact with its format's own runtime
    (factory.catalog.QUANT_FORMATS reader) and probe it the same way: every
    .gguf file of a gguf package, the directory of an mlx one. The HF
    tokenizer packaged beside it tokenizes the probe."""
    import torch
    import transformers

    from factory import catalog

    path = Path(path)
    reader = catalog.QUANT_FORMATS[fmt].reader
    if reader is None:
        raise StageFailed(f"quant format {fmt!r} has no runtime here; transformers loads it (drop --format)")
    targets = sorted(path.glob("*.gguf")) if fmt == "gguf" else [path]
    if not targets:
        raise StageFailed(f"{path} holds no {fmt} model to load")
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    ids = tok(PROBE)["input_ids"]
    results = {}
    for target in targets:
        runtime = catalog.resolve(reader)(target)
        try:
            result = verdict(torch.from_numpy(runtime.logits(ids)).float())
            result["runtime"] = runtime.name
        finally:
            runtime.close()
        results[target.name] = result
    problems = [f"{name}: {p}" for name, r in results.items() for p in r["problems"]]
    return {"ok": not problems, "problems": problems, "files": results}


def verdict(logits) -> dict:
    """The probe's numbers and problems from its (T, V) float logits."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (T,)
    vocab = logits.shape[-1]
    result = {
        "tokens": int(logits.shape[0]),
        "vocab": int(vocab),
        "finite": bool(torch.isfinite(logits).all()),
        "max_logprob": float(logprobs[-1].max()),
        "mean_entropy": float(entropy.mean()),
        "uniform_entropy": math.log(vocab),
    }
    problems = []
    if not result["finite"]:
        problems.append("logits are not finite")
    if not result["max_logprob"] > MIN_MAX_LOGPROB:
        problems.append(f"best next-token log-probability {result['max_logprob']:.2f} <= {MIN_MAX_LOGPROB}")
    if not result["mean_entropy"] < result["uniform_entropy"] - UNIFORM_MARGIN_NATS:
        problems.append("the next-token distribution is uniform")
    result["ok"] = not problems
    result["problems"] = problems
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stations.smoke")
    parser.add_argument("model_dir")
    parser.add_argument("--root", help="factory root whose factory_node.toml applies")
    parser.add_argument("--base", help="the part's base name (its offload folder)")
    parser.add_argument("--format", help="a quantized artifact's format (gguf, mlx): load it with its runtime")
    args = parser.parse_args(argv)
    try:
        if args.format:
            result = check_artifact(args.model_dir, args.format)
        else:
            config = load_node_config(Layout(Path(args.root)).node_config) if args.root else NodeConfig()
            result = check(args.model_dir, config=config, base=args.base)
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        result = {"ok": False, "problems": [f"{type(err).__name__}: {printable(str(err), MAX_PROBLEM_CHARS)}"]}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
