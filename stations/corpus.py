"""Calibration and evaluation text: finding it, pinning it, tokenising it.

A corpus is a JSONL file (one object per line, text under `textField`,
default "text") or a plain text file (one document). Alloys name it by path
(`calibrationCorpusFile`) or by id into `calibrationCorpora[]`, whose entry
carries the path and the sha256 the bytes must match. Paths resolve inside
the factory root: an alloy cannot read files elsewhere on the node.

A corpus is read as a stream, never whole, and only as far as a stage's
token budget needs (`read_blocks`): documents one at a time, each cut to
`chars_for_tokens(budget)` characters before it is tokenised, a JSONL line
read LINE_CHUNK_BYTES at a time. A line too long to hold (over
WHOLE_LINE_BYTES) is parsed as it streams by: its text field is decoded up
to the cut and the rest of the line is only scanned, so a corpus that is one
100 MB line costs tens of MB, not the tens of GB that tokenising all of it
would. For a normal corpus the documents, and so the token blocks, are
exactly what reading it whole gave.
"""

from __future__ import annotations

import codecs
import json
import re
from contextlib import closing
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, TextIO

from factory.errors import StageFailed
from factory.integrity import sha256_file
from factory.stages import StageContext
from factory.validation import resolve_inside

DEFAULT_TEXT_FIELD = "text"
JSONL_SUFFIXES = (".jsonl", ".ndjson")

# -- how much of a document can matter ---------------------------------------
CHARS_PER_TOKEN_BOUND = 32
"""Characters one token stands for, at most, when capping a document before
it is tokenised. Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, the
tiny demo BPE) hold tokens of a few characters on average and of at most a
few dozen outside runs of one repeated character; so the first
budget x 32 characters of a document give its first `budget` tokens. Larger
is safer and costs tokenising text that is thrown away."""
MIN_DOC_CHARS = 1 << 16
"""Floor of the cut (64 Ki characters): under a small budget a normal
document (source files and articles run to a few tens of KB) is still read
whole, so small budgets see the same text as large ones."""
MAX_DOC_CHARS = 64 << 20
"""Ceiling (64 Mi characters): what one document may take in memory. A
stage without a budget (LoRA training reads every document whole) refuses a
longer document; a budgeted read cuts it here."""
LINE_CHUNK_BYTES = 1 << 20
"""A JSONL line is read this many bytes at a time."""
WHOLE_LINE_BYTES = 8 << 20
"""Lines up to this long are parsed whole by `json.loads`; longer ones by
the streaming `_LongLine`."""
MAX_NESTING = 1000
"""Deepest nesting of arrays and objects a long line may have (json.loads
stops near here too, with a RecursionError)."""
MAX_SCALAR_CHARS = 4096
"""Longest number or literal a long line may hold outside strings."""


def chars_for_tokens(budget: int | None) -> int:
    """How many characters of one document can matter for `budget` tokens
    (MAX_DOC_CHARS without a budget): see CHARS_PER_TOKEN_BOUND."""
    if budget is None:
        return MAX_DOC_CHARS
    return min(MAX_DOC_CHARS, max(MIN_DOC_CHARS, budget * CHARS_PER_TOKEN_BOUND))


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
    """The corpus a stage names under the camelCase `file_keys` / `id_keys`
    (read from the typed stage), checked against its recorded sha256 (hashed
    as a stream)."""
    path_ref = next((v for k in file_keys if (v := ctx.stage.field_value(k))), None)
    id_ref = next((v for k in id_keys if (v := ctx.stage.field_value(k))), None)
    ref = path_ref or id_ref
    if ref is None:
        raise StageFailed(f"stage {ctx.index} ({ctx.stage.type}) names no corpus; "
                          f"set $.stages[{ctx.index}].{file_keys[0]} to a file inside the factory root")
    found = _entry_for(ctx, ref)
    entry = found[1] if found else {}
    by_id = ctx.layout.corpus_for_id(ref) if not path_ref and not entry.get("path") else None
    rel = path_ref or entry.get("path") or (str(by_id.relative_to(ctx.layout.root)) if by_id else None)
    if not rel:
        raise StageFailed(f"corpus {ref!r} has no path: add it to $.calibrationCorpora with a \"path\" "
                          "inside the factory root")
    where = (f"$.stages[{ctx.index}].{file_keys[0]}" if path_ref else
             f"$.calibrationCorpora[{found[0]}].path" if found and entry.get("path") else
             f"$.stages[{ctx.index}].{id_keys[0]} (the node's {rel})")
    path = local_file(ctx, rel, where=where, what="corpus")
    digest = sha256_file(path)
    want = (entry.get("sha256") or "").removeprefix("sha256:")
    if want and want != digest:
        raise StageFailed(f"corpus {path} has sha256 {digest}, but the alloy pins {want}; "
                          "the file changed: restore it or update the alloy's sha256")
    return Corpus(path, digest, entry.get("textField") or DEFAULT_TEXT_FIELD, ref)


