"""Training data: resolved at plan time (factory.datasets), loaded and
formatted through the `datasets` library (stations.training_data), trained
on by a real train stage. Caches are real: built with the datasets library
in the layouts `load_dataset` and `huggingface-cli download` leave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import transformers

from factory.alloy import Alloy
from factory.datasets import (
    SIZE_DEFAULTS, DatasetProblem, ResolvedDataset, _snake, resolve_dataset, stage_datasets, size_defaults,
    training_dataset,
)
from factory.nodeconfig import NodeConfig, load_node_config
from stations.training_data import record_text, training_texts
from tests.stationkit import make_ctx, run_stages
from tests.tiny_models import TOKENIZER_VOCAB, add_tokenizer, build_tiny_model

CODEFEEDBACK = "m-a-p/CodeFeedback-Filtered-Instruction"
PAIRS = [{"query": f"Write f{i}.", "answer": f"def f{i}(x):\n    return x * {i}\n"} for i in range(6)]
REPO = Path(__file__).resolve().parent.parent


def _config(root: Path, tables: str) -> NodeConfig:
    path = root / "factory_node.toml"
    path.write_text((path.read_text() if path.exists() else "") + "\n" + tables)
    return load_node_config(path)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _stage(**fields):
    return Alloy.model_validate({"name": "t", "version": "1", "source": {"baseModel": "m", "architecture": "llama"},
                                 "stages": [fields]}).stages[0]


def _no_caches(tmp_path: Path) -> dict:
    return {"cache_dir": tmp_path / "datasets-cache", "hub_cache_dir": tmp_path / "hub-cache"}


# ── [datasets] mappings ─────────────────────────────────────────────────────


def test_a_mapped_jsonl_file_is_resolved_and_formatted(tmp_path):
    _jsonl(tmp_path / "data" / "cf.jsonl", PAIRS)
    cfg = _config(tmp_path, f'[datasets]\n"{CODEFEEDBACK}" = "data/cf.jsonl"\n')
    found = resolve_dataset(CODEFEEDBACK, None, root=tmp_path, config=cfg, offline=True, **_no_caches(tmp_path))
    assert isinstance(found, ResolvedDataset) and found.kind == "file"
    assert found.path == (tmp_path / "data" / "cf.jsonl").resolve() and "[datasets]" in found.note
    texts = list(training_texts(found, scratch_dir=tmp_path / "scratch"))
    assert texts[0] == "### Instruction:\nWrite f0.\n\n### Response:\ndef f0(x):\n    return x * 0\n"
    assert len(texts) == len(PAIRS)


def test_a_mapped_parquet_file_is_read_through_datasets(tmp_path):
    (tmp_path / "data").mkdir()
    rows = {"text": ["first document", "", "second document"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "data" / "wiki.parquet"))
    cfg = _config(tmp_path, '[datasets]\n"Salesforce/wikitext" = "data/wiki.parquet"\n')
    # The alias finds the mapping made for the canonical id.
    found = resolve_dataset("wikitext-2", None, root=tmp_path, config=cfg, offline=True, **_no_caches(tmp_path))
    assert found.kind == "file" and found.suffix == ".parquet"
    texts = list(training_texts(found, scratch_dir=tmp_path / "scratch"))
    assert texts == ["first document", "second document"]  # blank rows skipped


def test_a_mapping_whose_symlink_leaves_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret.jsonl"
    _jsonl(outside, PAIRS)
    (root / "data").mkdir(parents=True)
    (root / "data" / "cf.jsonl").symlink_to(outside)
    cfg = _config(root, f'[datasets]\n"{CODEFEEDBACK}" = "data/cf.jsonl"\n')
    found = resolve_dataset(CODEFEEDBACK, None, root=root, config=cfg, offline=True, **_no_caches(tmp_path))
    assert isinstance(found, DatasetProblem)
    assert "leaves the root" in found.problem and f'[datasets] "{CODEFEEDBACK}"' in found.problem


@pytest.mark.parametrize("table, says", [
    ('[datasets]\n"a/b" = "../x.jsonl"\n', "key datasets.a/b: Value error, must be a path relative to the "
                                          "factory root"),
    ('[datasets]\n"a/b" = "x.csv"\n', "must name a dataset file ending in .jsonl"),
    ('[datasets]\n"a b" = "x.jsonl"\n', 'must be a dataset id like "org/name"'),
    ('[domains]\nmath = "org/x"\n', "key domains.math: is not a key of this table; its keys: code, reasoning, general"),
    ('[domains]\ncode = 3\n', "key domains.code: Input should be a valid string"),
    ('[benchmarks]\nHumanEval = "data/he.jsonl.gz"\n', "must be a lowercase benchmark name"),
    ('[benchmarks]\nhumaneval_plus = "/etc/he.jsonl.gz"\n', "key benchmarks.humaneval_plus: Value error"),
])
def test_bad_data_tables_are_one_line_errors_naming_the_key(tmp_path, table, says):
    from factory.errors import NodeConfigError

    with pytest.raises(NodeConfigError) as info:
        _config(tmp_path, table)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_the_tables_parse_and_the_domains_have_sentinel_ais_defaults(tmp_path):
    cfg = _config(tmp_path, '[benchmarks]\nhumaneval_plus = "data/HumanEvalPlus.jsonl.gz"\n"humaneval+" = "d/h.gz"\n')
    assert cfg.benchmarks == {"humaneval_plus": "data/HumanEvalPlus.jsonl.gz", "humaneval+": "d/h.gz"}
    assert (cfg.domains.general, cfg.domains.code, cfg.domains.chat) == ("wikitext-2", CODEFEEDBACK, None)


# ── the Hugging Face caches, offline ────────────────────────────────────────


def _prepared_cache(cache: Path, repo_id: str, config: str, rows: dict) -> None:
    """A datasets cache as `load_dataset(repo_id, config)` leaves it
    (<ns>___<snake name>/<config>/0.0.0/<hash>/): prepared by the datasets
    library's own parquet builder, then moved to the repo's directory name,
    as copying a cache from a connected machine does."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = cache.parent / "src.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(src))
    name = _snake(repo_id.split("/")[1])
    Parquet(cache_dir=str(cache), dataset_name=name, config_name=config, config_id=config,
            data_files={"train": str(src)}, hash="0" * 16).download_and_prepare()
    shutil.move(str(cache / name), str(cache / "___".join([repo_id.split("/")[0], name])))


