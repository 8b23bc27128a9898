"""lm-eval tasks on a quantized artifact through its own runtime
(stations/benchmarks/runtime_lm.py): on a GGUF that holds the source's
float32 weights, `RuntimeLM` over llama.cpp answers lm-eval's requests as
lm-eval's HFLM answers them over the transformers model, and a whole task
through the benchmark runner scores the same.

Why the agreement is close but not exact: llama.cpp keeps its KV cache in
float16 by default (what a deployed GGUF runs with), so every key and value
is rounded to 11 significant bits. On this model that moves a request's
log-likelihood by up to 4.5e-4 nats a token (measured: 0.007 nats on a
16-token continuation; llama.cpp with a float32 KV cache agrees with
transformers to under 1e-4 a token, so the rounding is the KV cache's);
PER_TOKEN_NATS allows 1e-3 per scored token. A
tokenization slip (an off-by-one split, a missing BOS) moves the numbers by
whole nats, far beyond it, and the choices of one question differ by more
than it, so the comparison can fail.

The model is random-weight but real (llama, widths that are multiples of
mlx-lm's group size so the MLX case packs every matrix), with
initializer_range 0.2: the default 0.02 gives near-flat distributions whose
top two tokens tie to 1e-5, closer than the KV rounding, so argmax ("is
greedy") would not be a property of the weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory import quant_support
from factory.errors import StageFailed
from stations.benchmarks import BenchJob
from stations.benchmarks import lm_eval as lm_eval_runner
from stations.loader import Loaded
from tests.linekit import make_root
from tests.stationkit import make_ctx
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

pytest.importorskip("lm_eval")
pytest.importorskip("llama_cpp")

from lm_eval.api.instance import Instance  # noqa: E402 (after the skips)
from lm_eval.models.huggingface import HFLM  # noqa: E402

from stations.benchmarks.runtime_lm import RuntimeLM  # noqa: E402
from stations.llama_cpp_runtime import open_gguf  # noqa: E402

SHAPE = {"hidden_size": 64, "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 512,
         "initializer_range": 0.2}
PER_TOKEN_NATS = 1e-3  # llama.cpp's float16 KV cache against transformers' float32 (module doc)
MLX_PER_TOKEN_NATS = 0.05  # 8-bit weights against float32 ones (the MLX test's doc)
REQUESTS = [  # (context, continuation): lm-eval's shapes, a trailing space and an empty context among them
    ("Question: What is 2 plus 2?\nAnswer:", " 4"),
    ("Question: What is 2 plus 2?\nAnswer:", " seven"),
    ("The quick brown fox ", "jumps over the lazy dog."),
    ("", "def add(a, b): return a + b"),
    ("x = 1\n", "y = x + 1"),
]
ARC_DOCS = [{"id": f"q{i}", "question": f"What is {i} plus {i}?",
             "choices": {"text": [str(2 * i), str(i + 1), "seven", f"{i} apples"], "label": ["A", "B", "C", "D"]},
             "answerKey": "A"} for i in range(8)]
GSM_DOCS = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"} for i in range(2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(root, source dir, HFLM over the float32 transformers model, RuntimeLM
    over llama.cpp on an f32 GGUF of the same weights)."""
    import torch
    import transformers

    root = make_root(tmp_path_factory.mktemp("lm-eval-runtime") / "root")
    src = add_tokenizer(build_tiny_model("llama", root / "models" / "src", vocab_size=TOKENIZER_VOCAB, **SHAPE))
    gguf = root / "models" / "src-f32.gguf"
    subprocess.run([sys.executable, "-m", "stations.gguf_convert", str(src), str(gguf), "--outtype", "f32"],
                   check=True, capture_output=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    runtime = open_gguf(gguf)
    yield root, src, HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), RuntimeLM(runtime, tokenizer)
    runtime.close()


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _token_count(hflm: HFLM, context: str, continuation: str) -> int:
    """How many tokens a request scores (what the tolerance scales with)."""
    return len(hflm._encode_pair(context, continuation)[1]) if context else len(hflm.tok_encode(continuation))


# ── the three request kinds against HFLM ────────────────────────────────────


def test_loglikelihood_agrees_with_hflm_on_the_same_weights(models):
    _, _, hflm, runtime_lm = models
    requests = _instances("loglikelihood", REQUESTS)
    theirs, ours = hflm.loglikelihood(requests), runtime_lm.loglikelihood(requests)
    for (context, continuation), (hf_lp, hf_greedy), (rt_lp, rt_greedy) in zip(REQUESTS, theirs, ours):
        assert rt_lp < 0 and abs(rt_lp - hf_lp) <= PER_TOKEN_NATS * _token_count(hflm, context, continuation), (
            context, continuation, hf_lp, rt_lp)
        assert rt_greedy is hf_greedy
    assert abs(ours[0][0] - ours[1][0]) > 100 * PER_TOKEN_NATS  # the two answers are told apart, by far