# -- reading -------------------------------------------------------------------
def read_texts(corpus: Corpus, *, max_chars: int | None = None) -> Iterator[str]:
    """Documents of the corpus, read lazily: JSONL lines' text field, or the
    whole text file. With `max_chars` (from `chars_for_tokens`) each
    document is cut to that many characters; without it a document over
    MAX_DOC_CHARS is refused (file:line, and the fix)."""
    if corpus.path.suffix in JSONL_SUFFIXES:
        with open(corpus.path, "rb") as fh:
            yield from _jsonl_texts(_Utf8Lines(fh, corpus.path), corpus, max_chars)
    else:
        with open(corpus.path, encoding="utf-8") as fh:
            yield _plain_text(fh, corpus, max_chars)


def _limit(max_chars: int | None) -> int:
    """The most characters of one document that are kept."""
    return MAX_DOC_CHARS if max_chars is None else min(max_chars, MAX_DOC_CHARS)


def _fit(text: str, where: str, max_chars: int | None) -> str:
    """`text` cut to `max_chars`, or refused over MAX_DOC_CHARS without one."""
    limit = _limit(max_chars)
    if len(text) <= limit:
        return text
    if max_chars is None:
        raise StageFailed(f"{where}: a document of over {MAX_DOC_CHARS:,} characters; split it into several "
                          "documents (JSONL lines), or give the stage a token budget")
    return text[:limit]


def _plain_text(fh: TextIO, corpus: Corpus, max_chars: int | None) -> str:
    try:
        return _fit(fh.read(_limit(max_chars) + 1), str(corpus.path), max_chars)
    except UnicodeDecodeError as err:
        raise StageFailed(f"{corpus.path}: not UTF-8 ({err}); re-encode the corpus as UTF-8") from err


