"""docs/RESULTS.md's calibration table against its raw runs, and the bench's dry run.

Fast: no model runs. The table must be what the committed JSON says (every
cell recomputed from the per-run numbers), the JSON must be about the shipped
tiny MoE, the script's seeded inputs must reproduce the recorded ones, and
`bench/calibration_table.py --dry-run` must build and validate every alloy.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from factory.integrity import hash_model_dir, model_hash

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "RESULTS.md"
RAW = REPO / "docs" / "results" / "calibration_table.json"
SCRIPT = REPO / "bench" / "calibration_table.py"
BEGIN, END = "<!-- calibration-table:begin -->", "<!-- calibration-table:end -->"
NUMBER = r"(\d+(?:\.\d+)?)"


@pytest.fixture(scope="module")
def data() -> dict:
    return json.loads(RAW.read_text())


@pytest.fixture(scope="module")
def rows() -> list[list[str]]:
    """The calibration table's body rows, cells stripped (header and rule dropped)."""
    text = RESULTS.read_text(encoding="utf-8")
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| keep | method |"), lines[0]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("calibration_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse_cell(text: str) -> tuple[float, float | None]:
    m = re.fullmatch(NUMBER + r"(?: ± " + NUMBER + ")?", text)
    assert m, f"cell {text!r} is not 'mean' or 'mean ± std'"
    return float(m[1]), None if m[2] is None else float(m[2])


def _recompute(runs: list[dict], domain: str) -> dict:
    values = [r[domain]["forged"] for r in runs]
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def test_every_cell_recomputes_from_the_raw_runs(data, rows):
    labels = {m["id"]: m["label"] for m in data["methods"]}
    experts = data["source"]["experts"]
    body = rows[1:]  # rows[0] is the unpruned source
    assert len(body) == len(data["cells"]) == len(data["settings"]["keeps"]) * len(data["methods"])
    for row, cell in zip(body, data["cells"]):
        keep, label, _calibration, n, code, prose, code_range, prose_range = row
        assert keep == f"{cell['keep']}/{experts}" and label == labels[cell["method"]]
        runs = [r for r in data["runs"] if r["keep"] == cell["keep"] and r["method"] == cell["method"]]
        for domain, shown, shown_range in (("code", code, code_range), ("prose", prose, prose_range)):
            want = _recompute(runs, domain)
            mean, std = _parse_cell(shown)
            assert int(n) == want["n"] == cell[domain]["n"]
            assert mean == pytest.approx(want["mean"], abs=0.051), (cell["method"], cell["keep"], domain)
            assert cell[domain]["mean"] == pytest.approx(want["mean"], rel=1e-12)
            if want["std"] is None:
                assert std is None
            else:
                assert std == pytest.approx(want["std"], abs=0.051)
            lo, hi = (float(x) for x in shown_range.split("–"))
            assert (lo, hi) == (pytest.approx(want["min"], abs=0.051), pytest.approx(want["max"], abs=0.051))


def test_seeded_methods_ran_every_seed_and_router_l2_once(data):
    seeds = data["settings"]["seeds"]
    assert len(seeds) >= 3 and len(data["settings"]["keeps"]) >= 2
    for m in data["methods"]:
        for keep in data["settings"]["keeps"]:
            runs = [r for r in data["runs"] if r["keep"] == keep and r["method"] == m["id"]]
            assert sorted(r["seed"] for r in runs if r["seed"] is not None) == (sorted(seeds) if m["seeded"] else [])
            assert len(runs) == (len(seeds) if m["seeded"] else 1)


def test_all_runs_share_the_source_and_the_eval_tokens(data, rows):
    for domain in ("code", "prose"):
        assert len({(r[domain]["source"], r[domain]["tokens"], r[domain]["corpus_sha256"])
                    for r in data["runs"]}) == 1
        assert 0 < data["runs"][0][domain]["tokens"] <= data["settings"]["evalTokens"]
    source = rows[0]
    assert source[1] == "source (unpruned)"
    assert float(source[4]) == pytest.approx(data["source"]["code_ppl"], abs=0.051)
    assert float(source[5]) == pytest.approx(data["source"]["prose_ppl"], abs=0.051)


def test_the_table_is_about_the_shipped_tiny_moe(data):
    shipped = model_hash(hash_model_dir(REPO / "examples" / "tiny-moe"))
    assert data["source"]["modelHash"] == shipped
    assert shipped in RESULTS.read_text(encoding="utf-8")


def test_the_runs_kept_what_their_alloys_said(data):
    for r in data["runs"]:
        assert all(len(v) == r["keep"] for v in r["kept"].values())
        if r["method"] == "random":
            assert r["kept"] == r["keepExpertIndices"]
        if r["calibration"] is not None:
            assert r["calibration"]["profiled_sha256"] == r["calibration"]["sha256"]


def test_the_script_reproduces_the_recorded_seeded_inputs(data, bench):
    """Subsets and random draws are functions of the seed: the script today
    makes the same bytes and indices the recorded runs used."""
    planned = {run.part: run for run in bench.plan_runs(tuple(data["settings"]["keeps"]),
                                                        tuple(data["settings"]["seeds"]))}
    assert set(planned) == {r["part"] for r in data["runs"]}
    for r in data["runs"]:
        run = planned[r["part"]]
        assert run.indices == r["keepExpertIndices"]
        if r["calibration"] is not None:
            assert (run.subset.sha256, list(run.subset.docs)) == (r["calibration"]["sha256"], r["calibration"]["docs"])


def test_dry_run_builds_and_validates_every_alloy():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^(\d+) alloys, \1 valid$", proc.stdout, re.MULTILINE), proc.stdout


def test_dry_run_fails_on_an_invalid_alloy():
    """keep 1 is below the router's top-2: validation must refuse it."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--keeps", "1", "--seeds", "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "below the router's top-k of 2" in proc.stdout


# ── the dense recipe's section ──────────────────────────────────────────────

DENSE = REPO / "examples" / "tiny-dense"


def test_dense_recipe_validates():
    from factory.validation import check_file

    report = check_file(REPO / "examples" / "dense.alloy.json")
    assert report.ok, [str(f) for f in report.findings]


def test_dense_section_is_about_the_shipped_tiny_dense():
    shipped = model_hash(hash_model_dir(DENSE))
    assert f"modelHash: `{shipped}`" in (DENSE / "TRAINING.md").read_text(encoding="utf-8")
    dense_section = RESULTS.read_text(encoding="utf-8").split(END, 1)[1]
    assert shipped in dense_section


def test_tiny_dense_shares_the_tiny_moe_tokenizer():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (DENSE / name).read_bytes() == (REPO / "examples" / "tiny-moe" / name).read_bytes()