def test_the_greedy_continuation_is_greedy_in_both(models):
    """A continuation the source generates greedily is every token's argmax
    in llama.cpp too, and one token changed is not."""
    import torch

    _, _, hflm, runtime_lm = models
    ids = hflm.tok_encode("def add(a, b):")
    greedy = runtime_lm.runtime.generate(ids, max_new_tokens=6, temperature=0.0, seed=0, stop=lambda _: False)
    hf_greedy = hflm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert greedy == hf_greedy[0, len(ids):].tolist()
    other = greedy[:3] + [(greedy[3] + 1) % TOKENIZER_VOCAB] + greedy[4:]
    scored = runtime_lm._loglikelihood_tokens([(None, ids, greedy), (None, ids, other)])
    assert [best for _, best in scored] == [True, False]
    assert scored[0][0] > scored[1][0]


def test_rolling_loglikelihood_scores_every_token_once(models):
    """A text longer than the 512-token context: the total is the sum of
    per-token log-probabilities over lm-eval's disjoint windows (the last
    one filled out to the whole context with tokens already scored), and
    HFLM's over the same windows."""
    _, _, hflm, runtime_lm = models
    text = "The quick brown fox jumps over the lazy dog. " * 24
    tokens = runtime_lm.tok_encode(text)
    assert len(tokens) > runtime_lm.max_length
    [total] = runtime_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    runtime = runtime_lm.runtime
    window = runtime.context_length
    assert len(tokens) < 2 * window - 1  # two windows: the prefix token and the first window - 1 tokens, ...
    first = runtime.score([runtime_lm.prefix_token_id] + tokens[:window - 1])
    rest = runtime.score(tokens[-window:])[window - 1 - len(tokens):]  # ... the last window, scoring the rest
    assert len(first) + len(rest) == len(tokens)
    assert total == pytest.approx(sum(lp for lp, _ in first + rest), abs=1e-6)
    # HFLM's windows are one token longer (it predicts the token after its
    # last input); told one token less of context, it cuts the same windows
    same_windows = HFLM(pretrained=hflm.model, tokenizer=hflm.tokenizer, batch_size=1, max_length=window - 1)
    [hf_total] = same_windows.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    assert abs(total - hf_total) <= PER_TOKEN_NATS * len(tokens)


def test_generate_until_stops_at_the_until_string_and_matches_hflm(models):
    _, _, hflm, runtime_lm = models
    context = "def add(a, b):"
    free = runtime_lm.generate_until(_instances("generate_until", [(context, {"until": [], "max_gen_toks": 24})]))[0]
    assert free == hflm.generate_until(_instances("generate_until", [(context, {"until": [], "max_gen_toks": 24})]))[0]
    stop = free[len(free) // 2:len(free) // 2 + 2]  # two characters the model writes mid-way
    assert stop and free.index(stop) > 0

    calls = []
    runtime = runtime_lm.runtime
    recording = RuntimeLM(_Recording(runtime, calls), runtime_lm.tokenizer)
    args = [(context, {"until": [stop], "max_gen_toks": 24, "do_sample": False})]
    [cut] = recording.generate_until(_instances("generate_until", args))
    assert cut == free[:free.index(stop)]
    assert cut == hflm.generate_until(_instances("generate_until", args))[0]
    assert len(calls[0]) < 24  # the runtime stopped when the text held the stop string, not at the budget


class _Recording:
    """The runtime, remembering what each generate call returned."""

    def __init__(self, runtime, calls: list) -> None:
        self._runtime, self._calls = runtime, calls
        self.name, self.vocab_size, self.context_length = runtime.name, runtime.vocab_size, runtime.context_length

    def score(self, ids):
        return self._runtime.score(ids)

    def generate(self, ids, **kwargs):
        out = self._runtime.generate(ids, **kwargs)
        self._calls.append(out)
        return out


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(models):
    _, _, _, runtime_lm = models
    smaller = _Recording(runtime_lm.runtime, [])
    smaller.vocab_size = len(runtime_lm.tokenizer) - 1
    with pytest.raises(StageFailed, match="not this model's tokenizer; re-run the quant stage"):
        RuntimeLM(smaller, runtime_lm.tokenizer)


def test_a_budget_the_context_cannot_hold_is_refused_naming_the_fix(models):
    _, _, _, runtime_lm = models
    with pytest.raises(StageFailed, match="set the task's max_gen_toks below it"):
        runtime_lm.generate_until(_instances("generate_until", [("x", {"until": [], "max_gen_toks": 512})]))


# ── whole tasks through the benchmark runner ────────────────────────────────


def _jobs(root: Path, hflm: HFLM, runtime_lm: RuntimeLM, benchmark: dict) -> tuple[BenchJob, BenchJob]:
    """The same benchmark entry on the transformers model and on the GGUF,
    sharing lm-eval's task index as the eval station's two roles do."""
    alloy = {"name": "runtime-lm-test", "version": "1.0.0",
             "source": {"baseModel": "models/src", "architecture": "llama"},
             "stages": [{"type": "eval", "benchmarks": [benchmark]}]}
    ctx = make_ctx(root, alloy, 0)
    spec, shared = ctx.stage.benchmarks[0], {}
    loaded = {"source": Loaded(model=hflm.model, tokenizer=hflm.tokenizer, plan=None, device="cpu", dtype="float32",
                               load_seconds=0.0, peak_rss_mb=0.0, peak_vram_mb=None),
              "forged": Loaded(model=None, tokenizer=runtime_lm.tokenizer, plan=None, device="cpu", dtype="F32",
                               load_seconds=0.0, peak_rss_mb=0.0, peak_vram_mb=None, runtime=runtime_lm.runtime)}
    return tuple(BenchJob(ctx=ctx, spec=spec, loaded=loaded[role], role=role, out_dir=ctx.stage_dir, shared=shared)
                 for role in ("source", "forged"))


def _with_data(root: Path, task: str, docs: list[dict]) -> None:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "factory_node.toml").write_text(f'[benchmarks]\n{task} = "data/{task}.jsonl"\n')


