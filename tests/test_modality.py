"""modality: the declared tower is checked, every tower is fingerprinted, and
prove_towers catches a single flipped byte in a tower tensor.

The models are tiny random qwen3_vl / qwen2_5_vl checkpoints saved by
transformers, with a tiny tokenizer that holds the Qwen vision special
tokens at the ids their config.json names (as a real checkpoint's pair does).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import get_family
from factory.alloy import Alloy
from factory.declarations import declaration_problems, modality_problems, modality_token_ids
from factory.errors import StageFailed
from factory.integrity import sha256_file
from stations import modality
from stations.towers import RECORD_FILE, TOWERS, prove_towers
from tests.linekit import make_root
from tests.stationkit import make_ctx
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

# Where transformers 5 saves each family's towers (Qwen2.5-VL keeps the Hub's
# visual.*; Qwen2.5-Omni has four, two of them speech-side).
TOWER_PREFIX = {"qwen3_vl": {"vision": "model.visual."}, "qwen2_5_vl": {"vision": "visual."},
                "qwen2_5_omni": {"vision": "thinker.visual.", "audio": "thinker.audio_tower.", "talker": "talker.",
                                 "token2wav": "token2wav."}}
EXTRA_ROWS = 16  # embedding rows past the tokenizer's 320, for the modality tokens


def _set(config: dict, dotted: str, value: int) -> None:
    *parents, key = dotted.split(".")
    for part in parents:
        config = config[part]
    config[key] = value


def build_tower_model(family: str, out: Path) -> dict[str, dict]:
    """A tiny checkpoint with towers whose config token ids are special
    tokens of its tokenizer (as a real checkpoint's pair has them), one per
    distinct id; returns config key -> {"id", "token"}."""
    import transformers

    build_tiny_model(family, out, vocab_size=TOKENIZER_VOCAB + EXTRA_ROWS)
    add_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    names: dict[object, str] = {}
    for token in modality_token_ids(config):
        names.setdefault(token.token_id, f"<|{token.key.rsplit('.', 1)[-1].rsplit('_', 1)[0]}|>")
    tok.add_tokens(list(names.values()), special_tokens=True)
    tok.save_pretrained(out)
    mapping = {}
    for token in modality_token_ids(config):
        text = names[token.token_id]
        mapping[token.key] = {"id": tok.convert_tokens_to_ids(text), "token": text}
        _set(config, token.key, mapping[token.key]["id"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return mapping


def alloy(family: str, model: str, *stages: dict) -> dict:
    return {"name": "m", "version": "1.0.0", "source": {"baseModel": model, "architecture": family},
            "stages": list(stages)}


VISION = {"type": "modality", "modality": "vision", "encoderModel": "openai/clip-vit-large-patch14",
          "projectionArch": "mlp", "freezeBase": True, "freezeEncoder": True, "trainingSteps": 5000}
LATER = {"type": "context-extend", "targetLength": 1024, "method": "yarn"}  # any later stage's context


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("modality") / "root")
    for family in TOWER_PREFIX:
        TOKENS[family] = build_tower_model(family, root / "models" / family)
    build_tiny_model("llama", root / "models" / "llama")
    return root


TOKENS: dict[str, dict[str, dict]] = {}  # family -> what build_tower_model gave its token ids


def run_modality(root: Path, family: str, base: str, stage: dict = VISION, model: str | None = None):
    a = alloy(family, model or f"models/{family}", stage, LATER)
    ctx = make_ctx(root, a, 0, base=base)
    result = modality.run_stage(ctx)
    entry = {"index": 0, "type": "modality", "metrics": result.metrics}
    return ctx, result, entry


def raw_tensor_sha256(model_dir: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes, read through safetensors + torch (an
    independent reader from the station's byte ranges)."""
    import torch

    tensors = load_file(str(model_dir / "model.safetensors"))
    return {n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in tensors.items()}


def later_ctx(root: Path, family: str, base: str, entry: dict):
    """The context of the stage after the modality stage."""
    return make_ctx(root, alloy(family, f"models/{family}", VISION, LATER), 1, base=base, previous=[entry])


def byte_range(path: Path, name: str) -> tuple[int, int]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip_byte(path: Path, name: str) -> None:
    begin, _ = byte_range(path, name)
    data = bytearray(path.read_bytes())
    data[begin] ^= 0x01
    path.write_bytes(bytes(data))


# ── recording ───────────────────────────────────────────────────────────────


MULTIMODAL = {**VISION, "modality": "multimodal"}


@pytest.mark.parametrize("family", sorted(TOWER_PREFIX))
def test_records_every_tower_tensor_by_its_raw_bytes(root, family):
    ctx, result, _ = run_modality(root, family, f"rec-{family}", MULTIMODAL)
    model_dir = root / "models" / family
    hashes = raw_tensor_sha256(model_dir)
    summary = result.metrics[TOWERS]
    record_file = ctx.work_dir / summary["file"]
    assert record_file == ctx.stage_dir / RECORD_FILE and record_file in result.outputs
    assert sha256_file(record_file) == summary["sha256"]
    recorded = json.loads(record_file.read_text())[TOWERS]
    assert sorted(recorded) == sorted(summary["towers"]) == sorted(TOWER_PREFIX[family])
    for tower, prefix in TOWER_PREFIX[family].items():
        expected = {n: h for n, h in hashes.items() if n.startswith(prefix)}
        assert len(expected) >= 3
        assert summary["towers"][tower]["prefix"] == prefix
        assert summary["towers"][tower]["tensors"] == len(expected)
        assert {prefix + rel: rec["sha256"] for rel, rec in recorded[tower]["tensors"].items()} == expected
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        prefix = TOWER_PREFIX[family]["vision"]
        patch = recorded["vision"]["tensors"]["patch_embed.proj.weight"]
        assert patch["shape"] == list(f.get_slice(prefix + "patch_embed.proj.weight").get_shape())
        assert patch["dtype"] == "F32"
    assert "model_dir" not in result.metrics  # a bookend: no model written


@pytest.mark.parametrize("family", sorted(TOWER_PREFIX))
def test_token_ids_checked_against_the_tokenizer_and_graft_fields_listed(root, family):
    _, result, _ = run_modality(root, family, f"tokens-{family}")
    checked = result.metrics["modality"]
    assert checked["token_ids"] == {k: v for k, v in TOKENS[family].items()
                                    if k.rsplit(".", 1)[-1].startswith(("image", "video", "vision"))}
    assert len(checked["token_ids"]) >= 4  # image, video, vision start and end
    assert checked["encoder_used"] == {"vision": TOWER_PREFIX[family]["vision"]}
    assert checked["encoder_model"] == "openai/clip-vit-large-patch14"
    assert checked["not_run"]["fields"] == {"encoderModel": "openai/clip-vit-large-patch14", "projectionArch": "mlp",
                                            "trainingSteps": 5000, "freezeBase": True}


def test_a_config_token_id_that_is_a_word_piece_fails(root, tmp_path):
    model = root / "models" / "wrong-token"
    shutil.copytree(root / "models" / "qwen3_vl", model)
    config = json.loads((model / "config.json").read_text())
    config["image_token_id"] = 100  # a byte-level BPE piece, not the image token
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageFailed, match=r"image_token_id = 100 is the tokenizer's .* not a special image token"):
        run_modality(root, "qwen3_vl", "wrong-token", model="models/wrong-token")


