"""factory.plan: the plan level, on real tiny checkpoints inside a real root.

Every family in the adapters registry is planned from a tiny model copied
into <root>/models/<family>; each bad input is a root, a model and an alloy
file with one thing wrong. `node_memory` is passed so load plans do not
depend on the machine, `offline`/`hf_cache_dir` so nothing asks the Hub, and
a node config with no disk reserve so the hot tier's free space never decides
a test that is not about it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapters import Family, families
from factory.load_plan import NodeMemory
from factory.nodeconfig import NodeConfig
from factory.plan import FamilyPlan, Plan, StagePlan, make_plan
from factory.catalog import CATALOG

from tests.tiny_models import EXPERTS, LAYERS, TOP_K

GIB = 1 << 30
ROOMY = NodeMemory(free_ram_bytes=64 * GIB, free_vram_bytes=None, cuda_available=False)
TINY_RAM = NodeMemory(free_ram_bytes=1 * GIB, free_vram_bytes=None, cuda_available=False)
NODE = NodeConfig.model_validate({"storage": {"hot": {"min_free_gb": 0}}})
STATIONS = {t: k.station for t, k in CATALOG.items() if k.station}
NO_STATION = "is not a stage type"


# ── a root with models, corpora and alloys ──────────────────────────────────


@dataclass
class Setup:
    """One test's root; `model()` and `corpus()` put real files in it."""

    root: Path
    tiny_model: Callable[..., Path]
    config: NodeConfig = NODE
    memory: NodeMemory = ROOMY
    cache: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cache = self.root.parent / "hf-cache"

    def model(self, family: str = "llama", *, name: str | None = None, dest: Path | None = None) -> Path:
        """Copy the session's tiny `family` model to <root>/models/<name>."""
        dest = dest or self.root / "models" / (name or family)
        return Path(shutil.copytree(self.tiny_model(family), dest))

    def corpus(self, rel: str = "calibration/code.jsonl") -> str:
        """Write a small JSONL corpus under the root; its sha256 hex."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": f"def f{i}(): return {i}"}) + "\n" for i in range(20)))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def plan(self, alloy: dict[str, Any]) -> Plan:
        file = self.root / "part.alloy.json"
        file.write_text(json.dumps(alloy, indent=2))
        return make_plan(file, root=self.root, config=self.config, node_memory=self.memory, offline=True,
                         hf_cache_dir=self.cache)


@pytest.fixture
def setup(tmp_path: Path, tiny_model: Callable[..., Path]) -> Setup:
    (tmp_path / "root").mkdir()
    return Setup(root=(tmp_path / "root").resolve(), tiny_model=tiny_model)


def alloy(base: str = "models/llama", arch: str = "llama", stages: list[dict] | None = None,
          **extra: Any) -> dict[str, Any]:
    """A valid alloy; the default stages are ours, so they always have a station."""
    stages = stages if stages is not None else [{"type": "selftest", "seconds": 0}, {"type": "deliver"}]
    return {"name": "plan-test", "version": "1.0.0", "source": {"baseModel": base, "architecture": arch},
            "stages": stages, **extra}


def measured_tensor_bytes(model_dir: Path) -> tuple[int, int]:
    """(data bytes, parameter count) of every safetensors file, read here
    independently of factory.model_files: the data section's size and the
    header's shapes."""
    data = params = 0
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        data += path.stat().st_size - 8 - length
        params += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return data, params


def no_station_paths(plan: Plan) -> list[str]:
    return [f.path for f in plan.findings if NO_STATION in f.message]


# ── every family ────────────────────────────────────────────────────────────


