"""Build the broad fitting corpus of exit adapters (workers/data/broad.jsonl and broad_heldout.jsonl) from
human-written English that Debian and Python ship on this machine (sources, origins and licences in
workers/data/README.md).

    python -m bench.build_corpus [--fit-chars 40000] [--heldout-chars 6000]

Each source's text is cleaned, cut at paragraph ends into pieces of about 1,600 characters, and split in
order: the last pieces (about `--heldout-chars`) are its held-out split, which fitting never sees; the pieces
before them, up to `--fit-chars`, are its fitting split (written a piece of each source in turn, so that any
prefix of the file spans every source). The out-of-domain source (`dpkg-spec`, a technical
specification) goes whole to the held-out file: fitting never sees any of it. Deterministic: the same
installed files give the same output.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import re
import sys
from collections.abc import Callable, Iterator
from itertools import chain, zip_longest
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "workers" / "data"
STDLIB = Path(ast.__file__).resolve().parent
PIECE_CHARS = 1600


def _read(path: Path) -> str:
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8")


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if p.strip()]


def gnu_manuals() -> str:
    """GNU grep and sed manuals (info), without node headers, menus and index lines."""
    parts = []
    for name in ("grep", "sed"):
        text = _read(Path(f"/usr/share/info/{name}.info.gz"))
        text = text.split("\x1f", 2)[-1]  # drop the info preamble (START-INFO-DIR-ENTRY)
        text = re.sub(r"^\x1f?\n?File: [^\n]*\n", "\n", text, flags=re.MULTILINE)
        text = re.sub(r"^\* Menu:\s*$|^\* [^\n]*::[^\n]*$|^[ \t]{20,}\S[^\n]*$", "", text, flags=re.MULTILINE)
        text = text.split("Tag Table:")[0]
        for cut in ("Appendix A GNU Free Documentation License", "Concept Index\n*", "Index\n*****"):
            text = text.split(cut)[0]
        parts.append(text)
    return "\n\n".join(parts)


def vim_manual() -> str:
    """Chapters 2-12 of the Vim user manual (task-oriented tutorial prose), without the tag lines."""
    parts = []
    for chapter in range(2, 13):
        text = _read(Path(f"/usr/share/vim/vim90/doc/usr_{chapter:02d}.txt"))
        text = re.sub(r"^=+$", "", text, flags=re.MULTILINE)
        text = re.sub(
            r"^\s*Next chapter:.*$|^\s*Previous chapter:.*$|^Table of contents:.*$",
            "",
            text,
            flags=re.MULTILINE,
        )
        text = re.sub(r"^\s*vim:tw=.*$", "", text, flags=re.MULTILINE)
        parts.append(text)
    return "\n\n".join(parts)


def python_reference() -> str:
    """The Python Language Reference as shipped for pydoc (Lib/pydoc_data/topics.py), topics in name order."""
    source = (STDLIB / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    topics: dict[str, str] = ast.literal_eval(source.split("=", 1)[1].strip())
    return "\n\n".join(topics[name] for name in sorted(topics))


DOCSTRING_MODULES = (
    "textwrap",
    "argparse",
    "functools",
    "heapq",
    "bisect",
    "fractions",
    "statistics",
    "shutil",
    "difflib",
    "calendar",
    "string",
    "dataclasses",
    "pathlib",
    "collections/__init__",
    "json/decoder",
    "json/encoder",
    "logging/__init__",
    "subprocess",
    "tempfile",
    "zipfile",
    "csv",
    "enum",
    "typing",
    "contextlib",
    "inspect",
    "random",
    "datetime",
    "ipaddress",
    "smtplib",
    "urllib/parse",
)


def python_docstrings() -> str:
    """Docstrings of modules, classes and functions (with the def line) from some of Python's stdlib."""
    parts = []
    for module in DOCSTRING_MODULES:
        tree = ast.parse((STDLIB / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 120:
                continue
            if isinstance(node, ast.Module):
                head = f"Module {module.removesuffix('/__init__').replace('/', '.')}"
            elif isinstance(node, ast.ClassDef):
                head = f"class {node.name}"
            else:
                head = f"def {node.name}({ast.unparse(node.args)})"
            parts.append(f"{head}:\n{doc}")
    return "\n\n".join(parts)


def licences(names: tuple[str, ...]) -> Callable[[], str]:
    def read() -> str:
        return "\n\n".join(_read(Path(f"/usr/share/common-licenses/{name}")) for name in names)

    return read


def dpkg_spec() -> str:
    """The dpkg triggers specification (Debian's dpkg documentation)."""
    return _read(Path("/usr/share/doc/dpkg/spec/triggers.txt"))


# name: (register, reader); the held-out split of "legal" is another licence, Apache-2.0
SOURCES: dict[str, tuple[str, Callable[[], str]]] = {
    "gnu-manuals": ("technical documentation", gnu_manuals),
    "vim-manual": ("tutorial prose", vim_manual),
    "python-reference": ("reference prose", python_reference),
    "python-docstrings": ("code docstrings", python_docstrings),
    "legal": ("licence text", licences(("GPL-3", "MPL-2.0", "LGPL-2.1"))),
}
HELDOUT_ONLY = {"legal": licences(("Apache-2.0",))}
OUT_OF_DOMAIN: dict[str, tuple[str, Callable[[], str]]] = {
    "dpkg-spec": ("technical specification", dpkg_spec),
}


def pieces(text: str) -> Iterator[str]:
    """Consecutive paragraphs joined into pieces of about PIECE_CHARS characters."""
    current: list[str] = []
    size = 0
    for paragraph in _paragraphs(text):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= PIECE_CHARS:
            yield "\n\n".join(current)
            current, size = [], 0
    if current:
        yield "\n\n".join(current)


def take(chunks: list[str], chars: int) -> list[str]:
    out: list[str] = []
    for chunk in chunks:
        if sum(map(len, out)) >= chars:
            break
        out.append(chunk)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit-chars", type=int, default=40_000)
    parser.add_argument("--heldout-chars", type=int, default=6_000)
    args = parser.parse_args()
    fits: list[list[dict[str, str]]] = []
    heldout = []
    for name, (register, read) in SOURCES.items():
        chunks = list(pieces(read()))
        if name in HELDOUT_ONLY:
            held = take(list(pieces(HELDOUT_ONLY[name]())), args.heldout_chars)
        else:
            held = take(chunks[::-1], args.heldout_chars)[::-1]
            chunks = chunks[: len(chunks) - len(held)]
        fits.append([{"source": name, "prompt": "", "response": c} for c in take(chunks, args.fit_chars)])
        heldout += [{"source": name, "register": register, "text": c} for c in held]
    for name, (register, read) in OUT_OF_DOMAIN.items():
        heldout += [
            {"source": name, "register": register, "text": c, "out_of_domain": True} for c in pieces(read())
        ]
    fit = [row for row in chain.from_iterable(zip_longest(*fits)) if row is not None]  # sources in turn
    for filename, rows in (("broad.jsonl", fit), ("broad_heldout.jsonl", heldout)):
        path = DATA / filename
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} records, {path.stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
