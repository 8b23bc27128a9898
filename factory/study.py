"""Calibration studies: finished parts that pruned experts of one source, side by side.

The same grouping as bench/calibration_table.py, read back from the line
instead of run: a study is every finished part whose alloy names the same
`source.baseModel` and which ran an expert-prune stage; each run is placed by
its keep ratio (experts kept / experts the source had, from the stage's
metrics) and its method (the stage's ranking metric), and what it measured is
its held-out perplexity, source and forged, from result.json. Everything is
read as untrusted: a part whose files do not say all of that is left out.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from factory import durable
from factory.line import Line, Part
from factory.plots import Series
from factory.protocol import MAX_ALLOY_BYTES, RESULT

PRUNE_STAGE = "expert-prune"
# A root may hold thousands of finished parts; a study page reads at most this many.
MAX_PARTS = 2000


@dataclass(frozen=True)
class StudyRun:
    """One finished part of a study."""

    part: str
    method: str
    kept: int
    experts: int
    forged: dict[str, float]  # corpus -> forged perplexity
    source: dict[str, float]  # corpus -> source perplexity

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.experts


@dataclass
class Study:
    """The runs that pruned one source model."""

    source_model: str
    runs: list[StudyRun] = field(default_factory=list)

    def series(self) -> list[Series]:
        """Mean forged perplexity per (corpus, method) across keep ratios,
        and each corpus's source perplexity as a dashed reference line."""
        cells: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        sources: dict[str, list[float]] = defaultdict(list)
        for r in self.runs:
            for corpus, ppl in r.forged.items():
                cells[(corpus, r.method)][r.keep_ratio].append(ppl)
            for corpus, ppl in r.source.items():
                sources[corpus].append(ppl)
        ratios = sorted({r.keep_ratio for r in self.runs})
        out = [Series(f"{corpus} · {method}", [(k, statistics.fmean(v)) for k, v in by_keep.items()])
               for (corpus, method), by_keep in sorted(cells.items())]
        out += [Series(f"{corpus} · source", [(k, statistics.fmean(v)) for k in ratios], dashed=True)
                for corpus, v in sorted(sources.items())]
        return out


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _ppl(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def _base_model(part: Part) -> str | None:
    try:
        alloy = json.loads(durable.read_regular(part.path, limit=MAX_ALLOY_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    model = _obj(_obj(alloy).get("source")).get("baseModel")
    return model if isinstance(model, str) and model else None


def study_run(part: Part) -> tuple[str, StudyRun] | None:
    """(source model, run) of a finished part that pruned experts, or None."""
    result = part.read_sidecar(RESULT) or {}
    stages = result.get("stages") if isinstance(result.get("stages"), list) else []
    prune = next((_obj(s.get("metrics")) for s in map(_obj, stages) if s.get("type") == PRUNE_STAGE), None)
    if prune is None:
        return None
    kept, experts = _count(prune.get("experts_after")), _count(prune.get("experts_before"))
    model = _base_model(part)
    if kept is None or experts is None or kept > experts or model is None:
        return None
    forged, source = {}, {}
    for p in map(_obj, result.get("perplexity") if isinstance(result.get("perplexity"), list) else []):
        corpus = p.get("corpus")
        if isinstance(corpus, str) and _ppl(p.get("forged")) is not None:
            forged[corpus] = _ppl(p.get("forged"))
            if _ppl(p.get("source")) is not None:
                source[corpus] = _ppl(p.get("source"))
    method = prune.get("metric") if isinstance(prune.get("metric"), str) else "explicit keepExpertIndices"
    return model, StudyRun(part.base, method or "explicit keepExpertIndices", kept, experts, forged, source)


def studies(line: Line) -> list[Study]:
    """Every source model with at least one finished expert-prune part,
    its runs sorted by keep ratio, then method, then name."""
    found: dict[str, Study] = {}
    for part in line.parts("finished")[:MAX_PARTS]:
        got = study_run(part)
        if got is not None:
            found.setdefault(got[0], Study(got[0])).runs.append(got[1])
    for s in found.values():
        s.runs.sort(key=lambda r: (r.keep_ratio, r.method, r.part))
    return [found[k] for k in sorted(found)]
