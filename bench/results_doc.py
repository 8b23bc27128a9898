"""docs/RESULTS.md is written by the benches, each owning one section
between its own begin/end markers; this replaces one section and keeps the
rest of the file as it is."""

from __future__ import annotations

from pathlib import Path


def splice(out: Path, text: str, *, begin: str, end: str) -> None:
    """Replace the section of `out` between `begin` and `end` with `text`
    (which carries the markers), or append it when `out` has none."""
    old = out.read_text(encoding="utf-8") if out.exists() else "# Results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new, encoding="utf-8")
