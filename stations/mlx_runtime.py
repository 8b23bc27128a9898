"""An MLX directory (what mlx-lm's converter writes) as eval measures it.

`open_mlx` loads it with mlx-lm itself, so perplexity and generation are of
the quantized weights as mlx-lm runs them, not of a transformers model that
only resembles them; see stations/runtime.py for why and for the protocol.

Run as `python -m stations.mlx_runtime --check DIR`, it is also the quant
stage's proof that an output loads: a fresh interpreter (nothing from the
conversion still in memory) opens DIR, scores a prompt and generates a few
tokens, and prints one JSON line of what it saw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from factory.errors import StageFailed
from stations.runtime import sample_token, score_logits

# Where config.json keeps the longest sequence; families disagree on the
# spelling, so the first present one wins (top level, then text_config).
CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")
# The check's prompt: ordinary code text, so a real model's next-token
# distribution is far from flat.
CHECK_PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
CHECK_NEW_TOKENS = 8
# A model whose last-position logits span less than this (in nats) predicts
# a flat distribution: weights zeroed or scrambled by a broken pack. A trained
# model spans several nats; random tiny test models a few tenths.
MIN_LOGIT_RANGE = 1e-3


def _config_value(config: dict[str, Any], keys: Sequence[str]) -> Any:
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            if scope.get(key) is not None:
                return scope[key]
    return None


class MlxRuntime:
    """A model mlx-lm loaded, driven by token ids (stations.runtime.Runtime)."""

    name = "mlx-lm"

    def __init__(self, model: Any, config: dict[str, Any], path: Path) -> None:
        self.model = model
        self.path = path
        self.vocab_size = _config_value(config, ("vocab_size",))
        self.context_length = _config_value(config, CONTEXT_KEYS)
        for what, value, keys in (("vocab_size", self.vocab_size, ("vocab_size",)),
                                  ("context_length", self.context_length, CONTEXT_KEYS)):
            if not isinstance(value, int) or value < 1:
                raise StageFailed(f"{path / 'config.json'}: no positive integer {' / '.join(keys)} "
                                  f"(got {value!r}), so the MLX model's {what} is unknown; "
                                  "re-run the quant stage that wrote it")
        eos = _config_value(config, ("eos_token_id",))
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _mx_logits(self, ids: Sequence[int]) -> Any:
        """(T, V) float32 logits of one sequence, as an mx.array."""
        import mlx.core as mx

        self._check_ids(ids, minimum=1)
        return self.model(mx.array([list(ids)]))[0].astype(mx.float32)

    def logits(self, ids: Sequence[int]) -> Any:
        import numpy as np

        return np.array(self._mx_logits(ids))

    def score(self, ids: Sequence[int]) -> list[tuple[float, bool]]:
        self._check_ids(ids, minimum=2)
        return score_logits(self.logits(ids), ids)

    def generate(self, ids: Sequence[int], *, max_new_tokens: int, temperature: float, seed: int,
                 stop: Callable[[list[int]], bool]) -> list[int]:
        import mlx.core as mx
        import numpy as np
        from mlx_lm.models.cache import make_prompt_cache

        self._check_ids(ids, minimum=1)
        cache = make_prompt_cache(self.model)
        rng = np.random.default_rng(seed)
        logits = self.model(mx.array([list(ids)]), cache=cache)[0, -1].astype(mx.float32)
        generated: list[int] = []
        while len(generated) < max_new_tokens and len(ids) + len(generated) < self.context_length:
            token = sample_token(np.array(logits), temperature, rng)
            if token in self.eos_ids:
                break
            generated.append(token)
            if stop(generated):
                break
            logits = self.model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)
        return generated

    def close(self) -> None:
        import mlx.core as mx

        self.model = None
        mx.clear_cache()

    def _check_ids(self, ids: Sequence[int], *, minimum: int) -> None:
        if len(ids) < minimum or len(ids) > self.context_length:
            raise StageFailed(f"{len(ids)} token ids given to the MLX model {self.path}; it takes "
                              f"{minimum} to {self.context_length}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise StageFailed(f"token id {bad[0]} is outside the MLX model's vocabulary of {self.vocab_size} "
                              f"({self.path}); the tokenizer does not belong to this model")


def open_mlx(path: Path) -> MlxRuntime:
    """The MLX model in directory `path`, loaded by mlx-lm (weights, config
    and quantization as mlx-lm's converter saved them)."""
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(Path(path))
    except (OSError, ValueError, KeyError) as err:
        raise StageFailed(f"mlx-lm cannot load the MLX model {path}: {err}; re-run the quant stage "
                          "that wrote it") from err
    model.eval()
    return MlxRuntime(model, config, Path(path))


def check(path: Path) -> dict[str, Any]:
    """Load `path`, score CHECK_PROMPT and generate greedily from it: what
    the quant stage requires of every output before it records it."""
    import mlx.core as mx
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    ids = tokenizer(CHECK_PROMPT, add_special_tokens=False)["input_ids"]
    runtime = open_mlx(path)
    last = runtime._mx_logits(ids)[-1]
    finite = bool(mx.all(mx.isfinite(last)).item())
    spread = float((mx.max(last) - mx.min(last)).item()) if finite else math.nan
    scored = runtime.score(ids)
    generated = runtime.generate(ids, max_new_tokens=CHECK_NEW_TOKENS, temperature=0.0, seed=0,
                                 stop=lambda _: False)
    return {"prompt_tokens": len(ids), "logits_width": int(last.shape[0]), "logits_finite": finite,
            "logit_range": spread, "prompt_logprob_sum": sum(lp for lp, _ in scored),
            "generated_ids": generated, "generated_text": tokenizer.decode(generated)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stations.mlx_runtime")
    parser.add_argument("--check", type=Path, required=True, metavar="DIR",
                        help="load this MLX directory with mlx-lm, score a prompt, generate; print JSON")
    args = parser.parse_args(argv)
    try:
        result = check(args.check)
    except StageFailed as err:
        print(json.dumps({"error": str(err)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