def test_arc_challenge_on_the_gguf_scores_what_hflm_scores_on_its_source(models):
    """Multiple choice: each document's answer is the choice of highest
    log-likelihood, and the choices differ by far more than llama.cpp's
    rounding, so accuracy and length-normalised accuracy are identical."""
    root, _, hflm, runtime_lm = models
    _with_data(root, "arc_challenge", ARC_DOCS)
    source, forged = (lm_eval_runner.run(job) for job in _jobs(root, hflm, runtime_lm, {"name": "arc_challenge"}))
    assert source["runtime"] == "transformers" and forged["runtime"] == "llama.cpp"
    assert forged["docs"] == {"arc_challenge": len(ARC_DOCS)} and forged["metric"] == "acc,none"
    assert 0.0 <= forged["score"] <= 1.0 and forged["score"] * len(ARC_DOCS) == round(forged["score"] * len(ARC_DOCS))
    for metric in ("acc,none", "acc_norm,none"):
        assert forged["metrics"]["arc_challenge"][metric] == source["metrics"]["arc_challenge"][metric], metric
    assert forged["score"] == source["score"]


def test_gsm8k_generates_on_the_gguf_as_hflm_does_on_its_source(models):
    """Generation: lm-eval's gsm8k prompt, until strings and filters over
    llama.cpp's greedy text. A random model answers no question, so the
    scores (0 both) say little; the texts themselves are HFLM's."""
    root, _, hflm, runtime_lm = models
    _with_data(root, "gsm8k", GSM_DOCS)
    calls: list[list[int]] = []
    recording = RuntimeLM(_Recording(runtime_lm.runtime, calls), runtime_lm.tokenizer)
    benchmark = {"name": "gsm8k", "nShot": 0, "metric": "exact_match,flexible-extract"}
    source, forged = (lm_eval_runner.run(job) for job in _jobs(root, hflm, recording, benchmark))
    assert forged["docs"] == {"gsm8k": len(GSM_DOCS)} and 0.0 <= forged["score"] <= 1.0
    assert forged["metrics"]["gsm8k"] == source["metrics"]["gsm8k"]
    gen_kwargs = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0}
    prompts = [(f"Question: {d['question']}\nAnswer:", gen_kwargs) for d in GSM_DOCS]  # gsm8k.yaml's doc_to_text
    expected = hflm.generate_until(_instances("generate_until", prompts))
    texts = [runtime_lm.tokenizer.decode(c, skip_special_tokens=True) for c in calls]  # before the cut at a stop
    assert len(texts) == len(GSM_DOCS) and all(expected)
    assert all(any(text.startswith(e) for text in texts) for e in expected)


# ── MLX ─────────────────────────────────────────────────────────────────────


@pytest.mark.skipif(quant_support.mlx_problem() is not None, reason=f"mlx: {quant_support.mlx_problem()}")
def test_an_8bit_mlx_model_scores_near_hflm_on_its_source(models, tmp_path):
    """mlx-lm at 8 bits (affine, groups of 64) against the float32 source:
    the weight rounding moves a token by up to ~0.02 nats here (measured),
    so the bound is loose (MLX_PER_TOKEN_NATS), yet far below the gap
    between the two answers of the first question."""
    from stations import quant_mlx
    from stations.mlx_runtime import open_mlx

    _, src, hflm, _ = models
    config = quant_mlx.mlx_config(json.loads((src / "config.json").read_text()), model_type="llama")
    staged = quant_mlx.stage_source(src, tmp_path / "staged", config)
    quant_mlx.convert(staged, tmp_path / "mlx-8bit", bits=8)
    runtime = open_mlx(tmp_path / "mlx-8bit")
    try:
        requests = _instances("loglikelihood", REQUESTS)
        theirs, ours = hflm.loglikelihood(requests), RuntimeLM(runtime, hflm.tokenizer).loglikelihood(requests)
    finally:
        runtime.close()
    for (context, continuation), (hf_lp, _), (mlx_lp, _) in zip(REQUESTS, theirs, ours):
        assert abs(mlx_lp - hf_lp) <= MLX_PER_TOKEN_NATS * _token_count(hflm, context, continuation), (
            continuation, hf_lp, mlx_lp)
    bound = MLX_PER_TOKEN_NATS * sum(_token_count(hflm, *request) for request in REQUESTS[:2])
    assert abs(ours[0][0] - ours[1][0]) > 10 * bound
