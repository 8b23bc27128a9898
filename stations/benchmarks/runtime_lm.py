"""lm-eval's model interface over a quantized artifact's own runtime.

A GGUF runs in llama.cpp and an MLX directory in mlx-lm (stations/runtime.py),
so an lm-eval task after such a quant stage must be scored by that runtime,
not by lm-eval's HFLM over a transformers model that only resembles the file.
`RuntimeLM` answers lm-eval's three request kinds with the runtime's
`score` and `generate` on ids from the HF tokenizer kept beside the artifact.

Tokenization is HFLM's for causal models (lm-eval's own `TemplateLM`
splits context and continuation: encode both together, cut at the
context's length, move a trailing space of the context into the
continuation; `tok_encode` adds special tokens as HFLM does), so on a file
that holds the same weights the numbers are HFLM's up to the runtime's
arithmetic. Two places differ, both only on inputs longer than the
runtime's context L: a request is cut from the left to its last L tokens
(HFLM feeds L inputs and predicts the (L+1)-th, a runtime's `score` takes L
tokens in all), and rolling windows hold L tokens each instead of L + 1.
"""

from __future__ import annotations

from typing import Any, Callable

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from factory.errors import StageFailed
from stations.runtime import Runtime

# lm-eval's default generation budget when a task names none (HFLM's too).
DEFAULT_MAX_GEN_TOKS = 256

# (context ids, continuation ids) and the lm-eval cache key they answer
# (None for the windows of a rolling request, which is cached whole).
TokenRequest = tuple[Any, list[int], list[int]]


class RuntimeLM(TemplateLM):
    """lm-eval `LM` scoring and generating with a `Runtime` (one sequence at a time)."""

    def __init__(self, runtime: Runtime, tokenizer: Any, *, seed: int = 0,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        super().__init__()
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.seed = seed  # request i samples with seed + i: repeats of a prompt differ, reruns do not
        self._max_gen_toks = max_gen_toks
        if len(tokenizer) > runtime.vocab_size:
            raise StageFailed(f"the tokenizer beside the {runtime.name} artifact has {len(tokenizer)} tokens, the "
                              f"model {runtime.vocab_size}: it is not this model's tokenizer; re-run the quant stage "
                              "that wrote the artifact")

    # ── what lm-eval reads ────────────────────────────────────────────────

    @property
    def max_length(self) -> int:
        return self.runtime.context_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on:
        BOS, else EOS, as HFLM."""
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return token
        raise StageFailed(f"the tokenizer beside the {self.runtime.name} artifact has neither a BOS nor an EOS "
                          "token, so an empty context or a perplexity task has nothing to condition on; give the "
                          "source model's tokenizer a bos_token or eos_token")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """HFLM's encoding: the tokenizer's own special tokens unless told,
        none where the text already starts with the prefix token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # ── the three request kinds ──────────────────────────────────────────

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p over the continuation in nats, whether every
        continuation token is the runtime's argmax) per request."""
        answers = []
        for key, context, continuation in requests:
            if not continuation:
                raise StageFailed(f"lm-eval asked {self.runtime.name} to score an empty continuation after "
                                  f"{key!r}; the task's choices must be non-empty text")
            if len(continuation) >= self.max_length:
                raise StageFailed(f"a {len(continuation)}-token continuation does not fit {self.runtime.name}'s "
                                  f"{self.max_length}-token context with a token before it; use a task with "
                                  "shorter answers or a model with a longer context")
            scored = self.runtime.score((context + continuation)[-self.max_length:])[-len(continuation):]
            answer = (sum(logprob for logprob, _ in scored), all(best for _, best in scored))
            answers.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood (perplexity tasks) over lm-eval's
        disjoint windows of at most L tokens: each predicts tokens no earlier
        window predicted, so every token is scored exactly once."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [(None, context, predicted) for context, predicted in map(
                make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1))]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The runtime's continuation of each context, stopped at the first
        `until` string (or EOS, or max_gen_toks) and cut before it."""
        eos = None if self.eot_token_id is None else self.tokenizer.decode(self.eot_token_id,
                                                                           skip_special_tokens=False)
        texts = []
        for i, (context, gen_kwargs) in enumerate(request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs["max_gen_toks"]
            if budget >= self.max_length:
                raise StageFailed(f"the task asks for {budget} generated tokens, {self.runtime.name}'s context holds "
                                  f"{self.max_length} in all; set the task's max_gen_toks below it")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - budget)
            generated = self.runtime.generate(prompt, max_new_tokens=budget, temperature=temperature,
                                              seed=self.seed + i, stop=self._stop_at(until))
            text = postprocess_generated_text(self.tokenizer.decode(generated, skip_special_tokens=True),
                                              stop=until, think_end_token=None)
            texts.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return texts

    def _stop_at(self, until: list[str]) -> Callable[[list[int]], bool]:
        """Whether the text generated so far holds a stop string (special
        tokens spelled out, so a stop such as "<|im_end|>" is seen)."""
        stops = [s for s in until if s]
        return lambda generated: any(s in self.tokenizer.decode(generated, skip_special_tokens=False) for s in stops)