# ── refusals, at plan time and again at run time ────────────────────────────


def _config(root: Path, name: str) -> dict:
    return json.loads((root / "models" / name / "config.json").read_text())


@pytest.mark.parametrize("stage, model, path, match", [
    ({**VISION, "modality": "audio"}, "qwen3_vl", "$.stages[0].modality",
     r"needs an audio tower, but qwen3_vl has none"),
    ({**VISION, "freezeEncoder": False}, "qwen3_vl", "$.stages[0].freezeEncoder", "asks to train the encoder"),
    (VISION, "llama", "$.stages[0].modality", r"needs a vision tower, but llama has none \(it is text-only\)"),
])
def test_a_modality_the_model_has_no_tower_for_is_refused(root, stage, model, path, match):
    a = alloy(model, f"models/{model}", stage, LATER)
    recipe = Alloy.model_validate(a)
    problems = declaration_problems(recipe.stages, config=_config(root, model), family=get_family(model),
                                    base_model=f"models/{model}")
    assert [p.json_path for p in problems] == [path]
    assert re.search(match, problems[0].problem)
    with pytest.raises(StageFailed, match=match):
        modality.run_stage(make_ctx(root, a, 0, base=f"refuse-{model}-{path[-6:]}"))


def test_a_token_id_past_the_embedding_is_a_plan_problem(root):
    config = _config(root, "qwen3_vl")
    config["video_token_id"] = 151656  # the real Qwen id: past this tiny model's embedding
    stage = Alloy.model_validate(alloy("qwen3_vl", "m", VISION)).stages[0]
    problems = modality_problems(stage, where="$.stages[0]", config=config, family=get_family("qwen3_vl"))
    assert len(problems) == 1 and "video_token_id = 151656 is past the decoder's embedding (vocab_size " \
        f"{TOKENIZER_VOCAB + EXTRA_ROWS})" \
        in problems[0].problem


