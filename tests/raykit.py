"""A real Ray cluster on loopback for the tests (ray.cluster_utils.Cluster).

Nodes differ by the custom resource `vram_gb`, so where a try lands is
decided by its need. Ray's own shutdown stops every process it started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Keep Ray on 127.0.0.1 and off the network.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def loopback_cluster(head: dict, workers: dict[int, dict]) -> Iterator:
    """A head node (`head`: ray.init-style node args) and one worker per
    `vram_gb` key with those args; `cluster.by_vram` maps each vram to its
    node id (the head under 0)."""
    import ray
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    c = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **head})
    c.by_vram = {0: c.head_node.node_id}
    for vram, args in workers.items():
        c.by_vram[vram] = c.add_node(**args, resources={"vram_gb": vram}).node_id
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
