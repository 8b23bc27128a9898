"""Family adapters against real transformers checkpoints.

Every test over families is parametrized by the registry itself, so a new
family JSON is tested the moment it lands: its tiny model is built, saved
with ``save_pretrained``, and the spec's on-disk names, config keys,
geometry and router discovery are checked against what transformers wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import (
    Family,
    UnknownArchitectureError,
    discover_routers,
    families,
    family_for_config,
    get_family,
    resolve_architecture,
)
from adapters.registry import FAMILIES_DIR
from adapters.schema import render
from factory.model_files import check_geometry, check_model_dir, inspect_checkpoint
from tests.tiny_models import EXPERTS, TOP_K, build_tiny_model

ALL = [pytest.param(f, id=f.name) for f in families()]
MOE = [pytest.param(f, id=f.name) for f in families() if f.is_moe]
TOWERED = [pytest.param(f, id=f.name) for f in families() if f.towers]
from tests.shared_corpus import ALLOYS as CORPUS


@pytest.fixture(scope="session")
def loaded(tiny_model):
    """Session cache of loaded tiny models: family name -> model."""
    import transformers

    cache = {}

    def load(family: Family):
        if family.name not in cache:
            auto = getattr(transformers, family.auto_class)
            cache[family.name] = auto.from_pretrained(tiny_model(family.name)).eval()
        return cache[family.name]

    return load


# -- registry ----------------------------------------------------------------
def test_required_families_are_registered() -> None:
    names = {f.name for f in families()}
    assert {"llama", "mistral", "qwen2", "qwen3", "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe",
            "deepseek_v2", "deepseek_v3", "granitemoe", "qwen3_5", "qwen3_vl", "qwen2_5_vl", "qwen2_5_omni"} <= names


@pytest.mark.parametrize("family", ALL)
def test_family_is_a_transformers_model_type(family: Family) -> None:
    from transformers import CONFIG_MAPPING

    assert family.name in CONFIG_MAPPING
    assert (FAMILIES_DIR / f"{family.name}.json").exists()


@pytest.mark.parametrize(("alias", "canonical"), [
    ("Qwen3MoeForCausalLM", "qwen3_moe"), ("qwen3-moe", "qwen3_moe"), ("OlmoeForCausalLM", "olmoe"),
    ("qwen3.5", "qwen3_5"), ("Qwen3_5ForConditionalGeneration", "qwen3_5"), ("QWEN2", "qwen2"),
    ("qwen2.5", "qwen2"), ("Qwen3VLForConditionalGeneration", "qwen3_vl"), ("MixtralForCausalLM", "mixtral"),
    ("granite-moe", "granitemoe"), ("deepseek-v3", "deepseek_v3"), ("qwen2.5-vl", "qwen2_5_vl"),
    ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"), ("Qwen2_5OmniForConditionalGeneration", "qwen2_5_omni"),
    ("qwen2.5-omni", "qwen2_5_omni"),
])
def test_aliases_resolve(alias: str, canonical: str) -> None:
    assert resolve_architecture(alias) == canonical
    assert get_family(alias).name == canonical


def test_every_corpus_alloy_architecture_resolves() -> None:
    archs = {json.loads(p.read_text())["source"]["architecture"] for p in CORPUS.glob("*.json")}
    assert archs, "corpus is empty"
    assert {a: resolve_architecture(a) for a in archs} == {a: a for a in archs}


def test_unknown_architecture_error() -> None:
    with pytest.raises(UnknownArchitectureError, match=r"add a family JSON under adapters/families/") as err:
        get_family("gpt2")
    assert isinstance(err.value, ValueError)
    assert err.value.name == "gpt2"
    assert "qwen3_moe" in err.value.known and "qwen3_moe" in str(err.value)
    assert resolve_architecture("gpt2") is None


def test_family_for_config_falls_back_to_architectures() -> None:
    assert family_for_config({"architectures": ["Qwen3MoeForCausalLM"]}).name == "qwen3_moe"
    with pytest.raises(UnknownArchitectureError):
        family_for_config({"model_type": "bert"})


def test_families_are_frozen() -> None:
    with pytest.raises(ValueError):
        get_family("llama").name = "x"  # type: ignore[misc]


def test_adapters_never_import_torch() -> None:
    code = ("import sys, adapters; [f.moe_layers({}) for f in adapters.families()]; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- config readers ----------------------------------------------------------
@pytest.mark.parametrize(("family", "config", "layers"), [
    ("qwen3_moe", {"num_hidden_layers": 4, "num_experts": 8}, [0, 1, 2, 3]),
    ("qwen3_moe", {"num_hidden_layers": 4, "num_experts": 8, "decoder_sparse_step": 2}, [1, 3]),
    ("qwen2_moe", {"num_hidden_layers": 4, "num_experts": 8, "mlp_only_layers": [0, 3]}, [1, 2]),
    ("deepseek_v3", {"num_hidden_layers": 5, "n_routed_experts": 8, "first_k_dense_replace": 3}, [3, 4]),
    ("qwen3_moe", {"num_hidden_layers": 4, "num_experts": 0}, []),
    ("llama", {"num_hidden_layers": 4}, []),
    ("qwen3_vl_moe", {"text_config": {"num_hidden_layers": 2, "num_local_experts": 8}}, [0, 1]),
])
def test_moe_layers(family: str, config: dict, layers: list[int]) -> None:
    assert get_family(family).moe_layers(config) == layers


def test_hub_and_transformers_spellings_of_expert_count() -> None:
    """Hub Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts."""
    family = get_family("qwen3_moe")
    assert family.expert_count({"num_experts": 128}) == 128
    assert family.expert_count({"num_local_experts": 64}) == 64
    assert get_family("llama").expert_count({"num_experts": 8}) is None


# -- against tiny checkpoints --------------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_tiny_checkpoint_geometry_passes(tiny_model, family: Family) -> None:
    info = inspect_checkpoint(tiny_model(family.name))
    assert info.model_type == family.name
    assert family_for_config(info.config) is family
    assert check_geometry(info, family) == []
    assert family.expert_count(info.config) == (EXPERTS if family.is_moe else None)
    assert family.top_k(info.config) == (TOP_K if family.is_moe else None)


@pytest.mark.parametrize("family", MOE)
def test_expert_and_router_templates_name_real_tensors(tiny_model, family: Family) -> None:
    info = inspect_checkpoint(tiny_model(family.name))
    layers = family.moe_layers(info.config)
    assert layers
    for layer in layers:
        for expert in range(EXPERTS):
            names = family.expert_tensor_names(layer, expert)
            assert names and set(names) <= set(info.tensors), (layer, expert)
        for name in family.router_tensor_names(layer):
            assert info.tensors[name].shape[0] == EXPERTS
        assert set(family.shared_expert_tensor_names(layer)) <= set(info.tensors)
    if family.moe.experts.kind == "fused":
        assert all(info.tensors[n].shape[0] == EXPERTS for n in family.expert_tensor_names(layers[0], 0))


@pytest.mark.parametrize("family", ALL)
def test_no_unclaimed_expert_tensors(tiny_model, family: Family) -> None:
    """Every tensor with 'expert' in its name is claimed by the spec, so a
    spec cannot silently miss a projection the pruner must rewrite."""
    info = inspect_checkpoint(tiny_model(family.name))
    claimed = set()
    for layer in family.moe_layers(info.config):
        claimed |= set(family.shared_expert_tensor_names(layer))
        for expert in range(EXPERTS):
            claimed |= set(family.expert_tensor_names(layer, expert))
    expertish = {n for n in info.tensors if "expert" in n or "linear" in n and "block_sparse_moe" in n}
    assert expertish == claimed


@pytest.mark.parametrize("family", MOE)
def test_corrupted_expert_count_is_flagged(tiny_model, tmp_path: Path, family: Family) -> None:
    model_dir = Path(shutil.copytree(tiny_model(family.name), tmp_path / "ckpt"))
    config = json.loads((model_dir / "config.json").read_text())
    text = family.text_config(config)
    key = next(k for k in family.config.expert_count if k in text)
    text[key] = EXPERTS + 2
    (model_dir / "config.json").write_text(json.dumps(config))
    problems = check_geometry(inspect_checkpoint(model_dir), family)
    assert any("experts on disk" in p and f"={EXPERTS + 2}" in p for p in problems), problems


@pytest.mark.parametrize("family", ALL)
def test_discover_routers_one_per_moe_layer(tiny_model, loaded, family: Family) -> None:
    import torch

    model = loaded(family)
    config = json.loads((tiny_model(family.name) / "config.json").read_text())
    routers = discover_routers(model)
    assert sorted(routers) == family.moe_layers(config)
    names = {id(m): n for n, m in model.named_modules()}
    for layer, router in routers.items():
        weight = next(p for p in router.parameters() if p.dim() == 2)
        assert weight.shape[0] == EXPERTS
        assert names[id(router)] == family.moe.router_module_in_memory.replace("${layer}", str(layer))
    assert all(isinstance(r, torch.nn.Module) for r in routers.values())


def test_discover_routers_finds_plain_linear_gates() -> None:
    """Older remote-code MoEs use a bare Linear named gate; the shared-expert
    gate (out_features 1) must not be mistaken for it."""
    import torch

    def layer() -> torch.nn.Module:
        block = torch.nn.Module()
        block.mlp = torch.nn.Module()
        block.mlp.gate = torch.nn.Linear(8, 4, bias=False)
        block.mlp.shared_expert_gate = torch.nn.Linear(8, 1, bias=False)
        return block

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer(), layer()])
    routers = discover_routers(model, num_experts=4)
    assert routers == {0: model.layers[0].mlp.gate, 1: model.layers[1].mlp.gate}
    assert discover_routers(model, num_experts=8) == {}


@pytest.mark.parametrize("family", ALL)
def test_lora_targets_are_linear_modules(loaded, family: Family) -> None:
    import torch

    model = loaded(family)
    linear_leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear_paths = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in family.lora_targets:
        assert target in linear_leaves or any(p.endswith("." + target) for p in linear_paths), target


# -- non-text towers -----------------------------------------------------------
def test_omni_keeps_all_four_towers() -> None:
    towers = get_family("qwen2_5_omni").towers
    assert [(t.name, t.loaded) for t in towers] == [("vision", True), ("audio", True), ("talker", False),
                                                    ("token2wav", False)]


@pytest.mark.parametrize("family", TOWERED)
def test_towers_claim_real_tensors_and_no_text_tensor(tiny_model, family: Family) -> None:
    """Every tower has tensors on disk and its sub-config in config.json; no
    text template (embeddings, layers, attention, experts) falls in a tower,
    so a station walking the text templates can never touch one."""
    info = inspect_checkpoint(tiny_model(family.name))
    for tower in family.towers:
        assert any(family.tower_of(n) is tower for n in info.tensors), tower.name
        assert family.tower_config(info.config, tower), tower.name
    text = [family.tensors.embed, family.tensors.lm_head]
    att = family.attention
    for layer in range(family.read(info.config, "num_hidden_layers")):
        text.append(render(family.tensors.layer_marker, layer=layer))
    for layer in family.attention_layers(info.config):
        text += [render(t, layer=layer) for t in (att.q_proj, att.k_proj, att.v_proj, att.o_proj) if t]
    assert all(family.tower_of(n) is None for n in text)
    assert set(text) - {family.tensors.lm_head} <= set(info.tensors)
    assert not any(family.tower_of(n) for n in info.tensors if ".layers." in n and n.startswith(
        family.tensors.layer_marker.split("${layer}")[0]))


@pytest.mark.parametrize("family", TOWERED)
def test_loaded_towers_are_found_in_memory(loaded, family: Family) -> None:
    """A tower the auto class loads appears under one of its prefixes in the
    loaded model (transformers renames visual.* to model.visual.*)."""
    names = [n for n, _ in loaded(family).named_modules()]
    for tower in family.towers:
        assert any(family.tower_of(n) is tower for n in names) == tower.loaded, tower.name


def test_tower_prefixes_must_end_with_a_dot() -> None:
    spec = json.loads((FAMILIES_DIR / "qwen3_vl.json").read_text())
    spec["towers"][0]["prefixes"] = ["model.visual"]
    with pytest.raises(ValueError, match="must end with '.'"):
        Family.model_validate(spec)


# -- DeepSeek latent attention without q_lora_rank ---------------------------------
def test_q_proj_follows_q_lora_rank() -> None:
    family = get_family("deepseek_v2")
    assert family.q_proj({"q_lora_rank": 1536}).endswith("q_b_proj.weight")
    assert family.q_proj({"q_lora_rank": None}).endswith(".self_attn.q_proj.weight")
    assert get_family("llama").q_proj({}) == get_family("llama").attention.q_proj


def test_deepseek_v2_lite_plans(tmp_path: Path) -> None:
    """DeepSeek-V2-Lite's config says q_lora_rank null and its layers hold a
    plain q_proj: the model-dir check (plan and loader) accepts it."""
    model_dir = build_tiny_model("deepseek_v2", tmp_path / "v2-lite", q_lora_rank=None)
    info = inspect_checkpoint(model_dir)
    assert "model.layers.0.self_attn.q_proj.weight" in info.tensors
    assert not any("q_b_proj" in n for n in info.tensors)
    check = check_model_dir(model_dir)
    assert check.ok, [str(p) for p in check.problems]
