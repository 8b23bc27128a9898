"""The train / lora / compensation-lora stations on tiny real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from factory.errors import StageFailed
from stations.lora import (
    DROPPED_KEY, IGNORE_INDEX, causal_lm_loss, collate, distillation_loss, hidden_mse_loss, lr_factor,
)
from tests.linekit import factory, where, write_alloy
from tests.stationkit import run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

TRAIN_TEXTS = [f"def f{i}(x):\n    return x * {i}\n" for i in range(24)]
HELD_OUT = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40, 44)]  # same kind, never trained on


def _model(root: Path, family: str = "llama", **overrides) -> Path:
    out = build_tiny_model(family, root / "models" / "m", vocab_size=TOKENIZER_VOCAB, **overrides)
    return add_tokenizer(out)


def _dataset(root: Path, texts: list[str] = TRAIN_TEXTS) -> str:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return "data/train.jsonl"


def _alloy(family: str, *stages: dict) -> dict:
    return {"name": "lora-test", "version": "1.0.0",
            "source": {"baseModel": "models/m", "architecture": family}, "stages": list(stages)}


# Half the heads of the tiny models (4 query, 2 KV): the schema's floors of 4
# and 2 heads per layer would keep them all.
PRUNE_HALF = {"type": "prune", "strategy": "magnitude", "level": 0.5, "minHeadsPerLayer": 1,
              "minKvHeadsPerLayer": 1}


def _lora(**extra) -> dict:
    return {"type": "lora", "dataset": "data/train.jsonl", "steps": 30, "learningRate": "1e-2", "rank": 4,
            "scheduler": "constant", **extra}


def _out(root: Path, entry: dict) -> Path:
    return root / "work" / "part" / entry["metrics"]["model_dir"]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ── pieces ──────────────────────────────────────────────────────────────────


def test_pads_are_masked_in_labels_and_attention():
    batch = collate([[5, 6, 7], [8, 9, 10, 11, 12]], pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 1], [8, 9, 10, 11, 12]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[5, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [8, 9, 10, 11, 12]]


def test_padded_batch_loss_equals_the_unpadded_computation(tiny_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    examples = [[3, 17, 40, 9], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        padded = causal_lm_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                batch.labels)
        total, count = 0.0, 0
        for e in examples:  # each sequence alone, no padding anywhere
            ids = torch.tensor([e])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(e) - 1
    assert float(padded) == pytest.approx(total / count, rel=1e-5)


def test_distillation_loss_is_zero_for_identical_logits_and_ignores_pads():
    logits = torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert float(distillation_loss(logits, logits, mask, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[1, 2:] = torch.randn(2, 10) * 50  # differs only at pad positions
    assert float(distillation_loss(other, logits, mask, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_mse_ignores_pads():
    a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    b2 = b.clone()
    b2[1, 2:] += 100  # differs only at pad positions
    assert float(hidden_mse_loss(a, b, mask)) == pytest.approx(float(hidden_mse_loss(a, b2, mask)))
    real = torch.cat([(a[0] - b[0]).pow(2).mean(-1), (a[1, :2] - b[1, :2]).pow(2).mean(-1)])
    assert float(hidden_mse_loss(a, b, mask)) == pytest.approx(float(real.mean()), rel=1e-6)


def test_lr_schedules():
    assert lr_factor(0, total=10, warmup=2, scheduler="cosine") == 0.5
    assert lr_factor(2, total=10, warmup=2, scheduler="cosine") == 1.0
    assert lr_factor(9, total=10, warmup=0, scheduler="linear") == pytest.approx(0.1)
    assert lr_factor(9, total=10, warmup=0, scheduler="constant") == 1.0
    assert lr_factor(0, total=10, warmup=2, scheduler="constant_with_warmup") == 0.5
    assert lr_factor(5, total=10, warmup=2, scheduler="constant_with_warmup") == 1.0
    assert lr_factor(9, total=10, warmup=0, scheduler="polynomial") == pytest.approx(0.1)


# ── the stations ───────────────────────────────────────────────────────────


def test_lora_lowers_the_loss_and_merges_into_a_plain_checkpoint(root):
    import peft

    src = _model(root, "qwen2")
    _dataset(root)
    entries, reports = run_stages(root, _alloy("qwen2", _lora()))
    metrics, out = entries[0]["metrics"], _out(root, entries[0])
    assert metrics["finalLoss"] < metrics["initialLoss"]
    assert metrics["probeLossAfter"] < metrics["probeLossBefore"]
    assert metrics["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [p["done"] for p in reports.progress() if p["unit"] == "steps"] == list(range(1, 31))
    sidecar = json.loads((out.parent / "training.json").read_text())
    assert len(sidecar["lossCurve"]) == 30 and sidecar["rank"] == 4 and sidecar["alpha"] == 8.0
    assert sidecar["trainableParams"] > 0

    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no peft involved
    before, after = _tensors(src), _tensors(out)
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.split(".")[-2] in metrics["targets"] for n in changed)

    # The file merge equals peft's own view of base + adapter.
    adapter = out.parent / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    base = transformers.AutoModelForCausalLM.from_pretrained(src)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[1, 50, 100, 7, 3]])
    with torch.no_grad():
        got, want = merged(ids).logits, with_adapter(ids).logits
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-4)


def test_training_is_deterministic(root):
    _model(root)
    _dataset(root)
    first, _ = run_stages(root, _alloy("llama", _lora(steps=3)), base="a")
    second, _ = run_stages(root, _alloy("llama", _lora(steps=3)), base="b")
    a = load_file(root / "work/a/stages/0-lora/adapter/adapter_model.safetensors")
    b = load_file(root / "work/b/stages/0-lora/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first[0]["metrics"]["finalLoss"] == second[0]["metrics"]["finalLoss"]


def _held_out_kl(student_dir: Path, teacher_dir: Path) -> float:
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total = 0.0
    with torch.no_grad():
        for text in HELD_OUT:
            ids = torch.tensor([tok(text)["input_ids"]])
            mask = torch.ones_like(ids)
            total += float(distillation_loss(student(ids).logits, teacher(ids).logits, mask, temperature=1.0))
    return total / len(HELD_OUT)


def test_compensation_brings_the_pruned_student_closer_to_the_teacher(root):
    src = _model(root, "qwen3")
    # A random tiny model predicts almost uniformly; a sharper head gives the
    # teacher distributions worth matching (KL in the tenths, not 1e-4).
    weights = load_file(src / "model.safetensors")
    weights["lm_head.weight"] *= 20
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    _dataset(root)
    comp = {"type": "compensation-lora", "teacher": "source", "dataset": "data/train.jsonl", "steps": 30,
            "learningRate": "1e-2", "rank": 4, "scheduler": "constant"}
    entries, _ = run_stages(root, _alloy("qwen3", PRUNE_HALF, comp))
    pruned, compensated = _out(root, entries[0]), _out(root, entries[1])
    metrics = entries[1]["metrics"]
    assert (metrics["mode"], metrics["lossType"], metrics["kdTemperature"]) == ("compensation", "kl_logits", 2.0)
    assert metrics["probeLossAfter"] < metrics["probeLossBefore"]
    assert _held_out_kl(compensated, src) < _held_out_kl(pruned, src)
    assert transformers.AutoConfig.from_pretrained(compensated).num_attention_heads == 2  # still pruned


def test_lora_with_a_teacher_distils_with_kl_plus_ce(root):
    _model(root)
    _dataset(root)
    entries, _ = run_stages(root, _alloy("llama", _lora(steps=2, teacher="models/m", lossType="kl+ce")))
    metrics = entries[0]["metrics"]
    assert metrics["mode"] == "compensation" and metrics["lossType"] == "kl+ce"
    assert metrics["initialLoss"] > 1.0  # CE term present: KL against itself alone would be ~0


@pytest.mark.parametrize("loss", ["mse_hidden", "both"])
def test_hidden_state_losses_start_at_zero_against_the_same_model(root, loss):
    """LoRA starts with B = 0, so a student distilled from its own weights
    matches the teacher exactly at step 0 (hidden states and logits); the
    first step's loss is then 0 and the stage still trains and merges."""
    _model(root)
    _dataset(root)
    entries, _ = run_stages(root, _alloy("llama", _lora(steps=2, teacher="models/m", lossType=loss)))
    metrics = entries[0]["metrics"]
    assert metrics["lossType"] == loss and metrics["initialLoss"] == pytest.approx(0.0, abs=1e-6)
    transformers.AutoModelForCausalLM.from_pretrained(_out(root, entries[0]))


