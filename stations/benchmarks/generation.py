"""Completions from a loaded causal LM, stopped at code-block boundaries.

One prompt at a time: batching left-padded prompts changes greedy outputs on
some models (padding shifts positions), and published HumanEval numbers are
"greedy bs=1".
"""

from __future__ import annotations

from typing import Callable, Sequence


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
    import torch
    from transformers import StoppingCriteriaList

    tok, model = loaded.tokenizer, loaded.model
    enc = tok(prompt, return_tensors="pt").to(loaded.device)
    prompt_len = enc["input_ids"].shape[1]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else \
        {"do_sample": False}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([_stopper(tok, prompt_len, stops)]),
                             **sampling)
    return [tok.decode(row[prompt_len:], skip_special_tokens=True) for row in out]


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