class _Utf8Lines:
    """A binary file read line by line like a text file's readline(size),
    `size` in bytes: each line decoded as UTF-8 on its own (a character
    split between two chunks is kept whole), so a bad byte names its line.
    Lines end at "\\n" ("\\r\\n" leaves a "\\r", which JSON reads as space)."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh, self.path, self.line = fh, path, 1
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def readline(self, size: int) -> str:
        raw = self.fh.readline(size)
        ended = len(raw) < size or raw.endswith(b"\n")  # short without "\n": the end of the file
        try:
            text = self._decoder.decode(raw, final=ended)
        except UnicodeDecodeError as err:
            raise StageFailed(f"{self.path}:{self.line}: not UTF-8 ({err}); re-encode the corpus as UTF-8") from err
        if ended:
            self._decoder.reset()
            self.line += 1
        return text


def _jsonl_texts(fh: _Utf8Lines, corpus: Corpus, max_chars: int | None) -> Iterator[str]:
    keep = _limit(max_chars)
    for n in count(1):
        where = f"{corpus.path}:{n}"
        head = fh.readline(WHOLE_LINE_BYTES)
        whole = fh.line > n  # the line (or the file) ended within `head`
        if whole and not head:
            return
        if whole:
            text = _whole_line_text(head, where, corpus.text_field) if head.strip() else None
        else:
            text = _LongLine(head, fh, where).text_field(corpus.text_field, keep=keep)
        if text is not None:
            yield _fit(text, where, max_chars)


def _no_field(where: str, field: str) -> StageFailed:
    return StageFailed(f"{where}: no string field {field!r}; set textField in $.calibrationCorpora to the key "
                       "that holds the text")


def _whole_line_text(line: str, where: str, field: str) -> str:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise StageFailed(f"{where}: not JSON ({err}); fix that line") from err
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise _no_field(where, field)
    return text


# A run of string content: plain characters and whole escapes (JSON grammar).
_STRING_RUN = re.compile(r'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_WS = re.compile(r"[ \t\r\n]*")
_STRUCTURAL = re.compile(r'["{}\[\]]')
_SCALAR_CHARS = re.compile(r"[-+.0-9a-zA-Z]*")
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
_LOW_SURROGATE = re.compile("[\udc00-\udfff]")
_CLOSER = {"{": "}", "[": "]"}


class _LongLine:
    """One JSONL line too long to hold, parsed as it is read, in bounded
    memory: the top-level object's text field is decoded up to `keep`
    characters; other members are skipped, strings checked character by
    character and nested values by bracket matching (their scalars are not
    validated). As with json.loads, the last of duplicate keys wins."""

    def __init__(self, head: str, fh: _Utf8Lines, where: str) -> None:
        self.buf, self.pos, self.fh, self.where = head, 0, fh, where
        self.dropped = 0  # characters before buf[0], for messages
        self.ended = False

    def _fill(self) -> bool:
        """Append the line's next chunk to what is left of the buffer; False
        at the end of the line."""
        if self.ended:
            return False
        line = self.fh.line
        chunk = self.fh.readline(LINE_CHUNK_BYTES)
        if self.fh.line > line:
            self.ended, chunk = True, chunk.removesuffix("\n")
        self.dropped += self.pos
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def _fail(self, what: str) -> StageFailed:
        return StageFailed(f"{self.where}: not JSON ({what} at character {self.dropped + self.pos + 1}); "
                           "fix that line")

    def _ws(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the line."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def _expect(self, char: str) -> None:
        if self._ws() != char:
            raise self._fail(f"expected {char!r}")
        self.pos += 1

    def _string(self, keep: int) -> str:
        """The string at the cursor (its opening quote), decoded up to at
        least `keep` + 1 characters where it has them (so a caller sees it
        is longer); keep -1: skipped. Decoding reads a window of raw text
        no longer than what is still wanted (decoded text is never longer
        than its raw form), but long enough for any one escape."""
        self.pos += 1
        pieces: list[str] = []
        kept = 0  # characters decoded; the low half of a surrogate pair does not count
        while True:
            wanted = keep + 1 - kept
            window = len(self.buf) if wanted <= 0 else min(len(self.buf), self.pos + max(wanted, 6))
            end = _STRING_RUN.match(self.buf, self.pos, window).end()
            if end > self.pos:
                if wanted > 0:
                    piece = json.loads('"' + self.buf[self.pos:end] + '"')
                    pieces.append(piece)
                    kept += len(piece) - len(_LOW_SURROGATE.findall(piece))
                self.pos = end
                continue
            at_end = self.pos >= len(self.buf)
            partial = not at_end and self.buf[self.pos] == "\\" and len(self.buf) - self.pos < 6
            if (at_end or partial) and self._fill():
                continue
            if at_end:
                raise self._fail("the line ends inside a string")
            if self.buf[self.pos] != '"':
                raise self._fail(f"invalid character {self.buf[self.pos]!r} in a string")
            self.pos += 1
            text = "".join(pieces)
            if _LOW_SURROGATE.search(text):  # an escaped pair decoded in two windows: join its halves
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
            return text

    def _skip_nested(self) -> None:
        """Skip the array or object at the cursor by bracket matching."""
        stack: list[str] = []
        while True:
            found = _STRUCTURAL.search(self.buf, self.pos)
            if found is None:
                self.pos = len(self.buf)
                if not self._fill():
                    raise self._fail("the line ends inside an array or object")
                continue
            self.pos = found.start()
            char = found.group()
            if char == '"':
                self._string(-1)
                continue
            self.pos += 1
            if char in _CLOSER:
                stack.append(_CLOSER[char])
                if len(stack) > MAX_NESTING:
                    raise self._fail(f"nesting deeper than {MAX_NESTING}")
            elif not stack or stack.pop() != char:
                raise self._fail(f"unbalanced {char!r}")
            if not stack:
                return

    def _skip_scalar(self) -> None:
        text = ""
        while True:
            end = _SCALAR_CHARS.match(self.buf, self.pos).end()
            text += self.buf[self.pos:end]
            self.pos = end
            if len(text) > MAX_SCALAR_CHARS:
                raise self._fail(f"a value of over {MAX_SCALAR_CHARS} characters that is not a string")
            if self.pos < len(self.buf) or not self._fill():
                break
        if not _SCALAR.fullmatch(text):
            raise self._fail(f"invalid value {text[:40]!r}")

    def _skip_value(self) -> None:
        char = self._ws()
        if char == '"':
            self._string(-1)
        elif char in _CLOSER:
            self._skip_nested()
        else:
            self._skip_scalar()

    def text_field(self, field: str, *, keep: int) -> str | None:
        """The top-level `field` (its first `keep` + 1 characters at most);
        None for a blank line; StageFailed if it is not JSON or has no
        string `field`."""
        char = self._ws()
        if char == "":
            return None
        if char != "{":
            raise _no_field(self.where, field)
        self.pos += 1
        text: str | None = None
        if self._ws() == "}":
            self.pos += 1
        else:
            while True:
                if self._ws() != '"':
                    raise self._fail("expected a key")
                key = self._string(len(field))
                self._expect(":")
                if key == field:
                    text = self._string(keep) if self._ws() == '"' else None
                    if text is None:
                        self._skip_value()
                else:
                    self._skip_value()
                char = self._ws()
                self.pos += 1
                if char == "}":
                    break
                if char != ",":
                    self.pos -= 1
                    raise self._fail("expected ',' or '}'")
        if self._ws() != "":
            raise self._fail("extra data after the object")
        if text is None:
            raise _no_field(self.where, field)
        return text


# -- tokens --------------------------------------------------------------------
def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts BOS in front of what it encodes (Gemma,
    Llama), else []. Such models only ever saw text after BOS: a block
    without it reads as a broken context (Gemma-3-270M's perplexity on
    Python code is several times worse), and a LoRA trained on such blocks
    spends its steps learning to do without it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def token_blocks(tokenizer, texts: Iterable[str], *, block: int, budget: int | None = None) -> Iterator[list[int]]:
    """Consecutive blocks of `block` token ids from the documents joined by
    EOS, stopping once `budget` tokens are yielded (a short last block too).
    Each block starts with `bos_prefix` (counted in `block` and `budget`:
    it is context, never a predicted token). Under a budget each document
    is cut to `chars_for_tokens(budget)` characters before it is tokenised,
    and no document after the budget is met is pulled from `texts`."""
    eos = tokenizer.eos_token_id
    prefix = bos_prefix(tokenizer)
    width = block - len(prefix)  # corpus tokens per block
    cap = chars_for_tokens(budget) if budget is not None else None
    buf: list[int] = []
    given = 0
    for text in texts:
        buf.extend(tokenizer(text[:cap], add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        start = 0
        while len(buf) - start >= width:
            take = width if budget is None else min(width, budget - given - len(prefix))
            if take <= 0:
                return
            yield prefix + buf[start:start + take]
            given += take + len(prefix)
            start += width
            if budget is not None and given >= budget:
                return
        del buf[:start]
    rest = buf if budget is None else buf[:max(0, budget - given - len(prefix))]
    if rest:
        yield prefix + rest


def read_blocks(tokenizer, corpus: Corpus, *, block: int, budget: int,
                documents: int | None = None) -> list[list[int]]:
    """The token blocks of `corpus` within `budget` tokens and its first
    `documents` documents (all when None): the corpus is read only as far
    as the budget needs, each document cut before it is tokenised."""
    with closing(read_texts(corpus, max_chars=chars_for_tokens(budget))) as texts:
        return list(token_blocks(tokenizer, islice(texts, documents), block=block, budget=budget))
