"""Every error the foreman can report, with the exit code the CLI maps it to.

The CLI prints an expected error as one line and exits with its code, so
scripts can branch on the code and people read the message. Messages name the
file, key or part, the bad value, and what to do next.
"""

from __future__ import annotations

from pathlib import Path

# The most characters of untrusted text (an alloy's value, a file's bytes) a
# message repeats; the rest is cut and marked with "…".
EXCERPT_CHARS = 80


def printable(text: str, limit: int | None = None) -> str:
    """`text` with unprintable characters escaped (a message never carries a
    raw control character to a terminal or a log), cut to `limit`."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """`value` as short, escaped text for a message: its repr (control and
    other unprintable characters escaped), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FactoryError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = 1


class BadInput(FactoryError, ValueError):
    """The user gave something unusable: a bad alloy, name or argument."""

    exit_code = 2


class PartNotFound(FactoryError, LookupError):
    """No part of that name sits in the station the command needs."""

    exit_code = 3


class Conflict(FactoryError):
    """The request clashes with the line's state: a name already taken,
    a part in the wrong station, or a root whose worker lock is held."""

    exit_code = 4


class LineEnvironmentError(FactoryError, OSError):
    """The root cannot host a line as laid out (e.g. stations on two
    filesystems, so a rename would not be atomic)."""

    exit_code = 5


class NodeConfigError(FactoryError):
    """factory_node.toml is unreadable or invalid.

    Exit code 78 is sysexits' EX_CONFIG: the systemd unit lists it in
    RestartPreventExitStatus, so a bad config does not restart-loop.
    """

    exit_code = 78


class StopRequested(Exception):
    """Raised inside a stage at a safe point after the worker was asked to
    stop (SIGTERM): the part goes back to intake without spending a retry."""


class StageFailed(Exception):
    """A stage hit a deterministic problem (bad parameters, missing input).

    Running it again would fail the same way, so the part goes to rework
    without retries. The message must say what to change.
    """


class VerifyInputError(BadInput):
    """`verify_path` was given something it cannot verify (not an alloy file,
    no alloy in the directory, unreadable JSON)."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path}: {problem}; fix: {fix}")


class CheckpointError(BadInput):
    """A checkpoint directory is missing a file or holds a corrupt one."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}; {fix}")


class PathEscapeError(BadInput):
    """A path in an alloy points outside the directory it must stay in.

    An alloy is input from other people; a calibration corpus or output path
    that climbs out of its root could read or overwrite anything on the node.
    """

    def __init__(self, *, json_path: str, value: str, root: Path, resolved: Path, reason: str) -> None:
        self.json_path, self.value, self.root = json_path, value, root
        self.resolved, self.reason = resolved, reason
        super().__init__(
            f"{json_path}: path {excerpt(value)} {reason} and leaves {str(root)!r} (resolves to {excerpt(str(resolved))}); "
            f"fix: use a relative path inside {str(root)!r}"
        )


class UnknownArchitectureError(BadInput):
    """No family JSON answers to this architecture string."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"unknown model architecture {name!r}; known families: {', '.join(known)}. "
            f"To support it, add a family JSON under adapters/families/ "
            f"(see adapters/schema.py) and its tiny model builds in tests/test_adapters.py."
        )


class FamilySpecError(FactoryError):
    """A family JSON is malformed or two families claim the same name."""


class SourceError(BadInput):
    """The alloy's source model cannot be used on this node."""

    def __init__(self, *, value: str, problem: str, fix: str, json_path: str = "$.source.baseModel") -> None:
        self.json_path, self.value, self.problem, self.fix = json_path, value, problem, fix
        super().__init__(f"{json_path} = {excerpt(value)}: {problem}; fix: {fix}")


class SourceOutsideRoot(SourceError):
    """A local baseModel resolves outside the root and every cold tier."""


class SourceNotFound(SourceError, FileNotFoundError):
    """A local baseModel names no directory, or a repo id is not resolvable."""


class SourceNotAModel(SourceError):
    """The directory exists but is not a Hugging Face checkpoint (no config.json)."""


class SourceNotCached(SourceNotFound):
    """A repo id is absent from the local HF cache and may not be downloaded."""

    def __init__(self, *, repo_id: str, revision: str, cache_dir: Path, fix: str) -> None:
        self.repo_id, self.revision, self.cache_dir = repo_id, revision, cache_dir
        problem = f"{repo_id!r} at revision {revision!r} is not in the Hugging Face cache at {str(cache_dir)!r}"
        super().__init__(value=repo_id, problem=problem, fix=fix)
