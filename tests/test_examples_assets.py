"""The shipped example assets: corpora match SOURCES.md, the tiny MoE is real and trained.

These files are what a new user runs the factory on without any download, and
what the example alloys pin by sha256, so their bytes are checked here, not
just their presence.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from factory.integrity import hash_model_dir, model_hash, sha256_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CORPORA = EXAMPLES / "corpora"
MODEL_DIR = EXAMPLES / "tiny-moe"
DOMAINS = ("code", "prose")
SPLITS = ("train", "calib", "eval")
CORPUS_FILES = [f"{d}.{s}.jsonl" for d in DOMAINS for s in SPLITS]
# A table row of SOURCES.md: | file | docs | bytes | `sha256` |
_SOURCES_ROW = re.compile(r"^\|\s*(\S+\.jsonl)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`([0-9a-f]{64})`\s*\|", re.MULTILINE)
_MODEL_HASH = re.compile(r"modelHash: `(sha256:[0-9a-f]{64})`")


def _records(name: str) -> list[dict]:
    lines = (CORPORA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


# ── corpora ─────────────────────────────────────────────────────────────────


def test_sources_md_pins_every_corpus_file():
    rows = {m[0]: m for m in _SOURCES_ROW.findall((CORPORA / "SOURCES.md").read_text())}
    assert sorted(rows) == sorted(CORPUS_FILES)
    for name, (_, docs, size, digest) in rows.items():
        path = CORPORA / name
        assert sha256_file(path) == digest, f"{name}: bytes differ from SOURCES.md"
        assert path.stat().st_size == int(size)
        assert len(_records(name)) == int(docs)


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_every_line_is_a_document_with_text(name):
    for i, rec in enumerate(_records(name)):
        assert isinstance(rec.get("text"), str) and rec["text"].strip(), f"{name}:{i + 1}"
        assert isinstance(rec.get("id"), str) and rec["id"]


def test_splits_share_no_documents():
    seen_ids: dict[str, str] = {}
    seen_texts: dict[str, str] = {}
    for name in CORPUS_FILES:
        for rec in _records(name):
            assert seen_ids.setdefault(rec["id"], name) == name, f"id {rec['id']} in two files"
            assert seen_texts.setdefault(rec["text"], name) == name, f"{rec['id']}: text in two files"


def test_split_sizes_are_what_the_examples_expect():
    for domain in DOMAINS:
        sizes = {s: (CORPORA / f"{domain}.{s}.jsonl").stat().st_size for s in SPLITS}
        assert 100_000 <= sizes["calib"] <= 300_000 and 100_000 <= sizes["eval"] <= 300_000
        assert sizes["train"] <= 1_600_000


# ── the tiny MoE ────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_moe():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # fp32 compute over the bf16 weights: bf16 matmuls are slow on CPU.
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    return model, tok


def test_config_is_16_experts_top2_4_layers(tiny_moe):
    model, tok = tiny_moe
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (16, 2, 4)
    assert cfg.vocab_size == len(tok)
    assert None not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)


def test_checkpoint_stores_experts_one_tensor_each():
    from safetensors import safe_open

    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    expected = {f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"
                for layer in range(4) for e in range(16) for proj in ("gate", "up", "down")}
    assert expected <= names
    assert not any("gate_up_proj" in n for n in names)  # not the fused in-memory layout
    assert dtypes == {"BF16"}


def test_held_out_code_perplexity_shows_a_trained_model(tiny_moe):
    import torch

    model, tok = tiny_moe
    text = "\n".join(rec["text"] for rec in _records("code.eval.jsonl")[:3])
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    blocks = ids[: 4 * 256].view(4, 256)  # 4 blocks of the model's training length
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    ppl = math.exp(loss.item())
    assert math.isfinite(ppl)
    assert ppl < model.config.vocab_size / 10, f"perplexity {ppl:.1f}: looks untrained"


def test_training_md_model_hash_recomputes():
    recorded = _MODEL_HASH.search((MODEL_DIR / "TRAINING.md").read_text())
    assert recorded, "TRAINING.md records no modelHash"
    assert model_hash(hash_model_dir(MODEL_DIR)) == recorded[1]