def test_the_datasets_cache_serves_a_dataset_offline(tmp_path):
    cache = tmp_path / "datasets-cache"
    _prepared_cache(cache, "org/TinyPairs", "default", {"query": ["q1", "q2"], "answer": ["a1", "a2"]})
    found = resolve_dataset("org/TinyPairs", None, root=tmp_path, config=NodeConfig(), offline=True,
                            cache_dir=cache, hub_cache_dir=tmp_path / "hub")
    assert found.kind == "hf-cache" and found.path == cache
    # Loaded in a fresh process with the environment switches a node sets:
    # the datasets library finds it in its cache without the Hub.
    code = ("import sys, json; from factory.datasets import resolve_dataset; from factory.nodeconfig import NodeConfig;"
            "from stations.training_data import training_texts; from pathlib import Path;"
            "f = resolve_dataset('org/TinyPairs', None, root=Path('.'), config=NodeConfig());"
            "print(json.dumps([f.kind, list(training_texts(f))]))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    kind, texts = json.loads(run.stdout.strip().splitlines()[-1])
    assert kind == "hf-cache"
    assert texts == ["### Instruction:\nq1\n\n### Response:\na1", "### Instruction:\nq2\n\n### Response:\na2"]


def _hub_snapshot(hub: Path) -> Path:
    """Salesforce/wikitext as `huggingface-cli download --repo-type dataset`
    leaves it: blobs, a snapshot of links into them, refs/main, the card."""
    repo = hub / "datasets--Salesforce--wikitext"
    commit = "c" * 40
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    files = {"wikitext-2-raw-v1/train-00000-of-00001.parquet": {"text": ["", " = Valkyria = \n", " It is .\n"]},
             "wikitext-2-raw-v1/test-00000-of-00001.parquet": {"text": ["test split only"]},
             "wikitext-103-raw-v1/train-00000-of-00001.parquet": {"text": ["the larger configuration"]}}
    for i, (rel, rows) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        datasets.Dataset.from_dict(rows).to_parquet(str(blob))
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    (snap / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-103-raw-v1\n  data_files:\n  - split: train\n"
        "    path: wikitext-103-raw-v1/train-*\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n  - split: test\n    path: wikitext-2-raw-v1/test-*\n"
        "---\n# WikiText\n")
    return snap


def test_a_hub_cache_snapshot_serves_the_wikitext_alias_offline(tmp_path):
    snap = _hub_snapshot(tmp_path / "hub")
    for name in ("wikitext-2", "Salesforce/wikitext"):
        found = resolve_dataset(name, None, root=tmp_path, config=NodeConfig(), offline=True,
                                cache_dir=tmp_path / "none", hub_cache_dir=tmp_path / "hub")
        assert (found.kind, found.id, found.config, found.path) == ("hub-snapshot", "Salesforce/wikitext",
                                                                    "wikitext-2-raw-v1", snap)
    texts = list(training_texts(found, scratch_dir=tmp_path / "scratch"))
    assert texts == [" = Valkyria = \n", " It is .\n"]  # its train split, blanks skipped
    # A snapshot whose card is missing serves the configuration from its subdirectory.
    (snap / "README.md").unlink()
    found = resolve_dataset("wikitext-2", None, root=tmp_path, config=NodeConfig(), offline=True,
                            cache_dir=tmp_path / "none", hub_cache_dir=tmp_path / "hub")
    assert found.data_dir == "wikitext-2-raw-v1"
    assert list(training_texts(found, scratch_dir=tmp_path / "scratch")) == [" = Valkyria = \n", " It is .\n"]
    shutil.rmtree(snap / "wikitext-2-raw-v1")
    gone = resolve_dataset("wikitext-2", None, root=tmp_path, config=NodeConfig(), offline=True,
                           cache_dir=tmp_path / "none", hub_cache_dir=tmp_path / "hub")
    assert isinstance(gone, DatasetProblem) and "without the configuration 'wikitext-2-raw-v1'" in gone.problem


def test_a_missing_dataset_is_refused_offline_with_the_command_that_provides_it(tmp_path):
    found = resolve_dataset(CODEFEEDBACK, None, root=tmp_path, config=NodeConfig(), offline=True,
                            **_no_caches(tmp_path))
    assert isinstance(found, DatasetProblem) and found.json_path == "$.dataset"
    assert "is not on this node" in found.problem and "HF_DATASETS_OFFLINE" in found.problem
    assert f"huggingface-cli download --repo-type dataset {CODEFEEDBACK}" in found.fix
    assert f'"{CODEFEEDBACK}" = "data/<file>.jsonl" under [datasets]' in found.fix
    online = resolve_dataset(CODEFEEDBACK, None, root=tmp_path, config=NodeConfig(), offline=False,
                             **_no_caches(tmp_path))
    assert online.kind == "hub" and "streams it from the Hub" in online.note


def test_the_environment_switches_make_the_resolution_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    found = resolve_dataset(CODEFEEDBACK, None, root=tmp_path, config=NodeConfig(), **_no_caches(tmp_path))
    assert isinstance(found, DatasetProblem)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_dataset(CODEFEEDBACK, None, root=tmp_path, config=NodeConfig(), **_no_caches(tmp_path)).kind == "hub"


def test_the_cache_directory_name_matches_the_datasets_library():
    from datasets.naming import camelcase_to_snakecase

    for name in ("CodeFeedback-Filtered-Instruction", "wikitext", "TinyPairs", "HTMLParser2Data", "gsm8k",
                 "MMLU-Pro", "ultrachat_200k", "ABCDef", "aB1C"):
        assert _snake(name) == camelcase_to_snakecase(name), name


# ── formatting ──────────────────────────────────────────────────────────────


def test_instruction_records_have_one_layout_without_a_chat_template():
    assert record_text({"query": "q", "answer": "a"}) == "### Instruction:\nq\n\n### Response:\na"
    assert record_text({"instruction": "do", "input": "x = 1", "output": "done"}) == \
        "### Instruction:\ndo\n\n### Input:\nx = 1\n\n### Response:\ndone"
    assert record_text({"instruction": "do", "input": " ", "output": "done"}) == \
        "### Instruction:\ndo\n\n### Response:\ndone"
    assert record_text({"prompt": "p", "completion": "c"}) == "### Instruction:\np\n\n### Response:\nc"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}]
    assert record_text({"messages": chat}) == "### System:\nbe brief\n\n### Instruction:\nhi\n\n### Response:\nyo"
    assert record_text({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) == \
        "### Instruction:\nhi\n\n### Response:\nyo"
    assert record_text({"text": "plain"}) == "plain" and record_text({"text": "  "}) == ""
    assert record_text({"label": 3}) is None


def test_a_tokenizer_with_a_chat_template_renders_the_pair_with_it(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(add_tokenizer(tmp_path))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    assert record_text({"query": "q", "answer": "a"}, tok) == "<user>q</user><assistant>a</assistant>"
    assert record_text({"instruction": "do", "input": "x", "output": "y"}, tok) == \
        "<user>do\n\nx</user><assistant>y</assistant>"


def test_a_record_of_no_known_shape_fails_with_its_columns(tmp_path):
    from factory.errors import StageFailed

    _jsonl(tmp_path / "data" / "bad.jsonl", [{"text": "ok"}, {"label": 1, "score": 2}])
    found = resolve_dataset("data/bad.jsonl", None, root=tmp_path, config=NodeConfig(), offline=True,
                            json_path="$.stages[0].dataset")
    with pytest.raises(StageFailed, match=r"\$\.stages\[0\]\.dataset = 'data/bad.jsonl': record 1 has columns "
                                          r"\['label', 'score'\] and no training text"):
        list(training_texts(found, scratch_dir=tmp_path / "scratch"))


# ── domains and stages ──────────────────────────────────────────────────────


def test_a_domain_only_stage_resolves_through_the_domains_table(tmp_path):
    _jsonl(tmp_path / "data" / "cf.jsonl", PAIRS)
    cfg = _config(tmp_path, f'[datasets]\n"{CODEFEEDBACK}" = "data/cf.jsonl"\n')
    kw = dict(root=tmp_path, config=cfg, offline=True, **_no_caches(tmp_path))
    found = training_dataset(_stage(type="train", domain="code"), 0, **kw)
    assert (found.kind, found.ref, found.domain) == ("file", CODEFEEDBACK, "code")
    chat = training_dataset(_stage(type="train", domain="chat"), 3, **kw)
    assert isinstance(chat, DatasetProblem) and chat.json_path == "$.stages[3].domain"
    assert "[domains] chat is unset" in chat.problem and '[domains] chat = "<dataset id>"' in chat.fix
    general = training_dataset(_stage(type="train", domain="general"), 0, **kw)
    assert isinstance(general, DatasetProblem) and "maps to 'wikitext-2' ([domains] general), and that dataset is not on this node" \
        in general.problem
    # A domain is never a dataset name; a teacher stage without data distils on general text.
    wrong = training_dataset(_stage(type="lora", domain="wikitext"), 0, **kw)
    assert isinstance(wrong, DatasetProblem) and "is not a training domain" in wrong.problem


def test_a_distilling_stage_without_data_uses_the_general_domain(tmp_path):
    _jsonl(tmp_path / "data" / "g.jsonl", [{"text": "general text"}])
    cfg = _config(tmp_path, '[domains]\ngeneral = "org/general"\n[datasets]\n"org/general" = "data/g.jsonl"\n')
    stage = _stage(type="lora", domain="distillation", teacher="source",
                   calibrationDataset="heldout_mix.jsonl (50 examples: code/math, hand-written)")
    found = training_dataset(stage, 2, root=tmp_path, config=cfg, offline=True, **_no_caches(tmp_path))
    assert (found.kind, found.domain) == ("file", "general") and "distils on the general domain" in found.note


def test_dataset_findings_name_the_path_the_value_and_the_fix(tmp_path):
    stages = [_stage(type="train", dataset="wikitext-2"), _stage(type="train", dataset="data/here.jsonl"),
              _stage(type="context-extend", targetLength=4096, method="yarn", trainingDataset="org/long"),
              _stage(type="train", dataset="free text, not data")]
    _jsonl(tmp_path / "data" / "here.jsonl", [{"text": "x"}])
    found = [[(p.json_path, p.value, p.problem, p.fix)
              for p in stage_datasets(s, i, root=tmp_path, config=NodeConfig(), offline=True, **_no_caches(tmp_path))
              if isinstance(p, DatasetProblem)]
             for i, s in enumerate(stages)]
    assert [f[0] for f in found[0]] == ["$.stages[0].dataset"] and found[0][0][1] == "wikitext-2"
    assert "huggingface-cli download --repo-type dataset Salesforce/wikitext" in found[0][0][3]
    assert found[1] == []
    assert [(f[0], f[1]) for f in found[2]] == [("$.stages[2].trainingDataset", "org/long")]
    assert "neither a file inside the root nor a dataset id" in found[3][0][2]


# ── defaults by size ────────────────────────────────────────────────────────


def test_size_defaults_fall_monotonically_with_size():
    sizes = [0.5, 4.9, 5.0, 7.0, 14.9, 27.0, 35.0, 70.0, 400.0]
    rows = [size_defaults(b) for b in sizes]
    assert all(a.steps >= b.steps and a.learning_rate >= b.learning_rate for a, b in zip(rows, rows[1:]))
    assert (rows[0].steps, rows[0].learning_rate) == (SIZE_DEFAULTS[0].steps, SIZE_DEFAULTS[0].learning_rate)
    assert rows[0].steps > rows[-1].steps and rows[0].learning_rate > rows[-1].learning_rate


def test_omitted_steps_and_rate_come_from_the_checkpoint_size(root):
    from stations.lora import read_params

    model = add_tokenizer(build_tiny_model("llama", root / "models" / "m", vocab_size=TOKENIZER_VOCAB))
    alloy = {"name": "t", "version": "1", "source": {"baseModel": "models/m", "architecture": "llama"},
             "stages": [{"type": "train", "domain": "code"}]}
    params = read_params(make_ctx(root, alloy, 0), "lora", model)
    tiny = size_defaults(0.0)
    assert (params.steps, params.learning_rate, params.size_source) == (tiny.steps, tiny.learning_rate, "checkpoint")
    alloy["source"]["totalParamsB"] = 70.0
    params = read_params(make_ctx(root, alloy, 0), "lora", model)
    assert (params.steps, params.learning_rate, params.size_source) == (100, 2e-5, "source.totalParamsB")


# ── end to end ──────────────────────────────────────────────────────────────


def test_a_domain_only_train_stage_trains_on_a_mapped_jsonl(root):
    """A published recipe's train stage (domain "code", no dataset, no
    learning rate) on a node whose [datasets] maps CodeFeedback to a local
    file: it trains on the formatted pairs and reports what it resolved."""
    build_tiny_model("qwen2", root / "models" / "m", vocab_size=TOKENIZER_VOCAB)
    add_tokenizer(root / "models" / "m")
    _jsonl(root / "data" / "codefeedback.jsonl", PAIRS * 4)
    _config(root, f'[datasets]\n"{CODEFEEDBACK}" = "data/codefeedback.jsonl"\n')
    alloy = {"name": "t", "version": "1",
             "source": {"baseModel": "models/m", "architecture": "qwen2", "totalParamsB": 7.6},
             "stages": [{"type": "train", "domain": "code", "steps": 3, "sequenceLength": 64}]}
    entries, _ = run_stages(root, alloy)
    metrics = entries[0]["metrics"]
    assert metrics["dataset"]["kind"] == "file" and metrics["dataset"]["domain"] == "code"
    assert metrics["dataset"]["path"] == str((root / "data" / "codefeedback.jsonl").resolve())
    assert metrics["examples"] == 3 * 4  # steps x batch size: read no further
    assert metrics["resolved"]["dataset"] == CODEFEEDBACK
    assert metrics["resolved"]["learningRate"] == "5e-05" and metrics["learningRate"] == 5e-5  # 7.6B: 5..15B row
    assert "steps" not in metrics["resolved"] and "sequenceLength" not in metrics["resolved"]
    assert metrics["resolved"]["batchSize"] == 4 and metrics["lora_targets_dropped"] == 0
    out = root / "work" / "part" / metrics["model_dir"]
    assert any((out.parent / "datasets-scratch").iterdir())  # the library's lock files stay in the work dir
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen2"
