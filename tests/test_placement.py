"""Placement and needs: which parts fit beside which, and what a part needs.

Pure decisions (factory.placement) and the need computed from a real
checkpoint's headers (factory.resources). GPUs are declared, not present:
no GPU exists here, and placement only counts them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from factory.alloy import Alloy
from factory.load_plan import GIB
from factory.nodeconfig import NodeConfig
from factory.placement import HeadReservation, Held, fit
from factory.resources import (
    CPU_WEIGHT_COPIES, PART_BASE_RAM_BYTES, Gpu, Need, NodeResources, capacity_problem, node_resources,
    parse_nvidia_smi, part_need, selftest_need, thread_env, whole_node_need,
)


def node(*, slots: int = 4, ram_gib: float = 64, gpus: tuple[float, ...] = (), parallel: int = 4) -> NodeResources:
    return NodeResources(cores=8, cpu_slots=slots, ram_bytes=int(ram_gib * GIB),
                         gpus=tuple(Gpu(i, int(g * GIB)) for i, g in enumerate(gpus)), max_parallel_parts=parallel,
                         basis={"ram": "resources.ram_gb", "gpus": "resources.gpus", "cpu_slots": "resources.cpu_slots"})


def need(*, ram_gib: float = 1, gpus: int = 0, disk_gib: float = 0, slots: int = 1) -> Need:
    return Need(cpu_slots=slots, ram_bytes=int(ram_gib * GIB), gpus=gpus, vram_bytes=0,
                disk_bytes=int(disk_gib * GIB), whole_node=False, basis="test")


def held(base: str, n: Need, gpus: tuple[int, ...] = ()) -> Held:
    return Held(base, n, gpus)


def test_alone_a_part_always_fits_and_gets_the_lowest_free_gpus():
    assert fit(need(ram_gib=60, gpus=2), node(gpus=(80, 80, 80)), [], disk_free=0) == (0, 1)
    assert fit(need(), node(), [], disk_free=None) == ()


def test_slots_ram_gpus_and_the_parallel_cap_each_bound_what_starts_beside_others():
    n4 = node(slots=2, ram_gib=10, gpus=(80, 80), parallel=3)
    one = [held("a", need(ram_gib=4, gpus=1), (0,))]
    assert fit(need(ram_gib=4, gpus=1), n4, one, disk_free=None) == (1,)
    assert fit(need(ram_gib=7), n4, one, disk_free=None) is None  # RAM: 4 + 7 > 10
    assert fit(need(gpus=2), n4, one, disk_free=None) is None  # only GPU 1 is free
    two = one + [held("b", need(ram_gib=1), ())]
    assert fit(need(ram_gib=1), n4, two, disk_free=None) is None  # both CPU slots taken
    wide = node(slots=8, parallel=2)
    assert fit(need(), wide, [held("a", need()), held("b", need())], disk_free=None) is None  # the cap


def test_disk_counts_only_beside_other_parts():
    n = node()
    assert fit(need(disk_gib=50), n, [], disk_free=10 * GIB) == ()  # alone: as today, ENOSPC waits for room
    assert fit(need(disk_gib=5), n, [held("a", need(disk_gib=6))], disk_free=10 * GIB) is None
    assert fit(need(disk_gib=4), n, [held("a", need(disk_gib=6))], disk_free=10 * GIB) == ()


def test_a_whole_node_part_runs_alone_with_every_gpu():
    n = node(gpus=(24, 24))
    whole = whole_node_need("unknown size")
    assert fit(whole, n, [], disk_free=None) == (0, 1)
    assert fit(whole, n, [held("a", need())], disk_free=None) is None
    assert fit(need(), n, [held("w", whole, (0, 1))], disk_free=None) is None


def test_the_head_of_the_queue_is_overtaken_at_most_max_overtakes_times():
    """The starvation bound: with small parts always fitting and the big
    head never fitting, only `max_overtakes` small parts start ahead of it."""
    res = HeadReservation(max_overtakes=2)
    started = []
    for scan in range(10):
        res.begin_scan()
        res.blocked("big")  # the head does not fit
        for small in (f"s{scan}a", f"s{scan}b"):
            if res.may_start(small):
                started.append(small)
        res.end_scan()
    assert started == ["s0a", "s0b"]
    res.begin_scan()
    assert res.may_start("big")  # room at last: the head starts, the count resets
    res.end_scan()
    res.begin_scan()
    res.blocked("next-big")
    assert res.may_start("s-after")
    res.end_scan()


def test_parts_ahead_of_the_head_and_a_new_head_are_not_held_back():
    res = HeadReservation(max_overtakes=0)
    res.begin_scan()
    assert res.may_start("earlier")  # ahead of the head in claim order: no head yet
    res.blocked("big")
    assert not res.may_start("later")
    res.end_scan()
    res.begin_scan()  # "big" was cancelled: the next part that does not fit is the head
    res.blocked("other")
    assert res.head == "other" and res.overtakes == 0
    res.end_scan()
    res.begin_scan()  # nothing waits any more
    assert res.may_start("x")
    res.end_scan()
    assert res.head is None


def test_nvidia_smi_lines_are_parsed_and_odd_ones_skipped():
    text = "0, 81559\n1, 81559\n[N/A], x\n\n"
    assert parse_nvidia_smi(text) == (Gpu(0, 81559 * 2**20), Gpu(1, 81559 * 2**20))


def test_node_resources_take_the_config_over_measurement():
    cfg = NodeConfig.model_validate({"resources": {"gpus": [80, 40], "ram_gb": 100, "cpu_slots": 3},
                                     "daemon": {"max_parallel_parts": 2}})
    res = node_resources(cfg)
    assert [g.memory_bytes for g in res.gpus] == [80 * GIB, 40 * GIB]
    assert (res.ram_bytes, res.cpu_slots, res.max_parallel_parts) == (100 * GIB, 3, 2)
    assert res.basis == {"cpu_slots": "resources.cpu_slots", "ram": "resources.ram_gb", "gpus": "resources.gpus"}
    plain = node_resources(NodeConfig.model_validate({"forge": {"part_memory_gb": 7}}))
    assert (plain.ram_bytes, plain.cpu_slots, plain.basis["ram"]) == (7 * GIB, 1, "forge.part_memory_gb")


def test_threads_are_split_only_when_slots_share_the_cores():
    assert thread_env(need(), node(slots=1)) == {}
    assert thread_env(need(), node(slots=4)) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def sparse_checkpoint(directory: Path, *, rows: int, cols: int = 1024) -> Path:
    """A llama checkpoint whose one tensor is a sparse file: real headers,
    real sizes, no bytes on disk."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    n = rows * cols * 2
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [rows, cols],
                                                       "data_offsets": [0, n]}}).encode()
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.truncate(8 + len(header) + n)
    return directory


