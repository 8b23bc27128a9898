"""Budgets a station must stay inside whatever its input: memory for a
corpus (read as a stream, cut to the token budget before tokenising), memory
for the package stage's reload check (the load plan's dtype, not fp32), and
disk for a streaming load's offload folder (the cold tier's room).

The corpus and the tokenizer are real (examples/tiny-moe's BPE); memory is
measured in a child process by its own peak RSS. Only a node's memory is
mocked, where a test needs a node smaller or larger than this machine; the
19B model is a real safetensors header over a sparse (hole-only) file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from factory.errors import StageFailed
from factory.load_plan import GIB, NodeMemory
from factory.model_files import inspect_checkpoint
from factory.nodeconfig import NodeConfig
from factory.outcomes import classify
from stations import corpus as corpora
from stations.corpus import Corpus, chars_for_tokens, read_blocks, read_texts, token_blocks

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = REPO / "examples" / "tiny-moe"
EXAMPLE_CORPORA = sorted((REPO / "examples" / "corpora").glob("*.jsonl"))
MIB = 2**20


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MOE)


def _corpus(path: Path, field: str = "text") -> Corpus:
    return Corpus(path, "", field, str(path))


def _read_whole(path: Path, field: str = "text") -> list[str]:
    """The corpus read whole, json.loads per line. (Split at newlines only:
    `splitlines`, which the reader used before it streamed, also splits at a
    raw U+2028 that JSON allows inside a string.)"""
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# ── the same documents and blocks as reading whole ─────────────────────────────


@pytest.mark.parametrize("path", EXAMPLE_CORPORA, ids=[p.name for p in EXAMPLE_CORPORA])
def test_streamed_corpus_gives_the_documents_and_blocks_of_a_whole_read(path: Path, tokenizer) -> None:
    whole = _read_whole(path)
    assert list(read_texts(_corpus(path))) == whole
    for budget, block in ((384, 64), (20000, 512)):
        before = list(token_blocks(tokenizer, whole, block=block, budget=budget))  # no cut: the old path
        assert read_blocks(tokenizer, _corpus(path), block=block, budget=budget) == before
        assert sum(map(len, before)) == min(budget, sum(map(len, token_blocks(tokenizer, whole, block=block))))


def test_streaming_line_parser_matches_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line of a real corpus, plus awkward ones, through the long-line
    parser (made to handle every line by shrinking the whole-line limit and
    the chunk size): the same text as json.loads."""
    monkeypatch.setattr(corpora, "WHOLE_LINE_BYTES", 5)
    monkeypatch.setattr(corpora, "LINE_CHUNK_BYTES", 7)
    awkward = [
        {"id": [1, {"b": "x\"]}"}, [], {}], "text": "h\u00e9llo \U0001F600 \\ \n\t end \u2028", "z": None},
        {"text": "first", "n": -1.5e-3, "ok": True, "text2": "no"},
        {"meta": {"text": "nested, not the field"}, "text": "top level"},
    ]
    lines = [json.dumps(o) for o in awkward] + [json.dumps(o, ensure_ascii=False) for o in awkward]
    lines += ['{"text": "dup one", "x": 1, "text": "dup two"}', "", "   "]  # json.loads keeps the last
    lines += EXAMPLE_CORPORA[0].read_text().splitlines()[:5]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert list(read_texts(_corpus(path))) == _read_whole(path)
    assert list(read_texts(_corpus(path), max_chars=4)) == [t[:4] for t in _read_whole(path)]
    assert _read_whole(path)[6] == "dup two"


