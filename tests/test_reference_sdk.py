"""What we write, the shipping side can read: every alloy the project ships
and every executed alloy a package stage writes validates under forge-alloy's
reference SDK (`ForgeAlloy.model_validate` from its python/forge_alloy/types.py).

The SDK is not on PyPI. It is read from $FORGE_ALLOY_SDK (a directory
holding forge_alloy/), else from the local mirror of CambrianTech/forge-alloy
(exported with `git archive` into a temp dir); without either the tests skip
and say so. Only types.py is loaded (it needs pydantic v2 and nothing else).

What the factory accepts beyond the reference, on purpose, because
published alloys carry it (a `deliver` stage, a `receipt` without
`issuedAt`), is checked here too: the executed alloy keeps those as the
input wrote them, and the factory itself adds no reference error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factory.demo import DEMO_ALLOY, EXAMPLES, prepare
from tests.linekit import make_root
from tests.stationkit import run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

SDK_ENV = "FORGE_ALLOY_SDK"
# Where this project's machines keep a mirror of github.com/CambrianTech/forge-alloy.
MIRROR = Path("/work/.mirror/CambrianTech+forge-alloy/repo")
TYPES = Path("forge_alloy") / "types.py"
SHIPPED_ALLOYS = sorted(EXAMPLES.rglob("*.alloy.json"))


def _sdk_dir(tmp: Path) -> Path:
    """A directory holding forge_alloy/types.py, or pytest.skip with why."""
    given = os.environ.get(SDK_ENV)
    if given:
        if not (Path(given) / TYPES).is_file():
            pytest.fail(f"${SDK_ENV}={given} holds no {TYPES}; point it at the python/ dir of a forge-alloy checkout")
        return Path(given)
    if not MIRROR.exists() or shutil.which("git") is None:
        pytest.skip(f"forge-alloy's reference SDK is not here: set ${SDK_ENV} to the python/ dir of a "
                    f"CambrianTech/forge-alloy checkout (no mirror at {MIRROR})")
    archive = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD", "python"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp / "python"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """forge-alloy's reference `ForgeAlloy` model, loaded from its file."""
    path = _sdk_dir(tmp_path_factory.mktemp("forge-alloy-sdk")) / TYPES
    name = "forge_alloy_reference_types"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the forward references through it
    try:
        spec.loader.exec_module(module)
        yield module.ForgeAlloy
    finally:
        del sys.modules[name]


def reference_errors(model, alloy: dict) -> set[tuple]:
    """The JSON paths the reference SDK refuses in `alloy` (empty: it validates)."""
    from pydantic import ValidationError

    try:
        model.model_validate(alloy)
    except ValidationError as err:
        return {tuple(e["loc"]) for e in err.errors()}
    return set()


# ── what the project ships ──────────────────────────────────────────────────


def test_the_examples_ship_the_four_alloys_the_readme_names():
    assert {p.name for p in SHIPPED_ALLOYS} >= {"demo.alloy.json", "dense.alloy.json",
                                                  "baseline-router-l2.alloy.json",
                                                  "baseline-prose-calibration.alloy.json"}
    others = [p for p in EXAMPLES.rglob("*.json") if p not in SHIPPED_ALLOYS]
    assert not [p for p in others if "stages" in json.loads(p.read_text())], "an alloy not named *.alloy.json"


@pytest.mark.parametrize("path", SHIPPED_ALLOYS, ids=lambda p: p.name)
def test_every_shipped_alloy_validates_under_the_reference(reference, path):
    alloy = json.loads(path.read_text())
    assert reference_errors(reference, alloy) == set()
    # the factory's own extensions sit where the reference keeps extra keys, under our name
    assert "benchmarks" not in (alloy.get("acceptanceCriteria") or {}) or \
        all("min" in gate for gate in alloy["acceptanceCriteria"]["benchmarks"].values())


# ── what a package stage writes ─────────────────────────────────────────────


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("ref") / "root")
    add_tokenizer(build_tiny_model("llama", root / "models/m", vocab_size=TOKENIZER_VOCAB))
    (root / "data").mkdir()
    (root / "data/train.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                                                   for i in range(40)))
    (root / "calibration/held.jsonl").write_text("".join(json.dumps({"text": f"def g{i}(y):\n    return y - {i}\n"})
                                                         + "\n" for i in range(40)))
    return root


def _executed(root: Path, alloy: dict, base: str, upto: int) -> dict:
    entries, _ = run_stages(root, alloy, base=base, upto=upto)
    return json.loads((root / "work" / base / entries[upto - 1]["metrics"]["forged_dir"] / "forge-alloy.json")
                      .read_text())


def test_the_executed_alloy_of_a_forge_validates_under_the_reference(reference, dense_root):
    from factory.integrity import sha256_file

    alloy = {
        "name": "ref-check", "version": "1.0.0", "license": "apache-2.0",
        "source": {"baseModel": "models/m", "architecture": "llama"},
        "calibrationCorpora": [{"id": "held", "path": "calibration/held.jsonl",
                                "sha256": sha256_file(dense_root / "calibration/held.jsonl")}],
        "stages": [{"type": "lora", "dataset": "data/train.jsonl", "steps": 2, "learningRate": "1e-3", "rank": 4,
                    "sequenceLength": 64, "mergeAfter": True},
                   {"type": "eval", "benchmarks": [{"name": "perplexity", "subset": "held"}], "evalTokens": 256,
                    "evalBlockSize": 64},
                   {"type": "package", "format": "safetensors"},
                   {"type": "publish", "org": "acme"},
                   {"type": "deploy", "target": "node-a"}],
        "acceptanceCriteria": {"forgeFactory": {"perplexity": {"maxRatio": 10.0}}},
    }
    assert reference_errors(reference, alloy) == set()
    executed = _executed(dense_root, alloy, "ref", upto=3)
    assert reference_errors(reference, executed) == set()
    parsed = reference.model_validate(executed)
    assert parsed.results.integrity.model_hash.startswith("sha256:")
    assert parsed.results.final_perplexity == executed["results"]["forgeFactory"]["perplexity"][0]["forged"]
    assert [s.type for s in parsed.stages] == ["lora", "eval", "package", "publish", "deploy"]


def test_the_demos_executed_alloy_validates_under_the_reference(reference, tmp_path):
    root = tmp_path / "demo"
    prepare(root)
    alloy = json.loads(DEMO_ALLOY.read_text())
    executed = _executed(root, alloy, "demo", upto=len(alloy["stages"]))
    assert reference_errors(reference, executed) == set()
    corpora = {c["ref"] for c in executed["results"]["integrity"]["calibrationCorpora"]}
    assert corpora == {"code-calib", "code-eval", "prose-eval"}


def test_the_factory_adds_no_reference_error_to_what_published_alloys_carry(reference, dense_root):
    """Published alloys end with `{"type": "deliver"}` (forge-alloy's
    llm-forge domain reads it as publish; its core types do not) and carry
    `"receipt": {}`. The factory accepts both, keeps them as written, and
    the reference's objections to the executed alloy are exactly those."""
    alloy = {"name": "lenient", "version": "1.0.0", "source": {"baseModel": "models/m", "architecture": "llama"},
             "stages": [{"type": "package", "format": "safetensors"}, {"type": "deliver"}], "receipt": {}}
    before = reference_errors(reference, alloy)
    assert before == {("stages", 1), ("receipt", "issuedAt")}
    executed = _executed(dense_root, alloy, "lenient", upto=1)
    assert executed["stages"][1] == {"type": "deliver"} and executed["receipt"] == {}
    assert reference_errors(reference, executed) == before
