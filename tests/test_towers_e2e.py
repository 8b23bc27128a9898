"""A declared vision modality through the real daemon: the modality stage
records every non-text tower, and prune, train (LoRA merged) and the rest
prove those tensors unchanged bit for bit; a tower that changed fails the
part, naming the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters import get_family
from factory.errors import StageFailed
from stations import lora
from stations.standin import build_standin
from tests.linekit import factory, make_root, write_alloy
from tests.stationkit import make_ctx, run_stages

TEXT = " ".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200))
STAGES = [
    {"type": "modality", "modality": "vision", "encoderModel": "own-tower"},
    {"type": "prune", "strategy": "magnitude", "level": 0.5, "minHeadsPerLayer": 1, "minKvHeadsPerLayer": 1},
    {"type": "train", "dataset": "acme/code", "steps": 2, "sequenceLength": 32, "batchSize": 2},
]


def _root(tmp_path: Path, family: str) -> Path:
    root = make_root(tmp_path / "root")
    build_standin(get_family(family), root / "models" / "vl")
    (root / "data").mkdir()
    (root / "data" / "code.jsonl").write_text("".join(json.dumps({"text": TEXT[i:] }) + "\n" for i in range(8)))
    with (root / "factory_node.toml").open("a") as f:
        f.write('\n[datasets]\n"acme/code" = "data/code.jsonl"\n')
    return root


def _alloy(family: str) -> dict:
    return {"name": "vl", "version": "1.0.0", "source": {"baseModel": "models/vl", "architecture": family},
            "stages": STAGES}


def _tower_tensors(model_dir: Path, family: str) -> dict[str, bytes]:
    fam, out = get_family(family), {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if fam.tower_of(name):
                    out[name] = f.get_tensor(name).numpy().tobytes()
    return out


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_towers_survive_prune_and_train_bit_for_bit(tmp_path: Path, family: str) -> None:
    root = _root(tmp_path, family)
    assert factory("enqueue", str(write_alloy(tmp_path / "vl.alloy.json", _alloy(family))), root=root).returncode == 0
    r = factory("run", "--until-empty", root=root, timeout=900)
    assert r.returncode == 0, r.stderr
    result_file = root / "line" / "finished" / "vl.result.json"
    assert result_file.is_file(), list((root / "line" / "rework").glob("*.error.json"))
    result = json.loads(result_file.read_text())
    recorded = result["stages"][0]["metrics"]["towers"]
    assert recorded["towers"], recorded
    for stage in result["stages"][1:]:
        proof = stage["metrics"]["towers_proved"]
        assert proof["tensors"] == sum(t["tensors"] for t in recorded["towers"].values()) > 0
    before = _tower_tensors(root / "models" / "vl", family)
    after = _tower_tensors(Path(result["forged_dir"]), family)
    assert before and before == after
    assert result["stages"][2]["metrics"]["lora_targets_dropped"] >= 0


def test_a_changed_tower_fails_the_stage_that_wrote_it(tmp_path: Path, monkeypatch) -> None:
    """The LoRA merge is made to touch one vision tensor: the train stage
    fails, naming it, instead of handing a silently changed tower on."""
    family = "qwen3_vl"
    root = _root(tmp_path, family)
    alloy = _alloy(family)
    entries, _ = run_stages(root, alloy, upto=2)
    real_merge = lora.write_merged

    def merge_and_touch(ctx, model_dir, adapter_dir, out):
        merged = real_merge(ctx, model_dir, adapter_dir, out)
        shard = next(out.glob("*.safetensors"))
        with safe_open(str(shard), "pt") as f:
            victim = next(n for n in f.keys() if get_family(family).tower_of(n))
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(shard))
        tensors[victim] = tensors[victim] + 1
        save_file(tensors, str(shard), metadata={"format": "pt"})
        merge_and_touch.victim = victim
        return merged

    monkeypatch.setattr(lora, "write_merged", merge_and_touch)
    with pytest.raises(StageFailed, match="changed the non-text towers") as err:
        lora.run_train(make_ctx(root, alloy, 2, previous=entries))
    assert merge_and_touch.victim.split(".", 1)[1] in str(err.value)
