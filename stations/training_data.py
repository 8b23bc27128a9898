"""Training texts from a resolved dataset, through the `datasets` library.

`factory.datasets` decides at plan time where a stage's data is; this module
loads exactly that, always as a stream (`streaming=True`: nothing is
prepared into the arrow cache, nothing is held whole in memory), so a stage
reads only as many records as its steps need:

* a file inside the root: `load_dataset("json" | "parquet" | "text",
  data_files=...)` (".txt" is one document);
* the datasets cache: `load_dataset(id, config, cache_dir=...)`, which the
  library serves from its cache when HF_DATASETS_OFFLINE / HF_HUB_OFFLINE
  are set (or the Hub is unreachable);
* a hub-cache snapshot: `load_dataset(snapshot_dir, config)` (or its
  configuration's subdirectory), which reads the downloaded files;
* otherwise `load_dataset(id, config)` from the Hub.

Every station trains on the `train` split.

How a record becomes a training text (the one layout, docs/DATASETS.md):

* a string column `text`: the text as it is; blank records (WikiText's
  empty lines) are skipped;
* an instruction pair, the first of INSTRUCTION_COLUMNS whose columns are
  strings (e.g. CodeFeedback's `query`/`answer`, Alpaca's
  `instruction`/`input`/`output`), or a chat in `messages` (role/content)
  or `conversations` (ShareGPT's from/value): a conversation of a user
  turn and an assistant turn, rendered with the tokenizer's chat template
  when it has one (`apply_chat_template(..., tokenize=False)`), else as

      ### Instruction:
      {prompt}

      ### Input:           <- only when the record has a non-empty input
      {input}

      ### Response:
      {response}

  (turns separated by one blank line; a system turn is "### System:").
  Every token of the text is trained on; padding never is (lora.collate).

A record with none of these shapes fails the stage with its number and
columns: a dataset that silently trained on nothing would look like success.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from factory.datasets import TRAIN_SPLIT, ResolvedDataset
from factory.errors import StageFailed, StopRequested

TEXT_COLUMN = "text"
# (prompt column, optional input column, response column), tried in order.
INSTRUCTION_COLUMNS: tuple[tuple[str, str | None, str], ...] = (
    ("instruction", "input", "output"),
    ("query", None, "answer"),
    ("question", None, "answer"),
    ("prompt", None, "response"),
    ("prompt", None, "completion"),
)
CHAT_COLUMNS = ("messages", "conversations")
# ShareGPT speakers -> chat roles.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "bot": "assistant", "model": "assistant"}
_HEADINGS = {"system": "### System:", "user": "### Instruction:", "input": "### Input:",
             "assistant": "### Response:"}
_FILE_BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


# ── records ─────────────────────────────────────────────────────────────────


def open_records(found: ResolvedDataset, *, scratch_dir: Path | None = None) -> Iterable[dict[str, Any]]:
    """The train split of `found` as a stream of records (dicts).

    `scratch_dir` takes the lock files the library writes even when it
    streams (the stage directory, so they go with the work dir); a
    datasets-cache dataset is read from its cache, which holds its own.
    """
    import datasets

    scratch = {"cache_dir": str(scratch_dir)} if scratch_dir is not None else {}
    if found.kind == "file":
        builder = _FILE_BUILDERS[found.suffix]
        extra = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=str(found.path), split=TRAIN_SPLIT, streaming=True,
                                     **extra, **scratch)
    if found.kind == "hub-snapshot":
        return datasets.load_dataset(str(found.path), None if found.data_dir else found.config,
                                     data_dir=found.data_dir, split=TRAIN_SPLIT, streaming=True, **scratch)
    cache = {"cache_dir": str(found.path)} if found.kind == "hf-cache" else scratch
    return datasets.load_dataset(found.id, found.config, split=TRAIN_SPLIT, streaming=True, **cache)


def conversation(record: dict[str, Any]) -> list[dict[str, str]] | None:
    """A record's turns as chat messages ({"role", "content"}), or None when
    it is no instruction pair or chat. An "input" turn (Alpaca) is kept
    apart here and joined to the prompt by the renderer."""
    for prompt, extra, response in INSTRUCTION_COLUMNS:
        p, r = record.get(prompt), record.get(response)
        if isinstance(p, str) and isinstance(r, str):
            turns = [{"role": "user", "content": p}]
            x = record.get(extra) if extra else None
            if isinstance(x, str) and x.strip():
                turns.append({"role": "input", "content": x})
            return turns + [{"role": "assistant", "content": r}]
    for column in CHAT_COLUMNS:
        chat = record.get(column)
        if isinstance(chat, list) and chat:
            turns = [_turn(m) for m in chat]
            return turns if all(turns) else None
    return None


def _turn(message: object) -> dict[str, str] | None:
    if not isinstance(message, dict):
        return None
    role = _ROLES.get(str(message.get("role", message.get("from", ""))).lower())
    content = message.get("content", message.get("value"))
    return {"role": role, "content": content} if role and isinstance(content, str) else None


def render(turns: list[dict[str, str]], tokenizer=None) -> str:
    """One conversation as training text: the tokenizer's chat template when
    it has one, else the "### Instruction / ### Response" layout."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_merge_input(turns), tokenize=False)
    return "\n\n".join(f"{_HEADINGS[t['role']]}\n{t['content']}" for t in turns)


