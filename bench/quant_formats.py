"""Quantized-format stations: throughput and peak RSS on a >= 1 GB checkpoint.

What it measures (not a test: figures for docs/PERFORMANCE.md):

1. Builds (once; reused with --model-dir) a random-weight llama checkpoint
   with TinyLlama-1.1B's widths (hidden 2048, 32 heads / 4 KV heads,
   intermediate 5632, vocab 32000) and LAYERS of its 22 layers, bf16,
   through the product's stand-in builder (stations.standin
   save_random_model + add_tokenizer: a byte-level BPE, fewer tokens than
   the config's vocab, so the converter pads it and declares GPT-2's
   pre-tokenizer, as on every tiny model the factory forges).
2. Runs each job in its own process, as the product does (the quant
   station runs the converter, the quantizer and every check as
   subprocesses; mlx-lm and bitsandbytes run in the stage's process, so
   here each gets a fresh `--job` process of this script that calls the
   station's own functions):

   * ``read``: every safetensors byte read into an 8 MiB buffer (``cat``).
   * ``copy``: the baseline. The same bytes read and written through an
     8 MiB buffer to the same disk, then fsync of every file: the least
     any tool that rewrites the checkpoint can cost.
   * ``gguf f16``: ``python -m stations.gguf_convert MODEL OUT --outtype f16``.
   * ``gguf Q8_0`` / ``gguf Q4_K_M``: ``python -m stations.llama_cpp_runtime
     quantize F16 OUT TYPE`` (llama.cpp's quantizer, all cores).
   * ``check Q8_0`` / ``check Q4_K_M``: ``python -m stations.llama_cpp_runtime
     check OUT --vocab 32000`` (load in llama.cpp, one 16-token forward).
   * ``mlx 4bit``: stations.quant_mlx's path (mlx_config, stage_source,
     convert: mlx_lm.convert at 4 bits, group 64, plus the fsyncs), then
     ``mlx check``: ``python -m stations.mlx_runtime --check DIR`` (score
     a 30-token prompt, generate 8 tokens); by default on the first repeat
     only (--mlx-check), since it takes minutes here.
   * ``nf4``: stations.quant_bnb's quant_decision + quantize_nf4
     (bitsandbytes NF4 load on the CPU, save_pretrained, tokenizer), then
     ``nf4 reload``: ``python -m stations.smoke DIR`` (the fresh-process
     reload the station runs: load plan, module types, one forward).

   Each job runs --repeat times; the order repeats (read, copy, gguf, mlx,
   nf4), so the page cache is warm for every job after the first read.

3. Prints one JSON document (and with --markdown, a table on stderr).
   Per job and run:

   * ``seconds``: wall time of the job's process, start to exit (imports
     included: what the station waits for).
   * ``gb_per_s``: input GB (1e9 bytes) / seconds. The input is the
     checkpoint's safetensors bytes, except for the quantizer, whose input
     is the f16 GGUF, and for the checks, which report no rate.
   * ``x_copy``: gb_per_s / the copy's gb_per_s of the same repeat
     (1.0 = as fast as rewriting the bytes; 0.1 = ten times slower).
   * ``peak_rss_gib``: ru_maxrss of the job's process from ``os.wait4``
     (its own high-water mark, and any child it waited for), GiB.
   * ``rss_over_checkpoint``: that peak / the checkpoint's safetensors bytes.
   * ``rss_before_work_gib`` (mlx, nf4): the job process's VmHWM before
     the station's imports (torch, mlx) and its work: the bare interpreter.

   The table shows the median over repeats and the spread (min-max).
   The load average is sampled before every job.

4. ``--job mlx-matmul`` (run by hand, not by the bench): ms per call of one
   of the model's MLP matmuls in mlx, 4-bit vs bf16, at 1 and 30 rows, the
   reason the mlx check takes minutes on a CPU.

Disk: the model (~1.3 GB at 12 layers), its copy, the f16 GGUF and the
quantized outputs exist at once (~5 GB), all under --work (default a temp
dir), deleted after each repeat; the --model-dir model is kept.

    . .venv/bin/activate
    python bench/quant_formats.py --model-dir /tmp/qf/model --work /tmp/qf --repeat 2 --mlx-check first --markdown > quant.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GB, GiB = 1e9, 2**30
CHUNK = 8 << 20  # the copy's buffer, as bench/expert_prune_stream.py
LAYERS = 12  # of TinyLlama-1.1B's 22: ~1.32 GB of bf16, over the 1 GB floor with room on a 2-core box
CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": LAYERS,
          "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
TOKENIZER_VOCAB = 4096  # asked of the BPE trainer; its tiny corpus yields fewer, all <= CONFIG's vocab
QUANT_TYPES = ("Q8_0", "Q4_K_M")
MLX_BITS = 4


# ── the checkpoint ──────────────────────────────────────────────────────────


def build_model(out: Path) -> Path:
    """The random llama checkpoint at `out`, built unless already there."""
    done = out / ".bench-complete"
    if done.is_file() and json.loads(done.read_text()) == CONFIG:
        return out
    from adapters import get_family
    from stations.standin import add_tokenizer, save_random_model

    shutil.rmtree(out, ignore_errors=True)
    save_random_model(get_family("llama"), CONFIG, out, dtype="bfloat16", max_shard_size="1GB")
    add_tokenizer(out, vocab_size=TOKENIZER_VOCAB)
    done.write_text(json.dumps(CONFIG))
    return out


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


# ── the in-process jobs (each run as `--job NAME ...` in a fresh process) ──


def _vm_hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def job_read(model: Path) -> dict:
    buf = bytearray(CHUNK)
    n = 0
    for p in sorted(model.glob("*.safetensors")):
        with p.open("rb", buffering=0) as f:
            while (got := f.readinto(buf)):
                n += got
    return {"bytes": n}


def job_copy(model: Path, out: Path) -> dict:
    out.mkdir()
    buf = memoryview(bytearray(CHUNK))
    for p in sorted(model.glob("*.safetensors")):
        with p.open("rb", buffering=0) as src, (out / p.name).open("wb", buffering=0) as dst:
            while (got := src.readinto(buf)):
                dst.write(buf[:got])
            os.fsync(dst.fileno())
    return {"bytes": weight_bytes(out)}


def job_mlx(model: Path, out: Path) -> dict:
    """stations.quant_mlx.make_mlx's steps 2-3 for one 4-bit entry."""
    from stations.quant_mlx import convert, mlx_config, stage_source, weight_bytes as mlx_bytes

    before = _vm_hwm_gib()
    config = json.loads((model / "config.json").read_text())
    staged = stage_source(model, out.parent / f".{out.name}-staging", mlx_config(config, model_type="llama"))
    try:
        convert(staged, out, bits=MLX_BITS)
    finally:
        shutil.rmtree(staged)
    return {"rss_before_work_gib": before, "bytes": mlx_bytes(out)}


