"""factory.model_files: header-only reads, measured bytes, sanity and geometry,
refusal of files that are not what they claim, and the shared model verdict."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters import get_family
from factory.model_files import (
    MAX_JSON_BYTES,
    MAX_PARAMS,
    CheckpointError,
    check_config_sanity,
    check_geometry,
    check_model_dir,
    estimate_params_from_config,
    inspect_checkpoint,
    read_config,
    read_safetensors_header,
)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# -- reading ---------------------------------------------------------------
def test_headers_match_safetensors_and_bytes_are_measured(tiny_model) -> None:
    model_dir = tiny_model("llama")
    info = inspect_checkpoint(model_dir)
    with safe_open(model_dir / "model.safetensors", framework="np") as f:
        assert set(info.tensors) == set(f.keys())
        for name in f.keys():
            assert list(info.tensors[name].shape) == f.get_slice(name).get_shape()
    file_size = (model_dir / "model.safetensors").stat().st_size
    header_len = struct.unpack("<Q", (model_dir / "model.safetensors").read_bytes()[:8])[0]
    assert info.total_bytes == file_size - 8 - header_len
    assert info.total_bytes == 4 * info.param_count  # float32
    assert info.bytes_at_16bit == 2 * info.param_count
    assert info.bytes_by_dtype == {"F32": info.total_bytes}
    assert info.model_type == "llama" and info.files == ("model.safetensors",)
    assert info.index is None and not info.has_pickle_weights


def test_bf16_checkpoint_bytes(tiny_model) -> None:
    info = inspect_checkpoint(tiny_model("qwen3", save_dtype="bfloat16"))
    assert {t.dtype for t in info.tensors.values()} == {"BF16"}
    assert info.total_bytes == info.bytes_at_16bit


def test_sharded_checkpoint_reads_index(tiny_model) -> None:
    whole = inspect_checkpoint(tiny_model("qwen3_moe"))
    sharded = inspect_checkpoint(tiny_model("qwen3_moe", max_shard_size="20KB"))
    assert len(sharded.files) > 1 and sharded.index is not None
    assert {n: (t.shape, t.nbytes) for n, t in sharded.tensors.items()} == \
           {n: (t.shape, t.nbytes) for n, t in whole.tensors.items()}
    assert sharded.total_bytes == whole.total_bytes
    assert check_geometry(sharded, get_family("qwen3_moe")) == []


def test_missing_shard_is_named(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("qwen3_moe", max_shard_size="20KB"), tmp_path)
    victim = sorted(model_dir.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json but missing") as err:
        inspect_checkpoint(model_dir)
    assert err.value.path == victim


def test_truncated_file_is_detected(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(model_dir)


def test_impossible_header_length(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_safetensors_header(path)


def test_header_bytes_disagreeing_with_shape(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(CheckpointError, match="should take 64 bytes"):
        read_safetensors_header(path)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json: missing"):
        inspect_checkpoint(tmp_path)


def test_pickle_weights_are_flagged(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    (model_dir / "pytorch_model.bin").write_bytes(b"not really")
    assert inspect_checkpoint(model_dir).has_pickle_weights


def test_model_files_never_imports_torch(tiny_model) -> None:
    code = (f"import sys; from factory.model_files import inspect_checkpoint, check_geometry; "
            f"from adapters import get_family; i = inspect_checkpoint({str(tiny_model('olmoe'))!r}); "
            f"assert check_geometry(i, get_family('olmoe')) == []; "
            f"assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- config estimates and sanity ------------------------------------------
REAL_CONFIGS = [
    # (family, config, published total parameters)
    ("qwen3_moe", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                       head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                       num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False), 30.5e9),
    ("olmoe", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                   intermediate_size=1024, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                   tie_word_embeddings=False), 6.92e9),
    ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False), 7.61e9),
    ("deepseek_v3", dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                         q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                         v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
                         n_shared_experts=1, first_k_dense_replace=3, num_experts_per_tok=8, n_group=8,
                         topk_group=4, vocab_size=129280, tie_word_embeddings=False), 671e9),
]


@pytest.mark.parametrize(("family", "config", "published"), REAL_CONFIGS, ids=[c[0] for c in REAL_CONFIGS])
def test_estimate_matches_published_sizes(family: str, config: dict, published: float) -> None:
    assert estimate_params_from_config(config, get_family(family)) == pytest.approx(published, rel=0.02)
    assert check_config_sanity(config, get_family(family)) == []


def test_estimate_matches_tiny_checkpoints(tiny_model) -> None:
    from adapters import families

    for family in families():
        info = inspect_checkpoint(tiny_model(family.name))
        text_params = sum(t.numel for n, t in info.tensors.items() if not family.tower_of(n))
        assert estimate_params_from_config(info.config, family) == pytest.approx(text_params, rel=0.05), family.name


BASE = REAL_CONFIGS[0][1]


@pytest.mark.parametrize(("change", "message"), [
    (dict(hidden_size=10**7), "hidden_size=10,000,000 is absurd"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(num_hidden_layers=-2), "num_hidden_layers must be a positive integer"),
    (dict(vocab_size="151936"), "vocab_size must be a positive integer, got '151936'"),
    (dict(num_attention_heads=True), "num_attention_heads must be a positive integer, got True"),
    (dict(num_experts=None, num_local_experts=None), "num_experts/num_local_experts must be a positive integer"),
    (dict(num_experts_per_tok=129), "top-k 129 exceeds the expert count 128"),
    (dict(num_key_value_heads=5), "not a multiple of num_key_value_heads=5"),
    (dict(num_experts=100_000, hidden_size=8192), "B parameters, over the 2,000B limit"),
])
def test_absurd_or_broken_configs(change: dict, message: str) -> None:
    problems = check_config_sanity({**BASE, **change}, get_family("qwen3_moe"))
    assert any(message in p for p in problems), problems


def test_param_limit_is_2e12() -> None:
    assert MAX_PARAMS == 2 * 10**12


# -- geometry against tensors ------------------------------------------------
@pytest.mark.parametrize(("family", "change", "message"), [
    ("llama", dict(num_attention_heads=2, num_key_value_heads=1), "self_attn.q_proj.weight is [32, 32], config geometry implies [16, *]"),
    ("llama", dict(vocab_size=256), "config says vocab_size x hidden_size = [256, 32]"),
    ("llama", dict(num_hidden_layers=3), "layers [2] are not on disk"),
    ("llama", dict(num_hidden_layers=1), "layers [1] are on disk"),
    ("llama", dict(tie_word_embeddings=False, hidden_size=48), "embedding"),
    ("olmoe", dict(num_experts=5), "has 4 experts on disk"),
    ("olmoe", dict(num_experts=3, num_experts_per_tok=2), "router tensor model.layers.0.mlp.gate.weight has 4 rows"),
    ("granitemoe", dict(num_local_experts=8), "has 4 experts on disk"),
    ("deepseek_v3", dict(first_k_dense_replace=0), "layer 0 has 0 experts on disk"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), "layer 1 has expert tensors on disk but the config makes it dense"),
    ("mixtral", dict(intermediate_size=48), "expected hidden_size=32 and expert width 48"),
])
def test_geometry_flags_mismatches(tiny_model, tmp_path: Path, family: str, change: dict, message: str) -> None:
    model_dir = _copy(tiny_model(family), tmp_path)
    _edit_config(model_dir, **change)
    problems = check_geometry(inspect_checkpoint(model_dir), get_family(family))
    assert any(message in p for p in problems), problems


def test_geometry_reports_once_per_kind(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("llama", num_hidden_layers=4), tmp_path)
    _edit_config(model_dir, head_dim=4)
    problems = check_geometry(inspect_checkpoint(model_dir), get_family("llama"))
    q = [p for p in problems if "q_proj" in p]
    assert len(q) == 1 and q[0].endswith("(and 3 more like it)")


def test_missing_expert_is_a_gap(tiny_model, tmp_path: Path) -> None:
    """An expert deleted from the middle (a botched prune) is caught."""
    from safetensors.numpy import load_file, save_file

    model_dir = _copy(tiny_model("qwen3_moe"), tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    for name in [n for n in tensors if ".mlp.experts.1." in n and "layers.0." in n]:
        del tensors[name]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    problems = check_geometry(inspect_checkpoint(model_dir), get_family("qwen3_moe"))
    assert any("layer 0 experts on disk are not 0..N-1: [0, 2, 3]" in p for p in problems), problems


# -- files that are not what they claim: refused before they are opened -------
@pytest.fixture
def hang_guard():
    """Turn a blocked open() (a FIFO read with no writer) into a test failure
    after 30 s instead of a suite that never ends."""
    def on_alarm(signum, frame):
        raise TimeoutError("blocked: a checkpoint file was opened that should have been refused")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _make_special(path: Path, kind: str, tmp_path: Path) -> None:
    """Put a FIFO, a directory, a socket or an escaping symlink at `path`."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:  # a symlink to a real shard outside the model directory
        outside = tmp_path / "elsewhere.safetensors"
        outside.write_bytes(b"\0" * 16)
        path.symlink_to(outside)


