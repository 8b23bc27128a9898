"""The manifest-to-live-model check, run in a fresh process:

    python -m stations.smoke MODEL_DIR

Loads the directory with stock `from_pretrained` (no code of ours on the
path between the files and the model), runs one forward pass on a probe text
and prints one JSON line. A saved model passes when its logits are finite,
its best next-token log-probability is above MIN_MAX_LOGPROB (a model that
puts no token above e^-20 has garbage weights) and its distribution is not
uniform (a zeroed or collapsed head gives the same logit everywhere).
"""

from __future__ import annotations

import json
import math
import sys

PROBE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
MIN_MAX_LOGPROB = -20.0
# Entropy below log(V) minus this margin (nats) counts as "not uniform".
UNIFORM_MARGIN_NATS = 1e-3


def check(model_dir: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import transformers

    from adapters import family_for_config

    config = AutoConfig.from_pretrained(model_dir).to_dict()
    auto = getattr(transformers, family_for_config(config).auto_class)
    model = auto.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROBE, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (T,)
    vocab = logits.shape[-1]
    result = {
        "tokens": int(ids["input_ids"].shape[1]),
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


def main() -> int:
    try:
        result = check(sys.argv[1])
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        result = {"ok": False, "problems": [f"{type(err).__name__}: {err}"]}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
