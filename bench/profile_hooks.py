"""What the expert-activation-profile hooks cost over a plain forward pass.

Builds one small random qwen3_moe model (not a test: figures for
docs/PERFORMANCE.md), then times forward passes over the same token blocks
three ways, interleaved so machine noise hits all alike:

* ``plain``: model(input_ids) under inference_mode, no hooks;
* ``counts``: with router hooks that only count selections and sum gate
  weights (what a profile without REAP would cost);
* ``profile``: the station's own hooks (stations.profile LayerStats and
  _router_hook): counts, gate weights and REAP, which runs the layer's
  experts module once more over every (token, slot) row.

Reports the median seconds per block of each and the ratios to ``plain``.

    . .venv/bin/activate
    python bench/profile_hooks.py --markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GEOMETRY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 32, "intermediate_size": 512, "moe_intermediate_size": 256, "num_experts": 32,
            "num_experts_per_tok": 4, "vocab_size": 2048}


def build(out: Path):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model("qwen3_moe", **GEOMETRY)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def attach(model, mode: str) -> list:
    from adapters import discover_routers
    from stations.profile import LayerStats, _router_hook, experts_module

    routers = discover_routers(model)
    handles = []
    for layer, r in routers.items():
        stats = LayerStats.zeros(GEOMETRY["num_experts"], "cpu", experts_module(model, r, GEOMETRY["num_experts"], layer))
        if mode == "profile":
            hook = _router_hook(stats, layer)
        else:
            def hook(module, args, output, stats=stats):
                _, weights, index = output
                flat = index.reshape(-1)
                stats.counts.index_add_(0, flat, weights.new_ones(flat.shape, dtype=stats.counts.dtype))
                stats.gate.index_add_(0, flat, weights.reshape(-1).to(stats.gate.dtype))
        handles.append(r.register_forward_hook(hook))
    return handles


def time_block(model, ids, mode: str) -> float:
    import torch

    handles = attach(model, mode) if mode != "plain" else []
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            return time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "m")
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, GEOMETRY["vocab_size"], (1, args.seq), generator=gen) for _ in range(args.blocks)]
    modes = ("plain", "counts", "profile")
    for mode in modes:  # warm-up: kernels, allocator
        time_block(model, blocks[0], mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for ids in blocks:
        for mode in modes:
            times[mode].append(time_block(model, ids, mode))
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"geometry": GEOMETRY, "seq": args.seq, "blocks": args.blocks, "threads": args.threads,
           "median_s_per_block": {m: round(v, 4) for m, v in med.items()},
           "ratio_to_plain": {m: round(v / med["plain"], 2) for m, v in med.items()},
           "tokens_per_s": {m: round(args.seq / v) for m, v in med.items()}}
    print(json.dumps(out, indent=2))
    if args.markdown:
        rows = ["| pass | median s / block | tokens/s | x plain |", "|---|---:|---:|---:|"]
        rows += [f"| {m} | {med[m]:.4f} | {out['tokens_per_s'][m]} | {out['ratio_to_plain'][m]:.2f} |" for m in modes]
        print("\n".join(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