def job_nf4(model: Path, out: Path) -> dict:
    """stations.quant_bnb.make_bnb4's steps 1-3 (the reload is its own job)."""
    from factory.nodeconfig import NodeConfig
    from stations.quant_bnb import quant_decision, quantize_nf4

    before = _vm_hwm_gib()
    config = NodeConfig()
    decision = quant_decision(model, config)
    layout = quantize_nf4(decision, config, out)
    return {"rss_before_work_gib": before, "bytes": weight_bytes(out), "load_plan": decision.plan.strategy,
            "device": decision.device, "quantized_modules": layout.quantized}


def job_mlx_matmul() -> dict:
    """Why the mlx check is slow here: one of the model's MLP matmuls
    (M rows of 2048 against 5632 x 2048), mlx 4-bit group 64 vs dense bf16,
    ms per call on the CPU backend (median of 3 after a warm-up)."""
    import mlx.core as mx

    w = mx.random.normal((CONFIG["intermediate_size"], CONFIG["hidden_size"])).astype(mx.bfloat16)
    wq = mx.quantize(w, bits=MLX_BITS, group_size=64)
    mx.eval(w, *wq)
    out = {}
    for m in (1, 30):  # a decode step; the check's 30-token prompt
        x = mx.random.normal((m, CONFIG["hidden_size"])).astype(mx.bfloat16)
        calls = {"bf16": lambda: x @ w.T,
                 "q4": lambda: mx.quantized_matmul(x, *wq, transpose=True, group_size=64, bits=MLX_BITS)}
        for name, call in calls.items():
            mx.eval(call())
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                mx.eval(call())
                times.append(time.perf_counter() - t0)
            out[f"m{m}_{name}_ms"] = round(statistics.median(times) * 1000, 1)
    return out


