"""Train the tiny example MoE in examples/tiny-moe/ from the shipped corpora.

A real `qwen3_moe` checkpoint (4 layers x 16 experts, top-2, hidden 128), small
enough to ship in the repo and to run the whole factory on a laptop CPU, and
trained enough that expert profiling means something: code and prose are mixed
in every batch, so routers learn to send the two domains to partly different
experts, and the router aux (load-balancing) loss keeps every expert in use.

Phases (main): 1. byte-level BPE tokenizer on the train splits; 2. token blocks
of SEQ_LEN+1; 3. AdamW with warm-up + cosine decay; 4. save bf16 safetensors
with config, generation config and tokenizer; 5. reload the saved files, measure
held-out perplexity and per-domain expert use; 6. write TRAINING.md with the
modelHash (factory.integrity).

    python examples/train_tiny_moe.py                       # the shipped model
    python examples/train_tiny_moe.py --steps 40 --out /tmp/tiny-moe-smoke

Deterministic for a given torch build and thread count (both are fixed here and
recorded in TRAINING.md); a different build may differ in the last bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent
CORPORA = EXAMPLES / "corpora"
DOMAINS = ("code", "prose")
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights; written into TRAINING.md."""

    seed: int = 0
    threads: int = 2  # fixed: CPU reductions (and so the bits) depend on it
    vocab_size: int = 4096  # byte-level BPE; embeddings + lm_head are 1M of the 4.4M parameters
    hidden: int = 128
    layers: int = 4
    experts: int = 16
    top_k: int = 2
    moe_intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32  # hidden / heads
    seq_len: int = 256
    batch: int = 16  # 4096 tokens a step
    steps: int = 600  # ~4 epochs of the ~0.63M training tokens: 0.5 s/step on 2 free cores, ~3 s when shared
    lr: float = 2e-3  # high for AdamW, fine for a 4M-parameter model with warm-up and clipping
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_coef: float = 0.02  # per-layer load balancing; above Qwen's 0.001 to keep all 16 experts busy
    eval_blocks: int = 64  # per domain, for the final perplexity


# ── 1. data and tokenizer ───────────────────────────────────────────────────


def read_texts(domain: str, split: str) -> list[str]:
    """The "text" of every line of examples/corpora/<domain>.<split>.jsonl."""
    path = CORPORA / f"{domain}.{split}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def train_tokenizer(texts: list[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on `texts`, in the order given."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=4096)


def token_blocks(tok: PreTrainedTokenizerFast, texts: list[str], *, seq_len: int) -> torch.Tensor:
    """Documents joined with EOS and cut into [N, seq_len + 1] blocks (tail dropped)."""
    ids: list[int] = []
    for text in texts:
        ids += tok.backend_tokenizer.encode(text, add_special_tokens=False).ids + [tok.eos_token_id]
    n = len(ids) // (seq_len + 1)
    return torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


# ── 2. model and schedule ───────────────────────────────────────────────────


def build_model(cfg: TrainConfig, tok: PreTrainedTokenizerFast) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        intermediate_size=4 * cfg.hidden,  # unused: every layer is sparse (decoder_sparse_step 1)
        moe_intermediate_size=cfg.moe_intermediate, num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=True, max_position_embeddings=1024,
        router_aux_loss_coef=cfg.router_aux_coef, output_router_logits=False,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return Qwen3MoeForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ── 3. training ─────────────────────────────────────────────────────────────


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], cfg: TrainConfig) -> torch.Tensor:
    """Switch-style load-balancing loss, balanced within each layer, averaged.

    The model's own aux loss (output_router_logits with labels) pools all
    layers' routing before balancing, so a layer can leave experts idle while
    another layer over-uses them and the pooled loss still reads "balanced";
    a first run here ended with 3-4 dead experts in layers 1-3 that way.
    """
    per_layer = [load_balancing_loss_func((logits,), cfg.experts, cfg.top_k)
                 for logits in router_logits]  # each (B*T, E) -> scalar; top_k (2.0) when balanced
    return torch.stack(per_layer).mean()


