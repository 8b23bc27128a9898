"""bitsandbytes NF4 on this CPU node: the quant station's artifact, the
4-bit load plans (profile under cpu-4bit) and QLoRA.

bitsandbytes >= 0.46 quantizes and multiplies NF4 on the CPU, so nothing
here is faked. The only stand-in is the node's free RAM: a tiny model always
fits in bf16, so tests that need the planner to pick `cpu-4bit` replace
`stations.loader.measure_node_memory` (which reads the real machine) with a
node whose RAM holds the model as NF4 but not in bf16.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from adapters import families, get_family
from factory import load_plan as lp
from factory.errors import StageFailed
from factory.load_plan import GIB, NodeMemory
from factory.model_files import check_model_dir
from factory.nodeconfig import NodeConfig
from stations import loader
from stations.quant_bnb import quant_decision, quantize_nf4
from stations.smoke import check as reload_check
from tests.stationkit import Reports, make_ctx, run_stages
from tests.test_profile import alloy, make_station_root, moe_model, profile_stage
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

bnb = pytest.importorskip("bitsandbytes")
MOE = [f.name for f in families() if f.is_moe]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_station_root(tmp_path_factory.mktemp("bnb-root"))


def _quant_alloy(root: Path, model: Path, family: str) -> dict:
    return alloy(root, model, family, {"type": "quant", "format": "bnb-nf4", "quantTypes": ["4bit"]})


def _expected_exact(model_dir: Path) -> tuple[set[str], set[str]]:
    """(router modules, lm_head-like modules) of the full-precision model,
    found by structure, to compare against the quantized one."""
    import transformers

    from adapters.registry import discover_routers

    family = get_family(json.loads((model_dir / "config.json").read_text())["model_type"])
    model = getattr(transformers, family.auto_class).from_pretrained(model_dir)
    names = {id(m): n for n, m in model.named_modules()}
    routers = {names[id(r)] for r in discover_routers(model).values()}
    linear = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    return routers, linear


def _small_ram_node(model_dir: Path) -> NodeMemory:
    """A CPU-only node whose usable RAM sits halfway between the model's NF4
    size and its bf16 size, so only `cpu-4bit` fits."""
    check = check_model_dir(model_dir)
    bf16, nf4 = check.info.bytes_at_16bit, lp.nf4_size(check.info, check.family)
    assert nf4 < bf16
    usable = (bf16 + nf4) / 2 / GIB
    free = int((lp.RAM_RESERVE_GIB + usable / lp.RAM_LOAD_FRACTION) * GIB)
    return NodeMemory(free_ram_bytes=free, free_vram_bytes=None, cuda_available=False)


# -- the quant station ---------------------------------------------------------
@pytest.mark.parametrize("family", ["phimoe", "qwen3_vl_moe"])
def test_quant_station_writes_nf4_that_reloads_in_a_fresh_process(root: Path, family: str) -> None:
    """Through the station (stationkit): plan, quantize, save, reload in a
    new process. PhiMoE's router subclasses nn.Linear; Qwen3-VL-MoE has a
    vision tower, which must stay exact too."""
    model = moe_model(root, family)
    entries, _ = run_stages(root, _quant_alloy(root, model, family), base=f"q-{family}")
    quant = entries[0]["metrics"]["quant"]
    out = root / "work" / f"q-{family}" / entries[0]["metrics"]["model_dir"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert quant["madeOn"] == "cpu" and quant["loadPlan"] == "cpu-4bit"
    assert quant["bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors")) > 0
    assert (out / "tokenizer.json").is_file()
    routers, _ = _expected_exact(model)
    assert set(quant["routers"]) == routers and routers <= set(quant["exactLinear"]) | routers
    assert "lm_head" in quant["exactLinear"]
    reload = quant["reload"]
    assert reload["ok"] and reload["finite"] and reload["max_logprob"] > -20
    assert reload["layout"]["quantized"] == quant["quantizedModules"] > 0
    assert set(reload["layout"]["routers"]) == routers
    if family == "qwen3_vl_moe":
        assert any(n.startswith("model.visual.") for n in quant["exactLinear"])
    assert 0 < quant["quantizedFraction"] < 1  # fused experts stay 16-bit in transformers 5


@pytest.mark.parametrize("family", MOE)
def test_nf4_round_trip_keeps_routers_and_head_exact_on_every_moe_family(root: Path, tmp_path: Path,
                                                                        family: str) -> None:
    """The station's steps in this process (the fresh-process reload costs
    seconds of imports per family; the test above runs it): every nn.Linear
    of the text decoder becomes Linear4bit, routers and lm_head do not, and
    the saved directory reloads with the same layout and finite logits."""
    import transformers

    model = moe_model(root, family)
    config = NodeConfig()
    decision = quant_decision(model, config)
    assert decision.plan.strategy == "cpu-4bit" and decision.device == "cpu"
    layout = quantize_nf4(decision, config, tmp_path / "nf4")
    routers, linear = _expected_exact(model)
    spec = get_family(family)
    text_linear = {n for n in linear if spec.tower_of(n) is None and n not in routers and n != "lm_head"}
    assert layout.quantized == len(text_linear) > 0
    assert set(layout.routers) == routers

    reloaded = getattr(transformers, spec.auto_class).from_pretrained(tmp_path / "nf4", device_map="cpu")
    loader.fit_cpu_kernels(reloaded)
    types = {n: type(m) for n, m in reloaded.named_modules()}
    assert all(types[n] is bnb.nn.Linear4bit for n in text_linear)
    assert all(types[n] is not bnb.nn.Linear4bit for n in routers | {"lm_head"})
    assert not any(issubclass(t, bnb.nn.Linear4bit) for n, t in types.items() if spec.tower_of(n))
    result = reload_check(tmp_path / "nf4", config=config)
    assert result["ok"] and result["finite"], result["problems"]
    assert result["layout"]["quantized"] == layout.quantized


# -- the 4-bit load plan on the CPU --------------------------------------------
def test_decide_picks_cpu_4bit_when_only_nf4_fits(root: Path) -> None:
    model = moe_model(root, "qwen3_moe")
    node = _small_ram_node(model)
    assert loader.decide(model, config=NodeConfig(), memory=node).plan.strategy == "cpu-4bit"
    tight = node._replace(free_ram_bytes=int(lp.RAM_RESERVE_GIB * GIB))
    with pytest.raises(StageFailed, match="fits nowhere on this node"):
        loader.decide(model, config=NodeConfig(), memory=tight)


def test_profile_runs_under_a_cpu_4bit_plan(root: Path, monkeypatch) -> None:
    """The profile stage on a node that can hold the model only as NF4; the
    routing it measures is on the exact routers of a 4-bit model."""
    family = "qwen2_moe"  # shared experts: Linear layers in the MoE block get quantized too
    model = moe_model(root, family)
    node = _small_ram_node(model)
    monkeypatch.setattr(loader, "measure_node_memory", lambda **_: node)
    entries, reports = run_stages(root, alloy(root, model, family, profile_stage()), base="prof-4bit")
    event = reports.events("model/load")[0]
    assert event["plan"]["strategy"] == "cpu-4bit" and event["plan"]["quantization"] == "nf4"
    imp = json.loads((root / "work" / "prof-4bit" / entries[0]["metrics"]["importance"]).read_text())
    config = json.loads((model / "config.json").read_text())
    assert sorted(map(int, imp["layers"])) == get_family(family).moe_layers(config)
    for row in imp["layers"].values():
        assert sum(row["activation_count"]) == imp["tokens"] * imp["top_k"]


# -- QLoRA ---------------------------------------------------------------------
def _lora_root(tmp_path: Path) -> Path:
    root = make_station_root(tmp_path / "root")
    add_tokenizer(build_tiny_model("llama", root / "models" / "m", vocab_size=TOKENIZER_VOCAB))
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(24)]
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def _lora_alloy(**extra) -> dict:
    stage = {"type": "lora", "dataset": "data/train.jsonl", "steps": 30, "learningRate": "1e-2", "rank": 4,
             "scheduler": "constant", **extra}
    return {"name": "qlora", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": "llama"},
            "stages": [stage]}


def test_qlora_trains_through_linear4bit_base_layers_on_cpu(tmp_path: Path, monkeypatch) -> None:
    root = _lora_root(tmp_path)
    seen = []
    real_wrap = __import__("stations.lora", fromlist=["wrap_with_lora"]).wrap_with_lora

    def spy(model, params, modules, *, quantized):
        seen.append({n: type(m) for n, m in model.named_modules() if n in modules})
        return real_wrap(model, params, modules, quantized=quantized)

    monkeypatch.setattr("stations.lora.wrap_with_lora", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries, reports = run_stages(root, _lora_alloy(quantize=True, quantizeBits=4))
    # bitsandbytes' packed CPU kernel has no backward: gradients through it would be silently wrong.
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    metrics = entries[0]["metrics"]
    assert metrics["quantized"] is True and metrics["loadPlan"] == "cpu-4bit"
    assert reports.events("model/load")[0]["plan"]["quantization"] == "nf4"
    assert seen and set(seen[0].values()) == {bnb.nn.Linear4bit}  # every LoRA target is a 4-bit base layer
    assert metrics["base4bitModules"] == metrics["loraModules"] == len(seen[0])
    assert metrics["finalLoss"] < metrics["initialLoss"] and metrics["probeLossAfter"] < metrics["probeLossBefore"]
    out = root / "work" / "part" / metrics["model_dir"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # merged into the exact base


@pytest.mark.parametrize(("extra", "match"), [
    ({"quantizeBits": 8}, r"\$\.stages\[0\]\.quantizeBits = 8: only a 4-bit .* set quantizeBits to 4"),
    ({"quantize": False, "quantizeBits": 4}, r"\$\.stages\[0\]\.quantize is false; remove one of them"),
])
def test_unsupported_qlora_settings_are_refused_before_loading(tmp_path: Path, extra: dict, match: str) -> None:
    root = _lora_root(tmp_path)
    reports = Reports()
    ctx = make_ctx(root, _lora_alloy(**extra), 0, reports=reports)
    from stations.lora import run_lora

    with pytest.raises(StageFailed, match=match):
        run_lora(ctx)
    assert reports.events("model/load") == []
