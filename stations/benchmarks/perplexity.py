"""Held-out perplexity of the source and the forged model on the same tokens.

The corpus is tokenised ONCE, with the source model's tokenizer, into blocks
of `evalBlockSize` tokens (at most `evalTokens` in all); both models score
exactly those blocks, so the two numbers differ only by the weights. Blocks
are right-padded into batches; pads carry label -100 and attention 0, so
they neither count as tokens nor leak into the loss. The first token of a
block has no context and is not predicted: `tokens` counts predicted tokens.
"""

from __future__ import annotations

import dataclasses
import math

from factory.errors import StageFailed
from stations import corpus as corpora
from stations.benchmarks import BenchJob

FILE_KEYS = ("evalCorpusFile", "heldOutCorpusFile")
ID_KEYS = ("evalCorpus", "heldOutCorpus")
# 512-token blocks fit any model's context and a small GPU's activations;
# 64Ki tokens put the perplexity's standard error well under 1 %.
DEFAULT_BLOCK = 512
DEFAULT_TOKEN_BUDGET = 65536
DEFAULT_BATCH = 4
# What the default batch's float32 logits may take: a batch holds them
# (B x T x vocab) and cross_entropy's log-softmax beside them. Four 512-token
# blocks of a 262k vocabulary (Gemma 3) would be 4 GiB of logits, one 0.5.
LOGITS_BUDGET_BYTES = 1 << 30
IGNORE = -100  # transformers' ignore_index for labels


def resolve_corpus(job: BenchJob) -> corpora.Corpus:
    """The corpus the stage names, or the benchmark entry's `subset` (a
    calibrationCorpora id, else a path inside the factory root)."""
    ctx, subset = job.ctx, job.spec.subset
    if subset:
        ids = {name for c in ctx.recipe.calibration_corpora or [] for name in (c.id, c.name)}
        field = "eval_corpus" if subset in ids else "eval_corpus_file"
        ctx = dataclasses.replace(ctx, stage=ctx.stage.model_copy(update={field: subset}))
    return corpora.resolve(ctx, file_keys=FILE_KEYS, id_keys=ID_KEYS)


def _blocks(job: BenchJob) -> dict:
    """Token blocks from the corpus (computed on the first model, reused)."""
    if "blocks" in job.shared:
        return job.shared
    tok = job.loaded.tokenizer
    if tok is None:
        raise StageFailed(f"perplexity needs a tokenizer beside the {job.role} model; add the tokenizer files")
    corpus = resolve_corpus(job)
    model_max = _context_length(job.loaded) or DEFAULT_BLOCK
    block = int(job.option("eval_block_size", min(DEFAULT_BLOCK, model_max)))
    budget = int(job.option("eval_tokens", DEFAULT_TOKEN_BUDGET))
    blocks = corpora.read_blocks(tok, corpus, block=block, budget=budget)
    if not any(len(b) > 1 for b in blocks):
        raise StageFailed(f"corpus {corpus.path} gives fewer than 2 tokens; perplexity needs real text")
    job.shared.update(blocks=blocks, corpus=corpus, block=block,
                      pad=tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
    return job.shared


def _context_length(loaded) -> int | None:
    if loaded.runtime is not None:
        return loaded.runtime.context_length
    return getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)


def _check_vocab(job: BenchJob, blocks: list[list[int]]) -> None:
    runtime = job.loaded.runtime
    vocab = runtime.vocab_size if runtime is not None else job.loaded.model.get_input_embeddings().weight.shape[0]
    top = max(max(b) for b in blocks if b)
    if top >= vocab:
        raise StageFailed(f"token id {top} from the source tokenizer is outside the {job.role} model's "
                          f"vocabulary ({vocab}); perplexity needs models that share a tokenizer")


def batch_size(job: BenchJob, block: int) -> int:
    """The alloy's evalBatchSize, else DEFAULT_BATCH blocks, fewer where
    their logits would pass LOGITS_BUDGET_BYTES (large vocabularies)."""
    asked = job.option("eval_batch_size")
    if asked is not None:
        return int(asked)
    head = job.loaded.model.get_output_embeddings() or job.loaded.model.get_input_embeddings()
    vocab = head.weight.shape[0]
    return max(1, min(DEFAULT_BATCH, LOGITS_BUDGET_BYTES // (2 * 4 * block * vocab)))


def runtime_nll_sum(job: BenchJob, blocks: list[list[int]]) -> tuple[float, int]:
    """nll_sum for a quantized artifact, scored block by block by its own
    runtime (llama.cpp, mlx-lm) on the same token ids."""
    longest, context = max(len(b) for b in blocks), job.loaded.runtime.context_length
    if longest > context:
        raise StageFailed(f"perplexity blocks of {longest} tokens exceed the {context}-token context of the "
                          f"{job.loaded.runtime.name} model; set the eval stage's evalBlockSize to {context} or less")
    total, count = 0.0, 0
    for i, block in enumerate(blocks):
        if len(block) > 1:
            scored = job.loaded.runtime.score(block)
            nll = -sum(lp for lp, _ in scored)
            if not math.isfinite(nll):
                raise StageFailed(f"the {job.loaded.runtime.name} model gives non-finite log-probabilities on "
                                  f"perplexity block {i} ({len(block)} tokens): the quantized file does not run "
                                  "correctly in its runtime")
            total += nll
            count += len(scored)
        job.ctx.progress(i + 1, len(blocks), f"perplexity {job.role} blocks")
        job.ctx.stop_point()
    return total, count


def nll_sum(job: BenchJob, blocks: list[list[int]], *, pad: int, batch: int) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, predicted tokens) over `blocks`."""
    import torch
    import torch.nn.functional as F

    model, device = job.loaded.model, job.loaded.device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        chunk = blocks[start:start + batch]
        B, T = len(chunk), max(len(b) for b in chunk)
        ids = torch.full((B, T), pad, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, b in enumerate(chunk):
            ids[i, :len(b)] = torch.tensor(b)
            labels[i, :len(b)] = ids[i, :len(b)]
            mask[i, :len(b)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        shifted = labels[:, 1:].to(logits.device)  # token t+1 is predicted from positions <= t
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += int((shifted != IGNORE).sum())
        job.ctx.progress(min(start + batch, len(blocks)), len(blocks), f"perplexity {job.role} blocks")
        job.ctx.stop_point()
    return total, count


def run(job: BenchJob) -> dict:
    shared = _blocks(job)
    _check_vocab(job, shared["blocks"])
    if job.loaded.runtime is not None:
        total, count = runtime_nll_sum(job, shared["blocks"])
    else:
        total, count = nll_sum(job, shared["blocks"], pad=shared["pad"], batch=batch_size(job, shared["block"]))
    corpus = shared["corpus"]
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
            "blocks": len(shared["blocks"]), "block_size": shared["block"], "corpus": corpus.ref,
            "corpus_sha256": corpus.sha256}