def train(model: Qwen3MoeForCausalLM, blocks: torch.Tensor, cfg: TrainConfig) -> list[str]:
    """AdamW over seeded per-epoch permutations of `blocks`; returns the log lines."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
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
        x = batch[:, :-1]  # (B, T); the extra token is x's last target
        out = model(input_ids=x, output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        aux = per_layer_balance_loss(out.router_logits, cfg)
        loss = ce + cfg.router_aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            line = (f"step {step:5d}  ce {ce.item():.4f}  aux {aux.item():.4f}  "
                    f"lr {lr_at(step, cfg):.2e}  {time.monotonic() - t0:.0f}s")
            print(line, flush=True)
            log.append(line)
    return log


# ── 4. evaluation of the saved files ────────────────────────────────────────


@torch.no_grad()
def evaluate(model_dir: Path, cfg: TrainConfig) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Held-out perplexity per domain and top-k expert counts [layer][expert].

    Loads the saved bf16 files with stock from_pretrained and computes in fp32
    (bf16 weights upcast), on the first `eval_blocks` blocks of each eval split.
    """
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl, usage = {}, {}
    for domain in DOMAINS:
        blocks = token_blocks(tok, read_texts(domain, "eval"), seq_len=cfg.seq_len)[: cfg.eval_blocks]
        nll, counts = 0.0, torch.zeros(cfg.layers, cfg.experts, dtype=torch.long)
        for chunk in blocks.split(cfg.batch):
            x = chunk[:, :-1]
            out = model(input_ids=x, labels=x.clone(), output_router_logits=True)
            nll += out.loss.item() - cfg.router_aux_coef * out.aux_loss.item()
            for layer, logits in enumerate(out.router_logits):  # (B*T, E) each
                picks = logits.topk(cfg.top_k, dim=-1).indices.flatten()
                counts[layer] += torch.bincount(picks, minlength=cfg.experts)
        ppl[domain] = math.exp(nll / len(blocks.split(cfg.batch)))
        usage[domain] = counts.tolist()
    return ppl, usage


# ── 5. report ───────────────────────────────────────────────────────────────


def usage_table(usage: dict[str, list[list[int]]]) -> str:
    """Per layer and expert: share of routed code/prose tokens (%)."""
    rows = ["| layer | " + " | ".join(f"e{e}" for e in range(len(usage["code"][0]))) + " |",
            "|---|" + "---|" * len(usage["code"][0])]
    for layer, (code, prose) in enumerate(zip(usage["code"], usage["prose"])):
        cells = [f"{100 * c / sum(code):.0f}/{100 * p / sum(prose):.0f}" for c, p in zip(code, prose)]
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(out: Path, *, cfg: TrainConfig, command: str, wall_s: float, n_params: int,
                 tokens: dict[str, int], ppl: dict[str, float],
                 usage: dict[str, list[list[int]]], log: list[str]) -> str:
    """TRAINING.md beside the weights; returns the modelHash it records."""
    sys.path.insert(0, str(REPO))
    from factory.integrity import hash_model_dir, model_hash

    digest = model_hash(hash_model_dir(out))
    text = f"""# tiny-moe: training record

A tiny `qwen3_moe` trained from scratch on the shipped corpora
(`examples/corpora/`, see its SOURCES.md), so the factory can profile, prune,
evaluate and package a real MoE without any download.

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
(vocabulary {cfg.vocab_size}, so a uniform guess is {cfg.vocab_size}):

| split | perplexity |
|---|---|
| code.eval | {ppl["code"]:.2f} |
| prose.eval | {ppl["prose"]:.2f} |

## Reproducing

The data order, initialisation and tokenizer are seeded, so rerunning the
command gives the same weights **only with the same torch build and the same
thread count** ({cfg.threads}; the script fixes it): CPU kernels reduce in
an order that depends on both, and the bits of the result with them. On
another build expect close perplexities, not the same modelHash. The tests
check the shipped files, not a retrain.

## Configuration

```json
{json.dumps(asdict(cfg), indent=2)}
```

## Expert use on the eval splits

Share of top-{cfg.top_k} routing slots per expert, code% / prose% (each domain's
row sums to 100%). Experts with a high code share and a low prose share are
what a code-targeted prune keeps.

{usage_table(usage)}

## Training log

```
{chr(10).join(log)}
```
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES / "tiny-moe")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps)
    # OMP_WAIT_POLICY=PASSIVE stops idle OpenMP threads spinning on a shared
    # machine; it changes speed, not results, but is recorded as it was run.
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY",) if k in os.environ)
    command = env + "python " + " ".join(shlex.quote(a) for a in
                                         ["examples/train_tiny_moe.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()

    # 1. tokenizer on code.train + prose.train, in file order
    train_texts = {d: read_texts(d, "train") for d in DOMAINS}
    tok = train_tokenizer(train_texts["code"] + train_texts["prose"], vocab_size=cfg.vocab_size)
    # 2. blocks: both domains in one pool, so every batch mixes them
    blocks = {d: token_blocks(tok, train_texts[d], seq_len=cfg.seq_len) for d in DOMAINS}
    tokens = {d: blocks[d].numel() for d in DOMAINS}
    print(f"blocks: code {len(blocks['code'])}, prose {len(blocks['prose'])}", flush=True)
    # 3. train
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)
    log = train(model, torch.cat([blocks["code"], blocks["prose"]]), cfg)
    # 4. save bf16 (transformers writes experts per expert: experts.{e}.{gate,up,down}_proj)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, max_new_tokens=64).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    # 5. evaluate what was saved, 6. record
    ppl, usage = evaluate(args.out, cfg)
    digest = write_report(args.out, cfg=cfg, command=command, wall_s=time.monotonic() - t0,
                          n_params=n_params, tokens=tokens, ppl=ppl, usage=usage, log=log)
    print(f"perplexity: code {ppl['code']:.2f}, prose {ppl['prose']:.2f}; modelHash {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
