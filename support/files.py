"""Used by every stage that writes: atomic files and folders, and where sentemb keeps its caches."""
import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic(path):
    """with atomic(path) as tmp: write a file or folder at tmp; it replaces `path` only if the
    block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        # A folder cannot be replaced in one step: move the old one aside.
        if path.is_dir() and tmp.is_dir():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)


def write_atomic(path, text: str) -> None:
    """The file is complete or absent, never half-written."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cache_root(cache_dir=None) -> Path:
    """--cache-dir, else $SENTEMB_CACHE, else ~/.cache/sentemb: converted models, embeddings."""
    return Path(cache_dir or os.environ.get("SENTEMB_CACHE") or "~/.cache/sentemb").expanduser()
