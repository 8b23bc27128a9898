"""work/<base>/checkpoint.json: which stages of a part are done, provably.

After each stage the child records the stage's index and type, its outputs
with their sha256, and its metrics, durably. A restarted part skips a stage
only if its entry matches the alloy (same raw-bytes hash, same stage type)
and every recorded output still hashes the same; the first stage that fails
that check, and everything after it, runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from factory import durable
from factory.events import utc_now
from factory.integrity import sha256_file
from factory.protocol import CHECKPOINT, PROTOCOL_VERSION

FILE_NAME = CHECKPOINT


def hash_outputs(work_dir: Path, outputs: list[Path]) -> dict[str, str]:
    """{path relative to the work dir: sha256} for files and files under dirs."""
    hashes: dict[str, str] = {}
    for out in outputs:
        files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
        for f in files:
            hashes[str(f.relative_to(work_dir))] = sha256_file(f)
    return hashes


@dataclass
class Checkpoint:
    path: Path
    alloy_sha256: str
    stages: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, work_dir: Path, alloy_sha256: str) -> "Checkpoint":
        """The checkpoint for this alloy; a checkpoint of other bytes is ignored."""
        path = work_dir / FILE_NAME
        try:
            data = durable.read_json(path)
        except (FileNotFoundError, ValueError):
            data = None
        # Factories before protocol fix 9 wrote "sha256:<hex>" here; their
        # checkpoints still resume.
        if not data or str(data.get("alloy_sha256")).removeprefix("sha256:") != alloy_sha256:
            return cls(path, alloy_sha256)
        return cls(path, alloy_sha256, list(data.get("stages", [])))

    def verified_prefix(self, work_dir: Path, stage_types: list[str]) -> int:
        """How many leading stages are done and still intact on disk."""
        for i, entry in enumerate(self.stages):
            if i >= len(stage_types) or entry.get("index") != i or entry.get("type") != stage_types[i]:
                return i
            for rel, digest in entry.get("outputs", {}).items():
                f = work_dir / rel
                if not f.is_file() or sha256_file(f) != digest:
                    return i
        return len(self.stages)

    def truncate(self, n: int) -> None:
        del self.stages[n:]

    def record(self, entry: dict) -> None:
        self.stages.append({**entry, "completed_at": utc_now()})
        self.save()

    def save(self) -> None:
        durable.write_json(self.path, {
            "protocol_version": PROTOCOL_VERSION,
            "alloy_sha256": self.alloy_sha256,
            "stages": self.stages,
        })
