"""Model-family adapters: architectures described as data (families/*.json).

Import-light on purpose: the daemon uses these to reason about checkpoints
without importing torch.
"""

from adapters.registry import (
    FamilySpecError,
    UnknownArchitectureError,
    discover_routers,
    families,
    family_for_config,
    get_family,
    resolve_architecture,
)
from adapters.schema import Family

__all__ = [
    "Family",
    "FamilySpecError",
    "UnknownArchitectureError",
    "discover_routers",
    "families",
    "family_for_config",
    "get_family",
    "resolve_architecture",
]
