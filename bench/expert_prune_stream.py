"""Streaming expert-prune: peak RSS and throughput on multi-GB checkpoints.

What it measures (not a test: figures for docs/PERFORMANCE.md):

1. Writes a synthetic qwen3_moe-shaped checkpoint (per-expert layout, bf16,
   ~500 MB shards, random bytes) of about SIZE GB for each --sizes entry,
   streaming it to disk so generating it costs no memory either.
2. In a fresh subprocess each (so VmHWM is that job's own peak):
   * baseline ``copy``: shutil.copyfile of every shard, then fsync;
   * ``prune``: the real station (stations.expert_prune.run_stage, through
     tests/stationkit.make_ctx on a real `factory init` root) keeping half
     the experts by metric router_l2 (data-free, so no profile is needed).
   Each job runs --repeat times; the fastest run is reported (page cache
   warm for every run, so both read from memory and write to disk alike).
3. Prints one JSON document (and with --markdown, a table on stderr):
   peak RSS (VmHWM), seconds, MB/s of *input* bytes (what a user waits for
   per model size), and prune/copy ratios.

Disk: the model, one copy and one pruned output exist at once (~2.5x SIZE),
all under --work (default a temp dir), deleted afterwards.

    . .venv/bin/activate
    python bench/expert_prune_stream.py --sizes 1 2 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1e6
SHARD_BYTES = 500 * 10**6  # Hub checkpoints shard at a few hundred MB to 5 GB
HIDDEN, MOE_INTER, EXPERTS, TOP_K = 1024, 512, 16, 4
VOCAB, HEADS, KV_HEADS, HEAD_DIM = 8192, 8, 2, 128
CHUNK = 8 << 20


def layer_tensors(layer: int) -> list[tuple[str, list[int]]]:
    p = f"model.layers.{layer}"
    out = [(f"{p}.input_layernorm.weight", [HIDDEN]), (f"{p}.post_attention_layernorm.weight", [HIDDEN]),
           (f"{p}.self_attn.q_proj.weight", [HEADS * HEAD_DIM, HIDDEN]),
           (f"{p}.self_attn.k_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
           (f"{p}.self_attn.v_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
           (f"{p}.self_attn.o_proj.weight", [HIDDEN, HEADS * HEAD_DIM]),
           (f"{p}.self_attn.q_norm.weight", [HEAD_DIM]), (f"{p}.self_attn.k_norm.weight", [HEAD_DIM]),
           (f"{p}.mlp.gate.weight", [EXPERTS, HIDDEN])]
    for e in range(EXPERTS):
        out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", [MOE_INTER, HIDDEN]),
                (f"{p}.mlp.experts.{e}.up_proj.weight", [MOE_INTER, HIDDEN]),
                (f"{p}.mlp.experts.{e}.down_proj.weight", [HIDDEN, MOE_INTER])]
    return out


def layers_for(gb: float) -> int:
    per_layer = sum(2 * _numel(s) for _, s in layer_tensors(0))
    return max(1, round((gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / per_layer))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_safetensors(path: Path, tensors: list[tuple[str, list[int]]], noise: memoryview) -> None:
    """Header first, then each tensor's bytes from a reused noise buffer."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            left = 2 * _numel(shape)
            while left:
                n = min(left, len(noise))
                f.write(noise[:n])
                left -= n


def make_model(out: Path, gb: float) -> dict:
    """A qwen3_moe checkpoint of about `gb` GB; returns its geometry."""
    layers = layers_for(gb)
    out.mkdir(parents=True)
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": HIDDEN,
              "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "intermediate_size": 4 * HIDDEN, "moe_intermediate_size": MOE_INTER,
              "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "vocab_size": VOCAB,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    all_tensors = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for layer in range(layers):
        all_tensors += layer_tensors(layer)
    all_tensors += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    shards, cur, size = [], [], 0
    for t in all_tensors:
        n = 2 * _numel(t[1])
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    shards.append(cur)
    # Random-looking bf16 with finite values: mantissa noise, exponent pinned near 1.
    noise = bytearray(os.urandom(CHUNK))
    for i in range(1, CHUNK, 2):
        noise[i] = 0x3F
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, memoryview(noise))
        weight_map.update({t: name for t, _ in shard})
    total = sum(2 * _numel(s) for _, s in all_tensors)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return {"layers": layers, "shards": len(shards), "bytes": total}


