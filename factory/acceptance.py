"""acceptanceCriteria: the gate a forged model must clear, evaluated as data.

    "acceptanceCriteria": {
      "benchmarks": {"humaneval": {"min": 0.30, "anchorDelta": -5.0},
                     "mmlu": {"anchorDelta": -3.0},
                     "perplexity": {"maxRatio": 1.5}},
      "hardware": {"maxVramGb": 24},
      "integrity": {"modelHashRequired": true, "samplesPathRequired": true, "requireReload": true},
      "forgeFactory": {"perplexity": {"maxRatio": 1.5}}
    }

`forgeFactory` holds our gates forge-alloy's schema has no field for (it
validates there, as an extra key); `benchmarks.perplexity` is still read
for alloys written before.

Every benchmark result carries `score`, normalised to 0..1, higher better
(pass@1 0.36, an lm-eval accuracy 0.61; `factory.benchmarks` says how each
is normalised). `min` is a floor on the forged score, on that 0..1 scale.
`anchorDelta` is in POINTS (score x 100), as sentinel-ai's acceptance presets
write it: the lowest allowed (forged − source) x 100, so -3.0 means at most
3 points below the source (the anchor; measured when the eval stage's
compareToBase is on, the schema's default). Perplexity is lower-better and
gated on every held-out corpus measured: `max` caps the forged value,
`maxRatio` forged / source; these two are its only gates (its reported
score, min(1, source / forged), is the ratio again). `hardware.maxVramGb`
bounds the forged weights' size (GiB, read from disk). Every check is
recorded with its required and actual value; a check whose number is missing
fails (an unmeasured gate is not a passed gate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GiB = 2**30


@dataclass(frozen=True)
class Check:
    check: str
    required: Any
    actual: Any
    passed: bool


def _cmp(name: str, required: float, actual: float | None, ok) -> Check:
    return Check(name, required, actual, actual is not None and ok(actual, required))


EXTENSION_KEY = "forgeFactory"
# integrity flag -> the key of the integrity record it requires; both our
# spellings and forge-alloy's (modelHashRequired).
INTEGRITY_FLAGS = (("requireModelHash", "modelHash"), ("modelHashRequired", "modelHash"),
                   ("requireFileHashes", "fileHashes"), ("requireReload", "reload_ok"))
POINTS = 100.0  # anchorDelta's unit: one point is 0.01 of a 0..1 score


def _score(result: dict | None) -> float | None:
    """A result's normalised 0..1 score (every runner writes `score`)."""
    return (result or {}).get("score")


def _perplexity_checks(gate: dict, perplexities: list[dict]) -> list[Check]:
    """Every measured held-out perplexity must clear the gate."""
    checks = []
    for p in perplexities or [{}]:
        where = f"benchmarks.perplexity[{p.get('corpus', '?')}]"
        forged, source = p.get("forged"), p.get("source")
        ratio = forged / source if forged and source else None
        if gate.get("max") is not None:
            checks.append(_cmp(f"{where}.max", gate["max"], forged, lambda a, r: a <= r))
        if gate.get("maxRatio") is not None:
            checks.append(_cmp(f"{where}.maxRatio", gate["maxRatio"], ratio, lambda a, r: a <= r))
    return checks


def _benchmarks(spec: dict, benchmarks: dict, perplexities: list[dict]) -> list[Check]:
    checks = []
    for name, gate in spec.items():
        if name == "perplexity":
            checks += _perplexity_checks(gate, perplexities)
            continue
        got = benchmarks.get(name) or {}
        score, base = _score(got.get("forged")), _score(got.get("source"))
        if gate.get("min") is not None:
            checks.append(_cmp(f"benchmarks.{name}.min", gate["min"], score, lambda a, r: a >= r))
        if gate.get("anchorDelta") is not None:
            points = round((score - base) * POINTS, 6) if score is not None and base is not None else None
            checks.append(_cmp(f"benchmarks.{name}.anchorDelta", gate["anchorDelta"], points, lambda a, r: a >= r))
    return checks


def evaluate(criteria: dict | None, *, benchmarks: dict, perplexities: list[dict], forged_bytes: int | None,
             integrity: dict) -> dict:
    """The verdict: {"passed", "checks": [...]}; no criteria passes vacuously.

    `benchmarks` is the eval stations' {name: {"forged": {...}, "source": {...}}};
    `perplexities` one {"corpus", "source", "forged"} per held-out corpus.
    """
    criteria = criteria or {}
    checks = _benchmarks(criteria.get("benchmarks") or {}, benchmarks, perplexities)
    # Our gates the reference schema has no field for live under its
    # `forgeFactory` extension key (so the alloy validates there too).
    ours = criteria.get(EXTENSION_KEY) or {}
    if ours.get("perplexity"):
        checks += _perplexity_checks(ours["perplexity"], perplexities)
    hw = criteria.get("hardware") or {}
    if hw.get("maxVramGb") is not None:
        gib = None if forged_bytes is None else round(forged_bytes / GiB, 3)
        checks.append(_cmp("hardware.maxVramGb", hw["maxVramGb"], gib, lambda a, r: a <= r))
    flags = criteria.get("integrity") or {}
    for flag, key in INTEGRITY_FLAGS:
        if flags.get(flag):
            have = integrity.get(key)
            checks.append(Check(f"integrity.{flag}", True, bool(have), bool(have)))
    if flags.get("samplesPathRequired"):
        # Every benchmark that generates (it wrote samples for the source or
        # forged model) must have them for the forged one.
        missing = [n for n, r in benchmarks.items()
                   if any("samples_path" in (r.get(role) or {}) for role in ("forged", "source"))
                   and not (r.get("forged") or {}).get("samples_path")]
        checks.append(Check("integrity.samplesPathRequired", True, not missing, not missing))
    return {"passed": all(c.passed for c in checks), "checks": [asdict(c) for c in checks]}


def summary(verdict: dict) -> str:
    failed = [c for c in verdict["checks"] if not c["passed"]]
    return "; ".join(f"{c['check']}: required {c['required']}, got {c['actual']}" for c in failed)
