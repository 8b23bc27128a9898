"""GGUF files in llama.cpp (through llama-cpp-python): quantize, check, run.

    python -m stations.llama_cpp_runtime quantize F16.gguf OUT.gguf Q4_K_M
    python -m stations.llama_cpp_runtime check FILE.gguf [--vocab N]
    python -m stations.llama_cpp_runtime selftest

Each prints one JSON line. `selftest` proves the installed tools on this
machine: a tiny random llama is converted, quantized to Q4_K_M and run
(bootstrap/format-tools.sh and `factory doctor` call it; a build for the
wrong CPU dies here with SIGILL instead of in a part). The quant and package stations call them as
subprocesses: llama.cpp is native code, and a GGUF it cannot read, a
quantizer assertion or a build for the wrong CPU (SIGILL) must fail the
stage with its exit status, not kill the part's process.

`open_gguf` is the eval station's runtime for a GGUF (stations.runtime):
it scores and generates on token ids, with the model's own logits, so
perplexity and benchmarks measure exactly the file that ships.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from stations.runtime import sample_token, score_logits

# llama.cpp keeps logits for every position it evaluates (scoring needs
# them), n_ctx x vocab floats: 4096 positions keep that under 2.5 GB for a
# 150k vocabulary, and hold a 512-token block or a prompt plus its answer.
MAX_CONTEXT = 4096
PROBE_TOKENS = 16  # the check's forward pass


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def ftype(quant_type: str) -> int:
    """llama.cpp's file-type constant for a quant type name (Q4_K_M, Q8_0, ...)."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type.upper()}", None)
    if value is None:
        raise ValueError(f"llama.cpp has no quant type {quant_type!r}; it has {', '.join(quant_types())}")
    return int(value)


def quant_types() -> list[str]:
    """Every quant type this llama.cpp build writes."""
    import llama_cpp

    return sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))


def quantize(src: Path, dst: Path, quant_type: str) -> dict:
    """`src` (a 16-bit GGUF) quantized to `quant_type` at `dst` by llama.cpp."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(quant_type)
    params.nthread = _threads()
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer returned {status} for {src} -> {quant_type}")
    return {"file": str(dst), "bytes": dst.stat().st_size, "quant_type": quant_type}


class LlamaCppRuntime:
    """A GGUF loaded by llama.cpp on the CPU (stations.runtime.Runtime)."""

    name = "llama.cpp"

    def __init__(self, path: Path, *, context: int = MAX_CONTEXT, verbose: bool = False):
        from llama_cpp import Llama

        probe = Llama(model_path=str(path), vocab_only=True, verbose=False)
        meta = probe.metadata
        trained = int(meta.get(f"{meta.get('general.architecture')}.context_length", 0))
        probe.close()
        self.context_length = min(context, trained) if trained > 0 else context
        self._llm = Llama(model_path=str(path), n_ctx=self.context_length, n_batch=512, logits_all=True,
                          n_threads=_threads(), n_gpu_layers=0, verbose=verbose)
        self.vocab_size = int(self._llm.n_vocab())

    def logits(self, ids: Sequence[int]):
        import numpy as np

        if len(ids) > self.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the {self.context_length}-token context")
        self._llm.reset()
        self._llm.eval(list(ids))
        return np.asarray(self._llm.scores[:len(ids)], dtype=np.float64)

    def score(self, ids: Sequence[int]) -> list[tuple[float, bool]]:
        return score_logits(self.logits(ids), ids)

    def generate(self, ids: Sequence[int], *, max_new_tokens: int, temperature: float, seed: int,
                 stop: Callable[[list[int]], bool]) -> list[int]:
        import numpy as np

        rng = np.random.default_rng(seed)
        eos = int(self._llm.token_eos())
        budget = min(max_new_tokens, self.context_length - len(ids))
        self._llm.reset()
        self._llm.eval(list(ids))
        out: list[int] = []
        while len(out) < budget:
            token = sample_token(self._llm.scores[self._llm.n_tokens - 1], temperature, rng)
            if token == eos:
                break
            out.append(token)
            if stop(out):
                break
            self._llm.eval([token])
        return out

    def close(self) -> None:
        self._llm.close()


def open_gguf(path: Path) -> LlamaCppRuntime:
    """The eval station's reader for format gguf (factory.catalog.QUANT_FORMATS)."""
    return LlamaCppRuntime(Path(path))


def check(path: Path, *, vocab: int | None = None) -> dict:
    """Load `path` in llama.cpp and run one forward pass: the logits must be
    finite and not uniform (a file of zeros or garbage gives flat or NaN
    logits), and the vocabulary must be the one the model was made with."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tensors = len(reader.tensors)
    params = int(sum(int(np.prod(t.shape)) for t in reader.tensors))
    # llama.cpp writes a tensor whose rows do not divide into the quant
    # type's blocks in a type that fits; say what the file really holds.
    types = dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))
    del reader
    runtime = LlamaCppRuntime(path, context=256, verbose=True)  # llama.cpp's own log says why a load fails
    try:
        ids = [(7 * i + 3) % runtime.vocab_size for i in range(PROBE_TOKENS)]
        logits = runtime.logits(ids)
        problems = []
        if not np.isfinite(logits).all():
            problems.append("llama.cpp gives non-finite logits")
        elif float(logits.std(axis=1).min()) == 0.0:
            problems.append("llama.cpp gives uniform logits (every token equally likely)")
        if vocab is not None and runtime.vocab_size != vocab:
            problems.append(f"the GGUF has {runtime.vocab_size} tokens, the model {vocab}")
        return {"ok": not problems, "problems": problems, "architecture": arch, "tensors": tensors,
                "params": params, "tensor_types": types, "vocab": runtime.vocab_size, "context": runtime.context_length,
                "logits_std": round(float(logits.std(axis=1).mean()), 6),
                "logits_finite": bool(np.isfinite(logits).all())}
    finally:
        runtime.close()


def selftest() -> dict:
    """Convert, quantize and run a tiny random llama with the installed tools."""
    import subprocess
    import tempfile

    from adapters import get_family
    from stations.standin import build_standin

    with tempfile.TemporaryDirectory(prefix="gguf-selftest-") as tmp:
        model = build_standin(get_family("llama"), Path(tmp) / "model")
        f16, q4 = Path(tmp) / "f16.gguf", Path(tmp) / "q4.gguf"
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        for argv in (["stations.gguf_convert", str(model), str(f16)],
                     ["stations.llama_cpp_runtime", "quantize", str(f16), str(q4), "Q4_K_M"],
                     ["stations.llama_cpp_runtime", "check", str(q4)]):
            proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                died = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
                return {"ok": False, "problems": [f"{argv[0]} {argv[1]} failed ({died}): "
                                                  f"{proc.stderr.strip()[-400:] or proc.stdout.strip()[-400:]}"]}
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "selftest": "llama Q4_K_M"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src", type=Path)
    q.add_argument("dst", type=Path)
    q.add_argument("quant_type")
    c = sub.add_parser("check")
    c.add_argument("path", type=Path)
    c.add_argument("--vocab", type=int)
    sub.add_parser("selftest")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "quantize":
            result = quantize(args.src, args.dst, args.quant_type)
        elif args.cmd == "check":
            result = check(args.path, vocab=args.vocab)
        else:
            result = selftest()
    except (ValueError, RuntimeError, OSError) as err:
        result = {"ok": False, "problems": [str(err)]}
    print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