def alloy(base_model: str, *stages: dict, architecture: str = "llama") -> Alloy:
    return Alloy.model_validate({"name": "t", "version": "1.0.0",
                                 "source": {"baseModel": base_model, "architecture": architecture},
                                 "stages": list(stages) or [{"type": "selftest"}]})


def test_a_need_comes_from_the_checkpoint_headers(tmp_path):
    sparse_checkpoint(tmp_path / "models" / "m", rows=512 * 1024)  # 1 GiB at 16 bit
    cfg = NodeConfig()
    cpu = part_need(alloy("models/m"), root=tmp_path, config=cfg, node=node())
    assert (cpu.gpus, cpu.whole_node) == (0, False)
    assert cpu.ram_bytes == PART_BASE_RAM_BYTES + CPU_WEIGHT_COPIES * GIB
    gpu = part_need(alloy("models/m"), root=tmp_path, config=cfg, node=node(gpus=(24, 24)))
    assert gpu.gpus == 1 and GIB < gpu.vram_bytes < 4 * GIB and gpu.ram_bytes <= cpu.ram_bytes
    # 1 GiB does not fit one 2.5 GiB card's usable share (0.85 GiB): two of them
    assert part_need(alloy("models/m"), root=tmp_path, config=cfg, node=node(gpus=(2.5, 2.5, 2.5))).gpus == 2
    assert part_need(alloy("selftest", architecture="selftest"), root=tmp_path, config=cfg,
                     node=node()) == selftest_need()


def test_a_source_not_on_the_node_takes_the_whole_node(tmp_path):
    n = part_need(alloy("org/not-downloaded"), root=tmp_path, config=NodeConfig(), node=node())
    assert n.whole_node and "unknown" in n.basis


def test_a_need_larger_than_the_node_names_the_capacity_and_its_key():
    problem = capacity_problem(need(ram_gib=80), node(ram_gib=64))
    assert "80.0 GiB" in problem and "64.0 GiB" in problem and "resources.ram_gb" in problem
    assert "3 GPUs" in capacity_problem(need(gpus=3), node(gpus=(8, 8)))
    assert capacity_problem(selftest_need(), node(ram_gib=0.001)) is None
    assert capacity_problem(whole_node_need("x"), node(ram_gib=0.001)) is None


@pytest.mark.parametrize("bad", [None, [], {"cpu_slots": -1}, {"cpu_slots": True},
                                 {**need().to_json(), "whole_node": "yes"}])
def test_a_malformed_need_in_a_ticket_reads_as_none(bad):
    assert Need.from_json(bad) is None
    assert Need.from_json(need().to_json()) == need()
