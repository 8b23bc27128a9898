"""Train the tiny example dense model in examples/tiny-dense/ from the shipped corpora.

A real `qwen3` checkpoint (4 layers, hidden 128, 4 query / 2 KV heads) for the
dense recipe (examples/dense.alloy.json: head prune + recovery LoRA). It reuses
the tiny MoE's byte-level BPE tokenizer (examples/tiny-moe/tokenizer*.json,
copied, not retrained), so both example models read the corpora as the same
tokens, and its data pipeline and schedule (`read_texts`, `token_blocks`,
`lr_at` from examples/train_tiny_moe.py).

Phases (main): 1. tokenizer files copied from examples/tiny-moe; 2. token
blocks of SEQ_LEN+1 from both train splits, one pool; 3. AdamW with warm-up +
cosine decay; 4. save bf16 safetensors with config and generation config;
5. reload the saved files, measure held-out perplexity; 6. write TRAINING.md
with the modelHash (factory.integrity).

    python examples/train_tiny_dense.py                        # the shipped model
    python examples/train_tiny_dense.py --steps 20 --out /tmp/tiny-dense-smoke

Deterministic for a given torch build and thread count (both fixed here and
recorded in TRAINING.md); a different build may differ in the last bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent
sys.path.insert(0, str(EXAMPLES))
from train_tiny_moe import DOMAINS, lr_at, read_texts, token_blocks

TOKENIZER_FROM = EXAMPLES / "tiny-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights; written into TRAINING.md."""

    seed: int = 0
    threads: int = 2  # fixed: CPU reductions (and so the bits) depend on it
    hidden: int = 128
    layers: int = 4
    intermediate: int = 384  # 3x hidden: the MLP is ~60% of the non-embedding weights
    heads: int = 4
    kv_heads: int = 2  # GQA groups of 2: a head prune at level 0.5 keeps whole groups
    head_dim: int = 32  # hidden / heads
    seq_len: int = 256
    batch: int = 16  # 4096 tokens a step
    steps: int = 400  # ~2.6 epochs of the ~0.63M training tokens; a few minutes on 2 cores
    lr: float = 3e-3  # high for AdamW, fine for a 2.6M-parameter model with warm-up and clipping
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_blocks: int = 64  # per domain, for the final perplexity


# ── 1-2. model ──────────────────────────────────────────────────────────────


