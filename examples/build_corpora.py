"""Build the example corpora in examples/corpora/ from the local CPython stdlib.

Two corpora, both under the PSF License (see examples/corpora/SOURCES.md):

* code  - the source of a fixed, sorted list of stdlib modules (CODE_MODULES),
          one document per module file;
* prose - English prose from the Python documentation that ships inside the
          stdlib: the language-reference topics in pydoc_data/topics.py (one
          document per topic) and the docstrings of a fixed list of modules and
          packages that are *not* in the code corpus (one document per file).
          Code blocks, grammar rules, doctests and other code-like paragraphs
          are dropped, so what is left is prose.

Each corpus is split by document into train / calib / eval (80/10/10 of its
bytes), written as JSONL with {"id", "text"} per line:
examples/corpora/{code,prose}.{train,calib,eval}.jsonl.

Reads local files only; deterministic. The stdlib differs between CPython
patch releases, so the bytes are only reproducible from the same version
(the committed files were made with CPython 3.11.7): the committed files are
the source of truth, this script documents how they were made.

    python examples/build_corpora.py                # writes examples/corpora/
    python examples/build_corpora.py --out /tmp/c   # elsewhere, e.g. to diff
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "corpora"
SPLITS = (("train", 0.8), ("calib", 0.1), ("eval", 0.1))

# Top-level stdlib modules of 6-40 KB (so no single file dominates a split),
# less generated/table modules. Fixed and sorted: the list is the spec, not
# the selection rule, so a newer stdlib cannot silently add a module.
CODE_MODULES = (
    "_collections_abc", "_compat_pickle", "_markupbase", "_osx_support", "_py_abc",
    "_strptime", "_threading_local", "abc", "aifc", "asynchat", "asyncore", "base64",
    "bdb", "bz2", "cProfile", "calendar", "cgi", "cgitb", "cmd", "code", "codecs",
    "compileall", "contextlib", "copy", "copyreg", "csv", "dis", "filecmp", "fileinput",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "imp", "lzma", "mailcap", "mimetypes", "modulefinder",
    "netrc", "ntpath", "numbers", "opcode", "operator", "os",
    "pipes", "pkgutil", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "pty", "py_compile", "pyclbr", "queue", "quopri", "random",
    "rlcompleter", "runpy", "sched", "selectors", "shelve", "shlex", "site", "smtpd",
    "sndhdr", "socket", "socketserver", "string", "sunau",
    "symtable", "sysconfig", "tabnanny", "telnetlib", "tempfile", "textwrap", "timeit",
    "tokenize", "trace", "traceback", "tracemalloc", "types", "uu", "uuid", "warnings",
    "wave", "weakref", "webbrowser", "zipapp", "zipimport",
)
# Docstring sources for the prose corpus: the large top-level modules and some
# packages, none of them in CODE_MODULES, so no text is in both corpora.
PROSE_DOCSTRING_MODULES = (
    "_pydecimal", "_pyio", "argparse", "ast", "configparser", "dataclasses", "datetime",
    "difflib", "doctest", "enum", "imaplib", "inspect", "ipaddress", "locale", "mailbox",
    "optparse", "pdb", "pickle", "pickletools", "pydoc", "shutil", "ssl", "subprocess",
    "tarfile", "threading", "turtle", "typing", "zipfile",
)
PROSE_DOCSTRING_PACKAGES = (
    "asyncio", "distutils", "email", "http", "importlib", "lib2to3", "logging",
    "tkinter", "unittest", "urllib", "xml",
)
_SKIP_DIRS = {"__pycache__", "test", "tests", "idle_test"}

# A paragraph is code if any line looks like code: prompts, grammar rules,
# statements, braces/semicolons at line end, comments/decorators, comparisons,
# or a bare call. Errs towards dropping: losing some prose is cheap.
_CODEY = re.compile(
    r"(>>>|\.\.\. |::=|^\s*(def|class|import|from|return|if|for|while|try|except|with|print)\b"
    r"|[{};]\s*$|^\s*[#@$%]|==|\w+\(.*\)\s*$)",
    re.MULTILINE,
)
_UNDERLINE = re.compile(r"[*=\-^~+]+")


@dataclass(frozen=True)
class Doc:
    """One document: a stable id (what splits are keyed on) and its text."""

    id: str
    text: str


# ── prose cleaning ──────────────────────────────────────────────────────────


def _is_prose(par: str) -> bool:
    """Keep headings and sentence-like paragraphs; drop anything code-like."""
    lines = par.splitlines()
    if len(lines) == 2 and _UNDERLINE.fullmatch(lines[1].strip()):
        return True  # a reST heading with its underline
    if _CODEY.search(par):
        return False
    if len(re.findall(r"[A-Za-z]+", par)) < 4:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in par) / len(par)
    return letters > 0.8 and par[-1] in '.:?!)"'


def prose_of(text: str) -> str:
    """The prose paragraphs of reST-ish text, dedented, one line each."""
    kept = []
    for raw in re.split(r"\n\s*\n", text):
        par = textwrap.dedent(raw).strip()
        if not par or not _is_prose(par):
            continue
        lines = par.splitlines()
        if len(lines) == 2 and _UNDERLINE.fullmatch(lines[1].strip()):
            lines = lines[:1]  # heading: drop the underline
        kept.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(kept)


# ── documents ───────────────────────────────────────────────────────────────


def code_docs(stdlib: Path) -> list[Doc]:
    """One document per CODE_MODULES file, its source verbatim."""
    return [Doc(f"stdlib/{m}.py", (stdlib / f"{m}.py").read_text(encoding="utf-8"))
            for m in CODE_MODULES]


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [n for n in ast.walk(tree) if isinstance(n, nodes)]
    found.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in found if (d := ast.get_docstring(n, clean=True))]


def _package_files(root: Path) -> list[Path]:
    """Every .py under a package, sorted, without test directories."""
    files = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [Path(here) / n for n in sorted(names) if n.endswith(".py")]
    return files


def prose_docs(stdlib: Path) -> list[Doc]:
    """Reference topics plus per-file docstring prose, empty ones dropped."""
    topics_src = (stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    topics: dict[str, str] = ast.literal_eval(topics_src.split("=", 1)[1].strip())
    docs = [Doc(f"pydoc_data/topics:{k}", prose_of(v)) for k, v in sorted(topics.items())]
    files = [stdlib / f"{m}.py" for m in PROSE_DOCSTRING_MODULES]
    for pkg in PROSE_DOCSTRING_PACKAGES:
        files += _package_files(stdlib / pkg)
    for path in files:
        paragraphs = (prose_of(d) for d in _docstrings(path))
        docs.append(Doc(f"stdlib/{path.relative_to(stdlib).as_posix()}:docstrings",
                        "\n\n".join(p for p in paragraphs if p)))
    return [d for d in docs if d.text]


# ── splitting and writing ───────────────────────────────────────────────────


def split_docs(docs: list[Doc]) -> dict[str, list[Doc]]:
    """Assign whole documents to splits so each split's byte share tracks SPLITS.

    Documents are visited in sha256-of-id order (a fixed shuffle that does not
    depend on list order), each going to the split furthest below its target
    share of the bytes seen so far. Within a split, documents keep id order.
    """
    out: dict[str, list[Doc]] = {name: [] for name, _ in SPLITS}
    size = {name: 0 for name, _ in SPLITS}
    seen = 0
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d.id.encode()).hexdigest()):
        seen += len(doc.text.encode())
        name = max(SPLITS, key=lambda s: s[1] * seen - size[s[0]])[0]
        out[name].append(doc)
        size[name] += len(doc.text.encode())
    return {name: sorted(ds, key=lambda d: d.id) for name, ds in out.items()}


def write_jsonl(path: Path, docs: list[Doc]) -> str:
    """Write one {"id", "text"} object per line; returns the file's sha256."""
    data = "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n"
                   for d in docs).encode("utf-8")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"warning: made with CPython 3.11.7, this is {sys.version.split()[0]}; "
              "the output will differ from the committed files", file=sys.stderr)
    try:
        corpora = (("code", code_docs(args.stdlib)), ("prose", prose_docs(args.stdlib)))
    except FileNotFoundError as err:
        print(f"error: {err.filename} not found: the module lists are CPython 3.11's; "
              "run this under CPython 3.11 (or use the committed files)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    print("| file | docs | bytes | sha256 |\n|---|---|---|---|")
    for corpus, docs in corpora:
        for split, part in split_docs(docs).items():
            path = args.out / f"{corpus}.{split}.jsonl"
            digest = write_jsonl(path, part)
            print(f"| {path.name} | {len(part)} | {path.stat().st_size} | `{digest}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