JOBS = {"read": job_read, "copy": job_copy, "mlx": job_mlx, "nf4": job_nf4, "mlx-matmul": job_mlx_matmul}


# ── running and measuring ───────────────────────────────────────────────────


def run_measured(argv: list[str], log: Path, *, timeout: float | None = None) -> dict:
    """Run `argv` as its own process; wall seconds, its peak RSS (wait4's
    ru_maxrss) and its last stdout line as JSON when it prints one. Past
    `timeout` seconds it is killed and reported as timed out."""
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    load = os.getloadavg()[0]
    with log.open("w") as err, tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                timed_out = True
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = out.read().strip().splitlines()
    if timed_out:
        return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss * 1024 / GiB, "load1": round(load, 2),
                "said": {}, "timed_out": True}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {log.read_text()[-2000:]}")
    try:
        said = json.loads(lines[-1]) if lines else {}
    except ValueError:
        said = {}
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss * 1024 / GiB, "load1": round(load, 2),
            "said": said, "timed_out": False}


def one_repeat(model: Path, work: Path, *, mlx_check: bool, mlx_timeout: float) -> dict[str, dict]:
    """Every job once, in order (the mlx check only when `mlx_check`);
    outputs removed afterwards."""
    py, me = sys.executable, str(Path(__file__).resolve())
    f16 = work / "model-f16.gguf"
    steps: list[tuple[str, list[str]]] = [
        ("read", [py, me, "--job", "read", str(model)]),
        ("copy", [py, me, "--job", "copy", str(model), str(work / "copy")]),
        ("gguf f16", [py, "-m", "stations.gguf_convert", str(model), str(f16), "--outtype", "f16"])]
    for qt in QUANT_TYPES:
        steps.append((f"gguf {qt}", [py, "-m", "stations.llama_cpp_runtime", "quantize", str(f16),
                                     str(work / f"model-{qt}.gguf"), qt]))
    for qt in QUANT_TYPES:
        steps.append((f"check {qt}", [py, "-m", "stations.llama_cpp_runtime", "check", str(work / f"model-{qt}.gguf"),
                                      "--vocab", str(CONFIG["vocab_size"])]))
    steps.append(("mlx 4bit", [py, me, "--job", "mlx", str(model), str(work / "mlx-4bit")]))
    if mlx_check:
        steps.append(("mlx check", [py, "-m", "stations.mlx_runtime", "--check", str(work / "mlx-4bit")]))
    steps += [("nf4", [py, me, "--job", "nf4", str(model), str(work / "nf4")]),
              ("nf4 reload", [py, "-m", "stations.smoke", str(work / "nf4")])]
    results = {}
    for name, argv in steps:
        r = run_measured(argv, work / f"{name.replace(' ', '-')}.log",
                         timeout=mlx_timeout if name == "mlx check" else None)
        if name == "gguf f16":
            r["said"] = {"bytes": f16.stat().st_size}
        elif name.startswith("gguf "):
            r["said"].setdefault("bytes", (work / f"model-{name.split()[1]}.gguf").stat().st_size)
        results[name] = r
        print(f"  {name}: {r['seconds']:.1f} s{' (timed out)' if r['timed_out'] else ''}, {r['peak_rss_gib']:.2f} GiB (load {r['load1']})", file=sys.stderr)
    for p in work.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return results


