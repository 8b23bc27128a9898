"""expert-prune on tiny real models of every MoE family: the pruned
checkpoint loads in stock transformers, kept experts and router rows are the
original bytes, everything else is untouched, and the records are true."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters import get_family
from adapters.schema import render
from factory.errors import StageFailed
from factory.integrity import sha256_file
from stations.expert_prune import tensor_roles
from tests.linekit import events, factory, make_root, where, write_alloy
from tests.stationkit import run_stages
from tests.test_profile import MOE_FAMILIES, alloy, make_station_root, moe_model, profile_stage
from tests.tiny_models import TOP_K


def prune_stage(**extra) -> dict:
    return {"type": "expert-prune", "keepExpertsPerLayer": 2, **extra}


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (tiny models only), via its index if any."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) \
        if a.numel() else a.shape == b.shape


def run(root: Path, model: Path, family: str, *stages: dict, base: str) -> tuple[dict, Path, dict]:
    """Run the stages in-process; (prune metrics, pruned model dir, prune.json)."""
    entries, _ = run_stages(root, alloy(root, model, family, *stages), base=base)
    metrics = entries[-1]["metrics"]
    work = root / "work" / base
    return metrics, work / metrics["model_dir"], json.loads((work / metrics["prune"]).read_text())


def check_pruned(src: Path, out: Path, family: str, record: dict) -> None:
    """The checks every pruned checkpoint must pass."""
    import transformers

    spec = get_family(family)
    config = json.loads((src / "config.json").read_text())
    layers = spec.moe_layers(config)
    kept = {int(k): v for k, v in record["kept"].items()}
    before, after = tensors(src), tensors(out)
    roles = tensor_roles(spec, layers, 4)

    # Kept experts are the original bytes, renumbered 0..K-1 in ascending order.
    assert sorted(kept) == layers and all(v == sorted(v) and len(v) == 2 for v in kept.values())
    expected: set[str] = set()
    for name, t in before.items():
        role = roles.get(name)
        if role is None:  # attention, embeddings, norms, shared experts, dense layers
            assert same(after[name], t), name
            expected.add(name)
        elif role.kind == "expert":
            if role.expert in kept[role.layer]:
                new = render(role.template, layer=role.layer, expert=kept[role.layer].index(role.expert))
                assert same(after[new], t), (name, new)
                expected.add(new)
        else:  # router rows, fused [E, ...] experts, DeepSeek-V3's correction bias
            assert same(after[name], t[kept[role.layer]]), name
            expected.add(name)
    assert set(after) == expected  # nothing dropped that was kept, nothing extra
    for layer in layers:
        for name in spec.shared_expert_tensor_names(layer):
            assert same(after[name], before[name]), name
    # Non-text towers (vision) are among the untouched tensors checked above.
    assert {spec.tower_of(n).name for n in before if spec.tower_of(n)} == {t.name for t in spec.towers}

    # Index and records agree with the files.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as f:
            assert name in f.keys()
    assert set(index["weight_map"]) == set(after)
    for file, entry in record["shards"].items():
        assert entry["sha256"] == sha256_file(out / file) and entry["size"] == (out / file).stat().st_size
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    # Stock transformers loads it with two experts and gives finite logits.
    new_config = json.loads((out / "config.json").read_text())
    assert spec.expert_count(new_config) == 2
    model = getattr(transformers, spec.auto_class).from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 40, 77, 123, 9, 250]])).logits
    assert torch.isfinite(logits).all()
    expert_params = [p for n, p in model.named_parameters() if p.dim() == 3 and "experts" in n]
    assert expert_params and all(p.shape[0] == 2 for p in expert_params)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_station_root(tmp_path_factory.mktemp("prune-root"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_profile_then_prune_by_reap(root: Path, family: str) -> None:
    model = moe_model(root, family)
    metrics, out, record = run(root, model, family, profile_stage(), prune_stage(metric="reap"), base=f"p-{family}")
    importance = json.loads((root / "work" / f"p-{family}" / record["importance"]).read_text())
    # The top-2 by REAP. (DeepSeek's 2 groups of 2 cannot survive K=2, so its
    # routing collapses to one group and selection is global there too.)
    for layer, row in importance["layers"].items():
        best = sorted(range(4), key=lambda e: (-row["reap"][e], e))[:2]
        assert record["kept"][layer] == sorted(best)
    assert metrics["metric"] == record["metric"] == "reap"
    assert (metrics["experts_before"], metrics["experts_after"]) == (4, 2)
    check_pruned(model, out, family, record)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "granitemoe", "mixtral"])
def test_sharded_input_gives_sharded_output(root: Path, family: str) -> None:
    model = moe_model(root, family, f"{family}-sharded", max_shard_size="20KB")
    shards_in = sorted(set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards_in) > 2
    _, out, record = run(root, model, family, prune_stage(metric="router_l2"), base=f"s-{family}")
    shards_out = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards_out == sorted(record["shards"])
    # One output shard per input shard, same names; a shard of only dropped experts leaves none.
    spec = get_family(family)
    roles = tensor_roles(spec, spec.moe_layers(json.loads((model / "config.json").read_text())), 4)
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    surviving = {file for name, file in weight_map.items()
                 if not (name in roles and roles[name].kind == "expert"
                         and roles[name].expert not in record["kept"][str(roles[name].layer)])}
    assert shards_out == sorted(surviving) and len(shards_out) > 2
    check_pruned(model, out, family, record)


def test_router_l2_needs_no_profile_and_picks_the_largest_rows(root: Path) -> None:
    model = moe_model(root, "qwen3_moe")
    _, out, record = run(root, model, "qwen3_moe", prune_stage(metric="router_l2"), base="l2")
    before = tensors(model)
    for layer, kept in record["kept"].items():
        norms = torch.linalg.norm(before[f"model.layers.{layer}.mlp.gate.weight"].double(), dim=1)
        assert kept == sorted(norms.argsort(descending=True)[:2].tolist())
    assert record["importance"] is None


@pytest.mark.parametrize("strategy, metric", [("magnitude", "router_l2"),
                                              ("per-layer-normalized-router-importance", "router_l2")])
def test_a_strategy_without_metric_names_the_ranking(root: Path, strategy: str, metric: str) -> None:
    model = moe_model(root, "qwen3_moe")
    _, out, record = run(root, model, "qwen3_moe", {"type": "expert-prune", "keepExpertsPerLayer": 2,
                                                     "strategy": strategy}, base=f"strategy-{strategy}")
    assert record["metric"] == metric
    _, _, by_metric = run(root, model, "qwen3_moe", prune_stage(metric=metric), base=f"metric-{strategy}")
    assert record["kept"] == by_metric["kept"]


def test_calibration_aware_strategy_ranks_by_activation_count(root: Path) -> None:
    model = moe_model(root, "olmoe")
    stage = {"type": "expert-prune", "keepExpertsPerLayer": 2, "strategy": "calibration-aware-activation-count"}
    _, out, record = run(root, model, "olmoe", profile_stage(), stage, base="cal-aware")
    importance = json.loads((root / "work" / "cal-aware" / record["importance"]).read_text())
    assert record["metric"] == "activation_count"
    for layer, row in importance["layers"].items():
        assert record["kept"][layer] == sorted(sorted(range(4), key=lambda e: (-row["activation_count"][e], e))[:2])
    check_pruned(model, out, "olmoe", record)


def test_deepseek_v2_lite_attention_without_q_lora_rank(root: Path) -> None:
    """V2-Lite keeps a plain q_proj (q_lora_rank null); its experts prune like V2's."""
    model = moe_model(root, "deepseek_v2", "deepseek_v2-lite", q_lora_rank=None)
    config = json.loads((model / "config.json").read_text())
    assert config["q_lora_rank"] is None
    _, out, record = run(root, model, "deepseek_v2", prune_stage(metric="router_l2"), base="v2-lite")
    after = tensors(out)
    assert "model.layers.0.self_attn.q_proj.weight" in after and not any("q_a_proj" in n for n in after)
    check_pruned(model, out, "deepseek_v2", record)