def build_model(cfg: TrainConfig, tok: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return Qwen3ForCausalLM(config)


# ── 3. training ─────────────────────────────────────────────────────────────


def train(model: Qwen3ForCausalLM, blocks: torch.Tensor, cfg: TrainConfig) -> list[str]:
    """AdamW over seeded per-epoch permutations of `blocks`; returns the log lines."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    log, t0 = [], time.monotonic()
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch:  # new epoch: a fresh seeded permutation
            order = torch.cat([order, torch.randperm(len(blocks), generator=gen)])
        idx, order = order[: cfg.batch], order[cfg.batch:]
        batch = blocks[idx]  # (B, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            line = f"step {step:5d}  ce {loss.item():.4f}  lr {lr_at(step, cfg):.2e}  {time.monotonic() - t0:.0f}s"
            print(line, flush=True)
            log.append(line)
    return log


# ── 5. evaluation of the saved files ────────────────────────────────────────


@torch.no_grad()
def evaluate(model_dir: Path, cfg: TrainConfig) -> dict[str, float]:
    """Held-out perplexity per domain: the saved bf16 files, stock
    from_pretrained, computed in fp32, on the first `eval_blocks` blocks."""
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl = {}
    for domain in DOMAINS:
        blocks = token_blocks(tok, read_texts(domain, "eval"), seq_len=cfg.seq_len)[: cfg.eval_blocks]
        chunks = blocks.split(cfg.batch)
        nll = sum(model(input_ids=c[:, :-1], labels=c[:, :-1].clone()).loss.item() for c in chunks)
        ppl[domain] = math.exp(nll / len(chunks))
    return ppl


# ── 6. report ───────────────────────────────────────────────────────────────


def write_report(out: Path, *, cfg: TrainConfig, command: str, wall_s: float, n_params: int,
                 tokens: dict[str, int], ppl: dict[str, float], log: list[str]) -> str:
    """TRAINING.md beside the weights; returns the modelHash it records."""
    sys.path.insert(0, str(REPO))
    from factory.integrity import hash_model_dir, model_hash

    digest = model_hash(hash_model_dir(out))
    text = f"""# tiny-dense: training record

A tiny dense `qwen3` trained from scratch on the shipped corpora
(`examples/corpora/`, see its SOURCES.md) for the dense example recipe
(`examples/dense.alloy.json`: attention-head prune + recovery LoRA). Its
tokenizer is examples/tiny-moe's, copied byte for byte, so both example
models see the corpora as the same tokens.

- modelHash: `{digest}`
- command: `{command}`
- wall time: {wall_s / 60:.1f} min (training + save + evaluation) on {cfg.threads} CPU threads
- seed: {cfg.seed}; torch {torch.__version__}, transformers {transformers.__version__}, \
Python {platform.python_version()}, {platform.machine()}
- parameters: {n_params:,}; training tokens: code {tokens["code"]:,}, prose {tokens["prose"]:,}
  ({cfg.steps} steps x {cfg.batch} x {cfg.seq_len} = {cfg.steps * cfg.batch * cfg.seq_len:,} tokens seen)

## Held-out perplexity

Saved bf16 weights, reloaded with `AutoModelForCausalLM.from_pretrained` and
run in fp32, on the first {cfg.eval_blocks} blocks of {cfg.seq_len} tokens of each eval split
(vocabulary {n_vocab(out)}, so a uniform guess is {n_vocab(out)}):

| split | perplexity |
|---|---|
| code.eval | {ppl["code"]:.2f} |
| prose.eval | {ppl["prose"]:.2f} |

## Reproducing

Data order, initialisation and tokenizer are fixed, so rerunning the command
gives the same weights **only with the same torch build and the same thread
count** ({cfg.threads}; the script fixes it): CPU kernels reduce in an order that
depends on both. On another build expect close perplexities, not the same
modelHash.

## Configuration

```json
{json.dumps(asdict(cfg), indent=2)}
```

## Training log

```
{chr(10).join(log)}
```
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")
    return digest


def n_vocab(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES / "tiny-dense")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps)
    # OMP_WAIT_POLICY=PASSIVE stops idle OpenMP threads spinning on a shared
    # machine; it changes speed, not results, but is recorded as it was run.
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY",) if k in os.environ)
    command = env + "python " + " ".join(shlex.quote(a) for a in
                                         ["examples/train_tiny_dense.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()

    # 1. the tiny MoE's tokenizer, copied byte for byte
    args.out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(TOKENIZER_FROM / name, args.out / name)
    tok = PreTrainedTokenizerFast.from_pretrained(args.out)
    # 2. blocks: both domains in one pool, so every batch mixes them
    blocks = {d: token_blocks(tok, read_texts(d, "train"), seq_len=cfg.seq_len) for d in DOMAINS}
    tokens = {d: blocks[d].numel() for d in DOMAINS}
    print(f"blocks: code {len(blocks['code'])}, prose {len(blocks['prose'])}", flush=True)
    # 3. train
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)
    log = train(model, torch.cat([blocks["code"], blocks["prose"]]), cfg)
    # 4. save bf16
    model.to(torch.bfloat16).save_pretrained(args.out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, max_new_tokens=64).save_pretrained(args.out)
    # 5. evaluate what was saved, 6. record
    ppl = evaluate(args.out, cfg)
    digest = write_report(args.out, cfg=cfg, command=command, wall_s=time.monotonic() - t0,
                          n_params=n_params, tokens=tokens, ppl=ppl, log=log)
    print(f"perplexity: code {ppl['code']:.2f}, prose {ppl['prose']:.2f}; modelHash {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