def _family_alloy(family: Family, s: Setup) -> dict[str, Any]:
    """MoE: profile + expert-prune keeping top-k + 1; dense: head prune."""
    arch = family.aliases[0] if family.aliases else family.name  # aliases resolve too
    if not family.is_moe:
        return alloy(f"models/{family.name}", arch, [{"type": "prune", "strategy": "entropy", "level": 0.25},
                                                     {"type": "deliver"}])
    sha = s.corpus()
    stages = [{"type": "expert-activation-profile", "calibrationCorpus": "code",
               "calibrationCorpusFile": "calibration/code.jsonl"},
              {"type": "expert-prune", "keepExpertsPerLayer": TOP_K + 1}, {"type": "deliver"}]
    return alloy(f"models/{family.name}", arch, stages,
                 calibrationCorpora=[{"name": "code", "path": "calibration/code.jsonl", "sha256": f"sha256:{sha}"}])


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_every_family_plans(family: Family, setup: Setup) -> None:
    model_dir = setup.model(family.name)
    plan = setup.plan(_family_alloy(family, setup))

    forge = [s for s in plan.stages if s.role == "forge"]
    missing = [f"$.stages[{s.index}].type" for s in forge if s.type not in STATIONS]
    assert [f.path for f in plan.findings] == missing, plan.render_text()  # only stations may be missing
    assert no_station_paths(plan) == missing
    for s in forge:
        assert (s.station, s.runs_here, s.handed_off) == (STATIONS.get(s.type), s.type in STATIONS, False)
    assert plan.stages[-1] == StagePlan(len(plan.stages) - 1, "deliver", "ship", None, False, True)

    assert plan.source.kind == "local" and plan.source.path == model_dir
    moe = (EXPERTS, TOP_K) if family.is_moe else (None, None)
    assert plan.family == FamilyPlan(family.name, family.is_moe, *moe, LAYERS, from_config=True)
    assert plan.load_plan.strategy == "cpu" and plan.load_plan.dtype == "bfloat16"

    data_bytes, params = measured_tensor_bytes(model_dir)
    assert plan.resources.model_bytes == data_bytes  # measured, never a parameter formula
    assert plan.resources.bytes_at_16bit == 2 * params
    assert plan.resources.full_copies == 1  # expert-prune or prune
    assert plan.resources.work_dir_bytes == 2 * 2 * params
    out = json.loads(json.dumps(plan.to_json()))
    assert out["family"]["name"] == family.name and out["resources"]["model_gib"] == round(data_bytes / GIB, 6)
    assert family.name in plan.render_text()


def test_selftest_pair_plans_without_resolving(setup: Setup) -> None:
    plan = setup.plan(alloy("selftest", "selftest", [{"type": "selftest", "seconds": 0}]))
    assert plan.ok, plan.render_text()
    assert (plan.source.kind, plan.source.path, plan.family, plan.load_plan, plan.resources) == (
        "selftest", None, None, None, None)
    assert plan.stages == [StagePlan(0, "selftest", "forge", STATIONS["selftest"], True, False)]
    assert plan.alloy_name == "plan-test" and plan.alloy_hash.startswith("sha256:")
    assert not setup.cache.exists()


def test_schema_findings_stop_before_the_plan(setup: Setup) -> None:
    plan = setup.plan(alloy(stages=[{"type": "prune", "strategy": "entropy", "level": 1.5}]))
    assert [(f.level, f.path) for f in plan.findings] == [("schema", "$.stages[0].level")]
    assert (plan.source, plan.stages, plan.load_plan) == (None, [], None)
    assert not plan.to_json()["ok"]


