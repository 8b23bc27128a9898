"""Look up a model family by config ``model_type``, class name or alloy alias.

Families are the JSON files in ``adapters/families/``, loaded once into
frozen :class:`~adapters.schema.Family` models. Names are normalised
(case-folded, ``-`` and ``.`` read as ``_``) so ``qwen3-moe``, ``Qwen3_MoE``
and ``qwen3_moe`` are one key.

Router modules in a *loaded* model are found by structure with
:func:`discover_routers`; transformers renames and re-wraps them between
releases, so their in-memory names are never trusted.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.schema import Family
from factory.errors import UnknownArchitectureError, FamilySpecError  # noqa: F401 - re-exported

if TYPE_CHECKING:  # torch stays out of the daemon's import graph
    import torch

FAMILIES_DIR = Path(__file__).parent / "families"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _normalise(name: str) -> str:
    return re.sub(r"[-.\s]", "_", name.strip()).casefold()


@functools.cache
def _load() -> tuple[tuple[Family, ...], dict[str, Family]]:
    """Parse every family JSON once and index all of its names."""
    families: list[Family] = []
    index: dict[str, Family] = {}
    for path in sorted(FAMILIES_DIR.glob("*.json")):
        try:
            family = Family.model_validate(json.loads(path.read_text()))
        except (ValueError, OSError) as err:
            raise FamilySpecError(f"{path}: invalid family spec: {err}") from err
        families.append(family)
        for name in family.names():
            key = _normalise(name)
            if key in index and index[key] is not family:
                raise FamilySpecError(
                    f"{path}: name {name!r} already belongs to family {index[key].name!r}; "
                    f"remove it from one of the two specs"
                )
            index[key] = family
    return tuple(families), index


def families() -> list[Family]:
    """Every registered family, sorted by name."""
    return list(_load()[0])


def resolve_architecture(name: str) -> str | None:
    """Canonical family name (config ``model_type``) for any known spelling."""
    family = _load()[1].get(_normalise(name))
    return family.name if family else None


def get_family(model_type_or_alias: str) -> Family:
    """The family for a ``model_type``, class name or alloy alias.

    Raises :class:`UnknownArchitectureError` naming the known families.
    """
    family = _load()[1].get(_normalise(model_type_or_alias))
    if family is None:
        raise UnknownArchitectureError(model_type_or_alias, [f.name for f in families()])
    return family


def family_for_config(config: dict[str, Any]) -> Family:
    """The family of a parsed config.json: ``model_type`` first, then the
    ``architectures`` class names (older exports omit ``model_type``)."""
    candidates = [config.get("model_type"), *(config.get("architectures") or [])]
    for name in filter(None, candidates):
        if resolve_architecture(name):
            return get_family(name)
    raise UnknownArchitectureError(str(candidates[0] or candidates), [f.name for f in families()])


def discover_routers(model: "torch.nn.Module", *, num_experts: int | None = None) -> dict[int, "torch.nn.Module"]:
    """Map decoder-layer index -> router module of a loaded model.

    Found by structure, never by name: a module whose class name ends in
    ``Router`` (transformers 5: ``*TopKRouter``, ``*TopkRouter``), or else a
    ``Linear`` named ``gate``/``router`` with ``out_features == num_experts``
    (older remote-code MoEs). ``num_experts`` defaults to the model config's
    expert count. The outermost match per layer wins, so Granite's
    ``router`` wins over a ``router.layer`` Linear inside it.
    """
    import torch  # lazy: only stations that already hold a model call this

    if num_experts is None:
        num_experts = _config_expert_count(getattr(model, "config", None))
    routers: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        match = _LAYER_INDEX.search(name + ".")
        if match is None or int(match.group(1)) in routers:
            continue
        if _looks_like_router(name, module, num_experts, torch):
            routers[int(match.group(1))] = module
    return dict(sorted(routers.items()))


def _looks_like_router(name: str, module: "torch.nn.Module", num_experts: int | None, torch: Any) -> bool:
    if type(module).__name__.endswith("Router"):
        return True
    leaf = name.rsplit(".", 1)[-1]
    return (
        isinstance(module, torch.nn.Linear)
        and leaf in ("gate", "router")
        and num_experts is not None
        and module.out_features == num_experts
    )


def _config_expert_count(config: Any) -> int | None:
    """Expert count of a loaded transformers config, via its family spec."""
    if config is None:
        return None
    as_dict = config.to_dict()
    try:
        return family_for_config(as_dict).expert_count(as_dict)
    except UnknownArchitectureError:
        return None