def _merge_input(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Chat templates know no "input" role: it joins the prompt before it."""
    out: list[dict[str, str]] = []
    for t in turns:
        if t["role"] == "input" and out:
            out[-1] = {"role": out[-1]["role"], "content": f"{out[-1]['content']}\n\n{t['content']}"}
        else:
            out.append(t)
    return out


def record_text(record: object, tokenizer=None) -> str | None:
    """The training text of one record ("" for a blank text record), or None
    when no known shape fits."""
    if isinstance(record, dict) and isinstance(record.get(TEXT_COLUMN), str):
        return record[TEXT_COLUMN] if record[TEXT_COLUMN].strip() else ""
    turns = conversation(record) if isinstance(record, dict) else None
    return render(turns, tokenizer) if turns else None


# ── texts ───────────────────────────────────────────────────────────────────


def training_texts(found: ResolvedDataset, tokenizer=None, *, max_chars: int | None = None,
                   scratch_dir: Path | None = None) -> Iterator[str]:
    """The dataset's training texts, in order, each cut to `max_chars`; read
    lazily, so a consumer that stops early reads no further."""
    where = f"{found.json_path} = {found.ref!r}"
    try:
        records = iter(open_records(found, scratch_dir=scratch_dir))
        for n, record in enumerate(records):
            text = record_text(record, tokenizer)
            if text is None:
                columns = sorted(k for k, v in record.items() if v is not None)  # JSON columns are unioned
                raise StageFailed(f"{where}: record {n} has columns {columns} and no training text; give "
                                  f"each record a string {TEXT_COLUMN!r} column, an instruction pair "
                                  f"({_shapes()}) or a chat in {' or '.join(CHAT_COLUMNS)}")
            if text:
                yield text[:max_chars] if max_chars is not None else text
    except (StageFailed, StopRequested):
        raise
    except Exception as err:  # datasets/pyarrow raise many types; all mean "this data cannot be read"
        raise StageFailed(f"{where}: the datasets library could not read it ({type(err).__name__}: {err}); "
                          f"{_read_fix(found)}") from err


def _shapes() -> str:
    return ", ".join("/".join(c for c in cols if c) for cols in INSTRUCTION_COLUMNS)


def _read_fix(found: ResolvedDataset) -> str:
    if found.kind == "file":
        return f"check that {found.path} is JSONL (one JSON object per line), parquet or UTF-8 text"
    if found.kind == "hub":
        return ("it is not on this node and could not be streamed from the Hub; run `factory plan` for how "
                "to provide it")
    return f"the cached copy at {found.path} is damaged or incomplete; download it again"