def test_train_stage_runs_the_lora_path_with_explicit_targets(root):
    _model(root)
    (root / "data").mkdir()
    pairs = [json.dumps({"prompt": f"square {i}", "completion": str(i * i)}) for i in range(8)]
    (root / "data" / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    entries, _ = run_stages(root, _alloy("llama", {"type": "train", "dataset": "data/pairs.jsonl", "steps": 2,
                                                    "targetModules": ["q_proj", "v_proj"], "rank": 2}))
    metrics = entries[0]["metrics"]
    assert metrics["targets"] == ["q_proj", "v_proj"] and metrics["mergedWeights"] == 4  # 2 layers x 2
    assert metrics["examples"] == 8
    transformers.AutoModelForCausalLM.from_pretrained(_out(root, entries[0]))


@pytest.mark.parametrize("stage, match", [
    ({"dataset": "org/some-dataset"}, "is not on this node .*`huggingface-cli download --repo-type dataset "
                                      "org/some-dataset"),
    ({"dataset": "../outside.jsonl"}, "climbs out"),
    ({"dataset": "data/missing.jsonl"}, "which is missing"),
    ({"targetModules": ["nope_proj"]}, "do not fit this model: they match nowhere"),
])
def test_bad_parameters_are_refused_with_the_fix(root, monkeypatch, stage, match):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "no-cache"))
    _model(root)
    _dataset(root)
    with pytest.raises(StageFailed, match=match):
        run_stages(root, _alloy("llama", _lora(steps=1, **stage)))


