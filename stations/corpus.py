"""Calibration and evaluation text: finding it, pinning it, tokenising it.

A corpus is a JSONL file (one object per line, text under `textField`,
default "text") or a plain text file. Alloys name it by path
(`calibrationCorpusFile`) or by id into `calibrationCorpora[]`, whose entry
carries the path and the sha256 the bytes must match. Paths resolve inside
the factory root: an alloy cannot read files elsewhere on the node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from factory.errors import StageFailed
from factory.integrity import sha256_file
from factory.stages import StageContext
from factory.validation import resolve_inside

DEFAULT_TEXT_FIELD = "text"


@dataclass(frozen=True)
class Corpus:
    path: Path
    sha256: str  # bare hex, measured
    text_field: str
    ref: str  # what the alloy called it (id or path), for reports


def local_file(ctx: StageContext, rel: str, *, where: str, what: str) -> Path:
    """An existing file an alloy names, resolved inside the factory root."""
    try:
        path = resolve_inside(ctx.layout.root, rel, json_path=where)
    except ValueError as err:  # PathEscapeError: .., absolute outside, symlink out
        raise StageFailed(str(err)) from err
    if not path.is_file():
        raise StageFailed(f"{where}: {what} file {path} does not exist; put it there or fix the path")
    return path


def _entry_for(ctx: StageContext, ref: str) -> tuple[int, dict] | None:
    for i, c in enumerate(ctx.alloy.get("calibrationCorpora") or []):
        if ref in (c.get("id"), c.get("name"), c.get("path")):
            return i, c
    return None


def resolve(ctx: StageContext, *, file_keys: tuple[str, ...], id_keys: tuple[str, ...]) -> Corpus:
    """The corpus a stage names, checked against its recorded sha256."""
    path_ref = next((ctx.stage[k] for k in file_keys if ctx.stage.get(k)), None)
    id_ref = next((ctx.stage[k] for k in id_keys if ctx.stage.get(k)), None)
    ref = path_ref or id_ref
    if ref is None:
        raise StageFailed(f"stage {ctx.index} ({ctx.stage.get('type')}) names no corpus; "
                          f"set $.stages[{ctx.index}].{file_keys[0]} to a file inside the factory root")
    found = _entry_for(ctx, ref)
    entry = found[1] if found else {}
    rel = path_ref or entry.get("path")
    if not rel:
        raise StageFailed(f"corpus {ref!r} has no path: add it to $.calibrationCorpora with a \"path\" "
                          "inside the factory root")
    where = f"$.stages[{ctx.index}].{file_keys[0]}" if path_ref else f"$.calibrationCorpora[{found[0]}].path"
    path = local_file(ctx, rel, where=where, what="corpus")
    digest = sha256_file(path)
    want = (entry.get("sha256") or "").removeprefix("sha256:")
    if want and want != digest:
        raise StageFailed(f"corpus {path} has sha256 {digest}, but the alloy pins {want}; "
                          "the file changed: restore it or update the alloy's sha256")
    return Corpus(path, digest, entry.get("textField") or DEFAULT_TEXT_FIELD, ref)


def read_texts(corpus: Corpus) -> list[str]:
    """Documents of the corpus: JSONL lines' text field, or the whole text file."""
    raw = corpus.path.read_text(encoding="utf-8")
    if corpus.path.suffix not in (".jsonl", ".ndjson"):
        return [raw]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise StageFailed(f"{corpus.path}:{n}: not JSON ({err}); fix that line") from err
        text = obj.get(corpus.text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise StageFailed(f"{corpus.path}:{n}: no string field {corpus.text_field!r}; "
                              "set textField in $.calibrationCorpora to the key that holds the text")
        docs.append(text)
    return docs


def token_blocks(tokenizer, texts: list[str], *, block: int, budget: int | None = None) -> Iterator[list[int]]:
    """Consecutive blocks of `block` token ids from the documents joined by
    EOS, stopping once `budget` tokens are yielded (a short last block too)."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    given = 0
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        while len(buf) >= block:
            take = block if budget is None else min(block, budget - given)
            yield buf[:take]
            given += take
            buf = buf[block:]
            if budget is not None and given >= budget:
                return
    if buf and (budget is None or given < budget):
        yield buf[: (len(buf) if budget is None else budget - given)]