# ── the measured jobs (each in its own process) ───────────────────────────


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def job_copy(model: Path, out: Path) -> dict:
    out.mkdir()
    t0 = time.perf_counter()
    for p in sorted(model.glob("*.safetensors")):
        shutil.copyfile(p, out / p.name)
        fd = os.open(out / p.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _vm_hwm_mb()}


def job_prune(model: Path, root: Path, base: str) -> dict:
    sys.path.insert(0, str(REPO))
    from stations.expert_prune import run_stage
    from tests.stationkit import Reports, make_ctx

    alloy = {"name": "bench", "version": "1.0.0",
             "source": {"baseModel": str(model.relative_to(root)), "architecture": "qwen3_moe"},
             "stages": [{"type": "expert-prune", "keepExpertsPerLayer": EXPERTS // 2, "metric": "router_l2"}]}
    ctx = make_ctx(root, alloy, 0, base=base, reports=Reports())
    rss_before = _vm_hwm_mb()
    t0 = time.perf_counter()
    result = run_stage(ctx)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": _vm_hwm_mb(), "rss_before_mb": rss_before,
            "bytes_out": result.metrics["bytes_out"], "shards_out": result.metrics["shards"]}


def run_job(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--job", *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(work: Path, gb: float, repeat: int) -> dict:
    root = work / "root"
    model = root / "models" / f"synth-{gb:g}gb"
    geometry = make_model(model, gb)
    copies, prunes = [], []
    for i in range(repeat):
        copies.append(run_job("copy", str(model), str(work / f"copy-{i}")))
        shutil.rmtree(work / f"copy-{i}")
        base = f"bench-{gb:g}-{i}"
        prunes.append(run_job("prune", str(model), str(root), base))
        shutil.rmtree(root / "work" / base)
    shutil.rmtree(model)
    copy, prune = min(copies, key=lambda r: r["seconds"]), min(prunes, key=lambda r: r["seconds"])
    mbytes = geometry["bytes"] / MB
    return {"size_gb": round(geometry["bytes"] / 1e9, 3), **geometry, "bytes_out": prune["bytes_out"],
            "copy": {"seconds": round(copy["seconds"], 2), "mb_per_s": round(mbytes / copy["seconds"], 1),
                     "peak_rss_mb": round(copy["peak_rss_mb"], 1)},
            "prune": {"seconds": round(prune["seconds"], 2), "mb_per_s": round(mbytes / prune["seconds"], 1),
                      "peak_rss_mb": round(prune["peak_rss_mb"], 1),
                      "rss_before_run_mb": round(prune["rss_before_mb"], 1)},
            "prune_over_copy_time": round(prune["seconds"] / copy["seconds"], 2),
            "all_seconds": {"copy": [round(r["seconds"], 2) for r in copies],
                            "prune": [round(r["seconds"], 2) for r in prunes]}}


def markdown(results: list[dict]) -> str:
    rows = ["| model | shards | copy s (MB/s) | prune s (MB/s of input) | prune/copy time | peak RSS copy | "
            "peak RSS prune (before run) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['size_gb']:.2f} GB, {r['layers']} layers x {EXPERTS} experts | {r['shards']} | "
                    f"{r['copy']['seconds']:.2f} ({r['copy']['mb_per_s']:.0f}) | "
                    f"{r['prune']['seconds']:.2f} ({r['prune']['mb_per_s']:.0f}) | {r['prune_over_copy_time']:.2f} | "
                    f"{r['copy']['peak_rss_mb']:.0f} MB | {r['prune']['peak_rss_mb']:.0f} MB "
                    f"({r['prune']['rss_before_run_mb']:.0f} MB) |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0], help="model sizes in GB")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir, deleted)")
    ap.add_argument("--markdown", action="store_true", help="also print a table on stderr")
    ap.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        kind, *rest = args.job
        out = job_copy(Path(rest[0]), Path(rest[1])) if kind == "copy" else job_prune(*map(Path, rest[:2]), rest[2])
        print(json.dumps(out))
        return
    work = Path(tempfile.mkdtemp(prefix="prune-bench-", dir=args.work))
    try:
        subprocess.run([sys.executable, "-m", "factory.cli", "init", str(work / "root")], check=True,
                       capture_output=True, cwd=REPO)
        results = [measure(work, gb, args.repeat) for gb in args.sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"hidden": HIDDEN, "moe_intermediate": MOE_INTER, "experts": EXPERTS, "kept": EXPERTS // 2,
                      "results": results}, indent=2))
    if args.markdown:
        print(markdown(results), file=sys.stderr)


if __name__ == "__main__":
    main()