def test_prune_then_lora_through_the_daemon(root, tmp_path):
    _model(root, "mistral")
    _dataset(root)
    alloy = _alloy("mistral", PRUNE_HALF, _lora(steps=3))
    enq = factory("enqueue", str(write_alloy(tmp_path / "pl.json", alloy)), root=root)
    assert enq.returncode == 0, enq.stderr
    run = factory("run", "--until-empty", root=root, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert where(root)["pl"] == [("finished", 0)]
    merged = root / "work" / "pl" / "stages" / "1-lora" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.num_attention_heads == 2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_stop_request_is_honoured_between_steps(root):
    from factory.errors import StopRequested
    from stations.lora import run_lora
    from tests.stationkit import Reports, make_ctx

    _model(root)
    _dataset(root)
    reports = Reports()
    ctx = make_ctx(root, _alloy("llama", _lora(steps=30)), 0, reports=reports)
    ctx.stop_requested = lambda: len(reports.progress()) >= 2  # SIGTERM after step 2
    with pytest.raises(StopRequested):
        run_lora(ctx)
    assert [p["done"] for p in reports.progress()] == [1, 2]
    assert not (ctx.stage_dir / "model" / "config.json").exists()


def test_examples_stop_pulling_text_once_the_steps_have_enough(tiny_model):
    """Texts are read lazily: with a limit, no text after the one that
    completes it is pulled from the stream (a 150k-record dataset is not
    read whole for 100 steps)."""
    from stations.lora import make_examples

    tok = transformers.AutoTokenizer.from_pretrained(add_tokenizer(tiny_model("llama", vocab_size=TOKENIZER_VOCAB)))
    pulled = []

    def texts():
        for i in range(1000):
            pulled.append(i)
            yield f"def f{i}(x):\n    return x * {i}\n"

    examples = make_examples(tok, texts(), sequence_length=4, limit=10)
    assert len(examples) == 10 and all(2 <= len(e) <= 4 for e in examples)
    assert len(pulled) < 10  # each text gives several 4-token chunks
    ids = tok("a b c d e f", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    chunks = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    assert make_examples(tok, iter(["a b c d e f"]), sequence_length=4) == [c for c in chunks if len(c) >= 2]


def test_lora_never_attaches_to_the_vision_tower(root):
    """On a vision-language model, a target that also names vision-tower
    modules (linear_fc1 is in every vision block, the merger and the deepstack
    mergers) attaches only to the text decoder's layers; the tower's matches
    are dropped and counted, and its tensors come out bit for bit."""
    src = _model(root, "qwen3_vl")
    _dataset(root)
    entries, _ = run_stages(root, _alloy("qwen3_vl", _lora(steps=2, targetModules=["q_proj", "linear_fc1"])))
    metrics, out = entries[0]["metrics"], _out(root, entries[0])
    assert metrics[DROPPED_KEY] == 3 and metrics["loraModules"] == 2  # q_proj in each of the 2 text layers
    before, after = _tensors(src), _tensors(out)
    vision = [n for n in before if n.startswith("model.visual.")]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == [f"model.language_model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]


def test_targets_only_in_the_vision_tower_are_refused(root):
    _model(root, "qwen3_vl")
    _dataset(root)
    with pytest.raises(StageFailed, match=r"match only outside the text decoder's layers; set"):
        run_stages(root, _alloy("qwen3_vl", _lora(steps=1, targetModules=["qkv"])))