def test_explicit_indices_are_honoured(root: Path) -> None:
    model = moe_model(root, "mixtral")
    stage = prune_stage(keepExpertIndices={"0": [3, 1], "1": [0, 2]})
    _, out, record = run(root, model, "mixtral", stage, base="explicit")
    assert record["metric"] == "explicit" and record["kept"] == {"0": [1, 3], "1": [0, 2]}
    check_pruned(model, out, "mixtral", record)


@pytest.mark.parametrize("stage, message", [
    (prune_stage(keepExpertsPerLayer=1, metric="router_l2"), f"top-k {TOP_K} experts per token but keepExpertsPerLayer is 1"),
    (prune_stage(keepExpertsPerLayer=5, metric="router_l2"), "more than the 4 experts"),
    (prune_stage(metric="reap"), "needs an expert-activation-profile stage"),
    ({"type": "expert-prune", "keepExpertsPerLayer": 2, "strategy": "entropy"}, "strategy 'entropy' names no expert"),
    (prune_stage(keepExpertIndices={"0": [0, 0], "1": [0, 1]}), "distinct expert indices"),
    (prune_stage(keepExpertIndices={"0": [0, 1]}), "the MoE layers are"),
])
def test_bad_parameters_are_refused_with_the_fix(root: Path, stage: dict, message: str) -> None:
    model = moe_model(root, "qwen3_moe")
    with pytest.raises(StageFailed, match=message):
        run(root, model, "qwen3_moe", stage, base="bad")


