"""quant format mlx: mlx-lm converts a tiny transformers-5 checkpoint at 4
and 8 bits, a fresh mlx-lm process loads and runs each output, and the
stations.mlx_runtime scores agree with a transformers fp32 forward of the
source, closer at 8 bits than at 4.

The models are random-weight but real (qwen3_moe, llama), built with widths
that are multiples of mlx-lm's group size 64 so every matrix is packed.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from factory import quant_support
from factory.errors import StageFailed
from stations import quant_mlx
from stations.mlx_runtime import MIN_LOGIT_RANGE, open_mlx
from tests.linekit import make_root
from tests.stationkit import run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

pytestmark = pytest.mark.skipif(quant_support.mlx_problem() is not None,
                                reason=f"mlx cannot run here: {quant_support.mlx_problem()}")

WIDTHS = {"hidden_size": 64, "head_dim": 16, "intermediate_size": 128}  # multiples of GROUP_SIZE
TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n" * 2


def _alloy(family: str, quant_types: list[str]) -> dict:
    return {"name": "mlx-test", "version": "1.0.0", "source": {"baseModel": "models/src", "architecture": family},
            "stages": [{"type": "quant", "format": "mlx", "quantTypes": quant_types}]}


def _root_with(tmp: Path, family: str, **overrides) -> Path:
    root = make_root(tmp / "root")
    add_tokenizer(build_tiny_model(family, root / "models" / "src", vocab_size=TOKENIZER_VOCAB, **WIDTHS,
                                   **overrides))
    return root


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """qwen3_moe converted at 4 and 8 bits: (root, source dir, out dir, quant metrics, source digest)."""
    root = _root_with(tmp_path_factory.mktemp("mlx-moe"), "qwen3_moe", moe_intermediate_size=64)
    src = root / "models" / "src"
    before = _digest(src)
    entries, _ = run_stages(root, _alloy("qwen3_moe", ["4bit", "8bit"]))
    metrics = entries[0]["metrics"]
    assert "model_dir" not in metrics  # an artifact: the next stage still reads the last safetensors model
    return root, src, root / "work" / "part" / metrics["artifact"]["dir"], metrics["quant"], before


def test_each_quant_type_is_its_own_mlx_dir_with_its_bits_and_group_size(moe):
    root, src, out, metrics, before = moe
    assert [f["file"] for f in metrics["files"]] == ["mlx-4bit", "mlx-8bit"] and metrics["eval_file"] == "mlx-4bit"
    for entry, bits in zip(metrics["files"], (4, 8)):
        directory = out / entry["file"]
        config = json.loads((directory / "config.json").read_text())
        overrides = {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}
        assert {k: v for k, v in config["quantization"].items() if k not in overrides} == {
            "group_size": 64, "bits": bits, "mode": "affine"}
        # mlx-lm's qwen3_moe keeps the routers at 8 bits; nothing else differs.
        assert overrides == entry["layer_overrides"] == {
            f"model.layers.{i}.mlp.gate": {"bits": 8, "group_size": 64} for i in range(2)}
        assert config["num_experts"] == 4 and config["rope_theta"] == 10000.0  # translated from transformers 5
        weights = sorted(directory.glob("*.safetensors"))
        assert entry["bytes"] == sum(w.stat().st_size for w in weights) > 0
        assert (entry["bits"], entry["group_size"], entry["unquantized_matrices"]) == (bits, 64, 0)
        assert entry["quantized_tensors"] > 0
    four, eight = metrics["files"]
    assert four["bytes"] < eight["bytes"]
    assert (out / "tokenizer.json").is_file()  # eval's HF tokenizer, beside the artifact
    assert _digest(src) == before  # the source is never rewritten
    assert not [p for p in out.parent.iterdir() if ".tmp." in p.name]  # no staging or partial dir left


def test_a_fresh_mlx_process_loaded_and_generated_from_every_output(moe):
    *_, metrics, _ = moe
    for name, check in metrics["check"].items():
        assert check["logits_finite"] and check["logit_range"] > MIN_LOGIT_RANGE, name
        assert check["logits_width"] == TOKENIZER_VOCAB
        assert 1 <= len(check["generated_ids"]) <= 8
        assert all(0 <= t < TOKENIZER_VOCAB for t in check["generated_ids"])


def _source_logprobs(src: Path, ids: list[int]) -> list[float]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logprobs[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_mlx_scores_track_the_source_and_8_bits_closer_than_4(moe):
    import transformers

    _, src, out, _, _ = moe
    ids = transformers.AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"]
    reference = _source_logprobs(src, ids)
    gaps, nll = {}, {}
    for name in ("mlx-8bit", "mlx-4bit"):
        runtime = open_mlx(out / name)
        scored = runtime.score(ids)
        assert len(scored) == len(ids) - 1 and all(math.isfinite(lp) and lp < 0 for lp, _ in scored)
        gaps[name] = sum(abs(lp - ref) for (lp, _), ref in zip(scored, reference)) / len(reference)
        nll[name] = -sum(lp for lp, _ in scored) / len(scored)
        runtime.close()
    source_nll = -sum(reference) / len(reference)
    assert gaps["mlx-8bit"] < 0.01  # nats per token: 8-bit groups of 64 barely move a token's log-prob
    assert gaps["mlx-8bit"] < gaps["mlx-4bit"]
    assert math.exp(nll["mlx-4bit"]) < 1.5 * math.exp(source_nll)


def test_greedy_generation_follows_the_models_own_argmax_and_sampling_repeats_by_seed(moe):
    _, _, out, _, _ = moe
    runtime = open_mlx(out / "mlx-8bit")
    prompt = list(range(3, 13))
    generated = runtime.generate(prompt, max_new_tokens=6, temperature=0.0, seed=0, stop=lambda _: False)
    assert len(generated) == 6  # no eos (id 0) among them: it would have ended generation
    # The KV-cached steps pick what a full forward ranks first.
    assert [best for _, best in runtime.score(prompt + generated)[len(prompt) - 1:]] == [True] * 6
    stopped = runtime.generate(prompt, max_new_tokens=6, temperature=0.0, seed=0, stop=lambda g: len(g) == 2)
    assert stopped == generated[:2]
    sampled = [runtime.generate(prompt, max_new_tokens=6, temperature=1.0, seed=7, stop=lambda _: False)
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(StageFailed, match="outside the MLX model's vocabulary of 320"):
        runtime.score([1, TOKENIZER_VOCAB])


def test_a_flat_mlx_model_fails_the_fresh_process_check(moe, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    _, _, out, _, _ = moe
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(out / "mlx-4bit"), str(broken)], check=True)
    weights = load_file(broken / "model.safetensors")
    for key in ("lm_head.scales", "lm_head.biases"):  # the head dequantizes to zeros: every logit 0
        weights[key] = np.zeros_like(weights[key])
    save_file(weights, broken / "model.safetensors", metadata={"format": "mlx"})
    with pytest.raises(StageFailed, match="gives flat logits in mlx-lm"):
        quant_mlx.fresh_check(broken)


def test_a_dense_llama_converts_and_runs(tmp_path):
    root = _root_with(tmp_path, "llama")
    entries, _ = run_stages(root, _alloy("llama", ["4bit"]))
    quant = entries[0]["metrics"]["quant"]
    assert quant["files"][0]["quantized_tensors"] == 2 * 7 + 2  # 7 projections a layer, embedding, head
    assert quant["check"]["mlx-4bit"]["generated_ids"]


def test_a_family_mlx_lm_has_no_architecture_for_is_refused_before_converting(tmp_path):
    assert quant_support.mlx_family_problem("llama") is None
    assert quant_support.mlx_family_problem("mistral") is None  # mlx-lm reads it as llama
    reason = quant_support.mlx_family_problem("qwen2_5_omni")
    assert "no architecture for model_type 'qwen2_5_omni'" in reason and "gguf" in reason
    root = _root_with(tmp_path, "llama")
    config = root / "models" / "src" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "qwen2_5_omni"}))
    with pytest.raises(StageFailed, match=r"config.json model_type 'qwen2_5_omni': mlx-lm .* no architecture"):
        run_stages(root, _alloy("llama", ["4bit"]))
    assert not list((root / "work" / "part" / "stages" / "0-quant" / "model").glob("mlx-*"))


@pytest.mark.parametrize(("quant_types", "match"), [
    (["4bit", "16bit"], r"\$\.stages\[0\]\.quantTypes\[1\] '16bit': mlx takes 2bit, 3bit, 4bit, 5bit, 6bit, 8bit"),
    (["Q4_K_M"], r"\$\.stages\[0\]\.quantTypes\[0\] 'Q4_K_M'"),
    (["8bit", "8bit"], r"\$\.stages\[0\]\.quantTypes\[1\] '8bit' is listed twice"),
])
def test_bad_quant_types_are_refused_naming_the_entry(tmp_path, quant_types, match):
    root = _root_with(tmp_path, "llama")
    with pytest.raises(StageFailed, match=match):
        run_stages(root, _alloy("llama", quant_types))


def test_config_translation_lifts_rope_and_spellings_and_refuses_odd_hybrids():
    config = {"model_type": "qwen3_moe", "num_local_experts": 8, "dtype": "bfloat16",
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    out = quant_mlx.mlx_config(config, model_type="qwen3_moe")
    assert (out["num_experts"], out["rope_theta"], out["torch_dtype"]) == (8, 1e6, "bfloat16")
    assert out["rope_scaling"] == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    assert "num_experts" not in config and "rope_theta" not in config  # the caller's dict is untouched
    plain = quant_mlx.mlx_config({"model_type": "llama", "rope_parameters": {"rope_type": "default",
                                                                              "rope_theta": 5e5}},
                                 model_type="llama")
    assert plain["rope_theta"] == 5e5 and "rope_scaling" not in plain
    hybrid = {"model_type": "qwen3_5_text", "layer_types": ["linear_attention", "full_attention"] * 2}
    assert quant_mlx.mlx_config({"model_type": "qwen3_5", "text_config": hybrid},
                                model_type="qwen3_5")["text_config"]["full_attention_interval"] == 2
    odd = {**hybrid, "layer_types": ["linear_attention", "full_attention", "full_attention"]}
    with pytest.raises(StageFailed, match="is not full attention every n-th layer"):
        quant_mlx.mlx_config({"model_type": "qwen3_5", "text_config": odd}, model_type="qwen3_5")


def test_mlx_is_offered_here_and_refused_naming_the_install(monkeypatch):
    assert quant_support.mlx_problem() is None
    monkeypatch.setattr(quant_support, "installed", lambda name: name != "mlx-cpu")
    if sys.platform.startswith("linux"):
        assert quant_support.mlx_problem() == ("mlx needs the mlx-cpu package, not installed on this node: "
                                               "pip install 'mlx[cpu]' mlx-lm")
    monkeypatch.setattr(quant_support.sys, "platform", "win32")
    assert quant_support.mlx_problem().startswith("mlx has no build for win32 on ")


def test_the_probes_import_neither_mlx_nor_torch():
    code = ("import sys; from factory import quant_support as q; q.mlx_problem(); q.mlx_family_problem('llama'); "
            "print([m for m in ('mlx', 'mlx_lm', 'torch', 'stations') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_eval_measures_the_mlx_artifact_and_package_ships_it(tmp_path):
    """quant mlx -> eval (perplexity) -> package mlx, station by station: eval
    scores the 4-bit MLX directory through mlx-lm on the source's tokens,
    package ships that directory with its hashes and reloads it with mlx-lm."""
    from factory.integrity import model_hash, sha256_file
    from factory.results import ARTIFACT

    root = _root_with(tmp_path, "llama")
    (root / "calibration").mkdir(exist_ok=True)
    (root / "calibration/held.jsonl").write_text("".join(json.dumps({"text": TEXT * (i + 1)}) + "\n"
                                                         for i in range(6)))
    alloy = _alloy("llama", ["4bit"])
    alloy["stages"] += [{"type": "eval", "benchmarks": [{"name": "perplexity"}],
                         "evalCorpusFile": "calibration/held.jsonl"},
                        {"type": "package", "format": "mlx"}]
    entries, _ = run_stages(root, alloy)
    quant, evald, package = (e["metrics"] for e in entries)
    assert quant[ARTIFACT]["tiers"]["4bit"]["bytes"] == quant[ARTIFACT]["files"][0]["bytes"]
    assert evald["measured"] == {"format": "mlx", "quant_type": "4bit", "file": "mlx-4bit", "stage": 0}
    ppl = evald["perplexity"]
    assert math.isfinite(ppl["forged"]) and ppl["forged"] != ppl["source"] and ppl["tokens"] > 0
    assert 0.5 < ppl["ratio"] < 2.0  # 4-bit of the same random weights: close to the source, not equal
    shipped = root / "work/part" / package["forged_dir"]
    weights = sorted(p.name for p in shipped.glob("*.safetensors"))
    assert weights and package["modelHash"] == model_hash({n: sha256_file(shipped / n) for n in weights})
    assert package["smoke"]["ok"] and package["smoke"]["files"][shipped.name]["runtime"] == "mlx-lm"
    assert json.loads((shipped / "config.json").read_text())["quantization"]["bits"] == 4