def test_model_from_the_hf_cache(setup: Setup) -> None:
    """A repo id planned offline from a real cache layout holding a tiny model."""
    commit = "f" * 40
    repo = setup.cache / "models--acme--tiny-llama"
    setup.model("llama", dest=repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    plan = setup.plan(alloy("acme/tiny-llama", "llama"))
    assert plan.ok, plan.render_text()
    assert (plan.source.kind, plan.source.repo_id, plan.source.commit, plan.source.cached) == (
        "hub", "acme/tiny-llama", commit, True)
    assert plan.family.name == "llama" and plan.resources.model_bytes == measured_tensor_bytes(plan.source.path)[0]


def test_online_uncached_repo_is_a_note_not_a_finding(setup: Setup) -> None:
    file = setup.root / "part.alloy.json"
    file.write_text(json.dumps(alloy("acme/ghost-7b", "llama")))
    plan = make_plan(file, root=setup.root, config=NODE, node_memory=ROOMY, offline=False,
                     hf_cache_dir=setup.cache)
    assert plan.ok, plan.render_text()
    assert plan.source.cached is False and plan.load_plan is None and plan.resources is None
    assert "downloaded when the part runs" in plan.notes[0]
    assert plan.family == FamilyPlan("llama", False, None, None, None, from_config=False)


def test_ship_stages_are_handed_off_not_dropped(setup: Setup) -> None:
    setup.model("llama")
    stages = [{"type": "selftest", "seconds": 0}, {"type": "publish", "org": "acme"},
              {"type": "deploy", "target": "grid-7"}, {"type": "deliver"}]
    plan = setup.plan(alloy(stages=stages))
    assert plan.ok, plan.render_text()
    assert [(s.type, s.role, s.runs_here, s.handed_off) for s in plan.stages[1:]] == [
        ("publish", "ship", False, True), ("deploy", "ship", False, True), ("deliver", "ship", False, True)]
    assert "handed to the ship role" in plan.render_text()


@pytest.mark.parametrize("stage_type", ["many-worlds-ensemble", "team-search", "gate-profile", "population-prune",
                                        "cv-ingest", "cv-eval", "x-frobnicate"])
def test_stages_of_other_domains_are_refused_at_plan_time(setup: Setup, stage_type: str) -> None:
    setup.model("llama")
    plan = setup.plan(alloy(stages=[{"type": "selftest", "seconds": 0}, {"type": stage_type}]))
    assert [f.path for f in plan.findings] == ["$.stages[1].type"], plan.render_text()
    assert plan.stages[1].role == "refused" and not plan.stages[1].runs_here
    assert "remove $.stages[1]" in plan.findings[0].fix


def test_huge_config_refused_before_reading_tensors(setup: Setup) -> None:
    """hidden_size 10**7 is refused from config.json alone: the weights are
    truncated to garbage here, and no finding mentions them."""
    model = setup.model("llama")
    _edit_config(model, hidden_size=10**7)
    for shard in model.glob("*.safetensors"):
        shard.write_bytes(b"\xff" * 7)
    plan = setup.plan(alloy())
    assert all(f.path == "$.source.baseModel" for f in plan.findings)
    assert any("hidden_size=10,000,000 is absurd" in f.message for f in plan.findings)
    assert not any("unreadable" in f.message or "shorter" in f.message for f in plan.findings)
    assert plan.load_plan is None and plan.resources is None


def _edit_config(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ── bad inputs at plan level ────────────────────────────────────────────────


def _unknown_arch(s: Setup) -> dict:
    s.model("llama")
    return alloy(arch="gpt-neo-x")


def _arch_disagrees(s: Setup) -> dict:
    s.model("llama")
    return alloy(arch="qwen2.5")  # an alias of qwen2


def _missing_dir(s: Setup) -> dict:
    return alloy(base="./models/nothing-here")


def _outside_absolute(s: Setup) -> dict:
    return alloy(base=str(s.model("llama", dest=s.root.parent / "elsewhere" / "llama")))


def _outside_dotdot(s: Setup) -> dict:
    s.model("llama", dest=s.root.parent / "elsewhere" / "llama")
    return alloy(base="../elsewhere/llama")


def _outside_symlink(s: Setup) -> dict:
    outside = s.model("llama", dest=s.root.parent / "elsewhere" / "llama")
    (s.root / "models").mkdir()
    (s.root / "models" / "llama").symlink_to(outside, target_is_directory=True)
    return alloy(base="models/llama")


def _hub_absent_offline(s: Setup) -> dict:
    return alloy(base="acme/ghost-7b", source_revision="v2")


def _corpus_missing(s: Setup) -> dict:
    s.model("llama")
    return alloy(calibrationCorpora=[{"name": "c", "path": "calibration/gone.jsonl", "sha256": "a" * 64}])


def _corpus_sha_mismatch(s: Setup) -> dict:
    s.model("llama")
    s.corpus()
    return alloy(calibrationCorpora=[{"name": "c", "path": "calibration/code.jsonl", "sha256": "a" * 64}])


def _stage_corpus_file_mismatch(s: Setup) -> dict:
    """The stage reads another file than the pinned corpus."""
    s.model("qwen3_moe")
    sha = s.corpus()
    s.corpus("calibration/other.jsonl")
    (s.root / "calibration" / "other.jsonl").write_text('{"text": "different"}\n')
    return alloy("models/qwen3_moe", "qwen3_moe",
                 [{"type": "expert-activation-profile", "calibrationCorpus": "c",
                   "calibrationCorpusFile": "calibration/other.jsonl"}],
                 calibrationCorpora=[{"name": "c", "path": "calibration/code.jsonl", "sha256": sha}])


def _stage_corpus_unknown(s: Setup) -> dict:
    s.model("qwen3_moe")
    return alloy("models/qwen3_moe", "qwen3_moe", [{"type": "expert-activation-profile", "calibrationCorpus": "x"}])


def _keep_below_top_k(s: Setup) -> dict:
    s.model("qwen3_moe")
    return alloy("models/qwen3_moe", "qwen3_moe", [{"type": "expert-prune", "keepExpertsPerLayer": TOP_K - 1}])


def _keep_above_experts(s: Setup) -> dict:
    s.model("olmoe")
    return alloy("models/olmoe", "olmoe", [{"type": "expert-prune", "keepExpertsPerLayer": EXPERTS + 1}])


def _second_prune_above_first(s: Setup) -> dict:
    """Experts pruned away by stage 0 cannot be kept by stage 1."""
    s.model("mixtral")
    return alloy("models/mixtral", "mixtral", [{"type": "expert-prune", "keepExpertsPerLayer": TOP_K},
                                               {"type": "expert-prune", "keepExperts": TOP_K + 1}])


def _expert_prune_on_dense(s: Setup) -> dict:
    s.model("qwen3")
    return alloy("models/qwen3", "qwen3", [{"type": "expert-prune", "keepExpertsPerLayer": 2}])


def _declared_experts_wrong(s: Setup) -> dict:
    s.model("qwen2_moe")
    data = alloy("models/qwen2_moe", "qwen2-moe")
    data["source"]["numExpertsPerLayer"] = 60
    return data


def _huge_geometry(s: Setup) -> dict:
    _edit_config(s.model("mistral"), hidden_size=10**7)
    return alloy("models/mistral", "mistral")


def _shape_mismatch(s: Setup) -> dict:
    _edit_config(s.model("llama"), num_attention_heads=2)  # the saved q_proj has 4 heads' rows
    return alloy()


def _pickle_only(s: Setup) -> dict:
    model = s.model("llama")
    for shard in model.glob("*.safetensors"):
        shard.rename(model / "pytorch_model.bin")
    return alloy()


def _unsupported_stage(s: Setup) -> dict:
    s.model("llama")
    return alloy(stages=[{"type": "x-frobnicate"}])


def _forge_stage_on_ship_node(s: Setup) -> dict:
    s.model("llama")
    s.config = NodeConfig.model_validate({"node": {"roles": ["ship"]}, "storage": {"hot": {"min_free_gb": 0}}})
    return alloy()


def _not_enough_disk(s: Setup) -> dict:
    s.model("llama")
    s.config = NodeConfig.model_validate({"storage": {"hot": {"min_free_gb": 10**9}}})
    return alloy()


def _load_refused(s: Setup) -> dict:
    s.model("llama")
    s.memory = TINY_RAM
    return alloy()


def _corpus_escapes(s: Setup) -> dict:
    s.model("llama")
    return alloy(calibrationCorpora=[{"name": "c", "path": "../secrets.jsonl", "sha256": "a" * 64}])


# (id, build, level, JSON path, message fragments). Escaping paths in corpus
# fields are already refused at schema level (validation checks every *File /
# path key against the root), so the plan never sees them: that row says so.
BAD: list[tuple[str, Callable[[Setup], dict], str, str, tuple[str, ...]]] = [
    ("unknown-architecture", _unknown_arch, "plan", "$.source.architecture",
     ("unsupported here, because no family is registered for 'gpt-neo-x'", "known: deepseek_v2")),
    ("architecture-disagrees-with-config", _arch_disagrees, "plan", "$.source.architecture",
     ("is family 'qwen2'", "says model_type 'llama'")),
    ("missing-local-dir", _missing_dir, "plan", "$.source.baseModel", ("no such directory",)),
    ("model-dir-absolute-outside-root", _outside_absolute, "plan", "$.source.baseModel",
     ("is absolute", "outside")),
    ("model-dir-dotdot", _outside_dotdot, "plan", "$.source.baseModel", ("climbs out with '..'",)),
    ("model-dir-symlink-out", _outside_symlink, "plan", "$.source.baseModel", ("goes through a symlink",)),
    ("hub-id-not-cached-offline", _hub_absent_offline, "plan", "$.source.baseModel",
     ("'acme/ghost-7b' at revision 'v2' is not in the Hugging Face cache",)),
    ("corpus-missing", _corpus_missing, "plan", "$.calibrationCorpora[0].path", ("does not exist",)),
    ("corpus-sha256-mismatch", _corpus_sha_mismatch, "plan", "$.calibrationCorpora[0].sha256",
     ("but $.calibrationCorpora[0].sha256 pins " + "a" * 64,)),
    ("stage-corpus-file-not-the-pinned-one", _stage_corpus_file_mismatch, "plan",
     "$.stages[0].calibrationCorpusFile", ("other.jsonl", "pins")),
    ("stage-corpus-unknown", _stage_corpus_unknown, "plan", "$.stages[0].calibrationCorpus",
     ("its station would have nothing to read",)),
    ("corpus-path-escape", _corpus_escapes, "schema", "$.calibrationCorpora[0].path", ("climbs out",)),
    ("keep-below-top-k", _keep_below_top_k, "plan", "$.stages[0].keepExpertsPerLayer",
     (f"below the model's top-k of {TOP_K}",)),
    ("keep-above-expert-count", _keep_above_experts, "plan", "$.stages[0].keepExpertsPerLayer",
     (f"more than the {EXPERTS} experts",)),
    ("second-prune-keeps-more", _second_prune_above_first, "plan", "$.stages[1].keepExperts",
     (f"more than the {TOP_K} experts",)),
    ("expert-prune-on-dense", _expert_prune_on_dense, "plan", "$.stages[0].type",
     ("needs a mixture-of-experts model", "qwen3, which is dense")),
    ("declared-expert-count-wrong", _declared_experts_wrong, "plan", "$.source.numExpertsPerLayer",
     (f"which gives {EXPERTS}",)),
    ("huge-geometry", _huge_geometry, "plan", "$.source.baseModel",
     ("refused from config.json before reading tensors", "hidden_size=10,000,000 is absurd")),
    ("config-tensor-shape-mismatch", _shape_mismatch, "plan", "$.source.baseModel",
     ("and the tensors on disk disagree", "q_proj")),
    ("pickle-only-weights", _pickle_only, "plan", "$.source.baseModel", ("pytorch_model.bin", "arbitrary code")),
    ("unsupported-stage-type", _unsupported_stage, "plan", "$.stages[0].type",
     ("stage type 'x-frobnicate' is not a stage type",)),
    ("forge-stage-on-ship-node", _forge_stage_on_ship_node, "plan", "$.stages[0].type",
     ("is forge work", "['ship']")),
    ("not-enough-disk", _not_enough_disk, "plan", "$.stages", ("min_free_gb", "hot tier")),
    ("load-plan-refuse", _load_refused, "plan", "$.source.baseModel", ("cannot be loaded here", "fits nowhere")),
]
FIXES = {  # fix fragments for the rows where what to do is the point
    "hub-id-not-cached-offline": ("hf download acme/ghost-7b --revision v2", "huggingface-cli download",
                                  "unset HF_HUB_OFFLINE"),
    "pickle-only-weights": ("safetensors",),
    "corpus-sha256-mismatch": ("sha256:",),
    "not-enough-disk": ("storage.hot.min_free_gb",),
}


@pytest.mark.parametrize(("build", "level", "path", "fragments"), [row[1:] for row in BAD],
                         ids=[row[0] for row in BAD])
def test_bad_input(request: pytest.FixtureRequest, setup: Setup, build, level: str, path: str,
                   fragments: tuple[str, ...]) -> None:
    data = build(setup)
    if "source_revision" in data:  # the hub row pins a revision
        data["source"]["revision"] = data.pop("source_revision")
    plan = setup.plan(data)
    assert not plan.ok
    hits = [f for f in plan.findings if f.path == path]
    assert hits, plan.render_text()
    assert all(f.level == level for f in hits)
    message = " | ".join(f.message for f in hits)
    for fragment in fragments:
        assert fragment in message, plan.render_text()
    fixes = " | ".join(f.fix for f in hits)
    for fragment in FIXES.get(request.node.callspec.id, ()):
        assert fragment in fixes
    assert json.dumps(plan.to_json())  # findings stay JSON-safe


def test_planning_never_imports_torch(setup: Setup) -> None:
    """The daemon plans: a full plan of a real model must not import torch."""
    setup.model("qwen3_moe")
    file = setup.root / "part.alloy.json"
    file.write_text(json.dumps(alloy("models/qwen3_moe", "qwen3_moe")))
    script = (
        "import sys; from pathlib import Path\n"
        "from factory.load_plan import NodeMemory; from factory.nodeconfig import NodeConfig\n"
        "from factory.plan import make_plan\n"
        "plan = make_plan(Path(sys.argv[1]), root=Path(sys.argv[2]), offline=True, hf_cache_dir=Path(sys.argv[3]),\n"
        "                 config=NodeConfig.model_validate({'storage': {'hot': {'min_free_gb': 0}}}),\n"
        "                 node_memory=NodeMemory(2**36, None, False))\n"
        "print(plan.ok, plan.load_plan.strategy, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(file), str(setup.root), str(setup.cache)],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "cpu", "[]"]


# ── the intake gate's quick checks ──────────────────────────────────────────


def _gate(root: Path, base: str):
    from factory.intake import gate
    from factory.line import Line

    raw = json.dumps(alloy(base=base)).encode()
    return gate(raw, file_name="part.alloy.json", line=Line(root))


@pytest.fixture
def line_root(tmp_path: Path) -> Path:
    """A real root (factory init) with a cold tier, and a directory outside both."""
    from tests.linekit import make_root

    root = make_root((tmp_path / "root").resolve())
    cold = (tmp_path / "cold").resolve()
    (cold / "models" / "big").mkdir(parents=True)
    (tmp_path / "elsewhere" / "llama").mkdir(parents=True)
    with (root / "factory_node.toml").open("a") as f:
        f.write(f'\n[[storage.cold]]\npath = "{cold}"\n')
    return root


@pytest.mark.parametrize(("base", "reason"), [
    ("../../etc", "climbs out with '..'"),
    ("../elsewhere/llama", "climbs out with '..'"),
    ("/etc", "is absolute"),
    ("./models/../../elsewhere/llama", "climbs out with '..'"),
    ("models/link-out", "goes through a symlink"),
])
def test_gate_refuses_a_base_model_outside_root_and_cold_tiers(line_root: Path, base: str, reason: str) -> None:
    (line_root / "models").mkdir(exist_ok=True)
    (line_root / "models" / "link-out").symlink_to(line_root.parent / "elsewhere" / "llama")
    result = _gate(line_root, base)
    assert not result.ok
    [problem] = result.problems
    assert (problem["level"], problem["path"], problem["value"]) == ("plan", "$.source.baseModel", base)
    assert reason in problem["message"] and "outside" in problem["message"]
    assert str(line_root) in problem["fix"] and "cold tier" in problem["fix"]


@pytest.mark.parametrize("base", [
    "Qwen/Qwen3-8B",  # a Hub id, not a path: resolved when the part runs
    "models/not-copied-yet",  # inside the root; existence is the full plan's question
    "COLD",  # an absolute path inside the cold tier
])
def test_gate_accepts_base_models_inside_and_hub_ids(line_root: Path, base: str) -> None:
    cold = line_root.parent / "cold" / "models" / "big"
    result = _gate(line_root, str(cold) if base == "COLD" else base)
    assert result.ok, result.problems


def test_gate_location_check_reads_no_model_file(line_root: Path) -> None:
    """The gate decides from the path alone: a model dir whose config.json is
    a FIFO (reading it would block) passes at once."""
    model = line_root / "models" / "llama"
    model.mkdir(parents=True)
    os.mkfifo(model / "config.json")
    script = ("import sys, json; from pathlib import Path; from tests.test_plan import _gate\n"
              "print(_gate(Path(sys.argv[1]), 'models/llama').ok)\n")
    out = subprocess.run([sys.executable, "-c", script, str(line_root)], capture_output=True, text=True,
                         timeout=30, check=True, cwd=Path(__file__).parent.parent).stdout
    assert out.split() == ["True"]


# ── quantized formats ───────────────────────────────────────────────────────


needs_gguf = pytest.mark.skipif(__import__("factory.quant_support", fromlist=["x"]).gguf_problem() is not None,
                                reason="llama.cpp's converter is not installed")


@needs_gguf
def test_gguf_of_an_architecture_llama_cpp_lacks_is_refused_with_its_spelling(setup: Setup) -> None:
    setup.model("phimoe")
    plan = setup.plan(alloy("models/phimoe", "phimoe", [{"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M"]}]))
    [finding] = [f for f in plan.findings if f.path == "$.stages[0].format"]
    assert "'PhimoeForCausalLM'" in finding.message and "'PhiMoEForCausalLM', spelled differently" in finding.message


@needs_gguf
def test_stages_after_a_gguf_say_what_they_work_on(setup: Setup) -> None:
    setup.model("llama")
    stages = [{"type": "quant", "format": "gguf", "quantTypes": ["Q4_K_M"]},
              {"type": "eval", "benchmarks": [{"name": "perplexity", "subset": "calibration/code.jsonl"}]},
              {"type": "quant", "format": "gguf", "quantTypes": ["Q8_0"]},
              {"type": "package", "format": "gguf"}]
    setup.corpus()
    plan = setup.plan(alloy(stages=stages))
    assert plan.ok, plan.render_text()
    assert any(n.startswith("$.stages[1] (eval) measures the gguf artifact of $.stages[0]") for n in plan.notes)
    assert any(n.startswith("$.stages[2] (quant) works on the last safetensors model") for n in plan.notes)


def test_a_gguf_package_with_no_gguf_quant_is_refused(setup: Setup) -> None:
    setup.model("llama")
    plan = setup.plan(alloy(stages=[{"type": "package", "format": "gguf"}]))
    [finding] = [f for f in plan.findings if f.path == "$.stages[0].format"]
    assert "no earlier quant stage writes one" in finding.message