def test_deepseek_groups_preserved_when_k_allows_else_collapsed(root: Path) -> None:
    # 8 experts in 2 groups; keep 4 = 2 per group: groups survive.
    model = moe_model(root, "deepseek_v3", "deepseek_v3-8", n_routed_experts=8)
    _, out, record = run(root, model, "deepseek_v3", prune_stage(keepExpertsPerLayer=4, metric="router_l2"),
                         base="groups")
    kept = record["kept"]["1"]
    assert sum(e < 4 for e in kept) == 2 and sum(e >= 4 for e in kept) == 2
    config = json.loads((out / "config.json").read_text())
    assert (config["n_group"], config["n_routed_experts"]) == (2, 4) and record["warnings"] == []
    # Keeping 2 of 4 in 2 groups leaves one expert per group: routing collapses to one group, said so.
    small = moe_model(root, "deepseek_v3")
    metrics, out, record = run(root, small, "deepseek_v3", prune_stage(metric="router_l2"), base="collapse")
    assert json.loads((out / "config.json").read_text())["n_group"] == 1 and "n_group 2" in metrics["warnings"][0]
    with pytest.raises(StageFailed, match="multiple of 4"):
        run(root, small, "deepseek_v3", prune_stage(metric="router_l2", groupRouting="preserve"), base="refuse")


def test_profile_and_prune_through_the_daemon(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    make_station_root(root)  # adds the corpus (init is idempotent)
    model = moe_model(root, "qwen2_moe")
    doc = alloy(root, model, "qwen2_moe", profile_stage(), prune_stage(metric="reap"))
    src = write_alloy(tmp_path / "moe.alloy.json", doc)
    assert factory("enqueue", str(src), root=root).returncode == 0
    r = factory("run", "--until-empty", root=root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert where(root)["moe"] == [("finished", 0)], where(root)
    done = events(root, "stage/completed", "moe")
    assert [e["stage"]["type"] for e in done] == ["expert-activation-profile", "expert-prune"]
    assert "importance" in done[0]["metrics"] and done[1]["metrics"]["metric"] == "reap"
    pruned = next((root / "work" / "moe" / "stages").glob("1-expert-prune/model"))
    assert json.loads((pruned / "config.json").read_text())["num_experts"] == 2
