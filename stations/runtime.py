"""Quantized artifacts as the eval station measures them.

A GGUF file runs in llama.cpp and an MLX directory in mlx-lm, not in
transformers; measuring them through transformers would measure a different
model. So a quant stage that writes such a format records an ARTIFACT
(`factory.results`), and eval opens it with the format's own runtime, named
by the format's row in `factory.catalog.QUANT_FORMATS` (`reader`). The
benchmark runners need only the calls below, on token ids from the HF
tokenizer kept beside the artifact (the quant stage copies it from the
model it quantized), so source and quantized model are scored on the same
tokens and the perplexity ratio is honest.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol, Sequence

from factory import catalog
from factory.errors import StageFailed
from factory.stages import StageContext


# Nucleus sampling's p for every sampled completion, on every runtime: what
# the transformers path passes to generate() (stations.benchmarks.generation).
TOP_P = 0.95


def sample_token(logits, temperature: float, rng) -> int:
    """The next token from one position's logits: the argmax at temperature
    0, else a draw from the temperature-scaled distribution cut to its top-p
    nucleus (as transformers samples). `rng` is a numpy Generator."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(logits.argmax())
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[:int(np.searchsorted(np.cumsum(p[order]), TOP_P)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def score_logits(logits, ids: Sequence[int]) -> list[tuple[float, bool]]:
    """`Runtime.score` from a runtime's (len(ids), V) logits, in float64:
    every runtime scores the same way, so their numbers differ only by the
    logits they compute."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[:-1]  # row t predicts ids[t + 1]
    top = logits.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    targets = np.asarray(ids[1:])
    chosen = logits[np.arange(len(targets)), targets]
    best = logits.argmax(axis=1)
    return [(float(c - z), bool(t == b)) for c, z, t, b in zip(chosen, logz, targets, best)]


def artifact_target(ctx: StageContext, artifact: dict):
    """The file (gguf) or directory (mlx) of `artifact` that eval measures."""
    return ctx.work_dir / artifact["dir"] / artifact["eval_file"]


class Runtime(Protocol):
    """A loaded quantized model, driven by token ids."""

    name: str  # "llama.cpp", "mlx-lm": shown in eval's metrics
    vocab_size: int
    context_length: int  # the longest sequence `score` and `generate` accept

    def logits(self, ids: Sequence[int]) -> Any:
        """(len(ids), vocab) numpy logits; row t predicts ids[t + 1]."""
        ...

    def score(self, ids: Sequence[int]) -> list[tuple[float, bool]]:
        """For each position t >= 1: (log p(ids[t] | ids[:t]) in nats, whether
        ids[t] is the most likely next token): `score_logits(self.logits(ids), ids)`."""
        ...

    def generate(self, ids: Sequence[int], *, max_new_tokens: int, temperature: float, seed: int,
                 stop: Callable[[list[int]], bool]) -> list[int]:
        """New token ids after the prompt `ids` (`sample_token` with a
        numpy Generator seeded by `seed`: greedy at temperature 0), ending when `stop(generated)` is true, at end of text, or after
        `max_new_tokens`."""
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...


def open_artifact(ctx: StageContext, artifact: dict, *, purpose: str = ""):
    """The artifact an earlier quant stage recorded, loaded by its format's
    runtime, as a stations.loader.Loaded (model None, runtime set), with
    the HF tokenizer kept beside it. Emits `model/load` like the loader."""
    import transformers

    from stations.loader import Loaded, peak_rss_mb

    fmt = artifact["format"]
    row = catalog.QUANT_FORMATS.get(fmt)
    if row is None or row.reader is None:
        raise StageFailed(f"no runtime here reads quant format {fmt!r}; evaluate before that quant stage")
    directory = ctx.work_dir / artifact["dir"]
    target = artifact_target(ctx, artifact)
    if not target.exists():
        raise StageFailed(f"the {fmt} artifact {target} that stage {artifact.get('stage')} recorded is gone; "
                          "retry the part from that stage")
    t0 = time.monotonic()
    runtime = catalog.resolve(row.reader)(target)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    loaded = Loaded(model=None, tokenizer=tokenizer, plan=None, device="cpu", dtype=artifact.get("quant_type", fmt),
                    load_seconds=round(time.monotonic() - t0, 3), peak_rss_mb=round(peak_rss_mb(), 1),
                    peak_vram_mb=None, runtime=runtime)
    ctx.emit("model/load", model_dir=str(target), purpose=purpose, runtime=runtime.name, format=fmt,
             quant_type=artifact.get("quant_type"), load_s=loaded.load_seconds, peak_rss_mb=loaded.peak_rss_mb)
    return loaded