def summarise(runs: list[dict[str, dict]], *, ckpt: int, f16_bytes: int) -> list[dict]:
    """Per job: median and spread of seconds, GB/s, x copy and peak RSS."""
    rows = []
    for name in runs[0]:
        ran = [r for r in runs if name in r]
        input_bytes = f16_bytes if name in (f"gguf {qt}" for qt in QUANT_TYPES) else ckpt
        rated = not name.startswith("check") and not name.endswith(("check", "reload"))
        secs = [r[name]["seconds"] for r in ran]
        rss = [r[name]["peak_rss_gib"] for r in ran]
        row = {"job": name, "input_bytes": input_bytes if rated else None,
               "seconds": [round(s, 2) for s in secs], "seconds_median": round(statistics.median(secs), 2),
               "peak_rss_gib": [round(x, 3) for x in rss], "peak_rss_gib_max": round(max(rss), 3),
               "rss_over_checkpoint": round(max(rss) * GiB / ckpt, 3),
               "load1": [r[name]["load1"] for r in ran], "timed_out": any(r[name]["timed_out"] for r in ran),
               "said": ran[-1][name]["said"]}
        if rated:
            rates = [input_bytes / GB / s for s in secs]
            x_copy = [rate / (ckpt / GB / r["copy"]["seconds"]) for rate, r in zip(rates, ran)]
            row.update(gb_per_s=[round(x, 3) for x in rates], gb_per_s_median=round(statistics.median(rates), 3),
                       x_copy=[round(x, 3) for x in x_copy], x_copy_median=round(statistics.median(x_copy), 3))
        rows.append(row)
    return rows


def _spread(values: list[float], fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def markdown(rows: list[dict]) -> str:
    out = ["| job | input | s, median (runs) | GB/s of input | x copy | peak RSS GiB | RSS / checkpoint |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        inp = f"{r['input_bytes'] / GB:.2f} GB" if r["input_bytes"] else "-"
        inp += " f16 GGUF" if r["job"] in (f"gguf {qt}" for qt in QUANT_TYPES) else ""
        secs = f"{r['seconds_median']:.1f} ({', '.join(f'{s:.1f}' for s in r['seconds'])})"
        secs = f"> {secs} (killed)" if r["timed_out"] else secs
        rate = f"{r['gb_per_s_median']:.3f} ({_spread(r['gb_per_s'], '.3f')})" if "gb_per_s" in r else "-"
        x = f"{r['x_copy_median']:.3f} ({_spread(r['x_copy'], '.3f')})" if "x_copy" in r else "-"
        out.append(f"| {r['job']} | {inp} | {secs} | {rate} | {x} | {_spread(r['peak_rss_gib'], '.2f')} | "
                   f"{r['rss_over_checkpoint']:.2f} |")
    return "\n".join(out)


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "llama_cpp_python", "gguf", "mlx", "mlx-lm",
                                    "bitsandbytes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="where the checkpoint is built once and reused (default: inside --work, deleted)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir parent (default: the temp dir)")
    ap.add_argument("--mlx-check", choices=("first", "every", "never"), default="first",
                    help="which repeats run the mlx-lm load-and-generate check (minutes on this CPU: mlx's CPU "
                         "backend runs it on one thread)")
    ap.add_argument("--mlx-check-timeout", type=float, default=600.0, help="seconds before the mlx check is killed")
    ap.add_argument("--markdown", action="store_true", help="also print a table on stderr")
    ap.add_argument("--job", nargs="+", help="run one job in this process and print its JSON "
                    "(mlx-matmul: the mlx CPU matmul timing; the others are what the bench spawns)")
    args = ap.parse_args()
    if args.job:
        kind, *paths = args.job
        print(json.dumps(JOBS[kind](*map(Path, paths))))
        return
    from machine import machine

    info = {**machine(), "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)}
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quant-bench-", dir=args.work))
    try:
        t0 = time.perf_counter()
        model = build_model(args.model_dir or work / "model")
        build_s = time.perf_counter() - t0
        jobs = work / "jobs"
        jobs.mkdir()
        runs = []
        for i in range(args.repeat):
            print(f"repeat {i + 1}/{args.repeat}", file=sys.stderr)
            check = args.mlx_check == "every" or (args.mlx_check == "first" and i == 0)
            runs.append(one_repeat(model, jobs, mlx_check=check, mlx_timeout=args.mlx_check_timeout))
        ckpt = weight_bytes(model)
        rows = summarise(runs, ckpt=ckpt, f16_bytes=runs[-1]["gguf f16"]["said"]["bytes"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"machine": info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                      "versions": versions(), "config": CONFIG, "checkpoint_bytes": ckpt,
                      "build_seconds": round(build_s, 1), "repeat": args.repeat, "results": rows}, indent=2))
    if args.markdown:
        print(markdown(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