SPECIAL = [("fifo", "is a FIFO (named pipe), not a regular file"), ("directory", "is a directory, not a regular file"),
           ("socket", "is a socket, not a regular file"), ("symlink-out", "outside the model directory")]


@pytest.mark.parametrize(("kind", "message"), SPECIAL, ids=[k for k, _ in SPECIAL])
def test_shard_that_is_not_a_regular_file_is_refused(tiny_model, tmp_path: Path, hang_guard, kind: str,
                                                       message: str) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    shard = model_dir / "model.safetensors"
    _make_special(shard, kind, tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        inspect_checkpoint(model_dir)
    assert err.value.path == shard
    check = check_model_dir(model_dir)
    assert not check.ok and check.info is None and message in str(check.problems[0])


def test_indexed_shard_as_fifo_is_refused(tiny_model, tmp_path: Path, hang_guard) -> None:
    model_dir = _copy(tiny_model("qwen3_moe", max_shard_size="20KB"), tmp_path)
    victim = sorted(model_dir.glob("*.safetensors"))[1]
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(CheckpointError, match="is a FIFO") as err:
        inspect_checkpoint(model_dir)
    assert err.value.path == victim


def test_config_and_index_that_are_fifos_are_refused(tiny_model, tmp_path: Path, hang_guard) -> None:
    model_dir = _copy(tiny_model("qwen3_moe", max_shard_size="20KB"), tmp_path)
    index = model_dir / "model.safetensors.index.json"
    saved = index.read_bytes()
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: is a FIFO"):
        inspect_checkpoint(model_dir)
    index.unlink()
    index.write_bytes(saved)
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json: is a FIFO"):
        inspect_checkpoint(model_dir)
    assert check_model_dir(model_dir).problems[0].step == "config"


def test_symlinks_inside_the_model_dir_are_followed(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    (model_dir / "model.safetensors").rename(model_dir / "weights.bin.real")
    (model_dir / "model.safetensors").symlink_to("weights.bin.real")
    assert check_model_dir(model_dir).ok


def test_index_naming_a_file_outside_the_dir_is_refused(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("qwen3_moe", max_shard_size="20KB"), tmp_path)
    index = model_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../../etc/model.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"weight_map\[.*\] = '../../etc/model.safetensors' is not a shard"):
        inspect_checkpoint(model_dir)


def test_header_length_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    """A length prefix of 2**63 (or anything over 100 MB) is refused from the
    prefix alone, even where the file is large enough (a sparse 200 MB file)."""
    path = tmp_path / "claims.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="over the safetensors limit of 104857600 bytes"):
        read_safetensors_header(path)
    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:
        f.write(struct.pack("<Q", 150 * 2**20))
        f.truncate(200 * 2**20)
    with pytest.raises(CheckpointError, match="over the safetensors limit"):
        read_safetensors_header(big)


def test_oversized_config_is_not_read(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    with (model_dir / "config.json").open("r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no 64 MiB written
    with pytest.raises(CheckpointError, match="config.json: is over 64 MiB"):
        read_config(model_dir)


def test_special_file_beside_the_weights_is_refused(tiny_model, tmp_path: Path, hang_guard) -> None:
    """transformers opens tokenizer files by name: a FIFO there would block a part."""
    model_dir = _copy(tiny_model("llama"), tmp_path)
    os.mkfifo(model_dir / "tokenizer.json")
    check = check_model_dir(model_dir)
    assert [p.step for p in check.problems] == ["files"]
    assert "tokenizer.json: is a FIFO (named pipe)" in str(check.problems[0])


def test_plan_refuses_a_fifo_shard_without_hanging(tiny_model, tmp_path: Path) -> None:
    """`factory plan` in its own process: exit 2 with the file and what it is,
    well inside the timeout (a blocked open would run into it)."""
    from tests.linekit import make_root, write_alloy

    root = make_root(tmp_path / "root")
    model_dir = Path(shutil.copytree(tiny_model("llama"), root / "models" / "llama"))
    (model_dir / "model.safetensors").unlink()
    os.mkfifo(model_dir / "model.safetensors")
    alloy = write_alloy(root / "fifo.alloy.json", {
        "name": "fifo", "version": "1.0.0", "source": {"baseModel": "models/llama", "architecture": "llama"},
        "stages": [{"type": "selftest", "seconds": 0}]})
    proc = subprocess.run([sys.executable, "-m", "factory.cli", "plan", str(alloy), "--root", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{model_dir / 'model.safetensors'}: is a FIFO (named pipe)" in proc.stdout, proc.stdout


# -- the verdict shared by plan and loader -------------------------------------
def test_check_model_dir_refuses_more_layers_than_on_disk(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("qwen3_moe"), tmp_path)
    _edit_config(model_dir, num_hidden_layers=4)
    check = check_model_dir(model_dir)
    assert check.problems[0].step == "geometry" and check.config_sane and check.info is not None
    assert "config num_hidden_layers=4 but layers [2, 3] are not on disk" in check.problems[0].problem
    assert "random weights" in check.problems[0].fix


@pytest.mark.parametrize(("edit", "step"), [
    (lambda d: _edit_config(d, hidden_size=10**7), "sanity"),
    (lambda d: _edit_config(d, model_type="gpt-neo-x", architectures=None), "family"),
    (lambda d: (d / "model.safetensors").unlink(), "weights"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 7), "checkpoint"),
])
def test_check_model_dir_stops_at_the_first_failing_step(tiny_model, tmp_path: Path, edit, step: str) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    edit(model_dir)
    check = check_model_dir(model_dir)
    assert {p.step for p in check.problems} == {step}
    assert check.info is None


def test_pickle_only_weights_pass_only_when_allowed(tiny_model, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model("llama"), tmp_path)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not really")
    refused = check_model_dir(model_dir)
    assert refused.problems[0].step == "weights" and "allow_pickle_weights" in refused.problems[0].fix
    assert check_model_dir(model_dir, allow_pickle=True).ok


def test_prequantised_checkpoint_checks_layers_only(tiny_model, tmp_path: Path) -> None:
    """bitsandbytes saves packed uint8 weights whose shapes are not the
    config's; the layer count is still checked."""
    model_dir = _copy(tiny_model("llama"), tmp_path)
    _edit_config(model_dir, num_attention_heads=2, num_key_value_heads=1,
                 quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert check_model_dir(model_dir).ok
    _edit_config(model_dir, num_hidden_layers=3)
    assert "layers [2] are not on disk" in str(check_model_dir(model_dir).problems[0])


def _hostile_header(path: Path, header: dict, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]},
    {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [2, "x" * 3000], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
])
def test_hostile_header_types_are_a_clean_refusal_with_an_excerpt(tmp_path: Path, entry) -> None:
    from factory.model_files import read_safetensors_header

    path = _hostile_header(tmp_path / "model.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match="malformed") as info:
        read_safetensors_header(path)
    assert len(str(info.value)) < 600


def test_a_deeply_nested_header_is_not_json_not_a_crash(tmp_path: Path) -> None:
    from factory.model_files import read_safetensors_header

    raw = b"[" * 200000
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="not JSON"):
        read_safetensors_header(path)
