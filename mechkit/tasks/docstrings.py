"""Real English text that ships with every Python: the docstrings of standard-library modules.

Used where a pretrained model needs natural text and no dataset can be downloaded (SAE training
and evaluation on SmolLM2). Paragraphs are whitespace-normalised, deduplicated and returned in a
seeded order; the text depends on the Python version that supplies the docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re

MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fileinput", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "mailbox", "mimetypes", "multiprocessing", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "platform", "plistlib", "poplib", "pprint", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "zipfile", "zoneinfo",
)
_WORD = re.compile(r"[A-Za-z]{3,}")


def python_docstrings(n: int | None = None, *, seed: int = 0, min_words: int = 12, max_chars: int = 400) -> list[str]:
    """Up to ``n`` prose paragraphs (at least ``min_words`` words, cut at a sentence end before
    ``max_chars``) from the docstrings of :data:`MODULES` and their public members, seeded order."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    for text in _docstrings():
        for block in re.split(r"\n\s*\n", text):
            para = _clean(block, max_chars)
            if para and len(_WORD.findall(para)) >= min_words and para not in seen:
                seen.add(para)
                paragraphs.append(para)
    random.Random(seed).shuffle(paragraphs)
    return paragraphs if n is None else paragraphs[:n]


def _docstrings() -> list[str]:
    texts = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module absent from this build (e.g. turtle without tkinter)
            continue
        texts.append(inspect.getdoc(module) or "")
        for member, value in sorted(vars(module).items()):
            if not member.startswith("_") and getattr(value, "__module__", None) == module.__name__:
                texts.append(inspect.getdoc(value) or "")
    return texts


def _clean(block: str, max_chars: int) -> str | None:
    lines = [line.strip() for line in block.strip().splitlines()]
    # code examples, tables and signatures are not prose
    if not lines or any(line.startswith((">>>", "...", "$", "|", "+-", "--")) for line in lines):
        return None
    text = " ".join(lines)
    if len(text) > max_chars:
        cut = text.rfind(". ", 0, max_chars)
        if cut < max_chars // 3:
            return None
        text = text[:cut + 1]
    return text if text[:1].isupper() else None


__all__ = ["MODULES", "python_docstrings"]
