"""GGUF through llama.cpp's own tools, checked by llama.cpp itself.

Every family llama.cpp's converter registers is forged into Q4_K_M and Q8_0
files by the quant station, each loaded by llama.cpp in a fresh process,
evaluated (perplexity by llama.cpp) and packaged; a whole part runs profile -> prune -> quant gguf -> eval -> package in the
daemon, with perplexity measured on the GGUF itself and the package's
hashes re-checked by `factory verify`. Needs bootstrap/format-tools.sh's
install (the README's test command runs it); nothing here is mocked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from adapters import families, get_family
from factory import catalog, quant_support
from factory.integrity import model_hash, sha256_file
from factory.results import ARTIFACT, MODEL_DIR
from stations.llama_cpp_runtime import open_gguf
from tests.linekit import events, factory, make_root, write_alloy
from tests.stationkit import make_ctx, run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

pytestmark = pytest.mark.skipif(quant_support.gguf_problem() is not None,
                                reason=f"gguf tools not installed: {quant_support.gguf_problem()}")

# Families llama.cpp's converter does not take, with why (asserted below, so
# a converter that starts taking one makes this list fail, not go stale).
NOT_CONVERTED = {
    "phimoe": "spelled differently",  # transformers writes PhimoeForCausalLM, llama.cpp registers PhiMoEForCausalLM
    "qwen2_5_omni": "no class for architecture",  # it registers the thinker alone (Qwen2_5OmniModel)
}
# Converted, but this stand-in is saved by transformers 5 with its fused
# experts in the in-memory orientation ([E, 2I, H]); llama.cpp's converter
# reads the Hub's transposed one, and llama.cpp refuses the shapes it wrote.
WRONG_ORIENTATION = {"qwen3_vl_moe"}
# llama.cpp's qwen2vl graph turns a whole batch NaN when it holds a token
# whose embedding row is all zeros: the tiny model's pad token (transformers
# zero-initialises padding_idx). Eval must say so, not report NaN.
NAN_ON_A_ZERO_EMBEDDING = {"qwen2_5_vl"}
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n"


def _alloy(model: str, family: str, stages: list[dict]) -> dict:
    return {"name": "gguf", "version": "1.0.0", "source": {"baseModel": model, "architecture": family},
            "stages": stages}


def _model(root, family: str):
    model = root / "models" / family
    if not (model / "config.json").exists():
        add_tokenizer(build_tiny_model(family, model, vocab_size=TOKENIZER_VOCAB))
    return model


def _quant(root, family: str, types=("Q4_K_M", "Q8_0"), tiers=None):
    model = _model(root, family)
    stage = {"type": "quant", "format": "gguf", "quantTypes": list(types)}
    if tiers:
        stage["tiers"] = tiers
    ctx = make_ctx(root, _alloy(str(model), family, [stage]), 0, base=f"q-{family}")
    return ctx, catalog.load_station("quant")(ctx)


@pytest.mark.parametrize("family", sorted(f.name for f in families()))
def test_every_family_llama_cpp_converts_is_quantized_evaluated_and_packaged(tmp_path, family):
    """quant gguf (Q4_K_M, Q8_0) -> eval (perplexity on the Q4_K_M file, by
    llama.cpp) -> package gguf, station by station, for every family."""
    spec = get_family(family)
    problem = quant_support.gguf_architecture_problem(list(spec.architectures))
    if family in NOT_CONVERTED:
        assert problem is not None and NOT_CONVERTED[family] in problem
        return
    assert problem is None
    root = make_root(tmp_path / "root")
    if family in WRONG_ORIENTATION:
        with pytest.raises(Exception, match="wrong shape"):
            _quant(root, family)
        return
    _model(root, family)
    (root / "calibration/held.jsonl").write_text("".join(json.dumps({"text": CODE * (i + 1)}) + "\n"
                                                         for i in range(4)))
    stages = [{"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M", "Q8_0"]},
              {"type": "eval", "benchmarks": [{"name": "perplexity"}], "evalCorpusFile": "calibration/held.jsonl"},
              {"type": "package", "format": "gguf"}]
    alloy = _alloy(str(root / "models" / family), family, stages)
    if family in NAN_ON_A_ZERO_EMBEDDING:
        with pytest.raises(Exception, match="non-finite log-probabilities"):
            run_stages(root, alloy, base=f"f-{family}")
        return
    entries, _ = run_stages(root, alloy, base=f"f-{family}")
    quant, evald, package = (e["metrics"] for e in entries)
    artifact = quant[ARTIFACT]
    assert MODEL_DIR not in quant  # the next stage's model is still the safetensors one
    assert [f["quant_type"] for f in artifact["files"]] == ["Q4_K_M", "Q8_0"]
    work = root / "work" / f"f-{family}"
    out = work / artifact["dir"]
    for entry, recorded in zip(quant["quant"]["files"], quant["fileHashes"]):
        path = out / entry["file"]
        assert path.read_bytes()[:4] == b"GGUF"
        assert recorded == {"filename": entry["file"], "sha256": sha256_file(path), "size": path.stat().st_size}
        check = entry["check"]  # llama.cpp's forward pass in a fresh process
        assert check["ok"] and check["logits_finite"] and check["logits_std"] > 0
        assert check["vocab"] == TOKENIZER_VOCAB
    assert quant["modelHash"] == model_hash(quant["fileHashes"])
    assert not list((work / "stages/0-quant").glob("*.gguf"))  # the f16 intermediate is gone
    # eval measured the Q4_K_M file through llama.cpp on the source's tokens
    assert evald["measured"]["file"] == "model-Q4_K_M.gguf"
    ppl = evald["perplexity"]
    assert math.isfinite(ppl["forged"]) and ppl["tokens"] > 0 and ppl["forged"] != ppl["source"]
    # package shipped both files, hashed, each reloaded by a fresh llama.cpp
    shipped = work / package["forged_dir"]
    assert sorted(h["filename"] for h in package["fileHashes"]) == ["model-Q4_K_M.gguf", "model-Q8_0.gguf"]
    assert package["modelHash"] == quant["modelHash"]  # the same bytes, hard-linked
    assert package["smoke"]["ok"] and len(package["smoke"]["files"]) == 2
    assert (shipped / "forge-alloy.json").is_file() and (shipped / "tokenizer.json").is_file()


def test_q8_is_closer_to_the_source_than_q4_on_the_same_tokens(tmp_path):
    """llama.cpp's own logits against transformers' at float32: Q8_0 within a
    small fraction of a nat per token, Q4_K_M further (tiny widths make
    llama.cpp fall back to 4/5-bit block types for K-quants: recorded)."""
    import torch
    import transformers

    root = make_root(tmp_path / "root")
    ctx, result = _quant(root, "qwen3")
    out = ctx.work_dir / result.metrics[ARTIFACT]["dir"]
    model_dir = root / "models/qwen3"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(CODE)["input_ids"]
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits.double(), -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    gaps = {}
    for qtype in ("Q4_K_M", "Q8_0"):
        runtime = open_gguf(out / f"model-{qtype}.gguf")
        scored = runtime.score(ids)
        runtime.close()
        assert len(scored) == len(ids) - 1
        gaps[qtype] = float((torch.tensor([lp for lp, _ in scored], dtype=torch.float64) - ref).abs().mean())
    assert gaps["Q8_0"] < 0.05, gaps
    assert gaps["Q8_0"] < gaps["Q4_K_M"], gaps
    types = {f["quant_type"]: f["check"]["tensor_types"] for f in result.metrics["quant"]["files"]}
    assert "Q8_0" in types["Q8_0"]


def test_tiers_are_reported_against_fits_vram(tmp_path):
    root = make_root(tmp_path / "root")
    tiers = {"Q4_K_M": {"sizeGb": 0.5, "fitsVramGb": 12}, "Q8_0": {"fitsVramGb": 1e-9}}
    _, result = _quant(root, "llama", tiers=tiers)
    got = result.metrics[ARTIFACT]["tiers"]
    assert got["Q4_K_M"]["fits"] is True and got["Q4_K_M"]["fits_vram_gb"] == 12
    assert got["Q4_K_M"]["declared_size_gb"] == 0.5
    assert got["Q8_0"]["fits"] is False  # bigger than a nanobyte card
    assert got["Q4_K_M"]["bytes"] < got["Q8_0"]["bytes"]


def test_an_unknown_quant_type_fails_naming_it(tmp_path):
    root = make_root(tmp_path / "root")
    with pytest.raises(Exception, match="Q9_X"):
        _quant(root, "llama", types=("Q9_X",))


def test_the_converter_runs_no_code_the_model_dir_carries(tmp_path):
    """A model dir with a tokenizer that names remote code: the converter
    asks transformers with trust_remote_code=True, but reads a staging dir
    that holds only weights, config and tokenizer files."""
    model = add_tokenizer(build_tiny_model("llama", tmp_path / "m", vocab_size=TOKENIZER_VOCAB))
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.Tok", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "stations.gguf_convert", str(model), str(tmp_path / "o.gguf")],
                          capture_output=True, text=True)
    assert not marker.exists()
    assert proc.returncode != 0 or (tmp_path / "o.gguf").read_bytes()[:4] == b"GGUF"


def test_profile_prune_quant_eval_package_in_the_daemon(tmp_path):
    root = make_root(tmp_path / "root")
    add_tokenizer(build_tiny_model("qwen3_moe", root / "models/moe", vocab_size=TOKENIZER_VOCAB))
    for split in ("calib", "eval"):
        (root / f"calibration/code.{split}.jsonl").write_text(
            "".join(json.dumps({"text": CODE * (i + 1)}) + "\n" for i in range(12)))
    corpora = [{"id": f"code-{s}", "path": f"calibration/code.{s}.jsonl",
                "sha256": sha256_file(root / f"calibration/code.{s}.jsonl"), "format": "jsonl", "textField": "text"}
               for s in ("calib", "eval")]
    alloy = {"name": "gguf-forge", "version": "1.0.0",
             "source": {"baseModel": "models/moe", "architecture": "qwen3_moe", "isMoE": True},
             "calibrationCorpora": corpora,
             "stages": [
                 {"type": "expert-activation-profile", "calibrationCorpus": "code-calib", "calibrationTokens": 2000},
                 {"type": "expert-prune", "keepExpertsPerLayer": 2, "metric": "activation_count"},
                 {"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M", "Q8_0"]},
                 {"type": "eval", "benchmarks": [{"name": "perplexity", "subset": "code-eval"}]},
                 {"type": "package", "format": "gguf"},
             ],
             "acceptanceCriteria": {"integrity": {"requireModelHash": True, "requireReload": True}}}
    assert factory("enqueue", str(write_alloy(tmp_path / "g.alloy.json", alloy)), root=root).returncode == 0
    r = factory("run", "--until-empty", root=root, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((root / "line/finished/g.result.json").read_text())
    assert result["acceptance"]["passed"] is True, result["acceptance"]
    # eval measured the Q4_K_M file through llama.cpp, on the source's tokens
    ckpt = json.loads((root / "work/g/checkpoint.json").read_text())
    evald = next(s for s in ckpt["stages"] if s["type"] == "eval")["metrics"]
    assert evald["measured"] == {"format": "gguf", "quant_type": "Q4_K_M", "file": "model-Q4_K_M.gguf", "stage": 2}
    ppl = result["perplexity"][0]
    assert math.isfinite(ppl["forged"]) and ppl["forged"] > 1 and ppl["tokens"] > 0
    assert ppl["forged"] != ppl["source"]
    [artifact] = result["artifacts"]
    assert artifact["format"] == "gguf" and [f["quant_type"] for f in artifact["files"]] == ["Q4_K_M", "Q8_0"]
    # the package: both GGUFs, hashed; modelHash recomputes; a fresh llama.cpp loaded each
    forged = root / "work/g" / result["forged_dir"].split("/work/g/")[1]
    ggufs = sorted(p.name for p in forged.glob("*.gguf"))
    assert ggufs == ["model-Q4_K_M.gguf", "model-Q8_0.gguf"]
    assert sorted(h["filename"] for h in result["fileHashes"]) == ggufs
    assert result["modelHash"] == model_hash({n: sha256_file(forged / n) for n in ggufs})
    files = [(e["quant_type"], e["bytes"]) for e in events(root, "quant/file", "g")]
    assert files == [(f["quant_type"], f["bytes"]) for f in artifact["files"]]
    pkg = next(s for s in ckpt["stages"] if s["type"] == "package")["metrics"]
    assert pkg["smoke"]["ok"] and set(pkg["smoke"]["files"]) == set(ggufs)
    assert all(f["runtime"] == "llama.cpp" for f in pkg["smoke"]["files"].values())
    verify = factory("verify", str(forged), root=root)
    assert verify.returncode == 0, verify.stdout
    # a flipped byte in a GGUF is caught
    target = forged / "model-Q8_0.gguf"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.unlink()  # a hard link to the quant stage's file: break it, never edit that one
    target.write_bytes(bytes(data))
    verify = factory("verify", str(forged), root=root)
    assert verify.returncode == 1 and "model-Q8_0.gguf" in verify.stdout
