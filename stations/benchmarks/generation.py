"""Completions from a loaded causal LM, stopped at code-block boundaries.

One prompt at a time: batching left-padded prompts changes greedy outputs on
some models (padding shifts positions), and published HumanEval numbers are
"greedy bs=1".
"""

from __future__ import annotations

from typing import Callable, Sequence

from stations.runtime import TOP_P


def _stopper(tokenizer, prompt_len: int, stops: Sequence[str]):
    from transformers import StoppingCriteria

    class StopOnSequences(StoppingCriteria):
        """Stop once the generated text holds any stop sequence."""

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            done = [any(s in tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for s in stops)
                    for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopOnSequences()


def generate(loaded, prompt: str, *, max_new_tokens: int, stops: Sequence[str], n: int = 1,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """`n` completions of `prompt` (greedy when temperature is 0), raw: the
    caller truncates at the stop sequence."""
    if loaded.runtime is not None:
        return _generate_runtime(loaded, prompt, max_new_tokens=max_new_tokens, stops=stops, n=n,
                                 temperature=temperature, seed=seed)
    import torch
    from transformers import StoppingCriteriaList

    tok, model = loaded.tokenizer, loaded.model
    enc = tok(prompt, return_tensors="pt").to(loaded.device)
    prompt_len = enc["input_ids"].shape[1]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": TOP_P} if temperature > 0 else \
        {"do_sample": False}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([_stopper(tok, prompt_len, stops)]),
                             **sampling)
    return [tok.decode(row[prompt_len:], skip_special_tokens=True) for row in out]


def _generate_runtime(loaded, prompt: str, *, max_new_tokens: int, stops: Sequence[str], n: int,
                      temperature: float, seed: int) -> list[str]:
    """`generate` on a quantized artifact's own runtime, prompt tokenized by
    the HF tokenizer as for the transformers model; sample k gets seed + k."""
    tok = loaded.tokenizer
    ids = tok(prompt)["input_ids"]

    def stop(generated: list[int]) -> bool:
        text = tok.decode(generated, skip_special_tokens=True)
        return any(s in text for s in stops)

    outs = [loaded.runtime.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + k,
                                    stop=stop) for k in range(n if temperature > 0 else 1)]
    outs += outs * (n - len(outs))  # greedy: every sample is the same completion
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


def generate_all(loaded, prompts: Sequence[str], *, max_new_tokens: int, stops: Sequence[str], n: int = 1,
                 temperature: float = 0.0, seed: int = 0,
                 between: Callable[[int, int], None] | None = None) -> list[list[str]]:
    """Completions for every prompt; `between(done, total)` runs after each
    (progress and the stage's stop point)."""
    results = []
    for i, prompt in enumerate(prompts):
        results.append(generate(loaded, prompt, max_new_tokens=max_new_tokens, stops=stops, n=n,
                                temperature=temperature, seed=seed + i))
        if between:
            between(i + 1, len(prompts))
    return results