BAD_LINES = [
    ('{"text": "unterminated', "the line ends inside a string"),
    ('{"text": "bad \\x escape"}', "invalid character '\\\\' in a string"),
    ('{"text": "a"} trailing', "extra data after the object"),
    ('{"a": [1, 2}, "text": "x"}', "unbalanced '}'"),
    ('{"a": 01, "text": "x"}', "invalid value '01'"),
    ('{"a": 1, "b": 2}', "no string field 'text'"),
    ('{"text": 5}', "no string field 'text'"),
    ('["text", "x"]', "no string field 'text'"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_long_line_is_named_by_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str,
                                                 message: str) -> None:
    monkeypatch.setattr(corpora, "WHOLE_LINE_BYTES", 4)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(StageFailed, match=f"{re.escape(str(path))}:2: .*{re.escape(message)}"):
        list(read_texts(_corpus(path)))


def test_whole_line_errors_and_encoding_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(StageFailed, match=f"{path}:2: not JSON"):
        list(read_texts(_corpus(path)))
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(StageFailed, match=f"{path}:2: not UTF-8 .*re-encode the corpus as UTF-8"):
        list(read_texts(_corpus(path)))


def test_document_cap_cuts_under_a_budget_and_refuses_without(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora, "MAX_DOC_CHARS", 1000)
    jsonl, plain = tmp_path / "c.jsonl", tmp_path / "c.txt"
    jsonl.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
    plain.write_text("y" * 5000)
    assert list(read_texts(_corpus(jsonl), max_chars=100)) == ["short", "x" * 100]
    assert list(read_texts(_corpus(plain), max_chars=10**6)) == ["y" * 1000]  # the ceiling holds too
    with pytest.raises(StageFailed, match=f"{jsonl}:2: a document of over 1,000 characters; split it"):
        list(read_texts(_corpus(jsonl)))
    with pytest.raises(StageFailed, match=f"{plain}: a document of over 1,000 characters"):
        list(read_texts(_corpus(plain)))


def test_cut_and_its_floor() -> None:
    assert chars_for_tokens(2048) == 2048 * corpora.CHARS_PER_TOKEN_BOUND == 65536
    assert chars_for_tokens(10) == corpora.MIN_DOC_CHARS
    assert chars_for_tokens(10**9) == chars_for_tokens(None) == corpora.MAX_DOC_CHARS


def test_reading_stops_once_the_budget_is_met(tmp_path: Path, tokenizer) -> None:
    """A bad line after the budget's worth of text is never read."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 200}) + "\n{broken\n")
    blocks = read_blocks(tokenizer, _corpus(path), block=64, budget=256)
    assert sum(map(len, blocks)) == 256
    with pytest.raises(StageFailed, match=":2: not JSON"):
        read_blocks(tokenizer, _corpus(path), block=64, budget=10**6)


# ── a 100 MB line in bounded memory ───────────────────────────────────────────

SENTENCE = "def scale(x):\n    \"\"\"Twice x.\"\"\"\n    return x * 2  # The quick brown fox.\n"
CHILD = r"""
import json, resource, sys
from pathlib import Path
from transformers import AutoTokenizer
from stations.corpus import Corpus, read_blocks, token_blocks

tok = AutoTokenizer.from_pretrained(sys.argv[2])
sentence = json.loads(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
blocks = read_blocks(tok, Corpus(Path(sys.argv[1]), "", "text", "big"), block=256, budget=2048)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
doc = sentence * (200_000 // len(sentence))  # the document's first 200k characters, rebuilt
expected = list(token_blocks(tok, [doc[:200_000]], block=256, budget=2048))
print(json.dumps({"base_kib": base, "peak_kib": peak, "tokens": sum(map(len, blocks)),
                  "same": blocks == expected}))
"""


def _write_huge_line(path: Path, nbytes: int) -> None:
    """One JSONL line of about `nbytes` (written in chunks), then a short one."""
    piece = json.dumps(SENTENCE)[1:-1] * 4096
    with path.open("w") as f:
        f.write('{"id": 1, "text": "')
        written = 0
        while written < nbytes:
            f.write(piece)
            written += len(piece)
        f.write('", "tags": ["big", {"k": [1, 2.5, null]}]}\n')
        f.write(json.dumps({"text": "a second document"}) + "\n")


def test_a_100mb_line_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """The hostile corpus: one ~100 MB line, a 2048-token budget, the real
    reader and tokenizer. Reading it whole and tokenising all of it took
    20 GB; now the reading adds at most 300 MB to the child's own baseline
    (interpreter, transformers, tokenizer), and the blocks are exactly those
    of the document's first characters."""
    path = tmp_path / "huge.jsonl"
    _write_huge_line(path, 100 * MIB)
    assert path.stat().st_size > 100 * MIB
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(TINY_MOE), json.dumps(SENTENCE)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == 2048 and out["same"]
    grown_mib = (out["peak_kib"] - out["base_kib"]) / 1024
    assert grown_mib < 300, f"reading a 100 MB line grew the peak RSS by {grown_mib:.0f} MiB"


# ── the reload check under a memory budget ────────────────────────────────────

# A llama geometry of about 19B parameters (38 GB in bf16, 76 GB in fp32).
GEOMETRY_19B = dict(hidden_size=6144, num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8,
                    intermediate_size=16384, vocab_size=32000, tie_word_embeddings=False)


def sparse_checkpoint(out: Path, **geometry) -> Path:
    """A llama checkpoint whose config and safetensors header are real and
    whose data section is a hole: a 19B model that takes no disk. Only its
    header may ever be read (the load decision never reads more)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**geometry)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        nbytes = 2 * tensor.numel()
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    with (out / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    if os.stat(out / "model.safetensors").st_blocks * 512 > 64 * MIB:
        pytest.skip("this filesystem does not keep sparse files sparse")
    return out


@pytest.fixture(scope="module")
def model_19b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sparse_checkpoint(tmp_path_factory.mktemp("sparse") / "llama-19b", **GEOMETRY_19B)


def _ram(gib: float) -> NodeMemory:
    """A mocked node memory measurement: this machine is neither that small
    nor that large, and we cannot build a 19B model to find out."""
    return NodeMemory(free_ram_bytes=int(gib * GIB), free_vram_bytes=None, cuda_available=False)


def test_reload_of_a_19b_model_is_bf16_when_fp32_would_not_fit(model_19b: Path) -> None:
    from stations.loader import decide

    info = inspect_checkpoint(model_19b)
    assert 18.5e9 < info.param_count < 19.5e9 and info.bytes_at_16bit > 35 * GIB
    tight = decide(model_19b, config=NodeConfig(), memory=_ram(100))  # bf16 fits, fp32 (76 GB) not with headroom
    assert (tight.plan.strategy, tight.dtype, tight.device) == ("cpu", "bfloat16", "cpu")
    roomy = decide(model_19b, config=NodeConfig(), memory=_ram(400))
    assert (roomy.plan.strategy, roomy.dtype) == ("cpu", "float32")


def test_reload_check_refuses_before_loading_when_nothing_fits(model_19b: Path) -> None:
    from stations.smoke import check

    with pytest.raises(StageFailed, match=r"cannot load .*llama-19b on this node: model 35\.\d\d GiB fits nowhere"):
        check(model_19b, config=NodeConfig(), memory=_ram(12))


# ── a streaming load's offload folder needs the cold tier's room ───────────────


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

    return add_tokenizer(build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("offload") / "moe",
                                          vocab_size=TOKENIZER_VOCAB))


def _spilling_memory(model_dir: Path) -> NodeMemory:
    """A mocked node whose usable RAM holds 70 % of the model: the plan
    streams it and spills the rest to disk."""
    model = inspect_checkpoint(model_dir).bytes_at_16bit
    return NodeMemory(free_ram_bytes=4 * GIB + int(0.7 * model / 0.85), free_vram_bytes=None,
                      cuda_available=False)


def _cold(path: Path, min_free_gb: float = 0.0) -> NodeConfig:
    return NodeConfig.model_validate({"storage": {"cold": [{"path": str(path), "min_free_gb": min_free_gb}]}})


def test_offload_folder_is_made_where_the_tier_has_room(tiny_dir: Path, tmp_path: Path) -> None:
    from stations.loader import decide, offload_folder

    config = _cold(tmp_path)
    decision = decide(tiny_dir, config=config, memory=_spilling_memory(tiny_dir))
    assert decision.plan.strategy == "streaming" and decision.plan.offload_folder_needed
    assert 0 < decision.spill_bytes <= decision.model_bytes
    folder = offload_folder(decision, config, "part-1")
    assert folder == tmp_path / "factory-offload" / "part-1" and folder.is_dir()


def test_missing_cold_tier_is_a_deterministic_failure(tiny_dir: Path, tmp_path: Path) -> None:
    from stations.loader import decide, offload_folder

    config = _cold(tmp_path / "not-mounted")
    decision = decide(tiny_dir, config=config, memory=_spilling_memory(tiny_dir))
    with pytest.raises(StageFailed, match=r"offloads .* GiB to the cold tier storage.cold\[0\].path, but "
                                          f".*{tmp_path / 'not-mounted'} does not exist") as err:
        offload_folder(decision, config, "part-1")
    assert classify(err.value).cls == "deterministic"
    assert not (tmp_path / "not-mounted").exists()


def test_full_cold_tier_is_an_out_of_room_condition(tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """More than the disk's free space is reserved (min_free_gb): the load
    stops before writing, with ENOSPC, which the line treats as "wait for room"
    (not a retry, not rework). Driven through `load` itself, with only the
    node's memory measurement mocked."""
    from stations import loader
    from tests.linekit import make_root
    from tests.stationkit import make_ctx

    free_gb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / GIB
    config = _cold(tmp_path, min_free_gb=free_gb + 1000)
    monkeypatch.setattr(loader, "measure_node_memory", lambda **_: _spilling_memory(tiny_dir))
    root = make_root(tmp_path / "root")
    ctx = replace(make_ctx(root, {"name": "b", "version": "1", "source": {"baseModel": "models/m", "architecture": "llama"},
                                  "stages": [{"type": "eval", "benchmarks": [{"name": "perplexity"}]}]}, 0, base="full"), config=config)
    with pytest.raises(OSError) as err:
        loader.load(ctx, tiny_dir)
    assert err.value.errno == errno.ENOSPC and "storage.cold[0].min_free_gb" in str(err.value)
    verdict = classify(err.value)
    assert (verdict.cls, verdict.no_room_path) == ("infrastructure", str(tmp_path))
    assert not (tmp_path / "factory-offload").exists()


# ── BOS: blocks start where the model's pretraining text did ───────────────────


def test_blocks_start_with_bos_when_the_tokenizer_adds_one(tokenizer, tmp_path):
    """A tokenizer that prepends BOS (Gemma, Llama) gets BOS at the head of
    every block, inside the block and budget sizes; the corpus tokens
    between are the same stream as without it. The tiny BPE adds none."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    assert corpora.bos_prefix(tokenizer) == []
    with_bos = AutoTokenizer.from_pretrained(TINY_MOE)
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, bos)])
    assert with_bos("def f(): pass")["input_ids"][0] == bos and corpora.bos_prefix(with_bos) == [bos]
    texts = _read_whole(EXAMPLE_CORPORA[0])[:20]
    plain = [t for b in token_blocks(tokenizer, texts, block=64) for t in b]
    blocks = list(token_blocks(with_bos, texts, block=64, budget=1000))
    assert all(b[0] == bos and len(b) <= 64 for b in blocks)
    assert sum(map(len, blocks)) == 1000
    body = [t for b in blocks for t in b[1:]]
    assert body == plain[:len(body)]
