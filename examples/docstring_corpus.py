"""Offline English text from the standard library's own docstrings.

Text calibration and the tiny tokenizer need real sentences without a download;
stdlib docstrings are always present, and fixed for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

# A fixed, sorted list of pure-Python modules with plenty of prose and no side effects on import.
MODULES = sorted([
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib",
    "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "zipfile",
])
_MAX_CHARS = 400  # paragraphs longer than this are split at sentence ends
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEISH = re.compile(r"(>>>|\.\.\.\s|[{}\[\]=<>]|::|\$|\\|^\s*[-*+]\s)")


def _docs_of(module) -> list[str]:
    """Docstrings of the module and its own public classes, functions and methods, in name order."""
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj))
            for mname, meth in sorted(vars(obj).items()):
                if not mname.startswith("_") and inspect.isfunction(meth):
                    docs.append(inspect.getdoc(meth))
        elif inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
    return [d for d in docs if d]


def _pieces(doc: str) -> list[str]:
    """Prose paragraphs of one docstring, whitespace collapsed, long ones cut at sentences."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        if _CODEISH.search(para) or para.startswith(" "):
            continue  # doctests, signatures, tables, bullet lists: not prose
        text = " ".join(para.split())
        if len(text) <= _MAX_CHARS:
            out.append(text)
            continue
        chunk = ""
        for sentence in _SENTENCE_END.split(text):
            if chunk and len(chunk) + 1 + len(sentence) > _MAX_CHARS:
                out.append(chunk)
                chunk = ""
            chunk = f"{chunk} {sentence}".strip()
        out.append(chunk)
    return out


def docstring_corpus(min_chars: int = 40, max_items: int | None = None) -> list[str]:
    """De-duplicated prose pieces, in a deterministic order, each at least min_chars long."""
    seen: set[str] = set()
    corpus: list[str] = []
    for modname in MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:  # a stripped-down Python build; skip rather than fail
            continue
        for doc in _docs_of(module):
            for text in _pieces(doc):
                ok = min_chars <= len(text) <= 2 * _MAX_CHARS and " " in text
                if ok and text not in seen:
                    seen.add(text)
                    corpus.append(text)
                    if max_items is not None and len(corpus) >= max_items:
                        return corpus
    return corpus


def write_corpus(path: str | Path, n: int = 256) -> Path:
    """Write the first n corpus texts one per line (for `--calib corpus.txt --tokenizer DIR`)."""
    texts = docstring_corpus(max_items=n)
    if len(texts) < n:
        raise ValueError(f"the corpus has only {len(texts)} texts, asked for {n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path