# ── proving ─────────────────────────────────────────────────────────────────


def _stage_output(ctx, source: Path) -> Path:
    out = ctx.stage_dir / "model"
    shutil.copytree(source, out)
    return out


@pytest.mark.parametrize("family", sorted(TOWER_PREFIX))
def test_prove_towers_passes_on_an_unchanged_model(root, family):
    base = f"prove-{family}"
    _, result, entry = run_modality(root, family, base)
    ctx = later_ctx(root, family, base, entry)
    out = _stage_output(ctx, root / "models" / family)
    flip_byte(out / "model.safetensors", get_family(family).tensors.embed)  # text weights may change
    proof = prove_towers(ctx, out)
    towers = result.metrics[TOWERS]["towers"]
    assert proof["towers"] == sorted(TOWER_PREFIX[family]) and proof["recorded_by"] == 0
    assert proof["tensors"] == sum(t["tensors"] for t in towers.values())


@pytest.mark.parametrize("family", sorted(TOWER_PREFIX))
def test_prove_towers_fails_on_one_flipped_byte_naming_the_tensor(root, family):
    base = f"flip-{family}"
    ctx0, _, entry = run_modality(root, family, base, MULTIMODAL)
    recorded = json.loads((ctx0.stage_dir / RECORD_FILE).read_text())[TOWERS]
    ctx = later_ctx(root, family, base, entry)
    for tower, prefix in TOWER_PREFIX[family].items():
        out = _stage_output(ctx, root / "models" / family)
        name = prefix + sorted(recorded[tower]["tensors"])[-1]
        flip_byte(out / "model.safetensors", name)
        with pytest.raises(StageFailed, match=rf"stage 1 \(context-extend\) changed .*{re.escape(name)} changed "
                                              r"\(sha256 "):
            prove_towers(ctx, out)
        shutil.rmtree(out)


def test_prove_towers_fails_on_a_missing_tower_tensor(root):
    _, _, entry = run_modality(root, "qwen3_vl", "missing")
    ctx = later_ctx(root, "qwen3_vl", "missing", entry)
    out = _stage_output(ctx, root / "models" / "qwen3_vl")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.visual.merger.norm.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StageFailed, match=r"model\.visual\.merger\.norm\.weight is missing"):
        prove_towers(ctx, out)


def test_prove_towers_follows_a_renamed_tower_prefix(root):
    """A stage that re-saves qwen2.5-vl under the in-memory names
    (model.visual.*) still holds the same tower bytes."""
    _, result, entry = run_modality(root, "qwen2_5_vl", "renamed")
    ctx = later_ctx(root, "qwen2_5_vl", "renamed", entry)
    out = _stage_output(ctx, root / "models" / "qwen2_5_vl")
    tensors = load_file(str(out / "model.safetensors"))
    save_file({("model." + n if n.startswith("visual.") else n): t for n, t in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    assert prove_towers(ctx, out)["tensors"] == result.metrics[TOWERS]["towers"]["vision"]["tensors"]


def test_a_changed_tower_record_is_refused(root):
    ctx0, _, entry = run_modality(root, "qwen3_vl", "tampered")
    record = ctx0.stage_dir / RECORD_FILE
    data = json.loads(record.read_text())
    data[TOWERS]["vision"]["tensors"].popitem()
    record.write_text(json.dumps(data))
    ctx = later_ctx(root, "qwen3_vl", "tampered", entry)
    with pytest.raises(StageFailed, match="the tower record .* has changed"):
        prove_towers(ctx, _stage_output(ctx, root / "models" / "qwen3_vl"))


def test_nothing_to_prove_without_a_recorded_tower(root):
    ctx = make_ctx(root, alloy("qwen3_vl", "models/qwen3_vl", LATER), 0, base="none")
    assert prove_towers(ctx, root / "models" / "qwen3_vl") is None
